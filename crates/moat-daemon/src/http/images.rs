//! Image operations of the daemon: list, pull (registries), import (archive uploads), build
//! (debootstrap), remove. Long operations run in the background and report progress as NDJSON
//! lines.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use axum::Json;
use futures_util::{Stream, StreamExt};
use moat_api::{BuildImage, ImageInfo, ImageProgress, PullImage, Reclaimed};
use serde::Deserialize;

use super::extract::{query, JsonBody, Svc};
use crate::error::ServiceError;

pub async fn list(State(svc): Svc) -> Result<Json<Vec<ImageInfo>>, ServiceError> {
    Ok(Json(svc.images()?))
}

pub async fn inspect(State(svc): Svc, Path(name): Path<String>) -> Result<Json<ImageInfo>, ServiceError> {
    Ok(Json(svc.image(&name)?))
}

/// Remove an image's name; its base goes too when no other name and no sandbox uses it.
pub async fn remove(State(svc): Svc, Path(name): Path<String>) -> Result<Json<ImageInfo>, ServiceError> {
    Ok(Json(svc.remove_image(&name).await?))
}

/// The progress lines as a chunked NDJSON body. The operation goes on if the client goes away.
fn ndjson(progress: impl Stream<Item = ImageProgress> + Send + 'static) -> Response {
    let stream = progress.map(|m| {
        let mut line = serde_json::to_vec(&m).expect("progress serializes");
        line.push(b'\n');
        Ok::<_, std::io::Error>(line)
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

pub async fn pull(State(svc): Svc, JsonBody(req): JsonBody<PullImage>) -> Result<Response, ServiceError> {
    Ok(ndjson(svc.pull_image(req)?))
}

/// Remove cached layers, interrupted downloads and builds, and image files no name or sandbox
/// needs.
pub async fn gc(State(svc): Svc) -> Result<Json<Reclaimed>, ServiceError> {
    Ok(Json(svc.gc_images()?))
}

pub async fn build(State(svc): Svc, JsonBody(req): JsonBody<BuildImage>) -> Result<Response, ServiceError> {
    Ok(ndjson(svc.build_image(req)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    #[serde(default)]
    name: Option<String>,
}

/// The body is the archive.
pub async fn import(
    State(svc): Svc,
    q: Result<Query<ImportQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ServiceError> {
    let q = query(q)?;
    Ok(ndjson(svc.import_image(q.name, body.into_data_stream()).await?))
}
