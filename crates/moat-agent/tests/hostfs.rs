//! Host directory mounts served by the agent on this machine: a real FUSE mount (it needs root
//! and /dev/fuse) whose calls a small stand-in for the host answers from a temp directory with
//! plain std::fs code. The stand-in is the test double here; the agent, its link, the FUSE
//! session and the kernel are the real ones.
#![allow(clippy::print_stderr)] // says why a test is skipped

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moat_agent::{Agent, LinkEnd, Mode, Reaper, Scope};
use moat_proto::hostfs::{
    encode, Answer, Attr, Call, Decoder, DirEntry, Kind, Op, Reply, SetTime, Statfs, Timestamp, MAX_DIR_ENTRIES,
};
use moat_proto::{
    read_frame, read_until_sync, write_frame, ErrorCode, Frame, HostHello, Message, Request, Started, Stream,
    CONTROL_CHANNEL, INITIAL_WINDOW, MAX_CHUNK, PROTOCOL_VERSION,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// The host end of one connection to `agent`.
struct Link {
    frames: mpsc::UnboundedReceiver<Frame>,
    w: OwnedWriteHalf,
    _served: JoinHandle<LinkEnd>,
}

impl Link {
    async fn connect(agent: &Agent) -> Link {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = agent.clone();
        let served = tokio::spawn(async move { agent.serve(guest).await });
        let (r, mut w) = host.into_split();
        let hello =
            HostHello { version: PROTOCOL_VERSION, nonce: 7, time_unix_ns: 1, entropy: vec![1; 32], identity: None };
        write_frame(&mut w, &Frame::new(CONTROL_CHANNEL, Message::Hello(hello))).await.unwrap();
        let mut r = BufReader::new(r);
        read_until_sync(&mut r, 1 << 20).await.unwrap();
        assert!(matches!(read_frame(&mut r).await.unwrap().message, Message::HelloAck(_)));
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(f) = read_frame(&mut r).await {
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        Link { frames, w, _served: served }
    }

    async fn send(&mut self, channel: u32, message: Message) {
        write_frame(&mut self.w, &Frame::new(channel, message)).await.unwrap();
        self.w.flush().await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.frames.recv()).await.expect("the agent answers in time").expect("link open")
    }

    /// Ask for the mount and expect it to start.
    async fn open_mount(&mut self, channel: u32, at: &Path, readonly: bool) {
        let path = at.to_str().unwrap().to_string();
        self.send(channel, Message::Request(Request::HostMount { path, readonly })).await;
        let f = self.next().await;
        assert_eq!(f, Frame::new(channel, Message::Started(Started::Stream)));
    }
}

/// The stand-in host: answers the calls of `channel` from `root` until the channel closes.
/// Every call is reported on `seen`; while `hold` is set, calls get no answer.
async fn host_loop(
    mut link: Link,
    channel: u32,
    root: PathBuf,
    seen: mpsc::UnboundedSender<Op>,
    hold: Arc<AtomicBool>,
) -> Link {
    let mut calls = Decoder::default();
    let mut answers: Vec<u8> = Vec::new();
    let mut credit = INITIAL_WINDOW as usize;
    loop {
        while !answers.is_empty() && credit > 0 {
            let n = answers.len().min(MAX_CHUNK).min(credit);
            let data: Vec<u8> = answers.drain(..n).collect();
            link.send(channel, Message::Data { stream: Stream::Stdin, data }).await;
            credit -= n;
        }
        let Some(f) = link.frames.recv().await else { return link };
        if f.channel != channel {
            continue;
        }
        match f.message {
            Message::Data { stream: Stream::Stdout, data } => {
                calls.push(&data);
                link.send(channel, Message::Credit { stream: Stream::Stdout, bytes: data.len() as u32 }).await;
                while let Some(call) = calls.next::<Call>().expect("the agent sends whole calls") {
                    let _ = seen.send(call.op.clone());
                    if !hold.load(Ordering::SeqCst) {
                        let root = root.clone();
                        let result = tokio::task::spawn_blocking(move || answer(&root, call.op)).await.unwrap();
                        encode(&Answer { id: call.id, result }, &mut answers);
                    }
                }
            }
            Message::Credit { stream: Stream::Stdin, bytes } => credit += bytes as usize,
            Message::Close => return link,
            _ => {}
        }
    }
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
}

fn attr(p: &Path) -> Result<Reply, i32> {
    let m = fs::symlink_metadata(p).map_err(errno)?;
    let t = m.file_type();
    let kind = if t.is_file() {
        Kind::File
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    Ok(Reply::Attr(Attr {
        ino: m.ino(),
        kind,
        perm: m.mode() & 0o7777,
        size: m.size(),
        blocks: m.blocks(),
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        atime: ts(m.accessed().unwrap()),
        mtime: ts(m.modified().unwrap()),
        ctime: Timestamp { secs: m.ctime(), nanos: m.ctime_nsec() as u32 },
    }))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(rc: libc::c_int) -> Result<(), i32> {
    if rc == 0 {
        Ok(())
    } else {
        Err(errno(std::io::Error::last_os_error()))
    }
}

/// What a host answers, done the simple way (no symlink safety: this is a test double).
fn answer(root: &Path, op: Op) -> Result<Reply, i32> {
    let at = |rel: &str| if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
    match op {
        Op::Getattr { path } => attr(&at(&path)),
        Op::Setattr { path, mode, size, atime, mtime } => {
            let p = at(&path);
            if let Some(mode) = mode {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(errno)?;
            }
            if let Some(size) = size {
                fs::OpenOptions::new().write(true).open(&p).and_then(|f| f.set_len(size)).map_err(errno)?;
            }
            if atime.is_some() || mtime.is_some() {
                let spec = |t: Option<SetTime>| match t {
                    None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                    Some(SetTime::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
                    Some(SetTime::At(t)) => libc::timespec { tv_sec: t.secs, tv_nsec: t.nanos.into() },
                };
                let times = [spec(atime), spec(mtime)];
                // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
                check(unsafe { libc::utimensat(libc::AT_FDCWD, cpath(&p).as_ptr(), times.as_ptr(), 0) })?;
            }
            attr(&p)
        }
        Op::Readlink { path } => {
            let t = fs::read_link(at(&path)).map_err(errno)?;
            Ok(Reply::Target(t.to_str().ok_or(libc::EIO)?.to_string()))
        }
        Op::Readdir { path, offset } => {
            let mut names: Vec<(String, u64, Kind)> = fs::read_dir(at(&path))
                .map_err(errno)?
                .map(|e| {
                    let e = e.unwrap();
                    let t = e.file_type().unwrap();
                    let kind = if t.is_dir() {
                        Kind::Dir
                    } else if t.is_symlink() {
                        Kind::Symlink
                    } else {
                        Kind::File
                    };
                    (e.file_name().into_string().unwrap(), e.ino(), kind)
                })
                .collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            let rest: Vec<DirEntry> =
                names.into_iter().skip(offset as usize).map(|(name, ino, kind)| DirEntry { name, ino, kind }).collect();
            let end = rest.len() <= MAX_DIR_ENTRIES as usize;
            Ok(Reply::Entries { entries: rest.into_iter().take(MAX_DIR_ENTRIES as usize).collect(), end })
        }
        Op::Create { path, mode, exclusive } => {
            let p = at(&path);
            let mut o = fs::OpenOptions::new();
            o.write(true).mode(mode);
            if exclusive {
                o.create_new(true);
            } else {
                o.create(true);
            }
            o.open(&p).map_err(errno)?;
            attr(&p)
        }
        Op::Mkdir { path, mode } => {
            fs::DirBuilder::new().mode(mode).create(at(&path)).map_err(errno)?;
            attr(&at(&path))
        }
        Op::Symlink { path, target } => {
            std::os::unix::fs::symlink(target, at(&path)).map_err(errno)?;
            attr(&at(&path))
        }
        Op::Link { from, to } => {
            fs::hard_link(at(&from), at(&to)).map_err(errno)?;
            attr(&at(&to))
        }
        Op::Unlink { path } => fs::remove_file(at(&path)).map(|()| Reply::Done).map_err(errno),
        Op::Rmdir { path } => fs::remove_dir(at(&path)).map(|()| Reply::Done).map_err(errno),
        Op::Rename { from, to, flags } => {
            let (from, to) = (cpath(&at(&from)), cpath(&at(&to)));
            // SAFETY: two NUL-terminated paths that outlive the call.
            check(unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) })?;
            Ok(Reply::Done)
        }
        Op::Read { path, offset, size } => {
            let f = fs::File::open(at(&path)).map_err(errno)?;
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64).map_err(errno)? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            Ok(Reply::Data(buf))
        }
        Op::Write { path, offset, append, data } => {
            let mut f = fs::OpenOptions::new().write(true).append(append).open(at(&path)).map_err(errno)?;
            if append {
                f.write_all(&data).map_err(errno)?;
            } else {
                f.write_all_at(&data, offset).map_err(errno)?;
            }
            Ok(Reply::Written(data.len() as u32))
        }
        Op::Fsync { path } => fs::File::open(at(&path)).and_then(|f| f.sync_all()).map(|()| Reply::Done).map_err(errno),
        Op::Statfs => {
            // SAFETY: statvfs is plain old data, for which all zeroes is a valid value.
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: statvfs fills the struct it is given; the path outlives the call.
            check(unsafe { libc::statvfs(cpath(root).as_ptr(), &mut s) })?;
            Ok(Reply::Statfs(Statfs {
                blocks: s.f_blocks,
                bfree: s.f_bfree,
                bavail: s.f_bavail,
                files: s.f_files,
                ffree: s.f_ffree,
                bsize: s.f_bsize as u32,
                namelen: s.f_namemax as u32,
            }))
        }
    }
}

/// Whether this machine lets a test mount FUSE (root and /dev/fuse).
fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !(root && Path::new("/dev/fuse").exists()) {
        eprintln!("skipped: mounting FUSE needs root and /dev/fuse");
        return false;
    }
    true
}

