//! Operating the daemon: its metrics for Prometheus, and where the disk goes.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use crate::{ApiError, DiskUsage};

#[utoipa::path(get, path = "/metrics", tag = "daemon", operation_id = "metrics",
    summary = "Metrics in the Prometheus text format",
    description = "Sandboxes by phase; creates, restores and execs with their latencies and failures; \
        refused connections by rule; bytes each sandbox's network carried; disk use by kind; memory \
        committed to sandboxes against the host's RAM. Gauges are measured at each scrape.",
    responses(
        (status = 200, description = "The metrics (text format 0.0.4)", body = String,
            content_type = "text/plain"),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn metrics() {}

#[utoipa::path(get, path = "/v1/df", tag = "daemon", operation_id = "diskUsage",
    summary = "Disk use by images, layers, snapshots, templates, sandboxes and volumes",
    description = "Allocated bytes (disks are sparse), and what `prune`, `images/gc` and `gc` would free now.",
    responses(
        (status = 200, description = "The disk use", body = DiskUsage),
        (status = 500, description = "The state database or the image store failed", body = ApiError),
    ))]
pub fn disk_usage() {}
