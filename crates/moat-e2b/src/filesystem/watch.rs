//! Watching directories. The async SDK streams a watch (`WatchDir`); the sync SDK makes a
//! watcher (`CreateWatcher`) and polls it (`GetWatcherEvents`) until it stops it
//! (`RemoveWatcher`). Both read one moat watch (inotify in the guest) per watch, and name
//! events relative to the watched directory with fsnotify's types.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use moat_api::FsEvent;
use moat_client::ClientError;
use serde::{Serialize, Serializer};
use tokio::time::Instant;

use super::messages::{CreateWatcherResponse, Empty, GetWatcherEventsResponse, WatchRequest, WatcherRequest};
use crate::connect::{stream_response, RpcResult, StreamRequest, Unary};
use crate::error::{Code, Failure};
use crate::{Sandbox, Shared};

/// Events a watcher keeps until it is polled; past it the oldest are dropped.
const MAX_EVENTS: usize = 4096;
/// Bytes of names a watcher keeps (names may be up to PATH_MAX); past it the oldest go too.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Watchers one sandbox may have at once.
const MAX_PER_SANDBOX: usize = 64;
/// A watcher not polled for this long is dropped, with its watch.
const IDLE: Duration = Duration::from_secs(600);

/// `filesystem.EventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            EventType::Create => "EVENT_TYPE_CREATE",
            EventType::Write => "EVENT_TYPE_WRITE",
            EventType::Remove => "EVENT_TYPE_REMOVE",
            EventType::Rename => "EVENT_TYPE_RENAME",
            EventType::Chmod => "EVENT_TYPE_CHMOD",
        })
    }
}

/// `filesystem.FilesystemEvent` (without `entry`: see [`WatchRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct FilesystemEvent {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EventType,
}

/// A moat watch event as envd reports it: a rename is `RENAME` on the old name and `CREATE` on
/// the new one, as fsnotify sees it. `None` for events envd has no type for; an error when the
/// guest lost events (its inotify queue overflowed), which ends an envd watch too.
pub(crate) fn map_event(watched: &str, e: &FsEvent) -> Result<Option<FilesystemEvent>, Failure> {
    let kind = match e.event.as_str() {
        "create" | "move_to" => EventType::Create,
        "modify" => EventType::Write,
        "delete" => EventType::Remove,
        "move_from" => EventType::Rename,
        "attrib" => EventType::Chmod,
        "overflow" => {
            return Err(Failure::new(
                Code::ResourceExhausted,
                format!("the watch of {watched} lost events (too many changes at once); watch the directory again"),
            ))
        }
        _ => return Ok(None),
    };
    Ok(Some(FilesystemEvent { name: relative(watched, &e.path), kind }))
}

/// `path` relative to the directory `watched` (`.` for the directory itself), as Go's
/// `filepath.Rel` names fsnotify's events.
fn relative(watched: &str, path: &str) -> String {
    let dir = watched.trim_end_matches('/');
    match path.strip_prefix(dir) {
        Some("") | Some("/") => ".".to_string(),
        Some(rest) if rest.starts_with('/') || dir.is_empty() => rest.trim_start_matches('/').to_string(),
        _ => path.to_string(),
    }
}

/// The watchers of every sandbox, by id.
pub(crate) struct Watchers {
    map: Mutex<HashMap<String, Watcher>>,
    /// How long a watcher lives without a poll ([`IDLE`]; shorter in tests).
    idle: Duration,
}

impl Default for Watchers {
    fn default() -> Watchers {
        Watchers { map: Mutex::default(), idle: IDLE }
    }
}

struct Watcher {
    sandbox: String,
    buffer: Arc<Mutex<Buffer>>,
    /// The task reading the watch: stopping it ends the watch in the guest.
    task: tokio::task::AbortHandle,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The events a watcher holds for its next poll, and how its watch ended, if it did.
struct Buffer {
    events: VecDeque<FilesystemEvent>,
    bytes: usize,
    /// Events dropped since the last poll, to log.
    dropped: u64,
    failure: Option<Failure>,
    last_poll: Instant,
    idle: Duration,
}

impl Buffer {
    fn new(idle: Duration) -> Buffer {
        Buffer { events: VecDeque::new(), bytes: 0, dropped: 0, failure: None, last_poll: Instant::now(), idle }
    }

