//! Serving one host connection on the agent link: handshake, then requests on channels.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moat_proto::{
    data_header, AgentError, AgentHello, Decoder, ErrorCode, Frame, FrameError, HostHello, Message, Request, Started,
    Stream, CONTROL_CHANNEL, PROTOCOL_VERSION, SYNC_MARKER,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::channel::{Ctl, Out, Outbox};
use crate::exec;
use crate::reaper::Reaper;

/// Frames queued for the writer before senders wait; memory stays bounded by credit anyway.
const OUT_QUEUE: usize = 256;

/// How long a shutdown waits for its answer to reach the host before the machine goes away.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(500);

/// What the agent may do to the machine it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in a guest: the hello sets the clock and reseeds the RNG; shutdown powers off.
    Pid1,
    /// Tests on a host: the clock and RNG are left alone and shutdown only ends `serve`.
    Host,
}

/// Why [`Agent::serve`] returned.
#[derive(Debug, thiserror::Error)]
pub enum LinkEnd {
    #[error("the host went away")]
    HostGone,
    #[error("the host broke the protocol: {0}")]
    Broken(#[from] FrameError),
    #[error("reading from the host failed: {0}")]
    Io(std::io::Error),
    /// Only in [`Mode::Host`]; as PID 1 a shutdown never returns.
    #[error("the host asked for a shutdown")]
    Shutdown,
}

/// The serving half of the agent: everything one connection needs, independent of PID 1.
#[derive(Clone)]
pub struct Agent {
    reaper: Arc<Reaper>,
    mode: Mode,
    /// Background processes outlive connections, so they live here, not in `serve`.
    jobs: Arc<crate::jobs::Jobs>,
    /// Host directory mounts outlive connections (and snapshots) too.
    host_mounts: Arc<crate::hostfs::HostMounts>,
}

/// A live channel of this connection.
struct Live {
    ctl: mpsc::UnboundedSender<Ctl>,
}

impl Agent {
    pub fn new(reaper: Arc<Reaper>, mode: Mode) -> Agent {
        Agent { reaper, mode, jobs: Arc::default(), host_mounts: Arc::default() }
    }

