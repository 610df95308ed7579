//! The calls, one function each, run with the caller's credentials already taken on.
//!
//! A call on a file finds it with [`Node::find`] and works on the fd it gets; a call on a name
//! (create, remove, rename, link) opens the name's directory beneath the root and uses `*at`
//! system calls with that fd and the single name, which follow no symlink.

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use moat_proto::hostfs::{DirEntry, Op, Reply, SetTime, Statfs, MAX_DIR_ENTRIES, MAX_IO, MAX_PATH};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, RenameFlags, StatxFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::beneath::{self, Node};
use crate::path::GuestPath;
use crate::{kind, Server};

type Result<T> = std::result::Result<T, Errno>;

/// Room for one `getdents64` batch while listing a directory.
const DIR_BUF: usize = 32 * 1024;

pub(crate) fn run(s: &Server, op: Op) -> Result<Reply> {
    match op {
        Op::Getattr { path } => Ok(Reply::Attr(s.attr(&s.node(&path)?.stat))),
        Op::Setattr { path, mode, size, atime, mtime } => setattr(s, &path, mode, size, atime, mtime),
        Op::Readlink { path } => readlink(s, &path),
        Op::Readdir { path, offset } => readdir(s, &path, offset),
        Op::Create { path, mode, exclusive } => create(s, &path, mode, exclusive),
        Op::Mkdir { path, mode } => mkdir(s, &path, mode),
        Op::Symlink { path, target } => symlink(s, &path, &target),
        Op::Link { from, to } => link(s, &from, &to),
        Op::Unlink { path } => remove(s, &path, AtFlags::empty()),
        Op::Rmdir { path } => remove(s, &path, AtFlags::REMOVEDIR),
        Op::Rename { from, to, flags } => rename(s, &from, &to, flags),
        Op::Read { path, offset, size } => read(s, &path, offset, size),
        Op::Write { path, offset, append, data } => write(s, &path, offset, append, &data),
        Op::Fsync { path } => fsync(s, &path),
        Op::Statfs => statfs(s),
    }
}

impl Server {
    /// The file at `path`.
    fn node(&self, path: &str) -> Result<Node> {
        Node::find(self.root.as_fd(), GuestPath::parse(path)?.as_relative())
    }

