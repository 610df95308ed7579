//! The support bundle.

#![allow(dead_code)] // The stub exists for its `#[utoipa::path]`.

use super::schemas::Binary;
use crate::{ApiError, CreateBundle};

#[utoipa::path(post, path = "/v1/bundle", tag = "daemon", operation_id = "createBundle",
    summary = "A support bundle: a gzipped tar of what it takes to diagnose a problem, secrets left out",
    description = "Holds the daemon's log, the versions (moat, QEMU, kernels), each chosen sandbox's record, \
        lifecycle, events, console and QEMU logs, the events, and the `doctor` and `config` of the request. \
        Every value the daemon knows to be secret (the API token, each sandbox's secret values and \
        environment values) is replaced with `[REDACTED]` in every file; environment values are blanked \
        in the records. Each log is cut to its last 8 MiB and the whole bundle is bounded (what is left \
        out is listed in `manifest.json`).",
    request_body(content = Option<CreateBundle>, content_type = "application/json"),
    responses(
        (status = 200, description = "The bundle", content_type = "application/gzip", body = inline(Binary)),
        (status = 400, description = "A bad body, or an ambiguous sandbox reference", body = ApiError),
        (status = 404, description = "A named sandbox does not exist", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "Reading the state or building the archive failed", body = ApiError),
    ))]
pub fn create_bundle() {}
