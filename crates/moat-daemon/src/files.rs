//! Files in a running sandbox: metadata operations, file contents and tar archives streamed in
//! both directions, and change events. Every byte moves under the agent link's credit, so a copy
//! of any size holds a bounded amount in memory and never stalls other channels.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use moat_api::{ChangeMode, ErrorCode, FileInfo, Listing, MakeDir, RemovePath, RenamePath};
use moat_proto::{FsReply, Request};
use moat_sandbox::{Exec, ExecEvent, Sandbox, SandboxError};
use serde::Deserialize;

use crate::api::{query, JsonBody};
use crate::service::{Service, ServiceError};

type Svc = State<Arc<Service>>;

/// Most bytes of a stream's stderr the daemon keeps. The agent writes one sentence there when a
/// stream fails; a compromised agent could write without end, and credit alone would not stop
/// it, since draining the buffer grants more.
const STDERR_TAIL: usize = 64 * 1024;

/// The last [`STDERR_TAIL`] bytes of a guest stream's stderr: the agent's reason, in bounded
/// memory whatever the guest sends.
#[derive(Default)]
pub(crate) struct StderrTail(Vec<u8>);

impl StderrTail {
    pub(crate) fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(STDERR_TAIL)..];
        let excess = (self.0.len() + data.len()).saturating_sub(STDERR_TAIL);
        self.0.drain(..excess);
        self.0.extend_from_slice(data);
    }

    /// As text for an error message.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).trim().to_string()
    }
}

/// What the agent said about a file operation, as an API error.
fn file_error(e: SandboxError) -> ServiceError {
    use moat_proto::ErrorCode as Agent;
    match e {
        SandboxError::Link(moat_sandbox::LinkError::Agent(a)) => {
            let code = match a.code {
                Agent::NotFound => ErrorCode::NotFound,
                Agent::PermissionDenied => ErrorCode::PermissionDenied,
                _ => ErrorCode::InvalidRequest,
            };
            ServiceError::new(code, a.message, "check the path in the sandbox (`moat exec BOX -- ls -la DIR`)")
        }
        e => {
            ServiceError::new(ErrorCode::ExecFailed, e.to_string(), "the sandbox may have stopped; see `moat inspect`")
        }
    }
}

fn sandbox(svc: &Service, reference: &str) -> Result<Arc<Sandbox>, ServiceError> {
    Ok(svc.running(reference)?.1)
}

