//! The zombie reaper. As PID 1 the agent inherits every orphan, so one SIGCHLD-driven loop calls
//! `waitpid(-1)` and hands the statuses of the processes the agent started to whoever waits for
//! them. Outside PID 1 (tests on the host) it waits only for the pids it registered.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a process ended, decoded from a wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
}

fn decode(status: libc::c_int) -> Ended {
    if libc::WIFSIGNALED(status) {
        Ended::Signaled(libc::WTERMSIG(status))
    } else {
        Ended::Exited(libc::WEXITSTATUS(status))
    }
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<Ended>>,
}

pub struct Reaper {
    table: Mutex<Table>,
    reap_all: bool,
}

static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper; starts its SIGCHLD loop on first use (inside a tokio runtime).
    pub fn get() -> Arc<Reaper> {
        REAPER
            .get_or_init(|| {
                let reaper = Arc::new(Reaper { table: Mutex::new(Table::default()), reap_all: std::process::id() == 1 });
                let r = reaper.clone();
                let mut sigchld = signal(SignalKind::child()).expect("SIGCHLD handler installs");
                tokio::spawn(async move {
                    loop {
                        r.reap();
                        if sigchld.recv().await.is_none() {
                            return;
                        }
                    }
                });
                reaper
            })
            .clone()
    }

    /// Spawn `cmd` and register it before any SIGCHLD for it can be handled.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Ended>)> {
        let mut table = self.table.lock().expect("reaper lock is never poisoned");
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        table.waiting.insert(child.id() as i32, tx);
        drop(table);
        // The child may have exited before registration was visible to the loop.
        self.reap();
        Ok((child, rx))
    }

    fn reap(&self) {
        let mut table = self.table.lock().expect("reaper lock is never poisoned");
        if self.reap_all {
            loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(tx) = table.waiting.remove(&pid) {
                    let _ = tx.send(decode(status));
                }
            }
        } else {
            let pids: Vec<i32> = table.waiting.keys().copied().collect();
            for pid in pids {
                let mut status = 0;
                // SAFETY: as above, for a pid this process spawned.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    if let Some(tx) = table.waiting.remove(&pid) {
                        let _ = tx.send(decode(status));
                    }
                }
            }
        }
    }
}
