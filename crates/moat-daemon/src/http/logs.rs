//! A sandbox's console and QEMU logs, as plain text, optionally followed.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use moat_api::LogsQuery;

use super::extract::{query, ApiResult, Svc};

pub async fn logs(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let stream = svc.logs(&reference, &q)?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}
