//! A VM just started, restored or claimed becoming a live sandbox: its record, network and
//! mounts, and the watch on its QEMU.

use std::sync::Arc;

use moat_api::{Phase, SandboxInfo};

use super::{Launch, Service};
use crate::error::ServiceError;
use crate::launcher::Machine;

impl Service {
    /// Record a sandbox's VM just started from `from` (or why it did not start), attach its
    /// network and mounts, and watch it: the sandbox is running, or failed with the reason.
    pub(crate) async fn go_live(
        self: &Arc<Self>,
        info: &SandboxInfo,
        from: Launch<'_>,
        booted: Result<Arc<dyn Machine>, moat_sandbox::SandboxError>,
    ) -> Result<SandboxInfo, ServiceError> {
        let id = info.id.clone();
        match booted {
            Ok(sandbox) => {
                self.db(|db| {
                    db.set_pid(&id, Some(sandbox.pid()))?;
                    match from {
                        Launch::Snapshot(snapshot) => db.set_snapshot(&id, Some(snapshot)),
                        // A boot on a fresh overlay builds on the image alone.
                        Launch::Boot { fresh: true } => db.set_snapshot(&id, None),
                        _ => Ok(()),
                    }
                })?;
                let attached = match self.connect_net(info, &sandbox).await {
                    Ok(()) => self.connect_mounts(info, &sandbox).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = attached {
                    self.host_servers.stop(&id);
                    sandbox.shutdown().await;
                    self.db(|db| {
                        db.set_pid(&id, None)?;
                        db.set_phase(&id, Phase::Failed, Some(&e.message))
                    })?;
                    return Err(e);
                }
                let info = self.db(|db| db.set_phase(&id, Phase::Running, None))?;
                self.live.lock().expect("no panics while held").insert(id.clone(), sandbox.clone());
                self.watch(sandbox);
                Ok(info)
            }
            Err(e) => {
                let err = ServiceError::from(e);
                self.db(|db| db.set_phase(&id, Phase::Failed, Some(&err.message)))?;
                Err(err)
            }
        }
    }

    /// Connect the network of a VM just started or adopted. Networks are not behind the launcher
    /// seam: they need QEMU's NIC and the guest's agent, which only a real VM has; a test double
    /// runs without one.
    pub(crate) async fn connect_net(
        self: &Arc<Self>,
        info: &SandboxInfo,
        machine: &Arc<dyn Machine>,
    ) -> Result<(), ServiceError> {
        match machine.clone().guest() {
            Some(guest) => self.attach_net(info, &guest).await,
            None => Ok(()),
        }
    }

    /// Attach the mounts of a VM just started or restored (behind the launcher seam like
    /// [`Service::connect_net`]).
    pub(crate) async fn connect_mounts(
        self: &Arc<Self>,
        info: &SandboxInfo,
        machine: &Arc<dyn Machine>,
    ) -> Result<(), ServiceError> {
        match machine.clone().guest() {
            Some(guest) => self.attach_mounts(info, &guest).await,
            None => Ok(()),
        }
    }

    /// When QEMU exits while the sandbox is still live (nobody stopped it), mark it failed.
    pub(crate) fn watch(self: &Arc<Self>, sandbox: Arc<dyn Machine>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            if let Err(e) = sandbox.exited().await {
                tracing::warn!(sandbox = %sandbox.id(), error = %e, "cannot watch QEMU's exit");
                return;
            }
            let Some(this) = this.upgrade() else { return };
            let id = sandbox.id().to_string();
            this.detach_net(&id, sandbox.pid());
            this.host_servers.stop(&id);
            let lock = this.op_lock(&id);
            let _guard = lock.lock().await;
            let still_ours =
                this.live.lock().expect("no panics while held").get(&id).is_some_and(|s| Arc::ptr_eq(s, &sandbox));
            if !still_ours {
                return; // Stopped or removed on purpose.
            }
            this.live.lock().expect("no panics while held").remove(&id);
            let reason = format!(
                "QEMU exited unexpectedly ({}); last console lines:\n{}",
                sandbox.exit_description().await,
                sandbox.console_tail(10).await
            );
            tracing::warn!(sandbox = %id, %reason, "sandbox failed");
            sandbox.release().await;
            let _ = this.db(|db| {
                db.set_pid(&id, None)?;
                db.set_phase(&id, Phase::Failed, Some(&reason))
            });
        });
    }
}