/// Unmounts at the end of a test, passed or failed. MNT_FORCE aborts the FUSE connection
/// first, so a thread of this process stuck in a call fails instead of blocking its exit.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let p = cpath(&self.0);
        // SAFETY: a NUL-terminated path that outlives the calls; failures are fine.
        unsafe {
            libc::umount2(p.as_ptr(), libc::MNT_FORCE);
            libc::umount2(p.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Run file work off the runtime (the agent serving the mount runs on it) and in time.
async fn guest<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::time::timeout(WAIT, tokio::task::spawn_blocking(work)).await.expect("the mount answers in time").unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    host: PathBuf,
    mnt: PathBuf,
    agent: Agent,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (host, mnt) = (dir.path().join("host"), dir.path().join("mnt"));
    fs::create_dir(&host).unwrap();
    fs::write(host.join("hello.txt"), "hi\n").unwrap();
    let agent = Agent::new(Reaper::start(Scope::Registered).unwrap(), Mode::Host);
    Setup { _dir: dir, host, mnt, agent }
}

fn raw(e: std::io::Error) -> Option<i32> {
    e.raw_os_error()
}

#[tokio::test]
async fn a_host_directory_is_read_and_written_through_the_mount() {
    if !fuse_available() {
        return;
    }
    let s = setup();
    let (host, mnt) = (s.host.clone(), s.mnt.clone());
    fs::create_dir_all(host.join("dir/nested")).unwrap();
    fs::write(host.join("dir/nested/deep.txt"), "deep").unwrap();
    fs::create_dir(host.join("many")).unwrap();
    for i in 0..300 {
        fs::write(host.join(format!("many/f{i:03}")), "").unwrap();
    }
    let mut link = Link::connect(&s.agent).await;
    link.open_mount(1, &mnt, false).await;
    let _unmount = Unmount(mnt.clone());
    let (seen, _calls) = mpsc::unbounded_channel();
    let _host = tokio::spawn(host_loop(link, 1, host.clone(), seen, Arc::default()));

    let (h, m) = (host.clone(), mnt.clone());
    guest(move || {
        assert_eq!(fs::read_to_string(m.join("hello.txt")).unwrap(), "hi\n");
        assert_eq!(raw(fs::read(m.join("missing")).unwrap_err()), Some(libc::ENOENT));

        // Larger than one call, one frame and one window of credit.
        let big: Vec<u8> = (0..(INITIAL_WINDOW as usize + 3 * 100_000 + 7)).map(|i| (i % 253) as u8).collect();
        fs::write(m.join("big.bin"), &big).unwrap();
        assert!(fs::read(h.join("big.bin")).unwrap() == big, "the host got every byte");
        assert!(fs::read(m.join("big.bin")).unwrap() == big, "and the guest reads them back");
        let mut f = fs::File::open(m.join("big.bin")).unwrap();
        f.seek(std::io::SeekFrom::Start(1_000_000)).unwrap();
        let mut part = [0u8; 10];
        f.read_exact(&mut part).unwrap();
        assert_eq!(&part[..], &big[1_000_000..1_000_010]);

        let mut log = fs::OpenOptions::new().create(true).append(true).open(m.join("log")).unwrap();
        log.write_all(b"one\n").unwrap();
        log.write_all(b"two\n").unwrap();
        assert_eq!(fs::read_to_string(h.join("log")).unwrap(), "one\ntwo\n");

        // Listings page through the host's answers, with . and ..
        let mut names: Vec<String> =
            fs::read_dir(m.join("many")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names.len(), 300);
        assert_eq!((names[0].as_str(), names[299].as_str()), ("f000", "f299"));
        let ls = std::process::Command::new("ls").arg("-a").arg(m.join("dir")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&ls.stdout), ".\n..\nnested\n");

        // A file opened before its directory is renamed keeps working under the new path.
        let mut open = fs::File::open(m.join("dir/nested/deep.txt")).unwrap();
        fs::rename(m.join("dir"), m.join("moved")).unwrap();
        assert!(!h.join("dir").exists() && h.join("moved/nested/deep.txt").exists());
        let mut text = String::new();
        open.read_to_string(&mut text).unwrap();
        assert_eq!(text, "deep");
        fs::write(m.join("moved/nested/new.txt"), "n").unwrap();
        assert_eq!(fs::read_to_string(h.join("moved/nested/new.txt")).unwrap(), "n");
        assert_eq!(raw(fs::metadata(m.join("dir/nested")).unwrap_err()), Some(libc::ENOENT));

        // Attributes.
        fs::set_permissions(m.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(fs::metadata(h.join("hello.txt")).unwrap().mode() & 0o7777, 0o640);
        let f = fs::OpenOptions::new().write(true).open(m.join("big.bin")).unwrap();
        f.set_len(10).unwrap();
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
        f.set_modified(when).unwrap();
        let hm = fs::metadata(h.join("big.bin")).unwrap();
        assert_eq!((hm.len(), hm.modified().unwrap()), (10, when));
        let gm = fs::metadata(m.join("big.bin")).unwrap();
        assert_eq!((gm.len(), gm.modified().unwrap(), gm.uid()), (10, when, hm.uid()));
        std::os::unix::fs::chown(m.join("hello.txt"), Some(hm.uid()), Some(hm.gid())).expect("an unchanged owner");
        let e = std::os::unix::fs::chown(m.join("hello.txt"), Some(hm.uid() + 4242), None).unwrap_err();
        assert_eq!(raw(e), Some(libc::EPERM));

        // Links, directories, removal and their errors.
        std::os::unix::fs::symlink("hello.txt", m.join("link")).unwrap();
        assert_eq!(fs::read_link(h.join("link")).unwrap(), Path::new("hello.txt"));
        assert_eq!(fs::read_link(m.join("link")).unwrap(), Path::new("hello.txt"));
        assert_eq!(fs::read_to_string(m.join("link")).unwrap(), "hi\n");
        fs::hard_link(m.join("hello.txt"), m.join("hard")).unwrap();
        assert_eq!(fs::metadata(h.join("hello.txt")).unwrap().nlink(), 2);
        fs::remove_file(m.join("hard")).unwrap();
        assert!(!h.join("hard").exists());
        fs::create_dir(m.join("empty")).unwrap();
        assert!(fs::metadata(h.join("empty")).unwrap().is_dir());
        assert_eq!(raw(fs::remove_dir(m.join("moved")).unwrap_err()), Some(libc::ENOTEMPTY));
        fs::remove_dir(m.join("empty")).unwrap();
        assert!(!h.join("empty").exists());
        let exists = fs::OpenOptions::new().write(true).create_new(true).open(m.join("hello.txt")).unwrap_err();
        assert_eq!(raw(exists), Some(libc::EEXIST));
        let fifo = cpath(&m.join("fifo"));
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(check(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }), Err(libc::EPERM));

        // renameat2's flags reach the host.
        fs::write(m.join("a"), "A").unwrap();
        fs::write(m.join("b"), "B").unwrap();
        let (a, b) = (cpath(&m.join("a")), cpath(&m.join("b")));
        let rename2 = |flags| {
            // SAFETY: two NUL-terminated paths that outlive the call.
            check(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) })
        };
        assert_eq!(rename2(libc::RENAME_NOREPLACE), Err(libc::EEXIST));
        rename2(libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(fs::read_to_string(h.join("a")).unwrap(), "B");
        assert_eq!(fs::read_to_string(m.join("b")).unwrap(), "A");

        // The file system's numbers are the host's.
        // SAFETY: statvfs is plain old data, for which all zeroes is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs fills the struct it is given; the path outlives the call.
        check(unsafe { libc::statvfs(cpath(&m).as_ptr(), &mut st) }).unwrap();
        assert!(st.f_blocks > 0 && st.f_bsize > 0);

        // Programs run from the mount (exec maps the file privately).
        fs::copy("/bin/true", m.join("true")).unwrap();
        let status = std::process::Command::new(m.join("true")).status().unwrap();
        assert!(status.success());

        // No page cache: what the host writes is read at once.
        fs::write(h.join("hello.txt"), "changed on the host\n").unwrap();
        assert_eq!(fs::read_to_string(m.join("hello.txt")).unwrap(), "changed on the host\n");
    })
    .await;
}

