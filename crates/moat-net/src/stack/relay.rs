//! The bytes of a relayed connection, copied between a guest's smoltcp socket and a host socket
//! with no buffer of the connection's own: the host socket is read straight into the smoltcp
//! socket's send buffer, and its receive buffer written straight to the host socket. A copy
//! through a buffer would cost one more pass over every byte, memory per connection, and chunks
//! too small to fill a segment of the guest link's MTU.

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};

use smoltcp::socket::tcp;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::flow::GuestStream;

/// Most bytes read from the host socket at once: the core's lock is held for the read, which
/// every other flow of the sandbox and its poll loop wait on meanwhile.
const FILL_CHUNK: usize = 128 * 1024;

/// Copy both ways between `guest` and `host` until both have ended their sending: an end on one
/// side is passed on as a FIN to the other. The first error ends both.
pub(super) async fn relay(guest: &GuestStream, host: TcpStream) -> io::Result<()> {
    let (from_host, mut to_host) = host.into_split();
    let down = async {
        loop {
            poll_fn(|cx| guest.poll_send_room(cx)).await?;
            from_host.readable().await?;
            match guest.fill_from(&from_host) {
                Ok(0) => {
                    guest.close();
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    let up = async {
        loop {
            if !poll_fn(|cx| guest.poll_recv_ready(cx)).await {
                return to_host.shutdown().await;
            }
            to_host.writable().await?;
            match guest.drain_to(&to_host) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    tokio::try_join!(down, up).map(drop)
}

impl GuestStream {
    /// Ready once the socket's send buffer has room; an error once nothing more can be sent.
    fn poll_send_room(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| {
            if !s.may_send() {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)))
            } else if s.can_send() {
                Poll::Ready(Ok(()))
            } else {
                s.register_send_waker(cx.waker());
                Poll::Pending
            }
        })
    }

    /// Ready with true once the guest has sent bytes to take, with false at its end.
    fn poll_recv_ready(&self, cx: &mut Context<'_>) -> Poll<bool> {
        self.with(|s| {
            if s.can_recv() {
                Poll::Ready(true)
            } else if s.may_recv() || matches!(s.state(), tcp::State::Listen | tcp::State::SynReceived) {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            } else {
                Poll::Ready(false)
            }
        })
    }

    /// One read from `host` into the send buffer; `Ok(0)` at the host's end.
    fn fill_from(&self, host: &OwnedReadHalf) -> io::Result<usize> {
        let n = self.with(|s| {
            s.send(|buf| {
                let len = buf.len().min(FILL_CHUNK);
                match host.try_read(&mut buf[..len]) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                }
            })
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?
        })?;
        if n > 0 {
            self.inner.wake.notify_one();
        }
        Ok(n)
    }

    /// One write of what the guest sent to `host`; taking it opens the guest's window.
    fn drain_to(&self, host: &OwnedWriteHalf) -> io::Result<usize> {
        let n = self.with(|s| {
            s.recv(|buf| match host.try_write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            })
            // Only a socket that can no longer receive refuses; the next readiness says so.
            .unwrap_or(Ok(0))
        })?;
        if n > 0 {
            self.inner.wake.notify_one();
        }
        Ok(n)
    }
}
