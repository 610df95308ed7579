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
use moat_sandbox::{Exec, ExecEvent, Sandbox};
use serde::Deserialize;

use super::extract::{query, JsonBody, Svc};
use crate::error::{file_error, ServiceError};
use crate::guest_stream::StderrTail;
use crate::service::Service;

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