#[tokio::test]
async fn waiting_calls_are_sent_again_to_the_next_channel() {
    if !fuse_available() {
        return;
    }
    let s = setup();
    let (host, mnt) = (s.host.clone(), s.mnt.clone());
    let mut link = Link::connect(&s.agent).await;
    link.open_mount(1, &mnt, false).await;
    let _unmount = Unmount(mnt.clone());
    let (seen, mut calls) = mpsc::unbounded_channel();
    let hold = Arc::new(AtomicBool::new(false));
    let first = tokio::spawn(host_loop(link, 1, host.clone(), seen, hold.clone()));
    let m = mnt.clone();
    guest(move || assert_eq!(fs::read_to_string(m.join("hello.txt")).unwrap(), "hi\n")).await;

    // The host takes the read's first call and goes away without answering it (a daemon
    // restart, or a snapshot taken at this moment and restored later).
    hold.store(true, Ordering::SeqCst);
    while calls.try_recv().is_ok() {}
    let m = mnt.clone();
    let reading = tokio::task::spawn_blocking(move || fs::read_to_string(m.join("hello.txt")));
    let held = tokio::time::timeout(WAIT, calls.recv()).await.expect("the read reaches the host").unwrap();
    first.abort();
    let _ = first.await;
    assert!(!reading.is_finished(), "the read waits while no host is there");

    // A new connection takes the mount over, read-only this time, and answers the read.
    let mut link = Link::connect(&s.agent).await;
    link.open_mount(1, &mnt, true).await;
    let (seen, mut calls) = mpsc::unbounded_channel();
    let _second = tokio::spawn(host_loop(link, 1, host.clone(), seen, Arc::default()));
    let text = tokio::time::timeout(WAIT, reading).await.expect("the read is answered").unwrap();
    assert_eq!(text.unwrap(), "hi\n");
    let first_call = calls.try_recv().expect("the new host got calls");
    assert_eq!(first_call, held, "the call held by the host before is sent again, first");
    let m = mnt.clone();
    let write = guest(move || fs::write(m.join("new.txt"), "x")).await;
    assert_eq!(raw(write.unwrap_err()), Some(libc::EROFS));
}

