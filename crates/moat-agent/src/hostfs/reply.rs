//! What waits for the host's answer to a call: the kernel's FUSE reply, and what the answer
//! changes in the inode table once it comes. Nothing the host sends can make a reply panic:
//! a wrong kind of answer is EIO, an errno the kernel would refuse is EIO, sizes are clamped.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyStatfs, ReplyWrite,
};
use moat_proto::hostfs::{Attr, Kind, Reply, Timestamp, MAX_PATH};

use super::handles::Handles;
use super::inodes::{join, parent_of, valid_name, Inodes, UNKNOWN_INO};

/// How long the kernel may trust a name or attributes before asking again: short, because
/// the host's files change under the guest.
pub(crate) const TTL: Duration = Duration::from_secs(1);

/// Every open file bypasses the guest's page cache: a write on the host, or a snapshot restored
/// with an older cache, is seen at once. (Private mappings and exec still work.)
pub(crate) const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

/// Where a call's file is: its directory's inode and its name. The path is worked out again
/// when the answer comes, so an answer that arrives after a directory above was renamed
/// (lookups below it run in parallel with the rename) lands on the right path.
#[derive(Debug)]
pub(crate) struct Place {
    pub(crate) parent: u64,
    pub(crate) name: String,
    /// The path when the call was made, for a parent that is gone by then.
    pub(crate) path: String,
}

impl Place {
    fn path(&self, inodes: &Inodes) -> String {
        inodes.child(self.parent, OsStr::new(&self.name)).unwrap_or_else(|_| self.path.clone())
    }
}

/// A call's waiter: the kernel's reply and what completing it needs to know.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// lookup, mkdir, symlink, link, mknod: a new name for the kernel.
    Entry {
        reply: ReplyEntry,
        at: Place,
    },
    Created {
        reply: ReplyCreate,
        at: Place,
        append: bool,
    },
    /// getattr and setattr; `owner` is a (uid, gid) change the host cannot make, allowed only
    /// when it changes nothing.
    Attr {
        reply: ReplyAttr,
        ino: u64,
        owner: (Option<u32>, Option<u32>),
    },
    Read {
        reply: ReplyData,
        max: usize,
    },
    Readlink {
        reply: ReplyData,
    },
    /// `offset` is the kernel's: 1 after `.`, 2 after `..`, then 3 + the host's entry offset.
    Dir {
        reply: ReplyDirectory,
        ino: u64,
        path: String,
        offset: u64,
    },
    Written {
        reply: ReplyWrite,
        max: u32,
    },
    Done {
        reply: ReplyEmpty,
    },
    Removed {
        reply: ReplyEmpty,
        at: Place,
    },
    Renamed {
        reply: ReplyEmpty,
        from: Place,
        to: Place,
        exchange: bool,
    },
    Statfs {
        reply: ReplyStatfs,
    },
}

/// The errno the host sent, as the kernel accepts it (a reply with any other value is refused
/// and would leave the guest's call hanging).
pub(crate) fn errno(e: i32) -> Errno {
    if (1..512).contains(&e) {
        Errno::from_i32(e)
    } else {
        Errno::EIO
    }
}

pub(crate) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        // Shown as a socket: opening one fails in the guest, and none reaches the host.
        Kind::Other => FileType::Socket,
    }
}

pub(crate) fn system_time(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    let at = if t.secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(t.secs.unsigned_abs()))
    };
    at.and_then(|at| at.checked_add(nanos)).unwrap_or(UNIX_EPOCH)
}

pub(crate) fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp { secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() },
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => Timestamp { secs: -secs, nanos: 0 },
                n => Timestamp { secs: -secs - 1, nanos: 1_000_000_000 - n },
            }
        }
    }
}

