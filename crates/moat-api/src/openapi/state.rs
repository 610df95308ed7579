//! The daemon's state database: consistent backups while it runs.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::schemas::Binary;
use crate::ApiError;

#[utoipa::path(get, path = "/v1/state/backup", tag = "daemon", operation_id = "backupState",
    summary = "A consistent copy of the state database, made now",
    description = "An SQLite database file, copied with SQLite's online backup API while the daemon \
        runs. `moat state restore FILE` puts it back (with the daemon stopped).",
    responses(
        (status = 200, description = "The database file (Content-Length is its size)",
            content_type = "application/octet-stream", body = inline(Binary)),
        (status = 500, description = "Copying the database failed", body = ApiError),
    ))]
pub fn backup_state() {}
