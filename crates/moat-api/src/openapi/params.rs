//! Path and header parameters shared by several operations.

use utoipa::IntoParams;

/// A sandbox, as every `/v1/sandboxes/{reference}/…` route names it.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only its parameters are used.
pub struct SandboxRef {
    /// The sandbox's name, id or a unique prefix of its id.
    #[param(min_length = 1, max_length = 63, pattern = r"^[A-Za-z0-9._-]+$")]
    reference: String,
}

/// A snapshot or template.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct SnapshotRef {
    /// `SANDBOX:NAME` (the sandbox may be removed), a snapshot id or a unique prefix of one.
    #[param(min_length = 1, max_length = 127, pattern = r"^[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+)?$")]
    reference: String,
}

/// A volume.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct VolumeRef {
    /// The volume's name, id or a unique prefix of its id.
    #[param(min_length = 1, max_length = 63, pattern = r"^[A-Za-z0-9._-]+$")]
    reference: String,
}

/// A background process of a sandbox.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ProcessRef {
    /// The sandbox's name, id or a unique prefix of its id.
    #[param(min_length = 1, max_length = 63, pattern = r"^[A-Za-z0-9._-]+$")]
    reference: String,
    /// The process's pid in the sandbox, as `POST …/processes` answered it.
    #[param(minimum = 0, maximum = 4294967295_u64)]
    pid: u32,
}

/// A port forward of a sandbox.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct PortRef {
    /// The sandbox's name, id or a unique prefix of its id.
    #[param(min_length = 1, max_length = 63, pattern = r"^[A-Za-z0-9._-]+$")]
    reference: String,
    /// The forward's host port.
    #[param(minimum = 0, maximum = 65535)]
    host_port: u16,
}

/// A port in a sandbox's guest.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct GuestPortRef {
    /// The sandbox's name, id or a unique prefix of its id.
    #[param(min_length = 1, max_length = 63, pattern = r"^[A-Za-z0-9._-]+$")]
    reference: String,
    /// The TCP port in the guest.
    #[param(minimum = 1, maximum = 65535)]
    guest_port: u16,
}

/// An image, by name (which may hold `/` and `:`).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ImageRef {
    /// The image's name, e.g. `minimal` or `docker.io/library/alpine:3.20`.
    #[param(min_length = 1)]
    name: String,
}

/// The headers of a WebSocket handshake (RFC 6455); a request without them is refused (400)
/// before anything else is looked at.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct WebSocketHandshake {
    /// Must list `upgrade`.
    #[param(rename = "Connection", pattern = "^[Uu][Pp][Gg][Rr][Aa][Dd][Ee]$")]
    connection: String,
    #[param(rename = "Upgrade", pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$")]
    upgrade: String,
    #[param(rename = "Sec-WebSocket-Version", pattern = "^13$")]
    sec_websocket_version: String,
    /// The client's nonce (base64 of 16 random bytes).
    #[param(rename = "Sec-WebSocket-Key", min_length = 1)]
    sec_websocket_key: String,
}

/// The headers that ask for an HTTP/1.1 connection to become a plain TCP stream; a request
/// without them is refused (400) before the sandbox is looked at.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct TcpUpgrade {
    /// Must list `upgrade`.
    #[param(rename = "Connection", pattern = "^[Uu][Pp][Gg][Rr][Aa][Dd][Ee]$")]
    connection: String,
    #[param(rename = "Upgrade", pattern = "^[Tt][Cc][Pp]$")]
    upgrade: String,
}

/// The MCP endpoint's headers (streamable HTTP transport).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct McpSession {
    /// The session, as the answer to `initialize` named it; every message but `initialize`
    /// carries it.
    #[param(rename = "Mcp-Session-Id", nullable = false)]
    session: Option<String>,
    /// The MCP protocol version the session agreed on; an unknown one is refused.
    #[param(
        rename = "MCP-Protocol-Version",
        nullable = false,
        pattern = "^(2024-11-05|2025-03-26|2025-06-18|2025-11-25|2026-07-28)$"
    )]
    protocol_version: Option<String>,
}