    /// Serve one connection until the host goes away, breaks the protocol or (in host mode) asks
    /// for a shutdown. Every process started over this connection and still running is killed.
    pub async fn serve<IO>(&self, io: IO) -> LinkEnd
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, writer) = tokio::io::split(io);
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let session = Arc::new(AtomicU64::new(0));
        let mut out = Outbox { tx, session: 0 };
        let writer_task = tokio::spawn(write_loop(writer, rx, session.clone()));
        let (finished_tx, mut finished) = mpsc::unbounded_channel::<(u64, u32)>();
        let mut channels: HashMap<u32, Live> = HashMap::new();
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let end = 'serve: loop {
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        if matches!(frame.message, Message::Hello(_)) && frame.channel == CONTROL_CHANNEL {
                            // A (re)connecting host: end the previous session's channels first.
                            close_all(&mut channels);
                            out.session += 1;
                            session.store(out.session, Ordering::SeqCst);
                        }
                        if let Some(end) = self.dispatch(frame, &out, &mut channels, &finished_tx).await {
                            break 'serve end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => break 'serve LinkEnd::Broken(e),
                }
            }
            tokio::select! {
                r = reader.read(&mut buf) => match r {
                    Ok(0) => break LinkEnd::HostGone,
                    Ok(n) => decoder.push(&buf[..n]),
                    Err(e) => break LinkEnd::Io(e),
                },
                Some((session, id)) = finished.recv() => {
                    if session == out.session {
                        channels.remove(&id);
                    }
                }
            }
        };
        // The connection is over: end what it started and drop what it queued.
        close_all(&mut channels);
        writer_task.abort();
        end
    }

    /// Act on one frame from the host; `Some` ends the connection.
    async fn dispatch(
        &self,
        frame: Frame,
        out: &Outbox,
        channels: &mut HashMap<u32, Live>,
        finished: &mpsc::UnboundedSender<(u64, u32)>,
    ) -> Option<LinkEnd> {
        let id = frame.channel;
        if id == CONTROL_CHANNEL {
            return match frame.message {
                Message::Hello(hello) => (!self.greet(&hello, out).await).then_some(LinkEnd::HostGone),
                other => {
                    eprintln!("moat-agent: ignoring {} on the control channel", describe(&other));
                    None
                }
            };
        }
        match frame.message {
            Message::Request(request) => {
                if channels.contains_key(&id) {
                    eprintln!("moat-agent: ignoring a second request on live channel {id}");
                    return None;
                }
                match request {
                    Request::Exec(req) => {
                        let (ctl, rx) = mpsc::unbounded_channel();
                        channels.insert(id, Live { ctl });
                        let (reaper, jobs, out, finished) =
                            (self.reaper.clone(), self.jobs.clone(), out.clone(), finished.clone());
                        tokio::spawn(async move {
                            let session = out.session;
                            exec::run(id, req, reaper, jobs, out, rx).await;
                            let _ = finished.send((session, id));
                        });
                    }
                    Request::Attach { pid, replay } => {
                        let (ctl, rx) = mpsc::unbounded_channel();
                        channels.insert(id, Live { ctl });
                        let (jobs, out, finished) = (self.jobs.clone(), out.clone(), finished.clone());
                        tokio::spawn(async move {
                            let session = out.session;
                            jobs.attach(id, pid, replay, out, rx).await;
                            let _ = finished.send((session, id));
                        });
                    }
                    Request::Jobs => {
                        let jobs = self.jobs.list();
                        if !(out.send(id, Message::Started(Started::Jobs { jobs })).await
                            && out.send(id, Message::Close).await)
                        {
                            return Some(LinkEnd::HostGone);
                        }
                    }
                    Request::Kill { pid, signal } => {
                        let answer = match self.jobs.kill(pid, signal) {
                            Ok(()) => Message::Started(Started::Done),
                            Err(e) => Message::Error(e),
                        };
                        if !(out.send(id, answer).await && out.send(id, Message::Close).await) {
                            return Some(LinkEnd::HostGone);
                        }
                    }
                    file_op @ (Request::ReadTar { .. }
                    | Request::WriteTar { .. }
                    | Request::ReadFile { .. }
                    | Request::WriteFile { .. }
                    | Request::Stat { .. }
                    | Request::List { .. }
                    | Request::Mkdir { .. }
                    | Request::Remove { .. }
                    | Request::Rename { .. }
                    | Request::Chmod { .. }
                    | Request::Watch { .. }) => {
                        let (ctl, rx) = mpsc::unbounded_channel();
                        channels.insert(id, Live { ctl });
                        let (out, finished) = (out.clone(), finished.clone());
                        tokio::spawn(async move {
                            let session = out.session;
                            crate::files::run(id, file_op, out, rx).await;
                            let _ = finished.send((session, id));
                        });
                    }
                    Request::MountVolume { serial, path, readonly, owner } => {
                        let answer = match crate::volumes::mount(&serial, &path, readonly, owner.as_deref()).await {
                            Ok(()) => Message::Started(Started::Done),
                            Err(e) => Message::Error(e),
                        };
                        if !(out.send(id, answer).await && out.send(id, Message::Close).await) {
                            return Some(LinkEnd::HostGone);
                        }
                    }
                    Request::UnmountVolume { path } => {
                        let answer = match crate::volumes::unmount(&path).await {
                            Ok(()) => Message::Started(Started::Done),
                            Err(e) => Message::Error(e),
                        };
                        if !(out.send(id, answer).await && out.send(id, Message::Close).await) {
                            return Some(LinkEnd::HostGone);
                        }
                    }
                    Request::HostMount { path, readonly } => {
                        let (ctl, rx) = mpsc::unbounded_channel();
                        channels.insert(id, Live { ctl });
                        let (mounts, out, finished) = (self.host_mounts.clone(), out.clone(), finished.clone());
                        tokio::spawn(async move {
                            let session = out.session;
                            mounts.serve(id, path, readonly, out, rx).await;
                            let _ = finished.send((session, id));
                        });
                    }
                    Request::Ping => {
                        if !(out.send(id, Message::Started(Started::Pong)).await && out.send(id, Message::Close).await)
                        {
                            return Some(LinkEnd::HostGone);
                        }
                    }
                    Request::Resync(r) => {
                        if self.mode == Mode::Pid1 {
                            resync(u128::from(r.time_unix_ns), &r.entropy);
                        }
                        if !(out.send(id, Message::Started(Started::Done)).await && out.send(id, Message::Close).await)
                        {
                            return Some(LinkEnd::HostGone);
                        }
                    }
                    Request::Shutdown => {
                        out.send(id, Message::Started(Started::Shutdown)).await;
                        out.send(id, Message::Close).await;
                        out.flush(SHUTDOWN_FLUSH).await;
                        match self.mode {
                            Mode::Pid1 => crate::power::power_off(),
                            Mode::Host => return Some(LinkEnd::Shutdown),
                        }
                    }
                }
            }
            Message::Data { stream: Stream::Stdin, data } => forward(channels, id, Ctl::Stdin(data)),
            Message::Eof { stream: Stream::Stdin } => forward(channels, id, Ctl::StdinEof),
            Message::Credit { stream, bytes } => forward(channels, id, Ctl::Credit(stream, bytes)),
            Message::Signal(sig) => forward(channels, id, Ctl::Signal(sig)),
            Message::Resize(size) => forward(channels, id, Ctl::Resize(size)),
            Message::Close => {
                if let Some(live) = channels.remove(&id) {
                    let _ = live.ctl.send(Ctl::Close);
                }
            }
            other => eprintln!("moat-agent: ignoring {} from the host on channel {id}", describe(&other)),
        }
        None
    }

    /// Apply what the host's hello carries and answer it; false when the connection is gone.
    async fn greet(&self, hello: &HostHello, out: &Outbox) -> bool {
        if self.mode == Mode::Pid1 {
            resync(hello.time_unix_ns, &hello.entropy);
            if let Some(identity) = &hello.identity {
                crate::init::apply_identity(identity);
            }
        }
        let ack = AgentHello {
            version: PROTOCOL_VERSION,
            nonce: hello.nonce,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel: kernel_release(),
        };
        out.raw(SYNC_MARKER).await && out.send(CONTROL_CHANNEL, Message::HelloAck(ack)).await
    }
}

