//! Kernel modules: which files the agent must load, in which order, and their uncompressed bytes.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::kernel::Kernel;
use crate::ImageError;

/// Modules the agent needs on `-M microvm`: the virtio-mmio transport, the root disk and the
/// virtio-serial port of the agent link, the NIC (their dependencies come along).
pub const AGENT_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_console", "virtio_net"];

/// Modules the agent loads only when something first needs them, by group, so boots do not pay
/// for them: `volumes` for disks hot-plugged on virtio-scsi, `fuse` for host directory mounts.
/// The agent asks for a group by these names (`moat_agent::modules::group`).
pub const LATER_MODULES: &[(&str, &[&str])] = &[("volumes", &["virtio_scsi", "sd_mod"]), ("fuse", &["fuse"])];

/// The module files the initramfs carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentModules {
    /// Loaded at boot ([`AGENT_MODULES`]), in load order.
    pub boot: Vec<PathBuf>,
    /// Loaded on first use ([`LATER_MODULES`]): each group's name and its files in load order,
    /// leaving out what boot has loaded already. A group whose modules this kernel lacks is
    /// absent (the agent then says it cannot load it).
    pub later: Vec<(String, Vec<PathBuf>)>,
}

impl AgentModules {
    /// How many module files there are.
    pub fn len(&self) -> usize {
        let mut all: HashSet<&PathBuf> = self.boot.iter().collect();
        all.extend(self.later.iter().flat_map(|(_, files)| files));
        all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The agent's modules for `kernel`: [`AGENT_MODULES`] at boot, [`LATER_MODULES`] on demand.
pub fn resolve_agent_modules(kernel: &Kernel) -> Result<AgentModules, ImageError> {
    resolve_groups(kernel, AGENT_MODULES, LATER_MODULES)
}

fn resolve_groups(kernel: &Kernel, boot: &[&str], later: &[(&str, &[&str])]) -> Result<AgentModules, ImageError> {
    let boot = resolve_modules(kernel, boot)?;
    let mut groups = Vec::with_capacity(later.len());
    for (group, names) in later {
        match resolve_modules(kernel, names) {
            Ok(files) => {
                groups.push((group.to_string(), files.into_iter().filter(|f| !boot.contains(f)).collect()));
            }
            // Optional: a kernel without FUSE still runs sandboxes, just without that feature.
            Err(e @ ImageError::UnknownModule { .. }) => {
                tracing::warn!(group, error = %e, "the guest kernel lacks a module group; its feature is unavailable");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(AgentModules { boot, later: groups })
}

/// Module names treat `-` and `_` alike (`virtio-rng` is `virtio_rng`), as modprobe does.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// `kernel/drivers/block/virtio_blk.ko.xz` → `virtio_blk`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalize(file.split(".ko").next().unwrap_or(file))
}

/// Resolve module names through `modules.dep` into module files in load order: every module after
/// all of its dependencies, each file once. Modules listed in `modules.builtin` are part of the
/// kernel and need no file. An unknown name is an error that names it.
pub fn resolve_modules(kernel: &Kernel, names: &[&str]) -> Result<Vec<PathBuf>, ImageError> {
    let dep_path = kernel.modules_dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path).map_err(|source| ImageError::ModulesUnreadable {
        release: kernel.release.clone(),
        path: dep_path.clone(),
        source,
    })?;
    // A kernel without built-in modules may have no modules.builtin at all.
    let builtin: HashSet<String> = match std::fs::read_to_string(kernel.modules_dir.join("modules.builtin")) {
        Ok(text) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(module_name).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
        Err(source) => {
            return Err(ImageError::ModulesUnreadable {
                release: kernel.release.clone(),
                path: kernel.modules_dir.join("modules.builtin"),
                source,
            })
        }
    };
    let graph = DepGraph::parse(&dep_text);
    let mut resolver =
        Resolver { graph: &graph, kernel, order: Vec::new(), placed: HashSet::new(), visiting: Vec::new() };
    for name in names {
        let name = normalize(name);
        if builtin.contains(&name) {
            continue;
        }
        let path = graph
            .by_name
            .get(&name)
            .ok_or_else(|| ImageError::UnknownModule { release: kernel.release.clone(), name: name.clone() })?;
        resolver.visit(path)?;
    }
    let mut files = Vec::with_capacity(resolver.order.len());
    for rel in resolver.order {
        let file = kernel.modules_dir.join(rel);
        if !file.is_file() {
            return Err(ImageError::ModulesInvalid {
                release: kernel.release.clone(),
                reason: format!("modules.dep lists {rel} but {} does not exist", file.display()),
            });
        }
        files.push(file);
    }
    Ok(files)
}

/// `modules.dep`: `path: dep dep …`, paths relative to the module directory.
struct DepGraph<'a> {
    by_name: HashMap<String, &'a str>,
    deps: HashMap<&'a str, Vec<&'a str>>,
}

impl<'a> DepGraph<'a> {
    fn parse(text: &'a str) -> Self {
        let mut graph = DepGraph { by_name: HashMap::new(), deps: HashMap::new() };
        for line in text.lines() {
            let Some((module, deps)) = line.split_once(':') else { continue };
            let module = module.trim();
            if module.is_empty() {
                continue;
            }
            graph.by_name.insert(module_name(module), module);
            graph.deps.insert(module, deps.split_whitespace().collect());
        }
        graph
    }
}

struct Resolver<'g, 'a> {
    graph: &'g DepGraph<'a>,
    kernel: &'g Kernel,
    order: Vec<&'a str>,
    placed: HashSet<&'a str>,
    visiting: Vec<&'a str>,
}

impl<'a> Resolver<'_, 'a> {
    /// Depth first: each module's own dependencies go before it. modules.dep lists a module's
    /// dependencies deepest last, so walking them in reverse keeps modprobe's order as well.
    fn visit(&mut self, module: &'a str) -> Result<(), ImageError> {
        if self.placed.contains(module) {
            return Ok(());
        }
        if self.visiting.contains(&module) {
            return Err(ImageError::ModulesInvalid {
                release: self.kernel.release.clone(),
                reason: format!("modules.dep has a dependency cycle: {} -> {module}", self.visiting.join(" -> ")),
            });
        }
        self.visiting.push(module);
        let graph = self.graph;
        for dep in graph.deps.get(module).into_iter().flatten().rev() {
            self.visit(dep)?;
        }
        self.visiting.pop();
        self.placed.insert(module);
        self.order.push(module);
        Ok(())
    }
}

/// Where a module goes inside the initramfs (`lib/modules/<release>/kernel/….ko`, without any
/// compression suffix) and its uncompressed contents.
///
/// Modules are unpacked here rather than in the guest so the agent only ever needs
/// `init_module` on plain ELF bytes, whatever the kernel's CONFIG_MODULE_DECOMPRESS says.
pub(crate) fn unpacked_module(kernel: &Kernel, file: &Path) -> Result<(String, Vec<u8>), ImageError> {
    let rel = file.strip_prefix(&kernel.modules_dir).ok().and_then(Path::to_str).ok_or_else(|| {
        ImageError::ModulesInvalid {
            release: kernel.release.clone(),
            reason: format!("{} is not a module file under {}", file.display(), kernel.modules_dir.display()),
        }
    })?;
    let unpack_err = |reason: String| ImageError::ModuleUnpack { path: file.to_path_buf(), reason };
    let raw = std::fs::read(file).map_err(ImageError::io(format!("reading the kernel module {}", file.display())))?;
    let (rel, data) = if let Some(stem) = rel.strip_suffix(".xz") {
        let mut out = Vec::with_capacity(raw.len() * 3);
        lzma_rs::xz_decompress(&mut &raw[..], &mut out).map_err(|e| unpack_err(format!("bad xz data: {e}")))?;
        (stem, out)
    } else if let Some(stem) = rel.strip_suffix(".zst") {
        let mut out = Vec::with_capacity(raw.len() * 3);
        ruzstd::StreamingDecoder::new(&raw[..])
            .map_err(|e| unpack_err(format!("bad zstd data: {e}")))?
            .read_to_end(&mut out)
            .map_err(|e| unpack_err(format!("bad zstd data: {e}")))?;
        (stem, out)
    } else if rel.ends_with(".ko") {
        (rel, raw)
    } else {
        return Err(unpack_err("only .ko, .ko.xz and .ko.zst modules are supported".into()));
    };
    if !data.starts_with(b"\x7fELF") {
        return Err(unpack_err("its contents are not an ELF object".into()));
    }
    Ok((format!("lib/modules/{}/{rel}", kernel.release), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module tree in a temp dir: `modules.dep` as given, every listed file present.
    fn fake_tree(dep: &str, builtin: &str) -> (tempfile::TempDir, Kernel) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), dep).unwrap();
        std::fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        for path in dep.split(|c: char| c == ':' || c.is_whitespace()).filter(|p| p.contains(".ko")) {
            let f = dir.path().join(path);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, b"\x7fELF").unwrap();
        }
        let kernel = Kernel { path: "/k".into(), release: "6.1-test".into(), modules_dir: dir.path().to_path_buf() };
        (dir, kernel)
    }

    fn rel(kernel: &Kernel, files: &[PathBuf]) -> Vec<String> {
        files.iter().map(|p| p.strip_prefix(&kernel.modules_dir).unwrap().display().to_string()).collect()
    }

    const DEP: &str = "\
kernel/v/virtio_ring.ko:
kernel/v/virtio.ko: kernel/v/virtio_ring.ko
kernel/b/virtio-blk.ko: kernel/v/virtio.ko kernel/v/virtio_ring.ko
kernel/n/virtio_net.ko: kernel/n/net_failover.ko kernel/n/failover.ko kernel/v/virtio.ko kernel/v/virtio_ring.ko
kernel/n/net_failover.ko: kernel/n/failover.ko
kernel/n/failover.ko:
";

    #[test]
    fn dependencies_load_first_and_each_file_once() {
        let (_dir, k) = fake_tree(DEP, "kernel/fs/ext4/ext4.ko\n");
        let got = resolve_modules(&k, &["virtio_blk", "virtio_net", "virtio"]).unwrap();
        assert_eq!(
            rel(&k, &got),
            [
                "kernel/v/virtio_ring.ko",
                "kernel/v/virtio.ko",
                "kernel/b/virtio-blk.ko",
                "kernel/n/failover.ko",
                "kernel/n/net_failover.ko",
                "kernel/n/virtio_net.ko"
            ]
        );
    }

    #[test]
    fn builtins_are_skipped_and_dashes_equal_underscores() {
        let (_dir, k) = fake_tree(DEP, "kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c-generic.ko\n");
        assert!(resolve_modules(&k, &["ext4", "crc32c_generic"]).unwrap().is_empty());
        let dashed = resolve_modules(&k, &["virtio-blk"]).unwrap();
        assert_eq!(rel(&k, &dashed), ["kernel/v/virtio_ring.ko", "kernel/v/virtio.ko", "kernel/b/virtio-blk.ko"]);
        assert_eq!(resolve_modules(&k, &["virtio_blk"]).unwrap(), dashed);
    }

    #[test]
    fn unknown_modules_missing_files_and_cycles_are_errors() {
        let (dir, k) = fake_tree(DEP, "");
        let err = resolve_modules(&k, &["virtio_blk", "nosuch_mod"]).unwrap_err().to_string();
        assert!(err.contains("nosuch_mod") && err.contains("6.1-test"), "{err}");

        std::fs::remove_file(dir.path().join("kernel/v/virtio.ko")).unwrap();
        let err = resolve_modules(&k, &["virtio_blk"]).unwrap_err().to_string();
        assert!(err.contains("kernel/v/virtio.ko") && err.contains("does not exist"), "{err}");

        let (_dir, k) = fake_tree("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n", "");
        let err = resolve_modules(&k, &["a"]).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");

        let none = Kernel { path: "/k".into(), release: "9.9".into(), modules_dir: dir.path().join("absent") };
        let err = crate::report(&resolve_modules(&none, &["virtio_blk"]).unwrap_err());
        assert!(err.contains("modules.dep") && err.contains("linux-image-9.9"), "{err}");
    }

    #[test]
    fn the_installed_kernel_resolves_the_agent_modules_in_load_order() {
        let k = crate::find_kernel(None).expect("a kernel is installed (apt-get install linux-image-cloud-amd64)");
        let files = resolve_modules(&k, AGENT_MODULES).unwrap();
        let names: Vec<String> = files.iter().map(|p| module_name(&p.to_string_lossy())).collect();
        let at = |m: &str| names.iter().position(|n| n == m).unwrap_or_else(|| panic!("{m} in {names:?}"));
        for m in ["virtio_mmio", "virtio_blk", "virtio_console", "virtio_net"] {
            assert!(at("virtio_ring") < at("virtio") && at("virtio") < at(m), "order: {names:?}");
        }
        assert!(at("failover") < at("net_failover") && at("net_failover") < at("virtio_net"), "order: {names:?}");
        assert_eq!(names.len(), 8, "exactly the eight modules: {names:?}");
    }

    #[test]
    fn later_groups_leave_out_what_boot_loads_and_groups_the_kernel_lacks() {
        let (_dir, k) = fake_tree(DEP, "kernel/fs/fuse/fuse.ko\n");
        let later: &[(&str, &[&str])] = &[("net", &["virtio_net"]), ("none", &["nosuch"]), ("fuse", &["fuse"])];
        let m = resolve_groups(&k, &["virtio_blk"], later).unwrap();
        assert_eq!(rel(&k, &m.boot), ["kernel/v/virtio_ring.ko", "kernel/v/virtio.ko", "kernel/b/virtio-blk.ko"]);
        let groups: Vec<(&str, Vec<String>)> = m.later.iter().map(|(g, f)| (g.as_str(), rel(&k, f))).collect();
        assert_eq!(
            groups,
            [
                (
                    "net",
                    vec![
                        "kernel/n/failover.ko".to_string(),
                        "kernel/n/net_failover.ko".into(),
                        "kernel/n/virtio_net.ko".into()
                    ]
                ),
                ("fuse", vec![]),
            ],
            "a built-in group is empty, a missing one absent"
        );
        assert_eq!(m.len(), 6);
        assert!(resolve_groups(&k, &["nosuch"], &[]).is_err(), "boot modules are not optional");
    }

    #[test]
    fn the_installed_kernel_has_the_volume_and_fuse_groups() {
        let k = crate::find_kernel(None).expect("a kernel is installed (apt-get install linux-image-cloud-amd64)");
        let m = resolve_agent_modules(&k).unwrap();
        let group = |g: &str| -> Vec<String> {
            let (_, files) = m.later.iter().find(|(n, _)| n == g).unwrap_or_else(|| panic!("group {g}"));
            files.iter().map(|p| module_name(&p.to_string_lossy())).collect()
        };
        let volumes = group("volumes");
        assert!(volumes.ends_with(&["virtio_scsi".to_string(), "sd_mod".to_string()]), "{volumes:?}");
        assert!(volumes.contains(&"scsi_mod".to_string()) && !volumes.contains(&"virtio".to_string()), "{volumes:?}");
        assert!(group("fuse").iter().all(|n| n == "fuse"));
    }

    // Made by the real tools with the kernel's own module compression settings:
    // `printf '\177ELF zstd module\n' | zstd` and
    // `printf '\177ELF xz module\n' | xz --check=crc32 --lzma2=dict=1MiB`.
    const ZST: &[u8] = &[
        0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0x89, 0x00, 0x00, 0x7f, 0x45, 0x4c, 0x46, 0x20, 0x7a, 0x73, 0x74, 0x64,
        0x20, 0x6d, 0x6f, 0x64, 0x75, 0x6c, 0x65, 0x0a, 0xbf, 0x92, 0x82, 0x35,
    ];
    const XZ: &[u8] = &[
        0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x01, 0x69, 0x22, 0xde, 0x36, 0x02, 0x00, 0x21, 0x01, 0x10, 0x00,
        0x00, 0x00, 0xa8, 0x70, 0x8e, 0x86, 0x01, 0x00, 0x0e, 0x7f, 0x45, 0x4c, 0x46, 0x20, 0x78, 0x7a, 0x20, 0x6d,
        0x6f, 0x64, 0x75, 0x6c, 0x65, 0x0a, 0x00, 0x00, 0x9d, 0x8d, 0x8f, 0xdd, 0x00, 0x01, 0x23, 0x0f, 0xdb, 0xdf,
        0x90, 0x0e, 0x90, 0x42, 0x99, 0x0d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 0x59, 0x5a,
    ];

    #[test]
    fn compressed_modules_are_unpacked_to_plain_ko_files() {
        let (dir, k) = fake_tree("kernel/x.ko.xz:\nkernel/z.ko.zst:\nkernel/g.ko.gz:\nkernel/t.ko:\n", "");
        let unpack = |f: &str| unpacked_module(&k, &dir.path().join(f));
        std::fs::write(dir.path().join("kernel/x.ko.xz"), XZ).unwrap();
        std::fs::write(dir.path().join("kernel/z.ko.zst"), ZST).unwrap();
        let (name, data) = unpack("kernel/x.ko.xz").unwrap();
        assert_eq!((name.as_str(), &data[..]), ("lib/modules/6.1-test/kernel/x.ko", &b"\x7fELF xz module\n"[..]));
        let (name, data) = unpack("kernel/z.ko.zst").unwrap();
        assert_eq!((name.as_str(), &data[..]), ("lib/modules/6.1-test/kernel/z.ko", &b"\x7fELF zstd module\n"[..]));
        let (name, _) = unpack("kernel/t.ko").unwrap();
        assert_eq!(name, "lib/modules/6.1-test/kernel/t.ko");

        std::fs::write(dir.path().join("kernel/z.ko.zst"), b"garbage").unwrap();
        assert!(unpack("kernel/z.ko.zst").unwrap_err().to_string().contains("bad zstd data"));
        std::fs::write(dir.path().join("kernel/x.ko.xz"), &XZ[..40]).unwrap();
        assert!(unpack("kernel/x.ko.xz").unwrap_err().to_string().contains("bad xz data"));
        std::fs::write(dir.path().join("kernel/t.ko"), b"text").unwrap();
        assert!(unpack("kernel/t.ko").unwrap_err().to_string().contains("not an ELF"));
        let err = crate::report(&unpack("kernel/g.ko.gz").unwrap_err());
        assert!(err.contains(".ko.xz and .ko.zst"), "{err}");
        let err = unpacked_module(&k, Path::new("/etc/passwd")).unwrap_err().to_string();
        assert!(err.contains("not a module file under"), "{err}");
    }
}
