//! The host side of host directory mounts (`moat run -v ./src:/src`): carries out the file calls
//! ([`moat_proto::hostfs::Op`]) a guest makes into one host directory, and nothing beyond it.
//!
//! The guest is hostile. It names files by paths, and every path is checked (names only, going
//! down) and looked up beneath the directory with `openat2`, refusing symlinks, magic links and
//! mounts on the way (`beneath.rs`), so a directory swapped for a symlink mid-call fails instead of
//! escaping. Devices, fifos and sockets are never opened. A read-only mount is enforced here, and
//! a daemon running as root does each call with the directory owner's rights (`creds.rs`).

mod beneath;
mod creds;
mod ops;
mod path;

use std::borrow::Cow;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use moat_proto::hostfs::{Attr, Kind, Op, Reply, Timestamp};
use rustix::fs::{FileType, Mode, OFlags, Statx};
use rustix::io::Errno;

use beneath::ProcFds;
use creds::Credentials;

/// The guest's view of host users other than the directory's owner.
pub const NOBODY: u32 = 65534;

/// How a directory is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Refuse every call that would change the directory (`EROFS`).
    pub readonly: bool,
    /// The guest user the directory's owner is shown as.
    pub guest_uid: u32,
    /// The guest group the directory's group is shown as.
    pub guest_gid: u32,
}

/// Why a directory cannot be shared.
#[derive(Debug, thiserror::Error)]
pub enum HostfsError {
    #[error("cannot open the directory {} to share it", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot open /proc/self/fd, which sharing a directory safely needs")]
    Proc { source: std::io::Error },
    #[error("this kernel cannot look up files confined to a directory (openat2)")]
    Unsupported { source: std::io::Error },
}

impl moat_hint::Hint for HostfsError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        Some(match self {
            HostfsError::Open { .. } => {
                "check that the directory exists and that the daemon's user can reach it".into()
            }
            HostfsError::Proc { .. } => "mount procfs at /proc".into(),
            HostfsError::Unsupported { .. } => "sharing host directories needs Linux 5.6 or later".into(),
        })
    }
}

/// One shared directory: carries out the guest's calls into it. Holds no state per file, so any
/// number of threads may call it at once.
#[derive(Debug)]
pub struct Server {
    root: OwnedFd,
    proc: ProcFds,
    opts: Options,
    owner_uid: u32,
    owner_gid: u32,
    device: (u32, u32),
    creds: Credentials,
}

impl Server {
    /// Share `dir` (following a symlink the user gave, but none beneath it). Calls run with the
    /// rights of its owner when the daemon is root, and with the daemon's own otherwise.
    pub fn open(dir: &Path, opts: Options) -> Result<Server, HostfsError> {
        let open_error = |e: Errno| HostfsError::Open { path: dir.to_owned(), source: e.into() };
        let root = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(open_error)?;
        let st = beneath::stat(&root).map_err(open_error)?;
        // Every call depends on openat2; better to fail here than on the guest's first call.
        match beneath::open(root.as_fd(), ".", OFlags::PATH, Mode::empty()) {
            Err(e @ (Errno::NOSYS | Errno::INVAL)) => return Err(HostfsError::Unsupported { source: e.into() }),
            Err(e) => return Err(open_error(e)),
            Ok(_) => {}
        }
        let proc = ProcFds::open().map_err(|source| HostfsError::Proc { source })?;
        let creds = if rustix::process::geteuid().is_root() {
            Credentials::Owner { uid: st.stx_uid, gid: st.stx_gid }
        } else {
            Credentials::Own
        };
        Ok(Server {
            root,
            proc,
            opts,
            owner_uid: st.stx_uid,
            owner_gid: st.stx_gid,
            device: (st.stx_dev_major, st.stx_dev_minor),
            creds,
        })
    }

    /// How the directory is shared.
    pub fn options(&self) -> Options {
        self.opts
    }

    /// The host user and group that own the directory.
    pub fn owner(&self) -> (u32, u32) {
        (self.owner_uid, self.owner_gid)
    }

    /// The directory's device (major, minor), as it was when opened.
    pub fn device(&self) -> (u32, u32) {
        self.device
    }

    /// Carry out one call: blocking, on the calling thread. An error is a Linux errno.
    pub fn call(&self, op: Op) -> Result<Reply, i32> {
        if self.opts.readonly && op.writes() {
            return Err(libc::EROFS);
        }
        let _creds = self.creds.assume().map_err(|e| e.raw_os_error())?;
        ops::run(self, op).map_err(|e| e.raw_os_error())
    }

    /// What the guest is told about a file.
    fn attr(&self, st: &Statx) -> Attr {
        let mode = u32::from(st.stx_mode);
        let time = |t: rustix::fs::StatxTimestamp| Timestamp { secs: t.tv_sec, nanos: t.tv_nsec };
        Attr {
            ino: st.stx_ino,
            kind: kind(FileType::from_raw_mode(mode)),
            perm: mode & 0o7777,
            size: st.stx_size,
            blocks: st.stx_blocks,
            nlink: st.stx_nlink,
            uid: if st.stx_uid == self.owner_uid { self.opts.guest_uid } else { NOBODY },
            gid: if st.stx_gid == self.owner_gid { self.opts.guest_gid } else { NOBODY },
            atime: time(st.stx_atime),
            mtime: time(st.stx_mtime),
            ctime: time(st.stx_ctime),
        }
    }
}

fn kind(file_type: FileType) -> Kind {
    match file_type {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_cannot_be_shared_says_why() {
        let opts = Options { readonly: false, guest_uid: 1000, guest_gid: 1000 };
        let file = tempfile::NamedTempFile::new().unwrap();
        for path in [Path::new("/nonexistent/moat-hostfs"), file.path()] {
            let e = Server::open(path, opts).unwrap_err();
            assert!(matches!(e, HostfsError::Open { .. }), "{e:?}");
            moat_hint::check(&e, true).unwrap();
        }
        let io = || std::io::Error::other("the cause");
        moat_hint::check(&HostfsError::Proc { source: io() }, true).unwrap();
        moat_hint::check(&HostfsError::Unsupported { source: io() }, true).unwrap();
    }
}