    /// The directory holding `path`'s last name, and the name. `at_root` is the answer when the
    /// path is the root, which has neither.
    fn parent<'a>(&self, path: &'a str, at_root: Errno) -> Result<(OwnedFd, &'a str)> {
        let (dir, name) = GuestPath::parse(path)?.split_last().ok_or(at_root)?;
        let fd = beneath::open(self.root.as_fd(), dir.as_relative(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok((fd, name))
    }

    fn attr_reply(&self, node: &Node) -> Result<Reply> {
        Ok(Reply::Attr(self.attr(&node.stat)))
    }
}

/// The permission bits a guest may give a file. Never set-user-ID, and set-group-ID only on a
/// directory (where it only passes the group on): a guest must not leave a program on the host
/// that runs with the owner's rights, whoever starts it.
fn allowed_mode(mode: u32, dir: bool) -> Mode {
    let mut bits = mode & 0o7777 & !libc::S_ISUID;
    if !dir {
        bits &= !libc::S_ISGID;
    }
    Mode::from_bits_truncate(bits)
}

fn perm(node: &Node) -> u32 {
    u32::from(node.stat.stx_mode) & 0o7777
}

fn setattr(
    s: &Server,
    path: &str,
    mode: Option<u32>,
    size: Option<u64>,
    atime: Option<SetTime>,
    mtime: Option<SetTime>,
) -> Result<Reply> {
    let mut node = s.node(path)?;
    if let Some(mode) = mode {
        s.proc.chmod(&node, allowed_mode(mode, node.file_type() == FileType::Directory))?;
    }
    if let Some(size) = size {
        let fd = s.proc.reopen(&node, OFlags::WRONLY)?;
        rustix::fs::ftruncate(&fd, size)?;
    }
    // Last: truncating moves the modification time.
    if atime.is_some() || mtime.is_some() {
        let times = Timestamps { last_access: timespec(atime)?, last_modification: timespec(mtime)? };
        s.proc.utimens(&node, &times)?;
    }
    node.restat()?;
    s.attr_reply(&node)
}

fn timespec(time: Option<SetTime>) -> Result<Timespec> {
    Ok(match time {
        None => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        Some(SetTime::Now) => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        // Out-of-range nanoseconds would otherwise read as UTIME_NOW or UTIME_OMIT.
        Some(SetTime::At(t)) if t.nanos >= 1_000_000_000 => return Err(Errno::INVAL),
        Some(SetTime::At(t)) => Timespec { tv_sec: t.secs, tv_nsec: t.nanos.into() },
    })
}

fn readlink(s: &Server, path: &str) -> Result<Reply> {
    let node = s.node(path)?;
    if node.file_type() != FileType::Symlink {
        return Err(Errno::INVAL);
    }
    let mut buf = [MaybeUninit::<u8>::uninit(); MAX_PATH + 1];
    let (text, _) = rustix::fs::readlinkat_raw(&node.fd, "", &mut buf)?;
    if text.len() > MAX_PATH {
        return Err(Errno::NAMETOOLONG);
    }
    // The protocol carries text; a target that is not UTF-8 cannot be told.
    let text = std::str::from_utf8(text).map_err(|_| Errno::ILSEQ)?;
    Ok(Reply::Target(text.to_owned()))
}

/// One page of a directory, read afresh from its start: the guest's `offset` counts the entries
/// this lists (names that are not UTF-8 cannot be told, so they are neither listed nor counted).
fn readdir(s: &Server, path: &str, offset: u64) -> Result<Reply> {
    let path = GuestPath::parse(path)?;
    // O_DIRECTORY: only ever a directory gets opened for reading.
    let dir = beneath::open(s.root.as_fd(), path.as_relative(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let mut buf = Vec::with_capacity(DIR_BUF);
    let mut raw = RawDir::new(&dir, buf.spare_capacity_mut());
    let mut entries = Vec::new();
    let mut index = 0u64;
    while let Some(entry) = raw.next() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let Ok(name) = std::str::from_utf8(name) else { continue };
        index += 1;
        if index <= offset {
            continue;
        }
        if entries.len() == MAX_DIR_ENTRIES as usize {
            return Ok(Reply::Entries { entries, end: false });
        }
        let file_type = match entry.file_type() {
            // Some file systems leave the type to a stat.
            FileType::Unknown => rustix::fs::statx(&dir, name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE)
                .map_or(FileType::Unknown, |st| FileType::from_raw_mode(st.stx_mode.into())),
            known => known,
        };
        entries.push(DirEntry { name: name.to_owned(), ino: entry.ino(), kind: kind(file_type) });
    }
    Ok(Reply::Entries { entries, end: true })
}

fn create(s: &Server, path: &str, mode: u32, exclusive: bool) -> Result<Reply> {
    let (dir, name) = s.parent(path, Errno::EXIST)?;
    let perm = allowed_mode(mode, false);
    // O_EXCL: never opens what is there already (a device, a fifo, a symlink's target).
    match beneath::open(dir.as_fd(), name, OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY, perm) {
        Ok(fd) => {
            let mut st = beneath::stat(&fd)?;
            // The daemon's umask is not the guest's.
            if u32::from(st.stx_mode) & 0o7777 != perm.bits() {
                rustix::fs::fchmod(&fd, perm)?;
                st = beneath::stat(&fd)?;
            }
            Ok(Reply::Attr(s.attr(&st)))
        }
        Err(Errno::EXIST) if !exclusive => {
            let node = Node::find(dir.as_fd(), name)?;
            match node.file_type() {
                FileType::RegularFile => s.attr_reply(&node),
                FileType::Directory => Err(Errno::ISDIR),
                _ => Err(Errno::EXIST),
            }
        }
        Err(e) => Err(e),
    }
}

fn mkdir(s: &Server, path: &str, mode: u32) -> Result<Reply> {
    let (dir, name) = s.parent(path, Errno::EXIST)?;
    let wanted = allowed_mode(mode, true);
    rustix::fs::mkdirat(&dir, name, wanted)?;
    let mut node = Node::find(dir.as_fd(), name)?;
    // The daemon's umask is not the guest's; a set-group-ID bit inherited from the parent stays.
    let bits = wanted.bits() | (perm(&node) & libc::S_ISGID);
    if node.file_type() == FileType::Directory && perm(&node) != bits {
        s.proc.chmod(&node, Mode::from_bits_truncate(bits))?;
        node.restat()?;
    }
    s.attr_reply(&node)
}

fn symlink(s: &Server, path: &str, target: &str) -> Result<Reply> {
    if target.is_empty() {
        return Err(Errno::NOENT);
    }
    if target.len() > MAX_PATH {
        return Err(Errno::NAMETOOLONG);
    }
    if target.contains('\0') {
        return Err(Errno::INVAL);
    }
    let (dir, name) = s.parent(path, Errno::EXIST)?;
    rustix::fs::symlinkat(target, &dir, name)?;
    s.attr_reply(&Node::find(dir.as_fd(), name)?)
}

fn link(s: &Server, from: &str, to: &str) -> Result<Reply> {
    // The root is a directory, which cannot be linked.
    let (from_dir, from_name) = s.parent(from, Errno::PERM)?;
    let (to_dir, to_name) = s.parent(to, Errno::EXIST)?;
    // No AT_SYMLINK_FOLLOW: a symlink is linked as itself. A mount at the name is refused by the
    // kernel (EXDEV), as links never cross mounts.
    rustix::fs::linkat(&from_dir, from_name, &to_dir, to_name, AtFlags::empty())?;
    s.attr_reply(&Node::find(to_dir.as_fd(), to_name)?)
}

fn remove(s: &Server, path: &str, flags: AtFlags) -> Result<Reply> {
    let (dir, name) = s.parent(path, Errno::BUSY)?;
    rustix::fs::unlinkat(&dir, name, flags)?;
    Ok(Reply::Done)
}

fn rename(s: &Server, from: &str, to: &str, flags: u32) -> Result<Reply> {
    let allowed = RenameFlags::NOREPLACE | RenameFlags::EXCHANGE;
    let flags = RenameFlags::from_bits(flags).filter(|f| allowed.contains(*f)).ok_or(Errno::INVAL)?;
    let (from_dir, from_name) = s.parent(from, Errno::BUSY)?;
    let (to_dir, to_name) = s.parent(to, Errno::BUSY)?;
    rustix::fs::renameat_with(&from_dir, from_name, &to_dir, to_name, flags)?;
    Ok(Reply::Done)
}

fn read(s: &Server, path: &str, offset: u64, size: u32) -> Result<Reply> {
    let node = s.node(path)?;
    let fd = s.proc.reopen(&node, OFlags::RDONLY)?;
    let mut data = vec![0u8; size.min(MAX_IO) as usize];
    let mut got = 0;
    // Short only at the end of the file, as the protocol promises.
    while got < data.len() {
        let at = offset.checked_add(got as u64).ok_or(Errno::INVAL)?;
        match rustix::io::pread(&fd, &mut data[got..], at) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::INTR) => continue,
            Err(e) if got == 0 => return Err(e),
            Err(_) => break,
        }
    }
    data.truncate(got);
    Ok(Reply::Data(data))
}

