//! The daemon's event log as NDJSON, filtered, optionally followed.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::Response;
use futures_util::StreamExt;
use moat_api::EventsQuery;

use super::extract::{query, ApiResult, Svc};

/// Events as NDJSON, from `since` on; with `follow` the stream stays open for new ones.
pub async fn events(State(svc): Svc, q: Result<Query<EventsQuery>, QueryRejection>) -> ApiResult<Response> {
    let q = query(q)?;
    let stream = svc.events(&q)?.map(|batch| {
        let mut body = Vec::new();
        for e in &batch {
            serde_json::to_writer(&mut body, e).expect("events always serialize");
            body.push(b'\n');
        }
        Ok::<_, std::io::Error>(body)
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}
