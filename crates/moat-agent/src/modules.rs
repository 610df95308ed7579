//! Loading kernel modules with `finit_module`, passing the `MODULE.param=value` options of the
//! kernel command line the way modprobe would (the kernel only applies them to built-in code).
//!
//! Boot loads what every guest needs ([`load_all`]). Modules only some sandboxes need (volumes,
//! host directory mounts) come in groups loaded on first use ([`load_group`]): boot only opens
//! their files ([`keep_later`]), while the initramfs is still `/`, and keeps them open, so they
//! stay reachable (even if the initramfs were emptied) at no cost in memory.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use crate::cmdline::Cmdline;

/// `finit_module` flag: the file is compressed and the kernel should decompress it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Why a module did not load.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot open kernel module {path}: {reason}")]
    Open { path: String, reason: std::io::Error },
    #[error("the kernel refused module {name} ({path}) with parameters {params:?}: {reason}")]
    Load { name: String, path: String, params: String, reason: std::io::Error },
    #[error("the kernel modules for {group} are not available: {reason}")]
    Unavailable { group: String, reason: String },
}

/// The module groups the host packs into `/moat/modules.later` (moat-image's `LATER_MODULES`).
pub mod group {
    /// virtio-scsi and SCSI disks, for volumes.
    pub const VOLUMES: &str = "volumes";
    /// FUSE, for host directory mounts.
    pub const FUSE: &str = "fuse";
}

/// The name the kernel knows a module file by: the file name without `.ko[.xz|.zst|.gz]`, with
/// dashes as underscores.
pub fn module_name(path: &str) -> String {
    let file = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn is_compressed(path: &str) -> bool {
    [".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|s| path.ends_with(s))
}

/// Load one module; a module that is already loaded (or built in) is fine.
pub fn load(path: &str, cmdline: &Cmdline) -> Result<(), ModuleError> {
    let file = File::open(path).map_err(|source| ModuleError::Open { path: path.into(), reason: source })?;
    load_open(path, &file, cmdline)
}

/// Load the module `file`, opened from `path` (which names it).
fn load_open(path: &str, file: &File, cmdline: &Cmdline) -> Result<(), ModuleError> {
    let name = module_name(path);
    let params = cmdline.module_params(&name);
    // Parameters come from the kernel command line, which cannot carry NUL bytes.
    let cparams = std::ffi::CString::new(params.clone()).unwrap_or_default();
    let flags = if is_compressed(path) { MODULE_INIT_COMPRESSED_FILE } else { 0 };
    // SAFETY: finit_module takes an open fd, a NUL-terminated string that outlives the call and
    // flags; it does not retain the pointer.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), cparams.as_ptr(), flags) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() != Some(libc::EEXIST) {
            return Err(ModuleError::Load { name, path: path.into(), params, reason: source });
        }
    }
    Ok(())
}

/// Load every module listed in `list` (one path per line, dependencies first). Failures are
/// collected rather than fatal: a missing optional driver should not stop the guest, and the
/// caller reports them if something it needs never appears.
pub fn load_all(list: &str, cmdline: &Cmdline) -> Vec<ModuleError> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|path| load(path, cmdline).err())
        .collect()
}

/// A group of modules loaded on first use.
enum Group {
    /// Its files, open, in load order.
    Ready(Vec<(String, File)>),
    Loaded,
    /// A file could not be opened at boot.
    Broken(String),
}

/// The groups boot kept, with the command line their parameters come from; `None` before boot
/// (and on a host, where the agent runs in tests).
static LATER: Mutex<Option<(Cmdline, HashMap<String, Group>)>> = Mutex::new(None);

/// `group: path path …` lines: each group's module paths in load order. Lines without a colon
/// and comments are skipped.
fn parse_later(list: &str) -> Vec<(&str, Vec<&str>)> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(group, paths)| (group.trim(), paths.split_whitespace().collect()))
        .filter(|(group, _)| !group.is_empty())
        .collect()
}

