//! The initramfs: the agent as `/init` plus exactly the kernel modules it loads.
//!
//! Layout (see docs/agent-protocol.md):
//! ```text
//! /init                                    the agent (0755)
//! /dev/console                             char 5:1, so the kernel can open it before devtmpfs
//! /dev /proc /sys /tmp /newroot /moat      mount points and moat's own files
//! /lib/modules/<release>/kernel/….ko       the modules, uncompressed
//! /moat/modules                            paths of the boot modules, one per line, in load order
//! /moat/modules.later                      `group: path path …` per line: modules loaded on first
//!                                          use, each group in load order
//! ```
//! The archive is plain newc without compression: the kernel takes it as is and unpacking it is
//! faster than decompressing under TCG.

use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use cpio::newc::{trailer, Builder};
use sha2::{Digest, Sha256};

use crate::kernel::Kernel;
use crate::modules::{unpacked_module, AgentModules};
use crate::ImageError;

/// Part of the cache key: bump it whenever the layout above changes, so archives are rebuilt.
const FORMAT_VERSION: &str = "moat-initramfs-3";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Build the initramfs for `kernel` with `agent` as `/init` and `modules` (from
/// [`resolve_agent_modules`](crate::resolve_agent_modules)), or return the cached one.
///
/// The archive is cached in `cache_dir` as `initramfs-<sha256>.cpio`, keyed by the agent, the
/// kernel release, the modules' contents and both module lists. It is written to a temporary
/// file and renamed into place, so a crash never leaves a half-written archive under the cached
/// name.
pub fn build_initramfs(
    cache_dir: &Path,
    kernel: &Kernel,
    agent: &Path,
    modules: &AgentModules,
) -> Result<PathBuf, ImageError> {
    let agent_bytes = std::fs::read(agent).map_err(ImageError::io(format!("reading the agent {}", agent.display())))?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::with_capacity(modules.len());
    let mut archive_name = |module: &PathBuf| -> Result<String, ImageError> {
        let (name, data) = unpacked_module(kernel, module)?;
        if !files.iter().any(|(n, _)| *n == name) {
            files.push((name.clone(), data));
        }
        Ok(format!("/{name}"))
    };
    let mut boot_list = String::new();
    for module in &modules.boot {
        boot_list.push_str(&archive_name(module)?);
        boot_list.push('\n');
    }
    let mut later_list = String::new();
    for (group, group_files) in &modules.later {
        later_list.push_str(group);
        later_list.push(':');
        for module in group_files {
            later_list.push(' ');
            later_list.push_str(&archive_name(module)?);
        }
        later_list.push('\n');
    }
    let lists = ModuleLists { boot: boot_list, later: later_list };
    let key = cache_key(&kernel.release, &agent_bytes, &files, &lists);
    let path = cache_dir.join(format!("initramfs-{key}.cpio"));
    if path.is_file() {
        tracing::debug!(path = %path.display(), "initramfs cache hit");
        return Ok(path);
    }
    std::fs::create_dir_all(cache_dir).map_err(ImageError::io(format!("creating {}", cache_dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".initramfs-")
        .suffix(".tmp")
        .tempfile_in(cache_dir)
        .map_err(ImageError::io(format!("creating a temporary file in {}", cache_dir.display())))?;
    let write_err = ImageError::io(format!("writing {}", tmp.path().display()));
    let out = write_archive(BufWriter::new(tmp.as_file()), &agent_bytes, &files, &lists)
        .and_then(|mut w| w.flush())
        .and_then(|()| tmp.as_file().sync_all());
    out.map_err(write_err)?;
    tmp.persist(&path).map_err(|e| ImageError::Io {
        what: format!("renaming the initramfs to {}", path.display()),
        source: e.error,
    })?;
    tracing::info!(path = %path.display(), modules = files.len(), "built initramfs");
    Ok(path)
}

/// The texts of `/moat/modules` and `/moat/modules.later`.
struct ModuleLists {
    boot: String,
    later: String,
}

/// Length-prefixed fields, so no two different inputs hash alike.
fn cache_key(release: &str, agent: &[u8], files: &[(String, Vec<u8>)], lists: &ModuleLists) -> String {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(FORMAT_VERSION.as_bytes());
    field(release.as_bytes());
    field(agent);
    for (name, data) in files {
        field(name.as_bytes());
        field(data);
    }
    field(lists.boot.as_bytes());
    field(lists.later.as_bytes());
    hex::encode(h.finalize())
}

fn write_archive<W: Write>(
    out: W,
    agent: &[u8],
    modules: &[(String, Vec<u8>)],
    lists: &ModuleLists,
) -> std::io::Result<W> {
    let mut archive = Archive { out, ino: 0 };
    for dir in ["dev", "proc", "sys", "newroot", "moat"] {
        archive.entry(dir, S_IFDIR | 0o755, None, &[])?;
    }
    archive.entry("tmp", S_IFDIR | 0o1777, None, &[])?;
    archive.entry("dev/console", S_IFCHR | 0o600, Some((5, 1)), &[])?;
    archive.entry("init", S_IFREG | 0o755, None, agent)?;
    // Every parent directory of a module once, parents before children (BTreeSet order does that).
    let dirs: BTreeSet<&str> =
        modules.iter().flat_map(|(name, _)| name.match_indices('/').map(move |(i, _)| &name[..i])).collect();
    for dir in dirs {
        archive.entry(dir, S_IFDIR | 0o755, None, &[])?;
    }
    for (name, data) in modules {
        archive.entry(name, S_IFREG | 0o644, None, data)?;
    }
    archive.entry("moat/modules", S_IFREG | 0o644, None, lists.boot.as_bytes())?;
    archive.entry("moat/modules.later", S_IFREG | 0o644, None, lists.later.as_bytes())?;
    trailer(archive.out)
}

/// Entries owned by root with mtime 0, so the same inputs give the same bytes.
struct Archive<W> {
    out: W,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn entry(&mut self, name: &str, mode: u32, rdev: Option<(u32, u32)>, data: &[u8]) -> std::io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{name} is larger than newc's 4 GiB limit"))
        })?;
        self.ino += 1;
        let (major, minor) = rdev.unwrap_or((0, 0));
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let mut w = Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(major)
            .rdev_minor(minor)
            .write(&mut self.out, size);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Entry {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// An independent newc reader: header fields are 8 hex digits after the 6-byte magic; name and
    /// data are each padded to 4 bytes.
    fn parse(archive: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut at = 0usize;
        loop {
            let h = &archive[at..at + 110];
            assert_eq!(&h[..6], b"070701", "newc magic at offset {at}");
            let field =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap(), 16).unwrap();
            let (mode, size, rdev, namesize) = (field(1), field(6) as usize, (field(9), field(10)), field(11) as usize);
            let name = std::str::from_utf8(&archive[at + 110..at + 110 + namesize - 1]).unwrap().to_string();
            assert_eq!(archive[at + 110 + namesize - 1], 0, "name is NUL-terminated");
            let data_at = (at + 110 + namesize + 3) & !3;
            let data = archive[data_at..data_at + size].to_vec();
            at = (data_at + size + 3) & !3;
            if name == "TRAILER!!!" {
                assert_eq!(at, archive.len(), "nothing after the trailer");
                return out;
            }
            out.push(Entry { name, mode, rdev, data });
        }
    }

    /// Two boot modules and two later groups, one sharing a file with the other, one empty.
    fn fixture() -> (tempfile::TempDir, Kernel, PathBuf, AgentModules) {
        let dir = tempfile::tempdir().unwrap();
        let mods = dir.path().join("lib/modules/6.1-test");
        for d in ["virtio", "block", "scsi"] {
            std::fs::create_dir_all(mods.join("kernel/drivers").join(d)).unwrap();
        }
        std::fs::write(mods.join("kernel/drivers/virtio/virtio.ko"), b"\x7fELF-virtio").unwrap();
        std::fs::write(mods.join("kernel/drivers/block/virtio_blk.ko"), b"\x7fELF-blk!").unwrap();
        std::fs::write(mods.join("kernel/drivers/scsi/scsi_mod.ko"), b"\x7fELF-scsi").unwrap();
        std::fs::write(mods.join("kernel/drivers/scsi/sd_mod.ko"), b"\x7fELF-sd").unwrap();
        let agent = dir.path().join("moat-agent");
        std::fs::write(&agent, b"\x7fELF-agent").unwrap();
        let kernel = Kernel { path: "/k".into(), release: "6.1-test".into(), modules_dir: mods.clone() };
        let (scsi, sd) = (mods.join("kernel/drivers/scsi/scsi_mod.ko"), mods.join("kernel/drivers/scsi/sd_mod.ko"));
        let modules = AgentModules {
            boot: vec![mods.join("kernel/drivers/virtio/virtio.ko"), mods.join("kernel/drivers/block/virtio_blk.ko")],
            later: vec![
                ("volumes".into(), vec![scsi.clone(), sd]),
                ("tape".into(), vec![scsi]),
                ("fuse".into(), vec![]),
            ],
        };
        (dir, kernel, agent, modules)
    }

    #[test]
    fn the_archive_holds_init_console_modules_and_their_load_order() {
        let (dir, kernel, agent, modules) = fixture();
        let path = build_initramfs(&dir.path().join("cache"), &kernel, &agent, &modules).unwrap();
        let entries = parse(&std::fs::read(&path).unwrap());
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("{n} in the archive"));

        assert_eq!((get("init").mode, &get("init").data[..]), (0o100755, &b"\x7fELF-agent"[..]));
        assert_eq!((get("dev/console").mode, get("dev/console").rdev), (0o020600, (5, 1)));
        for d in ["dev", "proc", "sys", "tmp", "newroot", "moat"] {
            assert_eq!(get(d).mode & 0o170000, 0o040000, "{d} is a directory");
        }
        assert_eq!(get("tmp").mode, 0o041777);
        assert_eq!(get("lib/modules/6.1-test/kernel/drivers/block/virtio_blk.ko").data, b"\x7fELF-blk!");
        assert_eq!(get("lib/modules/6.1-test/kernel/drivers/scsi/sd_mod.ko").data, b"\x7fELF-sd");
        assert_eq!(
            String::from_utf8(get("moat/modules").data.clone()).unwrap(),
            "/lib/modules/6.1-test/kernel/drivers/virtio/virtio.ko\n/lib/modules/6.1-test/kernel/drivers/block/virtio_blk.ko\n"
        );
        assert_eq!(
            String::from_utf8(get("moat/modules.later").data.clone()).unwrap(),
            "volumes: /lib/modules/6.1-test/kernel/drivers/scsi/scsi_mod.ko /lib/modules/6.1-test/kernel/drivers/scsi/sd_mod.ko\n\
             tape: /lib/modules/6.1-test/kernel/drivers/scsi/scsi_mod.ko\n\
             fuse:\n"
        );
        // Every entry's parent directory comes before it, so the kernel can create it.
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                let p = entries.iter().position(|d| d.name == parent).unwrap_or_else(|| panic!("parent of {}", e.name));
                assert!(p < i, "{parent} before {}", e.name);
            }
        }
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "no duplicate entries, even of a module in two groups: {names:?}");
    }

    #[test]
    fn the_same_inputs_hit_the_cache_and_changed_inputs_do_not() {
        let (dir, kernel, agent, modules) = fixture();
        let cache = dir.path().join("cache");
        let first = build_initramfs(&cache, &kernel, &agent, &modules).unwrap();
        // Mark the cached file: a rebuild would replace it.
        std::fs::write(&first, b"cached").unwrap();
        assert_eq!(build_initramfs(&cache, &kernel, &agent, &modules).unwrap(), first);
        assert_eq!(std::fs::read(&first).unwrap(), b"cached", "the cached archive was not rebuilt");

        let mut reordered = modules.clone();
        reordered.boot.reverse();
        assert_ne!(build_initramfs(&cache, &kernel, &agent, &reordered).unwrap(), first, "the load order counts");
        let mut regrouped = modules.clone();
        regrouped.later[2].0 = "fuse3".into();
        assert_ne!(build_initramfs(&cache, &kernel, &agent, &regrouped).unwrap(), first, "the groups count");
        let mut moved = modules.clone();
        let sd = moved.later[0].1.pop().unwrap();
        moved.boot.push(sd);
        assert_ne!(build_initramfs(&cache, &kernel, &agent, &moved).unwrap(), first, "boot or later counts");
        std::fs::write(&modules.boot[0], b"\x7fELF-virtio-v2").unwrap();
        assert_ne!(
            build_initramfs(&cache, &kernel, &agent, &modules).unwrap(),
            first,
            "module contents are part of the key"
        );
        std::fs::write(&agent, b"\x7fELF-agent-2").unwrap();
        let rebuilt = build_initramfs(&cache, &kernel, &agent, &modules).unwrap();
        assert_eq!(
            parse(&std::fs::read(&rebuilt).unwrap()).iter().find(|e| e.name == "init").unwrap().data,
            b"\x7fELF-agent-2"
        );

        let leftovers: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".cpio"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files left: {leftovers:?}");
    }

    #[test]
    fn the_real_agent_modules_pack_uncompressed_into_the_archive() {
        let kernel = crate::find_kernel(None).expect("a kernel is installed");
        let modules = crate::resolve_agent_modules(&kernel).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = build_initramfs(dir.path(), &kernel, Path::new("/bin/busybox"), &modules).unwrap();
        let entries = parse(&std::fs::read(&path).unwrap());
        let text = |n: &str| String::from_utf8(entries.iter().find(|e| e.name == n).unwrap().data.clone()).unwrap();
        let (boot, later) = (text("moat/modules"), text("moat/modules.later"));
        assert_eq!(boot.lines().count(), modules.boot.len());
        assert!(later.lines().any(|l| l.starts_with("volumes: ")), "{later}");
        let later_files = later.lines().flat_map(|l| l.split_whitespace().skip(1));
        for line in boot.lines().chain(later_files) {
            let e = entries
                .iter()
                .find(|e| format!("/{}", e.name) == line)
                .unwrap_or_else(|| panic!("{line} is in the archive"));
            assert!(e.data.starts_with(b"\x7fELF"), "{line} is an uncompressed module");
        }
    }
}
