//! Background processes in a sandbox (`moat exec -d`): start, list, attach to their output
//! (what they printed while nobody watched, then live), and signal them.

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use moat_api::{ExecServerMessage, JobInfo, KillProcess, ProcessStarted, StartProcess};
use serde::Deserialize;

use super::exec_ws::{forward, send_json};
use super::extract::{query, JsonBody, Svc};
use crate::error::ServiceError;

pub async fn start(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<StartProcess>,
) -> Result<Json<ProcessStarted>, ServiceError> {
    Ok(Json(svc.start_process(&reference, req).await?))
}

pub async fn list(State(svc): Svc, Path(reference): Path<String>) -> Result<Json<Vec<JobInfo>>, ServiceError> {
    Ok(Json(svc.processes(&reference).await?))
}

pub async fn kill(
    State(svc): Svc,
    Path((reference, pid)): Path<(String, u32)>,
    JsonBody(req): JsonBody<KillProcess>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    svc.kill_process(&reference, pid, req.signal).await?;
    Ok(Json(serde_json::json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachQuery {
    /// Send what the process printed before the attach first [default: true].
    #[serde(default)]
    replay: Option<bool>,
}

/// A WebSocket with the exec protocol's output messages (no `started`): the output, then `exit`.
/// Closing it leaves the process running.
pub async fn attach(
    State(svc): Svc,
    Path((reference, pid)): Path<(String, u32)>,
    q: Result<Query<AttachQuery>, QueryRejection>,
    ws: WebSocketUpgrade,
) -> Result<Response, ServiceError> {
    let replay = query(q)?.replay.unwrap_or(true);
    // Opened before upgrading, so an unknown pid is a plain HTTP error.
    let mut session = svc.attach(&reference, pid, replay).await?;
    Ok(ws.max_message_size(1 << 20).on_upgrade(move |socket: WebSocket| async move {
        let (mut tx, rx) = socket.split();
        if let Err(e) = forward(&mut session, &mut tx, rx).await {
            let _ = send_json(&mut tx, &ExecServerMessage::Error { error: e.into() }).await;
        }
        let _ = tx.close().await;
        session.finish().await;
    }))
}
