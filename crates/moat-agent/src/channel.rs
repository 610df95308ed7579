//! What every channel of the agent link shares: the outbox that queues frames for the host, the
//! control messages the link forwards to a channel, the host's credit, and the non-blocking
//! descriptors that exec and background jobs read. The link, exec, files and jobs all import
//! from here, and this imports none of them.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::{ExitStatus, Frame, Message, Stream, TtySize, INITIAL_WINDOW};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::reaper::Ended;

/// After the process exits, output is still forwarded while it flows; a pipe that stays open
/// (a background child holds it) but silent for this long is treated as ended.
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// What the writer task puts on the wire.
#[derive(Debug)]
pub(crate) enum Out {
    Raw(&'static [u8]),
    Frame(Frame),
    /// Signalled once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

/// The sending side of one host session, shared by every channel's task.
///
/// A host may reconnect without the guest ever seeing the port hang up (virtio-serial coalesces a
/// quick close and reopen), so a new hello on a live connection starts a new session. Channel
/// numbers restart with every session, so frames still queued by the old session's channels must
/// never reach the new host: each outbox carries its session number and the writer drops frames
/// of any session but the current one.
#[derive(Clone)]
pub struct Outbox {
    pub(crate) tx: mpsc::Sender<(u64, Out)>,
    pub(crate) session: u64,
}

impl Outbox {
    /// Queue `message` on `channel`; false once the connection is gone.
    pub async fn send(&self, channel: u32, message: Message) -> bool {
        self.tx.send((self.session, Out::Frame(Frame::new(channel, message)))).await.is_ok()
    }

    pub(crate) async fn raw(&self, bytes: &'static [u8]) -> bool {
        self.tx.send((self.session, Out::Raw(bytes))).await.is_ok()
    }

    /// Wait until everything queued so far is written, up to `limit`.
    pub(crate) async fn flush(&self, limit: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send((self.session, Out::Flush(tx))).await.is_ok() {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }
}

/// What the link forwards to a running exec.
#[derive(Debug)]
pub enum Ctl {
    Stdin(Vec<u8>),
    StdinEof,
    Credit(Stream, u32),
    Signal(i32),
    Resize(TtySize),
    /// The host abandoned the channel, or the link went away: kill and forget.
    Close,
}

/// Bytes the host allows us to send on one output stream.
pub(crate) struct Credit {
    avail: Mutex<u32>,
    notify: Notify,
}

impl Credit {
    pub(crate) fn new() -> Arc<Credit> {
        Arc::new(Credit { avail: Mutex::new(INITIAL_WINDOW), notify: Notify::new() })
    }

    /// Wait for credit and take up to `max` bytes of it.
    pub(crate) async fn take(&self, max: u32) -> u32 {
        loop {
            let notified = self.notify.notified();
            {
                let mut a = self.avail.lock().expect("the credit lock is never held across a panic");
                if *a > 0 {
                    let n = (*a).min(max);
                    *a -= n;
                    return n;
                }
            }
            notified.await;
        }
    }

    pub(crate) fn give(&self, n: u32) {
        let mut a = self.avail.lock().expect("the credit lock is never held across a panic");
        *a = a.saturating_add(n);
        self.notify.notify_waiters();
    }
}

pub(crate) fn kill_group(pid: i32, sig: i32) {
    // SAFETY: kill with a negative pid signals a process group; an error (already gone) is fine.
    unsafe { libc::kill(-pid, sig) };
}

/// Decode what the reaper reported into the protocol's exit status.
pub(crate) fn exit_status(ended: Ended, timed_out: bool) -> ExitStatus {
    match ended {
        Ended::Exited(code) => ExitStatus { code: Some(code), signal: None, timed_out },
        Ended::Signaled(sig) => ExitStatus { code: None, signal: Some(sig), timed_out },
    }
}

/// A non-blocking file descriptor registered with the runtime: a pipe end or a terminal
/// controller, shared by the tasks that read and write it.
pub(crate) type Fd = Arc<AsyncFd<OwnedFd>>;

pub(crate) fn async_fd(fd: OwnedFd) -> std::io::Result<Fd> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    // SAFETY: an OwnedFd is a valid open descriptor, and the AsyncFd owns it from here on, so it
    // stays open and the same file until the AsyncFd is dropped.
    let registered = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
    Ok(Arc::new(registered))
}

/// Read at most `len` bytes from `fd`, which `ready` says is readable, on a blocking thread and
/// never on the runtime's own. A guest process that splices a file of a host mount into this
/// pipe (busybox `cat` uses sendfile) holds the pipe's lock until the host answers the FUSE
/// read, and that answer comes through the runtime: a read here would wait for the lock, even
/// non-blocking, and the link would stop. Readiness is cleared when nothing was there.
pub(crate) async fn read_off_thread(
    fd: &Fd,
    mut ready: tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    mut buf: Vec<u8>,
    len: usize,
) -> (Result<usize, rustix::io::Errno>, Vec<u8>) {
    let f = fd.clone();
    let (read, buf) = tokio::task::spawn_blocking(move || {
        let n = len.min(buf.len());
        (rustix::io::read(f.get_ref(), &mut buf[..n]), buf)
    })
    .await
    .unwrap_or_else(|_| (Err(rustix::io::Errno::IO), vec![0; len]));
    if read == Err(rustix::io::Errno::AGAIN) {
        ready.clear_ready();
    }
    (read, buf)
}

/// Write a prefix of `data` to `fd`, which `ready` says is writable, on a blocking thread, for
/// the reason [`read_off_thread`] gives (a process splicing from this pipe into a host mount).
pub(crate) async fn write_off_thread(
    fd: &Fd,
    mut ready: tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    data: Vec<u8>,
) -> (Result<usize, rustix::io::Errno>, Vec<u8>) {
    let f = fd.clone();
    let (written, data) = tokio::task::spawn_blocking(move || (rustix::io::write(f.get_ref(), &data), data))
        .await
        .unwrap_or_else(|_| (Err(rustix::io::Errno::IO), Vec::new()));
    if written == Err(rustix::io::Errno::AGAIN) {
        ready.clear_ready();
    }
    (written, data)
}

/// Wait until `fd` has data or its end. Once the process exited, a descriptor silent for the
/// drain grace counts as ended: a background child of the process holds it open.
pub(crate) async fn readable<'a>(
    fd: &'a Fd,
    exited: &mut watch::Receiver<bool>,
) -> Option<tokio::io::unix::AsyncFdReadyGuard<'a, OwnedFd>> {
    loop {
        if *exited.borrow() {
            return tokio::time::timeout(DRAIN_GRACE, fd.readable()).await.ok().and_then(Result::ok);
        }
        tokio::select! {
            r = fd.readable() => return r.ok(),
            r = exited.changed() => if r.is_err() { return None },
        }
    }
}
