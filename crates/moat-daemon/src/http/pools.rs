//! Warm pools: list them, set their sizes.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use moat_api::SetPool;

use super::extract::{ApiResult, JsonBody, Svc};

pub async fn list(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.pools()?))
}

pub async fn set(State(svc): Svc, JsonBody(req): JsonBody<SetPool>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.set_pool(&req)?))
}
