//! The REST API: JSON over HTTP/1.1, on the unix socket (and optionally TCP with a bearer token).
//! Exec is a WebSocket; logs and events stream as chunked bodies.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use moat_api::{
    ApiError, CreateSandbox, CreateSnapshot, ErrorCode, ExecClientMessage, ExecServerMessage, ExecStart, Fork, Health,
    LogSource, RenewLease, Revert, MAX_BODY, STDERR_TAG, STDOUT_TAG,
};
use moat_proto::ExecRequest;
use moat_sandbox::ExecEvent;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::service::{Service, ServiceError};

/// The checked-in OpenAPI document, served as is.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// How long a client may take to send the exec start message.
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(30);

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ApiError { code: self.code, message: self.message, hint: self.hint };
        (status, Json(body)).into_response()
    }
}

/// A JSON body, bounded by [`MAX_BODY`], whose errors are API errors.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ServiceError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY).await.map_err(|_| {
            ServiceError::new(
                ErrorCode::BodyTooLarge,
                format!("the request body is larger than {MAX_BODY} bytes"),
                "send a smaller body",
            )
        })?;
        let bytes = if bytes.is_empty() { Bytes::from_static(b"{}") } else { bytes };
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("the request body is not valid JSON for this endpoint: {e}"),
                "see docs/openapi.json for the request schema",
            )
        })
    }
}

type Svc = State<Arc<Service>>;
type ApiResult<T> = Result<T, ServiceError>;

/// All routes, on top of the service. `/mcp` is the MCP server (streamable HTTP), a client of
/// these same routes through the daemon's own socket.
pub fn router(svc: Arc<Service>, mcp: moat_mcp::Policy) -> Router {
    let mcp = moat_mcp::http_service(&crate::socket_path(&svc.rt.config.home), mcp);
    Router::new()
        .route("/mcp", axum::routing::any_service(mcp))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/v1/health", get(health))
        .route("/v1/sandboxes", get(list).post(create))
        .route("/v1/sandboxes/{reference}", get(inspect).delete(remove))
        .route("/v1/sandboxes/{reference}/stop", post(stop))
        .route("/v1/sandboxes/{reference}/start", post(start))
        .route("/v1/sandboxes/{reference}/lease", post(renew))
        .route("/v1/sandboxes/{reference}/lifecycle", get(lifecycle))
        .route("/v1/sandboxes/{reference}/snapshots", get(sandbox_snapshots).post(snapshot))
        .route("/v1/sandboxes/{reference}/revert", post(revert))
        .route("/v1/sandboxes/{reference}/fork", post(fork))
        .route("/v1/sandboxes/{reference}/pause", post(pause))
        .route("/v1/sandboxes/{reference}/resume", post(resume))
        .route("/v1/sandboxes/{reference}/net", get(net))
        .route("/v1/sandboxes/{reference}/net/allow", post(change_allowlist))
        .route("/v1/sandboxes/{reference}/ports", get(ports).post(add_port))
        .route("/v1/sandboxes/{reference}/ports/{host_port}", delete(remove_port))
        .route("/v1/snapshots", get(snapshots))
        .route("/v1/snapshots/{reference}", get(inspect_snapshot).delete(remove_snapshot))
        .route("/v1/sandboxes/{reference}/exec", get(exec))
        .route("/v1/sandboxes/{reference}/logs", get(logs))
        .route("/v1/sandboxes/{reference}/processes", get(crate::processes::list).post(crate::processes::start))
        .route("/v1/sandboxes/{reference}/processes/{pid}/attach", get(crate::processes::attach))
        .route("/v1/sandboxes/{reference}/processes/{pid}/kill", post(crate::processes::kill))
        .route("/v1/sandboxes/{reference}/files/stat", get(crate::files::stat))
        .route("/v1/sandboxes/{reference}/files/list", get(crate::files::list))
        .route("/v1/sandboxes/{reference}/files/mkdir", post(crate::files::mkdir))
        .route("/v1/sandboxes/{reference}/files/remove", post(crate::files::remove))
        .route("/v1/sandboxes/{reference}/files/rename", post(crate::files::rename))
        .route("/v1/sandboxes/{reference}/files/chmod", post(crate::files::chmod))
        .route("/v1/sandboxes/{reference}/files/watch", get(crate::files::watch))
        .route(
            "/v1/sandboxes/{reference}/files/content",
            get(crate::files::read_content)
                .put(crate::files::write_content)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/sandboxes/{reference}/archive",
            get(crate::files::read_archive)
                .put(crate::files::write_archive)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/events", get(events))
        .route("/v1/images", get(crate::images::list))
        .route("/v1/images/build", post(crate::images::build))
        .route("/v1/images/pull", post(crate::images::pull))
        .route("/v1/images/gc", post(crate::images::gc))
        .route("/v1/images/import", post(crate::images::import).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/v1/images/{*name}", get(crate::images::inspect).delete(crate::images::remove))
        .route("/v1/prune", post(prune))
        .route("/v1/gc", post(gc))
        .fallback(|| async {
            ServiceError::new(ErrorCode::NotFound, "no such endpoint", "see /openapi.json for the endpoints")
        })
        .with_state(svc)
}

/// For the TCP listener: every request needs `Authorization: Bearer <token>`.
pub async fn require_token(token: Arc<String>, req: Request, next: Next) -> Response {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time: the token is a secret and the caller may be remote.
    let ok = given.is_some_and(|g| {
        g.len() == token.len() && g.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    });
    if !ok {
        let e = ApiError {
            code: ErrorCode::InvalidRequest,
            message: "missing or wrong bearer token".into(),
            hint: "send `Authorization: Bearer <token>` with the token from $MOAT_HOME/token".into(),
        };
        return (StatusCode::UNAUTHORIZED, Json(e)).into_response();
    }
    next.run(req).await
}

async fn health(State(svc): Svc) -> Json<Health> {
    Json(Health {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        accel: svc.rt.accel.accel.to_string(),
        accel_reason: svc.rt.accel.reason.clone(),
        qemu_version: svc.rt.qemu_version.clone(),
        kernel: svc.rt.kernel.release.clone(),
        kernel_path: svc.rt.kernel.path.display().to_string(),
        sandboxes: svc.live_count(),
        max_sandboxes: svc.limits.max_sandboxes,
    })
}

async fn list(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.list()?))
}

