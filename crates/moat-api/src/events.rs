//! What happened: the daemon's event stream, a sandbox's lifecycle, and which log to read.

use serde::{Deserialize, Serialize};

use crate::Phase;

/// One entry of a sandbox's lifecycle (`GET /v1/sandboxes/{ref}/lifecycle`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LifecycleEntry {
    pub version: i64,
    pub phase: Phase,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub error: Option<String>,
}

/// Something that happened (`GET /v1/events`, NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub sandbox: Option<String>,
    /// e.g. `phase`, `lease.renewed`, `gc`.
    pub kind: String,
    pub message: String,
}

/// The kind of the events a create records while it makes a missing image. Each message is
/// `IMAGE: text`; the first one's text starts with [`IMAGE_MISSING`].
pub const IMAGE_EVENT: &str = "image";
/// The kind of the events of snapshots: saved, pushed and pulled. A push's or pull's progress
/// messages are `push REFERENCE: text` and `pull REFERENCE: text`.
pub const SNAPSHOT_EVENT: &str = "snapshot";
/// How the first event of a missing image's making begins (after `IMAGE: `).
pub const IMAGE_MISSING: &str = "not in the store;";

/// Which log `GET /v1/sandboxes/{ref}/logs` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// The guest's serial console (kernel and agent messages).
    #[default]
    Console,
    /// QEMU's own messages.
    Qemu,
}
