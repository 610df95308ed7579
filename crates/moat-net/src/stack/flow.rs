//! A guest's TCP connection once its SYN is let through: the name check of allowlist mode (TLS
//! SNI here, plain HTTP in the gate), secret interception, and the byte relay; and the smoltcp
//! socket as a tokio stream.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{Inner, CONNECT_TIMEOUT};
use crate::gate;
use crate::policy::{Rule, Verdict};
use crate::sniff::{sniff, Sniffed, MAX_SNIFF};
use crate::tls;

/// How long to wait for a ClientHello that may carry a secret's host (nothing else depends on it).
const SNIFF_FIRST_BYTES: Duration = Duration::from_secs(2);
/// How long to wait for the first bytes (a whole ClientHello) in allowlist mode, where the
/// connection is refused without them.
const SNIFF_TOTAL: Duration = Duration::from_secs(10);

impl Inner {
    pub(super) async fn tcp_flow(
        self: &Arc<Self>,
        mut guest: GuestStream,
        to: SocketAddrV4,
        real: Ipv4Addr,
        verdict: Verdict,
    ) -> io::Result<()> {
        // Secrets apply to names the guest resolved through moat's DNS; only connections to such
        // an address wait for the client's first bytes when no allowlist asks for the name.
        let for_secrets = self.cfg.secrets.as_ref().is_some_and(|secrets| {
            let names = self.pins.lock().unwrap_or_else(|e| e.into_inner()).names(*to.ip());
            names.iter().any(|n| !secrets.for_host(n).is_empty())
        });
        let mut first = Vec::new();
        let sniffed = match verdict {
            // Fail closed: the connection goes on only once moat has read an allowed name in it.
            Verdict::ByName => match read_first(&mut guest, &mut first, SNIFF_TOTAL).await? {
                First::Closed => return Ok(()),
                First::Sniffed(Sniffed::NotTls) => {
                    let guest = Replay { first: first.into(), inner: guest };
                    return gate::serve(guest, self.gate(to, real)).await;
                }
                First::Sniffed(Sniffed::Tls(Some(name))) => match self.name_check(&name, *to.ip()) {
                    Ok(()) => Sniffed::Tls(Some(name)),
                    Err(why) => return self.refuse_flow(guest, to, &format!("{name}: {why}")),
                },
                First::Sniffed(Sniffed::Tls(None)) => {
                    return self.refuse_flow(guest, to, "a TLS ClientHello with no server name (SNI)")
                }
                First::Sniffed(Sniffed::Invalid) => {
                    return self.refuse_flow(guest, to, "bytes that begin like TLS but hold no valid ClientHello")
                }
                First::Sniffed(Sniffed::NeedMore) => {
                    let why = format!("a TLS ClientHello longer than {} KiB", MAX_SNIFF / 1024);
                    return self.refuse_flow(guest, to, &why);
                }
                First::Silent => {
                    let why = format!(
                        "the client sent nothing to check its name by within {}s (protocols where the server \
                         speaks first need --allow-cidr)",
                        SNIFF_TOTAL.as_secs()
                    );
                    return self.refuse_flow(guest, to, &why);
                }
            },
            // Nothing to check: a client that waits, or sends no ClientHello, is simply relayed.
            _ if for_secrets => match read_first(&mut guest, &mut first, SNIFF_FIRST_BYTES).await? {
                First::Closed => return Ok(()),
                First::Sniffed(sniffed) => sniffed,
                First::Silent => Sniffed::NotTls,
            },
            _ => Sniffed::NotTls,
        };
        let intercept = match (&sniffed, &self.cfg.secrets) {
            (Sniffed::Tls(Some(host)), Some(secrets)) => {
                Some((host.clone(), secrets.for_host(host), secrets)).filter(|(_, values, _)| !values.is_empty())
            }
            _ => None,
        };
        let upstream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(SocketAddrV4::new(real, to.port()))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    guest.abort();
                    return Err(e);
                }
                Err(_) => {
                    guest.abort();
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
                }
            };
        let _ = upstream.set_nodelay(true);
        match intercept {
            Some((host, values, secrets)) => {
                let guest = Replay { first: first.into(), inner: guest };
                tls::intercept(guest, &host, upstream, &secrets.ca, tls::upstream_roots(), &values)
                    .await
                    .map_err(io::Error::other)?;
            }
            None => {
                let mut upstream = upstream;
                upstream.write_all(&first).await?;
                super::relay::relay(&guest, upstream).await?;
            }
        }
        Ok(())
    }

    /// Whether the guest may speak to `name` at `dst` in allowlist mode: the name is allowed, and
    /// the guest resolved it to that address through moat's DNS. Why not, if not.
    fn name_check(&self, name: &str, dst: Ipv4Addr) -> Result<(), String> {
        if !self.policy().name_allowed(name) {
            return Err(Rule::Allowlist.describe().to_string());
        }
        if !self.pins.lock().unwrap_or_else(|e| e.into_inner()).resolved(name, dst) {
            return Err("was not resolved to this address through moat's DNS".to_string());
        }
        Ok(())
    }

    /// The HTTP gate of a plain connection in allowlist mode (see [`gate`]).
    fn gate(self: &Arc<Self>, to: SocketAddrV4, real: Ipv4Addr) -> gate::Gate {
        let (check, refused) = (self.clone(), self.clone());
        gate::Gate {
            upstream: SocketAddrV4::new(real, to.port()),
            check: Box::new(move |name| check.name_check(name, *to.ip())),
            refused: Box::new(move |message| refused.refused(message)),
        }
    }

    /// Refuse a connection already accepted from the guest: reset it, and say why.
    fn refuse_flow(&self, guest: GuestStream, to: SocketAddrV4, why: &str) -> io::Result<()> {
        self.refused(format!("tcp {to} refused: {why} (rule {})", Rule::Allowlist.as_str()));
        guest.abort();
        Ok(())
    }
}