async fn create(State(svc): Svc, JsonBody(req): JsonBody<CreateSandbox>) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.create(req).await?)))
}

async fn inspect(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.resolve(&reference)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

/// A query string the endpoint does not take is a clear error, not a plain-text rejection.
pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ServiceError> {
    q.map(|q| q.0).map_err(|e| {
        ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("bad query string: {e}"),
            "see /openapi.json for the parameters",
        )
    })
}

async fn remove(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<RemoveQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let force = query(q)?.force;
    Ok(Json(svc.remove(&reference, force).await?))
}

async fn stop(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.stop(&reference).await?))
}

async fn start(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.start(&reference).await?))
}

async fn renew(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<RenewLease>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.renew(&reference, req.ttl_secs).await?))
}

async fn lifecycle(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    let info = svc.resolve(&reference)?;
    Ok(Json(svc.db(|db| db.lifecycle(&info.id))?))
}

async fn snapshot(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<CreateSnapshot>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.snapshot(&reference, req.name).await?)))
}

async fn sandbox_snapshots(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.snapshots(Some(&reference))?))
}

async fn snapshots(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.snapshots(None)?))
}

async fn inspect_snapshot(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.resolve_snapshot(&reference)?))
}

async fn remove_snapshot(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.remove_snapshot(&reference).await?))
}

async fn net(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<Json<moat_api::NetSpec>> {
    Ok(Json(svc.resolve(&reference)?.net))
}

async fn change_allowlist(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<moat_api::ChangeAllowlist>,
) -> ApiResult<Json<moat_api::NetSpec>> {
    Ok(Json(svc.change_allowlist(&reference, req).await?))
}

async fn ports(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<Json<Vec<moat_api::PortForward>>> {
    Ok(Json(svc.resolve(&reference)?.net.ports))
}

async fn add_port(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<moat_api::PortForward>,
) -> ApiResult<Json<moat_api::PortForward>> {
    Ok(Json(svc.add_port(&reference, req).await?))
}

async fn remove_port(
    State(svc): Svc,
    Path((reference, host_port)): Path<(String, u16)>,
) -> ApiResult<Json<moat_api::NetSpec>> {
    Ok(Json(svc.remove_port(&reference, host_port).await?))
}

async fn revert(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<Revert>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.revert(&reference, &req.snapshot).await?))
}

async fn fork(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<Fork>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(svc.fork(&reference, req).await?)))
}

async fn pause(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.pause(&reference).await?))
}

async fn resume(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.resume(&reference).await?))
}

async fn prune(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.prune().await?))
}

async fn gc(State(svc): Svc) -> ApiResult<impl IntoResponse> {
    Ok(Json(svc.gc().await?))
}

async fn exec(State(svc): Svc, Path(reference): Path<String>, ws: WebSocketUpgrade) -> ApiResult<Response> {
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
        let _ = send_json(
            &mut tx,
            &ExecServerMessage::Error { error: ApiError { code: e.code, message: e.message, hint: e.hint } },
        )
        .await;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    source: LogSource,
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let info = svc.resolve(&reference)?;
    let file = svc.rt.config.run_dir().join(&info.id).join(match q.source {
        LogSource::Console => "console.log",
        LogSource::Qemu => "qemu.log",
    });
    let svc2 = svc.clone();
    let id = info.id.clone();
    // The console's previous part (moved aside when it reached its cap) comes first.
    let earlier = match q.source {
        LogSource::Console => Some(moat_vmm::rotated_console_log(&file)),
        LogSource::Qemu => None,
    };
    let earlier = futures_util::stream::iter(earlier).flat_map(|f| async_stream_file(f, false, || false));
    let stream = earlier.chain(async_stream_file(file, q.follow, move || {
        svc2.db(|db| db.get(&id)).ok().flatten().is_some_and(|s| s.phase.is_live())
    }));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}

