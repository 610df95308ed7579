//! Exec over a WebSocket: the start message, then output to the client (binary, tagged by stream)
//! and stdin, signals and resizes from it, until the process exits or the client leaves.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use moat_api::{ErrorCode, ExecClientMessage, ExecServerMessage, ExecStart, STDERR_TAG, STDOUT_TAG};
use moat_proto::ExecRequest;
use moat_sandbox::ExecEvent;

use super::extract::{ApiResult, Svc};
use crate::error::ServiceError;
use crate::net::with_net_env;
use crate::service::Service;

/// How long a client may take to send the exec start message.
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn exec(State(svc): Svc, Path(reference): Path<String>, ws: WebSocketUpgrade) -> ApiResult<Response> {
    // Resolve before upgrading, so an unknown or stopped sandbox is a plain HTTP error.
    let (info, _) = svc.running(&reference)?;
    Ok(ws.max_message_size(1 << 20).on_upgrade(move |socket| exec_session(svc, info.id, socket)))
}

pub(crate) async fn send_json(
    ws: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
    m: &ExecServerMessage,
) -> bool {
    let text = serde_json::to_string(m).expect("exec messages always serialize");
    ws.send(WsMessage::Text(text.into())).await.is_ok()
}

/// One exec over a WebSocket: the first text message is an [`ExecStart`]; then output flows to the
/// client (binary, tagged) as fast as it reads it, which is what grants the guest more credit.
async fn exec_session(svc: Arc<Service>, id: String, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let start: Result<ExecStart, ServiceError> = match tokio::time::timeout(EXEC_START_TIMEOUT, rx.next()).await {
        Ok(Some(Ok(WsMessage::Text(t)))) => serde_json::from_str(&t).map_err(|e| {
            ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("the exec start message is not valid: {e}"),
                "send an ExecStart JSON object first",
            )
        }),
        // Most likely a message over the size limit: say so, rather than that none came.
        Ok(Some(Err(e))) => Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("the exec start message could not be read: {e}"),
            "an exec start message is at most 1 MiB: pass large data on stdin or in a file (`moat cp`), not in \
             arguments or the environment",
        )),
        _ => Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            "no exec start message arrived",
            "send an ExecStart JSON object first",
        )),
    };
    let remove_after = start.as_ref().is_ok_and(|s| s.remove_sandbox_after);
    let outcome = match start {
        Ok(start) => run_exec(&svc, &id, start, &mut tx, rx).await,
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        let _ = send_json(&mut tx, &ExecServerMessage::Error { error: e.into() }).await;
    }
    let _ = tx.close().await;
    if remove_after {
        if let Err(e) =
            svc.remove(&id, true)
                .await
                .map(drop)
                .or_else(|e| if e.code == ErrorCode::NotFound { Ok(()) } else { Err(e) })
        {
            tracing::warn!(sandbox = %id, error = %e, "removing a one-shot sandbox failed");
        }
    }
}

async fn run_exec(
    svc: &Arc<Service>,
    id: &str,
    start: ExecStart,
    tx: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
    rx: futures_util::stream::SplitStream<WebSocket>,
) -> Result<(), ServiceError> {
    let (info, sandbox) = svc.running(id)?;
    if start.remove_sandbox_after {
        // This session owns the sandbox's life now; it must not expire under the command.
        svc.clear_lease(id)?;
    }
    let argv = if start.argv.is_empty() {
        // No command: the image's Entrypoint and Cmd, as `docker run IMAGE` does.
        let config = &sandbox.image.config;
        config.entrypoint.iter().chain(&config.cmd).cloned().collect()
    } else {
        start.argv
    };
    if argv.is_empty() {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            "no command given, and the image has no Entrypoint or Cmd",
            "give the command after `--`",
        ));
    }
    let max_output = start.max_output_bytes;
    if start.tty.is_some_and(|t| t.rows == 0 || t.cols == 0) {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            "a terminal needs at least one row and one column",
            "send the client terminal's size, e.g. {\"rows\": 24, \"cols\": 80}",
        ));
    }
    let request = ExecRequest {
        argv,
        env: with_net_env(&info, start.env),
        cwd: start.cwd,
        user: start.user,
        timeout_ms: start.timeout_ms,
        stdin: start.stdin,
        tty: start.tty.map(|t| moat_proto::TtySize { rows: t.rows, cols: t.cols }),
        detach: false,
    };
    let exec = sandbox.exec(request).await.map_err(|e| match e {
        // The arguments and the environment, the image's included, travel in one agent message.
        moat_sandbox::SandboxError::Link(moat_sandbox::LinkError::TooLarge { size }) => ServiceError::new(
            ErrorCode::InvalidRequest,
            format!(
                "the command's arguments and environment (with the image's) take {size} bytes; at most {} fit \
                 one message to the sandbox",
                moat_proto::MAX_PAYLOAD
            ),
            "pass large data on stdin or in a file (`moat cp`), not in arguments or the environment",
        ),
        e => {
            ServiceError::new(ErrorCode::ExecFailed, e.to_string(), "check the command, its working directory and user")
        }
    })?;
    if !send_json(tx, &ExecServerMessage::Started { pid: exec.pid() }).await {
        return Ok(()); // The client left; dropping the exec kills the process.
    }
    forward_exec(exec, tx, rx, max_output).await
}

