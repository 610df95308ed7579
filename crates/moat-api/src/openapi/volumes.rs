//! Named volumes: create, list, inspect and remove them.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::params::VolumeRef;
use crate::{ApiError, CreateVolume, RemoveVolumeQuery, VolumeInfo};

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", operation_id = "listVolumes",
    summary = "Every volume",
    responses(
        (status = 200, description = "All volumes, by name", body = Vec<VolumeInfo>),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn list_volumes() {}

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", operation_id = "createVolume",
    summary = "Create a volume: a sparse file holding an empty ext4 file system",
    request_body(content = CreateVolume, content_type = "application/json"),
    responses(
        (status = 201, description = "The new volume", body = VolumeInfo),
        (status = 400, description = "A bad name or size, a size the host's file system cannot hold, or a bad \
            body", body = ApiError),
        (status = 409, description = "A volume of that name exists", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "Making the file or its file system failed", body = ApiError),
    ))]
pub fn create_volume() {}

#[utoipa::path(get, path = "/v1/volumes/{reference}", tag = "volumes", operation_id = "inspectVolume",
    summary = "Inspect a volume: its sizes and the sandboxes that mount it",
    params(VolumeRef),
    responses(
        (status = 200, description = "The volume", body = VolumeInfo),
        (status = 400, description = "The reference is too long, or matches several volumes", body = ApiError),
        (status = 404, description = "No such volume", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn inspect_volume() {}

#[utoipa::path(delete, path = "/v1/volumes/{reference}", tag = "volumes", operation_id = "removeVolume",
    summary = "Remove a volume and everything on it",
    description = "Refused while sandboxes mount it (with `force`, only while a running one does).",
    params(VolumeRef, RemoveVolumeQuery),
    responses(
        (status = 200, description = "The removed volume as it was", body = VolumeInfo),
        (status = 400, description = "A bad query, or an ambiguous reference", body = ApiError),
        (status = 404, description = "No such volume", body = ApiError),
        (status = 409, description = "Sandboxes mount it (the message names them)", body = ApiError),
        (status = 500, description = "Removing its file failed", body = ApiError),
    ))]
pub fn remove_volume() {}
