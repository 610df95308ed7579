//! File operations on a channel: metadata operations answered at once, and byte streams (tar
//! archives, single files, watch events) moved under the same credit as exec output, so copying a
//! huge file holds at most a window and a few chunks in memory and never stalls other channels.
//!
//! The work itself is blocking file-system code on the runtime's blocking pool, connected to the
//! channel by small bounded queues.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use moat_proto::{
    AgentError, ErrorCode, ExitStatus, FileInfo, FileKind, FsEvent, FsReply, Message, Request, Started, Stream,
    INITIAL_WINDOW, MAX_CHUNK,
};
use tokio::sync::mpsc;

use crate::exec::{Credit, Ctl};
use crate::link::Outbox;

/// Longest path accepted (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Entries a recursive listing returns at most; a larger tree is an error asking for a narrower
/// path.
const MAX_ENTRIES: usize = 100_000;
/// Chunks queued between the blocking worker and the channel.
const QUEUE: usize = 4;

fn err(code: ErrorCode, message: impl Into<String>) -> AgentError {
    AgentError { code, message: message.into() }
}

/// A guest path from the host: absolute, no NUL, at most PATH_MAX bytes.
fn checked(path: &str) -> Result<PathBuf, AgentError> {
    if path.is_empty() || !path.starts_with('/') {
        return Err(err(
            ErrorCode::BadRequest,
            format!("The path {path:?} is not absolute; guest paths start with /."),
        ));
    }
    if path.contains('\0') {
        return Err(err(ErrorCode::BadRequest, "The path contains a NUL byte."));
    }
    if path.len() > MAX_PATH {
        return Err(err(
            ErrorCode::BadRequest,
            format!("The path is {} bytes long; at most {MAX_PATH} are allowed.", path.len()),
        ));
    }
    Ok(PathBuf::from(path))
}

/// An I/O error on `path` as the host shows it.
fn io_err(path: &Path, e: std::io::Error) -> AgentError {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::BadRequest,
    };
    let what = match e.raw_os_error() {
        Some(libc::ENOENT) => "does not exist".to_string(),
        Some(libc::EISDIR) => "is a directory".to_string(),
        Some(libc::ENOTDIR) => "is not a directory (or a parent of it is not)".to_string(),
        Some(libc::ENOTEMPTY) => "is a directory that is not empty (remove it recursively)".to_string(),
        Some(libc::EEXIST) => "already exists".to_string(),
        Some(libc::EACCES) | Some(libc::EPERM) => "is not accessible: permission denied".to_string(),
        _ => format!("failed: {e}"),
    };
    err(code, format!("{} {what}.", path.display()))
}