/// The host's attributes under the guest's inode number.
pub(crate) fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Waiter {
    /// Answer the kernel with the host's result, updating the tables it changes.
    pub(crate) fn complete(self, result: Result<Reply, i32>, inodes: &mut Inodes, handles: &mut Handles) {
        let reply = match result {
            Ok(r) => r,
            Err(e) => return self.fail(errno(e)),
        };
        match (self, reply) {
            (Waiter::Entry { reply, at }, Reply::Attr(a)) => {
                let ino = inodes.remember(&at.path(inodes), a.kind);
                reply.entry(&TTL, &file_attr(ino, &a), Generation(0));
            }
            (Waiter::Created { reply, at, append }, Reply::Attr(a)) => {
                let ino = inodes.remember(&at.path(inodes), a.kind);
                let fh = handles.open(append);
                reply.created(&TTL, &file_attr(ino, &a), Generation(0), FileHandle(fh), OPEN_FLAGS);
            }
            (Waiter::Attr { reply, ino, owner: (uid, gid) }, Reply::Attr(a)) => {
                if uid.is_some_and(|u| u != a.uid) || gid.is_some_and(|g| g != a.gid) {
                    reply.error(Errno::EPERM);
                } else {
                    reply.attr(&TTL, &file_attr(ino, &a));
                }
            }
            (Waiter::Read { reply, max }, Reply::Data(data)) => reply.data(&data[..data.len().min(max)]),
            (Waiter::Readlink { reply }, Reply::Target(target)) => {
                if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
                    reply.error(Errno::EIO);
                } else {
                    reply.data(target.as_bytes());
                }
            }
            (Waiter::Dir { mut reply, ino, path, offset }, Reply::Entries { entries, .. }) => {
                let path = inodes.path(ino).map_or(path, str::to_string);
                // `.` and `..` come first; the kernel resolves both itself, so their numbers
                // only show in listings.
                let parent = if path.is_empty() { ino } else { inodes.known(parent_of(&path)).unwrap_or(UNKNOWN_INO) };
                let dots = [(ino, "."), (parent, "..")];
                for (i, (dot_ino, name)) in dots.into_iter().enumerate().skip(offset.min(2) as usize) {
                    if reply.add(INodeNo(dot_ino), i as u64 + 1, FileType::Directory, name) {
                        return reply.ok();
                    }
                }
                let first = offset.saturating_sub(2);
                for (i, e) in entries.iter().enumerate() {
                    if !valid_name(&e.name) {
                        continue;
                    }
                    let known = inodes.known(&join(&path, &e.name)).unwrap_or(UNKNOWN_INO);
                    let next = first.saturating_add(i as u64).saturating_add(3);
                    if reply.add(INodeNo(known), next, file_type(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            (Waiter::Written { reply, max }, Reply::Written(n)) => reply.written(n.min(max)),
            (Waiter::Done { reply }, Reply::Done) => reply.ok(),
            (Waiter::Removed { reply, at }, Reply::Done) => {
                inodes.removed(&at.path(inodes));
                reply.ok();
            }
            (Waiter::Renamed { reply, from, to, exchange }, Reply::Done) => {
                inodes.renamed(&from.path(inodes), &to.path(inodes), exchange);
                reply.ok();
            }
            (Waiter::Statfs { reply }, Reply::Statfs(s)) => {
                reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize);
            }
            (waiter, other) => {
                eprintln!("moat-agent: host mount: a {} answer to a call that waits for something else", kind(&other));
                waiter.fail(Errno::EIO);
            }
        }
    }

    /// Answer the kernel with an error.
    pub(crate) fn fail(self, e: Errno) {
        match self {
            Waiter::Entry { reply, .. } => reply.error(e),
            Waiter::Created { reply, .. } => reply.error(e),
            Waiter::Attr { reply, .. } => reply.error(e),
            Waiter::Read { reply, .. } | Waiter::Readlink { reply } => reply.error(e),
            Waiter::Dir { reply, .. } => reply.error(e),
            Waiter::Written { reply, .. } => reply.error(e),
            Waiter::Done { reply } | Waiter::Removed { reply, .. } | Waiter::Renamed { reply, .. } => reply.error(e),
            Waiter::Statfs { reply } => reply.error(e),
        }
    }
}

fn kind(r: &Reply) -> &'static str {
    match r {
        Reply::Attr(_) => "Attr",
        Reply::Data(_) => "Data",
        Reply::Entries { .. } => "Entries",
        Reply::Target(_) => "Target",
        Reply::Written(_) => "Written",
        Reply::Statfs(_) => "Statfs",
        Reply::Done => "Done",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_before_and_after_the_epoch() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp { secs: 1_700_000_000, nanos: 123_456_789 },
            Timestamp { secs: -1, nanos: 500_000_000 },
            Timestamp { secs: -86_400, nanos: 0 },
        ] {
            assert_eq!(timestamp(system_time(t)), t);
        }
        // Out of range values from the host do not panic.
        system_time(Timestamp { secs: i64::MAX, nanos: u32::MAX });
        system_time(Timestamp { secs: i64::MIN, nanos: u32::MAX });
    }

    #[test]
    fn host_errnos_the_kernel_would_refuse_become_eio() {
        assert_eq!(errno(libc::ENOENT), Errno::ENOENT);
        for bad in [0, -2, 512, i32::MAX, i32::MIN] {
            assert_eq!(errno(bad), Errno::EIO, "{bad}");
        }
    }

    #[test]
    fn attributes_keep_the_guest_inode_and_only_permission_bits() {
        let t = Timestamp { secs: 5, nanos: 0 };
        let a = Attr {
            ino: 777,
            kind: Kind::Other,
            perm: 0o177_777,
            size: 3,
            blocks: 1,
            nlink: 2,
            uid: 1000,
            gid: 1000,
            atime: t,
            mtime: t,
            ctime: t,
        };
        let f = file_attr(42, &a);
        assert_eq!((f.ino, f.perm, f.kind), (INodeNo(42), 0o7777, FileType::Socket));
    }
}
