//! Files in a sandbox: making, removing, renaming, changing the mode of and listing paths.

use serde::{Deserialize, Serialize};

use crate::FileInfo;

/// `POST /v1/sandboxes/{ref}/files/mkdir`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MakeDir {
    pub path: String,
    /// Create missing parents too, and succeed if it exists (`mkdir -p`).
    #[serde(default)]
    pub parents: bool,
    /// Permission bits [default: 0o755].
    #[serde(default)]
    pub mode: Option<u32>,
}

/// `POST /v1/sandboxes/{ref}/files/remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovePath {
    pub path: String,
    /// Remove a directory with everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST /v1/sandboxes/{ref}/files/rename`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenamePath {
    pub from: String,
    pub to: String,
}

/// `POST /v1/sandboxes/{ref}/files/chmod`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeMode {
    pub path: String,
    /// Permission bits, e.g. 0o644 (420).
    pub mode: u32,
}

/// `GET /v1/sandboxes/{ref}/files/list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<FileInfo>,
}
