//! Snapshots and templates: taking one, reverting to one, forking from one.

use serde::{Deserialize, Serialize};

use crate::SandboxInfo;

/// `POST /v1/sandboxes/{ref}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Unique among the sandbox's snapshots; the rules of sandbox names (default: `snap-<N>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 63, pattern = r"^(?![0-9A-Fa-f]+$)[A-Za-z0-9][A-Za-z0-9._-]*$")]
    pub name: Option<String>,
}

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Taken by a user (`moat snapshot`, or implicitly by `moat fork`).
    Snapshot,
    /// The booted-and-ready VM moat keeps per image so sandboxes start without booting.
    Template,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Snapshot => "snapshot",
            SnapshotKind::Template => "template",
        }
    }
}

/// A saved machine: memory, device state and disk (`GET /v1/snapshots`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub kind: SnapshotKind,
    /// The sandbox it was taken of, while that sandbox exists.
    pub sandbox_id: Option<String>,
    /// That sandbox's name (kept after it is removed); `SANDBOX:NAME` refers to the snapshot.
    pub sandbox_name: String,
    pub image: String,
    pub image_digest: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    /// Bytes the snapshot's files take on disk.
    pub size_bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// What a restore must match: QEMU version, accelerator, guest kernel, agent build.
    pub qemu: String,
    pub accel: String,
    pub kernel: String,
    pub initramfs: String,
    /// Whether the machine has a NIC: a restore must ask for a network (or `none`) to match.
    #[serde(default)]
    pub nic: bool,
    /// The host directories its guest had mounted: every restore serves them again (volumes
    /// are never part of a snapshot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_mounts: Vec<crate::Mount>,
    /// Sandboxes restored from it (their disks build on it): it cannot be removed before them.
    pub dependents: Vec<String>,
    /// The registry reference it was pulled from (`REGISTRY/REPOSITORY:TAG`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The digest of the artifact's manifest in that registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_digest: Option<String>,
}

impl SnapshotInfo {
    /// How users refer to it: `SANDBOX:NAME`, or the id of a template.
    pub fn reference(&self) -> String {
        match self.kind {
            SnapshotKind::Snapshot => format!("{}:{}", self.sandbox_name, self.name),
            SnapshotKind::Template => self.id.clone(),
        }
    }
}

/// `POST /v1/sandboxes/{ref}/revert`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Revert {
    /// One of the sandbox's snapshots: its name, `SANDBOX:NAME` or id.
    #[schema(min_length = 1, max_length = 127, pattern = r"^[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+)?$")]
    pub snapshot: String,
}

/// `POST /v1/sandboxes/{ref}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fork {
    /// How many sandboxes, 1 to 64 [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub count: Option<u32>,
    /// Names are `<prefix><N>`, so the prefix follows the rules of sandbox names with room for
    /// the number (default: `<sandbox>-fork-`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 61, pattern = r"^(?![0-9A-Fa-f]+$)[A-Za-z0-9][A-Za-z0-9._-]*$")]
    pub name_prefix: Option<String>,
    /// Fork from this snapshot of the sandbox; without it a snapshot of its current state is
    /// taken first (named `fork-<unix time>`), which needs the sandbox running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 127, pattern = r"^[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+)?$")]
    pub snapshot: Option<String>,
    /// What forks do with the sandbox's read-write volumes [default: `refuse`: a read-write
    /// volume is in one running sandbox at a time, so such a fork is refused].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<ForkVolumes>,
}

/// `Fork.volumes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForkVolumes {
    #[default]
    Refuse,
    /// Each fork gets its own copy of each read-write volume as it was at the fork, a new volume
    /// named `<fork>-<volume>` (copied sparse, by reflink where the host's file system can).
    Copy,
}

/// The answer to a fork.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Forked {
    pub snapshot: SnapshotInfo,
    pub sandboxes: Vec<SandboxInfo>,
    /// Where each new sandbox's start went, in the order of `sandboxes` (`moat fork --json`).
    #[serde(default)]
    pub timeline: Vec<CloneTimeline>,
}

/// How long the steps of one fork's start took, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloneTimeline {
    /// The sandbox's name.
    pub name: String,
    /// Its disk overlay and run directory made, before QEMU starts.
    pub prepare_ms: u64,
    /// QEMU started (in its jail) until it answered on QMP.
    pub qemu_start_ms: u64,
    /// The saved device state loaded and the guest running again.
    pub state_load_ms: u64,
    /// The guest running until its agent answered the handshake (identity, clock, entropy).
    pub agent_ms: u64,
    /// The whole create, as the daemon saw it (the above, plus its records and the network).
    pub total_ms: u64,
}

/// `POST /v1/snapshots/{ref}/push` (send a snapshot to a registry that speaks the OCI
/// distribution API, as an artifact any moat host can pull; docs/snapshots.md has the format) and
/// `POST /v1/snapshots/pull` (fetch one so sandboxes can start from it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTransfer {
    /// `REGISTRY/REPOSITORY:TAG` (a pull also takes `REGISTRY/REPOSITORY@sha256:DIGEST`).
    #[schema(min_length = 1, max_length = 255, pattern = r"^[a-z0-9][a-z0-9._:@-]*/[a-z0-9._:/@-]+$")]
    pub reference: String,
    /// Allow plain http to a registry that is not on loopback (loopback may always use http).
    #[serde(default)]
    pub insecure: bool,
    /// Credentials for the registry; anonymous without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// What `POST /v1/snapshots/{ref}/push` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PushedSnapshot {
    pub reference: String,
    /// The digest of the artifact's manifest.
    pub digest: String,
    /// Bytes sent; blobs the registry had already (an image's base pushed before) are not sent.
    pub uploaded_bytes: u64,
    /// Bytes of blobs the registry had already.
    pub reused_bytes: u64,
}

/// Whether a snapshot reference names a registry artifact (`REGISTRY/REPOSITORY:TAG`) rather than
/// a local snapshot (`SANDBOX:NAME` or an id): only the former has a `/`.
pub fn is_remote_snapshot(reference: &str) -> bool {
    reference.contains('/')
}
