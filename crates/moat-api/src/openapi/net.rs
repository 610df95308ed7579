//! A sandbox's network: its spec, live allowlist changes, port forwards and connections to a
//! guest port.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::params::{GuestPortRef, PortRef, SandboxRef, TcpUpgrade};
use crate::{ApiError, ChangeAllowlist, NetSpec, PortForward};

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/net", tag = "network", operation_id = "sandboxNet",
    summary = "The sandbox's network: mode, allowlist, CIDRs, hosts, DNS, secrets (never their values), \
        port forwards",
    params(SandboxRef),
    responses(
        (status = 200, description = "The network", body = NetSpec),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn sandbox_net() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/net/allow", tag = "network",
    operation_id = "changeAllowlist",
    summary = "Add hostnames to or remove them from the allowlist of a sandbox in mode allow",
    description = "New connections and DNS queries follow the new list at once.",
    params(SandboxRef),
    request_body(content = Option<ChangeAllowlist>, content_type = "application/json"),
    responses(
        (status = 200, description = "The network after the change", body = NetSpec),
        (status = 400, description = "A bad hostname pattern, a sandbox not in mode allow, or a bad body or \
            reference", body = ApiError),
        (status = 404, description = "No such sandbox, or a name to remove is not on its list", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn change_allowlist() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/ports", tag = "network", operation_id = "listPorts",
    summary = "The sandbox's port forwards",
    params(SandboxRef),
    responses(
        (status = 200, description = "Its forwards", body = Vec<PortForward>),
        (status = 400, description = "The reference is too long, or matches several sandboxes", body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn list_ports() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/ports", tag = "network", operation_id = "addPort",
    summary = "Forward a host port to a guest port of a running sandbox (host port 0 picks a free one)",
    params(SandboxRef),
    request_body(content = PortForward, content_type = "application/json"),
    responses(
        (status = 200, description = "The forward, with the host port picked", body = PortForward),
        (status = 400, description = "A bad address or port, too many forwards, or a bad body or reference",
            body = ApiError),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running or has no network, or the host port is taken",
            body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn add_port() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{reference}/ports/{host_port}", tag = "network",
    operation_id = "removePort",
    summary = "Stop forwarding a host port",
    params(PortRef),
    responses(
        (status = 200, description = "The network after the change", body = NetSpec),
        (status = 400, description = "A host port that is not a number from 0 to 65535 (plain text), or a \
            reference that is too long or matches several sandboxes", content(
            (ApiError = "application/json"),
            (String = "text/plain"),
        )),
        (status = 404, description = "No such sandbox, or it forwards no such port", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn remove_port() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/ports/{guest_port}/connect", tag = "network",
    operation_id = "connectPort",
    summary = "One TCP connection to a port of a running sandbox, over this HTTP connection (upgrade)",
    description = "Connects to the guest port first; once the guest has accepted, answers 101 and the \
        connection carries the TCP stream's bytes both ways until either side closes. Unlike a port \
        forward it opens no port on the host, so a front can serve a sandbox's ports behind its own \
        authentication. The guest sees the connection come from the gateway (10.0.2.2), so a server \
        listening only on the guest's 127.0.0.1 is not reached.",
    params(GuestPortRef, TcpUpgrade),
    responses(
        (status = 101, description = "Switching to the guest port's TCP stream"),
        (status = 400, description = "Not an upgrade to `tcp`, port 0, or a port that is not a number from 0 to \
            65535 (plain text), or a reference that is too long or matches several sandboxes", content(
            (ApiError = "application/json"),
            (String = "text/plain"),
        )),
        (status = 404, description = "No such sandbox", body = ApiError),
        (status = 409, description = "It is not running or has no network, or the port is not open in the \
            guest, or the guest did not answer within 10 s", body = ApiError),
        (status = 429, description = "The sandbox's network holds as many connections as it may", body = ApiError),
        (status = 500, description = "The state database failed", body = ApiError),
    ))]
pub fn connect_port() {}
