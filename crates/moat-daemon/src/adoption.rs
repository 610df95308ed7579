//! Taking over what an earlier daemon left live, after a restart or a crash (SIGKILL included).
//! Each sandbox is settled on its own, all at once, in the background, under its operation lock
//! and a deadline: a guest that does not answer holds up nothing but itself.
//!
//! A crash can cut any operation short; `takeover` decides what the next daemon makes of it.
//! Half-written snapshots are not ready, so the gc that follows removes them with any helper VM.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use moat_api::{Phase, SandboxInfo};
use moat_sandbox::{discard_saved, Sandbox, SandboxSpec, SavedMachine};
use tokio::sync::OwnedMutexGuard;

use crate::error::ServiceError;
use crate::service::{kill_verified, remove_leftovers, Service};

/// How long the agent of an adopted guest gets to answer. A running or just-resumed agent
/// answers within a second; the rest is room for a loaded TCG host.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole of taking one sandbox over: QMP, cancelling a save cut short, the handshake.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent of a guest whose stop was cut short gets to answer before QEMU is killed.
const STOP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a killed QEMU may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the next daemon makes of a sandbox an earlier one left live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// QEMU runs: take it over, run the guest again if a save left it paused, keep it running.
    Adopt(u32),
    /// A stop was under way and QEMU still runs: finish the stop.
    FinishStop(u32),
    /// A pause had saved the whole machine and ended QEMU: the sandbox is paused.
    Paused,
    /// QEMU ended during a stop, or during a pause that saved nothing whole: it is stopped.
    Stopped,
    /// Nothing to continue: the sandbox fails, saying why.
    Fail(String),
}

/// Decide from the recorded phase, the sandbox's QEMU if one still runs, and what a pause left.
pub(crate) fn takeover(phase: Phase, qemu: Option<u32>, saved: SavedMachine) -> Takeover {
    match (phase, qemu) {
        (Phase::Running, Some(pid)) => Takeover::Adopt(pid),
        (Phase::Running, None) => Takeover::Fail("its QEMU ended while no daemon was running".into()),
        // A pause opens its state file before it pauses the guest: with any saved state, the
        // operation was a pause, and QEMU still there means the guest can run on.
        (Phase::Stopping, Some(pid)) if saved != SavedMachine::Nothing => Takeover::Adopt(pid),
        (Phase::Stopping, Some(pid)) => Takeover::FinishStop(pid),
        (Phase::Stopping, None) if saved == SavedMachine::Complete => Takeover::Paused,
        (Phase::Stopping, None) => Takeover::Stopped,
        (phase, _) => Takeover::Fail(format!(
            "the daemon restarted while the sandbox was {phase}; `moat start` boots it again, `moat rm` removes it"
        )),
    }
}

/// Sandboxes an earlier daemon left live, each with its operation lock held until it is settled.
pub struct Leftovers {
    svc: Arc<Service>,
    claimed: Vec<(SandboxInfo, OwnedMutexGuard<()>)>,
}

impl Service {
    /// Claim every sandbox an earlier daemon left live. Until [`Leftovers::settle`] has settled
    /// one, operations on it wait for its lock and requests that need it running are told it is
    /// being adopted. Call before serving requests.
    pub async fn claim_leftovers(self: &Arc<Self>) -> Result<Leftovers, ServiceError> {
        let mut claimed = Vec::new();
        for info in self.list()?.into_iter().filter(|s| s.phase.is_live()) {
            let guard = self.op_lock(&info.id).lock_owned().await;
            self.adopting.lock().expect("no panics while held").insert(info.id.clone());
            claimed.push((info, guard));
        }
        Ok(Leftovers { svc: self.clone(), claimed })
    }

    /// Whether the sandbox is claimed and not settled yet.
    pub(crate) fn is_adopting(&self, id: &str) -> bool {
        self.adopting.lock().expect("no panics while held").contains(id)
    }

