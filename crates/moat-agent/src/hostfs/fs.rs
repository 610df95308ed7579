//! The FUSE file system of a host mount: each kernel request becomes a call to the host (or is
//! answered here when it needs none), and its reply waits with the call, so the session thread
//! never waits for the host (only for room when [`MAX_IN_FLIGHT`](super::shared::MAX_IN_FLIGHT)
//! calls are out).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileHandle, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use moat_proto::hostfs::{Op, SetTime, MAX_IO, MAX_PATH};

use super::inodes::Inodes;
use super::reply::{errno, timestamp, Place, Waiter, OPEN_FLAGS};
use super::shared::Shared;

/// The FUSE side of one mount.
pub(crate) struct HostFs {
    shared: Arc<Shared>,
}

impl HostFs {
    pub(crate) fn new(shared: Arc<Shared>) -> HostFs {
        HostFs { shared }
    }

    /// A call on the file at inode `ino`; `make` builds it from the file's path, or the reply
    /// fails at once when the inode has none (any more).
    fn on_inode<R: ErrorReply>(&self, ino: INodeNo, reply: R, make: impl FnOnce(R, String) -> (Op, Waiter)) {
        let state = self.shared.room();
        match state.inodes.path(ino.0) {
            Ok(path) => {
                let (op, waiter) = make(reply, path.to_string());
                self.shared.call(state, op, waiter);
            }
            Err(e) => {
                drop(state);
                reply.fail(errno(e));
            }
        }
    }

    /// A call on `name` in directory `parent`; `make` builds it from the name's path and place.
    fn on_child<R: ErrorReply>(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reply: R,
        make: impl FnOnce(R, String, Place) -> (Op, Waiter),
    ) {
        let state = self.shared.room();
        match place(&state.inodes, parent, name) {
            Ok(at) => {
                let (op, waiter) = make(reply, at.path.clone(), at);
                self.shared.call(state, op, waiter);
            }
            Err(e) => {
                drop(state);
                reply.fail(errno(e));
            }
        }
    }
}

/// `name` in directory `parent`, checked.
fn place(inodes: &Inodes, parent: INodeNo, name: &OsStr) -> Result<Place, i32> {
    let path = inodes.child(parent.0, name)?;
    // child() takes UTF-8 names only, so nothing is lost here.
    Ok(Place { parent: parent.0, name: name.to_string_lossy().into_owned(), path })
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(at) => SetTime::At(timestamp(at)),
    })
}

