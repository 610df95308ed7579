//! A sandbox's console and QEMU logs, as plain text, optionally followed.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use moat_api::LogSource;
use serde::Deserialize;

use super::extract::{query, ApiResult, Svc};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    #[serde(default)]
    source: LogSource,
    #[serde(default)]
    follow: bool,
}

pub async fn logs(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let stream = svc.logs(&reference, q.source, q.follow)?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}