fn info(path: &Path, m: &std::fs::Metadata) -> FileInfo {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        kind,
        size: m.len(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        target: ft
            .is_symlink()
            .then(|| std::fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

/// Serve one file request on channel `id` to its end.
pub async fn run(id: u32, request: Request, out: Outbox, ctl: mpsc::UnboundedReceiver<Ctl>) {
    let result = match request {
        Request::ReadTar { path, name } => {
            start(id, &out, checked(&path)).await.map(|p| Job::Out(Box::new(move |w| read_tar(&p, name, w))))
        }
        Request::ReadFile { path } => match checked(&path).and_then(|p| open_regular(&p).map(|f| (p, f))) {
            Ok((p, mut f)) => start(id, &out, Ok(())).await.map(|()| {
                Job::Out(Box::new(move |w| std::io::copy(&mut f, w).map(drop).map_err(|e| io_err(&p, e).message)))
            }),
            Err(e) => Err(e),
        },
        Request::WriteTar { path } => match checked(&path).and_then(|p| existing_dir(&p).map(|()| p)) {
            Ok(p) => start(id, &out, Ok(())).await.map(|()| Job::In(Box::new(move |r| write_tar(&p, r)))),
            Err(e) => Err(e),
        },
        Request::WriteFile { path, mode, atomic } => match checked(&path).and_then(|p| writable_target(&p).map(|()| p))
        {
            Ok(p) => {
                start(id, &out, Ok(())).await.map(|()| Job::In(Box::new(move |r| write_file(&p, mode, atomic, r))))
            }
            Err(e) => Err(e),
        },
        Request::Watch { path, recursive } => {
            match checked(&path).and_then(|p| crate::watch::Watcher::new(&p, recursive)) {
                Ok(w) => start(id, &out, Ok(())).await.map(|()| Job::Out(Box::new(move |sink| w.run(sink)))),
                Err(e) => Err(e),
            }
        }
        other => {
            let reply = tokio::task::spawn_blocking(move || metadata_op(other))
                .await
                .unwrap_or_else(|_| Err(err(ErrorCode::Internal, "The file operation panicked.")));
            match reply {
                Ok(reply) => {
                    out.send(id, Message::Started(Started::Fs(reply))).await;
                }
                Err(e) => {
                    out.send(id, Message::Error(e)).await;
                }
            }
            out.send(id, Message::Close).await;
            return;
        }
    };
    match result {
        Ok(Job::Out(work)) => stream_out(id, &out, ctl, work).await,
        Ok(Job::In(work)) => stream_in(id, &out, ctl, work).await,
        Err(e) => {
            out.send(id, Message::Error(e)).await;
            out.send(id, Message::Close).await;
        }
    }
}

/// Work on a blocking thread: writing a stream to the host, or reading one from it. An `Err` is
/// the sentence the host shows.
enum Job {
    Out(Producer),
    In(Consumer),
}

type Producer = Box<dyn FnOnce(&mut dyn Write) -> Result<(), String> + Send>;
type Consumer = Box<dyn FnOnce(&mut dyn Read) -> Result<(), String> + Send>;

/// Answer `Started::Stream` once the request checked out.
async fn start<T>(id: u32, out: &Outbox, checked: Result<T, AgentError>) -> Result<T, AgentError> {
    let value = checked?;
    out.send(id, Message::Started(Started::Stream)).await;
    Ok(value)
}

fn open_regular(path: &Path) -> Result<std::fs::File, AgentError> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let m = f.metadata().map_err(|e| io_err(path, e))?;
    if !m.is_file() {
        return Err(err(ErrorCode::BadRequest, format!("{} is not a regular file.", path.display())));
    }
    Ok(f)
}

fn existing_dir(path: &Path) -> Result<(), AgentError> {
    let m = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if !m.is_dir() {
        return Err(err(ErrorCode::BadRequest, format!("{} is not a directory.", path.display())));
    }
    Ok(())
}

/// A file may be written at `path`: its parent is a directory and it is not one itself.
fn writable_target(path: &Path) -> Result<(), AgentError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    existing_dir(parent)?;
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(err(ErrorCode::BadRequest, format!("{} is a directory.", path.display())));
    }
    Ok(())
}

fn metadata_op(request: Request) -> Result<FsReply, AgentError> {
    match request {
        Request::Stat { path } => {
            let p = checked(&path)?;
            let m = std::fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
            Ok(FsReply::Stat { info: info(&p, &m) })
        }
        Request::List { path, recursive } => {
            let p = checked(&path)?;
            let mut entries = Vec::new();
            list(&p, recursive, &mut entries)?;
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(FsReply::List { entries })
        }
        Request::Mkdir { path, parents, mode } => {
            let p = checked(&path)?;
            let mut b = std::fs::DirBuilder::new();
            b.recursive(parents);
            std::os::unix::fs::DirBuilderExt::mode(&mut b, mode.unwrap_or(0o755));
            b.create(&p).map_err(|e| io_err(&p, e))?;
            Ok(FsReply::Done)
        }
        Request::Remove { path, recursive } => {
            let p = checked(&path)?;
            if p == Path::new("/") {
                return Err(err(ErrorCode::BadRequest, "Refusing to remove /."));
            }
            let m = std::fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
            let r = match (m.is_dir(), recursive) {
                (true, true) => std::fs::remove_dir_all(&p),
                (true, false) => std::fs::remove_dir(&p),
                (false, _) => std::fs::remove_file(&p),
            };
            r.map_err(|e| io_err(&p, e))?;
            Ok(FsReply::Done)
        }
        Request::Rename { from, to } => {
            let (f, t) = (checked(&from)?, checked(&to)?);
            std::fs::rename(&f, &t).map_err(|e| io_err(&f, e))?;
            Ok(FsReply::Done)
        }
        Request::Chmod { path, mode } => {
            let p = checked(&path)?;
            if mode > 0o7777 {
                return Err(err(ErrorCode::BadRequest, format!("{mode:o} is not a file mode (at most 7777 octal).")));
            }
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(|e| io_err(&p, e))?;
            Ok(FsReply::Done)
        }
        _ => Err(err(ErrorCode::Unsupported, "This request is not a file operation.")),
    }
}

