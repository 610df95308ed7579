//! File operations on a channel: metadata operations answered at once, and byte streams (tar
//! archives, single files, watch events) moved under the same credit as exec output, so copying a
//! huge file holds at most a window and a few chunks in memory and never stalls other channels.
//!
//! The work itself is blocking file-system code on the runtime's blocking pool, connected to the
//! channel by small bounded queues.

mod archive;
mod metadata;
mod stream;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use moat_proto::{AgentError, ErrorCode, Message, Request, Started};
use tokio::sync::mpsc;

use crate::channel::{Ctl, Outbox};
use archive::{read_tar, write_tar};
use metadata::metadata_op;
use stream::{stream_in, stream_out, ChunkWriter};

/// Longest path accepted (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;

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
                Ok((p, mut f)) => start(id, &out, Ok(()))
                    .await
                    .map(|()| Job::Out(Box::new(move |w| w.send_from(&mut f).map_err(|e| io_err(&p, e).message)))),
                Err(e) => Err(e),
            }
        }
        Request::WriteTar { path } => match checked(&path).and_then(|p| existing_dir(&p).map(|()| p)) {
            Ok(p) => start(id, &out, Ok(())).await.map(|()| Job::In(Box::new(move |r| write_tar(&p, r)))),
            Err(e) => Err(e),
        },
        Request::WriteFile { path, mode, atomic, owner } => {
            let target = checked(&path).and_then(|p| writable_target(&p).map(|()| p));
            match target.and_then(|p| Ok((p, owner_ids(owner.as_deref(), Path::new("/etc"))?))) {
                Ok((p, ids)) => start(id, &out, Ok(()))
                    .await
                    .map(|()| Job::In(Box::new(move |r| write_file(&p, mode, atomic, ids, r)))),
                Err(e) => Err(e),
            }
        }
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

type Producer = Box<dyn FnOnce(&mut ChunkWriter) -> Result<(), String> + Send>;
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

/// A user and group id pair that owns what a request makes.
pub(crate) type Owner = (u32, u32);

/// The uid and primary gid of `owner` (a name, a uid or `user:group`, as exec's `user`) from the
/// passwd and group files in `etc`.
pub(crate) fn owner_ids(owner: Option<&str>, etc: &Path) -> Result<Option<Owner>, AgentError> {
    let Some(owner) = owner else { return Ok(None) };
    let identity = crate::users::resolve(owner, etc)
        .map_err(|e| err(ErrorCode::BadRequest, format!("Cannot give files to the owner {owner:?}: {e}.")))?;
    Ok(Some((identity.uid, identity.gid)))
}

fn write_file(
    path: &Path,
    mode: Option<u32>,
    atomic: bool,
    owner: Option<Owner>,
    r: &mut dyn Read,
) -> Result<(), String> {
    use std::os::unix::fs::fchown;
    let fail = |e: std::io::Error| io_err(path, e).message;
    if !atomic {
        let mut f = std::fs::File::create(path).map_err(fail)?;
        std::io::copy(r, &mut f).map_err(fail)?;
        // Before the mode: a change of owner clears the set-id bits.
        if let Some((uid, gid)) = owner {
            fchown(&f, Some(uid), Some(gid)).map_err(fail)?;
        }
        if let Some(mode) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)).map_err(fail)?;
        }
        return f.sync_all().map_err(fail);
    }
    // Beside the target, so the rename is atomic; an existing file's mode and owner are kept
    // unless given, as a write in place keeps them.
    let dir = path.parent().unwrap_or(Path::new("/"));
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{base}.moat-{:08x}", rand_suffix()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        std::io::copy(r, &mut f)?;
        let existing = std::fs::metadata(path).ok();
        if let Some((uid, gid)) = owner.or_else(|| existing.as_ref().map(|m| (m.uid(), m.gid()))) {
            fchown(&f, Some(uid), Some(gid))?;
        }
        let mode = mode.or_else(|| existing.map(|m| m.mode())).unwrap_or(0o644);
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
    fn atomic_writes_replace_the_file_whole_and_keep_its_mode() {
        let dir = tempdir();
        let path = dir.join("f");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_file(&path, None, true, None, &mut &b"new contents"[..]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owners_resolve_from_the_guests_passwd_and_unknown_ones_are_named() {
        let etc = tempdir();
        std::fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\nbob:x:1000:1001::/home/bob:/bin/sh\n").unwrap();
        std::fs::write(etc.join("group"), "wheel:x:10:bob\n").unwrap();
        assert_eq!(owner_ids(None, &etc), Ok(None));
        assert_eq!(owner_ids(Some("bob"), &etc), Ok(Some((1000, 1001))), "the primary group");
        assert_eq!(owner_ids(Some("bob:wheel"), &etc), Ok(Some((1000, 10))));
        assert_eq!(owner_ids(Some("4242"), &etc), Ok(Some((4242, 4242))));
        let e = owner_ids(Some("carol"), &etc).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("\"carol\"") && e.message.contains("/etc/passwd"), "{}", e.message);
        std::fs::remove_dir_all(&etc).unwrap();
    }

    /// A written file goes to its owner; an atomic rewrite without one keeps the file's owner,
    /// as a write in place does.
    #[test]
    fn written_files_get_their_owner_and_rewrites_keep_it() {
        if !rustix::process::geteuid().is_root() {
            return; // Only root gives files away.
        }
        let dir = tempdir();
        let owner_of = |p: &Path| std::fs::metadata(p).map(|m| (m.uid(), m.gid())).unwrap();
        for atomic in [true, false] {
            let path = dir.join(format!("f-{atomic}"));
            write_file(&path, Some(0o4755), atomic, Some((1000, 1001)), &mut &b"mine"[..]).unwrap();
            assert_eq!(owner_of(&path), (1000, 1001), "atomic: {atomic}");
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o4755, "the mode is set after the owner");
            write_file(&path, None, atomic, None, &mut &b"again"[..]).unwrap();
            assert_eq!(owner_of(&path), (1000, 1001), "atomic: {atomic}");
        }
        write_file(&dir.join("new"), None, true, None, &mut &b"x"[..]).unwrap();
        assert_eq!(owner_of(&dir.join("new")), (0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
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

    pub(super) fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-files-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
