//! Exec over a WebSocket: the start message, then output to the client (binary, tagged by stream)
//! and stdin, signals and resizes from it, until the process exits or the client leaves. The
//! service runs the session ([`Service::exec`]); this file only carries it over the socket.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use moat_api::{ErrorCode, ExecClientMessage, ExecServerMessage, ExecStart, STDERR_TAG, STDOUT_TAG};

use super::extract::{ApiResult, Svc};
use crate::error::ServiceError;
use crate::service::exec::{Output, Session, SessionInput};
use crate::service::Service;

/// How long a client may take to send the exec start message.
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn exec(State(svc): Svc, Path(reference): Path<String>, ws: WebSocketUpgrade) -> ApiResult<Response> {
    // Resolve before upgrading, so an unknown or stopped sandbox is a plain HTTP error.
    let id = svc.running_sandbox(&reference)?.id;
    Ok(ws.max_message_size(1 << 20).on_upgrade(move |socket| exec_session(svc, id, socket)))
}

pub(super) async fn send_json(ws: &mut SplitSink<WebSocket, WsMessage>, m: &ExecServerMessage) -> bool {
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
    let session = match start {
        Ok(start) => svc.exec(&id, start).await,
        Err(e) => Err(e),
    };
    let mut session = match session {
        Ok(session) => session,
        Err(e) => {
            let _ = send_json(&mut tx, &ExecServerMessage::Error { error: e.into() }).await;
            let _ = tx.close().await;
            return;
        }
    };
    // If the client has left already, finishing the session ends the process.
    if send_json(&mut tx, &ExecServerMessage::Started { pid: session.pid() }).await {
        if let Err(e) = forward(&mut session, &mut tx, rx).await {
            let _ = send_json(&mut tx, &ExecServerMessage::Error { error: e.into() }).await;
        }
    }
    let _ = tx.close().await;
    session.finish().await;
}

/// Relay a session (an exec or an attach) over the WebSocket until it exits or the client leaves.
pub(super) async fn forward(
    session: &mut Session,
    tx: &mut SplitSink<WebSocket, WsMessage>,
    rx: SplitStream<WebSocket>,
) -> Result<(), ServiceError> {
    // Client → guest in its own task, so waiting for stdin credit never stalls the output.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let mut rx_task = tokio::spawn(pump_client(rx, session.input(), gone_tx));
    let result = loop {
        tokio::select! {
            output = session.next() => match output {
                Ok(Output::Stdout(d)) => if !send_data(tx, STDOUT_TAG, d).await { break Ok(()) },
                Ok(Output::Stderr(d)) => if !send_data(tx, STDERR_TAG, d).await { break Ok(()) },
                Ok(Output::Exit { code, signal, timed_out }) => {
                    send_json(tx, &ExecServerMessage::Exit { code, signal, timed_out }).await;
                    break Ok(());
                }
                Err(e) => break Err(e),
            },
            _ = &mut gone => break Ok(()), // Client gone: finishing the session ends the process.
        }
    };
    rx_task.abort();
    let _ = (&mut rx_task).await;
    result
}

async fn send_data(tx: &mut SplitSink<WebSocket, WsMessage>, tag: u8, data: Vec<u8>) -> bool {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(tag);
    frame.extend(data);
    tx.send(WsMessage::Binary(frame.into())).await.is_ok()
}

/// Forward stdin, signals and resizes from the client; tell the session when the client is gone.
/// What the process no longer takes (it has ended, or closed its stdin) and control messages that
/// are unknown or out of range are ignored: the client may still send a signal or the close.
/// Stdin messages (each at most the WebSocket's message limit) queued ahead of the process.
const STDIN_QUEUE: usize = 8;

async fn pump_client(mut rx: SplitStream<WebSocket>, input: SessionInput, gone: tokio::sync::oneshot::Sender<()>) {
    // Stdin goes through a queue of its own: a process that stops reading its input must not
    // hold up a signal or a resize sent after the stdin it does not read.
    let (stdin, mut queued) = tokio::sync::mpsc::channel::<Option<axum::body::Bytes>>(STDIN_QUEUE);
    let writer = {
        let input = input.clone();
        tokio::spawn(async move {
            while let Some(data) = queued.recv().await {
                let written = match data {
                    Some(data) => input.write(&data).await,
                    None => input.close().await,
                };
                if written.is_err() {
                    break;
                }
            }
        })
    };
    while let Some(Ok(msg)) = rx.next().await {
        let _ = match msg {
            WsMessage::Binary(data) => stdin.send(Some(data)).await.map_err(|_| ()),
            WsMessage::Text(t) => match serde_json::from_str::<ExecClientMessage>(&t) {
                Ok(ExecClientMessage::Signal { signal }) => input.signal(signal).await.map_err(|_| ()),
                Ok(ExecClientMessage::StdinEof) => stdin.send(None).await.map_err(|_| ()),
                Ok(ExecClientMessage::Resize { rows, cols }) => input.resize(rows, cols).await.map_err(|_| ()),
                _ => Ok(()),
            },
            WsMessage::Close(_) => break,
            _ => Ok(()),
        };
    }
    // What was queued is still written; the writer ends with the queue.
    drop(stdin);
    drop(writer);
    let _ = gone.send(());
}