    async fn take_over(self: &Arc<Self>, info: &SandboxInfo) -> Result<(), ServiceError> {
        let id = info.id.as_str();
        let dir = self.run_dir(id);
        let run_root = self.rt.config.run_dir();
        let qemu = moat_vmm::find_qemus_under(&run_root).into_iter().find(|(_, d)| *d == dir).map(|(pid, _)| pid);
        let decision = takeover(info.phase, qemu, SavedMachine::of(&dir));
        tracing::info!(sandbox = %id, phase = %info.phase, ?qemu, ?decision, "taking over a sandbox after a restart");
        match decision {
            Takeover::Adopt(pid) => self.adopt(info, pid).await,
            Takeover::FinishStop(pid) => {
                let spec = SandboxSpec { boot_timeout: STOP_HANDSHAKE_TIMEOUT, ..self.spec_of(info) };
                match tokio::time::timeout(ADOPT_TIMEOUT, Sandbox::adopt(&self.rt, &spec, id, &dir, pid)).await {
                    // As `stop` would have: the agent powers the guest off, QEMU is ended after.
                    Ok(Ok(sandbox)) => sandbox.shutdown().await,
                    _ => end_qemu(pid, &dir, &run_root).await,
                }
                self.settle_at_rest(id, &dir, Phase::Stopped, "its stop, cut short by a daemon restart, was finished")
            }
            Takeover::Paused => {
                self.settle_at_rest(id, &dir, Phase::Paused, "its pause had saved the machine before a daemon restart")
            }
            Takeover::Stopped => {
                self.settle_at_rest(id, &dir, Phase::Stopped, "its QEMU ended during a stop or pause cut short")
            }
            Takeover::Fail(reason) => {
                if let Some(pid) = qemu {
                    end_qemu(pid, &dir, &run_root).await;
                }
                self.fail_adoption(id, &dir, &reason)
            }
        }
    }

    /// Take a running QEMU over and keep the sandbox running.
    async fn adopt(self: &Arc<Self>, info: &SandboxInfo, pid: u32) -> Result<(), ServiceError> {
        let id = info.id.as_str();
        let dir = self.run_dir(id);
        let spec = SandboxSpec { boot_timeout: HANDSHAKE_TIMEOUT, ..self.spec_of(info) };
        let sandbox = match tokio::time::timeout(ADOPT_TIMEOUT, Sandbox::adopt(&self.rt, &spec, id, &dir, pid)).await {
            Ok(Ok(sandbox)) => Arc::new(sandbox),
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("it did not answer within {}s", ADOPT_TIMEOUT.as_secs()),
                };
                end_qemu(pid, &dir, &self.rt.config.run_dir()).await;
                let reason = format!(
                    "after a daemon restart the VM could not be taken over, so its QEMU (pid {pid}) was ended: {why}"
                );
                return self.fail_adoption(id, &dir, &reason);
            }
        };
        // The guest runs on: whatever a pause cut short had saved is stale.
        discard_saved(&dir, false);
        self.db(|db| {
            db.set_pid(id, Some(pid))?;
            if info.phase != Phase::Running {
                db.set_phase(id, Phase::Running, None)?;
            }
            Ok(())
        })?;
        tracing::info!(sandbox = %id, pid, "adopted a running sandbox");
        if let Err(e) = self.attach_net(info, &sandbox).await {
            tracing::warn!(sandbox = %id, error = %e.message, "the adopted sandbox has no network");
            self.db(|db| db.event(Some(id), "net", &format!("network not restored: {}", e.message)))?;
        }
        self.put_live(sandbox.clone());
        self.db(|db| db.event(Some(id), "adopted", &format!("{} adopted (QEMU pid {pid})", info.name)))?;
        self.watch(sandbox);
        Ok(())
    }

    /// Record a sandbox whose QEMU is gone as at rest in `phase`, removing what it no longer needs.
    fn settle_at_rest(&self, id: &str, dir: &Path, phase: Phase, why: &str) -> Result<(), ServiceError> {
        remove_leftovers(dir, phase);
        self.db(|db| {
            db.set_pid(id, None)?;
            db.set_phase(id, phase, None)?;
            db.event(Some(id), "adopted", &format!("{phase}: {why}"))
        })
    }

    fn fail_adoption(&self, id: &str, dir: &Path, reason: &str) -> Result<(), ServiceError> {
        tracing::warn!(sandbox = %id, %reason, "sandbox could not be adopted");
        remove_leftovers(dir, Phase::Failed);
        self.db(|db| {
            db.set_pid(id, None)?;
            db.set_phase(id, Phase::Failed, Some(reason))
        })?;
        Ok(())
    }
}

