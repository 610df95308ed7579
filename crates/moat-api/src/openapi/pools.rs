//! Warm pools: sandboxes restored ahead of time that creates claim.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use crate::{ApiError, PoolInfo, SetPool};

#[utoipa::path(get, path = "/v1/pools", tag = "sandboxes", operation_id = "listPools",
    summary = "Every warm pool and how full it is",
    responses(
        (status = 200, description = "The pools", body = Vec<PoolInfo>),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn list_pools() {}

#[utoipa::path(put, path = "/v1/pools", tag = "sandboxes", operation_id = "setPool",
    summary = "Keep a number of sandboxes of an image and size ready to claim (0 removes the pool)",
    description = "The daemon restores members from the image's template one at a time in the \
        background, while no create is in flight, and pauses each; a create with the same image and \
        sizes takes one and gives it its own name, hostname, clock, entropy and network. The setting \
        is kept in the state database.",
    request_body(content = SetPool, content_type = "application/json"),
    responses(
        (status = 200, description = "The pool as set", body = PoolInfo),
        (status = 400, description = "A size or image name out of range, or a bad body", body = ApiError),
        (status = 404, description = "The store has no such image (pull or build it first)", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn set_pool() {}
