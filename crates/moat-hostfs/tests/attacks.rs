//! A hostile guest against a shared directory: every way out it might try, and the calls it
//! makes in earnest.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libc::{EACCES, EBUSY, EEXIST, EINVAL, ELOOP, ENAMETOOLONG, ENOENT, EPERM, EROFS, EXDEV};
use moat_hostfs::NOBODY;
use moat_proto::hostfs::{Kind, Op, Reply, MAX_DIR_ENTRIES, MAX_IO, MAX_PATH};
use rustix::fs::{FileType, Mode, RenameFlags, CWD};
use support::{errno, getattr, read, write, writing_ops, World, GUEST};

#[test]
fn paths_with_dot_dot_or_a_leading_slash_are_refused() {
    let world = World::new();
    std::fs::create_dir(world.shared().join("a")).unwrap();
    let server = world.server(false);
    let before = world.snapshot();
    for path in ["../outside/secret", "/etc/passwd", "a/../../outside/secret", "a/..", "./a", "a//b", "a/", "a\0"] {
        assert_eq!(errno(server.call(read(path))), EINVAL, "{path:?}");
        assert_eq!(errno(server.call(getattr(path))), EINVAL, "{path:?}");
        for op in writing_ops(path, "a") {
            assert_eq!(errno(server.call(op.clone())), EINVAL, "{op:?}");
        }
    }
    assert_eq!(world.snapshot(), before);
}