/// Relay a started exec (or an attach) over the WebSocket until it exits or the client leaves.
pub(crate) async fn forward_exec(
    mut exec: moat_sandbox::Exec,
    tx: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
    rx: futures_util::stream::SplitStream<WebSocket>,
    max_output: Option<u64>,
) -> Result<(), ServiceError> {
    let control = exec.control();
    // Client → guest in its own task, so waiting for stdin credit never stalls the output.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let mut rx_task = tokio::spawn(pump_client(rx, control, gone_tx));
    // Output past the limit is read (the process runs on) but not sent; one marker says so.
    let mut budget = max_output.unwrap_or(u64::MAX);
    let mut limited = |tag: u8, mut d: Vec<u8>| {
        if budget == 0 {
            return None;
        }
        let mut marker = None;
        if d.len() as u64 > budget {
            d.truncate(budget as usize);
            marker = Some(format!("\n[moat: output truncated after {} bytes]\n", max_output.unwrap_or(0)));
        }
        budget -= d.len() as u64;
        Some((tag, d, marker))
    };
    let result = loop {
        tokio::select! {
            event = exec.next_event() => match event {
                Ok(ExecEvent::Stdout(d)) => if !send_limited(tx, limited(STDOUT_TAG, d)).await { break Ok(()) },
                Ok(ExecEvent::Stderr(d)) => if !send_limited(tx, limited(STDERR_TAG, d)).await { break Ok(()) },
                Ok(ExecEvent::Exit(s)) => {
                    send_json(tx, &ExecServerMessage::Exit { code: s.code, signal: s.signal, timed_out: s.timed_out }).await;
                    break Ok(());
                }
                Err(e) => break Err(ServiceError::new(ErrorCode::ExecFailed, e.to_string(), "the sandbox may have stopped; see `moat inspect`")),
            },
            _ = &mut gone => break Ok(()), // Client gone: dropping `exec` kills the process group.
        }
    };
    rx_task.abort();
    let _ = (&mut rx_task).await;
    result
}

async fn send_limited(
    tx: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
    chunk: Option<(u8, Vec<u8>, Option<String>)>,
) -> bool {
    let Some((tag, data, marker)) = chunk else { return true };
    send_data(tx, tag, data).await
        && (marker.is_none() || send_data(tx, STDERR_TAG, marker.unwrap_or_default().into_bytes()).await)
}

async fn send_data(tx: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>, tag: u8, data: Vec<u8>) -> bool {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(tag);
    frame.extend(data);
    tx.send(WsMessage::Binary(frame.into())).await.is_ok()
}

/// Forward stdin and signals from the client; tell the session when the client is gone.
async fn pump_client(
    mut rx: futures_util::stream::SplitStream<WebSocket>,
    control: moat_sandbox::ExecControl,
    gone: tokio::sync::oneshot::Sender<()>,
) {
    while let Some(Ok(msg)) = rx.next().await {
        let ok = match msg {
            WsMessage::Binary(data) => control.write_stdin(&data).await.is_ok(),
            WsMessage::Text(t) => match serde_json::from_str::<ExecClientMessage>(&t) {
                Ok(ExecClientMessage::Signal { signal }) if (1..=64).contains(&signal) => {
                    control.signal(signal).await.is_ok()
                }
                Ok(ExecClientMessage::StdinEof) => control.close_stdin().await.is_ok(),
                Ok(ExecClientMessage::Resize { rows, cols }) if rows > 0 && cols > 0 => {
                    control.resize(moat_proto::TtySize { rows, cols }).await.is_ok()
                }
                _ => true, // Unknown control messages are ignored, not fatal.
            },
            WsMessage::Close(_) => break,
            _ => true,
        };
        if !ok {
            // The process is gone or stdin is closed; keep reading for signals and the close.
            continue;
        }
    }
    let _ = gone.send(());
}
