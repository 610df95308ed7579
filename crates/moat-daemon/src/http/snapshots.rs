//! Snapshots: take, list, inspect and remove them; revert a sandbox to one; fork a sandbox or a
//! snapshot; push them to and pull them from registries.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use moat_api::{CreateSnapshot, Fork, Revert, SnapshotTransfer};

use super::extract::{ApiResult, JsonBody, Svc};

pub async fn snapshot(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<CreateSnapshot>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.snapshot(&reference, req.name).await?)))
}

pub async fn sandbox_snapshots(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.snapshots(Some(&reference))?))
}

pub async fn snapshots(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.snapshots(None)?))
}

pub async fn inspect_snapshot(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.resolve_snapshot(&reference)?))
}

pub async fn remove_snapshot(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.remove_snapshot(&reference).await?))
}

pub async fn revert(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<Revert>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.revert(&reference, &req.snapshot).await?))
}

pub async fn fork(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<Fork>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.fork(&reference, req).await?)))
}

pub async fn fork_snapshot(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<Fork>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.fork_snapshot(&reference, req).await?)))
}

pub async fn push(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<SnapshotTransfer>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.push_snapshot(&reference, req).await?))
}

pub async fn pull(State(svc): Svc, JsonBody(req): JsonBody<SnapshotTransfer>) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.pull_snapshot(req).await?)))
}
