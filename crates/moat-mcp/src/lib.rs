//! The moat MCP server: sandboxes as tools for AI agents (create, exec, files, snapshots, forks,
//! …), over stdio (`moat mcp`) or the daemon's streamable-HTTP endpoint (`/mcp`).
//!
//! It is a client of the daemon's REST API like the CLI ([`moat_client`]), so agents see the same
//! sandboxes and the same behaviour. Each MCP session owns the sandboxes it creates: others are
//! hidden unless the operator allows them ([`Policy::all_sandboxes`]), its sandboxes are removed
//! when it ends, and it is held to a number of sandboxes and a rate of commands.

mod edit;
mod error;
mod exec;
mod files;
mod output;
mod policy;
mod sandboxes;
mod server;
mod session;
mod snapshots;

use std::sync::Arc;
use std::time::Duration;

use moat_client::Client;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServiceExt;

pub use error::ToolError;
pub use policy::{
    Flags, HostFiles, HostPathError, Policy, PolicyError, DEFAULT_MAX_CPUS, DEFAULT_MAX_DISK_MIB,
    DEFAULT_MAX_MEMORY_MIB,
};
pub use server::{MoatMcp, Transport};

/// An HTTP session that sees no request for this long ends (and its sandboxes are removed).
pub const HTTP_SESSION_IDLE: Duration = Duration::from_secs(3600);

/// The MCP server could not run.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("the MCP client did not complete the handshake on stdin/stdout: {0}")]
    Handshake(String),
}

impl moat_hint::Hint for McpError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            McpError::Handshake(_) => Some(
                "`moat mcp` is started by an MCP client (Claude Desktop, Claude Code, an MCP SDK) and speaks JSON-RPC \
                 on stdin/stdout; see docs/mcp.md"
                    .into(),
            ),
        }
    }
}

/// Serve one MCP session on stdin and stdout until the client closes them (or `shutdown`
/// completes, e.g. on SIGTERM); then remove the sandboxes the session created.
pub async fn serve_stdio(
    client: Client,
    policy: Policy,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), McpError> {
    let server = MoatMcp::new(client, Arc::new(policy), Transport::Stdio);
    let result = tokio::select! {
        served = async {
            let running = server.clone().serve(rmcp::transport::stdio()).await;
            let running = running.map_err(|e| McpError::Handshake(e.to_string()))?;
            let reason = running.waiting().await;
            tracing::info!(?reason, "the MCP session ended");
            Ok(())
        } => served,
        _ = shutdown => {
            tracing::info!("asked to stop; ending the MCP session");
            Ok(())
        }
    };
    server.close().await;
    result
}

/// The streamable-HTTP MCP endpoint, a tower service to mount on a router. Every session gets
/// its own server, talking to the daemon through `client`.
pub fn http_service(client: Client, policy: Policy) -> StreamableHttpService<MoatMcp, LocalSessionManager> {
    let policy = Arc::new(policy);
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(HTTP_SESSION_IDLE);
    // The Host check guards against DNS rebinding of a local server; here every request already
    // needs the unix socket's permissions or the TCP bearer token, which a browser cannot send.
    // Browsers have no business here at all: any request with an Origin is refused.
    let config = StreamableHttpServerConfig::default().disable_allowed_hosts().enforce_origin_validation();
    StreamableHttpService::new(
        move || Ok(MoatMcp::new(client.clone(), policy.clone(), Transport::Http)),
        Arc::new(sessions),
        config,
    )
}
