//! Files in a running sandbox: metadata operations, file contents and tar archives streamed in
//! both directions, and change events. Every byte moves under the agent link's credit, so a copy
//! of any size holds a bounded amount in memory and never stalls other channels.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use moat_api::{ChangeMode, ErrorCode, FileInfo, Listing, MakeDir, RemovePath, RenamePath};
use moat_proto::{FsReply, Request};
use moat_sandbox::{Exec, ExecEvent};

use super::Service;
use crate::error::{file_error, ServiceError};
use crate::guest_stream::StderrTail;

/// Bytes streamed out of the service (file contents, archives, watch events, logs). An error
/// after the first chunk cuts the stream short; it says why.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Vec<u8>>> + Send>>;

/// A file's contents as they stream out of the sandbox.
pub struct FileContent {
    /// Its size when the read began.
    pub size: u64,
    pub data: ByteStream,
}

/// How a file is written: its permission bits (kept as they are without), whether it is
/// written beside the file and renamed into place, and the guest user who owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    pub mode: Option<u32>,
    pub atomic: bool,
    pub owner: Option<String>,
}

/// Longest owner accepted (the agent refuses longer user specs too).
const MAX_OWNER: usize = 256;

/// An owner for written files and made directories: a user name, uid or `user:group`, resolved
/// by the agent against the sandbox's own /etc/passwd.
pub fn check_owner(owner: Option<&str>) -> Result<(), ServiceError> {
    let Some(owner) = owner else { return Ok(()) };
    if owner.is_empty() || owner.len() > MAX_OWNER || owner.chars().any(char::is_control) {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("the owner {:?} is not a user", owner.chars().take(64).collect::<String>()),
            format!("give a user name from the sandbox's /etc/passwd, a uid or user:group, at most {MAX_OWNER} bytes"),
        ));
    }
    Ok(())
}

/// Permission bits given in octal, e.g. `644`.
pub fn parse_mode(text: &str) -> Result<u32, ServiceError> {
    match u32::from_str_radix(text, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("mode {text:?} is not an octal file mode"),
            "give it in octal, e.g. mode=644",
        )),
    }
}

/// A refused request that named an owner may have been refused for the owner.
fn owner_hint(e: ServiceError, owned: bool) -> ServiceError {
    if !owned || e.code != ErrorCode::InvalidRequest {
        return e;
    }
    let hint = "check the path, and that the owner is a user of the sandbox's /etc/passwd (`moat exec BOX -- cat \
                /etc/passwd`), a uid or user:group";
    ServiceError { hint: hint.into(), ..e }
}

fn unexpected(reply: FsReply) -> ServiceError {
    ServiceError::new(ErrorCode::Internal, format!("the agent answered {reply:?}"), "report this as a bug")
}

impl Service {
    async fn file_op(&self, reference: &str, request: Request) -> Result<FsReply, ServiceError> {
        self.running(reference)?.1.file_op(request).await.map_err(file_error)
    }

    async fn file_stream(&self, reference: &str, request: Request) -> Result<Exec, ServiceError> {
        self.running(reference)?.1.file_stream(request).await.map_err(file_error)
    }

    /// A path's metadata (symlinks not followed).
    pub async fn stat_path(&self, reference: &str, path: String) -> Result<FileInfo, ServiceError> {
        match self.file_op(reference, Request::Stat { path }).await? {
            FsReply::Stat { info } => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// A directory's entries, or its whole tree with `recursive`.
    pub async fn list_dir(&self, reference: &str, path: String, recursive: bool) -> Result<Listing, ServiceError> {
        match self.file_op(reference, Request::List { path, recursive }).await? {
            FsReply::List { entries } => Ok(Listing { entries }),
            other => Err(unexpected(other)),
        }
    }

    pub async fn make_dir(&self, reference: &str, r: MakeDir) -> Result<(), ServiceError> {
        check_owner(r.owner.as_deref())?;
        let owned = r.owner.is_some();
        let request = Request::Mkdir { path: r.path, parents: r.parents, mode: r.mode, owner: r.owner };
        self.file_op(reference, request).await.map(drop).map_err(|e| owner_hint(e, owned))
    }

    pub async fn remove_path(&self, reference: &str, r: RemovePath) -> Result<(), ServiceError> {
        self.file_op(reference, Request::Remove { path: r.path, recursive: r.recursive }).await.map(drop)
    }

    pub async fn rename_path(&self, reference: &str, r: RenamePath) -> Result<(), ServiceError> {
        self.file_op(reference, Request::Rename { from: r.from, to: r.to }).await.map(drop)
    }

    pub async fn change_mode(&self, reference: &str, r: ChangeMode) -> Result<(), ServiceError> {
        self.file_op(reference, Request::Chmod { path: r.path, mode: r.mode }).await.map(drop)
    }

    /// A regular file's contents.
    pub async fn read_file(&self, reference: &str, path: String) -> Result<FileContent, ServiceError> {
        let size = self.stat_path(reference, path.clone()).await?.size;
        let exec = self.file_stream(reference, Request::ReadFile { path }).await?;
        Ok(FileContent { size, data: self.stdout_of(exec) })
    }

    /// Write a file from `data`; its metadata once written.
    pub async fn write_file<S, B, E>(
        &self,
        reference: &str,
        path: String,
        options: WriteOptions,
        data: S,
    ) -> Result<FileInfo, ServiceError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        if let Some(mode) = options.mode.filter(|m| *m > 0o7777) {
            return Err(parse_mode(&format!("{mode:o}")).expect_err("a mode above 0o7777 is refused"));
        }
        check_owner(options.owner.as_deref())?;
        let owned = options.owner.is_some();
        let request =
            Request::WriteFile { path: path.clone(), mode: options.mode, atomic: options.atomic, owner: options.owner };
        let stream = self.file_stream(reference, request).await.map_err(|e| owner_hint(e, owned))?;
        self.feed(stream, data).await?;
        self.stat_path(reference, path).await
    }

    /// A tar archive of a file or directory tree, whose top entry is `name` (by default the
    /// path's last component). Symlinks are stored as links, never followed.
    pub async fn read_archive(
        &self,
        reference: &str,
        path: String,
        name: Option<String>,
    ) -> Result<ByteStream, ServiceError> {
        Ok(self.stdout_of(self.file_stream(reference, Request::ReadTar { path, name }).await?))
    }

    /// Unpack a tar archive into an existing directory.
    pub async fn write_archive<S, B, E>(&self, reference: &str, path: String, data: S) -> Result<(), ServiceError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        self.feed(self.file_stream(reference, Request::WriteTar { path }).await?, data).await
    }

