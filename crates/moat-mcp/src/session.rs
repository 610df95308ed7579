//! One MCP session's state: the sandboxes it owns (with their idle lease) and the rate at which it
//! starts commands. Pure bookkeeping; the tools ask the daemon for everything else.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::ToolError;
use crate::policy::Policy;

/// The sandboxes a session created (or forked), by id, with their idle lease.
#[derive(Debug, Default)]
pub struct Owned {
    leases: HashMap<String, Duration>,
    /// Sandboxes being created or forked: they count against the limit already.
    pub pending: usize,
}

impl Owned {
    pub fn add(&mut self, id: &str, ttl: Duration) {
        self.leases.insert(id.to_string(), ttl);
    }

    pub fn remove(&mut self, id: &str) {
        self.leases.remove(id);
    }

    pub fn ttl(&self, id: &str) -> Option<Duration> {
        self.leases.get(id).copied()
    }

    pub fn ids(&self) -> Vec<String> {
        self.leases.keys().cloned().collect()
    }

    /// Forget sandboxes that no longer exist (removed elsewhere or expired).
    pub fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        self.leases.retain(|id, _| exists(id));
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }
}

/// A token bucket: `per_minute` starts, refilled evenly over the minute.
#[derive(Debug)]
pub struct Rate {
    per_minute: u32,
    tokens: f64,
    at: Instant,
}

impl Rate {
    pub fn new(per_minute: u32) -> Rate {
        Rate { per_minute, tokens: per_minute as f64, at: Instant::now() }
    }

    /// Take one start at `now`; when none is left, how long until one is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let rate = self.per_minute as f64 / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(self.per_minute as f64);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if rate <= 0.0 {
            return Err(Duration::MAX);
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
    }
}

/// The mutable state of one session.
#[derive(Debug)]
pub struct Session {
    pub owned: Mutex<Owned>,
    rate: Mutex<Rate>,
    /// How much of each background process's output (sandbox id, pid) polls have returned.
    pub polled: Mutex<HashMap<(String, u32), u64>>,
}

impl Session {
    pub fn new(policy: &Policy) -> Session {
        Session {
            owned: Mutex::new(Owned::default()),
            rate: Mutex::new(Rate::new(policy.exec_per_minute)),
            polled: Mutex::new(HashMap::new()),
        }
    }

    pub fn owned(&self) -> std::sync::MutexGuard<'_, Owned> {
        self.owned.lock().expect("the owned-sandboxes lock is never held across a panic")
    }

    /// Count one command start against the session's rate.
    pub fn start_command(&self, policy: &Policy) -> Result<(), ToolError> {
        let mut rate = self.rate.lock().expect("the rate lock is never held across a panic");
        rate.take(Instant::now()).map_err(|wait| {
            ToolError::new(
                format!(
                    "this MCP session reached its limit of {} commands a minute (exec and background processes count)",
                    policy.exec_per_minute
                ),
                format!(
                    "wait {} s and try again, run several steps in one command (`a && b`), or ask the operator to raise the limit with {}",
                    wait.as_secs().max(1),
                    policy.flags.flag("exec-rate")
                ),
            )
        })
    }

    /// Refuse to go past the session's sandbox limit with `more` new ones (`live` is how many of
    /// its sandboxes exist now).
    pub fn check_room(&self, policy: &Policy, live: usize, more: usize) -> Result<(), ToolError> {
        if live + more <= policy.max_sandboxes {
            return Ok(());
        }
        Err(ToolError::new(
            format!(
                "this MCP session may own at most {} sandboxes; it has {live}{}",
                policy.max_sandboxes,
                if more > 1 { format!(" and asked for {more} more") } else { String::new() }
            ),
            format!(
                "destroy ones it no longer needs with sandbox_destroy, or ask the operator to raise the limit with {}",
                policy.flags.flag("max-sandboxes")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Flags;

    #[test]
    fn the_rate_refills_over_a_minute() {
        let t0 = Instant::now();
        let mut r = Rate::new(60);
        for _ in 0..60 {
            r.take(t0).unwrap();
        }
        let wait = r.take(t0).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::from_millis(900), "{wait:?}");
        r.take(t0 + Duration::from_secs(1)).unwrap();
        assert!(r.take(t0 + Duration::from_secs(1)).is_err());
        // A long pause refills the bucket, but never beyond one minute's worth.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..60 {
            r.take(later).unwrap();
        }
        assert!(r.take(later).is_err());
        assert_eq!(Rate::new(0).take(t0), Err(Duration::MAX));
    }

    #[test]
    fn limits_name_the_remedy() {
        let policy = Policy { max_sandboxes: 2, exec_per_minute: 1, ..Policy::default() };
        let s = Session::new(&policy);
        s.check_room(&policy, 1, 1).unwrap();
        let e = moat_hint::Report::new(&s.check_room(&policy, 1, 2).unwrap_err()).to_string();
        assert!(e.contains("at most 2 sandboxes") && e.contains("`moat mcp --max-sandboxes`"), "{e}");
        s.start_command(&policy).unwrap();
        let e = moat_hint::Report::new(&s.start_command(&policy).unwrap_err()).to_string();
        assert!(e.contains("limit of 1 commands a minute") && e.contains("--exec-rate"), "{e}");
        let daemon = Policy { flags: Flags::Daemon, ..policy };
        let e = moat_hint::Report::new(&s.check_room(&daemon, 2, 1).unwrap_err()).to_string();
        assert!(e.contains("moat serve --mcp-max-sandboxes") && e.contains("MOAT_MCP_MAX_SANDBOXES"), "{e}");
    }
}