fn list(dir: &Path, recursive: bool, entries: &mut Vec<FileInfo>) -> Result<(), AgentError> {
    let read = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in read {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else { continue }; // Removed meanwhile.
        if entries.len() >= MAX_ENTRIES {
            return Err(err(
                ErrorCode::BadRequest,
                format!("{} holds more than {MAX_ENTRIES} entries; list a narrower path.", dir.display()),
            ));
        }
        entries.push(info(&path, &m));
        if recursive && m.is_dir() {
            list(&path, true, entries)?;
        }
    }
    Ok(())
}

fn read_tar(path: &Path, name: Option<String>, w: &mut dyn Write) -> Result<(), String> {
    let m = std::fs::symlink_metadata(path).map_err(|e| io_err(path, e).message)?;
    let name =
        name.or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| ".".to_string());
    if name.is_empty() || name.contains('/') || name == ".." || name.contains('\0') {
        return Err(format!("{name:?} cannot name an archive's top-level entry."));
    }
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let result = if m.is_dir() { b.append_dir_all(&name, path) } else { b.append_path_with_name(path, &name) };
    result.and_then(|()| b.finish()).map_err(|e| format!("Archiving {} failed: {e}.", path.display()))
}

fn write_tar(dir: &Path, r: &mut dyn Read) -> Result<(), String> {
    let mut archive = tar::Archive::new(r);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(dir).map_err(|e| format!("Unpacking into {} failed: {e}.", dir.display()))
}

fn write_file(path: &Path, mode: Option<u32>, atomic: bool, r: &mut dyn Read) -> Result<(), String> {
    let fail = |e: std::io::Error| io_err(path, e).message;
    if !atomic {
        let mut f = std::fs::File::create(path).map_err(fail)?;
        std::io::copy(r, &mut f).map_err(fail)?;
        if let Some(mode) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)).map_err(fail)?;
        }
        return f.sync_all().map_err(fail);
    }
    // Beside the target, so the rename is atomic; an existing file's mode is kept unless given.
    let dir = path.parent().unwrap_or(Path::new("/"));
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{base}.moat-{:08x}", rand_suffix()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        std::io::copy(r, &mut f)?;
        let mode = mode.or_else(|| std::fs::metadata(path).ok().map(|m| m.mode())).unwrap_or(0o644);
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}

/// Distinct per call, so concurrent writers of one file never share a temporary name (and
/// `create_new` refuses rather than clobbers if one is left over).
fn rand_suffix() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).rotate_left(16)
}

/// A `Write` that hands chunks to the channel task; blocks while the queue is full.
struct ChunkWriter(mpsc::Sender<Vec<u8>>);

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(MAX_CHUNK);
        self.0.blocking_send(buf[..n].to_vec()).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(n)
    }

    /// Fails once the host stopped listening, so a worker with nothing to write can notice.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.0.is_closed() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }
}