#[test]
fn a_symlink_to_etc_is_shown_but_never_followed() {
    let world = World::new();
    let shared = world.shared();
    std::os::unix::fs::symlink("/etc", shared.join("etc")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", shared.join("secret")).unwrap();
    std::os::unix::fs::symlink(world.outside(), shared.join("out")).unwrap();
    let server = world.server(false);
    let before = world.snapshot();

    let Reply::Attr(attr) = server.call(getattr("etc")).unwrap() else { panic!() };
    assert_eq!(attr.kind, Kind::Symlink);
    assert_eq!(server.call(Op::Readlink { path: "etc".into() }), Ok(Reply::Target("/etc".into())));
    assert_eq!(server.call(Op::Readlink { path: "secret".into() }), Ok(Reply::Target("../outside/secret".into())));

    assert_eq!(errno(server.call(read("etc/passwd"))), ELOOP);
    assert_eq!(errno(server.call(getattr("etc/passwd"))), ELOOP);
    assert_eq!(errno(server.call(read("out/secret"))), ELOOP);
    assert!(server.call(Op::Readdir { path: "etc".into(), offset: 0 }).is_err());
    assert!(server.call(Op::Readdir { path: "out".into(), offset: 0 }).is_err());
    // A symlink itself is never opened for I/O, so never read through.
    assert_eq!(errno(server.call(read("secret"))), EACCES);
    assert_eq!(errno(server.call(write("secret", b"x"))), EACCES);
    assert_eq!(errno(server.call(Op::Fsync { path: "secret".into() })), EACCES);
    for path in ["out/secret", "out/dir", "out/dir/f", "etc/passwd"] {
        for op in writing_ops(path, "x") {
            assert!(server.call(op.clone()).is_err(), "{op:?}");
        }
    }
    // On the link itself: changing the target's mode or size is refused, times and names are
    // the link's own.
    let chmod = Op::Setattr { path: "secret".into(), mode: Some(0o777), size: None, atime: None, mtime: None };
    assert!(server.call(chmod).is_err());
    let truncate = Op::Setattr { path: "secret".into(), mode: None, size: Some(0), atime: None, mtime: None };
    assert_eq!(errno(server.call(truncate)), EACCES);
    let at = moat_proto::hostfs::SetTime::At(moat_proto::hostfs::Timestamp { secs: 1, nanos: 0 });
    let touch = Op::Setattr { path: "secret".into(), mode: None, size: None, atime: Some(at), mtime: Some(at) };
    let Reply::Attr(attr) = server.call(touch).unwrap() else { panic!() };
    assert_eq!((attr.kind, attr.mtime.secs), (Kind::Symlink, 1));
    server.call(Op::Link { from: "secret".into(), to: "secret2".into() }).unwrap();
    assert_eq!(server.call(Op::Readlink { path: "secret2".into() }), Ok(Reply::Target("../outside/secret".into())));
    server.call(Op::Rename { from: "out".into(), to: "out2".into(), flags: 0 }).unwrap();
    server.call(Op::Unlink { path: "out2".into() }).unwrap();
    assert_eq!(world.snapshot(), before);
}

#[test]
fn a_directory_swapped_for_a_symlink_between_calls_is_not_followed() {
    let world = World::new();
    let shared = world.shared();
    std::fs::create_dir(shared.join("d")).unwrap();
    std::fs::write(shared.join("d/secret"), "inside").unwrap();
    let server = world.server(false);
    assert_eq!(server.call(read("d/secret")), Ok(Reply::Data(b"inside".to_vec())));

    std::fs::rename(shared.join("d"), shared.join("was-d")).unwrap();
    std::os::unix::fs::symlink(world.outside(), shared.join("d")).unwrap();
    let before = world.snapshot();
    assert_eq!(errno(server.call(read("d/secret"))), ELOOP);
    assert_eq!(errno(server.call(getattr("d/secret"))), ELOOP);
    for op in writing_ops("d/secret", "was-d/secret") {
        assert!(server.call(op.clone()).is_err(), "{op:?}");
    }
    assert_eq!(world.snapshot(), before);
}

/// One thread swaps `d` between a directory and a symlink to `outside/` as fast as it can;
/// others read and write `d/secret` through the shared directory meanwhile.
#[test]
fn a_racing_swap_never_reaches_outside() {
    let world = World::new();
    let shared = world.shared();
    std::fs::create_dir(shared.join("d")).unwrap();
    std::fs::write(shared.join("d/secret"), "inside").unwrap();
    std::os::unix::fs::symlink(world.outside(), shared.join("s")).unwrap();
    let server = Arc::new(world.server(false));
    let before = world.snapshot();

    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, shared) = (stop.clone(), shared.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(CWD, shared.join("d"), CWD, shared.join("s"), RenameFlags::EXCHANGE).unwrap();
                flips += 1;
            }
            flips
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || {
                let (mut inside, mut refused) = (0u64, 0u64);
                while (inside < 200 || refused < 200) && Instant::now() < deadline {
                    match server.call(read("d/secret")) {
                        Ok(Reply::Data(data)) => {
                            assert_eq!(data, b"inside", "read something other than the shared file");
                            inside += 1;
                        }
                        Ok(other) => panic!("{other:?}"),
                        Err(_) => refused += 1,
                    }
                    // Rewrites the same bytes: only a write that escaped would change anything.
                    let _ = server.call(write("d/secret", b"inside"));
                    let _ = server.call(getattr("d/secret"));
                }
                (inside, refused)
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    let counts: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    eprintln!("flips {flips}, (inside, refused) per reader {counts:?}");
    // The race really was run: reads both got through and were refused.
    assert!(counts.iter().all(|&(inside, refused)| inside > 0 && refused > 0), "{counts:?}");
    // `d` may end either way round; outside is the same.
    assert_eq!(world.snapshot(), before);
}

#[test]
fn fifos_and_devices_are_never_opened() {
    let world = World::new();
    let shared = world.shared();
    rustix::fs::mknodat(CWD, shared.join("fifo"), FileType::Fifo, Mode::from_bits_truncate(0o666), 0).unwrap();
    let device = if support::is_root() {
        // /dev/zero: reading it through the mount would answer zeros.
        let dev = rustix::fs::makedev(1, 5);
        rustix::fs::mknodat(CWD, shared.join("zero"), FileType::CharacterDevice, Mode::from_bits_truncate(0o666), dev)
            .unwrap();
        true
    } else {
        eprintln!("device part skipped: mknod of a device needs root");
        false
    };
    let server = Arc::new(world.server(false));
    let mut names = vec!["fifo"];
    if device {
        names.push("zero");
    }
    // Opening a fifo for reading would wait for a writer forever: run the calls aside.
    let (tx, rx) = std::sync::mpsc::channel();
    let calls = {
        let server = server.clone();
        let names = names.clone();
        std::thread::spawn(move || {
            for name in names {
                let size = Op::Setattr { path: name.into(), mode: None, size: Some(0), atime: None, mtime: None };
                let results = vec![
                    server.call(read(name)),
                    server.call(write(name, b"x")),
                    server.call(Op::Write { path: name.into(), offset: 0, append: true, data: b"x".to_vec() }),
                    server.call(size),
                    server.call(Op::Fsync { path: name.into() }),
                    server.call(Op::Create { path: name.into(), mode: 0o644, exclusive: false }),
                ];
                tx.send((name, results)).unwrap();
            }
        })
    };
    for _ in &names {
        let (name, results) = rx.recv_timeout(Duration::from_secs(30)).expect("calls on a fifo or device hung");
        let errnos: Vec<_> = results.into_iter().map(errno).collect();
        assert_eq!(errnos, [EACCES, EACCES, EACCES, EACCES, EACCES, EEXIST], "{name}");
        let Reply::Attr(attr) = server.call(getattr(name)).unwrap() else { panic!() };
        assert_eq!(attr.kind, Kind::Other);
    }
    calls.join().unwrap();
    let Reply::Entries { entries, end: true } = server.call(Op::Readdir { path: String::new(), offset: 0 }).unwrap()
    else {
        panic!()
    };
    assert!(entries.iter().all(|e| e.kind == Kind::Other), "{entries:?}");
    assert_eq!(errno(server.call(Op::Readdir { path: "fifo".into(), offset: 0 })), libc::ENOTDIR);
}

/// A hard link inside the directory to a file only root may read, with the directory owned by
/// `nobody`: a daemon running as root must not read it for the guest.
#[test]
fn a_hard_link_to_a_root_only_file_stays_unreadable() {
    if !support::is_root() {
        eprintln!("skipped: needs root to make a root-only file and a directory of another user");
        return;
    }
    let world = World::new();
    let (shared, outside) = (world.shared(), world.outside());
    let shadow = outside.join("shadow");
    std::fs::write(&shadow, "ROOT ONLY").unwrap();
    std::fs::set_permissions(&shadow, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(&shadow, shared.join("shadow")).unwrap();
    std::fs::write(shared.join("mine"), "mine").unwrap();
    std::fs::set_permissions(shared.join("mine"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::create_dir(shared.join("root-only")).unwrap();
    std::fs::set_permissions(shared.join("root-only"), std::fs::Permissions::from_mode(0o700)).unwrap();
    for path in [&shared, &shared.join("mine")] {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let server = world.server(false);
    assert_eq!(server.owner(), (NOBODY, NOBODY));
    let before = world.snapshot();

    assert_eq!(server.call(read("mine")), Ok(Reply::Data(b"mine".to_vec())));
    assert_eq!(errno(server.call(read("shadow"))), EACCES);
    assert_eq!(errno(server.call(write("shadow", b"x"))), EACCES);
    assert_eq!(errno(server.call(Op::Readdir { path: "root-only".into(), offset: 0 })), EACCES);
    let chmod = Op::Setattr { path: "shadow".into(), mode: Some(0o644), size: None, atime: None, mtime: None };
    assert_eq!(errno(server.call(chmod)), EPERM);
    let truncate = Op::Setattr { path: "shadow".into(), mode: None, size: Some(0), atime: None, mtime: None };
    assert_eq!(errno(server.call(truncate)), EACCES);
    // protected_hardlinks: no new link to a file the owner can neither read nor write.
    assert!(server.call(Op::Link { from: "shadow".into(), to: "shadow2".into() }).is_err());

    // Owners as the guest sees them: the directory's owner is the guest user, root is nobody.
    let Reply::Attr(mine) = server.call(getattr("mine")).unwrap() else { panic!() };
    assert_eq!((mine.uid, mine.gid), (GUEST, GUEST));
    let Reply::Attr(theirs) = server.call(getattr("shadow")).unwrap() else { panic!() };
    assert_eq!((theirs.uid, theirs.gid), (NOBODY, NOBODY));
    assert_eq!(std::fs::read(&shadow).unwrap(), b"ROOT ONLY");
    assert_eq!(world.snapshot(), before);

    // What the guest makes belongs to the directory's owner on the host.
    server.call(Op::Create { path: "new".into(), mode: 0o644, exclusive: true }).unwrap();
    server.call(Op::Mkdir { path: "newdir".into(), mode: 0o755 }).unwrap();
    for name in ["new", "newdir"] {
        let meta = std::fs::metadata(shared.join(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "{name}");
    }
}

#[test]
fn a_readonly_mount_refuses_every_write() {
    let world = World::new();
    let shared = world.shared();
    std::fs::create_dir(shared.join("d")).unwrap();
    std::fs::write(shared.join("f"), "data").unwrap();
    let server = world.server(true);
    let before = (world.snapshot(), tree(&shared));
    for (path, other) in [("f", "d"), ("d", "f"), ("", "f"), ("missing", "f")] {
        for op in writing_ops(path, other) {
            assert_eq!(errno(server.call(op.clone())), EROFS, "{op:?}");
        }
    }
    assert_eq!((world.snapshot(), tree(&shared)), before);
    // Reading goes on.
    assert_eq!(server.call(read("f")), Ok(Reply::Data(b"data".to_vec())));
    assert!(server.call(Op::Readdir { path: String::new(), offset: 0 }).is_ok());
    assert!(server.call(Op::Statfs).is_ok());
    assert!(server.call(Op::Fsync { path: "f".into() }).is_ok());
}

/// Every file beneath `dir` with its metadata and contents.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        out.push(format!(
            "{path:?} {:o} {} {:?}",
            meta.mode(),
            meta.mtime_nsec(),
            meta.is_file().then(|| std::fs::read(&path).unwrap())
        ));
        if meta.is_dir() {
            out.extend(tree(&path));
        }
    }
    out.sort();
    out
}

/// A bind mount beneath the shared directory (of a directory and of a file from outside) is
/// never crossed. Made in a mount namespace of the test's own thread, so nothing is left behind.
#[test]
fn a_bind_mount_inside_is_not_crossed() {
    let world = World::new();
    let (shared, outside) = (world.shared(), world.outside());
    std::fs::create_dir(shared.join("mnt")).unwrap();
    std::fs::write(shared.join("file"), "inside").unwrap();
    let before = world.snapshot();
    // The world comes back to be removed here, where its mounts are not.
    let _world = std::thread::spawn(move || {
        use rustix::mount::{mount_bind, mount_change, MountPropagationFlags};
        let mounted = rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)
            .and_then(|()| mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC))
            .and_then(|()| mount_bind(&outside, shared.join("mnt")))
            .and_then(|()| mount_bind(outside.join("secret"), shared.join("file")));
        if let Err(e) = mounted {
            eprintln!("skipped: cannot bind-mount in a mount namespace of our own ({e})");
            return world;
        }
        // Opened after the mounts, in this namespace, as the daemon would see them.
        let server = world.server(false);

        assert_eq!(errno(server.call(getattr("mnt"))), EACCES);
        assert_eq!(errno(server.call(getattr("mnt/secret"))), EACCES);
        assert_eq!(errno(server.call(read("mnt/secret"))), EACCES);
        assert_eq!(errno(server.call(Op::Readdir { path: "mnt".into(), offset: 0 })), EACCES);
        assert_eq!(errno(server.call(read("file"))), EACCES);
        assert_eq!(errno(server.call(write("file", b"x"))), EACCES);
        for op in writing_ops("mnt/secret", "x").into_iter().chain(writing_ops("mnt/dir", "x")) {
            assert_eq!(errno(server.call(op.clone())), EACCES, "{op:?}");
        }
        assert_eq!(errno(server.call(Op::Link { from: "file".into(), to: "file2".into() })), EXDEV);
        assert_eq!(errno(server.call(Op::Unlink { path: "file".into() })), EBUSY);
        assert_eq!(errno(server.call(Op::Rmdir { path: "mnt".into() })), EBUSY);
        assert!(server.call(Op::Rename { from: "mnt".into(), to: "m2".into(), flags: 0 }).is_err());
        // Still listed: the name is the directory's.
        let Reply::Entries { entries, .. } = server.call(Op::Readdir { path: String::new(), offset: 0 }).unwrap()
        else {
            panic!()
        };
        assert!(entries.iter().any(|e| e.name == "mnt"));
        assert_eq!(world.snapshot(), before);
        world
    })
    .join()
    .unwrap();
}

