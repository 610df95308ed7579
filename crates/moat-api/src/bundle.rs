//! `POST /v1/bundle`: a support bundle, built by the daemon because it alone knows every value
//! that must be left out of it.

use serde::{Deserialize, Serialize};

/// Most sandboxes a bundle request may name.
pub const MAX_BUNDLE_SANDBOXES: usize = 256;

/// What a support bundle holds besides what the daemon finds itself (its log, and each
/// sandbox's record, lifecycle, events, console and QEMU logs, and the versions).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBundle {
    /// The sandboxes (names, ids or unique id prefixes) to put in; none: every sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::openapi::schemas::references)]
    pub sandboxes: Vec<String>,
    /// The checks the client ran (`moat doctor --json`: any JSON), kept as `doctor.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub doctor: Option<serde_json::Value>,
    /// The client's configuration (`moat config show --json`), kept as `config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub config: Option<serde_json::Map<String, serde_json::Value>>,
}