impl Filesystem for HostFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // One write or read is one call; the mount's max_read caps reads the same way.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Lookups in one directory in parallel; cached pages of mappings dropped when the host
        // changes a file; shared mappings where the kernel allows them with direct I/O (6.6+).
        let wanted =
            InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_AUTO_INVAL_DATA | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        let _ = config.add_capabilities(wanted & config.capabilities());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.on_child(parent, name, reply, |reply, path, at| (Op::Getattr { path }, Waiter::Entry { reply, at }));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.shared.lock().inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.on_inode(ino, reply, |reply, path| {
            (Op::Getattr { path }, Waiter::Attr { reply, ino: ino.0, owner: (None, None) })
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (atime, mtime, mode) = (set_time(atime), set_time(mtime), mode.map(|m| m & 0o7777));
        self.on_inode(ino, reply, |reply, path| {
            // The host keeps owners: a chown is checked against the attributes it answers.
            let op = if mode.is_none() && size.is_none() && atime.is_none() && mtime.is_none() {
                Op::Getattr { path }
            } else {
                Op::Setattr { path, mode, size, atime, mtime }
            };
            (op, Waiter::Attr { reply, ino: ino.0, owner: (uid, gid) })
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.on_inode(ino, reply, |reply, path| (Op::Readlink { path }, Waiter::Readlink { reply }));
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Devices, fifos and sockets would be the host's files; a regular file is a create.
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        self.on_child(parent, name, reply, |reply, path, at| {
            (Op::Create { path, mode: mode & 0o7777, exclusive: true }, Waiter::Entry { reply, at })
        });
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        self.on_child(parent, name, reply, |reply, path, at| {
            (Op::Mkdir { path, mode: mode & 0o7777 }, Waiter::Entry { reply, at })
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.on_child(parent, name, reply, |reply, path, at| (Op::Unlink { path }, Waiter::Removed { reply, at }));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.on_child(parent, name, reply, |reply, path, at| (Op::Rmdir { path }, Waiter::Removed { reply, at }));
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let Some(target) = target.to_str().map(str::to_string) else { return reply.error(Errno::EINVAL) };
        if target.len() > MAX_PATH {
            return reply.error(Errno::from_i32(libc::ENAMETOOLONG));
        }
        self.on_child(parent, link_name, reply, |reply, path, at| {
            (Op::Symlink { path, target }, Waiter::Entry { reply, at })
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let state = self.shared.room();
        let places =
            place(&state.inodes, parent, name).and_then(|f| Ok((f, place(&state.inodes, newparent, newname)?)));
        match places {
            Ok((from, to)) => {
                let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
                let op = Op::Rename { from: from.path.clone(), to: to.path.clone(), flags: flags.bits() };
                self.shared.call(state, op, Waiter::Renamed { reply, from, to, exchange });
            }
            Err(e) => {
                drop(state);
                reply.error(errno(e));
            }
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let state = self.shared.room();
        let paths = state
            .inodes
            .path(ino.0)
            .map(str::to_string)
            .and_then(|f| Ok((f, place(&state.inodes, newparent, newname)?)));
        match paths {
            Ok((from, at)) => {
                let op = Op::Link { from, to: at.path.clone() };
                self.shared.call(state, op, Waiter::Entry { reply, at });
            }
            Err(e) => {
                drop(state);
                reply.error(errno(e));
            }
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.shared.lock().handles.open(flags.0 & libc::O_APPEND != 0);
        reply.opened(FileHandle(fh), OPEN_FLAGS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // max_read keeps requests within MAX_IO; a larger one gets a short read.
        self.on_inode(ino, reply, |reply, path| {
            (Op::Read { path, offset, size: size.min(MAX_IO) }, Waiter::Read { reply, max: size as usize })
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // max_write keeps requests within MAX_IO; a larger one gets a short write.
        let data = &data[..data.len().min(MAX_IO as usize)];
        let state = self.shared.room();
        let append = state.handles.appends(fh.0);
        match state.inodes.path(ino.0) {
            Ok(path) => {
                let op = Op::Write { path: path.to_string(), offset, append, data: data.to_vec() };
                self.shared.call(state, op, Waiter::Written { reply, max: data.len() as u32 });
            }
            Err(e) => {
                drop(state);
                reply.error(errno(e));
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok(); // Writes went to the host as they came.
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.lock().handles.release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.on_inode(ino, reply, |reply, path| (Op::Fsync { path }, Waiter::Done { reply }));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.on_inode(ino, reply, |reply, path: String| {
            let op = Op::Readdir { path: path.clone(), offset: offset.saturating_sub(2) };
            (op, Waiter::Dir { reply, ino: ino.0, path, offset })
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok(); // The host's directories are the host's to sync.
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let state = self.shared.room();
        self.shared.call(state, Op::Statfs, Waiter::Statfs { reply });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok(); // default_permissions: the kernel checks modes itself.
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (exclusive, append) = (flags & libc::O_EXCL != 0, flags & libc::O_APPEND != 0);
        self.on_child(parent, name, reply, |reply, path, at| {
            let op = Op::Create { path, mode: mode & 0o7777, exclusive };
            (op, Waiter::Created { reply, at, append })
        });
    }
}

/// The replies a call can fail at once.
trait ErrorReply {
    fn fail(self, e: Errno);
}

macro_rules! error_reply {
    ($($t:ty),*) => {$(
        impl ErrorReply for $t {
            fn fail(self, e: Errno) {
                self.error(e);
            }
        }
    )*};
}
error_reply!(ReplyEntry, ReplyAttr, ReplyData, ReplyEmpty, ReplyDirectory, ReplyCreate);
