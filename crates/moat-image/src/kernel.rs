//! The guest kernel and its modules.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::ImageError;

/// A kernel image with the module tree that belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub path: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub modules_dir: PathBuf,
}

/// Modules the agent needs to reach its port and the root disk on microvm.
pub const AGENT_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_console"];

/// `explicit` (config or MOAT_KERNEL), else the newest `/boot/vmlinuz-*-cloud-amd64`, else the
/// newest `/boot/vmlinuz-*`.
pub fn find_kernel(explicit: Option<&Path>) -> Result<Kernel, ImageError> {
    find_kernel_in(explicit, Path::new("/boot"), Path::new("/lib/modules"))
}

pub(crate) fn find_kernel_in(explicit: Option<&Path>, boot: &Path, modules_root: &Path) -> Result<Kernel, ImageError> {
    let path = match explicit {
        Some(p) => {
            if !p.is_file() {
                return Err(ImageError::KernelMissing(format!("{} does not exist", p.display())));
            }
            p.to_path_buf()
        }
        None => {
            let names: Vec<String> = std::fs::read_dir(boot)
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let newest = |filter: &dyn Fn(&str) -> bool| {
                names.iter().filter(|n| n.starts_with("vmlinuz-") && filter(n)).max_by(|a, b| version_cmp(a, b)).cloned()
            };
            let name = newest(&|n: &str| n.ends_with("-cloud-amd64")).or_else(|| newest(&|_: &str| true)).ok_or_else(|| {
                ImageError::KernelMissing(format!("no vmlinuz-*-cloud-amd64 or vmlinuz-* under {}", boot.display()))
            })?;
            boot.join(name)
        }
    };
    if let Err(e) = std::fs::File::open(&path) {
        return Err(ImageError::KernelMissing(format!("{} is not readable: {e}", path.display())));
    }
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let release = file.strip_prefix("vmlinuz-").unwrap_or(&file).to_string();
    Ok(Kernel { modules_dir: modules_root.join(&release), path, release })
}

/// Compare strings so that runs of digits compare as numbers: `6.1.0-10` > `6.1.0-9`.
fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let i = d.iter().take_while(|&&c| c == b'0').count();
    &d[i.min(d.len().saturating_sub(1))..]
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolve module names through `modules.dep` into files in load order (dependencies first, no
/// duplicates). Built-in modules (`modules.builtin`) need no file and are skipped.
pub fn resolve_modules(kernel: &Kernel, names: &[&str]) -> Result<Vec<PathBuf>, ImageError> {
    let dep_file = kernel.modules_dir.join("modules.dep");
    let deps_text = std::fs::read_to_string(&dep_file).map_err(|e| ImageError::ModulesMissing {
        release: kernel.release.clone(),
        reason: format!("cannot read {}: {e}", dep_file.display()),
    })?;
    let builtin: HashSet<String> = std::fs::read_to_string(kernel.modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    // name → (relative path, dependency paths)
    let mut table: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in deps_text.lines() {
        let Some((module, deps)) = line.split_once(':') else { continue };
        let deps = deps.split_whitespace().map(str::to_string).collect();
        table.insert(module_name(module), (module.trim().to_string(), deps));
    }
    let mut order: Vec<String> = Vec::new();
    for name in names {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let (path, deps) = table.get(&name).ok_or_else(|| ImageError::ModulesMissing {
            release: kernel.release.clone(),
            reason: format!("module {name} is neither in modules.dep nor built in"),
        })?;
        // modules.dep lists the full transitive closure, deepest dependency last.
        for p in deps.iter().rev().chain(std::iter::once(path)) {
            if !order.contains(p) {
                order.push(p.clone());
            }
        }
    }
    Ok(order.into_iter().map(|p| kernel.modules_dir.join(p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_cmp("vmlinuz-6.1.0-10-cloud-amd64", "vmlinuz-6.1.0-9-cloud-amd64"), Ordering::Greater);
        assert_eq!(version_cmp("vmlinuz-6.10.0", "vmlinuz-6.9.9"), Ordering::Greater);
        assert_eq!(version_cmp("a-01", "a-1"), Ordering::Equal);
    }

    #[test]
    fn newest_cloud_kernel_is_chosen() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir(&boot).unwrap();
        for n in ["vmlinuz-6.1.0-9-cloud-amd64", "vmlinuz-6.1.0-10-cloud-amd64", "vmlinuz-6.5.0-1-amd64"] {
            std::fs::write(boot.join(n), b"k").unwrap();
        }
        let k = find_kernel_in(None, &boot, Path::new("/mods")).unwrap();
        assert_eq!(k.release, "6.1.0-10-cloud-amd64");
        assert_eq!(k.modules_dir, Path::new("/mods/6.1.0-10-cloud-amd64"));
        let err = find_kernel_in(Some(Path::new("/nope/vmlinuz")), &boot, Path::new("/mods")).unwrap_err();
        assert!(err.to_string().contains("/nope/vmlinuz"));
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(find_kernel_in(None, &empty, Path::new("/m")).unwrap_err().to_string().contains("apt-get install"));
    }

    #[test]
    fn modules_resolve_dependencies_first_and_skip_builtins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/a/virtio_ring.ko:\nkernel/a/virtio.ko: kernel/a/virtio_ring.ko\n\
             kernel/b/virtio-blk.ko: kernel/a/virtio.ko kernel/a/virtio_ring.ko\n\
             kernel/c/net.ko: kernel/c/failover.ko kernel/a/virtio.ko kernel/a/virtio_ring.ko\nkernel/c/failover.ko:\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let k = Kernel { path: "/k".into(), release: "r".into(), modules_dir: dir.path().to_path_buf() };
        let got = resolve_modules(&k, &["virtio_blk", "ext4", "net"]).unwrap();
        let rel: Vec<String> = got.iter().map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string()).collect();
        assert_eq!(rel, ["kernel/a/virtio_ring.ko", "kernel/a/virtio.ko", "kernel/b/virtio-blk.ko", "kernel/c/failover.ko", "kernel/c/net.ko"]);
        let err = resolve_modules(&k, &["nosuch"]).unwrap_err();
        assert!(err.to_string().contains("nosuch"));
    }

    #[test]
    fn the_installed_kernel_has_the_agent_modules() {
        let k = find_kernel(None).expect("a kernel is installed (apt-get install linux-image-cloud-amd64)");
        let mods = resolve_modules(&k, AGENT_MODULES).unwrap();
        let names: Vec<String> = mods.iter().map(|p| module_name(&p.to_string_lossy())).collect();
        for m in ["virtio_mmio", "virtio_blk", "virtio_console"] {
            let i = names.iter().position(|n| n == m).unwrap_or_else(|| panic!("{m} in {names:?}"));
            if let Some(v) = names.iter().position(|n| n == "virtio") {
                assert!(v < i, "virtio loads before {m}");
            }
        }
    }
}
