//! Snapshots and templates: take, list, inspect and remove them; revert and fork a sandbox.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::params::{SandboxRef, SnapshotRef};
use crate::{
    ApiError, CreateSnapshot, Fork, Forked, PushedSnapshot, Revert, SandboxInfo, SnapshotInfo, SnapshotTransfer,
};

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/snapshots", tag = "snapshots",
    operation_id = "listSandboxSnapshots",
    summary = "The sandbox's snapshots",
    params(SandboxRef),
    responses(
        (status = 200, description = "Its snapshots, oldest first", body = Vec<SnapshotInfo>),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn list_sandbox_snapshots() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/snapshots", tag = "snapshots",
    operation_id = "createSnapshot",
    summary = "Snapshot a running sandbox: memory, device state and disk; it runs on after a short pause",
    params(SandboxRef),
    request_body(content = Option<CreateSnapshot>, content_type = "application/json"),
    responses(
        (status = 201, description = "The snapshot", body = SnapshotInfo),
        (status = 400, description = "A bad name, body or reference", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running, or has a snapshot of that name", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "Saving the VM failed", body = ApiError),
    ))]
pub fn create_snapshot() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/revert", tag = "snapshots", operation_id = "revertSandbox",
    summary = "Throw away the sandbox's VM and disk and continue from one of its own snapshots",
    params(SandboxRef),
    request_body(content = Revert, content_type = "application/json"),
    responses(
        (status = 200, description = "The running sandbox, as it was at the snapshot", body = SandboxInfo),
        (status = 400, description = "The snapshot is another sandbox's, or the body or reference is bad",
            body = ApiError),
        (status = 404, description = "No such sandbox or snapshot", body = ApiError),
        (status = 409, description = "The sandbox is busy, or the snapshot cannot be restored on this host",
            body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 429, description = "As many sandboxes are live as the daemon allows, or the host has not the memory or disk left (`insufficient_resources`)", body = ApiError),
        (status = 500, description = "Restoring the snapshot failed", body = ApiError),
    ))]
pub fn revert_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/fork", tag = "snapshots", operation_id = "forkSandbox",
    summary = "New sandboxes restored from a snapshot of this one; all or nothing",
    description = "Without `snapshot`, a new snapshot of the sandbox's current state is taken first.",
    params(SandboxRef),
    request_body(content = Option<Fork>, content_type = "application/json"),
    responses(
        (status = 201, description = "The snapshot they build on and the new running sandboxes", body = Forked),
        (status = 400, description = "The count or name prefix is out of range, or the body or reference is \
            bad", body = ApiError),
        (status = 404, description = "No such sandbox or snapshot", body = ApiError),
        (status = 409, description = "A name is taken, the sandbox is not running, or the snapshot cannot be \
            restored on this host", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 429, description = "The new sandboxes would pass the daemon's limit, or the host's memory or disk (`insufficient_resources`)", body = ApiError),
        (status = 500, description = "Saving or restoring a VM failed", body = ApiError),
    ))]
pub fn fork_sandbox() {}

#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots", operation_id = "listSnapshots",
    summary = "Every snapshot and image template",
    responses(
        (status = 200, description = "All ready snapshots, oldest first", body = Vec<SnapshotInfo>),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn list_snapshots() {}

#[utoipa::path(get, path = "/v1/snapshots/{reference}", tag = "snapshots", operation_id = "inspectSnapshot",
    summary = "Inspect a snapshot or template",
    params(SnapshotRef),
    responses(
        (status = 200, description = "The snapshot", body = SnapshotInfo),
        (status = 400, description = "The reference is too long, or matches several snapshots", body = ApiError),
        (status = 404, description = "No such snapshot", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn inspect_snapshot() {}

#[utoipa::path(delete, path = "/v1/snapshots/{reference}", tag = "snapshots", operation_id = "removeSnapshot",
    summary = "Remove a snapshot or template nothing builds on",
    params(SnapshotRef),
    responses(
        (status = 200, description = "The removed snapshot", body = SnapshotInfo),
        (status = 400, description = "The reference is too long, or matches several snapshots", body = ApiError),
        (status = 404, description = "No such snapshot", body = ApiError),
        (status = 409, description = "Sandboxes build on it (the message names them)", body = ApiError),
        (status = 500, description = "Removing its files failed", body = ApiError),
    ))]
pub fn remove_snapshot() {}

#[utoipa::path(post, path = "/v1/snapshots/pull", tag = "snapshots", operation_id = "pullSnapshot",
    summary = "Fetch a snapshot artifact from a registry (again, if its tag moved)",
    description = "The artifact's config is read first: one this host cannot restore (another QEMU, \
        accelerator, kernel or agent) is refused before its memory is fetched. Blobs are verified by \
        digest and a pull cut short continues where it stopped. Progress is on `GET /v1/events` as \
        events of kind `snapshot` (`pull REFERENCE: …`).",
    request_body(content = SnapshotTransfer, content_type = "application/json"),
    responses(
        (status = 201, description = "The pulled snapshot (or the one pulled before, when the registry has \
            nothing newer)", body = SnapshotInfo),
        (status = 400, description = "The reference or body is bad, or the artifact is not a moat snapshot, \
            or a blob does not match its digest", body = ApiError),
        (status = 409, description = "The snapshot cannot be restored on this host", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "Unpacking it failed", body = ApiError),
        (status = 502, description = "The registry could not be reached, refused the credentials, or has no \
            such artifact", body = ApiError),
    ))]
pub fn pull_snapshot() {}

#[utoipa::path(post, path = "/v1/snapshots/{reference}/push", tag = "snapshots", operation_id = "pushSnapshot",
    summary = "Send a snapshot to a registry as an artifact other hosts can pull",
    description = "Blobs the registry has already (the base disk of an image pushed before) are not sent \
        again. Progress is on `GET /v1/events` as events of kind `snapshot` (`push REFERENCE: …`).",
    params(SnapshotRef),
    request_body(content = SnapshotTransfer, content_type = "application/json"),
    responses(
        (status = 200, description = "What was sent", body = PushedSnapshot),
        (status = 400, description = "The reference or body is bad, or the snapshot serves host directories", body = ApiError),
        (status = 404, description = "No such snapshot", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "Reading or compressing its files failed", body = ApiError),
        (status = 502, description = "The registry could not be reached or refused the credentials", body = ApiError),
    ))]
pub fn push_snapshot() {}

#[utoipa::path(post, path = "/v1/snapshots/{reference}/fork", tag = "snapshots", operation_id = "forkSnapshot",
    summary = "New sandboxes restored from a snapshot of no particular sandbox; all or nothing",
    description = "The snapshot may be a pulled one (or any other). `snapshot` and `volumes` are refused: the \
        snapshot is the path's, and no volume is copied. Names default to `NAME-1` … from the snapshot's name.",
    params(SnapshotRef),
    request_body(content = Option<Fork>, content_type = "application/json"),
    responses(
        (status = 201, description = "The snapshot they build on and the new running sandboxes", body = Forked),
        (status = 400, description = "The count or name prefix is out of range, or the body or reference is \
            bad", body = ApiError),
        (status = 404, description = "No such snapshot", body = ApiError),
        (status = 409, description = "A name is taken, or the snapshot cannot be restored on this host", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 429, description = "The new sandboxes would pass the daemon's limit, or the host's memory or disk (`insufficient_resources`)", body = ApiError),
        (status = 500, description = "Restoring a VM failed", body = ApiError),
    ))]
pub fn fork_snapshot() {}
