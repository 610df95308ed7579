//! Idle sandboxes: what counts as use of a running sandbox, and what is done to one that has an
//! idle policy (`moat run --idle 30m:stop`) and went unused that long.
//!
//! Use is: an API call that names the sandbox (every operation resolves its reference), an open
//! exec or attach session or port connection, a background process still running in the guest,
//! and traffic on its network. The reaper looks once a second; the action reuses the lease's
//! ([`Service::put_away`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_api::{OnExpire, OnIdle, Phase, SandboxInfo};
use moat_proto::{Request, Started};

use super::Service;
use crate::state::now_ms;

/// How long asking the agent for its processes may take before the sandbox counts as busy.
const JOBS_TIMEOUT: Duration = Duration::from_secs(2);

/// The use of each running sandbox, by id.
#[derive(Default)]
pub(crate) struct Activity(Mutex<HashMap<String, Seen>>);

#[derive(Default)]
struct Seen {
    /// When it was last seen in use (ms since the epoch); 0 before it was looked at.
    last_used_ms: i64,
    /// Exec and attach sessions and port connections open now.
    sessions: usize,
    /// The network byte counters at the last look.
    net: Option<(u64, u64)>,
}

impl Activity {
    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Seen) -> T) -> T {
        f(self.0.lock().expect("no panics while held").entry(id.to_string()).or_default())
    }

    /// The sandbox `id` is in use now.
    pub(crate) fn touch(&self, id: &str) {
        self.with(id, |s| s.last_used_ms = now_ms());
    }

    /// The sandbox `id` is in use until the guard is dropped (a session's life).
    pub(crate) fn session(self: &Arc<Self>, id: &str) -> SessionGuard {
        self.with(id, |s| {
            s.sessions += 1;
            s.last_used_ms = now_ms();
        });
        SessionGuard { activity: self.clone(), id: id.to_string() }
    }

    /// Forget sandboxes that are gone.
    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0.lock().expect("no panics while held").retain(|id, s| s.sessions > 0 || keep(id));
    }
}

/// Keeps a sandbox in use while it lives (see [`Activity::session`]).
pub(crate) struct SessionGuard {
    activity: Arc<Activity>,
    id: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.activity.with(&self.id, |s| {
            s.sessions = s.sessions.saturating_sub(1);
            s.last_used_ms = now_ms();
        });
    }
}

fn on_expire(action: OnIdle) -> OnExpire {
    match action {
        OnIdle::Stop => OnExpire::Stop,
        OnIdle::Pause => OnExpire::Pause,
        OnIdle::Remove => OnExpire::Remove,
    }
}

impl Service {
    /// The reaper's housekeeping besides leases: idle sandboxes, and with `prune_after`, ended
    /// ones.
    pub async fn keep_tidy(&self, prune_after: Option<Duration>) {
        self.reap_idle().await;
        if let Some(after) = prune_after {
            self.prune_ended(after).await;
        }
    }