/// A process's environment: the sandbox's (secret placeholders, where moat's CA is), then the
/// caller's, which wins.
pub(crate) fn with_net_env(info: &moat_api::SandboxInfo, env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut all = crate::net::guest_env(&info.net);
    all.extend(env);
    all
}

/// The file's bytes from the start; with `follow`, keep sending what is appended while `alive()`
/// (from the start again when the file is emptied, as a console log is at its cap).
fn async_stream_file(
    path: std::path::PathBuf,
    follow: bool,
    alive: impl Fn() -> bool + Send + 'static,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    futures_util::stream::unfold((None::<tokio::fs::File>, false), move |(file, done)| {
        let path = path.clone();
        let alive_now = if done { false } else { alive() };
        async move {
            if done {
                return None;
            }
            let mut file = match file {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(_) => return None,
                },
            };
            let mut buf = vec![0u8; 64 * 1024];
            match file.read(&mut buf).await {
                Ok(0) if follow && alive_now => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let read_to = file.stream_position().await.unwrap_or(0);
                    if file.metadata().await.is_ok_and(|m| m.len() < read_to) {
                        let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                    }
                    // Yield an empty chunk so the caller re-checks `alive`.
                    Some((Ok(Bytes::new()), (Some(file), false)))
                }
                Ok(0) => None,
                Ok(n) => Some((Ok(Bytes::copy_from_slice(&buf[..n])), (Some(file), false))),
                Err(e) => Some((Err(e), (None, true))),
            }
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    since: i64,
    #[serde(default)]
    follow: bool,
}

/// Events as NDJSON, from `since` on; with `follow` the stream stays open for new ones.
async fn events(State(svc): Svc, q: Result<Query<EventsQuery>, QueryRejection>) -> ApiResult<Response> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn doc() -> serde_json::Value {
        serde_json::from_str(OPENAPI).expect("docs/openapi.json is valid JSON")
    }

    /// Every route the router serves is documented, and nothing else is.
    #[test]
    fn openapi_documents_exactly_the_routes() {
        let source = include_str!("api.rs");
        let routed: BTreeSet<String> = source
            .split(".route(")
            .skip(1)
            .filter_map(|s| s.trim_start().strip_prefix('"'))
            .map(|s| s.split('"').next().expect("a quoted path").to_string())
            .filter(|p| p.starts_with('/') && !p.contains(' '))
            .map(|p| p.replace("{*", "{"))
            .collect();
        let documented: BTreeSet<String> = doc()["paths"].as_object().expect("paths").keys().cloned().collect();
        assert_eq!(routed, documented);
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    }

    /// Request schemas list exactly the fields the daemon accepts.
    #[test]
    fn openapi_request_schemas_match_the_types() {
        let d = doc();
        let create = moat_api::CreateSandbox {
            name: Some("n".into()),
            image: Some("i".into()),
            vcpus: Some(1),
            memory_mib: Some(1),
            disk_mib: Some(1),
            ttl_secs: Some(1),
            on_expire: Some(moat_api::OnExpire::Stop),
            hostname: Some("h".into()),
            boot_timeout_secs: Some(1),
            from: Some("box:clean".into()),
            template: Some(false),
            net: Some(moat_api::NetSpec::default()),
        };
        assert_eq!(
            keys(&serde_json::to_value(create).unwrap()),
            keys(&d["components"]["schemas"]["CreateSandbox"]["properties"])
        );
        let start = ExecStart { argv: vec!["x".into()], ..Default::default() };
        assert_eq!(
            keys(&serde_json::to_value(start).unwrap()),
            keys(&d["components"]["schemas"]["ExecStart"]["properties"])
        );
        assert_eq!(
            keys(&serde_json::to_value(RenewLease { ttl_secs: 1 }).unwrap()),
            keys(&d["components"]["schemas"]["RenewLease"]["properties"])
        );
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;
    use tower::ServiceExt;

    async fn status(auth: Option<&str>) -> StatusCode {
        let token = Arc::new("s3cret-token".to_string());
        let app = Router::new()
            .route("/v1/health", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(move |req, next| require_token(token.clone(), req, next)));
        let mut req = axum::http::Request::builder().uri("/v1/health");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap().status()
    }

    #[tokio::test]
    async fn tcp_requests_need_the_bearer_token() {
        assert_eq!(status(Some("Bearer s3cret-token")).await, StatusCode::OK);
        assert_eq!(status(None).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(Some("Bearer s3cret-tokeN")).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(Some("Bearer s3cret")).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(Some("Basic s3cret-token")).await, StatusCode::UNAUTHORIZED);
    }
}
