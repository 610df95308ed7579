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
/// JSON bytes a listing may take: its answer must fit one frame, or the host would end the link.
/// Room is left for the envelope around the entries. A larger tree is an error asking for a
/// narrower path.
const MAX_LISTING: usize = moat_proto::MAX_PAYLOAD - 4096;
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
        Request::ReadFile { path } => {
            // On the blocking pool: this task shares the agent's one thread with every channel.
            let opened = match checked(&path) {
                Ok(p) => tokio::task::spawn_blocking(move || open_regular(&p).map(|f| (p, f)))
                    .await
                    .unwrap_or_else(|_| Err(err(ErrorCode::Internal, "Opening the file panicked."))),
                Err(e) => Err(e),
            };
            match opened {
                Ok((p, mut f)) => start(id, &out, Ok(())).await.map(|()| {
                    Job::Out(Box::new(move |w| std::io::copy(&mut f, w).map(drop).map_err(|e| io_err(&p, e).message)))
                }),
                Err(e) => Err(e),
            }
        }
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

/// Open `path` for reading if it is a regular file, following symlinks as `cat` would. The guest
/// may have put anything there: other kinds are refused before opening (opening a device can act
/// on it), and `O_NONBLOCK` keeps a FIFO swapped in meanwhile from blocking the open forever; the
/// kind of what was really opened decides.
fn open_regular(path: &Path) -> Result<std::fs::File, AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let refuse = |m: &std::fs::Metadata| {
        (!m.is_file()).then(|| {
            let kind = kind_name(m.file_type());
            err(ErrorCode::BadRequest, format!("{} is {kind}, not a regular file.", path.display()))
        })
    };
    if let Some(e) = refuse(&std::fs::metadata(path).map_err(|e| io_err(path, e))?) {
        return Err(e);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    match refuse(&f.metadata().map_err(|e| io_err(path, e))?) {
        Some(e) => Err(e),
        None => Ok(f),
    }
}

/// What a file that is not a regular file is, in words.
fn kind_name(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else {
        "a special file"
    }
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
            let mut budget = MAX_LISTING;
            list(&p, recursive, &mut entries, &mut budget).map_err(|e| match e {
                Listed::Failed(e) => e,
                Listed::TooLarge => err(
                    ErrorCode::BadRequest,
                    format!(
                        "The listing of {} is over {} KiB ({} entries so far), more than one answer carries; \
                         list a narrower path{}.",
                        p.display(),
                        MAX_LISTING / 1024,
                        entries.len(),
                        if recursive { ", or without recursion" } else { "" }
                    ),
                ),
            })?;
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

/// Why a listing stopped.
enum Listed {
    Failed(AgentError),
    /// The entries would not fit in one answer.
    TooLarge,
}

/// Add `dir`'s entries (and, when recursive, everything below) to `entries`, while their JSON fits
/// in `budget` bytes; the budget also bounds the agent's memory and the recursion depth.
fn list(dir: &Path, recursive: bool, entries: &mut Vec<FileInfo>, budget: &mut usize) -> Result<(), Listed> {
    let read = std::fs::read_dir(dir).map_err(|e| Listed::Failed(io_err(dir, e)))?;
    for entry in read {
        let entry = entry.map_err(|e| Listed::Failed(io_err(dir, e)))?;
        let path = entry.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else { continue }; // Removed meanwhile.
        let entry = info(&path, &m);
        // The entry as it goes on the wire, and the comma after it.
        let size = serde_json::to_vec(&entry).expect("file infos serialize").len() + 1;
        *budget = budget.checked_sub(size).ok_or(Listed::TooLarge)?;
        entries.push(entry);
        if recursive && m.is_dir() {
            list(&path, true, entries, budget)?;
        }
    }
    Ok(())
}

/// A tar archive of the file or tree at `path`, its top entry named `name`; symlinks are stored,
/// never followed.
///
/// Every member carries exactly the bytes its header announces. tar-rs's own `append_file` copies
/// to EOF, so a file that a guest process grows while it is read would spill bytes past its
/// member, and the host would read them as members of their own (tar-rs issues #282, #352). A
/// file that shrinks is padded with zeros; a sparse one travels whole, its holes as zeros. Sockets,
/// FIFOs and devices inside a tree are left out: the host takes only files, directories and
/// symlinks.
fn read_tar(path: &Path, name: Option<String>, w: &mut dyn Write) -> Result<(), String> {
    let name =
        name.or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| ".".to_string());
    if name.is_empty() || name.contains('/') || name == ".." || name.contains('\0') {
        return Err(format!("{name:?} cannot name an archive's top-level entry."));
    }
    let m = std::fs::symlink_metadata(path).map_err(|e| io_err(path, e).message)?;
    if !(m.is_file() || m.is_dir() || m.is_symlink()) {
        return Err(format!("{} is not a file, directory or symlink; only those can be copied out.", path.display()));
    }
    let fail = |p: &Path, e: std::io::Error| format!("Archiving {} failed: {e}.", p.display());
    let mut b = tar::Builder::new(w);
    let mut todo = vec![(path.to_path_buf(), PathBuf::from(&name))];
    while let Some((src, dest)) = todo.pop() {
        let m = match std::fs::symlink_metadata(&src) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && src != path => continue, // Removed meanwhile.
            Err(e) => return Err(io_err(&src, e).message),
        };
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&m);
        let appended = if m.is_dir() {
            for entry in std::fs::read_dir(&src).map_err(|e| io_err(&src, e).message)? {
                let entry = entry.map_err(|e| io_err(&src, e).message)?;
                todo.push((entry.path(), dest.join(entry.file_name())));
            }
            b.append_data(&mut header, &dest, std::io::empty())
        } else if m.is_symlink() {
            let target = std::fs::read_link(&src).map_err(|e| io_err(&src, e).message)?;
            b.append_link(&mut header, &dest, target)
        } else if m.is_file() {
            append_file(&mut b, &src, &dest)
        } else {
            continue;
        };
        appended.map_err(|e| fail(&src, e))?;
    }
    b.finish().map_err(|e| fail(path, e))
}