impl Leftovers {
    /// Settle every claimed sandbox, all at once, each releasing its lock when done; then
    /// reclaim what crashes leaked (gc), as nothing of an earlier daemon is in flight any more.
    pub async fn settle(self) {
        let svc = self.svc;
        let settling = self.claimed.into_iter().map(|(info, guard)| {
            let svc = svc.clone();
            async move {
                if let Err(e) = svc.take_over(&info).await {
                    tracing::error!(sandbox = %info.id, error = %e.message, "settling the sandbox failed");
                }
                svc.adopting.lock().expect("no panics while held").remove(&info.id);
                drop(guard);
            }
        });
        futures_util::future::join_all(settling).await;
        match svc.gc().await {
            Ok(reclaimed) if reclaimed != Default::default() => {
                tracing::info!(?reclaimed, "startup reconcile reclaimed leaked resources")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e.message, "the startup reconcile failed"),
        }
    }
}

/// SIGKILL a sandbox's QEMU (verified first) and wait, briefly, until it has exited.
async fn end_qemu(pid: u32, dir: &Path, run_root: &Path) {
    let Some(pidfd) = kill_verified(pid, dir, run_root) else { return };
    if tokio::time::timeout(KILL_TIMEOUT, moat_vmm::ExitWatcher::new(pidfd).wait()).await.is_err() {
        tracing::warn!(pid, "a killed QEMU has not exited yet");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SavedMachine::*;

    #[test]
    fn a_running_guest_is_taken_over_whatever_was_saved() {
        for saved in [Nothing, Partial, Complete] {
            assert_eq!(takeover(Phase::Running, Some(7), saved), Takeover::Adopt(7));
        }
        assert!(matches!(takeover(Phase::Running, None, Nothing), Takeover::Fail(r) if r.contains("QEMU ended")));
    }

    #[test]
    fn a_pause_cut_short_runs_on_or_is_paused_and_a_stop_is_finished() {
        assert_eq!(takeover(Phase::Stopping, Some(7), Partial), Takeover::Adopt(7), "saving: run on");
        assert_eq!(takeover(Phase::Stopping, Some(7), Complete), Takeover::Adopt(7), "saved, QEMU there: run on");
        assert_eq!(takeover(Phase::Stopping, None, Complete), Takeover::Paused, "saved and QEMU gone: paused");
        assert_eq!(takeover(Phase::Stopping, None, Partial), Takeover::Stopped, "half saved and QEMU gone");
        assert_eq!(takeover(Phase::Stopping, Some(7), Nothing), Takeover::FinishStop(7), "a stop");
        assert_eq!(takeover(Phase::Stopping, None, Nothing), Takeover::Stopped);
    }

    #[test]
    fn a_boot_cut_short_fails_saying_what_to_do() {
        for phase in [Phase::Creating, Phase::Booting] {
            for qemu in [None, Some(7)] {
                let Takeover::Fail(reason) = takeover(phase, qemu, Complete) else { panic!("{phase} fails") };
                assert!(reason.contains(&format!("while the sandbox was {phase}")) && reason.contains("moat start"));
            }
        }
    }

    #[test]
    fn every_decision_is_a_transition_the_state_machine_allows() {
        for phase in Phase::ALL.into_iter().filter(|p| p.is_live()) {
            for qemu in [None, Some(7)] {
                for saved in [Nothing, Partial, Complete] {
                    let to = match takeover(phase, qemu, saved) {
                        Takeover::Adopt(_) => Phase::Running,
                        Takeover::FinishStop(_) | Takeover::Stopped => Phase::Stopped,
                        Takeover::Paused => Phase::Paused,
                        Takeover::Fail(_) => Phase::Failed,
                    };
                    assert!(phase == to || crate::phase::allowed(phase, to), "{phase} -> {to}");
                }
            }
        }
    }
}
