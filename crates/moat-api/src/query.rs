//! The query strings of the endpoints that take one. Unknown parameters are refused.

use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use crate::LogSource;

/// `GET /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only sandboxes with this label: `KEY=VALUE`, or `KEY` for any value. Repeat it for
    /// several; a sandbox must match them all.
    #[serde(default)]
    #[param(explode, style = Form, pattern = r"^[^=\u0000-\u001f\u007f-\u009f]{1,32}(=[^\u0000-\u001f\u007f-\u009f]{0,256})?$")]
    pub label: Vec<String>,
}

/// `DELETE /v1/sandboxes/{ref}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Remove a sandbox that is not at rest too (its VM is stopped first).
    #[serde(default)]
    pub force: bool,
}

/// `GET /v1/events`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events after this sequence number; a negative number: only events recorded from
    /// now on (with `follow`).
    #[serde(default)]
    pub since: i64,
    /// Keep the stream open and send new events as they happen; it never ends by itself
    /// (unless `until_ms` passes).
    #[serde(default)]
    pub follow: bool,
    /// Only events of this sandbox: a name, id or id prefix (also of a sandbox removed since,
    /// by its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(min_length = 1, max_length = 128)]
    pub sandbox: Option<String>,
    /// Only events of this kind (`phase`, `net.refused`), or of kinds under a prefix (`net.*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._-]*\*?$")]
    pub kind: Option<String>,
    /// Only events at or after this time (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    /// Only events at or before this time (Unix milliseconds); a followed stream ends then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<i64>,
}

/// `GET /v1/sandboxes/{ref}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    #[serde(default)]
    #[param(inline)]
    pub source: LogSource,
    /// Keep the stream open and send what is appended while the sandbox's VM is live.
    #[serde(default)]
    pub follow: bool,
    /// Only the last this many lines (then, with `follow`, what is appended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u64>,
    /// Only what the guest wrote at or after this time (Unix milliseconds; the console's times
    /// are known to a quarter of a second). The QEMU log has no times and refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
}

/// `GET /v1/sandboxes/{ref}/processes/{pid}/attach`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AttachQuery {
    /// Send what the process printed before the attach first [default: true].
    #[serde(default)]
    pub replay: Option<bool>,
}

/// A path in a sandbox: `files/stat`, `files/list`, `files/watch`, `files/content` (GET) and
/// `archive` (PUT).
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// An absolute path in the sandbox (at most 4096 bytes).
    #[param(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub path: String,
    /// `list`: the whole tree; `watch`: changes in subdirectories too.
    #[serde(default)]
    pub recursive: bool,
}

/// `PUT /v1/sandboxes/{ref}/files/content`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WriteFileQuery {
    /// An absolute path in the sandbox (at most 4096 bytes).
    #[param(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub path: String,
    /// Permission bits in octal, at most 7777, e.g. `644` [default: 644 for a new file, else
    /// the file's own].
    #[serde(default)]
    #[param(pattern = r"^\+?0*[0-7]{1,4}$")]
    pub mode: Option<String>,
    /// Write beside the file and rename it into place [default: true].
    #[serde(default)]
    pub atomic: Option<bool>,
    /// A guest user to own the file, with its primary group: a name from the sandbox's
    /// /etc/passwd, a uid, or `user:group` [default: root for a new file].
    #[serde(default)]
    #[param(pattern = r"^[^\u0000-\u001f\u007f-\u009f]{1,64}$")]
    pub owner: Option<String>,
}

/// `GET /v1/sandboxes/{ref}/archive`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ArchiveQuery {
    /// An absolute path in the sandbox (at most 4096 bytes): a file or a directory.
    #[param(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub path: String,
    /// The archive's top-level entry name: no `/`, not `..` [default: the path's last
    /// component].
    #[serde(default)]
    #[param(min_length = 1, pattern = r"^(?!\.\.$)[^/\u0000]+$")]
    pub name: Option<String>,
}

/// `POST /v1/images/import`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// The name to give the image [default: the archive's first tag].
    #[serde(default)]
    pub name: Option<String>,
}
