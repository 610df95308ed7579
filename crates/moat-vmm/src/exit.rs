//! Watching a QEMU exit through a pidfd, whether moat is its parent or adopted it.
//!
//! A pidfd names one process for good — it cannot be confused with a later process that reuses
//! the pid — and becomes readable when that process exits. Watching it does not reap the process,
//! so a spawned QEMU's `Child` still collects its status.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitStatus;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags};
use tokio::io::unix::{AsyncFd, AsyncFdRegisterError};

/// How QEMU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// moat started QEMU and reaped it: its wait status.
    Status(ExitStatus),
    /// QEMU was adopted from an earlier daemon: it has exited, but only its parent (gone, or
    /// init) could learn how.
    Unknown,
}

impl Exit {
    /// The wait status, when this process was QEMU's parent.
    pub fn status(&self) -> Option<ExitStatus> {
        match self {
            Exit::Status(s) => Some(*s),
            Exit::Unknown => None,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(s) => s.fmt(f),
            Exit::Unknown => f.write_str("exit status unknown: QEMU was adopted, not started by this process"),
        }
    }
}

/// Resolves when one QEMU exits. Owns its own pidfd, so it outlives the [`Vm`](crate::Vm) it came
/// from and can be moved to another task; it never reaps the process.
#[derive(Debug)]
pub struct ExitWatcher {
    pidfd: OwnedFd,
}

impl ExitWatcher {
    /// Watch the process a pidfd refers to (from `pidfd_open`).
    pub fn new(pidfd: OwnedFd) -> ExitWatcher {
        ExitWatcher { pidfd }
    }

    /// Wait until the process has exited. Must run inside a tokio runtime.
    pub async fn wait(self) {
        let pidfd = match watch(self.pidfd) {
            Ok(fd) => match wait_readable(&fd).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "waiting on a pidfd failed; polling it");
                    fd.into_inner()
                }
            },
            Err(e) => {
                // Only without a tokio reactor, or when epoll refuses the fd.
                let (pidfd, e) = e.into_parts();
                tracing::warn!(error = %e, "cannot register a pidfd with the reactor; polling it");
                pidfd
            }
        };
        poll_until_exited(pidfd).await;
    }
}

/// A pidfd for `pid`; `ESRCH` when it does not exist (any more).
pub(crate) fn open_pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    let raw = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    let pid = Pid::from_raw(raw).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Register a pidfd with tokio's reactor; on failure the pidfd comes back with the error.
pub(crate) fn watch(pidfd: OwnedFd) -> Result<AsyncFd<OwnedFd>, AsyncFdRegisterError<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that stays open, and keeps returning the
    // same number from `as_raw_fd`, until it is dropped, which the `AsyncFd` that owns it does
    // only when it is dropped itself (or hands it back with `into_inner`).
    unsafe { AsyncFd::register(pidfd) }
}

/// Whether the pidfd's process has exited, without waiting.
pub(crate) fn has_exited(pidfd: impl AsFd) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, 0) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Resolves once the pidfd registered in `fd` is readable, i.e. its process has exited.
pub(crate) async fn wait_readable(fd: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
    loop {
        let mut guard = fd.readable().await?;
        if has_exited(fd.get_ref())? {
            return Ok(());
        }
        guard.clear_ready();
    }
}

async fn poll_until_exited(pidfd: impl AsFd) {
    // A poll error on a pidfd we own cannot recur usefully; stop rather than spin forever.
    while !has_exited(&pidfd).unwrap_or(true) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watcher_sees_the_exit_and_leaves_the_status_to_the_parent() {
        let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let pidfd = open_pidfd(sleeper.id()).expect("pidfd_open works (Linux >= 5.3)");
        assert!(!has_exited(&pidfd).unwrap());
        let watcher = ExitWatcher::new(pidfd.try_clone().unwrap());
        let mut waiting = tokio::spawn(watcher.wait());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut waiting).await.is_err(),
            "the watcher resolved while the process runs"
        );
        sleeper.kill().unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("the watcher sees the exit").unwrap();
        assert!(has_exited(&pidfd).unwrap());
        let status = sleeper.try_wait().expect("the watcher did not reap the process");
        assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    }

    #[test]
    fn unknown_exits_say_why() {
        assert!(Exit::Unknown.to_string().contains("adopted"));
        assert_eq!(Exit::Unknown.status(), None);
    }
}
