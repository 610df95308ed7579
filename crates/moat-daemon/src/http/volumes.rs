//! Named volumes: create, list, inspect and remove them.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use moat_api::{CreateVolume, RemoveVolumeQuery};

use super::extract::{query, ApiResult, JsonBody, Svc};

pub async fn list(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.volumes()?))
}

pub async fn create(State(svc): Svc, JsonBody(req): JsonBody<CreateVolume>) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.create_volume(req).await?)))
}

pub async fn inspect(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.volume(&reference)?))
}

pub async fn remove(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<RemoveVolumeQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let force = query(q)?.force;
    Ok(Json(svc.remove_volume(&reference, force).await?))
}