/// A `Read` over chunks the channel task hands over; EOF when the host's stdin ends.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.pending.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => (self.pending, self.at) = (chunk, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// End the channel: exit code 0, or 1 with the reason on stderr.
async fn finish(id: u32, out: &Outbox, result: Result<(), String>) {
    let code = match result {
        Ok(()) => 0,
        Err(message) => {
            out.send(id, Message::Data { stream: Stream::Stderr, data: message.into_bytes() }).await;
            1
        }
    };
    out.send(id, Message::Eof { stream: Stream::Stdout }).await;
    out.send(id, Message::Eof { stream: Stream::Stderr }).await;
    out.send(id, Message::Exit(ExitStatus { code: Some(code), signal: None, timed_out: false })).await;
    out.send(id, Message::Close).await;
}

/// Send what `work` writes as stdout, never more than the host's credit ahead.
async fn stream_out(id: u32, out: &Outbox, mut ctl: mpsc::UnboundedReceiver<Ctl>, work: Producer) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    // Buffered to whole frames: tar and io::copy write in 512-byte and 8 KiB pieces, and every
    // frame costs the (possibly emulated) guest the same however small it is.
    let worker = tokio::task::spawn_blocking(move || {
        let mut sink = std::io::BufWriter::with_capacity(MAX_CHUNK, ChunkWriter(tx));
        work(&mut sink)?;
        sink.flush().map_err(|e| format!("Sending failed: {e}."))
    });
    let credit = Credit::new();
    loop {
        tokio::select! {
            chunk = rx.recv() => {
                let Some(chunk) = chunk else { break };
                let mut at = 0;
                while at < chunk.len() {
                    // Wait for credit while still taking the host's messages (credit, close).
                    let n = loop {
                        tokio::select! {
                            n = credit.take((chunk.len() - at) as u32) => break n as usize,
                            msg = ctl.recv() => match msg {
                                Some(Ctl::Credit(Stream::Stdout, n)) => credit.give(n),
                                Some(Ctl::Close) | None => return, // Dropping `rx` stops the worker.
                                Some(_) => {}
                            },
                        }
                    };
                    if !out.send(id, Message::Data { stream: Stream::Stdout, data: chunk[at..at + n].to_vec() }).await {
                        return;
                    }
                    at += n;
                }
            }
            msg = ctl.recv() => match msg {
                Some(Ctl::Credit(Stream::Stdout, n)) => credit.give(n),
                Some(Ctl::Close) | None => return,
                Some(_) => {}
            },
        }
    }
    let result = worker.await.unwrap_or_else(|_| Err("The file operation panicked.".into()));
    finish(id, out, result).await;
}

/// Feed the host's stdin to `work`, crediting it back as `work` takes it.
async fn stream_in(id: u32, out: &Outbox, mut ctl: mpsc::UnboundedReceiver<Ctl>, work: Consumer) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let mut worker = tokio::task::spawn_blocking(move || work(&mut ChunkReader { rx, pending: Vec::new(), at: 0 }));
    let mut tx = Some(tx);
    let mut in_flight: usize = 0;
    let result = loop {
        tokio::select! {
            result = &mut worker => break result.unwrap_or_else(|_| Err("The file operation panicked.".into())),
            msg = ctl.recv() => match msg {
                Some(Ctl::Stdin(data)) => {
                    in_flight += data.len();
                    if in_flight > INITIAL_WINDOW as usize {
                        eprintln!("moat-agent: channel {id}: the host sent more than its credit allows; closing the channel");
                        out.send(id, Message::Close).await;
                        return;
                    }
                    let n = data.len();
                    // The worker may have stopped reading (it failed); then the bytes are dropped.
                    if let Some(t) = &tx {
                        if t.send(data).await.is_err() {
                            tx = None;
                        }
                    }
                    in_flight -= n;
                    if n > 0 {
                        out.send(id, Message::Credit { stream: Stream::Stdin, bytes: n as u32 }).await;
                    }
                }
                Some(Ctl::StdinEof) => tx = None,
                Some(Ctl::Close) | None => return,
                Some(_) => {}
            },
        }
    };
    finish(id, out, result).await;
}

