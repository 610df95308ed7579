//! Loading kernel modules with `finit_module`, passing the `MODULE.param=value` options of the
//! kernel command line the way modprobe would (the kernel only applies them to built-in code).

use std::os::fd::AsRawFd;
use std::path::Path;

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
    let name = module_name(path);
    let file = std::fs::File::open(path).map_err(|source| ModuleError::Open { path: path.into(), reason: source })?;
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
    fn unreadable_modules_are_reported_by_path() {
        let errs = load_all("# comment\n\n/no/such/module.ko\n", &Cmdline::parse(""));
        assert_eq!(errs.len(), 1);
        assert!(errs[0].to_string().contains("/no/such/module.ko"), "{}", errs[0]);
    }
}