#[test]
fn oversized_writes_paths_and_targets_are_refused() {
    let world = World::new();
    std::fs::write(world.shared().join("big"), vec![7u8; 3 * MAX_IO as usize]).unwrap();
    let server = world.server(false);
    let big = Op::Write { path: "big".into(), offset: 0, append: false, data: vec![0; MAX_IO as usize + 1] };
    assert_eq!(errno(server.call(big)), EINVAL);
    let Reply::Data(data) = server.call(Op::Read { path: "big".into(), offset: 0, size: u32::MAX }).unwrap() else {
        panic!()
    };
    assert_eq!(data.len(), MAX_IO as usize);
    assert_eq!(errno(server.call(getattr(&"a/".repeat(MAX_PATH / 2 + 1)))), ENAMETOOLONG);
    assert_eq!(errno(server.call(getattr(&"x".repeat(256)))), ENAMETOOLONG);
    let long = Op::Symlink { path: "l".into(), target: "t".repeat(MAX_PATH + 1) };
    assert_eq!(errno(server.call(long)), ENAMETOOLONG);
    assert_eq!(errno(server.call(Op::Symlink { path: "l".into(), target: String::new() })), ENOENT);
    assert_eq!(errno(server.call(Op::Symlink { path: "l".into(), target: "a\0b".into() })), EINVAL);
    let far = Op::Write { path: "big".into(), offset: u64::MAX, append: false, data: vec![1] };
    assert!(server.call(far).is_err());
    let far = server.call(Op::Read { path: "big".into(), offset: u64::MAX, size: 10 });
    assert!(far.is_err() || far == Ok(Reply::Data(Vec::new())), "{far:?}");
    let when = moat_proto::hostfs::Timestamp { secs: 0, nanos: 1_000_000_000 };
    let bad_time = Op::Setattr {
        path: "big".into(),
        mode: None,
        size: None,
        atime: None,
        mtime: Some(moat_proto::hostfs::SetTime::At(when)),
    };
    assert_eq!(errno(server.call(bad_time)), EINVAL);
}