/// How a connection's first bytes came.
enum First {
    /// The client closed without sending anything.
    Closed,
    /// The client sent nothing, or no whole ClientHello, within the wait.
    Silent,
    /// What the bytes are; `NeedMore` when a ClientHello goes past [`MAX_SNIFF`].
    Sniffed(Sniffed),
}

/// Read the guest's first bytes into `buf`: one read unless they begin a TLS ClientHello, which
/// is read whole (up to [`MAX_SNIFF`]) for its server name. `wait` bounds the whole of it.
async fn read_first(guest: &mut GuestStream, buf: &mut Vec<u8>, wait: Duration) -> io::Result<First> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut chunk = vec![0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, guest.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Ok(First::Silent),
        };
        if n == 0 {
            return Ok(if buf.is_empty() { First::Closed } else { First::Silent });
        }
        buf.extend_from_slice(&chunk[..n]);
        // Only the first MAX_SNIFF bytes are judged: what a read brought past them must not turn
        // "too long" into "invalid" (rustls refuses more than one record's worth at once), as it
        // would depending on how the guest's segments happened to arrive.
        match sniff(&buf[..buf.len().min(MAX_SNIFF)]) {
            Sniffed::NeedMore if buf.len() < MAX_SNIFF => continue,
            found => return Ok(First::Sniffed(found)),
        }
    }
}

/// One TCP connection with the guest as a tokio stream; dropping it closes the connection.
pub struct GuestStream {
    pub(super) inner: Arc<Inner>,
    pub(super) handle: SocketHandle,
}

impl std::fmt::Debug for GuestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestStream").field("handle", &self.handle).finish_non_exhaustive()
    }
}

impl GuestStream {
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> R {
        let mut core = self.inner.core.lock().unwrap_or_else(|e| e.into_inner());
        f(core.sockets.get_mut::<tcp::Socket>(self.handle))
    }

    /// Wait until the handshake is done; false if the connection never got there.
    pub(super) async fn established(&self) -> bool {
        std::future::poll_fn(|cx| {
            self.with(|s| match s.state() {
                tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent => {
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Established => Poll::Ready(true),
                _ => Poll::Ready(s.may_send() || s.can_recv()),
            })
        })
        .await
    }

    /// End the sending half: the guest reads to its end (a FIN) after what was sent.
    pub(super) fn close(&self) {
        self.with(|s| s.close());
        self.inner.wake.notify_one();
    }

    /// Reset the connection (the guest sees "connection refused" or "reset").
    fn abort(&self) {
        self.with(|s| s.abort());
        self.inner.wake.notify_one();
    }
}

impl Drop for GuestStream {
    /// The flow is done: close the socket and let the poll loop remove it once closed.
    fn drop(&mut self) {
        {
            let mut core = self.inner.core.lock().unwrap_or_else(|e| e.into_inner());
            core.sockets.get_mut::<tcp::Socket>(self.handle).close();
            core.closing.push(self.handle);
        }
        self.inner.wake.notify_one();
    }
}

impl AsyncRead for GuestStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let r = self.with(|s| {
            if s.can_recv() {
                match s.recv_slice(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        Poll::Ready(Ok(true))
                    }
                    Err(_) => Poll::Ready(Ok(false)),
                }
            } else if !s.may_recv() {
                match s.state() {
                    tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent => {
                        s.register_recv_waker(cx.waker());
                        Poll::Pending
                    }
                    _ => Poll::Ready(Ok(false)),
                }
            } else {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            }
        });
        match r {
            Poll::Ready(Ok(true)) => {
                // Reading opened the window: let the poll loop tell the guest.
                self.inner.wake.notify_one();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(false)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for GuestStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = self.with(|s| {
            if s.can_send() {
                Poll::Ready(s.send_slice(data).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)))
            } else if !s.may_send() {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)))
            } else {
                s.register_send_waker(cx.waker());
                Poll::Pending
            }
        });
        if matches!(r, Poll::Ready(Ok(_))) {
            self.inner.wake.notify_one();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close();
        Poll::Ready(Ok(()))
    }
}

/// A guest stream whose first bytes were already read (to find its name) and are read again.
struct Replay {
    first: VecDeque<u8>,
    inner: GuestStream,
}

impl AsyncRead for Replay {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = buf.remaining().min(self.first.len());
            let bytes: Vec<u8> = self.first.drain(..n).collect();
            buf.put_slice(&bytes);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
