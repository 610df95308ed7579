//! The moat daemon's REST API (v1): the JSON bodies of requests, responses, errors and streams.
//! The daemon serves them, `moat-client` speaks them; [`openapi`] describes them (docs/openapi.json).

use serde::{Deserialize, Serialize};

mod bundle;
mod df;
mod error;
mod events;
mod exec;
mod files;
mod idle;
mod image;
mod labels;
mod mount;
mod net;
pub mod openapi;
mod pool;
mod query;
mod sandbox;
mod snapshot;
mod terminal;
mod volume;

pub use bundle::{CreateBundle, MAX_BUNDLE_SANDBOXES};
pub use df::{DiskUsage, DiskUse, Reclaimable};
pub use error::{ApiError, ErrorCode};
pub use events::{Event, LifecycleEntry, LogSource, IMAGE_EVENT, IMAGE_MISSING, SNAPSHOT_EVENT};
pub use exec::{
    parse_signal, ExecClientMessage, ExecServerMessage, ExecStart, KillProcess, ProcessStarted, StartProcess, TtySize,
    STDERR_TAG, STDOUT_TAG,
};
pub use files::{ChangeMode, Listing, MakeDir, RemovePath, RenamePath};
pub use idle::{IdlePolicy, OnIdle, MAX_IDLE_SECS};
pub use image::{BuildImage, ImageInfo, ImageProgress, PullImage};
pub use labels::{
    parse_label, validate_label_key, validate_labels, LabelSelector, MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE,
};
pub use mount::{validate_mounts, validate_target, Mount, MountType, MAX_MOUNTS};
pub use net::{ChangeAllowlist, NetMode, NetSpec, PortForward, SecretSpec};
pub use pool::{PoolInfo, SetPool, MAX_POOL_SIZE};
pub use query::{
    ArchiveQuery, AttachQuery, EventsQuery, ImportQuery, ListQuery, LogsQuery, PathQuery, RemoveQuery, WriteFileQuery,
};
pub use sandbox::{
    validate_env, validate_name, CgroupUsage, CreateSandbox, Isolation, OnExpire, Phase, PullPolicy, RegistryLogin,
    RenewLease, SandboxInfo, DEFAULT_DISK_MIB, DEFAULT_IMAGE, DEFAULT_IMAGE_FROM, DEFAULT_IMAGE_PACKAGES,
    DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_SANDBOX_ENV,
};
pub use snapshot::{
    is_remote_snapshot, CloneTimeline, CreateSnapshot, Fork, ForkVolumes, Forked, PushedSnapshot, Revert, SnapshotInfo,
    SnapshotKind, SnapshotTransfer,
};
pub use terminal::{escape_controls, ControlEscaper};
pub use volume::{
    validate_volume_name, CreateVolume, RemoveVolumeQuery, VolumeInfo, VolumeUser, DEFAULT_VOLUME_BYTES,
    MAX_VOLUME_BYTES, MIN_VOLUME_BYTES, VOLUME_SIZE_STEP,
};

pub use moat_proto::{FileInfo, FileKind, FsEvent, JobInfo};

/// Path prefix of every versioned endpoint.
pub const PREFIX: &str = "/v1";

/// Largest request body the daemon accepts.
pub const MAX_BODY: usize = 64 * 1024;

/// `POST /v1/prune` and `POST /v1/gc`: what was removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reclaimed {
    /// Sandboxes removed (ids).
    pub sandboxes: Vec<String>,
    /// QEMU processes killed that no sandbox owned.
    pub processes: Vec<u32>,
    /// Files and directories removed that no sandbox owned.
    pub paths: Vec<String>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub version: String,
    pub pid: u32,
    pub accel: String,
    pub accel_reason: String,
    pub qemu_version: String,
    /// The guest kernel's release and file.
    pub kernel: String,
    pub kernel_path: String,
    pub sandboxes: usize,
    pub max_sandboxes: usize,
    /// Seconds since the daemon started.
    #[serde(default)]
    pub uptime_secs: u64,
    /// The unix socket it serves.
    #[serde(default)]
    pub socket: String,
    /// Its TCP listener, `tcp://ADDR` or `https://ADDR`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// The systemd unit it runs as, when systemd started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
}

/// Parse `90`, `90s`, `500ms`, `5m`, `2h`, `1d` into a duration.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration; use e.g. 30s, 500ms, 5m, 2h"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m, h or d")),
    };
    if d.is_zero() {
        return Err("a duration must be more than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