#[test]
fn calls_on_the_root_itself_are_answered_sensibly() {
    let world = World::new();
    let server = world.server(false);
    let Reply::Attr(attr) = server.call(getattr("")).unwrap() else { panic!() };
    assert_eq!((attr.kind, attr.uid), (Kind::Dir, GUEST));
    assert_eq!(errno(server.call(read(""))), libc::EISDIR);
    assert_eq!(errno(server.call(Op::Unlink { path: String::new() })), EBUSY);
    assert_eq!(errno(server.call(Op::Rmdir { path: String::new() })), EBUSY);
    assert_eq!(errno(server.call(Op::Mkdir { path: String::new(), mode: 0o755 })), EEXIST);
    assert_eq!(errno(server.call(Op::Create { path: String::new(), mode: 0o644, exclusive: true })), EEXIST);
    assert_eq!(errno(server.call(Op::Rename { from: String::new(), to: "x".into(), flags: 0 })), EBUSY);
    assert_eq!(errno(server.call(Op::Link { from: String::new(), to: "x".into() })), EPERM);
}

#[test]
fn a_directory_is_listed_in_pages() {
    let world = World::new();
    let count = 2 * MAX_DIR_ENTRIES as usize + 88;
    for i in 0..count {
        std::fs::write(world.shared().join(format!("f{i}")), "").unwrap();
    }
    let server = world.server(false);
    let mut names = Vec::new();
    let mut pages = Vec::new();
    loop {
        let op = Op::Readdir { path: String::new(), offset: names.len() as u64 };
        let Reply::Entries { entries, end } = server.call(op).unwrap() else { panic!() };
        pages.push(entries.len());
        names.extend(entries.into_iter().map(|e| e.name));
        if end {
            break;
        }
    }
    assert_eq!(pages, [MAX_DIR_ENTRIES as usize, MAX_DIR_ENTRIES as usize, 88]);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count);
    let past = Op::Readdir { path: String::new(), offset: u64::MAX };
    assert_eq!(server.call(past), Ok(Reply::Entries { entries: vec![], end: true }));
}

