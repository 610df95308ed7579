//! Running commands in a sandbox (the exec WebSocket, background processes) and its logs.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::params::{ProcessRef, SandboxRef, WebSocketHandshake};
use crate::{ApiError, AttachQuery, JobInfo, KillProcess, LogsQuery, ProcessStarted, StartProcess};

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/exec", tag = "processes", operation_id = "exec",
    summary = "Run a process (WebSocket)",
    description = "Upgrades to a WebSocket. The client's first message is a text `ExecStart`; then binary \
        messages are stdin bytes and text messages are `ExecClientMessage`s. The daemon sends text \
        `ExecServerMessage`s (started, exit, error) and binary output whose first byte is the stream (1 \
        stdout, 2 stderr). Output is sent only as fast as the client reads it: that is the flow control \
        back to the guest. Messages are at most 1 MiB.",
    params(SandboxRef, WebSocketHandshake),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake (plain text), or the reference is too long or \
            matches several sandboxes", content(
            (ApiError = "application/json"),
            (String = "text/plain"),
        )),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn exec() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/logs", tag = "processes", operation_id = "sandboxLogs",
    summary = "The guest console or QEMU's log, as a stream of text",
    description = "The log from its start. With `follow` the stream stays open while the sandbox's VM \
        is live and sends what is appended; it ends when the VM does.",
    params(SandboxRef, LogsQuery),
    responses(
        (status = 200, description = "The log (guest bytes: may hold any control characters)",
            content_type = "text/plain", body = String),
        (status = 400, description = "A bad query, or the reference is too long or matches several sandboxes",
            body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn sandbox_logs() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/processes", tag = "processes",
    operation_id = "listProcesses",
    summary = "Background processes, running and ended",
    params(SandboxRef),
    responses(
        (status = 200, description = "The processes", body = Vec<JobInfo>),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn list_processes() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/processes", tag = "processes",
    operation_id = "startProcess",
    summary = "Start a background process",
    description = "It runs on after the request, keeps its output, and survives daemon restarts.",
    params(SandboxRef),
    request_body(content = StartProcess, content_type = "application/json"),
    responses(
        (status = 200, description = "Its pid", body = ProcessStarted),
        (status = 400, description = "No command, or a bad body or reference", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The process did not start (no such program, user or directory)",
            body = ApiError),
    ))]
pub fn start_process() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/processes/{pid}/attach", tag = "processes",
    operation_id = "attachProcess",
    summary = "A background process's output, kept then live, and its exit (WebSocket)",
    description = "Upgrades to a WebSocket carrying the exec protocol's output messages (no `started`). \
        Closing it leaves the process running.",
    params(ProcessRef, AttachQuery, WebSocketHandshake),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake or a bad pid (plain text), or a bad query or \
            reference", content(
            (ApiError = "application/json"),
            (String = "text/plain"),
        )),
        (status = 404, description = "No such sandbox or process", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn attach_process() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/processes/{pid}/kill", tag = "processes",
    operation_id = "killProcess",
    summary = "Signal a background process's group",
    params(ProcessRef),
    request_body(content = Option<KillProcess>, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = Object),
        (status = 400, description = "A bad pid (plain text), or a bad signal, body or reference", content(
            (ApiError = "application/json"),
            (String = "text/plain"),
        )),
        (status = 404, description = "No such sandbox or process", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn kill_process() {}