/// Set the wall clock and reseed the RNG from the host's values (as PID 1 only).
fn resync(time_unix_ns: u128, entropy: &[u8]) {
    if let Err(e) = crate::clock::set_wall_clock(time_unix_ns) {
        eprintln!("moat-agent: setting the clock from the host failed: {e}");
    }
    if let Err(e) = crate::entropy::reseed(entropy) {
        eprintln!("moat-agent: reseeding the RNG from the host failed: {e}");
    }
}

/// End every channel (their processes are killed) of the session that is over.
fn close_all(channels: &mut HashMap<u32, Live>) {
    for (_, live) in channels.drain() {
        let _ = live.ctl.send(Ctl::Close);
    }
}

fn forward(channels: &HashMap<u32, Live>, id: u32, ctl: Ctl) {
    // Frames for unknown channels are late frames of a closed channel.
    if let Some(live) = channels.get(&id) {
        let _ = live.ctl.send(ctl);
    }
}

/// A short name of a message for log lines (data payloads are not printed).
fn describe(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::HelloAck(_) => "HelloAck",
        Message::Request(_) => "Request",
        Message::Started(_) => "Started",
        Message::Error(_) => "Error",
        Message::Exit(_) => "Exit",
        Message::Data { .. } => "Data",
        Message::Eof { .. } => "Eof",
        Message::Credit { .. } => "Credit",
        Message::Signal(_) => "Signal",
        Message::Resize(_) => "Resize",
        Message::Close => "Close",
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(writer: W, mut rx: mpsc::Receiver<(u64, Out)>, current: Arc<AtomicU64>) {
    let mut w = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(first) = rx.recv().await {
        let mut flushed = Vec::new();
        let mut next = Some(first);
        // Coalesce whatever else is queued into one flush.
        while let Some((session, item)) = next.take() {
            let r = match item {
                Out::Flush(done) => {
                    flushed.push(done);
                    Ok(())
                }
                _ if session != current.load(Ordering::SeqCst) => Ok(()),
                Out::Raw(b) => w.write_all(b).await,
                // Data goes out as it is after its header: a file chunk is larger than the
                // buffer, so it is written straight from its own memory.
                Out::Frame(Frame { channel, message: Message::Data { stream, data } }) => {
                    match data_header(channel, stream, data.len()) {
                        Ok(header) => {
                            async {
                                w.write_all(&header).await?;
                                w.write_all(&data).await
                            }
                            .await
                        }
                        Err(_) => {
                            let f = Frame::new(channel, Message::Data { stream, data });
                            w.write_all(&encode_or_refuse(f)).await
                        }
                    }
                }
                Out::Frame(f) => w.write_all(&encode_or_refuse(f)).await,
            };
            if r.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if w.flush().await.is_err() {
            return;
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

/// A frame's wire bytes, or, for an answer too large for the link (a huge listing or job list),
/// an error on its channel instead: the host would end the link on an oversized frame, and the
/// host's other channels must not pay for one request.
fn encode_or_refuse(frame: Frame) -> Vec<u8> {
    match frame.encode() {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("moat-agent: channel {}: not sending an answer: {e}", frame.channel);
            let refusal = AgentError {
                code: ErrorCode::BadRequest,
                message: format!("The answer is too large for the agent link ({e}); ask for less."),
            };
            Frame::new(frame.channel, Message::Error(refusal)).encode().expect("a short error message fits a frame")
        }
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    rustix::system::uname().release().to_string_lossy().into_owned()
}
