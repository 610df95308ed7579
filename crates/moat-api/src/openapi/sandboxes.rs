//! Sandboxes and their lifecycle, and the daemon-wide routes: the document itself, health,
//! events, prune, gc and the MCP endpoint.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::params::{McpSession, SandboxRef};
use super::schemas::JsonRpcMessage;
use crate::{ApiError, CreateSandbox, Event, EventsQuery, Health, LifecycleEntry, Reclaimed, RemoveQuery, RenewLease};
use crate::{ListQuery, SandboxInfo, MAX_BODY};

const _: () = assert!(MAX_BODY == 64 * 1024, "the 413 descriptions say 64 KiB");

#[utoipa::path(get, path = "/openapi.json", tag = "daemon", operation_id = "openapi",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub fn openapi() {}

#[utoipa::path(get, path = "/v1/health", tag = "daemon", operation_id = "health",
    summary = "Daemon version, accelerator, QEMU, guest kernel and sandbox count",
    responses((status = 200, description = "Health", body = Health)))]
pub fn health() {}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", operation_id = "listSandboxes",
    summary = "List sandboxes, or those with some labels",
    params(ListQuery),
    responses(
        (status = 200, description = "All sandboxes (with `label`, those that match), oldest first",
            body = Vec<SandboxInfo>),
        (status = 400, description = "A bad label selector or query", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn list_sandboxes() {}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", operation_id = "createSandbox",
    summary = "Create a sandbox and answer once it runs",
    description = "Boots the image, restores the image's template (a saved, booted VM), or restores a \
        snapshot (`from`). The body may be empty: every field has a default.",
    request_body(content = Option<CreateSandbox>, content_type = "application/json"),
    responses(
        (status = 201, description = "The running sandbox", body = SandboxInfo),
        (status = 400, description = "A field is out of range or malformed", body = ApiError),
        (status = 404, description = "No such image, or no such snapshot for `from`", body = ApiError),
        (status = 409, description = "The name is taken, or the snapshot of `from` cannot be restored on \
            this host", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 429, description = "As many sandboxes are live as the daemon allows, or the host has not the memory or disk left (`insufficient_resources`)", body = ApiError),
        (status = 500, description = "The sandbox failed to boot", body = ApiError),
    ))]
pub fn create_sandbox() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}", tag = "sandboxes", operation_id = "inspectSandbox",
    summary = "Inspect a sandbox",
    params(SandboxRef),
    responses(
        (status = 200, description = "The sandbox", body = SandboxInfo),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn inspect_sandbox() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{reference}", tag = "sandboxes", operation_id = "removeSandbox",
    summary = "Remove a sandbox (one that is not at rest only with force)",
    params(SandboxRef, RemoveQuery),
    responses(
        (status = 200, description = "The removed sandbox as it was", body = SandboxInfo),
        (status = 400, description = "A bad query, or an ambiguous reference", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is live and force was not given", body = ApiError),
        (status = 500, description = "Stopping or removing it failed", body = ApiError),
    ))]
pub fn remove_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/stop", tag = "sandboxes", operation_id = "stopSandbox",
    summary = "Stop a running sandbox, keeping its disk (a paused one is refused: resume or remove it)",
    params(SandboxRef),
    responses(
        (status = 200, description = "The stopped sandbox", body = SandboxInfo),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "Stopping it failed", body = ApiError),
    ))]
pub fn stop_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/start", tag = "sandboxes", operation_id = "startSandbox",
    summary = "Boot a stopped, expired or failed sandbox from its disk, or continue a paused one",
    params(SandboxRef),
    responses(
        (status = 200, description = "The running sandbox", body = SandboxInfo),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox, or its image is gone", body = ApiError),
        (status = 409, description = "It is live already", body = ApiError),
        (status = 429, description = "As many sandboxes are live as the daemon allows, or the host has not the memory or disk left (`insufficient_resources`)", body = ApiError),
        (status = 500, description = "It failed to boot", body = ApiError),
    ))]
pub fn start_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/lease", tag = "sandboxes", operation_id = "renewLease",
    summary = "Renew a running sandbox's lease",
    params(SandboxRef),
    request_body(content = RenewLease, content_type = "application/json"),
    responses(
        (status = 200, description = "The sandbox with its new expiry", body = SandboxInfo),
        (status = 400, description = "The TTL is out of range, or the body or reference is bad", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "Its lease has expired, or it is not running", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn renew_lease() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/lifecycle", tag = "sandboxes",
    operation_id = "sandboxLifecycle",
    summary = "Every phase the sandbox went through",
    params(SandboxRef),
    responses(
        (status = 200, description = "Its lifecycle, oldest first", body = Vec<LifecycleEntry>),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn sandbox_lifecycle() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/pause", tag = "sandboxes", operation_id = "pauseSandbox",
    summary = "Save a running sandbox's whole VM into its run directory and end QEMU (phase paused)",
    params(SandboxRef),
    responses(
        (status = 200, description = "The paused sandbox", body = SandboxInfo),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "Saving it failed", body = ApiError),
    ))]
