//! A temporary world for attacking a shared directory: `shared/` is served, `outside/` beside it
//! holds what the guest must never reach, and a snapshot tells whether anything but `shared/`
//! changed.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use moat_hostfs::{Options, Server};
use moat_proto::hostfs::{Op, Reply};

/// The guest user the directory owner is shown as.
pub const GUEST: u32 = 1000;

pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    /// `outside/secret` ("SECRET"), `outside/dir/f` ("SECRET TOO") and an empty `shared/`.
    pub fn new() -> World {
        let dir = tempfile::tempdir().expect("a temp dir");
        let world = World { dir };
        std::fs::create_dir(world.outside()).unwrap();
        std::fs::write(world.outside().join("secret"), "SECRET").unwrap();
        std::fs::create_dir(world.outside().join("dir")).unwrap();
        std::fs::write(world.outside().join("dir/f"), "SECRET TOO").unwrap();
        std::fs::create_dir(world.shared()).unwrap();
        world
    }

    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    pub fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    pub fn server(&self, readonly: bool) -> Server {
        Server::open(&self.shared(), Options { readonly, guest_uid: GUEST, guest_gid: GUEST })
            .expect("the server opens")
    }

    /// Everything in the world but `shared/`: each file's kind, mode, owner, times, links and
    /// contents (or symlink text).
    pub fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &self.shared(), &mut out);
        out
    }
}

fn walk(dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let meta = std::fs::symlink_metadata(dir).unwrap();
    out.insert(dir.to_owned(), describe(dir, &meta));
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path == skip {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            walk(&path, skip, out);
        } else {
            out.insert(path.clone(), describe(&path, &meta));
        }
    }
}

fn describe(path: &Path, meta: &std::fs::Metadata) -> String {
    let contents = if meta.file_type().is_symlink() {
        format!("-> {:?}", std::fs::read_link(path).unwrap())
    } else if meta.is_file() {
        format!("{:?}", std::fs::read(path).unwrap())
    } else {
        String::new()
    };
    format!(
        "mode {:o} uid {} gid {} nlink {} size {} mtime {}.{} ctime {}.{} {contents}",
        meta.mode(),
        meta.uid(),
        meta.gid(),
        meta.nlink(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The errno a call failed with; panics if it succeeded.
#[track_caller]
pub fn errno(result: Result<Reply, i32>) -> i32 {
    match result {
        Err(e) => e,
        Ok(reply) => panic!("expected an error, got {reply:?}"),
    }
}

pub fn read(path: &str) -> Op {
    Op::Read { path: path.into(), offset: 0, size: 1 << 20 }
}

pub fn write(path: &str, data: &[u8]) -> Op {
    Op::Write { path: path.into(), offset: 0, append: false, data: data.to_vec() }
}

pub fn getattr(path: &str) -> Op {
    Op::Getattr { path: path.into() }
}

/// Every call that changes something, aimed at `path` (and `other`, for those taking two).
pub fn writing_ops(path: &str, other: &str) -> Vec<Op> {
    let p = || path.to_string();
    vec![
        Op::Setattr { path: p(), mode: Some(0o777), size: None, atime: None, mtime: None },
        Op::Setattr { path: p(), mode: None, size: Some(0), atime: None, mtime: None },
        Op::Setattr {
            path: p(),
            mode: None,
            size: None,
            atime: Some(moat_proto::hostfs::SetTime::Now),
            mtime: Some(moat_proto::hostfs::SetTime::Now),
        },
        Op::Create { path: format!("{path}/new"), mode: 0o644, exclusive: false },
        Op::Create { path: p(), mode: 0o644, exclusive: false },
        Op::Mkdir { path: format!("{path}/newdir"), mode: 0o755 },
        Op::Symlink { path: format!("{path}/newlink"), target: "/etc".into() },
        Op::Link { from: p(), to: format!("{other}/linked") },
        Op::Link { from: other.into(), to: format!("{path}/linked") },
        Op::Unlink { path: p() },
        Op::Rmdir { path: p() },
        Op::Rename { from: p(), to: other.into(), flags: 0 },
        Op::Rename { from: other.into(), to: format!("{path}/moved"), flags: 0 },
        Op::Rename { from: p(), to: other.into(), flags: 2 },
        write(path, b"OVERWRITTEN"),
        Op::Write { path: p(), offset: 0, append: true, data: b"APPENDED".to_vec() },
    ]
}
