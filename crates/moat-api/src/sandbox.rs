//! Sandboxes: their defaults, phases, lease, the create request and what the daemon says of one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::NetSpec;

/// Defaults of a new sandbox.
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const DEFAULT_DISK_MIB: u64 = 4096;
/// The image sandboxes get when none is named: Debian with Python, built from
/// [`DEFAULT_IMAGE_FROM`] and [`DEFAULT_IMAGE_PACKAGES`] by the first client that needs it.
pub const DEFAULT_IMAGE: &str = "default";
pub const DEFAULT_IMAGE_FROM: &str = "debian:bookworm";
pub const DEFAULT_IMAGE_PACKAGES: &[&str] = &["python3", "python3-pip", "python3-venv", "ca-certificates", "curl"];

/// The phases of a sandbox's life. `creating → booting → running → stopping → stopped`, and from
/// any live phase to `failed`; a lease running out ends in `expired` (or removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Creating,
    Booting,
    Running,
    Stopping,
    Stopped,
    Failed,
    Expired,
    /// The whole machine is saved in the run directory; no QEMU runs. `resume` continues it.
    Paused,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Creating,
        Phase::Booting,
        Phase::Running,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Failed,
        Phase::Expired,
        Phase::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
            Phase::Expired => "expired",
            Phase::Paused => "paused",
        }
    }

    /// Whether a QEMU process may exist in this phase.
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Creating | Phase::Booting | Phase::Running | Phase::Stopping)
    }

    /// Whether the sandbox is at rest: `prune` removes these (stopped, failed, expired, paused).
    pub fn is_at_rest(self) -> bool {
        !self.is_live()
    }
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Phase, String> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| format!("unknown phase {s:?}"))
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What happens when a sandbox's lease runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnExpire {
    /// Stop the VM and keep its disk (phase `expired`); `moat start` brings it back.
    Stop,
    /// Stop the VM and remove the sandbox.
    #[default]
    Remove,
    /// Pause the VM (phase `paused`: its memory is saved to disk and it holds none) and clear
    /// the lease; `moat resume` continues it. One that cannot be paused is stopped (`expired`).
    Pause,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Unique name: 1-63 letters, digits, `-`, `_` and `.`, starting with a letter or digit, and
    /// not hex digits alone (those read as an id) [default: `sb-` and the id's start].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 63, pattern = r"^(?![0-9A-Fa-f]+$)[A-Za-z0-9][A-Za-z0-9._-]*$")]
    pub name: Option<String>,
    /// The image to boot: a name in the store, or (see `pull`) a registry reference; lowercase
    /// letters, digits and `._-:/@`, at most 255 (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 255, pattern = r"^(?!(.*/)?\.{1,2}(/|$))[a-z0-9][a-z0-9._:/@-]*$")]
    pub image: Option<String>,
    /// Virtual CPUs, 1 to 64 [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub vcpus: Option<u32>,
    /// Memory in MiB, 64 MiB to 256 GiB [default: 512].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 64, maximum = 262144)]
    pub memory_mib: Option<u32>,
    /// Root disk in MiB, 64 MiB to 16 TiB [default: 4096].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 64, maximum = 16777216)]
    pub disk_mib: Option<u64>,
    /// Lease length, 1 s to 10 years; without it the sandbox lives until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 315360000)]
    pub ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_expire: Option<OnExpire>,
    /// The guest's hostname: 1-63 letters, digits and `-`, not starting with `-` [default:
    /// `moat-` and the id's start].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 63, pattern = r"^[A-Za-z0-9][A-Za-z0-9-]*$")]
    pub hostname: Option<String>,
    /// Give up when the guest has not come up after this long, 1 s to 1 h [default: 90].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 3600)]
    pub boot_timeout_secs: Option<u64>,
    /// Continue from this snapshot (`SANDBOX:NAME`, a snapshot id, or a registry reference
    /// `REGISTRY/REPOSITORY:TAG`, pulled unless a snapshot of it is here already, with
    /// `registry_login`) instead of booting the image; image, vCPUs, memory and disk come from the
    /// snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^([A-Za-z0-9._-]+(:[A-Za-z0-9._-]+)?|[a-z0-9][a-z0-9._:@-]*/[a-z0-9._:/@-]+)$"
    )]
    pub from: Option<String>,
    /// Start from the image's template (a saved, booted VM) when there is one, and make it when
    /// there is none [default: true, unless the daemon runs with templates off]. `false` boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<bool>,
    /// The network: mode, allowlist, secrets, port forwards [default: mode `default`, or what
    /// the snapshot of `from` had].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetSpec>,
    /// What to do when the image is not in the store [default: `missing`: the default image is
    /// built from its recipe, any other name is pulled as a registry reference; progress is on
    /// `GET /v1/events` as events of kind `image`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullPolicy>,
    /// Registry credentials for that pull, or for pulling the snapshot of `from` [default: anonymous].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_login: Option<RegistryLogin>,
    /// Labels to find the sandbox by (`GET /v1/sandboxes?label=KEY=VALUE`): at most 64; keys of
    /// 1-128 bytes without `=` or control characters, values of at most 1024 bytes without
    /// control characters. A fork has its parent's; a sandbox made `from` a snapshot only these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = crate::labels::schema)]
    pub labels: BTreeMap<String, String>,
    /// The environment every command in the sandbox starts with (execs and background
    /// processes), under the command's own: at most 1024 variables. A fork has its parent's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::openapi::schemas::environment)]
    pub env: Vec<(String, String)>,
    /// Volumes and host directories to mount (at most 16). A fork has its parent's (with
    /// `volumes: copy` for read-write volumes); a sandbox made `from` a snapshot has the host
    /// directories the snapshot was taken with, plus these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::Mount>,
    /// Stop, pause or remove the sandbox once it has been idle this long (see `IdlePolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<crate::IdlePolicy>,
}

