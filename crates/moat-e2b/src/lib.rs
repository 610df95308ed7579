//! An E2B-compatible front for moat: the unmodified `e2b` SDKs (Python and JavaScript) create,
//! drive and remove moat sandboxes.
//!
//! One HTTP listener serves both of E2B's planes (see `docs/e2b.md`):
//! - the control plane (`X-API-KEY`): sandboxes are created, listed, paused, resumed, timed
//!   out and killed (`control.rs`);
//! - the sandbox plane, envd's API, which E2B runs inside each VM and which moat answers on the
//!   host: Connect RPCs for processes (`process.rs`) and the filesystem (`filesystem.rs`), plain
//!   HTTP for file contents (`files.rs`) and a reverse proxy to other guest ports (`proxy.rs`).
//!
//! The front is a client of the daemon's API, like the CLI and the MCP server: every operation
//! is one of the daemon's, called through a [`moat_client::Client`] (in the daemon's process,
//! through its door). Nothing here talks to a VM itself.

mod connect;
mod control;
mod error;
mod files;
mod filesystem;
mod process;
mod proxy;
mod signed;
mod users;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use hmac::{Hmac, Mac};
use moat_api::Phase;
use moat_client::Client;
use sha2::Sha256;
use tower::ServiceExt;

use crate::error::Failure;

/// The port envd listens on in an E2B sandbox; the SDK names it in `E2b-Sandbox-Port`.
pub const ENVD_PORT: u16 = 49983;
/// The envd version moat's answers claim: the SDK turns features on and off by it (0.5.7:
/// `close_stdin`, octet-stream and gzip uploads; not yet file metadata).
pub(crate) const ENVD_VERSION: &str = "0.5.7";

/// How the front is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The daemon's API token: the E2B API key is `e2b_<token>` (or the token itself), and
    /// each sandbox's access tokens are derived from it.
    pub token: String,
    /// The `domain` told to the SDK: `Sandbox.get_host(port)` is `<port>-<id>.<domain>`, which
    /// this listener routes to that guest port.
    pub domain: String,
    /// The moat image behind E2B's default template `base`.
    pub default_image: String,
}

/// The API key the E2B SDK is given for a daemon token (the SDK checks `^e2b_[0-9a-f]+$`).
pub fn api_key(token: &str) -> String {
    format!("e2b_{token}")
}

/// The front's state, shared by every request.
pub(crate) struct Front {
    pub client: Client,
    pub cfg: Config,
    pub processes: process::Processes,
    pub watchers: filesystem::Watchers,
    pub users: users::Users,
}

pub(crate) type Shared = Arc<Front>;

/// The sandbox a sandbox-plane request is for: it exists, runs, and the request carried its
/// access token. Handlers of the sandbox plane take it as an `Extension`.
#[derive(Debug, Clone)]
pub(crate) struct Sandbox {
    /// moat's id of the sandbox (E2B's `sandboxID`).
    pub id: String,
}

