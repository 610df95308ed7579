//! envd's `process.Process` service over moat's exec sessions.
//!
//! `Start` opens an exec in the sandbox and hands its session to the front's registry
//! ([`Processes`]), keyed by the guest pid: the process belongs to the front, not to the RPC, so
//! it outlives the stream that started it. Only `SendSignal`, the deadline of its `Start` call
//! (moat's exec timeout, [`START_GRACE`] after it) or the end of its sandbox stop it. `Connect` attaches more streams,
//! the unary calls feed it input, signals and terminal sizes.

mod messages;
mod session;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use moat_api::{ErrorCode, ExecStart, FileKind, TtySize};
use moat_client::ExecSession;
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::messages::{
    selector, CloseStdinRequest, ConnectRequest, Empty, EventMessage, ListRequest, ListResponse, ProcessConfig,
    ProcessInfo, Selector, SendInputRequest, SendSignalRequest, StartRequest, StreamInputRequest, UpdateRequest,
};
use self::session::{not_found_pid, terminal_size, Feed, Item, Output, Process};
use crate::connect::{self, json, Envelopes, RpcError, RpcResult, StreamRequest, Unary};
use crate::error::{Code, Failure};
use crate::users::GuestUser;
use crate::{Sandbox, Shared};

/// The most processes started through the front that run at once in one sandbox.
const MAX_PER_SANDBOX: usize = 256;
/// The longest tag a process may carry.
const MAX_TAG_BYTES: usize = 1024;
/// How long input, a signal or a resize may wait for the process to take it, at most.
const INPUT_WAIT: Duration = Duration::from_secs(60);
/// How long past a `Start` call's deadline moat kills its process: the stream ends first, at
/// the deadline, with deadline_exceeded (what the SDK turns into `TimeoutException`).
const START_GRACE: Duration = Duration::from_secs(5);
/// The terminal size of a `pty` request without one.
const DEFAULT_TERMINAL: (u16, u16) = (24, 80);

/// The processes started through the front and still running, by sandbox and guest pid.
#[derive(Default)]
pub(crate) struct Processes {
    registry: Arc<Registry>,
}

#[derive(Default)]
struct Registry {
    sandboxes: Mutex<HashMap<String, Running>>,
    serials: AtomicU64,
}

/// One sandbox's processes, and how many are being started.
#[derive(Default)]
struct Running {
    live: HashMap<u32, Arc<Process>>,
    starting: usize,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a process off the registry, unless a later process took its pid since.
    fn remove(&self, sandbox: &str, pid: u32, serial: u64) {
        let mut sandboxes = self.lock();
        if let Some(running) = sandboxes.get_mut(sandbox) {
            if running.live.get(&pid).is_some_and(|p| p.serial == serial) {
                running.live.remove(&pid);
            }
            if running.live.is_empty() && running.starting == 0 {
                sandboxes.remove(sandbox);
            }
        }
    }
}

/// Room for one more process in a sandbox, held while it starts; given back unless filled.
struct Slot {
    registry: Arc<Registry>,
    sandbox: String,
    filled: bool,
}

impl Slot {
    /// The process started: it takes the room.
    fn fill(mut self, process: Arc<Process>) {
        let mut sandboxes = self.registry.lock();
        let running = sandboxes.entry(self.sandbox.clone()).or_default();
        running.starting = running.starting.saturating_sub(1);
        running.live.insert(process.pid, process);
        self.filled = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.filled {
            return;
        }
        let mut sandboxes = self.registry.lock();
        if let Some(running) = sandboxes.get_mut(&self.sandbox) {
            running.starting = running.starting.saturating_sub(1);
            if running.live.is_empty() && running.starting == 0 {
                sandboxes.remove(&self.sandbox);
            }
        }
    }
}

impl Processes {
    /// Room for a process in `sandbox`, or resource_exhausted past [`MAX_PER_SANDBOX`].
    fn reserve(&self, sandbox: &str) -> Result<Slot, Failure> {
        let mut sandboxes = self.registry.lock();
        let running = sandboxes.entry(sandbox.to_string()).or_default();
        if running.live.len() + running.starting >= MAX_PER_SANDBOX {
            return Err(Failure::new(
                Code::ResourceExhausted,
                format!(
                    "the sandbox runs {MAX_PER_SANDBOX} processes started through E2B already: wait for some to end or \
                     kill them"
                ),
            ));
        }
        running.starting += 1;
        Ok(Slot { registry: self.registry.clone(), sandbox: sandbox.to_string(), filled: false })
    }