#[tokio::test]
async fn at_most_64_calls_wait_for_the_host_and_the_rest_follow() {
    if !fuse_available() {
        return;
    }
    let s = setup();
    let (host, mnt) = (s.host.clone(), s.mnt.clone());
    for i in 0..100 {
        fs::write(host.join(format!("f{i}")), format!("{i}")).unwrap();
    }
    let mut link = Link::connect(&s.agent).await;
    link.open_mount(1, &mnt, false).await;
    let _unmount = Unmount(mnt.clone());
    let (seen, mut calls) = mpsc::unbounded_channel();
    let first = tokio::spawn(host_loop(link, 1, host.clone(), seen, Arc::new(AtomicBool::new(true))));
    let readers: Vec<_> = (0..100)
        .map(|i| {
            let p = mnt.join(format!("f{i}"));
            tokio::task::spawn_blocking(move || (i, fs::read_to_string(p)))
        })
        .collect();
    for _ in 0..64 {
        tokio::time::timeout(WAIT, calls.recv()).await.expect("64 calls reach the host").unwrap();
    }
    let more = tokio::time::timeout(Duration::from_millis(500), calls.recv()).await;
    assert!(more.is_err(), "a 65th call went out while 64 wait: {more:?}");

    first.abort();
    let _ = first.await;
    let mut link = Link::connect(&s.agent).await;
    link.open_mount(1, &mnt, false).await;
    let (seen, _calls) = mpsc::unbounded_channel();
    let _second = tokio::spawn(host_loop(link, 1, host.clone(), seen, Arc::default()));
    for r in readers {
        let (i, text) = tokio::time::timeout(WAIT, r).await.expect("every read completes").unwrap();
        assert_eq!(text.unwrap(), format!("{i}"));
    }
}