/// When a create makes its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Make the image when the store lacks it.
    #[default]
    Missing,
    /// Never: an image that is not in the store is an error (`not_found`).
    Never,
}

/// Credentials for a registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    #[schema(min_length = 1)]
    pub username: String,
    #[schema(min_length = 1)]
    pub password: String,
}

/// Never prints the password.
impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryLogin").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Everything known about one sandbox (`GET /v1/sandboxes/{ref}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SandboxInfo {
    pub id: String,
    pub name: String,
    pub phase: Phase,
    pub image: String,
    pub image_digest: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    pub hostname: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; absent without a lease.
    pub expires_at: Option<i64>,
    pub on_expire: OnExpire,
    /// QEMU's pid while the VM runs.
    pub pid: Option<u32>,
    /// Why the sandbox last failed, if it did.
    pub last_error: Option<String>,
    /// Bumped on every phase change.
    pub version: i64,
    /// The snapshot (or template) this sandbox was restored from; its disk builds on it.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// The network, without secret values.
    #[serde(default)]
    pub net: NetSpec,
    /// How the sandbox's QEMU is confined on the host, while it runs (`GET` of one sandbox only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// The labels it was created with (or inherited from the sandbox it was forked from).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The environment every command in it starts with, under the command's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::openapi::schemas::env_pairs)]
    pub env: Vec<(String, String)>,
    /// Its volumes and host directories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::Mount>,
    /// What happens when it has been idle for a while, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<crate::IdlePolicy>,
}

/// How a running sandbox's QEMU is confined on the host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Isolation {
    /// The uid QEMU runs as; 0 or the daemon's own when it has none of its own.
    pub uid: u32,
    /// Whether the uid is QEMU's own (a jailed QEMU of a root daemon).
    pub own_uid: bool,
    /// The namespaces QEMU does not share with the daemon: some of `mnt`, `pid`, `net`, `ipc`,
    /// `uts`, `user`.
    pub namespaces: Vec<String>,
    /// The sandbox's cgroup, absent when the host offers none that can limit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupUsage>,
}

/// A sandbox's cgroup: its version, limits and what is used of them. Absent values could not
/// be read; `u64::MAX` means no limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CgroupUsage {
    /// `v1` or `v2`.
    pub version: String,
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub pids_limit: Option<u64>,
    /// CPU time used, in microseconds.
    pub cpu_usage_us: Option<u64>,
}

/// `POST /v1/sandboxes/{ref}/lease`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewLease {
    /// The new lease, counted from now: 1 s to 10 years.
    #[schema(minimum = 1, maximum = 315360000)]
    pub ttl_secs: u64,
}

/// Sandbox names: 1-63 of letters, digits, `-`, `_`, `.`, starting with a letter or digit, and not
/// looking like an id prefix only (ids are 12 hex digits, so a name of hex digits alone is refused).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if name.is_empty() || name.len() > 63 || !ok_chars || !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!(
            "sandbox name {name:?} is not valid; use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ));
    }
    if name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "sandbox name {name:?} could be mistaken for an id; use a name with at least one letter beyond a-f"
        ));
    }
    Ok(())
}

/// Most variables of a sandbox's default environment.
pub const MAX_SANDBOX_ENV: usize = 1024;

/// An environment as the agent takes it: names not empty, without `=` or NUL; values without
/// NUL. For a sandbox's default environment, at most [`MAX_SANDBOX_ENV`] variables.
pub fn validate_env(env: &[(String, String)]) -> Result<(), String> {
    if env.len() > MAX_SANDBOX_ENV {
        return Err(format!("{} environment variables given; at most {MAX_SANDBOX_ENV} are allowed", env.len()));
    }
    for (k, v) in env {
        let shown: String = k.chars().take(64).collect();
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("the environment variable name {shown:?} is empty or contains '=' or a NUL byte"));
        }
        if v.contains('\0') {
            return Err(format!("the value of environment variable {shown} contains a NUL byte"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environments_are_checked_as_the_agent_would() {
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(validate_env(&env("PATH", "/bin:/usr/bin")).is_ok());
        assert!(validate_env(&env("EMPTY", "")).is_ok());
        for (k, v) in [("", "x"), ("A=B", "x"), ("A\0", "x"), ("A", "x\0y")] {
            assert!(validate_env(&env(k, v)).is_err(), "{k:?}={v:?}");
        }
        let many: Vec<_> = (0..=MAX_SANDBOX_ENV).map(|i| (format!("V{i}"), String::new())).collect();
        assert!(validate_env(&many).expect_err("too many").contains("at most 1024"));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("box").is_ok());
        assert!(validate_name("web-1.test_a").is_ok());
        for bad in ["", "-x", ".x", "a b", "ab/c", "deadbeef", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn phases_round_trip_and_classify() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
            assert_ne!(p.is_live(), p.is_at_rest());
        }
    }
}
