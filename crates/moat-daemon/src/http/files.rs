//! Files in a running sandbox: metadata operations, file contents and tar archives streamed in
//! both directions, and change events. The service moves the bytes; these handlers map query
//! strings and bodies to its calls.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use axum::Json;
use moat_api::{ChangeMode, FileInfo, Listing, MakeDir, RemovePath, RenamePath};
use serde::Deserialize;

use super::extract::{query, JsonBody, Svc};
use crate::error::ServiceError;
use crate::service::files::{parse_mode, ByteStream, WriteOptions};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

/// Metadata operations answer `{}`.
fn done(r: Result<(), ServiceError>) -> Result<Json<serde_json::Value>, ServiceError> {
    r.map(|()| Json(serde_json::json!({})))
}

pub async fn stat(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Json<FileInfo>, ServiceError> {
    let q = query(q)?;
    Ok(Json(svc.stat_path(&reference, q.path).await?))
}

pub async fn list(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Json<Listing>, ServiceError> {
    let q = query(q)?;
    Ok(Json(svc.list_dir(&reference, q.path, q.recursive).await?))
}

pub async fn mkdir(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<MakeDir>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(svc.make_dir(&reference, r).await)
}

pub async fn remove(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<RemovePath>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(svc.remove_path(&reference, r).await)
}

pub async fn rename(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<RenamePath>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(svc.rename_path(&reference, r).await)
}

pub async fn chmod(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(r): JsonBody<ChangeMode>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    done(svc.change_mode(&reference, r).await)
}

/// A streamed response body. A failure after the first byte can only cut the body short (the
/// status is sent already).
fn body_of(stream: ByteStream, content_type: &'static str, length: Option<u64>) -> Response {
    let mut builder = Response::builder().header(header::CONTENT_TYPE, content_type);
    if let Some(n) = length {
        builder = builder.header(header::CONTENT_LENGTH, n);
    }
    builder.body(Body::from_stream(stream)).expect("static headers are valid")
}

pub async fn read_content(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Response, ServiceError> {
    let q = query(q)?;
    let content = svc.read_file(&reference, q.path).await?;
    Ok(body_of(content.data, "application/octet-stream", Some(content.size)))
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
    /// A guest user to own the file.
    #[serde(default)]
    owner: Option<String>,
}

pub async fn write_content(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<WriteQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<FileInfo>, ServiceError> {
    let q = query(q)?;
    let options = WriteOptions {
        mode: q.mode.as_deref().map(parse_mode).transpose()?,
        atomic: q.atomic.unwrap_or(true),
        owner: q.owner,
    };
    Ok(Json(svc.write_file(&reference, q.path, options, body.into_data_stream()).await?))
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
    Ok(body_of(svc.read_archive(&reference, q.path, q.name).await?, "application/x-tar", None))
}

/// Unpack a tar archive into an existing directory.
pub async fn write_archive(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<serde_json::Value>, ServiceError> {
    let q = query(q)?;
    done(svc.write_archive(&reference, q.path, body.into_data_stream()).await)
}

/// Changes under a directory as NDJSON [`moat_api::FsEvent`] lines, until the client leaves.
pub async fn watch(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Response, ServiceError> {
    let q = query(q)?;
    Ok(body_of(svc.watch_path(&reference, q.path, q.recursive).await?, "application/x-ndjson", None))
}
