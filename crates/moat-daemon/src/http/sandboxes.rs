//! Sandboxes: health, create, inspect, the lifecycle operations and leases, and the daemon-wide
//! prune and gc.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use moat_api::{CreateSandbox, ErrorCode, Health, RenewLease};
use serde::Deserialize;

use super::extract::{query, ApiResult, JsonBody, Svc};
use crate::error::ServiceError;
use crate::service::labels::parse_selectors;

pub async fn health(State(svc): Svc) -> Json<Health> {
    Json(svc.health())
}

/// `GET /v1/sandboxes`, with `label` selectors repeated (serde's query structs take a
/// parameter once, so the pairs are read as they come).
pub async fn list(
    State(svc): Svc,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let pairs = query(q)?;
    if let Some((unknown, _)) = pairs.iter().find(|(k, _)| k != "label") {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("unknown query parameter {:?}", unknown.chars().take(64).collect::<String>()),
            "this endpoint takes only label=KEY=VALUE (or label=KEY), repeated",
        ));
    }
    if pairs.len() > moat_api::MAX_LABELS {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("{} label selectors given", pairs.len()),
            format!("select with at most {} labels", moat_api::MAX_LABELS),
        ));
    }
    let selectors = parse_selectors(pairs.iter().map(|(_, v)| v.as_str()))?;
    Ok(Json(svc.list_labeled(&selectors)?))
}

pub async fn create(State(svc): Svc, JsonBody(req): JsonBody<CreateSandbox>) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.create(req).await?)))
}

pub async fn inspect(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.inspect(&reference)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

pub async fn remove(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<RemoveQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let force = query(q)?.force;
    Ok(Json(svc.remove(&reference, force).await?))
}

pub async fn stop(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.stop(&reference).await?))
}

pub async fn start(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.start(&reference).await?))
}

pub async fn renew(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<RenewLease>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.renew(&reference, req.ttl_secs).await?))
}

pub async fn lifecycle(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.lifecycle(&reference)?))
}

pub async fn pause(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.pause(&reference).await?))
}

pub async fn resume(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.resume(&reference).await?))
}

pub async fn prune(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.prune().await?))
}

pub async fn gc(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.gc().await?))
}