    /// Register a started process and start its pump. The returned stream (the `Start` call's)
    /// is attached before any output is read, so none is lost.
    fn launch(
        &self,
        slot: Slot,
        info: ProcessInfo,
        terminal: bool,
        stdin: bool,
        feed: Box<dyn Feed>,
        output: impl Output,
    ) -> mpsc::Receiver<Item> {
        let serial = self.registry.serials.fetch_add(1, Ordering::Relaxed);
        let (pid, sandbox) = (info.pid, slot.sandbox.clone());
        let process = Arc::new(Process::new(serial, info, terminal, stdin, feed));
        let stream = process.attach().expect("a process whose output is not read yet has not ended");
        let registry = self.registry.clone();
        let ended = move || registry.remove(&sandbox, pid, serial);
        // The pump waits for the registration: a process that ends at once must not be taken
        // off the registry before it is on it.
        let (registered, go) = tokio::sync::oneshot::channel::<()>();
        let pumped = process.clone();
        let pump = tokio::spawn(async move {
            if go.await.is_ok() {
                session::pump(pumped, output, ended).await;
            }
        });
        process.set_pump(pump.abort_handle());
        slot.fill(process);
        let _ = registered.send(());
        stream
    }

    /// The running process a selector names.
    fn get(&self, sandbox: &str, selector: &Selector) -> Result<Arc<Process>, Failure> {
        let sandboxes = self.registry.lock();
        let live = sandboxes.get(sandbox).map(|r| &r.live);
        let found = match selector {
            Selector::Pid(pid) => live.and_then(|l| l.get(pid)),
            Selector::Tag(tag) => live.and_then(|l| l.values().find(|p| p.info.tag.as_ref() == Some(tag))),
        };
        found.filter(|p| !p.ended()).cloned().ok_or_else(|| match selector {
            Selector::Pid(pid) => not_found_pid(*pid),
            Selector::Tag(tag) => Failure::not_found(format!("process with tag {tag:?} not found")),
        })
    }

    /// The running processes of a sandbox, by pid.
    fn list(&self, sandbox: &str) -> Vec<ProcessInfo> {
        let sandboxes = self.registry.lock();
        let mut infos: Vec<ProcessInfo> = sandboxes
            .get(sandbox)
            .map(|r| r.live.values().filter(|p| !p.ended()).map(|p| p.info.clone()).collect())
            .unwrap_or_default();
        infos.sort_by_key(|i| i.pid);
        infos
    }

    /// Forget a sandbox's processes (it was killed): their pumps stop and their streams end.
    pub(crate) fn forget(&self, sandbox: &str) {
        let running = self.registry.lock().remove(sandbox);
        let why = Failure::new(Code::Unavailable, format!("the sandbox {sandbox} was killed"));
        for process in running.into_iter().flat_map(|r| r.live.into_values()) {
            process.abandon(&why);
        }
    }
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect_process))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/Update", post(update))
        .route("/process.Process/StreamInput", post(stream_input))
}

async fn start(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    req: StreamRequest<StartRequest>,
) -> Result<Response, RpcError> {
    let StreamRequest { message, deadline, keepalive } = req;
    let config = message.process.unwrap_or_default();
    if message.tag.as_ref().is_some_and(|t| t.len() > MAX_TAG_BYTES) {
        return Err(Failure::invalid(format!("the tag is over {MAX_TAG_BYTES} bytes: use a shorter one")).into());
    }
    let tty = match message.pty {
        None => None,
        Some(pty) => Some(pty.size.map_or(Ok(DEFAULT_TERMINAL), |s| terminal_size(s.rows, s.cols))?),
    };
    // Absent means open, as in envd: SDK 2.0 sends no `stdin` and expects a pipe.
    let stdin = message.stdin != Some(false);
    let user = crate::users::from_authorization(&headers)?;
    let user = front.users.resolve(&front.client, &sandbox.id, user.as_deref()).await?;
    let slot = front.processes.reserve(&sandbox.id)?;
    let session = open(&front, &sandbox.id, &user, &config, tty, stdin, deadline).await?;
    let pid = session.pid();
    tracing::debug!(sandbox = %sandbox.id, pid, cmd = %config.cmd, "started a process for E2B");
    let (input, output) = session.split();
    let info = ProcessInfo { config, pid, tag: message.tag };
    let stream = front.processes.launch(slot, info, tty.is_some(), stdin, Box::new(input), output);
    let until = deadline.and_then(|d| Instant::now().checked_add(d));
    Ok(events(pid, stream, until, keepalive))
}

