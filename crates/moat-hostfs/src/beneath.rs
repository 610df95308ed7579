//! Opening files beneath the shared directory without ever leaving it.
//!
//! Every lookup is one `openat2` from a directory fd already beneath the root, refusing every
//! symlink, magic link and mount on the way: a directory swapped for a symlink between two calls,
//! or during one, makes the lookup fail instead of escaping. Files are then used through the fd
//! that lookup gave, never by their name again, and are opened for I/O only once that fd shows a
//! regular file: a device's driver or a fifo's writer never sees an open from us.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Statx, StatxFlags, Timestamps};
use rustix::io::Errno;

/// How every lookup resolves: beneath its directory, never following a link or crossing a mount.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// How often a lookup is tried again when the kernel saw a rename race it (`EAGAIN`).
const RETRIES: usize = 16;

/// Opens `path` (relative, already checked) beneath `dir`, never following its last name either.
pub(crate) fn open(dir: BorrowedFd<'_>, path: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    let mut flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if !flags.contains(OFlags::PATH) {
        flags |= OFlags::NOCTTY;
    }
    for _ in 0..RETRIES {
        match rustix::fs::openat2(dir, path, flags, mode, RESOLVE) {
            Err(Errno::AGAIN) => continue,
            // With a checked path, only a mount point beneath the root gets here.
            Err(Errno::XDEV) => return Err(Errno::ACCESS),
            other => return other,
        }
    }
    Err(Errno::AGAIN)
}

/// A file found beneath the root: an `O_PATH` fd (which reads, writes and opens nothing) and what
/// it is.
pub(crate) struct Node {
    pub(crate) fd: OwnedFd,
    pub(crate) stat: Statx,
}

impl Node {
    pub(crate) fn find(dir: BorrowedFd<'_>, path: &str) -> Result<Node, Errno> {
        let fd = open(dir, path, OFlags::PATH, Mode::empty())?;
        let stat = stat(&fd)?;
        Ok(Node { fd, stat })
    }

    pub(crate) fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.stat.stx_mode.into())
    }

    /// The node's attributes as they are now.
    pub(crate) fn restat(&mut self) -> Result<(), Errno> {
        self.stat = stat(&self.fd)?;
        Ok(())
    }
}

/// The attributes of the file `fd` refers to, not following it if it is a symlink.
pub(crate) fn stat(fd: impl AsFd) -> Result<Statx, Errno> {
    rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW, StatxFlags::BASIC_STATS)
}

/// This process's `/proc/self/fd`: the one way to reopen, chmod or touch exactly the inode an
/// `O_PATH` fd holds, whatever its name now points to.
#[derive(Debug)]
pub(crate) struct ProcFds(OwnedFd);

impl ProcFds {
    pub(crate) fn open() -> std::io::Result<ProcFds> {
        let fd = rustix::fs::open("/proc/self/fd", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        // Something other than procfs there would turn "the inode behind fd N" into any path.
        if rustix::fs::fstatfs(&fd)?.f_type != rustix::fs::PROC_SUPER_MAGIC {
            return Err(std::io::Error::other("/proc is not a procfs"));
        }
        Ok(ProcFds(fd))
    }

    /// The regular file of `node`, opened for I/O with `flags`; anything else is refused unopened.
    pub(crate) fn reopen(&self, node: &Node, flags: OFlags) -> Result<OwnedFd, Errno> {
        match node.file_type() {
            FileType::RegularFile => {}
            FileType::Directory => return Err(Errno::ISDIR),
            _ => return Err(Errno::ACCESS),
        }
        let fd = rustix::fs::openat(&self.0, fd_name(node), flags | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty())?;
        // The same inode by construction; checked anyway, as it is cheap.
        let st = stat(&fd)?;
        let same = (st.stx_ino, st.stx_dev_major, st.stx_dev_minor)
            == (node.stat.stx_ino, node.stat.stx_dev_major, node.stat.stx_dev_minor);
        if !same || FileType::from_raw_mode(st.stx_mode.into()) != FileType::RegularFile {
            return Err(Errno::ACCESS);
        }
        Ok(fd)
    }

    /// Change the permission bits of `node`, which is not a symlink.
    pub(crate) fn chmod(&self, node: &Node, mode: Mode) -> Result<(), Errno> {
        if node.file_type() == FileType::Symlink {
            return Err(Errno::OPNOTSUPP);
        }
        rustix::fs::chmodat(&self.0, fd_name(node), mode, AtFlags::empty())
    }

    /// Set the times of `node`.
    pub(crate) fn utimens(&self, node: &Node, times: &Timestamps) -> Result<(), Errno> {
        if node.file_type() == FileType::Symlink {
            // The empty path names the symlink itself (Linux 5.8 or later).
            return rustix::fs::utimensat(&node.fd, "", times, AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW);
        }
        rustix::fs::utimensat(&self.0, fd_name(node), times, AtFlags::empty())
    }
}

fn fd_name(node: &Node) -> String {
    node.fd.as_raw_fd().to_string()
}
