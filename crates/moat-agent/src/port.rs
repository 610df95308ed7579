//! The guest end of the agent link: a virtio-serial port.
//!
//! While no host is connected, reads return EOF and poll reports HUP; the agent then waits,
//! polling, for the next host instead of spinning on the HUP.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Find `/dev/vportNpM` whose port name is `name`, waiting up to `timeout` for it to appear.
pub fn find(name: &str, timeout: Duration) -> Result<PathBuf, String> {
    let start = Instant::now();
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in dir.flatten() {
                let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if n.trim() == name {
                    let dev = PathBuf::from("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if start.elapsed() > timeout {
            return Err(format!("no virtio-serial port named {name} appeared within {}s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An open port, shared by the reading and the writing half.
#[derive(Clone)]
pub struct Port(Arc<AsyncFd<OwnedFd>>);

impl Port {
    pub fn open(path: &std::path::Path) -> std::io::Result<Port> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(path, OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty())?;
        // SAFETY: `fd` is an open descriptor owned by the AsyncFd for its whole life, and OwnedFd
        // always reports the same raw descriptor.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Port(Arc::new(fd)))
    }

    /// Wait until a host is connected: HUP clears or data is waiting.
    pub async fn wait_for_host(&self) {
        loop {
            let mut fds = [rustix::event::PollFd::new(self.0.get_ref(), rustix::event::PollFlags::IN)];
            let connected = match rustix::event::poll(&mut fds, 0) {
                Ok(_) => {
                    let r = fds[0].revents();
                    r.contains(rustix::event::PollFlags::IN) || !r.contains(rustix::event::PollFlags::HUP)
                }
                Err(_) => false,
            };
            if connected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl AsyncRead for Port {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| rustix::io::read(fd.get_ref().as_fd(), &mut *unfilled).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
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