/// Open the exec of a `Start`: as the user, in the directory asked (relative to the home) or
/// the home, killed [`START_GRACE`] after the call's deadline.
async fn open(
    front: &crate::Front,
    sandbox: &str,
    user: &GuestUser,
    config: &ProcessConfig,
    tty: Option<(u16, u16)>,
    stdin: bool,
    deadline: Option<Duration>,
) -> Result<ExecSession, Failure> {
    let asked = config.cwd.as_deref().filter(|c| !c.is_empty()).map(|c| user.resolve(c));
    let cwd = asked.clone().unwrap_or_else(|| user.home.clone());
    // HOME, USER and LOGNAME come from the agent (the user's), before the sandbox's envVars
    // and the request's, in envd's order.
    let mut start = ExecStart {
        argv: std::iter::once(&config.cmd).chain(&config.args).cloned().collect(),
        env: config.envs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        cwd: Some(cwd.clone()),
        user: Some(user.name.clone()),
        timeout_ms: deadline.map(|d| u64::try_from(d.saturating_add(START_GRACE).as_millis()).unwrap_or(u64::MAX)),
        stdin,
        tty: tty.map(|(rows, cols)| TtySize { rows, cols }),
        ..Default::default()
    };
    let refused = match front.client.exec(sandbox, &start).await {
        Ok(session) => return Ok(session),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => e,
        Err(e) => return Err(e.into()),
    };
    // Not found: the program, the user or the directory. envd says which for the directory.
    let is_dir = match front.client.stat(sandbox, &cwd).await {
        Ok(info) => matches!(info.kind, FileKind::Dir | FileKind::Symlink),
        Err(e) => e.code() != Some(ErrorCode::NotFound),
    };
    if is_dir {
        return Err(refused.into());
    }
    if asked.is_some() {
        return Err(Failure::invalid(format!("cwd '{cwd}' does not exist")));
    }
    // The user's home is envd's default; an image without it runs the process in `/`.
    start.cwd = Some("/".into());
    Ok(front.client.exec(sandbox, &start).await?)
}

/// A `Start` or `Connect` answer: the start event, the process's events as they come, and the
/// end of the stream with the process's (or when `until` passes, with deadline_exceeded).
fn events(pid: u32, stream: mpsc::Receiver<Item>, until: Option<Instant>, keepalive: Duration) -> Response {
    let first = futures_util::stream::once(async move { Ok(json(&EventMessage::start(pid))) });
    let rest = futures_util::stream::unfold(Some(stream), move |stream| async move {
        let mut stream = stream?;
        let next = match until {
            None => stream.recv().await,
            Some(t) => match tokio::time::timeout_at(t, stream.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    let f = Failure::new(
                        Code::DeadlineExceeded,
                        "the call's deadline (Connect-Timeout-Ms) passed; a process still running runs on: connect \
                         to it again",
                    );
                    return Some((Err(f), None));
                }
            },
        };
        next.map(|item| (item, Some(stream)))
    });
    connect::stream_response(futures_util::StreamExt::chain(first, rest), (keepalive, json(&EventMessage::keepalive())))
}

async fn connect_process(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    req: StreamRequest<ConnectRequest>,
) -> Result<Response, RpcError> {
    let process = front.processes.get(&sandbox.id, &selector(&req.message.process)?)?;
    let stream = process.attach().ok_or_else(|| not_found_pid(process.pid))?;
    let until = req.deadline.and_then(|d| Instant::now().checked_add(d));
    Ok(events(process.pid, stream, until, req.keepalive))
}