#[tokio::test]
async fn a_malformed_answer_ends_the_channel_and_the_next_one_carries_on() {
    if !fuse_available() {
        return;
    }
    let s = setup();
    let mut link = Link::connect(&s.agent).await;
    link.open_mount(1, &s.mnt, false).await;
    let _unmount = Unmount(s.mnt.clone());
    link.send(1, Message::Data { stream: Stream::Stdin, data: u32::MAX.to_le_bytes().to_vec() }).await;
    loop {
        match link.next().await.message {
            Message::Close => break,
            Message::Data { .. } | Message::Credit { .. } => {} // calls of the kernel's first looks
            other => panic!("expected the channel to close, got {other:?}"),
        }
    }
    link.open_mount(2, &s.mnt, false).await;
    let (seen, _calls) = mpsc::unbounded_channel();
    let _host = tokio::spawn(host_loop(link, 2, s.host.clone(), seen, Arc::default()));
    let m = s.mnt.clone();
    guest(move || assert_eq!(fs::read_to_string(m.join("hello.txt")).unwrap(), "hi\n")).await;
}

#[tokio::test]
async fn mount_points_in_the_guests_kernel_interfaces_are_refused() {
    let agent = Agent::new(Reaper::start(Scope::Registered).unwrap(), Mode::Host);
    let mut link = Link::connect(&agent).await;
    for (channel, path) in [(1, "/proc/x"), (2, "relative"), (3, "/")] {
        link.send(channel, Message::Request(Request::HostMount { path: path.into(), readonly: false })).await;
        match link.next().await.message {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.contains(path), "{}", e.message);
            }
            other => panic!("expected an error for {path}, got {other:?}"),
        }
        assert_eq!(link.next().await, Frame::new(channel, Message::Close));
    }
}