/// Append the regular file `src` as `dest`, exactly as many bytes as its header says.
fn append_file(b: &mut tar::Builder<&mut dyn Write>, src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not following a symlink or blocking on a FIFO swapped in since the listing; the header
    // comes from the file opened.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(src)?;
    let m = file.metadata()?;
    if !m.is_file() {
        return Ok(());
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata(&m);
    let size = m.len();
    b.append_data(&mut header, dest, file.take(size).chain(std::io::repeat(0)).take(size))
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
        // A FIFO inside a tree is left out (the host takes only files, directories and symlinks);
        // one asked for by name is an error.
        let fifo = src.join("t/fifo");
        let fifo_mode = rustix::fs::Mode::from_raw_mode(0o644);
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, fifo_mode, 0).unwrap();
        let e = read_tar(&fifo, None, &mut Vec::new()).unwrap_err();
        assert!(e.ends_with("is not a file, directory or symlink; only those can be copied out."), "{e}");
        let mut tar = Vec::new();
        read_tar(&src.join("t"), Some("renamed".into()), &mut tar).unwrap();
        let (names, _) = members(&tar);
        let names: Vec<_> = names.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(!names.contains(&"renamed/fifo".to_string()), "{names:?}");
        let dst = tempdir();
        write_tar(&dst, &mut &tar[..]).unwrap();
        assert!(dst.join("renamed/empty").is_dir());
        assert_eq!(std::fs::metadata(dst.join("renamed/x")).unwrap().mode() & 0o777, 0o751);
        assert_eq!(std::fs::read_link(dst.join("renamed/link")).unwrap(), Path::new("/etc/passwd"));
        std::fs::remove_dir_all(&src).unwrap();
        std::fs::remove_dir_all(&dst).unwrap();
    }

    /// A guest can put a FIFO (or a link to one) where the host reads a file; opening it must not
    /// wait for a writer, or the agent's one thread would wait with it.
    #[test]
    fn reading_a_fifo_or_device_is_refused_at_once() {
        let dir = tempdir();
        let fifo = dir.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(&fifo, dir.join("link")).unwrap();
        std::fs::write(dir.join("file"), b"ok").unwrap();
        std::os::unix::fs::symlink(dir.join("file"), dir.join("to-file")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.clone();
        std::thread::spawn(move || {
            let kinds: Vec<_> = ["fifo", "link", "file", "to-file"]
                .iter()
                .map(|n| open_regular(&d.join(n)).map(drop).map_err(|e| (e.code, e.message)))
                .collect();
            let _ = tx.send((kinds, open_regular(Path::new("/dev/null")).map(drop).map_err(|e| e.message)));
        });
        let (kinds, dev) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("opening never blocks");
        for refused in &kinds[..2] {
            let (code, message) = refused.as_ref().unwrap_err();
            assert_eq!(*code, ErrorCode::BadRequest);
            assert!(message.ends_with("is a FIFO, not a regular file."), "{message}");
        }
        assert!(kinds[2].is_ok() && kinds[3].is_ok(), "{kinds:?}");
        assert!(dev.unwrap_err().contains("is a device"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every answer must fit one frame: a tree too large to list is an error, not a frame the host
    /// refuses (which ends the link) or a panic (which reboots the guest).
    #[test]
    fn listings_too_large_for_one_answer_are_refused() {
        let dir = tempdir();
        std::fs::create_dir(dir.join("sub")).unwrap();
        for i in 0..6000 {
            std::fs::write(dir.join("sub").join(format!("{i:0>200}")), b"").unwrap();
        }
        let path = dir.to_string_lossy().into_owned();
        let e = metadata_op(Request::List { path: path.clone(), recursive: true }).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("list a narrower path, or without recursion"), "{}", e.message);
        // The top level alone is small, and its answer fits a frame.
        let reply = metadata_op(Request::List { path, recursive: false }).unwrap();
        let frame = moat_proto::Frame::new(1, Message::Started(Started::Fs(reply)));
        assert!(frame.encode().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A sink that runs `race` at its first write (the archive's first header): what a guest
    /// process changing the file at that moment does.
    struct Racing<F: FnOnce()> {
        out: Vec<u8>,
        race: Option<F>,
    }

    impl<F: FnOnce()> Write for Racing<F> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(race) = self.race.take() {
                race();
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Each member of an archive as its name and the size in its header, and their data.
    fn members(tar: &[u8]) -> (Vec<(String, u64)>, Vec<Vec<u8>>) {
        let mut archive = tar::Archive::new(tar);
        let entries = archive.entries().unwrap();
        entries
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                ((e.path().unwrap().display().to_string(), e.header().size().unwrap()), data)
            })
            .unzip()
    }

    #[test]
    fn a_file_that_grows_while_archived_stays_one_member_of_its_header_size() {
        let dir = tempdir();
        let path = dir.join("out.bin");
        let original: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        std::fs::write(&path, &original).unwrap();
        // What the guest process appends: a whole archive of its own, holding `pwned`.
        let mut payload = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        payload.append_data(&mut h, "pwned", &b"hi\n"[..]).unwrap();
        let payload = payload.into_inner().unwrap();
        let append = || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&payload).unwrap();
        };
        let mut sink = Racing { out: Vec::new(), race: Some(append) };
        read_tar(&path, None, &mut sink).unwrap();
        assert!(sink.race.is_none(), "the file grew during the copy");
        let (names, data) = members(&sink.out);
        assert_eq!(names, [("out.bin".to_string(), 4096)]);
        assert!(data[0] == original, "the member holds the file as it was");

        // One that shrinks meanwhile is padded to its header's size, so the archive stays whole.
        std::fs::write(&path, &original).unwrap();
        let shrink = || std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
        let mut sink = Racing { out: Vec::new(), race: Some(shrink) };
        read_tar(&path, Some("renamed".into()), &mut sink).unwrap();
        let padded = [&original[..100], &[0; 3996][..]].concat();
        let (names, data) = members(&sink.out);
        assert_eq!(names, [("renamed".to_string(), 4096)]);
        assert!(data[0] == padded, "the member is padded with zeros");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-files-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
