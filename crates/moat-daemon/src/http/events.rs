//! The daemon's event log as NDJSON, optionally followed.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::Response;
use serde::Deserialize;

use super::extract::{query, ApiResult, Svc};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    since: i64,
    #[serde(default)]
    follow: bool,
}

/// Events as NDJSON, from `since` on; with `follow` the stream stays open for new ones.
pub async fn events(State(svc): Svc, q: Result<Query<EventsQuery>, QueryRejection>) -> ApiResult<Response> {
    let q = query(q)?;
    let stream = futures_util::stream::unfold((q.since, false), move |(seq, done)| {
        let svc = svc.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let notified = svc.events.notified();
                let batch = svc.db(|db| db.events_after(seq, 256)).unwrap_or_default();
                if let Some(last) = batch.last() {
                    let next = last.seq;
                    let mut body = String::new();
                    for e in &batch {
                        body.push_str(&serde_json::to_string(e).expect("events always serialize"));
                        body.push('\n');
                    }
                    return Some((Ok::<_, std::io::Error>(Bytes::from(body)), (next, false)));
                }
                if !q.follow {
                    return None;
                }
                // Wake on a new event, or now and then in case one was recorded by another path.
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}