/// Write one event as a JSON line, at once; false once the host stopped listening.
pub fn emit(sink: &mut dyn Write, event: &FsEvent) -> bool {
    let mut line = serde_json::to_vec(event).expect("events serialize");
    line.push(b'\n');
    sink.write_all(&line).and_then(|()| sink.flush()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_host_are_checked() {
        assert!(checked("/tmp/x").is_ok());
        for bad in ["", "tmp/x", "/a\0b"] {
            assert_eq!(checked(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert!(checked(&long).unwrap_err().message.contains("at most"));
    }

    #[test]
    fn metadata_operations_work_and_explain_failures() {
        let dir = std::env::temp_dir().join(format!("moat-files-{}", std::process::id()));
        let d = dir.to_string_lossy().into_owned();
        let op = |r: Request| metadata_op(r);
        assert_eq!(op(Request::Mkdir { path: format!("{d}/a/b"), parents: true, mode: None }), Ok(FsReply::Done));
        std::fs::write(dir.join("a/f"), b"hi").unwrap();
        std::os::unix::fs::symlink("f", dir.join("a/l")).unwrap();
        let Ok(FsReply::List { entries }) = op(Request::List { path: d.clone(), recursive: true }) else { panic!() };
        let names: Vec<_> = entries.iter().map(|e| (e.path.trim_start_matches(&d).to_string(), e.kind)).collect();
        assert_eq!(
            names,
            [
                ("/a".into(), FileKind::Dir),
                ("/a/b".into(), FileKind::Dir),
                ("/a/f".into(), FileKind::File),
                ("/a/l".into(), FileKind::Symlink)
            ]
        );
        let Ok(FsReply::Stat { info }) = op(Request::Stat { path: format!("{d}/a/l") }) else { panic!() };
        assert_eq!(info.target.as_deref(), Some("f"));
        assert_eq!(op(Request::Chmod { path: format!("{d}/a/f"), mode: 0o600 }), Ok(FsReply::Done));
        assert_eq!(std::fs::metadata(dir.join("a/f")).unwrap().mode() & 0o777, 0o600);
        let e = op(Request::Remove { path: format!("{d}/a"), recursive: false }).unwrap_err();
        assert!(e.message.contains("not empty"), "{}", e.message);
        let e = op(Request::Stat { path: format!("{d}/missing") }).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.ends_with("does not exist."), "{}", e.message);
        let e = op(Request::Mkdir { path: format!("{d}/a/f/x"), parents: false, mode: None }).unwrap_err();
        assert!(e.message.contains("not a directory"), "{}", e.message);
        assert_eq!(op(Request::Rename { from: format!("{d}/a/f"), to: format!("{d}/g") }), Ok(FsReply::Done));
        assert_eq!(op(Request::Remove { path: d.clone(), recursive: true }), Ok(FsReply::Done));
        assert!(!dir.exists());
    }

    #[test]
    fn atomic_writes_replace_the_file_whole_and_keep_its_mode() {
        let dir = tempdir();
        let path = dir.join("f");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_file(&path, None, true, &mut &b"new contents"[..]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn archives_round_trip_trees_with_links_and_modes() {
        let src = tempdir();
        std::fs::create_dir_all(src.join("t/empty")).unwrap();
        std::fs::write(src.join("t/x"), b"x").unwrap();
        std::fs::set_permissions(src.join("t/x"), std::fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("t/link")).unwrap();
        let mut tar = Vec::new();
        read_tar(&src.join("t"), Some("renamed".into()), &mut tar).unwrap();
        let dst = tempdir();
        write_tar(&dst, &mut &tar[..]).unwrap();
        assert!(dst.join("renamed/empty").is_dir());
        assert_eq!(std::fs::metadata(dst.join("renamed/x")).unwrap().mode() & 0o777, 0o751);
        assert_eq!(std::fs::read_link(dst.join("renamed/link")).unwrap(), Path::new("/etc/passwd"));
        std::fs::remove_dir_all(&src).unwrap();
        std::fs::remove_dir_all(&dst).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-files-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