impl Front {
    /// A token derived from the daemon token, unique to one sandbox and one use: stateless,
    /// so it survives restarts of the daemon, and useless for any other sandbox.
    fn derived_token(&self, label: &str, sandbox: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.cfg.token.as_bytes()).expect("HMAC takes any key length");
        mac.update(format!("{label}:{sandbox}").as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// The sandbox's `envdAccessToken`: what its envd requests must carry in `X-Access-Token`.
    pub(crate) fn envd_token(&self, sandbox: &str) -> String {
        self.derived_token("e2b-envd", sandbox)
    }

    /// The sandbox's `trafficAccessToken`, for requests to its other ports.
    pub(crate) fn traffic_token(&self, sandbox: &str) -> String {
        self.derived_token("e2b-traffic", sandbox)
    }

    /// Whether `key` is this daemon's E2B API key (`e2b_<token>` or the bare token).
    fn is_api_key(&self, key: &str) -> bool {
        let key = key.strip_prefix("e2b_").unwrap_or(key);
        same(key, &self.cfg.token)
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Compare secrets in constant time (the caller may be another local user guessing).
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The front as one router, for a listener of its own.
pub fn router(client: Client, cfg: Config) -> Router {
    let front = Arc::new(Front {
        client,
        cfg,
        processes: Default::default(),
        watchers: Default::default(),
        users: Default::default(),
    });
    let planes = Arc::new(Planes {
        control: control::routes().with_state(front.clone()),
        envd: Router::new()
            .route("/health", get(|| async { StatusCode::NO_CONTENT }))
            .merge(process::routes())
            .merge(filesystem::routes())
            .merge(files::routes())
            .fallback(|uri: axum::http::Uri| async move {
                let what = format!("envd has no {}: see docs/e2b.md for what moat serves", uri.path());
                connect::RpcError(Failure::new(error::Code::Unimplemented, what))
            })
            .with_state(front.clone()),
        front,
    });
    Router::new().fallback(dispatch).with_state(planes)
}

struct Planes {
    front: Shared,
    control: Router,
    envd: Router,
}

/// One listener, two planes: a request with `X-API-KEY` is for the control plane; any other is
/// for a sandbox, named by `E2b-Sandbox-Id` (and `E2b-Sandbox-Port`), by a `Host` of the form
/// `<port>-<id>.<domain>`, or by its `X-Access-Token` alone (SDKs that omit the header).
async fn dispatch(State(planes): State<Arc<Planes>>, req: Request) -> Response {
    let front = &planes.front;
    if let Some(key) = req.headers().get("x-api-key") {
        if !key.to_str().is_ok_and(|k| front.is_api_key(k)) {
            return error::json_error(
                StatusCode::UNAUTHORIZED,
                "wrong API key: use the one `moat e2b env` prints (e2b_ and the daemon's token)",
            );
        }
        return forward(planes.control.clone(), req).await;
    }
    let signed = signed::Signed::of(req.method(), req.uri());
    let (sandbox, port) = match target(front, req.headers(), signed.as_ref()).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return error::json_error(
                StatusCode::NOT_FOUND,
                "no sandbox named: send E2b-Sandbox-Id or X-Access-Token (set E2B_SANDBOX_URL for the SDK)",
            )
        }
        Err(f) => return f.http_response(),
    };
    let by_signature =
        port == ENVD_PORT && signed.is_some_and(|s| s.made_by(&front.envd_token(&sandbox.id), unix_now()));
    if let Err(f) = authorize(front, &sandbox, port, req.uri().path(), req.headers(), by_signature) {
        return f.http_response();
    }
    if port == ENVD_PORT {
        let mut req = req;
        req.extensions_mut().insert(sandbox);
        forward(planes.envd.clone(), req).await
    } else {
        proxy::forward(front, &sandbox, port, req).await
    }
}

async fn forward(router: Router, req: Request) -> Response {
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// The sandbox and port a sandbox-plane request is for; `None` when it names none. The sandbox
/// must exist and run.
async fn target(
    front: &Front,
    headers: &HeaderMap,
    signed: Option<&signed::Signed>,
) -> Result<Option<(Sandbox, u16)>, Failure> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let named = if let Some(id) = header("e2b-sandbox-id") {
        let port = match header("e2b-sandbox-port") {
            None => ENVD_PORT,
            Some(p) => p.parse().map_err(|_| Failure::invalid(format!("E2b-Sandbox-Port {p:?} is not a port")))?,
        };
        Some((id.to_string(), port))
    } else if let Some(t) = header("host").and_then(|h| host_target(h, &front.cfg.domain)) {
        Some(t)
    } else if let Some(token) = header("x-access-token") {
        // Older SDKs send no sandbox header after `Sandbox.connect()`: the token says which.
        let list = front.client.list().await?;
        list.into_iter().find(|s| same(token, &front.envd_token(&s.id))).map(|s| (s.id, ENVD_PORT))
    } else if let Some(signed) = signed {
        // A signed URL names no sandbox: the one whose token made the signature is meant.
        let list = front.client.list().await?;
        signed.find(front, list.into_iter().map(|s| s.id)).map(|id| (id, ENVD_PORT))
    } else {
        None
    };
    let Some((reference, port)) = named else { return Ok(None) };
    if reference.is_empty() || reference.len() > 128 {
        return Err(Failure::sandbox_gone(&reference.chars().take(128).collect::<String>()));
    }
    let info = match front.client.inspect(&reference).await {
        Ok(info) => info,
        Err(e) if e.code().is_some() => return Err(Failure::sandbox_gone(&reference)),
        Err(e) => return Err(e.into()),
    };
    if info.phase != Phase::Running {
        return Err(Failure::sandbox_gone(&reference));
    }
    Ok(Some((Sandbox { id: info.id }, port)))
}

/// `<port>-<id>.<domain>[:p]` → (id, port), for `Sandbox.get_host(port)`'s names.
fn host_target(host: &str, domain: &str) -> Option<(String, u16)> {
    let host = host.to_ascii_lowercase();
    let domain = domain.to_ascii_lowercase();
    let domain_host = domain.split(':').next().unwrap_or(&domain);
    let name = host.strip_suffix(&format!(".{domain}")).or_else(|| {
        let bare = host.split(':').next().unwrap_or(&host);
        bare.strip_suffix(&format!(".{domain_host}"))
    })?;
    let (port, id) = name.split_once('-')?;
    let port = port.parse().ok()?;
    (!id.is_empty() && !id.contains('.')).then(|| (id.to_string(), port))
}

/// envd's API needs the sandbox's access token (except `/health`; a signed `/files` URL stands
/// for it); other ports take it or the traffic token.
fn authorize(
    front: &Front,
    sandbox: &Sandbox,
    port: u16,
    path: &str,
    headers: &HeaderMap,
    by_signature: bool,
) -> Result<(), Failure> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let envd = by_signature || header("x-access-token").is_some_and(|t| same(t, &front.envd_token(&sandbox.id)));
    let ok = if port == ENVD_PORT {
        envd || path == "/health"
    } else {
        envd || header("e2b-traffic-access-token").is_some_and(|t| same(t, &front.traffic_token(&sandbox.id)))
    };
    if ok {
        Ok(())
    } else {
        Err(Failure::unauthenticated(format!(
            "missing or wrong access token for sandbox {}: send the envdAccessToken of its create or connect answer \
             in X-Access-Token",
            sandbox.id
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_host_names_route_to_their_sandbox_and_port() {
        let d = "localhost:3000";
        assert_eq!(host_target("8080-abc.localhost:3000", d), Some(("abc".into(), 8080)));
        assert_eq!(host_target("8080-abc.localhost", d), Some(("abc".into(), 8080)));
        assert_eq!(host_target("8080-ABC.LOCALHOST:3000", d), Some(("abc".into(), 8080)));
        assert_eq!(host_target("localhost:3000", d), None);
        assert_eq!(host_target("x-abc.localhost:3000", d), None);
        assert_eq!(host_target("8080-a.b.localhost:3000", d), None);
        assert_eq!(host_target("99999-abc.localhost:3000", d), None);
        assert_eq!(host_target("8080-abc.example.com", d), None);
    }

    #[test]
    fn keys_and_tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("ab", "abc"));
    }
}