#[test]
fn rename_takes_only_noreplace_and_exchange() {
    let world = World::new();
    std::fs::write(world.shared().join("a"), "a").unwrap();
    std::fs::write(world.shared().join("b"), "b").unwrap();
    let server = world.server(false);
    let rename = |flags| Op::Rename { from: "a".into(), to: "b".into(), flags };
    for flags in [3, 4, 8, 1 << 31] {
        assert_eq!(errno(server.call(rename(flags))), EINVAL, "{flags}");
    }
    assert_eq!(errno(server.call(rename(1))), EEXIST);
    assert_eq!(server.call(rename(2)), Ok(Reply::Done));
    assert_eq!(std::fs::read(world.shared().join("a")).unwrap(), b"b");
    assert_eq!(server.call(rename(0)), Ok(Reply::Done));
    assert_eq!(std::fs::read(world.shared().join("b")).unwrap(), b"b");
}

#[test]
fn a_guest_cannot_leave_a_set_user_id_program() {
    let world = World::new();
    let server = world.server(false);
    let Reply::Attr(attr) = server.call(Op::Create { path: "p".into(), mode: 0o4755, exclusive: true }).unwrap() else {
        panic!()
    };
    assert_eq!(attr.perm, 0o755);
    let chmod = Op::Setattr { path: "p".into(), mode: Some(0o6755), size: None, atime: None, mtime: None };
    let Reply::Attr(attr) = server.call(chmod).unwrap() else { panic!() };
    assert_eq!(attr.perm, 0o755);
    assert_eq!(std::fs::metadata(world.shared().join("p")).unwrap().mode() & 0o7777, 0o755);
}

