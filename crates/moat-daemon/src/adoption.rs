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
use moat_sandbox::{discard_saved, SandboxSpec, SavedMachine};
use tokio::sync::OwnedMutexGuard;

use crate::error::ServiceError;
use crate::service::{remove_leftovers, Service};

/// How long the agent of an adopted guest gets to answer. A running or just-resumed agent
/// answers within a second; the rest is room for a loaded TCG host.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole of taking one sandbox over: QMP, cancelling a save cut short, the handshake.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent of a guest whose stop was cut short gets to answer before QEMU is killed.
const STOP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

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
        let qemu = self.launcher.find_qemus(&run_root).into_iter().find(|(_, d)| *d == dir).map(|(pid, _)| pid);
        let decision = match qemu {
            // Recorded, but removed since: the state is older than the home (a restored backup).
            None if !dir.exists() => Takeover::Fail(
                "its QEMU ended while no daemon was running, and its files are gone: it was removed after this \
                 state was recorded (a restored backup?); `moat rm` removes the record"
                    .into(),
            ),
            _ => takeover(info.phase, qemu, SavedMachine::of(&dir)),
        };
        tracing::info!(sandbox = %id, phase = %info.phase, ?qemu, ?decision, "taking over a sandbox after a restart");
        match decision {
            Takeover::Adopt(pid) => self.adopt(info, pid).await,
            Takeover::FinishStop(pid) => {
                let adopted = match self.spec_of(info) {
                    Ok(spec) => {
                        let spec = SandboxSpec { boot_timeout: STOP_HANDSHAKE_TIMEOUT, ..spec };
                        let adopting = self.launcher.adopt(&self.rt, &spec, id, &dir, pid);
                        tokio::time::timeout(ADOPT_TIMEOUT, adopting).await.ok().and_then(Result::ok)
                    }
                    Err(_) => None,
                };
                match adopted {
                    // As `stop` would have: the agent powers the guest off, QEMU is ended after.
                    Some(sandbox) => sandbox.shutdown().await,
                    None => self.launcher.end(pid, &dir, &run_root).await,
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
                    self.launcher.end(pid, &dir, &run_root).await;
                }
                self.fail_adoption(id, &dir, &reason)
            }
        }
    }

    /// Take a running QEMU over and keep the sandbox running.
    async fn adopt(self: &Arc<Self>, info: &SandboxInfo, pid: u32) -> Result<(), ServiceError> {
        let id = info.id.as_str();
        let dir = self.run_dir(id);
        let adopted = match self.spec_of(info) {
            Ok(spec) => {
                let spec = SandboxSpec { boot_timeout: HANDSHAKE_TIMEOUT, ..spec };
                match tokio::time::timeout(ADOPT_TIMEOUT, self.launcher.adopt(&self.rt, &spec, id, &dir, pid)).await {
                    Ok(adopted) => adopted.map_err(|e| moat_hint::one_line(&e)),
                    Err(_) => Err(format!("it did not answer within {}s", ADOPT_TIMEOUT.as_secs())),
                }
            }
            Err(e) => Err(e.message),
        };
        let sandbox = match adopted {
            Ok(sandbox) => sandbox,
            Err(why) => {
                self.launcher.end(pid, &dir, &self.rt.config.run_dir()).await;
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
        if let Err(e) = self.connect_net(info, &sandbox).await {
            tracing::warn!(sandbox = %id, error = %e.message, "the adopted sandbox has no network");
            self.db(|db| db.event(Some(id), "net", &format!("network not restored: {}", e.message)))?;
        }
        if let Some(guest) = sandbox.clone().guest() {
            if let Err(e) = self.serve_host_dirs(info, &guest).await {
                tracing::warn!(sandbox = %id, error = %e.message, "the adopted sandbox's host directories are not served");
                self.db(|db| db.event(Some(id), "mount", &format!("host directories not served: {}", e.message)))?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::fake::{Call, Outcome, TestService};
    use crate::service::Limits;
    use SavedMachine::*;

    /// A restarted daemon's service: it claims and settles what the earlier one left.
    async fn restart(t: &TestService) {
        t.svc.claim_leftovers().await.expect("the leftovers are claimed").settle().await;
    }

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

    #[tokio::test]
    async fn a_running_sandbox_whose_qemu_runs_is_adopted_and_watched() {
        let t = TestService::new(Limits::default());
        let info = t.record("kept", Phase::Running);
        let pid = t.vms.leave_qemu(&t.run_dir(&info.id));
        restart(&t).await;

        assert_eq!(t.vms.calls(), [Call::Adopt { id: info.id.clone(), pid }], "adopted, nothing killed");
        let adopted = t.get(&info.id);
        assert_eq!((adopted.phase, adopted.pid), (Phase::Running, Some(pid)));
        assert_eq!(t.svc.live_count(), 1);
        assert!(!t.svc.is_adopting(&info.id));
        let events = t.svc.db(|db| db.events_after(0, 100)).unwrap();
        assert!(events.iter().any(|e| e.kind == "adopted" && e.message.contains(&format!("QEMU pid {pid}"))));
        // Its exit is watched as if this daemon had started it.
        t.vms.crash(pid);
        let failed = t.wait_for(&info.id, Phase::Failed).await;
        assert!(failed.last_error.unwrap().contains("QEMU exited unexpectedly"));
    }

    #[tokio::test]
    async fn a_running_sandbox_whose_qemu_is_gone_fails_saying_so() {
        let t = TestService::new(Limits::default());
        let info = t.record("lost", Phase::Running);
        restart(&t).await;

        assert_eq!(t.vms.calls(), [], "nothing to adopt or kill");
        let lost = t.get(&info.id);
        assert_eq!((lost.phase, lost.pid), (Phase::Failed, None));
        assert!(lost.last_error.unwrap().contains("its QEMU ended while no daemon was running"));
        assert_eq!(t.svc.live_count(), 0);
    }

    #[tokio::test]
    async fn a_guest_that_does_not_answer_is_ended_and_fails() {
        let t = TestService::new(Limits::default());
        let info = t.record("hung", Phase::Running);
        let pid = t.vms.leave_qemu(&t.run_dir(&info.id));
        t.vms.script_adopt(Outcome::Silent);
        restart(&t).await;

        assert_eq!(t.vms.calls(), [Call::Adopt { id: info.id.clone(), pid }, Call::Kill { pid }]);
        assert_eq!(t.vms.qemus(), []);
        let hung = t.get(&info.id);
        assert_eq!(hung.phase, Phase::Failed);
        let why = hung.last_error.unwrap();
        assert!(why.contains(&format!("its QEMU (pid {pid}) was ended")) && why.contains("did not answer"), "{why}");
    }

    #[tokio::test]
    async fn a_stop_cut_short_is_finished_and_a_whole_pause_is_kept() {
        let t = TestService::new(Limits::default());
        let stopping = t.record("stopping", Phase::Stopping);
        let pid = t.vms.leave_qemu(&t.run_dir(&stopping.id));
        let pausing = t.record("pausing", Phase::Stopping);
        let saved = t.run_dir(&pausing.id);
        std::fs::create_dir_all(&saved).unwrap();
        for f in [moat_sandbox::STATE_FILE, moat_sandbox::MEM_FILE] {
            std::fs::write(saved.join(f), b"saved").unwrap();
        }
        restart(&t).await;

        let calls = t.vms.calls();
        assert!(calls.contains(&Call::Adopt { id: stopping.id.clone(), pid }), "{calls:?}");
        assert!(calls.contains(&Call::Shutdown { id: stopping.id.clone() }), "the agent powers it off: {calls:?}");
        assert_eq!(t.vms.qemus(), []);
        assert_eq!(t.get(&stopping.id).phase, Phase::Stopped);
        assert_eq!(t.get(&pausing.id).phase, Phase::Paused);
        assert_eq!(SavedMachine::of(&saved), Complete, "the saved machine stays for resume");
    }

    #[tokio::test]
    async fn settling_ends_with_a_gc_of_qemus_nobody_owns() {
        let t = TestService::new(Limits::default());
        let stray = t.run_dir("0123456789ab");
        let pid = t.vms.leave_qemu(&stray);
        restart(&t).await;

        assert_eq!(t.vms.calls(), [Call::Kill { pid }]);
        assert_eq!(t.vms.qemus(), []);
    }
}
