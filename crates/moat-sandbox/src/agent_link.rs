//! Host end of the agent link: handshake, channel multiplexing and flow control.
//!
//! One reader task owns the socket's read half and sorts frames into per-channel state; one writer
//! task owns the write half. Everything the guest sends is untrusted: data beyond the credit we
//! granted, or frames that make no sense for a channel, close that channel; a malformed frame ends
//! the link. Buffered guest data is bounded by the credit window per stream, whatever the guest does.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_proto::{
    read_frame, read_until_sync, write_frame, AgentError, AgentHello, ExecRequest, ExitStatus, Frame, FrameError,
    FsReply, HostHello, Identity, Message, Request, Resync, Started, Stream, CONTROL_CHANNEL, INITIAL_WINDOW,
    MAX_CHUNK, MAX_PAYLOAD, PROTOCOL_VERSION,
};
use rand::RngCore;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, Notify};

/// How much of the stream before the agent's sync marker we are willing to skip.
const SYNC_SEARCH_LIMIT: usize = 4 * 1024 * 1024;

/// Encoded frames queued for the writer task; data frames are bounded by credit, so this stays small.
const WRITE_QUEUE: usize = 256;

/// Errors of the agent link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to the agent socket {path}")]
    Connect { path: String, source: std::io::Error },
    #[error("the agent speaks protocol version {agent}, this host speaks {host}")]
    VersionMismatch { agent: u32, host: u32 },
    #[error("the agent link broke")]
    Frame(#[from] FrameError),
    #[error("the agent link is closed (the VM stopped or the agent died)")]
    Closed,
    #[error("the agent answered the handshake with an unexpected frame: {0}")]
    BadHandshake(String),
    #[error("the agent refused the request: {}", .0.message)]
    Agent(AgentError),
    #[error("the agent broke the protocol on channel {channel}: {reason}")]
    Protocol { channel: u32, reason: String },
    #[error("the request is {size} bytes long; the agent link carries at most {MAX_PAYLOAD} bytes per message")]
    TooLarge { size: usize },
}

impl moat_hint::Hint for LinkError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            LinkError::VersionMismatch { .. } => {
                Some("rebuild the initramfs with the matching moat-agent (remove the cached initramfs)".into())
            }
            LinkError::Connect { .. } | LinkError::Frame(_) | LinkError::Closed => {
                Some("the sandbox may have stopped; see `moat inspect` and `moat logs`".into())
            }
            LinkError::TooLarge { .. } => Some("send less per request, e.g. a large file in parts".into()),
            LinkError::BadHandshake(_) | LinkError::Agent(_) | LinkError::Protocol { .. } => None,
        }
    }
}

/// What a channel has received so far. Guarded by a mutex; the reader fills it, the handle drains it.
#[derive(Default)]
struct ChannelState {
    started: Option<Result<Started, AgentError>>,
    stdout: VecDeque<u8>,
    stderr: VecDeque<u8>,
    /// Bytes the guest may still send per stream (stdout, stderr) before we grant more.
    granted: [u32; 2],
    eof: [bool; 2],
    exit: Option<ExitStatus>,
    /// Bytes of stdin we may still send.
    stdin_credit: u32,
    /// Set when the channel can receive nothing more: closed by the agent, a violation, or link loss.
    failed: Option<String>,
    closed: bool,
}

struct Channel {
    state: Mutex<ChannelState>,
    notify: Notify,
}