    /// Changes under a directory as NDJSON [`moat_api::FsEvent`] lines, for as long as the
    /// stream is read.
    pub async fn watch_path(&self, reference: &str, path: String, recursive: bool) -> Result<ByteStream, ServiceError> {
        Ok(self.stdout_of(self.file_stream(reference, Request::Watch { path, recursive }).await?))
    }

    /// A guest stream's stdout. A failure midway cuts it short with the agent's reason, which is
    /// logged too.
    fn stdout_of(&self, exec: Exec) -> ByteStream {
        // The daemon does not count as idle while the stream is read (the guard lives in the state).
        let state = (exec, StderrTail::default(), self.hold());
        Box::pin(futures_util::stream::unfold(state, |(mut exec, mut stderr, busy)| async move {
            loop {
                match exec.next_event().await {
                    Ok(ExecEvent::Stdout(d)) => return Some((Ok(d), (exec, stderr, busy))),
                    Ok(ExecEvent::Stderr(d)) => stderr.push(&d),
                    Ok(ExecEvent::Exit(s)) if s.code == Some(0) => return None,
                    Ok(ExecEvent::Exit(_)) => {
                        let reason = stderr.text();
                        tracing::warn!(%reason, "a file stream failed midway");
                        return Some((Err(std::io::Error::other(reason)), (exec, StderrTail::default(), busy)));
                    }
                    Err(e) => {
                        return Some((Err(std::io::Error::other(e.to_string())), (exec, StderrTail::default(), busy)))
                    }
                }
            }
        }))
    }

    /// Feed `data` to a guest stream's stdin, then wait for the agent's verdict.
    async fn feed<S, B, E>(&self, mut exec: Exec, mut data: S) -> Result<(), ServiceError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let _busy = self.hold();
        let control = exec.control();
        // Small chunks are gathered into whole frames: each frame costs the guest the same.
        let mut pending: Vec<u8> = Vec::with_capacity(moat_proto::MAX_CHUNK);
        let mut accepted = true;
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                ServiceError::new(ErrorCode::InvalidRequest, format!("the upload broke off: {e}"), "send it again")
            })?;
            pending.extend_from_slice(chunk.as_ref());
            if pending.len() >= moat_proto::MAX_CHUNK {
                if control.write_stdin(&pending).await.is_err() {
                    accepted = false;
                    break; // The agent stopped taking input; its verdict says why.
                }
                pending.clear();
            }
        }
        if accepted && !pending.is_empty() {
            let _ = control.write_stdin(&pending).await;
        }
        let _ = control.close_stdin().await;
        let mut stderr = StderrTail::default();
        loop {
            match exec.next_event().await.map_err(|e| file_error(e.into()))? {
                ExecEvent::Stdout(_) => {}
                ExecEvent::Stderr(d) => stderr.push(&d),
                ExecEvent::Exit(s) if s.code == Some(0) => return Ok(()),
                ExecEvent::Exit(_) => {
                    return Err(ServiceError::new(
                        ErrorCode::InvalidRequest,
                        stderr.text(),
                        "check the destination in the sandbox and the data sent",
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("644").expect("octal"), 0o644);
        assert_eq!(parse_mode("7777").expect("all bits"), 0o7777);
        for bad in ["", "9", "rw-r--r--", "17777", "-1"] {
            let e = parse_mode(bad).expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert_eq!(e.message, format!("mode {bad:?} is not an octal file mode"));
        }
    }

    #[test]
    fn owners_are_bounded_user_specs() {
        for good in [None, Some("nobody"), Some("1000"), Some("bob:wheel")] {
            assert!(check_owner(good).is_ok(), "{good:?}");
        }
        let long = "u".repeat(MAX_OWNER + 1);
        for bad in ["", "a\nb", "a\0b", long.as_str()] {
            let e = check_owner(Some(bad)).expect_err(bad);
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.hint.contains("/etc/passwd"), "{e:?}");
        }
    }
}