/// The calls a guest makes in earnest, one after another.
#[test]
fn a_guest_works_in_the_directory() {
    let world = World::new();
    let server = world.server(false);
    let attr = |r: Result<Reply, i32>| match r {
        Ok(Reply::Attr(a)) => a,
        other => panic!("{other:?}"),
    };
    let created = attr(server.call(Op::Create { path: "f".into(), mode: 0o640, exclusive: true }));
    assert_eq!((created.kind, created.perm, created.size), (Kind::File, 0o640, 0));
    assert_eq!(errno(server.call(Op::Create { path: "f".into(), mode: 0o640, exclusive: true })), EEXIST);
    assert_eq!(attr(server.call(Op::Create { path: "f".into(), mode: 0o600, exclusive: false })).ino, created.ino);
    assert_eq!(server.call(write("f", b"hello world")), Ok(Reply::Written(11)));
    let append = Op::Write { path: "f".into(), offset: 0, append: true, data: b"!".to_vec() };
    assert_eq!(server.call(append), Ok(Reply::Written(1)));
    let part = Op::Read { path: "f".into(), offset: 6, size: 100 };
    assert_eq!(server.call(part), Ok(Reply::Data(b"world!".to_vec())));
    let truncate = Op::Setattr { path: "f".into(), mode: Some(0o600), size: Some(5), atime: None, mtime: None };
    let a = attr(server.call(truncate));
    assert_eq!((a.size, a.perm), (5, 0o600));
    let dir = attr(server.call(Op::Mkdir { path: "d".into(), mode: 0o777 }));
    assert_eq!((dir.kind, dir.perm), (Kind::Dir, 0o777));
    assert_eq!(errno(server.call(Op::Mkdir { path: "d".into(), mode: 0o777 })), EEXIST);
    let link = attr(server.call(Op::Symlink { path: "d/l".into(), target: "../f".into() }));
    assert_eq!(link.kind, Kind::Symlink);
    assert_eq!(server.call(Op::Readlink { path: "d/l".into() }), Ok(Reply::Target("../f".into())));
    assert_eq!(errno(server.call(Op::Readlink { path: "f".into() })), EINVAL);
    let hard = attr(server.call(Op::Link { from: "f".into(), to: "d/h".into() }));
    assert_eq!((hard.ino, hard.nlink), (created.ino, 2));
    assert_eq!(server.call(Op::Rename { from: "d/h".into(), to: "g".into(), flags: 0 }), Ok(Reply::Done));
    assert_eq!(server.call(Op::Fsync { path: "g".into() }), Ok(Reply::Done));
    assert_eq!(server.call(Op::Fsync { path: "d".into() }), Ok(Reply::Done));
    let Reply::Entries { mut entries, end: true } =
        server.call(Op::Readdir { path: String::new(), offset: 0 }).unwrap()
    else {
        panic!()
    };
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let listed: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(listed, [("d", Kind::Dir), ("f", Kind::File), ("g", Kind::File)]);
    assert_eq!(errno(server.call(Op::Rmdir { path: "d".into() })), libc::ENOTEMPTY);
    assert_eq!(server.call(Op::Unlink { path: "d/l".into() }), Ok(Reply::Done));
    assert_eq!(server.call(Op::Rmdir { path: "d".into() }), Ok(Reply::Done));
    assert_eq!(errno(server.call(getattr("d"))), ENOENT);
    let Reply::Statfs(st) = server.call(Op::Statfs).unwrap() else { panic!() };
    assert!(st.bsize > 0 && st.namelen >= 255, "{st:?}");
}
