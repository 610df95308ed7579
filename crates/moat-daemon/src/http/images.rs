//! Image operations of the daemon: list, pull (registries), import (archive uploads), build
//! (debootstrap), remove. Long operations run in the background and report progress as NDJSON
//! lines.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use moat_api::{BuildImage, ErrorCode, ImageInfo, ImageProgress, PullImage, Reclaimed};
use moat_image::{Image, PullOptions, PullProgress};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::extract::{query, JsonBody, Svc};
use crate::error::{image_error, ServiceError};
use crate::service::Service;

fn info(i: &Image) -> ImageInfo {
    ImageInfo {
        name: i.name.clone(),
        digest: i.digest.clone(),
        size_bytes: i.size_bytes,
        env: i.config.env.clone(),
        working_dir: i.config.working_dir.clone(),
        user: i.config.user.clone(),
        entrypoint: i.config.entrypoint.clone(),
        cmd: i.config.cmd.clone(),
        source: i.source.clone(),
        created_at: i.created as i64,
    }
}

pub async fn list(State(svc): Svc) -> Result<Json<Vec<ImageInfo>>, ServiceError> {
    let images = svc.rt.images.list().map_err(image_error)?;
    Ok(Json(images.iter().map(info).collect()))
}

pub async fn inspect(State(svc): Svc, Path(name): Path<String>) -> Result<Json<ImageInfo>, ServiceError> {
    Ok(Json(info(&svc.rt.images.resolve(&name).map_err(image_error)?)))
}

/// Remove an image's name; its base goes too when no other name and no sandbox uses it.
pub async fn remove(State(svc): Svc, Path(name): Path<String>) -> Result<Json<ImageInfo>, ServiceError> {
    let image = svc.rt.images.resolve(&name).map_err(image_error)?;
    let users: Vec<String> =
        svc.list()?.into_iter().filter(|s| s.image_digest == image.digest).map(|s| s.name).collect();
    if !users.is_empty() {
        return Err(ServiceError::new(
            ErrorCode::InvalidPhase,
            format!("image {name} is used by sandboxes {}", users.join(", ")),
            "remove those sandboxes first (`moat rm -f`)",
        ));
    }
    // Snapshot disks are layers on the image's base disk.
    let (templates, snapshots): (Vec<_>, Vec<_>) = svc
        .snapshots(None)?
        .into_iter()
        .filter(|s| s.image_digest == image.digest)
        .partition(|s| s.kind == moat_api::SnapshotKind::Template);
    if !snapshots.is_empty() {
        let names: Vec<String> = snapshots.iter().map(|s| s.reference()).collect();
        return Err(ServiceError::new(
            ErrorCode::InUse,
            format!("image {name} is the base of snapshots {}", names.join(", ")),
            format!("remove them first (`moat snapshot rm {}`)", names.join(" ")),
        ));
    }
    for t in templates {
        svc.remove_snapshot(&t.id).await?;
    }
    svc.rt.images.remove(&name).map_err(image_error)?;
    Ok(Json(info(&image)))
}

/// Run a long image operation on a blocking thread and stream its progress, then its result.
fn progress_stream<F>(svc: &Service, op: F) -> Response
where
    F: FnOnce(&mut dyn FnMut(&str)) -> Result<Image, ServiceError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ImageProgress>();
    let busy = svc.hold();
    tokio::task::spawn_blocking(move || {
        let _busy = busy;
        let progress_tx = tx.clone();
        let mut progress = move |m: &str| {
            let _ = progress_tx.send(ImageProgress::Progress { message: m.to_string() });
        };
        let _ = tx.send(outcome(op(&mut progress)));
    });
    ndjson(rx)
}

fn outcome(result: Result<Image, ServiceError>) -> ImageProgress {
    match result {
        Ok(image) => ImageProgress::Done { image: info(&image) },
        Err(e) => ImageProgress::Error { error: e.into() },
    }
}

