//! Mounting a FUSE file system the way libfuse would as root, without libfuse: open
//! `/dev/fuse`, mount(2) it by descriptor, and set the mount read-only or writable.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use moat_proto::hostfs::MAX_IO;
use rustix::fs::{FileType, Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// The FUSE device (misc character device 10:229).
pub(crate) const DEVICE: &str = "/dev/fuse";

/// Why a host mount could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MountError {
    #[error("the sandbox's kernel has no FUSE support ({DEVICE}: {0})")]
    NoFuse(std::io::Error),
    #[error("the sandbox's kernel has no FUSE support: {0}")]
    NoModule(crate::modules::ModuleError),
    #[error("cannot create the mount point: {0}")]
    MountPoint(std::io::Error),
    #[error("mounting the FUSE file system failed: {0}")]
    Mount(std::io::Error),
    #[error("making the mount {mode} failed: {reason}")]
    Remount { mode: &'static str, reason: std::io::Error },
    #[error("the FUSE handshake with the kernel failed: {0}")]
    Session(std::io::Error),
    #[error("starting the FUSE session thread failed: {0}")]
    Thread(std::io::Error),
}

/// Open the FUSE device, loading the module or making the node when it is not there yet.
pub(crate) fn open_device() -> Result<OwnedFd, MountError> {
    let mut module = Ok(());
    if !Path::new(DEVICE).exists() {
        // The first host mount of this boot, with FUSE a module the initramfs carries.
        module = crate::modules::load_group(crate::modules::group::FUSE);
    }
    if !Path::new(DEVICE).exists() {
        // FUSE built in, but a /dev without the node (not devtmpfs): make it.
        let dev = rustix::fs::makedev(10, 229);
        let _ =
            rustix::fs::mknodat(rustix::fs::CWD, DEVICE, FileType::CharacterDevice, Mode::from_raw_mode(0o666), dev);
    }
    rustix::fs::open(DEVICE, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(|e| match module {
        Err(m) => MountError::NoModule(m),
        Ok(()) => MountError::NoFuse(e.into()),
    })
}

/// Mount the FUSE connection `fd` at `path` (made first, with its parents).
pub(crate) fn mount(path: &str, fd: BorrowedFd<'_>, readonly: bool) -> Result<(), MountError> {
    std::fs::create_dir_all(path).map_err(MountError::MountPoint)?;
    // As root, what fusermount would pass: the kernel checks modes (default_permissions) and
    // every guest user may use the mount (allow_other); max_read keeps a read within one call.
    let options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={MAX_IO}",
        fd.as_raw_fd()
    );
    rustix::mount::mount("moat-host", path, "fuse", MountFlags::NOSUID | MountFlags::NODEV, options.as_str())
        .map_err(|e| MountError::Mount(e.into()))?;
    if readonly {
        if let Err(e) = set_readonly(path, true) {
            unmount(path);
            return Err(e);
        }
    }
    Ok(())
}

/// Make the mount at `path` read-only or writable. Read-only is a property of this mount
/// point, not of the file system, so the next channel may change it either way.
pub(crate) fn set_readonly(path: &str, readonly: bool) -> Result<(), MountError> {
    let mut flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
    if readonly {
        flags |= MountFlags::RDONLY;
    }
    rustix::mount::mount_remount(path, flags, "")
        .map_err(|e| MountError::Remount { mode: if readonly { "read-only" } else { "writable" }, reason: e.into() })
}

/// Detach a mount that could not be set up completely.
pub(crate) fn unmount(path: &str) {
    let _ = rustix::mount::unmount(path, UnmountFlags::DETACH);
}