async fn list(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    Unary(_): Unary<ListRequest>,
) -> RpcResult<ListResponse> {
    Ok(Json(ListResponse { processes: front.processes.list(&sandbox.id) }))
}

/// Run an operation on a process's input side, within the call's deadline and [`INPUT_WAIT`]:
/// a process that stops reading its stdin holds back writes (and what queues behind them).
async fn bounded<T>(
    headers: &HeaderMap,
    what: &str,
    op: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let wait = connect::deadline(headers)?.map_or(INPUT_WAIT, |d| d.min(INPUT_WAIT));
    tokio::time::timeout(wait, op).await.unwrap_or_else(|_| {
        Err(Failure::new(
            Code::DeadlineExceeded,
            format!("the process did not take the {what} in time: it may not be reading its stdin"),
        ))
    })
}

async fn send_input(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<SendInputRequest>,
) -> RpcResult<Empty> {
    let process = front.processes.get(&sandbox.id, &selector(&req.process)?)?;
    let input = req.input.unwrap_or_default().input()?;
    bounded(&headers, "input", process.write(input)).await?;
    Ok(Json(Empty {}))
}

async fn send_signal(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<SendSignalRequest>,
) -> RpcResult<Empty> {
    let process = front.processes.get(&sandbox.id, &selector(&req.process)?)?;
    let signal =
        req.signal.number().ok_or_else(|| Failure::invalid("send `signal` SIGNAL_SIGTERM or SIGNAL_SIGKILL"))?;
    bounded(&headers, "signal", process.signal(signal)).await?;
    Ok(Json(Empty {}))
}

async fn close_stdin(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<CloseStdinRequest>,
) -> RpcResult<Empty> {
    let process = front.processes.get(&sandbox.id, &selector(&req.process)?)?;
    bounded(&headers, "end of its stdin", process.close_stdin()).await?;
    Ok(Json(Empty {}))
}

async fn update(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<UpdateRequest>,
) -> RpcResult<Empty> {
    let process = front.processes.get(&sandbox.id, &selector(&req.process)?)?;
    if let Some(size) = req.pty.and_then(|p| p.size) {
        bounded(&headers, "terminal size", process.resize(size.rows, size.cols)).await?;
    }
    Ok(Json(Empty {}))
}

async fn stream_input(State(front): State<Shared>, Extension(sandbox): Extension<Sandbox>, req: Request) -> Response {
    let deadline = match connect::deadline(req.headers()) {
        Ok(d) => d,
        Err(f) => return RpcError(f).into_response(),
    };
    let envelopes = match Envelopes::from_request(req) {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let feed = feed_stream(&front, &sandbox.id, envelopes);
    let result = match deadline {
        None => feed.await,
        Some(d) => tokio::time::timeout(d, feed).await.unwrap_or_else(|_| {
            Err(Failure::new(Code::DeadlineExceeded, "the input stream outlived its deadline (Connect-Timeout-Ms)"))
        }),
    };
    connect::client_stream_response(result)
}

/// `StreamInput`: a start message naming the process, then input applied as it arrives.
async fn feed_stream(front: &crate::Front, sandbox: &str, mut envelopes: Envelopes) -> Result<(), Failure> {
    let first: StreamInputRequest = match envelopes.next().await {
        Some(m) => m?,
        None => return Err(Failure::invalid("the input stream is empty: send a `start` message first")),
    };
    let start = first.start.ok_or_else(|| Failure::invalid("the input stream must open with a `start` message"))?;
    let process = front.processes.get(sandbox, &selector(&start.process)?)?;
    while let Some(message) = envelopes.next::<StreamInputRequest>().await {
        if let Some(input) = message?.data.and_then(|d| d.input) {
            let input = input.input()?;
            tokio::time::timeout(INPUT_WAIT, process.write(input)).await.unwrap_or_else(|_| {
                Err(Failure::new(
                    Code::DeadlineExceeded,
                    "the process did not take the input in time: it may not be reading its stdin",
                ))
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
