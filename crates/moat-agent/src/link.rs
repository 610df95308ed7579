//! Serving one host connection on the agent link: handshake, then requests on channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::{
    read_frame, AgentHello, Frame, FrameError, HostHello, Message, Request, Started, Stream, CONTROL_CHANNEL,
    PROTOCOL_VERSION, SYNC_MARKER,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;

use crate::exec::{self, Ctl};

/// What the writer task puts on the wire.
#[derive(Debug)]
pub enum Out {
    Raw(&'static [u8]),
    Frame(Frame),
}

/// What the agent may do to the machine it runs on. Tests on the host use `Host`, which leaves
/// the clock alone and never powers anything off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pid1,
    Host,
}

type Channels = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Ctl>>>>;

/// Serve one connection until the host goes away or breaks the protocol. Every process started
/// over this connection is killed when it ends.
pub async fn serve<R, W>(reader: R, writer: W, mode: Mode) -> FrameError
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let (out, mut rx) = mpsc::channel::<Out>(256);
    let writer_task = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 * 1024, writer);
        while let Some(item) = rx.recv().await {
            let mut item = Some(item);
            while let Some(i) = item.take() {
                let r = match i {
                    Out::Raw(b) => w.write_all(b).await,
                    Out::Frame(f) => w.write_all(&f.encode()).await,
                };
                if r.is_err() {
                    return;
                }
                item = rx.try_recv().ok();
            }
            if w.flush().await.is_err() {
                return;
            }
        }
    });
    let channels: Channels = Arc::new(Mutex::new(HashMap::new()));
    let end = loop {
        let frame = match read_frame(&mut reader).await {
            Ok(f) => f,
            Err(e) => break e,
        };
        if let Err(e) = dispatch(frame, &out, &channels, mode).await {
            break e;
        }
    };
    // The host is gone: end everything it started.
    let all: Vec<_> = channels.lock().expect("never poisoned").drain().map(|(_, tx)| tx).collect();
    for tx in all {
        let _ = tx.send(Ctl::Close);
    }
    drop(out);
    writer_task.abort();
    end
}

async fn dispatch(frame: Frame, out: &mpsc::Sender<Out>, channels: &Channels, mode: Mode) -> Result<(), FrameError> {
    let send = |f: Frame| async move { out.send(Out::Frame(f)).await.map_err(|_| FrameError::Closed) };
    let id = frame.channel;
    if id == CONTROL_CHANNEL {
        if let Message::Hello(hello) = frame.message {
            greet(&hello, mode);
            out.send(Out::Raw(SYNC_MARKER)).await.map_err(|_| FrameError::Closed)?;
            let ack = AgentHello {
                version: PROTOCOL_VERSION,
                nonce: hello.nonce,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                kernel: kernel_release(),
            };
            send(Frame::new(CONTROL_CHANNEL, Message::HelloAck(ack))).await?;
        }
        return Ok(());
    }
    match frame.message {
        Message::Request(request) => {
            if channels.lock().expect("never poisoned").contains_key(&id) {
                return Ok(()); // A host bug; the live channel is left alone.
            }
            match request {
                Request::Exec(req) => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    channels.lock().expect("never poisoned").insert(id, tx);
                    let (out, channels) = (out.clone(), channels.clone());
                    tokio::spawn(async move {
                        exec::run(id, req, out, rx).await;
                        channels.lock().expect("never poisoned").remove(&id);
                    });
                }
                Request::Ping => {
                    send(Frame::new(id, Message::Started(Started::Pong))).await?;
                    send(Frame::new(id, Message::Close)).await?;
                }
                Request::Shutdown => {
                    send(Frame::new(id, Message::Started(Started::Shutdown))).await?;
                    if mode == Mode::Pid1 {
                        // Let the answer reach the host before the machine goes away.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        crate::init::power_off();
                    }
                }
            }
        }
        Message::Data { stream: Stream::Stdin, data } => forward(channels, id, Ctl::Stdin(data)),
        Message::Eof { stream: Stream::Stdin } => forward(channels, id, Ctl::StdinEof),
        Message::Credit { stream, bytes } => forward(channels, id, Ctl::Credit(stream, bytes)),
        Message::Signal(sig) => forward(channels, id, Ctl::Signal(sig)),
        Message::Close => {
            if let Some(tx) = channels.lock().expect("never poisoned").remove(&id) {
                let _ = tx.send(Ctl::Close);
            }
        }
        other => {
            eprintln!("moat-agent: ignoring unexpected {other:?} on channel {id}");
        }
    }
    Ok(())
}

fn forward(channels: &Channels, id: u32, ctl: Ctl) {
    if let Some(tx) = channels.lock().expect("never poisoned").get(&id) {
        let _ = tx.send(ctl);
    }
}

/// Apply what the host's hello carries: its wall clock and fresh entropy.
fn greet(hello: &HostHello, mode: Mode) {
    if mode != Mode::Pid1 {
        return;
    }
    let secs = (hello.time_unix_ns / 1_000_000_000) as libc::time_t;
    let nanos = (hello.time_unix_ns % 1_000_000_000) as libc::c_long;
    let ts = libc::timespec { tv_sec: secs, tv_nsec: nanos };
    // SAFETY: clock_settime with a valid timespec pointer.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        eprintln!("moat-agent: setting the clock failed: {}", std::io::Error::last_os_error());
    }
    if !hello.entropy.is_empty() {
        // Mixed into the pool (without crediting it); bounded by the frame size limit.
        let _ = std::fs::write("/dev/urandom", &hello.entropy);
    }
}

fn kernel_release() -> String {
    rustix::system::uname().release().to_string_lossy().into_owned()
}