impl Channel {
    fn new() -> Arc<Channel> {
        Arc::new(Channel {
            state: Mutex::new(ChannelState {
                granted: [INITIAL_WINDOW, INITIAL_WINDOW],
                stdin_credit: INITIAL_WINDOW,
                ..Default::default()
            }),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().expect("channel state lock is never poisoned: no panics while held")
    }
}

struct Shared {
    channels: Mutex<HashMap<u32, Arc<Channel>>>,
    /// Set once the reader stops; every channel learns of it.
    dead: Mutex<Option<String>>,
}

impl Shared {
    fn channel(&self, id: u32) -> Option<Arc<Channel>> {
        self.channels.lock().expect("no panics while held").get(&id).cloned()
    }

    fn remove(&self, id: u32) {
        self.channels.lock().expect("no panics while held").remove(&id);
    }

    fn kill_all(&self, reason: String) {
        *self.dead.lock().expect("no panics while held") = Some(reason.clone());
        let channels: Vec<_> = self.channels.lock().expect("no panics while held").drain().map(|(_, c)| c).collect();
        for c in channels {
            c.lock().failed.get_or_insert_with(|| reason.clone());
            c.notify.notify_waiters();
        }
    }
}

/// A connected, handshaken agent link.
pub struct AgentLink {
    shared: Arc<Shared>,
    out: mpsc::Sender<Vec<u8>>,
    next_channel: AtomicU32,
    hello: AgentHello,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A frame's wire bytes. Frames are encoded by whoever sends them, so a request too large for the
/// link fails for its caller alone and the writer task only ever sees bytes that fit.
fn wire(frame: &Frame) -> Result<Vec<u8>, LinkError> {
    frame.encode().map_err(|e| match e {
        FrameError::TooLarge(size) => LinkError::TooLarge { size },
        e => LinkError::Frame(e),
    })
}

/// A close frame, for the places that cannot wait or fail (drop, the reader task).
fn close_frame(channel: u32) -> Vec<u8> {
    Frame::new(channel, Message::Close).encode().expect("a close frame has an empty payload")
}

/// The host's wall clock and 64 fresh random bytes.
fn resync() -> Resync {
    let mut entropy = vec![0u8; 64];
    rand::thread_rng().fill_bytes(&mut entropy);
    let time_unix_ns = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_nanos() as u64;
    Resync { time_unix_ns, entropy }
}

impl AgentLink {
    /// Connect to the agent's unix socket and complete the handshake. Waits as long as the agent
    /// takes to come up; the caller bounds it with a timeout.
    pub async fn connect(path: &Path, identity: Option<Identity>) -> Result<AgentLink, LinkError> {
        let stream = moat_vmm::connect_vm_socket(path)
            .await
            .map_err(|source| LinkError::Connect { path: path.display().to_string(), source })?;
        let (r, w) = stream.into_split();
        let mut reader = BufReader::with_capacity(256 * 1024, r);
        let mut writer = BufWriter::with_capacity(256 * 1024, w);

        let nonce = rand::random::<u64>();
        let Resync { time_unix_ns, entropy } = resync();
        let hello =
            HostHello { version: PROTOCOL_VERSION, nonce, time_unix_ns: time_unix_ns.into(), entropy, identity };
        write_frame(&mut writer, &Frame::new(CONTROL_CHANNEL, Message::Hello(hello))).await?;
        writer.flush().await.map_err(FrameError::Io)?;

        let hello = loop {
            read_until_sync(&mut reader, SYNC_SEARCH_LIMIT).await?;
            let frame = read_frame(&mut reader).await?;
            match frame.message {
                Message::HelloAck(ack) if ack.nonce == nonce => break ack,
                // An answer to an earlier connection's hello: keep looking.
                Message::HelloAck(_) => continue,
                other => return Err(LinkError::BadHandshake(format!("{other:?}"))),
            }
        };
        if hello.version != PROTOCOL_VERSION {
            return Err(LinkError::VersionMismatch { agent: hello.version, host: PROTOCOL_VERSION });
        }

        let shared = Arc::new(Shared { channels: Mutex::new(HashMap::new()), dead: Mutex::new(None) });
        let (out, rx) = mpsc::channel(WRITE_QUEUE);
        let reader_task = tokio::spawn(read_loop(reader, shared.clone(), out.clone()));
        let writer_task = tokio::spawn(write_loop(writer, rx, shared.clone()));
        Ok(AgentLink { shared, out, next_channel: AtomicU32::new(1), hello, tasks: vec![reader_task, writer_task] })
    }

    /// What the agent said about itself in the handshake.
    pub fn agent(&self) -> &AgentHello {
        &self.hello
    }

    /// Why the link died, if it did.
    pub fn dead_reason(&self) -> Option<String> {
        self.shared.dead.lock().expect("no panics while held").clone()
    }

    async fn open(&self, request: Request) -> Result<(u32, Arc<Channel>, Started), LinkError> {
        let id = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let request = wire(&Frame::new(id, Message::Request(request)))?;
        let channel = Channel::new();
        if self.dead_reason().is_some() {
            return Err(LinkError::Closed);
        }
        self.shared.channels.lock().expect("no panics while held").insert(id, channel.clone());
        self.out.send(request).await.map_err(|_| LinkError::Closed)?;
        let started = loop {
            let notified = channel.notify.notified();
            {
                let mut st = channel.lock();
                match st.started.take() {
                    Some(Ok(started)) => break started,
                    Some(Err(e)) => {
                        drop(st);
                        self.shared.remove(id);
                        return Err(LinkError::Agent(e));
                    }
                    None => {}
                }
                if let Some(reason) = st.failed.clone() {
                    drop(st);
                    self.shared.remove(id);
                    return Err(LinkError::Protocol { channel: id, reason });
                }
            }
            notified.await;
        };
        Ok((id, channel, started))
    }

    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        self.out.send(wire(&frame)?).await.map_err(|_| LinkError::Closed)
    }

    /// Start a process in the guest.
    pub async fn exec(self: &Arc<Self>, request: ExecRequest) -> Result<Exec, LinkError> {
        let (id, channel, started) = self.open(Request::Exec(request)).await?;
        let pid = match started {
            Started::Exec { pid } => pid,
            _ => 0,
        };
        Ok(Exec { link: self.clone(), id, channel, pid, done: false })
    }

    /// A request the agent answers at once: its `Started`.
    pub async fn request(&self, request: Request) -> Result<Started, LinkError> {
        let (id, _, started) = self.open(request).await?;
        self.shared.remove(id);
        Ok(started)
    }

    /// A file operation that answers at once (stat, list, mkdir, remove, rename, chmod).
    pub async fn file_op(&self, request: Request) -> Result<FsReply, LinkError> {
        match self.request(request).await? {
            Started::Fs(reply) => Ok(reply),
            other => Err(LinkError::Protocol { channel: 0, reason: format!("expected a file result, got {other:?}") }),
        }
    }

    /// A streaming file operation (archives in and out, file contents, watch): bytes move as
    /// stdout and stdin of the returned handle, which ends with exit code 0, or 1 and the reason
    /// on stderr.
    pub async fn file_stream(self: &Arc<Self>, request: Request) -> Result<Exec, LinkError> {
        let (id, channel, started) = self.open(request).await?;
        if started != Started::Stream {
            self.shared.remove(id);
            return Err(LinkError::Protocol { channel: id, reason: format!("expected a stream, got {started:?}") });
        }
        Ok(Exec { link: self.clone(), id, channel, pid: 0, done: false })
    }

    /// Round trip to the agent.
    pub async fn ping(&self) -> Result<(), LinkError> {
        self.request(Request::Ping).await.map(drop)
    }

    /// Set the guest's clock and reseed its RNG now, after the VM was paused.
    pub async fn resync(&self) -> Result<(), LinkError> {
        self.request(Request::Resync(resync())).await.map(drop)
    }

    /// Ask the agent to power the guest off. The VM exits shortly after.
    pub async fn shutdown(&self) -> Result<(), LinkError> {
        self.request(Request::Shutdown).await.map(drop)
    }

    /// Disconnect now, even while [`Exec`] handles still hold the link; they see it as closed.
    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.kill_all("the host closed the link".into());
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn write_loop(mut w: BufWriter<OwnedWriteHalf>, mut rx: mpsc::Receiver<Vec<u8>>, shared: Arc<Shared>) {
    while let Some(bytes) = rx.recv().await {
        let mut result = w.write_all(&bytes).await;
        // Coalesce whatever else is queued into the same flush.
        while result.is_ok() {
            match rx.try_recv() {
                Ok(bytes) => result = w.write_all(&bytes).await,
                Err(_) => break,
            }
        }
        if let Err(e) = result {
            shared.kill_all(format!("writing to the agent failed: {e}"));
            return;
        }
        if let Err(e) = w.flush().await {
            shared.kill_all(format!("writing to the agent failed: {e}"));
            return;
        }
    }
}

async fn read_loop(mut r: BufReader<OwnedReadHalf>, shared: Arc<Shared>, out: mpsc::Sender<Vec<u8>>) {
    let reason = loop {
        let frame = match read_frame(&mut r).await {
            Ok(f) => f,
            Err(FrameError::Closed) => break "the agent closed the link".to_string(),
            Err(e) => break format!("malformed data from the agent: {e}"),
        };
        if frame.channel == CONTROL_CHANNEL {
            // Late handshake answers and the like; nothing else is defined on channel 0.
            continue;
        }
        let Some(channel) = shared.channel(frame.channel) else {
            continue; // A late frame of a channel we already closed.
        };
        if let Err(reason) = deliver(&channel, frame.message) {
            tracing::warn!(channel = frame.channel, %reason, "agent protocol violation; closing channel");
            channel.lock().failed.get_or_insert(reason);
            shared.remove(frame.channel);
            let _ = out.try_send(close_frame(frame.channel));
        }
        channel.notify.notify_waiters();
    };
    tracing::debug!(%reason, "agent link reader stopped");
    shared.kill_all(reason);
}

/// Apply one message from the guest to a channel's state, refusing what the protocol does not allow.
fn deliver(channel: &Channel, message: Message) -> Result<(), String> {
    let mut st = channel.lock();
    match message {
        Message::Started(s) if st.started.is_none() => st.started = Some(Ok(s)),
        Message::Error(e) => {
            if st.started.is_none() {
                st.started = Some(Err(e));
            } else {
                st.failed = Some(format!("agent error: {}", e.message));
            }
        }
        Message::Data { stream, data } => {
            let i = match stream {
                Stream::Stdout => 0,
                Stream::Stderr => 1,
                Stream::Stdin => return Err("data for stdin came from the guest".into()),
            };
            if st.eof[i] {
                return Err(format!("{stream:?} data after its end"));
            }
            let len = u32::try_from(data.len()).map_err(|_| "oversized data frame".to_string())?;
            if len > st.granted[i] {
                return Err(format!("{stream:?} overran its flow-control window ({len} > {})", st.granted[i]));
            }
            st.granted[i] -= len;
            let buf = if i == 0 { &mut st.stdout } else { &mut st.stderr };
            buf.extend(data);
        }
        Message::Eof { stream: Stream::Stdout } => st.eof[0] = true,
        Message::Eof { stream: Stream::Stderr } => st.eof[1] = true,
        Message::Credit { stream: Stream::Stdin, bytes } => {
            st.stdin_credit = st.stdin_credit.checked_add(bytes).ok_or("stdin credit overflow")?;
        }
        Message::Exit(status) if st.exit.is_none() => st.exit = Some(status),
        Message::Close => st.closed = true,
        other => return Err(format!("unexpected message {other:?}")),
    }
    Ok(())
}

/// Output or the end of a process running in the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

/// A process running in the guest.
pub struct Exec {
    link: Arc<AgentLink>,
    id: u32,
    channel: Arc<Channel>,
    pid: u32,
    done: bool,
}

impl Exec {
    /// The process's pid inside the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The link channel this runs on.
    pub fn channel(&self) -> u32 {
        self.id
    }

    /// The next piece of output, or the exit status once all output has been read. Returns the
    /// data it hands out to the guest as credit, so the guest never gets further ahead than one window.
    pub async fn next_event(&mut self) -> Result<ExecEvent, LinkError> {
        loop {
            let notified = self.channel.notify.notified();
            let (event, credit) = {
                let mut st = self.channel.lock();
                if !st.stdout.is_empty() {
                    let data: Vec<u8> = st.stdout.drain(..).collect();
                    st.granted[0] += data.len() as u32;
                    let n = data.len() as u32;
                    (Some(ExecEvent::Stdout(data)), Some((Stream::Stdout, n)))
                } else if !st.stderr.is_empty() {
                    let data: Vec<u8> = st.stderr.drain(..).collect();
                    st.granted[1] += data.len() as u32;
                    let n = data.len() as u32;
                    (Some(ExecEvent::Stderr(data)), Some((Stream::Stderr, n)))
                } else if let Some(status) = st.exit {
                    self.done = true;
                    (Some(ExecEvent::Exit(status)), None)
                } else if let Some(reason) = st.failed.clone() {
                    self.done = true;
                    return Err(LinkError::Protocol { channel: self.id, reason });
                } else if st.closed {
                    // Closed without an exit (a host mount's channel ends so): nothing more comes.
                    self.done = true;
                    drop(st);
                    self.link.shared.remove(self.id);
                    return Err(LinkError::Closed);
                } else {
                    (None, None)
                }
            };
            if let Some((stream, bytes)) = credit {
                // Credit is best effort: if the link is gone the next wait reports it.
                let _ = self.link.send(Frame::new(self.id, Message::Credit { stream, bytes })).await;
            }
            if let Some(event) = event {
                if self.done {
                    self.link.shared.remove(self.id);
                }
                return Ok(event);
            }
            notified.await;
        }
    }

    /// A handle for feeding stdin and sending signals while another task reads the output.
    pub fn control(&self) -> ExecControl {
        ExecControl { link: self.link.clone(), id: self.id, channel: self.channel.clone() }
    }

    /// Read everything to the end: (stdout, stderr, status). Only for outputs known to be small.
    pub async fn collect(mut self) -> Result<(Vec<u8>, Vec<u8>, ExitStatus), LinkError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.next_event().await? {
                ExecEvent::Stdout(d) => out.extend(d),
                ExecEvent::Stderr(d) => err.extend(d),
                ExecEvent::Exit(s) => return Ok((out, err, s)),
            }
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned while running: the agent kills the process group on Close.
            self.link.shared.remove(self.id);
            let _ = self.link.out.try_send(close_frame(self.id));
        }
    }
}

/// Input side of an [`Exec`]: stdin and signals. Cheap to clone.
#[derive(Clone)]
pub struct ExecControl {
    link: Arc<AgentLink>,
    id: u32,
    channel: Arc<Channel>,
}

impl ExecControl {
    /// Send bytes to the process's stdin, waiting for credit as needed.
    pub async fn write_stdin(&self, mut data: &[u8]) -> Result<(), LinkError> {
        while !data.is_empty() {
            let notified = self.channel.notify.notified();
            let n = {
                let mut st = self.channel.lock();
                if let Some(reason) = st.failed.clone() {
                    return Err(LinkError::Protocol { channel: self.id, reason });
                }
                if st.exit.is_some() || st.closed {
                    return Err(LinkError::Closed);
                }
                let n = (st.stdin_credit as usize).min(MAX_CHUNK).min(data.len());
                st.stdin_credit -= n as u32;
                n
            };
            if n == 0 {
                notified.await;
                continue;
            }
            self.link
                .send(Frame::new(self.id, Message::Data { stream: Stream::Stdin, data: data[..n].to_vec() }))
                .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Close the process's stdin.
    pub async fn close_stdin(&self) -> Result<(), LinkError> {
        self.link.send(Frame::new(self.id, Message::Eof { stream: Stream::Stdin })).await
    }

    /// Send a signal to the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), LinkError> {
        self.link.send(Frame::new(self.id, Message::Signal(signal))).await
    }

    /// Tell a process started with a terminal that the terminal changed size.
    pub async fn resize(&self, size: moat_proto::TtySize) -> Result<(), LinkError> {
        self.link.send(Frame::new(self.id, Message::Resize(size))).await
    }
}