pub fn pause_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/resume", tag = "sandboxes", operation_id = "resumeSandbox",
    summary = "Continue a paused sandbox where it was",
    params(SandboxRef),
    responses(
        (status = 200, description = "The running sandbox", body = SandboxInfo),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not paused, or its saved VM cannot be restored on this host",
            body = ApiError),
        (status = 429, description = "As many sandboxes are live as the daemon allows, or the host has not the memory or disk left (`insufficient_resources`)", body = ApiError),
        (status = 500, description = "Restoring it failed", body = ApiError),
    ))]
pub fn resume_sandbox() {}

#[utoipa::path(get, path = "/v1/events", tag = "daemon", operation_id = "events",
    summary = "The daemon's events, as a stream of NDJSON lines",
    description = "One `Event` per line, oldest first. Without `follow` the stream ends after the last \
        event; with it the response never ends: new events follow as they happen, until the client \
        closes the connection.",
    params(EventsQuery),
    responses(
        (status = 200, description = "A stream of Event lines", content_type = "application/x-ndjson",
            body = Event),
        (status = 400, description = "A bad query", body = ApiError),
        (status = 404, description = "`sandbox` names no sandbox (and is not an id)", body = ApiError),
    ))]
pub fn events() {}

#[utoipa::path(post, path = "/v1/prune", tag = "sandboxes", operation_id = "prune",
    summary = "Remove every sandbox at rest (stopped, failed, expired or paused)",
    responses(
        (status = 200, description = "What was removed", body = Reclaimed),
        (status = 500, description = "Removing one failed", body = ApiError),
    ))]
pub fn prune() {}

#[utoipa::path(post, path = "/v1/gc", tag = "daemon", operation_id = "gc",
    summary = "Remove what no sandbox owns: QEMU processes, run directories, disks, sockets",
    responses(
        (status = 200, description = "What was removed", body = Reclaimed),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn gc() {}

#[utoipa::path(post, path = "/mcp", tag = "daemon", operation_id = "mcpPost",
    summary = "MCP (streamable HTTP): send a JSON-RPC message",
    description = "The Model Context Protocol's streamable HTTP transport (docs/mcp.md). The client \
        sends `Accept: application/json, text/event-stream`. `initialize` starts a session and its \
        answer names it in `Mcp-Session-Id`; every other message carries that header. Requests are \
        answered with an event stream, notifications and responses with 202. Errors are plain text \
        without a Content-Type, or JSON-RPC error objects.",
    params(McpSession),
    request_body(content = inline(JsonRpcMessage), content_type = "application/json"),
    responses(
        (status = 200, description = "The answer, as an event stream (or JSON)", content(
            (String = "text/event-stream"),
            (Object = "application/json"),
        )),
        (status = 202, description = "A notification or response was accepted"),
        (status = 400, description = "No session header on a message other than `initialize`, an unknown \
            protocol version, or a message the session refuses"),
        (status = 403, description = "The Origin header names another site"),
        (status = 404, description = "No such session (it ended, or the daemon restarted)"),
        (status = 406, description = "The Accept header lacks application/json or text/event-stream"),
        (status = 415, description = "The body is not a JSON-RPC message in application/json"),
    ))]
pub fn mcp_post() {}

#[utoipa::path(get, path = "/mcp", tag = "daemon", operation_id = "mcpGet",
    summary = "MCP (streamable HTTP): a session's stream of server messages",
    description = "The client sends `Accept: text/event-stream` and its session's `Mcp-Session-Id`. The \
        stream stays open until the client closes it or the session ends.",
    params(McpSession),
    responses(
        (status = 200, description = "Server-sent events", content_type = "text/event-stream", body = String),
        (status = 400, description = "No session header, or an unknown protocol version"),
        (status = 403, description = "The Origin header names another site"),
        (status = 404, description = "No such session"),
        (status = 405, description = "The protocol version keeps no stream outside a request (2026-07-28 \
            and later)"),
        (status = 406, description = "The Accept header lacks text/event-stream"),
    ))]
pub fn mcp_get() {}

#[utoipa::path(delete, path = "/mcp", tag = "daemon", operation_id = "mcpDelete",
    summary = "MCP (streamable HTTP): end a session, removing the sandboxes it created",
    params(McpSession),
    responses(
        (status = 202, description = "The session is ended (or was unknown)"),
        (status = 400, description = "No session header, or an unknown protocol version"),
        (status = 403, description = "The Origin header names another site"),
        (status = 405, description = "The protocol version keeps no sessions (2026-07-28 and later)"),
    ))]
pub fn mcp_delete() {}
