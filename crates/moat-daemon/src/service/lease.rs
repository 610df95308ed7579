//! Leases: how long a sandbox may run, renewing one, and what the reaper does when one ends
//! (stop, remove or pause the sandbox, as it asked).

use moat_api::{ErrorCode, OnExpire, Phase, SandboxInfo};

use super::Service;
use crate::error::{not_found, ServiceError};
use crate::state::now_secs;

/// Leases run from 1 s to 10 years.
pub(super) fn check_ttl(ttl_secs: u64) -> Result<(), ServiceError> {
    if ttl_secs == 0 || ttl_secs > 10 * 365 * 86400 {
        return Err(ServiceError::invalid(format!("a TTL of {ttl_secs} s is out of range; use 1 s to 10 years")));
    }
    Ok(())
}

impl Service {
    /// Renew a running sandbox's lease: it now ends `ttl` from now.
    pub async fn renew(&self, reference: &str, ttl_secs: u64) -> Result<SandboxInfo, ServiceError> {
        check_ttl(ttl_secs)?;
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let info = self.db(|db| db.get(&info.id))?.ok_or_else(|| not_found(reference))?;
        if info.phase == Phase::Expired || info.expires_at.is_some_and(|t| t <= now_secs()) {
            return Err(ServiceError::new(
                ErrorCode::LeaseExpired,
                format!("the lease of sandbox {} has expired", info.name),
                "`moat start` brings it back without a lease; then `moat lease renew` sets a new one",
            ));
        }
        if info.phase != Phase::Running {
            return Err(ServiceError::phase(&info, "running", "start it with `moat start` first"));
        }
        let until = now_secs().saturating_add(ttl_secs as i64);
        self.db(|db| {
            db.set_expiry(&info.id, Some(until))?;
            db.get(&info.id)
        })?
        .ok_or_else(|| not_found(reference))
    }

    /// Drop the lease of a sandbox whose lifetime an exec session now owns.
    pub fn clear_lease(&self, id: &str) -> Result<(), ServiceError> {
        self.db(|db| db.set_expiry(id, None))
    }

    /// Stop, remove or pause every running sandbox whose lease has run out. A sandbox that
    /// cannot be paused is stopped (`expired`): the lease holds either way.
    pub async fn reap_expired(&self) {
        let now = now_secs();
        let Ok(all) = self.list() else { return };
        for s in all.into_iter().filter(|s| s.phase == Phase::Running && s.expires_at.is_some_and(|t| t <= now)) {
            tracing::info!(sandbox = %s.id, name = %s.name, on_expire = ?s.on_expire, "lease expired");
            self.put_away(&s, s.on_expire, Phase::Expired).await;
        }
    }

    /// Stop (into phase `stopped`), remove or pause a running sandbox, as the end of its lease or
    /// its idle policy asks. A sandbox that cannot be paused is stopped: the limit holds either way.
    pub(super) async fn put_away(&self, s: &SandboxInfo, action: OnExpire, stopped: Phase) {
        if action == OnExpire::Pause {
            match self.pause(&s.id).await {
                // Paused, it holds no memory; `resume` continues it without a lease.
                Ok(_) => {
                    if let Err(e) = self.clear_lease(&s.id) {
                        tracing::warn!(sandbox = %s.id, error = %e, "clearing a paused sandbox's lease failed");
                    }
                    return;
                }
                Err(e) => tracing::warn!(sandbox = %s.id, error = %e, "pausing the sandbox failed; stopping it"),
            }
        }
        let lock = self.op_lock(&s.id);
        let guard = lock.lock().await;
        let result = self.stop_locked(&s.id, stopped).await;
        drop(guard);
        if let Err(e) = result {
            tracing::warn!(sandbox = %s.id, error = %e, "stopping the sandbox failed");
            return;
        }
        if action == OnExpire::Remove {
            if let Err(e) = self.remove(&s.id, false).await {
                tracing::warn!(sandbox = %s.id, error = %e, "removing the sandbox failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use moat_api::{CreateSandbox, OnExpire, Phase};

    use crate::launcher::fake::TestService;

    /// A sandbox that asked to be paused but cannot be (the test double has no guest to save) is
    /// stopped as expired: its lease holds either way.
    #[tokio::test]
    async fn a_lease_that_cannot_pause_its_sandbox_stops_it() {
        let t = TestService::new(crate::service::tests::limits());
        let req =
            CreateSandbox { ttl_secs: Some(600), on_expire: Some(OnExpire::Pause), ..TestService::request("nap") };
        let info = t.svc.create(req).await.unwrap();
        assert_eq!(t.svc.inspect("nap").unwrap().on_expire, OnExpire::Pause, "recorded");
        t.svc.db(|db| db.set_expiry(&info.id, Some(1))).unwrap();
        t.svc.reap_expired().await;
        let after = t.svc.inspect("nap").unwrap();
        assert_eq!((after.phase, after.pid), (Phase::Expired, None));
    }
}
