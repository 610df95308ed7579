//! What happens to a sandbox nobody uses: `moat run --idle 30m[:stop|pause|remove]`.

use serde::{Deserialize, Serialize};

/// What is done to a sandbox that stayed idle for its policy's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Stop the VM and keep its disk (phase `stopped`); `moat start` brings it back.
    #[default]
    Stop,
    /// Pause the VM (its memory saved to disk); `moat resume` continues it. One that cannot be
    /// paused is stopped.
    Pause,
    /// Stop the VM and remove the sandbox.
    Remove,
}

impl OnIdle {
    pub fn as_str(self) -> &'static str {
        match self {
            OnIdle::Stop => "stop",
            OnIdle::Pause => "pause",
            OnIdle::Remove => "remove",
        }
    }
}

/// A running sandbox is idle while no command runs in it, no exec, attach or port-forward
/// connection is open to it, no API call names it and its network carries no traffic. After
/// `secs` of that, `action` is done and an `idle` event recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdlePolicy {
    /// Seconds of idleness, 1 s to 1 year.
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub secs: u64,
    #[serde(default)]
    pub action: OnIdle,
}

/// The longest idle time a policy may have (a year).
pub const MAX_IDLE_SECS: u64 = 365 * 86400;

impl IdlePolicy {
    /// Whether the time is in range.
    pub fn validate(&self) -> Result<(), String> {
        if self.secs == 0 || self.secs > MAX_IDLE_SECS {
            return Err(format!("an idle time of {} s is out of range; use 1 s to 1 year", self.secs));
        }
        Ok(())
    }
}

impl std::str::FromStr for IdlePolicy {
    type Err = String;

    /// `30m`, `30m:pause`, `2h:remove`.
    fn from_str(s: &str) -> Result<IdlePolicy, String> {
        let (time, action) = match s.split_once(':') {
            Some((t, a)) => (t, Some(a)),
            None => (s, None),
        };
        let d = crate::parse_duration(time)?;
        let action = match action {
            None | Some("stop") => OnIdle::Stop,
            Some("pause") => OnIdle::Pause,
            Some("remove") => OnIdle::Remove,
            Some(other) => return Err(format!("unknown idle action {other:?}; use stop, pause or remove")),
        };
        if d.subsec_nanos() != 0 {
            return Err(format!("{time:?}: an idle time is whole seconds"));
        }
        let policy = IdlePolicy { secs: d.as_secs(), action };
        policy.validate()?;
        Ok(policy)
    }
}

impl std::fmt::Display for IdlePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}s:{}", self.secs, self.action.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_policies_parse() {
        assert_eq!("30m".parse(), Ok(IdlePolicy { secs: 1800, action: OnIdle::Stop }));
        assert_eq!("5s:pause".parse(), Ok(IdlePolicy { secs: 5, action: OnIdle::Pause }));
        assert_eq!("1d:remove".parse(), Ok(IdlePolicy { secs: 86400, action: OnIdle::Remove }));
        for bad in ["", "0s", "5s:nap", "1500ms", "400d", "x:stop"] {
            assert!(bad.parse::<IdlePolicy>().is_err(), "{bad}");
        }
        let json = serde_json::to_value(IdlePolicy { secs: 5, action: OnIdle::Pause }).unwrap();
        assert_eq!(json, serde_json::json!({"secs": 5, "action": "pause"}));
        let short: IdlePolicy = serde_json::from_str(r#"{"secs": 60}"#).unwrap();
        assert_eq!(short.action, OnIdle::Stop);
    }
}