    /// Put away every running sandbox that has been idle for its policy's time.
    pub async fn reap_idle(&self) {
        let Ok(all) = self.list() else { return };
        self.activity.retain(|id| all.iter().any(|s| s.id == id && s.phase == Phase::Running));
        for s in all {
            let Some(policy) = s.idle.filter(|_| s.phase == Phase::Running) else { continue };
            if self.is_adopting(&s.id) {
                continue;
            }
            let limit_ms = i64::try_from(policy.secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            let idle_ms = self.idle_for_ms(&s, limit_ms).await;
            if idle_ms < limit_ms {
                continue;
            }
            let message = format!(
                "{} was idle for {} (no commands, sessions, API calls or network traffic): {}",
                s.name,
                super::backups::roughly(idle_ms / 1000),
                match policy.action {
                    OnIdle::Stop => "stopping it",
                    OnIdle::Pause => "pausing it",
                    OnIdle::Remove => "removing it",
                }
            );
            tracing::info!(sandbox = %s.id, %message, "sandbox idle");
            if let Err(e) = self.db(|db| db.event(Some(&s.id), "idle", &message)) {
                tracing::warn!(sandbox = %s.id, error = %e, "recording an idle event failed");
            }
            self.put_away(&s, on_expire(policy.action), Phase::Stopped).await;
            self.activity.0.lock().expect("no panics while held").remove(&s.id);
        }
    }

    /// How long the running sandbox `s` has been unused, looking at it now. The guest is asked
    /// for its processes only once the other signs say it has been idle for `limit_ms`.
    async fn idle_for_ms(&self, s: &SandboxInfo, limit_ms: i64) -> i64 {
        let now = now_ms();
        let net = self.net_bytes(&s.id);
        let (in_session, last_used) = self.activity.with(&s.id, |seen| {
            let moved = seen.net.is_some() && net != seen.net;
            seen.net = net;
            if seen.last_used_ms == 0 || moved || seen.sessions > 0 {
                // In use now, or first seen (a new sandbox, or a restarted daemon): its time
                // starts now.
                seen.last_used_ms = now;
            }
            (seen.sessions > 0, seen.last_used_ms)
        });
        let idle = now - last_used;
        if in_session || idle < limit_ms {
            return idle;
        }
        if self.runs_processes(&s.id).await {
            self.activity.touch(&s.id);
            return 0;
        }
        idle
    }

    /// Whether a background process is still running in the sandbox (or the agent does not say).
    async fn runs_processes(&self, id: &str) -> bool {
        let Some(guest) = self.live(id).and_then(|m| m.guest()) else { return false };
        match tokio::time::timeout(JOBS_TIMEOUT, guest.request(Request::Jobs)).await {
            Ok(Ok(Started::Jobs { jobs })) => jobs.iter().any(|j| j.exit.is_none()),
            // A guest that does not answer is not put away on a guess.
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use moat_api::{CreateSandbox, IdlePolicy, OnIdle, Phase};

    use crate::launcher::fake::TestService;
    use crate::state::now_ms;

    async fn idle(t: &TestService, name: &str, secs: u64, action: OnIdle) -> String {
        let req = CreateSandbox { idle: Some(IdlePolicy { secs, action }), ..TestService::request(name) };
        t.svc.create(req).await.unwrap().id
    }

    /// Pretend the sandbox was last used `ms` ago.
    fn age(t: &TestService, id: &str, ms: i64) {
        t.svc.activity.with(id, |s| s.last_used_ms = now_ms() - ms);
    }

    #[tokio::test]
    async fn an_idle_sandbox_is_put_away_and_a_used_one_is_not() {
        let t = TestService::new(crate::service::tests::limits());
        let nap = idle(&t, "nap", 5, OnIdle::Stop).await;
        let gone = idle(&t, "gone", 5, OnIdle::Remove).await;
        let busy = idle(&t, "busy", 5, OnIdle::Stop).await;
        let plain = t.svc.create(TestService::request("plain")).await.unwrap().id;
        t.svc.reap_idle().await;
        for id in [&nap, &gone, &busy, &plain] {
            assert_eq!(t.svc.inspect(id).unwrap().phase, Phase::Running, "the first look starts the clock");
        }
        for id in [&nap, &gone, &busy, &plain] {
            age(&t, id, 6000);
        }
        // An open session is use, however old the last call.
        let session = t.svc.activity.session(&busy);
        age(&t, &busy, 6000);
        t.svc.reap_idle().await;
        assert_eq!(t.svc.inspect("nap").unwrap().phase, Phase::Stopped);
        assert!(t.svc.inspect("gone").is_err(), "removed");
        assert_eq!(t.svc.inspect("busy").unwrap().phase, Phase::Running);
        assert_eq!(t.svc.inspect("plain").unwrap().phase, Phase::Running, "no policy, never idle");
        let events = t.svc.db(|db| db.events_after(0, usize::MAX)).unwrap();
        assert!(events.iter().any(|e| e.kind == "idle" && e.sandbox.as_deref() == Some(nap.as_str())));
        // Once the session ends, its time counts from then.
        drop(session);
        t.svc.reap_idle().await;
        assert_eq!(t.svc.inspect("busy").unwrap().phase, Phase::Running);
        age(&t, &busy, 6000);
        t.svc.reap_idle().await;
        assert_eq!(t.svc.inspect("busy").unwrap().phase, Phase::Stopped);
    }

    #[tokio::test]
    async fn an_api_call_is_use() {
        let t = TestService::new(crate::service::tests::limits());
        let id = idle(&t, "called", 5, OnIdle::Stop).await;
        t.svc.reap_idle().await;
        age(&t, &id, 6000);
        t.svc.inspect("called").unwrap();
        t.svc.reap_idle().await;
        assert_eq!(t.svc.inspect("called").unwrap().phase, Phase::Running);
        assert_eq!(t.svc.inspect("called").unwrap().idle, Some(IdlePolicy { secs: 5, action: OnIdle::Stop }));
    }

    #[tokio::test]
    async fn ended_sandboxes_are_pruned_after_their_time() {
        let t = TestService::new(crate::service::tests::limits());
        t.svc.create(TestService::request("done")).await.unwrap();
        t.svc.create(TestService::request("up")).await.unwrap();
        t.svc.stop("done").await.unwrap();
        t.svc.prune_ended(std::time::Duration::from_secs(3600)).await;
        assert!(t.svc.inspect("done").is_ok(), "not yet");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        t.svc.prune_ended(std::time::Duration::from_millis(10)).await;
        assert!(t.svc.inspect("done").is_err(), "pruned");
        assert_eq!(t.svc.inspect("up").unwrap().phase, Phase::Running, "running ones stay");
        let events = t.svc.db(|db| db.events_after(0, usize::MAX)).unwrap();
        assert!(events.iter().any(|e| e.kind == "pruned"), "{events:?}");
    }
}