fn write(s: &Server, path: &str, offset: u64, append: bool, data: &[u8]) -> Result<Reply> {
    if data.len() > MAX_IO as usize {
        return Err(Errno::INVAL);
    }
    let node = s.node(path)?;
    let flags = if append { OFlags::WRONLY | OFlags::APPEND } else { OFlags::WRONLY };
    let fd = s.proc.reopen(&node, flags)?;
    let mut done = 0;
    while done < data.len() {
        let result = if append {
            rustix::io::write(&fd, &data[done..])
        } else {
            let at = offset.checked_add(done as u64).ok_or(Errno::FBIG)?;
            rustix::io::pwrite(&fd, &data[done..], at)
        };
        match result {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) if done == 0 => return Err(e),
            // What was written stays written; the guest learns of the rest on its next write.
            Err(_) => break,
        }
    }
    Ok(Reply::Written(done as u32))
}

fn fsync(s: &Server, path: &str) -> Result<Reply> {
    let node = s.node(path)?;
    let fd = if node.file_type() == FileType::Directory {
        let path = GuestPath::parse(path)?;
        beneath::open(s.root.as_fd(), path.as_relative(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?
    } else {
        // A file may be writable and not readable by its owner.
        match s.proc.reopen(&node, OFlags::RDONLY) {
            Err(Errno::ACCESS) if !s.opts.readonly => s.proc.reopen(&node, OFlags::WRONLY)?,
            other => other?,
        }
    };
    rustix::fs::fsync(&fd)?;
    Ok(Reply::Done)
}

fn statfs(s: &Server) -> Result<Reply> {
    let v = rustix::fs::fstatvfs(&s.root)?;
    // Blocks are counted in fragments.
    let bsize = if v.f_frsize != 0 { v.f_frsize } else { v.f_bsize };
    Ok(Reply::Statfs(Statfs {
        blocks: v.f_blocks,
        bfree: v.f_bfree,
        bavail: v.f_bavail,
        files: v.f_files,
        ffree: v.f_ffree,
        bsize: u32::try_from(bsize).unwrap_or(u32::MAX),
        namelen: u32::try_from(v.f_namemax).unwrap_or(u32::MAX),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_never_sets_set_user_id() {
        assert_eq!(allowed_mode(0o4755, false).bits(), 0o755);
        assert_eq!(allowed_mode(0o2755, false).bits(), 0o755);
        assert_eq!(allowed_mode(0o6777, true).bits(), 0o2777);
        assert_eq!(allowed_mode(0o1777, true).bits(), 0o1777);
        assert_eq!(allowed_mode(0o170644, false).bits(), 0o644);
    }

    #[test]
    fn times_out_of_range_are_refused() {
        let at = |nanos| Some(SetTime::At(moat_proto::hostfs::Timestamp { secs: 1, nanos }));
        assert_eq!(timespec(at(1_000_000_000)).err(), Some(Errno::INVAL));
        assert_eq!(timespec(at(999_999_999)).unwrap().tv_nsec, 999_999_999);
        assert_eq!(timespec(None).unwrap().tv_nsec, rustix::fs::UTIME_OMIT);
    }
}
