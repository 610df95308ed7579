//! `POST /v1/bundle`: a support bundle as a gzipped tar.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use moat_api::CreateBundle;

use super::extract::{ApiResult, JsonBody, Svc};

pub async fn bundle(State(svc): Svc, JsonBody(req): JsonBody<CreateBundle>) -> ApiResult<impl IntoResponse> {
    let gz = svc.bundle(req).await?;
    Ok(([(header::CONTENT_TYPE, "application/gzip")], gz))
}
