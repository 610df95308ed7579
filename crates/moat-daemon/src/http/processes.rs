//! Background processes in a sandbox (`moat exec -d`): start, list, attach to their output
//! (what they printed while nobody watched, then live), and signal them. The agent keeps them, so
//! they survive the request that started them and daemon restarts.

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use moat_api::{ErrorCode, ExecServerMessage, JobInfo, KillProcess, ProcessStarted, StartProcess};
use moat_proto::{ExecRequest, Request, Started};
use serde::Deserialize;

use super::exec_ws::{forward_exec, send_json};
use super::extract::{query, JsonBody, Svc};
use crate::error::{process_error, ServiceError};
use crate::net::with_net_env;

pub async fn start(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<StartProcess>,
) -> Result<Json<ProcessStarted>, ServiceError> {
    let (info, sandbox) = svc.running(&reference)?;
    if req.argv.is_empty() {
        return Err(ServiceError::new(ErrorCode::InvalidRequest, "no command given", "give the command after `--`"));
    }
    let request = ExecRequest {
        argv: req.argv,
        env: with_net_env(&info, req.env),
        cwd: req.cwd,
        user: req.user,
        detach: true,
        ..Default::default()
    };
    let exec = sandbox.exec(request).await.map_err(|e| {
        ServiceError::new(ErrorCode::ExecFailed, e.to_string(), "check the command, its working directory and user")
    })?;
    Ok(Json(ProcessStarted { pid: exec.pid() }))
}

pub async fn list(State(svc): Svc, Path(reference): Path<String>) -> Result<Json<Vec<JobInfo>>, ServiceError> {
    let (_, sandbox) = svc.running(&reference)?;
    match sandbox.request(Request::Jobs).await.map_err(process_error)? {
        Started::Jobs { jobs } => Ok(Json(jobs)),
        other => {
            Err(ServiceError::new(ErrorCode::Internal, format!("the agent answered {other:?}"), "report this as a bug"))
        }
    }
}

pub async fn kill(
    State(svc): Svc,
    Path((reference, pid)): Path<(String, u32)>,
    JsonBody(req): JsonBody<KillProcess>,
) -> Result<Json<serde_json::Value>, ServiceError> {
    let (_, sandbox) = svc.running(&reference)?;
    sandbox.request(Request::Kill { pid, signal: req.signal }).await.map_err(process_error)?;
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
    let (_, sandbox) = svc.running(&reference)?;
    // Opened before upgrading, so an unknown pid is a plain HTTP error.
    let exec = sandbox.file_stream(Request::Attach { pid, replay }).await.map_err(process_error)?;
    Ok(ws.max_message_size(1 << 20).on_upgrade(move |socket: WebSocket| async move {
        let (mut tx, rx) = socket.split();
        if let Err(e) = forward_exec(exec, &mut tx, rx, None).await {
            let _ = send_json(&mut tx, &ExecServerMessage::Error { error: e.into() }).await;
        }
        let _ = tx.close().await;
    }))
}
