//! `GET /metrics` for Prometheus, and `GET /v1/df`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::extract::{ApiResult, Svc};

pub async fn metrics(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], svc.metrics().await?))
}

pub async fn disk_usage(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.disk_usage().await?))
}
