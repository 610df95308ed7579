//! The guest end of the agent link: a virtio-serial port.
//!
//! While no host is connected, reads return EOF and poll reports HUP (and, misleadingly, IN).
//! The agent then polls every few milliseconds until the HUP clears and serves the next host.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the kernel lists virtio-serial ports and their names.
const PORTS_DIR: &str = "/sys/class/virtio-ports";

/// How often to look for a returning host.
const HOST_POLL: Duration = Duration::from_millis(10);

/// Why the port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("no virtio-serial port named {name:?} appeared within {}s (ports seen: {seen}); is virtio_console loaded and the port on the QEMU command line?", .waited.as_secs())]
    NotFound { name: String, waited: Duration, seen: String },
    #[error("cannot open the agent port {path}: {reason}")]
    Open { path: String, reason: std::io::Error },
}

fn scan(name: &str) -> (Option<PathBuf>, Vec<String>) {
    let mut seen = Vec::new();
    if let Ok(dir) = std::fs::read_dir(PORTS_DIR) {
        for e in dir.flatten() {
            let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
            let n = n.trim();
            seen.push(format!("{}={n}", e.file_name().to_string_lossy()));
            if n == name {
                let dev = Path::new("/dev").join(e.file_name());
                if dev.exists() {
                    return (Some(dev), seen);
                }
            }
        }
    }
    (None, seen)
}

/// Find `/dev/vportNpM` whose port name is `name`, waiting up to `timeout` for it to appear.
pub fn find(name: &str, timeout: Duration) -> Result<PathBuf, PortError> {
    let start = Instant::now();
    loop {
        let (found, seen) = scan(name);
        if let Some(dev) = found {
            return Ok(dev);
        }
        if start.elapsed() > timeout {
            let seen = if seen.is_empty() { "none".into() } else { seen.join(", ") };
            return Err(PortError::NotFound { name: name.into(), waited: timeout, seen });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An open port.
pub struct Port {
    fd: OwnedFd,
}

impl Port {
    /// Open the port non-blocking.
    pub fn open(path: &Path) -> Result<Port, PortError> {
        use rustix::fs::{Mode, OFlags};
        let fd =
            rustix::fs::open(path, OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty())
                .map_err(|e| PortError::Open { path: path.display().to_string(), reason: e.into() })?;
        Ok(Port { fd })
    }

    /// Use an already open descriptor (tests use one end of a socket pair).
    pub fn from_fd(fd: OwnedFd) -> Port {
        Port { fd }
    }

    /// Whether a host is connected right now. Only HUP tells: virtio_console also reports the
    /// port readable while no host is connected (a read returns EOF at once).
    pub fn host_connected(&self) -> bool {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, 0) {
            Ok(_) => !fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR),
            Err(_) => false,
        }
    }

    /// Wait until a host is connected, polling (HUP is level-triggered, so waiting on it would
    /// spin). Nothing stale is left to discard: a read only returns EOF once the buffer is empty.
    pub async fn wait_for_host(&self) {
        while !self.host_connected() {
            tokio::time::sleep(HOST_POLL).await;
        }
    }

    /// A stream for one host connection. Each connection gets its own registration with the
    /// runtime because tokio keeps "closed" readiness forever once a HUP was seen.
    pub fn connection(&self) -> std::io::Result<Connection> {
        let fd = rustix::io::fcntl_dupfd_cloexec(&self.fd, 3)?;
        // SAFETY: the AsyncFd owns `fd` for its whole life, and an OwnedFd always reports the same
        // raw descriptor, which stays open until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Connection(fd))
    }
}

/// The port as a byte stream for one host connection; it ends (EOF, or `NotConnected` on write)
/// when the host goes away.
pub struct Connection(AsyncFd<OwnedFd>);

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| rustix::io::read(fd.get_ref().as_fd(), &mut *unfilled).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // The host hung up (maybe already back): this connection is over either way.
                Err(_would_block) if closed => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|fd| rustix::io::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) if closed => {
                    return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "the host hung up")))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_connection_ends_when_the_host_hangs_up_and_the_port_waits_for_the_next() {
        let (guest, mut host) = std::os::unix::net::UnixStream::pair().unwrap();
        guest.set_nonblocking(true).unwrap();
        let port = Port::from_fd(guest.into());
        assert!(port.host_connected());
        let mut conn = port.connection().unwrap();
        host.write_all(b"hello").unwrap();
        let mut buf = [0u8; 16];
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        conn.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        std::io::Read::read_exact(&mut host, &mut back).unwrap();
        assert_eq!(&back, b"back");
        drop(host);
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0, "EOF once the host is gone");
        assert!(!port.host_connected());
        assert!(tokio::time::timeout(Duration::from_millis(100), port.wait_for_host()).await.is_err());
    }

    #[test]
    fn a_missing_port_is_reported_with_what_was_seen() {
        let e = find("no.such.port", Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("no.such.port"), "{e}");
    }
}