async fn op(svc: &Service, reference: &str, request: Request) -> Result<FsReply, ServiceError> {
    sandbox(svc, reference)?.file_op(request).await.map_err(file_error)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

pub async fn stat(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Json<FileInfo>, ServiceError> {
    let q = query(q)?;
    match op(&svc, &reference, Request::Stat { path: q.path }).await? {
        FsReply::Stat { info } => Ok(Json(info)),
        other => Err(unexpected(other)),
    }
}

pub async fn list(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Json<Listing>, ServiceError> {
    let q = query(q)?;
    match op(&svc, &reference, Request::List { path: q.path, recursive: q.recursive }).await? {
        FsReply::List { entries } => Ok(Json(Listing { entries })),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: FsReply) -> ServiceError {
    ServiceError::new(ErrorCode::Internal, format!("the agent answered {reply:?}"), "report this as a bug")
}

/// Metadata operations answer `{}`.
async fn done(svc: &Service, reference: &str, request: Request) -> Result<Json<serde_json::Value>, ServiceError> {
    op(svc, reference, request).await?;
    Ok(Json(serde_json::json!({})))
}

pub async fn mkdir(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<MakeDir>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(&svc, &reference, Request::Mkdir { path: r.path, parents: r.parents, mode: r.mode }).await
}

pub async fn remove(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<RemovePath>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(&svc, &reference, Request::Remove { path: r.path, recursive: r.recursive }).await
}

pub async fn rename(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<RenamePath>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(&svc, &reference, Request::Rename { from: r.from, to: r.to }).await
}

pub async fn chmod(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<ChangeMode>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(&svc, &reference, Request::Chmod { path: r.path, mode: r.mode }).await
}

/// A stream's stdout as a response body. A failure after the first byte can only cut the body
/// short (the status is sent); it is logged with the agent's reason.
fn body_of(svc: &Service, exec: Exec, content_type: &'static str, length: Option<u64>) -> Response {
    // The daemon does not count as idle while the body streams (the guard lives in the state).
    let state = (exec, StderrTail::default(), svc.hold());
    let stream = futures_util::stream::unfold(state, |(mut exec, mut stderr, busy)| async move {
        loop {
            match exec.next_event().await {
                Ok(ExecEvent::Stdout(d)) => return Some((Ok(Bytes::from(d)), (exec, stderr, busy))),
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
    });
    let mut builder = Response::builder().header(header::CONTENT_TYPE, content_type);
    if let Some(n) = length {
        builder = builder.header(header::CONTENT_LENGTH, n);
    }
    builder.body(Body::from_stream(stream)).expect("static headers are valid")
}

/// Feed the request body to a stream's stdin, then wait for the agent's verdict.
async fn feed(svc: &Service, mut exec: Exec, body: Body) -> Result<(), ServiceError> {
    let _busy = svc.hold();
    let control = exec.control();
    let mut data = body.into_data_stream();
    // Small body chunks are gathered into whole frames: each frame costs the guest the same.
    let mut pending: Vec<u8> = Vec::with_capacity(moat_proto::MAX_CHUNK);
    let mut accepted = true;
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| {
            ServiceError::new(ErrorCode::InvalidRequest, format!("the upload broke off: {e}"), "send it again")
        })?;
        pending.extend_from_slice(&chunk);
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

pub async fn read_content(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Response, ServiceError> {
    let q = query(q)?;
    let sb = sandbox(&svc, &reference)?;
    let size = match sb.file_op(Request::Stat { path: q.path.clone() }).await.map_err(file_error)? {
        FsReply::Stat { info } => info.size,
        other => return Err(unexpected(other)),
    };
    let exec = sb.file_stream(Request::ReadFile { path: q.path }).await.map_err(file_error)?;
    Ok(body_of(&svc, exec, "application/octet-stream", Some(size)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    path: String,
    /// Permission bits in octal, e.g. `644`.
    #[serde(default)]
    mode: Option<String>,
    /// Write beside the file and rename it into place [default: true].
    #[serde(default)]
    atomic: Option<bool>,
}

pub async fn write_content(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<WriteQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<FileInfo>, ServiceError> {
    let q = query(q)?;
    let mode = match q.mode.as_deref().map(|m| u32::from_str_radix(m, 8)) {
        None => None,
        Some(Ok(m)) if m <= 0o7777 => Some(m),
        Some(_) => {
            return Err(ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("mode {:?} is not an octal file mode", q.mode.unwrap_or_default()),
                "give it in octal, e.g. mode=644",
            ))
        }
    };
    let sb = sandbox(&svc, &reference)?;
    let request = Request::WriteFile { path: q.path.clone(), mode, atomic: q.atomic.unwrap_or(true) };
    feed(&svc, sb.file_stream(request).await.map_err(file_error)?, body).await?;
    match sb.file_op(Request::Stat { path: q.path }).await.map_err(file_error)? {
        FsReply::Stat { info } => Ok(Json(info)),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveQuery {
    path: String,
    /// The archive's top-level entry name [default: the path's last component].
    #[serde(default)]
    name: Option<String>,
}

/// A tar archive of a file or directory tree (symlinks stored as links, never followed).
pub async fn read_archive(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<ArchiveQuery>, QueryRejection>,
) -> Result<Response, ServiceError> {
    let q = query(q)?;
    let exec = sandbox(&svc, &reference)?
        .file_stream(Request::ReadTar { path: q.path, name: q.name })
        .await
        .map_err(file_error)?;
    Ok(body_of(&svc, exec, "application/x-tar", None))
}

/// Unpack a tar archive into an existing directory.
pub async fn write_archive(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<serde_json::Value>, ServiceError> {
    let q = query(q)?;
    let exec = sandbox(&svc, &reference)?.file_stream(Request::WriteTar { path: q.path }).await.map_err(file_error)?;
    feed(&svc, exec, body).await?;
    Ok(Json(serde_json::json!({})))
}

/// Changes under a directory as NDJSON [`moat_api::FsEvent`] lines, until the client leaves.
pub async fn watch(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Response, ServiceError> {
    let q = query(q)?;
    let exec = sandbox(&svc, &reference)?
        .file_stream(Request::Watch { path: q.path, recursive: q.recursive })
        .await
        .map_err(file_error)?;
    Ok(body_of(&svc, exec, "application/x-ndjson", None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compromised agent may send endless stderr; the daemon keeps the end of it, bounded.
    #[test]
    fn stderr_tails_stay_bounded() {
        let mut tail = StderrTail::default();
        let chunk = vec![b'x'; moat_proto::MAX_CHUNK];
        for _ in 0..(200 << 20) / chunk.len() {
            tail.push(&chunk);
            assert!(tail.0.len() <= STDERR_TAIL);
        }
        assert!(tail.0.capacity() <= 2 * STDERR_TAIL, "{}", tail.0.capacity());
        tail.push(&vec![b'y'; 3 * STDERR_TAIL]);
        tail.push(b"the reason.");
        let text = tail.text();
        assert_eq!(text.len(), STDERR_TAIL);
        assert!(text.starts_with('y') && text.ends_with("the reason."));
        let mut short = StderrTail::default();
        short.push(b"  /x is a FIFO, not a regular file.\n");
        assert_eq!(short.text(), "/x is a FIFO, not a regular file.");
    }
}
