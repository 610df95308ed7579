//! The MCP server of one session: its tools (in [`crate::sandboxes`], [`crate::exec`] and
//! [`crate::files`]), the sandboxes it owns, and what happens to them when the session ends.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_api::{ErrorCode, Phase, SandboxInfo};
use moat_client::Client;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{Implementation, ProtocolVersion, ServerCapabilities, ServerConfig};
use rmcp::{tool_handler, ServerHandler};

use crate::error::ToolError;
use crate::policy::Policy;
use crate::session::Session;

/// How the client reaches this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `moat mcp`: one process, one session, for as long as stdin stays open.
    Stdio,
    /// The daemon's `/mcp` endpoint: one handler per `Mcp-Session-Id` session.
    Http,
}

const INSTRUCTIONS: &str = "moat runs code in disposable Linux microVMs (sandboxes). \
Start with sandbox_create, then run shell commands with sandbox_exec (long-running ones with \
sandbox_process_start and sandbox_process_poll) and work on files with sandbox_file_read, \
sandbox_file_write and sandbox_file_edit. Take a snapshot before a risky step and revert to it \
if it goes wrong; fork to try several things side by side. Sandboxes this session creates are \
its own: they are removed when the session ends, or after their idle timeout. Paths inside a \
sandbox are absolute.";

/// The owned sandboxes of a session, removed when the session ends.
pub(crate) struct SessionGuard {
    pub(crate) session: Session,
    client: Client,
    closed: AtomicBool,
}

impl SessionGuard {
    /// Remove every sandbox the session owns (best effort: one that is already gone is fine).
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let ids = self.session.owned().ids();
        remove_all(&self.client, ids).await;
    }
}

/// Remove sandboxes side by side: a client that ends a stdio server gives it two seconds.
async fn remove_all(client: &Client, ids: Vec<String>) {
    futures_util::future::join_all(ids.into_iter().map(|id| async move {
        match client.remove(&id, true).await {
            Ok(_) => tracing::info!(sandbox = %id, "removed a sandbox of an ended MCP session"),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
            Err(e) => tracing::warn!(sandbox = %id, error = %e, "could not remove a sandbox of an ended MCP session"),
        }
    }))
    .await;
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // HTTP sessions end by being dropped (client DELETE or idle expiry); stdio calls close.
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let ids = self.session.owned().ids();
        if ids.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let client = self.client.clone();
                rt.spawn(async move { remove_all(&client, ids).await });
            }
            Err(_) => {
                tracing::warn!(?ids, "an MCP session ended outside the runtime; its sandboxes expire on their lease")
            }
        }
    }
}

/// The MCP server of one session.
#[derive(Clone)]
pub struct MoatMcp {
    pub(crate) client: Client,
    pub(crate) policy: Arc<Policy>,
    pub(crate) guard: Arc<SessionGuard>,
    transport: Transport,
    tool_router: ToolRouter<MoatMcp>,
}

impl MoatMcp {
    pub fn new(client: Client, policy: Arc<Policy>, transport: Transport) -> MoatMcp {
        let guard = Arc::new(SessionGuard {
            session: Session::new(&policy),
            client: client.clone(),
            closed: AtomicBool::new(false),
        });
        MoatMcp {
            client,
            policy,
            guard,
            transport,
            tool_router: Self::sandbox_tools() + Self::exec_tools() + Self::file_tools(),
        }
    }

    /// End the session: remove the sandboxes it owns.
    pub async fn close(&self) {
        self.guard.close().await;
    }

    pub(crate) fn session(&self) -> &Session {
        &self.guard.session
    }

    /// The sandbox a tool call names, if this session may use it. Using a sandbox the session
    /// owns pushes its idle lease out.
    pub(crate) async fn sandbox(&self, reference: &str) -> Result<SandboxInfo, ToolError> {
        let hidden = || {
            let others = if self.policy.all_sandboxes {
                String::new()
            } else {
                format!(
                    " (sandboxes of other MCP sessions and of the CLI are hidden unless the operator allows them with {})",
                    self.policy.flags.flag("all-sandboxes")
                )
            };
            ToolError::new(
                format!("there is no sandbox {reference:?} in this MCP session"),
                format!("list the sandboxes you can use with sandbox_list, or create one with sandbox_create{others}"),
            )
        };
        if reference.trim().is_empty() {
            return Err(ToolError::invalid("the sandbox is empty; give a sandbox name or id from sandbox_list"));
        }
        let info = match self.client.inspect(reference).await {
            Ok(info) => info,
            Err(e) if e.code() == Some(ErrorCode::NotFound) => return Err(hidden()),
            Err(e) => return Err(e.into()),
        };
        let ttl = self.session().owned().ttl(&info.id);
        match ttl {
            Some(ttl) => Ok(self.keep_alive(info, ttl).await),
            None if self.policy.all_sandboxes => Ok(info),
            None => Err(hidden()),
        }
    }

    /// Renew an owned sandbox's lease when less than half of its idle timeout is left.
    async fn keep_alive(&self, info: SandboxInfo, ttl: Duration) -> SandboxInfo {
        let left = info.expires_at.map(|e| e - now_secs());
        if info.phase != Phase::Running || left.is_none_or(|l| l > (ttl.as_secs() / 2) as i64) {
            return info;
        }
        match self.client.renew(&info.id, ttl.as_secs()).await {
            Ok(renewed) => renewed,
            Err(e) => {
                tracing::debug!(sandbox = %info.id, error = %e, "could not renew the lease");
                info
            }
        }
    }

    /// Whether this session owns the sandbox.
    pub(crate) fn owns(&self, id: &str) -> bool {
        self.session().owned().ttl(id).is_some()
    }

    /// How many of the session's sandboxes exist now (forgetting the ones that are gone).
    pub(crate) async fn live_owned(&self) -> Result<usize, ToolError> {
        let all = self.client.list().await?;
        let mut owned = self.session().owned();
        owned.retain(|id| all.iter().any(|s| s.id == id));
        Ok(owned.len())
    }
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for MoatMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("moat", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        match self.transport {
            Transport::Stdio => Cow::Borrowed(ProtocolVersion::KNOWN_VERSIONS),
            // Sandboxes belong to the session that made them, and over HTTP only the versions
            // with an initialize handshake have sessions (Mcp-Session-Id); 2026-07-28 clients
            // negotiate down to them.
            Transport::Http => Cow::Borrowed(ProtocolVersion::known_up_to(&ProtocolVersion::V_2025_11_25)),
        }
    }
}