    fn push(&mut self, e: FilesystemEvent) {
        self.bytes += e.name.len();
        self.events.push_back(e);
        while self.events.len() > MAX_EVENTS || self.bytes > MAX_EVENT_BYTES {
            let Some(old) = self.events.pop_front() else { break };
            self.bytes -= old.name.len();
            self.dropped += 1;
        }
    }

    /// The events since the last poll; once they are all taken, how the watch ended.
    fn drain(&mut self) -> Result<Vec<FilesystemEvent>, Failure> {
        self.last_poll = Instant::now();
        if self.dropped > 0 {
            tracing::warn!(dropped = self.dropped, "a watcher was not polled in time; its oldest events were dropped");
            self.dropped = 0;
        }
        if self.events.is_empty() {
            if let Some(f) = &self.failure {
                return Err(f.clone());
            }
        }
        self.bytes = 0;
        Ok(self.events.drain(..).collect())
    }

    fn idle(&self) -> Option<Duration> {
        self.idle.checked_sub(self.last_poll.elapsed()).filter(|left| !left.is_zero())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watchers {
    /// Whether `sandbox` may have one more watcher (checked again when it is added).
    fn room(&self, sandbox: &str) -> Result<(), Failure> {
        room(&mut lock(&self.map), sandbox)
    }

    /// Keep the watch `events` of the directory `watched` as a new watcher; its id.
    fn add(
        &self,
        sandbox: &str,
        watched: String,
        events: BoxStream<'static, Result<FsEvent, ClientError>>,
    ) -> Result<String, Failure> {
        let mut map = lock(&self.map);
        room(&mut map, sandbox)?;
        let id = format!("w{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let buffer = Arc::new(Mutex::new(Buffer::new(self.idle)));
        let task = tokio::spawn(pump(watched, events, buffer.clone())).abort_handle();
        map.insert(id.clone(), Watcher { sandbox: sandbox.to_string(), buffer, task });
        Ok(id)
    }

    /// The events of a sandbox's watcher since its last poll.
    fn poll(&self, sandbox: &str, id: &str) -> Result<Vec<FilesystemEvent>, Failure> {
        let mut map = lock(&self.map);
        sweep(&mut map);
        let w = map.get(id).filter(|w| w.sandbox == sandbox).ok_or_else(|| unknown(id))?;
        let events = lock(&w.buffer).drain();
        events
    }

    /// Stop a sandbox's watcher.
    fn remove(&self, sandbox: &str, id: &str) -> Result<(), Failure> {
        let mut map = lock(&self.map);
        sweep(&mut map);
        if map.get(id).is_none_or(|w| w.sandbox != sandbox) {
            return Err(unknown(id));
        }
        map.remove(id);
        Ok(())
    }

    /// Drop every watcher of a sandbox (it was killed or paused): their watches end.
    pub(crate) fn forget(&self, sandbox: &str) {
        lock(&self.map).retain(|_, w| w.sandbox != sandbox);
    }
}

fn room(map: &mut HashMap<String, Watcher>, sandbox: &str) -> Result<(), Failure> {
    sweep(map);
    if map.values().filter(|w| w.sandbox == sandbox).count() >= MAX_PER_SANDBOX {
        return Err(Failure::new(
            Code::ResourceExhausted,
            format!(
                "sandbox {sandbox} has {MAX_PER_SANDBOX} watchers already: stop one (WatchHandle.stop()) before \
                 watching another directory"
            ),
        ));
    }
    Ok(())
}

fn unknown(id: &str) -> Failure {
    let shown: String = id.chars().take(64).collect();
    Failure::not_found(format!(
        "watcher {shown:?} not found: it was stopped, or dropped after 10 minutes without a poll"
    ))
}

/// Drop the watchers nobody polled for [`IDLE`].
fn sweep(map: &mut HashMap<String, Watcher>) {
    map.retain(|_, w| lock(&w.buffer).idle().is_some());
}

/// Move a watch's events into its watcher's buffer until the watch ends or nobody polls.
async fn pump(
    watched: String,
    mut events: BoxStream<'static, Result<FsEvent, ClientError>>,
    buffer: Arc<Mutex<Buffer>>,
) {
    let failure = loop {
        let Some(left) = lock(&buffer).idle() else { return };
        let next = match tokio::time::timeout(left, events.next()).await {
            Ok(next) => next,
            Err(_) => continue, // Polled meanwhile, or idle: the loop decides.
        };
        match next {
            Some(Ok(e)) => match map_event(&watched, &e) {
                Ok(Some(event)) => lock(&buffer).push(event),
                Ok(None) => {}
                Err(f) => break f,
            },
            Some(Err(e)) => break Failure::from(e),
            None => break ended(&watched),
        }
    };
    lock(&buffer).failure = Some(failure);
}

/// A watch's stream ends only when the sandbox stops (or the daemon does).
fn ended(watched: &str) -> Failure {
    Failure::new(
        Code::Unavailable,
        format!("the watch of {watched} ended: the sandbox stopped or the moat daemon restarted; watch it again"),
    )
}

/// Open a moat watch of the request's directory: (the directory, its events).
async fn open(
    front: &Shared,
    sandbox: &Sandbox,
    headers: &HeaderMap,
    req: &WatchRequest,
) -> Result<(String, BoxStream<'static, Result<FsEvent, ClientError>>), Failure> {
    let user = super::request_user(front, sandbox, headers).await?;
    let path = super::existing_dir(front, sandbox, &super::user_path(&user, &req.path)).await?;
    let events = front.client.watch(&sandbox.id, &path, req.recursive).await?;
    Ok((path, events))
}

/// `CreateWatcher`: the watch runs from here on, so changes made after the answer are seen.
pub(super) async fn create_watcher(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<WatchRequest>,
) -> RpcResult<CreateWatcherResponse> {
    front.watchers.room(&sandbox.id)?;
    let (watched, events) = open(&front, &sandbox, &headers, &req).await?;
    let watcher_id = front.watchers.add(&sandbox.id, watched, events)?;
    Ok(Json(CreateWatcherResponse { watcher_id }))
}

/// `GetWatcherEvents`: what happened since the last call.
pub(super) async fn get_watcher_events(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    Unary(req): Unary<WatcherRequest>,
) -> RpcResult<GetWatcherEventsResponse> {
    let events = front.watchers.poll(&sandbox.id, &req.watcher_id)?;
    Ok(Json(GetWatcherEventsResponse { events }))
}

/// `RemoveWatcher`.
pub(super) async fn remove_watcher(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    Unary(req): Unary<WatcherRequest>,
) -> RpcResult<Empty> {
    front.watchers.remove(&sandbox.id, &req.watcher_id)?;
    Ok(Json(Empty {}))
}

/// `WatchDir`: `{"start":{}}` once the watch runs, then `{"filesystem": event}`s until the
/// client leaves, the watch fails or the request's deadline passes.
pub(super) async fn watch_dir(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    req: StreamRequest<WatchRequest>,
) -> Response {
    let keepalive = (req.keepalive, serde_json::json!({ "keepalive": {} }));
    match open(&front, &sandbox, &headers, &req.message).await {
        Ok((watched, events)) => stream_response(watch_messages(watched, events, req.deadline), keepalive),
        Err(f) => stream_response(stream::once(async move { Err(f) }), keepalive),
    }
}

type Messages = BoxStream<'static, Result<serde_json::Value, Failure>>;

/// A watch's stream of `WatchDirResponse`s; it ends (with its error) when the watch does.
fn watch_messages(
    watched: String,
    events: BoxStream<'static, Result<FsEvent, ClientError>>,
    deadline: Option<Duration>,
) -> Messages {
    let start = stream::once(async { Ok(serde_json::json!({ "start": {} })) });
    let ending = ended(&watched);
    let events = events
        .filter_map(move |r| {
            let message = match r {
                Ok(e) => {
                    map_event(&watched, &e).transpose().map(|r| r.map(|ev| serde_json::json!({ "filesystem": ev })))
                }
                Err(e) => Some(Err(Failure::from(e))),
            };
            async move { message }
        })
        .chain(stream::once(async move { Err(ending) }));
    let events: Messages = match deadline {
        Some(d) => {
            let expiry = stream::once(async move {
                tokio::time::sleep(d).await;
                Err(Failure::new(
                    Code::DeadlineExceeded,
                    "the watch reached the request's deadline (Connect-Timeout-Ms)",
                ))
            });
            stream::select(events, expiry).boxed()
        }
        None => events.boxed(),
    };
    start.chain(events).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(event: &str, path: &str) -> FsEvent {
        FsEvent { event: event.into(), path: path.into(), dir: false }
    }

    fn ev(name: &str, kind: EventType) -> FilesystemEvent {
        FilesystemEvent { name: name.into(), kind }
    }

    #[test]
    fn events_map_to_fsnotify_types_relative_to_the_directory() {
        let map = |e, p| map_event("/home/user", &fs(e, p)).unwrap();
        assert_eq!(map("create", "/home/user/a"), Some(ev("a", EventType::Create)));
        assert_eq!(map("modify", "/home/user/d/b"), Some(ev("d/b", EventType::Write)));
        assert_eq!(map("delete", "/home/user/a"), Some(ev("a", EventType::Remove)));
        assert_eq!(map("move_from", "/home/user/a"), Some(ev("a", EventType::Rename)));
        assert_eq!(map("move_to", "/home/user/b"), Some(ev("b", EventType::Create)));
        assert_eq!(map("attrib", "/home/user"), Some(ev(".", EventType::Chmod)));
        assert_eq!(map("open", "/home/user/a"), None);
        assert_eq!(map_event("/home/user", &fs("overflow", "")).unwrap_err().code, Code::ResourceExhausted);
        assert_eq!(relative("/", "/etc"), "etc");
        assert_eq!(relative("/home/user", "/home/username/x"), "/home/username/x");
        let json = serde_json::to_string(&ev("a", EventType::Chmod)).unwrap();
        assert_eq!(json, r#"{"name":"a","type":"EVENT_TYPE_CHMOD"}"#);
    }

    #[test]
    fn buffers_keep_the_newest_events_within_their_caps() {
        let mut b = Buffer::new(IDLE);
        for i in 0..MAX_EVENTS + 10 {
            b.push(ev(&i.to_string(), EventType::Write));
        }
        let got = b.drain().unwrap();
        assert_eq!(got.len(), MAX_EVENTS);
        assert_eq!(got[0].name, "10");
        assert_eq!(b.drain().unwrap(), []);
        // Long names are bounded by bytes too.
        let long = "x".repeat(4096);
        for _ in 0..1000 {
            b.push(ev(&long, EventType::Create));
        }
        assert_eq!(b.drain().unwrap().len(), MAX_EVENT_BYTES / 4096);
        // A failure comes once the events before it are taken.
        b.push(ev("last", EventType::Remove));
        b.failure = Some(ended("/d"));
        assert_eq!(b.drain().unwrap(), [ev("last", EventType::Remove)]);
        assert_eq!(b.drain().unwrap_err().code, Code::Unavailable);
    }

    type Sender = tokio::sync::mpsc::UnboundedSender<Result<FsEvent, ClientError>>;

    /// A watch fed by the test.
    fn watch() -> (Sender, BoxStream<'static, Result<FsEvent, ClientError>>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).boxed())
    }

    /// Wait until `done` holds, for at most a few seconds.
    async fn until(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "the condition never held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn watchers_buffer_until_polled_and_belong_to_their_sandbox() {
        let w = Watchers::default();
        let (tx, events) = watch();
        let id = w.add("sb", "/d".into(), events).unwrap();
        assert!(id.starts_with('w') && id.len() == 33);
        tx.send(Ok(fs("create", "/d/a"))).unwrap();
        tx.send(Ok(fs("modify", "/d/a"))).unwrap();
        assert_eq!(w.poll("other", &id).unwrap_err().code, Code::NotFound);
        let got = Mutex::new(Vec::new());
        until(|| {
            lock(&got).extend(w.poll("sb", &id).unwrap());
            lock(&got).len() >= 2
        })
        .await;
        assert_eq!(*lock(&got), [ev("a", EventType::Create), ev("a", EventType::Write)]);
        assert_eq!(w.poll("sb", &id).unwrap(), []);
        // The watch ending (the sandbox stopped) shows on the next poll.
        drop(tx);
        until(|| w.poll("sb", &id).is_err()).await;
        assert_eq!(w.poll("sb", &id).unwrap_err().code, Code::Unavailable);
        assert_eq!(w.remove("other", &id).unwrap_err().code, Code::NotFound);
        w.remove("sb", &id).unwrap();
        assert_eq!(w.remove("sb", &id).unwrap_err().code, Code::NotFound);
        assert_eq!(w.poll("sb", &id).unwrap_err().code, Code::NotFound);
    }

    #[tokio::test]
    async fn sandboxes_have_at_most_64_watchers_and_forget_drops_them() {
        let w = Watchers::default();
        let mut senders = Vec::new();
        for _ in 0..MAX_PER_SANDBOX {
            let (tx, events) = watch();
            senders.push(tx);
            w.add("sb", "/d".into(), events).unwrap();
        }
        let (_tx, events) = watch();
        assert_eq!(w.add("sb", "/d".into(), events).unwrap_err().code, Code::ResourceExhausted);
        let (_tx2, events) = watch();
        let other = w.add("other", "/d".into(), events).unwrap();
        w.forget("sb");
        // Their tasks were stopped, so the watches were dropped.
        until(|| senders.iter().all(|tx| tx.is_closed())).await;
        assert!(w.room("sb").is_ok());
        assert!(w.poll("other", &other).is_ok());
    }

    #[tokio::test]
    async fn watchers_nobody_polls_are_dropped() {
        let w = Watchers { idle: Duration::from_millis(300), ..Watchers::default() };
        let (tx, events) = watch();
        let id = w.add("sb", "/d".into(), events).unwrap();
        let (polled_tx, polled) = watch();
        let polled_id = w.add("sb", "/d".into(), polled).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(600) {
            assert!(w.poll("sb", &polled_id).is_ok());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The pump let go of the unpolled watch on its own; the watcher is gone at the next call.
        until(|| tx.is_closed()).await;
        assert_eq!(w.poll("sb", &id).unwrap_err().code, Code::NotFound);
        assert!(!polled_tx.is_closed());
    }

    #[tokio::test]
    async fn watch_dir_streams_start_events_then_the_end() {
        let (tx, events) = watch();
        tx.send(Ok(fs("create", "/d/x"))).unwrap();
        tx.send(Ok(fs("open", "/d/x"))).unwrap();
        tx.send(Ok(fs("overflow", ""))).unwrap();
        let got: Vec<_> = watch_messages("/d".into(), events, None).take(3).collect().await;
        assert_eq!(got[0], Ok(serde_json::json!({"start":{}})));
        assert_eq!(got[1], Ok(serde_json::json!({"filesystem":{"name":"x","type":"EVENT_TYPE_CREATE"}})));
        assert_eq!(got[2].as_ref().unwrap_err().code, Code::ResourceExhausted);
        drop(tx);
    }

    #[tokio::test]
    async fn watch_dir_ends_at_the_deadline() {
        let (_tx, events) = watch();
        let got: Vec<_> = watch_messages("/d".into(), events, Some(Duration::from_millis(50))).take(2).collect().await;
        assert_eq!(got[1].as_ref().unwrap_err().code, Code::DeadlineExceeded);
    }
}