/// The progress lines as a chunked NDJSON body. The operation goes on if the client goes away.
fn ndjson(rx: tokio::sync::mpsc::UnboundedReceiver<ImageProgress>) -> Response {
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(|m| {
        let mut line = serde_json::to_vec(&m).expect("progress serializes");
        line.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(line))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

pub async fn pull(State(svc): Svc, JsonBody(req): JsonBody<PullImage>) -> Result<Response, ServiceError> {
    moat_image::registry_of(&req.reference).map_err(image_error)?;
    moat_image::validate_image_name(req.name.as_deref().unwrap_or(&req.reference)).map_err(image_error)?;
    let credentials = match (req.username, req.password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => {
            return Err(ServiceError::new(
                ErrorCode::InvalidRequest,
                "a username needs a password and a password a username",
                "give both, or neither for anonymous access",
            ))
        }
    };
    let options = PullOptions { insecure: req.insecure, credentials };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ImageProgress>();
    let busy = svc.hold();
    tokio::spawn(async move {
        let _busy = busy;
        let progress_tx = tx.clone();
        let progress = move |p: PullProgress| {
            let _ = progress_tx.send(match p {
                PullProgress::Message(message) => ImageProgress::Progress { message },
                PullProgress::Layer { digest, done, total } => ImageProgress::Layer { digest, done, total },
            });
        };
        let result = moat_image::pull(&svc.rt.images, &req.reference, req.name.as_deref(), &options, &progress).await;
        if let Err(e) = &result {
            tracing::warn!(reference = %req.reference, error = %e, "pull failed");
        }
        let _ = tx.send(outcome(result.map_err(image_error)));
    });
    Ok(ndjson(rx))
}

/// Remove cached layers, interrupted downloads and builds, and image files no name or sandbox
/// needs.
pub async fn gc(State(svc): Svc) -> Result<Json<Reclaimed>, ServiceError> {
    let paths = tokio::task::block_in_place(|| svc.image_gc())?;
    Ok(Json(Reclaimed { paths, ..Reclaimed::default() }))
}

pub async fn build(State(svc): Svc, JsonBody(req): JsonBody<BuildImage>) -> Result<Response, ServiceError> {
    moat_image::validate_image_name(&req.name).map_err(image_error)?;
    let recipe = moat_image::DebianRecipe::from_ref(&req.from, &req.packages).map_err(image_error)?;
    Ok(progress_stream(&svc.clone(), move |progress| {
        moat_image::build_debian(&svc.rt.images, &req.name, &recipe, progress).map_err(image_error)
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    #[serde(default)]
    name: Option<String>,
}

/// The body is the archive; it is spooled to a file in the store first (the archive's manifest
/// may come last), then imported.
pub async fn import(
    State(svc): Svc,
    q: Result<Query<ImportQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ServiceError> {
    let _busy = svc.hold(); // The upload itself may take longer than the idle timeout.
    let _spooling = svc.rt.images.begin_operation().map_err(image_error)?;
    let q = query(q)?;
    if let Some(name) = &q.name {
        moat_image::validate_image_name(name).map_err(image_error)?;
    }
    let spool = tempfile::Builder::new().prefix("tmp-upload-").tempfile_in(svc.rt.images.root()).map_err(|e| {
        ServiceError::new(ErrorCode::Internal, format!("cannot spool the upload: {e}"), "check free disk space")
    })?;
    let mut file = tokio::fs::File::from_std(spool.reopen().map_err(|e| {
        ServiceError::new(ErrorCode::Internal, format!("cannot spool the upload: {e}"), "check free disk space")
    })?);
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| {
            ServiceError::new(ErrorCode::InvalidRequest, format!("the upload broke off: {e}"), "send it again")
        })?;
        file.write_all(&chunk).await.map_err(|e| {
            ServiceError::new(ErrorCode::Internal, format!("cannot spool the upload: {e}"), "check free disk space")
        })?;
    }
    file.flush().await.ok();
    drop(file);
    Ok(progress_stream(&svc.clone(), move |progress| {
        let archive = std::fs::File::open(spool.path()).map_err(|e| {
            ServiceError::new(ErrorCode::Internal, format!("cannot read the upload: {e}"), "send it again")
        })?;
        moat_image::import_archive(&svc.rt.images, std::io::BufReader::new(archive), q.name.as_deref(), progress)
            .map_err(image_error)
    }))
}