/// Open the module files of the groups in `list` (the text of `/moat/modules.later`) for
/// [`load_group`]. Call once at boot, before the root switch; returns the files that did not
/// open (their groups then report why when asked for).
pub fn keep_later(list: &str, cmdline: &Cmdline) -> Vec<ModuleError> {
    let mut errors = Vec::new();
    let mut groups = HashMap::new();
    for (name, paths) in parse_later(list) {
        let opened: Result<Vec<(String, File)>, ModuleError> = paths
            .into_iter()
            .map(|p| match File::open(p) {
                Ok(f) => Ok((p.to_string(), f)),
                Err(reason) => Err(ModuleError::Open { path: p.into(), reason }),
            })
            .collect();
        let group = match opened {
            Ok(files) => Group::Ready(files),
            Err(e) => {
                let group = Group::Broken(e.to_string());
                errors.push(e);
                group
            }
        };
        groups.insert(name.to_string(), group);
    }
    *LATER.lock().unwrap_or_else(|e| e.into_inner()) = Some((cmdline.clone(), groups));
    errors
}

/// Load the modules of `group` (see [`group`]) unless that happened already. Blocking (the
/// kernel links each module); safe to call from several threads, which then load it once. A
/// failure leaves the group to be tried again.
pub fn load_group(group: &str) -> Result<(), ModuleError> {
    let mut later = LATER.lock().unwrap_or_else(|e| e.into_inner());
    let unavailable = |reason: &str| ModuleError::Unavailable { group: group.into(), reason: reason.into() };
    let Some((cmdline, groups)) = later.as_mut() else {
        return Err(unavailable("the agent did not boot from moat's initramfs"));
    };
    match groups.get(group) {
        None => Err(unavailable("the initramfs does not carry them (the guest kernel may lack them)")),
        Some(Group::Loaded) => Ok(()),
        Some(Group::Broken(reason)) => Err(unavailable(reason)),
        Some(Group::Ready(files)) => {
            for (path, file) in files {
                load_open(path, file, cmdline)?;
            }
            groups.insert(group.to_string(), Group::Loaded);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_follow_the_kernel_convention() {
        assert_eq!(module_name("/lib/modules/6.1/kernel/drivers/virtio/virtio_mmio.ko"), "virtio_mmio");
        assert_eq!(module_name("lib/modules/6.1/kernel/drivers/char/virtio-console.ko.xz"), "virtio_console");
        assert_eq!(module_name("crc32c_generic.ko.zst"), "crc32c_generic");
        assert!(is_compressed("a.ko.xz") && !is_compressed("a.ko"));
    }

    #[test]
    fn later_groups_are_parsed_in_order() {
        let list = "volumes: /m/scsi_common.ko /m/scsi_mod.ko /m/sd_mod.ko\n# x: /y.ko\nfuse:\n\njunk\n: /z.ko\n";
        assert_eq!(
            parse_later(list),
            [("volumes", vec!["/m/scsi_common.ko", "/m/scsi_mod.ko", "/m/sd_mod.ko"]), ("fuse", vec![])]
        );
    }

    /// One test for the process-wide state, so no other test races it.
    #[test]
    fn groups_load_once_and_say_why_they_cannot() {
        let e = load_group(group::VOLUMES).unwrap_err().to_string();
        assert!(e.contains("volumes") && e.contains("did not boot from moat's initramfs"), "{e}");
        let errors = keep_later("volumes: /no/such/sd_mod.ko\nfuse:\n", &Cmdline::parse(""));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("/no/such/sd_mod.ko"), "{}", errors[0]);
        let e = load_group(group::VOLUMES).unwrap_err().to_string();
        assert!(e.contains("/no/such/sd_mod.ko"), "{e}");
        // Built into the kernel (nothing to load): fine, and fine again.
        load_group(group::FUSE).unwrap();
        let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(|| load_group(group::FUSE))).collect();
        assert!(threads.into_iter().all(|t| t.join().is_ok_and(|r| r.is_ok())));
        let e = load_group("tape").unwrap_err().to_string();
        assert!(e.contains("tape") && e.contains("does not carry them"), "{e}");
    }

    #[test]
    fn unreadable_modules_are_reported_by_path() {
        let errs = load_all("# comment\n\n/no/such/module.ko\n", &Cmdline::parse(""));
        assert_eq!(errs.len(), 1);
        assert!(errs[0].to_string().contains("/no/such/module.ko"), "{}", errs[0]);
    }
}
