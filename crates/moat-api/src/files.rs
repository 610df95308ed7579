//! Files in a sandbox: making, removing, renaming, changing the mode of and listing paths.

use serde::{Deserialize, Serialize};

use crate::FileInfo;

/// `POST /v1/sandboxes/{ref}/files/mkdir`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeDir {
    /// An absolute path in the sandbox (at most 4096 bytes).
    #[schema(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub path: String,
    /// Create missing parents too, and succeed if it exists (`mkdir -p`).
    #[serde(default)]
    pub parents: bool,
    /// Permission bits, at most 0o7777 (4095) [default: 0o755].
    #[serde(default)]
    #[schema(minimum = 0, maximum = 4095)]
    pub mode: Option<u32>,
    /// A guest user to own the directories this creates (not those already there), with its
    /// primary group: a name from the sandbox's /etc/passwd, a uid, or `user:group` [default: root].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[^\u0000-\u001f\u007f-\u009f]{1,64}$")]
    pub owner: Option<String>,
}

/// `POST /v1/sandboxes/{ref}/files/remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovePath {
    /// An absolute path in the sandbox, not `/`.
    #[schema(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub path: String,
    /// Remove a directory with everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST /v1/sandboxes/{ref}/files/rename`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenamePath {
    /// An absolute path in the sandbox.
    #[schema(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub from: String,
    /// An absolute path in the sandbox; what is there is replaced as rename(2) does.
    #[schema(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub to: String,
}

/// `POST /v1/sandboxes/{ref}/files/chmod`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeMode {
    /// An absolute path in the sandbox.
    #[schema(min_length = 1, max_length = 4096, pattern = r"^/[^\u0000]*$")]
    pub path: String,
    /// Permission bits, e.g. 0o644 (420), at most 0o7777 (4095).
    #[schema(minimum = 0, maximum = 4095)]
    pub mode: u32,
}

/// `GET /v1/sandboxes/{ref}/files/list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Listing {
    pub entries: Vec<FileInfo>,
}
