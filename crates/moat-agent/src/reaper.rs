//! The zombie reaper. As PID 1 the agent inherits every orphan, so one SIGCHLD-driven loop calls
//! `waitpid(-1)` and hands the statuses of the processes the agent started to whoever waits for
//! them; the rest are just reaped. Outside PID 1 (tests on the host) it waits only for the pids it
//! registered, so it never steals children from the rest of the test process.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Reap even without a SIGCHLD this often, so a lost wakeup can never leave a process unreported.
const SAFETY_TICK: Duration = Duration::from_secs(1);

/// How a process ended, decoded from a wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
}

impl Ended {
    fn decode(status: libc::c_int) -> Ended {
        if libc::WIFSIGNALED(status) {
            Ended::Signaled(libc::WTERMSIG(status))
        } else {
            Ended::Exited(libc::WEXITSTATUS(status))
        }
    }
}

/// Which children the reaper collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every child (`waitpid(-1)`): the agent is PID 1 and owns every orphan.
    All,
    /// Only the pids spawned through this reaper.
    Registered,
}

/// Spawns processes and reports how they ended.
pub struct Reaper {
    /// Held across spawn + registration so the loop can never reap a child before it is known.
    waiting: Mutex<HashMap<i32, oneshot::Sender<Ended>>>,
    scope: Scope,
}

impl Reaper {
    /// Start a reaper and its SIGCHLD loop on the current tokio runtime. The loop keeps running
    /// (and reaping processes whose waiters went away) until the runtime shuts down.
    pub fn start(scope: Scope) -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper { waiting: Mutex::new(HashMap::new()), scope });
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAFETY_TICK);
            loop {
                r.reap();
                tokio::select! {
                    s = sigchld.recv() => if s.is_none() { return },
                    _ = tick.tick() => {}
                }
            }
        });
        Ok(reaper)
    }

    /// The scope this reaper was started with.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Spawn `cmd` and register it; the receiver yields how it ended.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Ended>)> {
        let mut waiting = self.waiting.lock().expect("the reaper lock is never held across a panic");
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        let pid = i32::try_from(child.id()).expect("pids fit in pid_t");
        waiting.insert(pid, tx);
        drop(waiting);
        // A SIGCHLD that arrived while the lock was held was handled before the pid was known.
        self.reap();
        Ok((child, rx))
    }

    /// Collect every child that has ended and deliver the statuses of registered ones.
    pub fn reap(&self) {
        let mut waiting = self.waiting.lock().expect("the reaper lock is never held across a panic");
        match self.scope {
            Scope::All => loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(tx) = waiting.remove(&pid) {
                    let _ = tx.send(Ended::decode(status));
                }
            },
            Scope::Registered => {
                let ended: Vec<(i32, Option<libc::c_int>)> = waiting
                    .keys()
                    .filter_map(|&pid| {
                        let mut status = 0;
                        // SAFETY: as above, for a pid this reaper spawned and has not reaped yet.
                        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                        if r == pid {
                            Some((pid, Some(status)))
                        } else if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                            // Someone else reaped it; the waiter learns it ended without a status.
                            Some((pid, None))
                        } else {
                            None
                        }
                    })
                    .collect();
                for (pid, status) in ended {
                    if let (Some(tx), Some(status)) = (waiting.remove(&pid), status) {
                        let _ = tx.send(Ended::decode(status));
                    }
                }
            }
        }
    }
}
