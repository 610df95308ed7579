//! E2B's control plane: sandboxes created, listed, inspected, timed out, paused, resumed,
//! connected to and killed, each over one of the daemon's sandbox operations. Answers follow
//! the status codes and required fields of E2B's OpenAPI, which the SDK's generated parsers
//! insist on (see `docs/e2b.md`).

use std::collections::BTreeMap;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moat_api::{CreateSandbox, ErrorCode, NetMode, NetSpec, OnExpire, Phase, PullPolicy, SandboxInfo};
use moat_client::ClientError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::connect::read_bounded;
use crate::error::{json_error, Failure};
use crate::{Front, Shared, ENVD_VERSION};

/// The label that keeps the E2B template a sandbox was created from; metadata keys may not
/// start with `e2b.`.
const TEMPLATE_LABEL: &str = "e2b.template";
const RESERVED_PREFIX: &str = "e2b.";
/// E2B's default lifetime of a sandbox, in seconds.
const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// The longest lifetime one request may ask for (E2B's own plans stop at 24 hours).
const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;
/// Control-plane bodies are small JSON documents.
const MAX_BODY_BYTES: usize = 256 << 10;
/// The most sandboxes one list page holds.
const MAX_PAGE: usize = 1000;

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/metrics", get(|| async { Json(Vec::<serde_json::Value>::new()) }))
        .fallback(|| async {
            json_error(
                StatusCode::NOT_FOUND,
                "moat's E2B API has no such endpoint (see docs/e2b.md for what it serves)",
            )
        })
}

/// A control-plane failure: E2B's `{"code", "message"}` with the status the SDK expects.
struct ApiFailure(StatusCode, String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        json_error(self.0, &self.1)
    }
}

impl From<Failure> for ApiFailure {
    fn from(f: Failure) -> ApiFailure {
        ApiFailure(f.status.unwrap_or(f.code.status()), f.message)
    }
}

impl From<ClientError> for ApiFailure {
    fn from(e: ClientError) -> ApiFailure {
        let status = match e.code() {
            Some(ErrorCode::InvalidPhase) => StatusCode::CONFLICT,
            _ => return Failure::from(e).into(),
        };
        ApiFailure(status, Failure::from(e).message)
    }
}

fn invalid(message: impl Into<String>) -> ApiFailure {
    ApiFailure(StatusCode::BAD_REQUEST, message.into())
}

fn not_found(id: &str) -> ApiFailure {
    ApiFailure(StatusCode::NOT_FOUND, format!("sandbox {id} not found"))
}

/// A JSON body, small, or none at all (`{}` then).
struct JsonBody<T>(T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiFailure> {
        let bytes = read_bounded(req.into_body(), MAX_BODY_BYTES).await.map_err(|f| match f.code {
            // Not 429: the SDK would retry it.
            crate::error::Code::ResourceExhausted => ApiFailure(StatusCode::PAYLOAD_TOO_LARGE, f.message),
            _ => f.into(),
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(T::default()));
        }
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| invalid(format!("the request body is not valid: {e}")))
    }
}

/// `NewSandbox` (v1) and `NewSandboxV2`: what moat does not do is refused, not ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    #[serde(default)]
    auto_pause: bool,
    auto_resume: Option<Enabled>,
    #[serde(alias = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<Network>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    mcp: Option<serde_json::Value>,
    #[serde(default)]
    volume_mounts: Vec<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Enabled {
    #[serde(default)]
    enabled: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Network {
    #[serde(default)]
    allow_out: Vec<String>,
    #[serde(default)]
    deny_out: Vec<String>,
}

/// What every E2B answer about a sandbox says of it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Identity {
    #[serde(rename = "templateID")]
    template_id: String,
    alias: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    envd_version: &'static str,
    domain: String,
}

/// E2B's `Sandbox` (create, connect, resume).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    #[serde(flatten)]
    identity: Identity,
    envd_access_token: String,
    traffic_access_token: String,
}

/// E2B's `SandboxDetail` and `ListedSandbox`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Listed {
    #[serde(flatten)]
    identity: Identity,
    started_at: String,
    end_at: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    envd_access_token: Option<String>,
}

impl Front {
    fn identity(&self, s: &SandboxInfo) -> Identity {
        let template = s.labels.get(TEMPLATE_LABEL).cloned().unwrap_or_else(|| s.image.clone());
        Identity {
            alias: template.clone(),
            template_id: template,
            sandbox_id: s.id.clone(),
            client_id: "moat",
            envd_version: ENVD_VERSION,
            domain: self.cfg.domain.clone(),
        }
    }

    fn created(&self, s: &SandboxInfo) -> Created {
        Created {
            identity: self.identity(s),
            envd_access_token: self.envd_token(&s.id),
            traffic_access_token: self.traffic_token(&s.id),
        }
    }

    /// E2B's view of a sandbox; `None` for phases E2B has no name for (the SDK accepts only
    /// `running` and `paused`).
    fn listed(&self, s: &SandboxInfo, with_token: bool) -> Option<Listed> {
        let state = match s.phase {
            Phase::Running => "running",
            Phase::Paused => "paused",
            _ => return None,
        };
        // No lease: E2B has no "forever", so the end is far off.
        let end = s.expires_at.unwrap_or(s.created_at.saturating_add(10 * 365 * 86400));
        Some(Listed {
            identity: self.identity(s),
            started_at: rfc3339(s.created_at),
            end_at: rfc3339(end),
            cpu_count: s.vcpus,
            memory_mb: s.memory_mib,
            disk_size_mb: s.disk_mib,
            state,
            metadata: s
                .labels
                .iter()
                .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            envd_access_token: with_token.then(|| self.envd_token(&s.id)),
        })
    }

    /// The sandbox, if E2B may see it (it runs or is paused).
    async fn visible(&self, id: &str) -> Result<SandboxInfo, ApiFailure> {
        match self.client.inspect(id).await {
            Ok(s) if matches!(s.phase, Phase::Running | Phase::Paused) => Ok(s),
            Ok(_) => Err(not_found(id)),
            Err(e) if e.code() == Some(ErrorCode::NotFound) || e.code() == Some(ErrorCode::InvalidRequest) => {
                Err(not_found(id))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Push the sandbox's end to now + `secs`; with `only_later`, never bring it closer.
    async fn extend(&self, s: &SandboxInfo, secs: u64, only_later: bool) -> Result<(), ApiFailure> {
        let secs = check_timeout(secs)?;
        let now = crate::unix_now();
        let later = s.expires_at.is_none_or(|end| end < now.saturating_add(secs as i64));
        if !only_later || (later && s.expires_at.is_some()) {
            self.client.renew(&s.id, secs).await?;
        }
        Ok(())
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

fn check_timeout(secs: u64) -> Result<u64, ApiFailure> {
    if secs == 0 || secs > MAX_TIMEOUT_SECS {
        return Err(invalid(format!("timeout must be 1 to {MAX_TIMEOUT_SECS} seconds, not {secs}")));
    }
    Ok(secs)
}

/// What moat makes of an E2B create request.
fn create_request(front: &Front, req: NewSandbox) -> Result<CreateSandbox, ApiFailure> {
    let unsupported = |what: &str| invalid(format!("{what} is not supported by moat's E2B API; leave it out"));
    if req.auto_resume.is_some_and(|a| a.enabled) {
        return Err(unsupported("autoResume"));
    }
    if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(unsupported("mcp"));
    }
    if !req.volume_mounts.is_empty() {
        return Err(unsupported("volumeMounts"));
    }
    if let Some(k) = req.metadata.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
        return Err(invalid(format!("metadata key {k:?}: keys starting with {RESERVED_PREFIX:?} are moat's own")));
    }
    let template = req.template_id.trim();
    if template.is_empty() {
        return Err(invalid("templateID is required: `base` or the name of a moat image"));
    }
    let image = if template == "base" { front.cfg.default_image.clone() } else { template.to_string() };
    // A template is an image in the store (the default one is built when missing); only a
    // registry reference (`registry.example.com/team/image:tag`) is pulled.
    let pull = if template == "base" || template.contains('/') { PullPolicy::Missing } else { PullPolicy::Never };
    let mut labels = req.metadata;
    labels.insert(TEMPLATE_LABEL.into(), template.to_string());
    Ok(CreateSandbox {
        image: Some(image),
        ttl_secs: Some(check_timeout(req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS))?),
        // E2B's autoPause: paused at the end of the timeout, and `connect` resumes it.
        on_expire: Some(if req.auto_pause { OnExpire::Pause } else { OnExpire::Remove }),
        net: net_spec(req.allow_internet_access, req.network.unwrap_or_default())?,
        labels,
        env: req.env_vars.into_iter().collect(),
        pull: Some(pull),
        ..Default::default()
    })
}

/// E2B's egress settings as a moat network: no internet is no NIC; `allowOut` (with
/// `denyOut: ["0.0.0.0/0"]` or none) is moat's allowlist of hostnames and CIDRs.
fn net_spec(internet: Option<bool>, network: Network) -> Result<Option<NetSpec>, ApiFailure> {
    if internet == Some(false) {
        return Ok(Some(NetSpec { mode: NetMode::None, ..Default::default() }));
    }
    let deny_all = match network.deny_out.as_slice() {
        [] => false,
        [all] if all == "0.0.0.0/0" => true,
        _ => {
            return Err(invalid(
                "network.denyOut other than [\"0.0.0.0/0\"] is not supported: moat allows lists, not deny lists",
            ))
        }
    };
    if network.allow_out.is_empty() && !deny_all {
        return Ok(None);
    }
    let (cidrs, hosts): (Vec<String>, Vec<String>) =
        network.allow_out.into_iter().partition(|a| a.parse::<std::net::IpAddr>().is_ok() || a.contains('/'));
    let cidrs = cidrs.into_iter().map(|c| if c.contains('/') { c } else { format!("{c}/32") }).collect();
    Ok(Some(NetSpec { mode: NetMode::Allow, allow: hosts, allow_cidrs: cidrs, ..Default::default() }))
}

async fn create(State(front): State<Shared>, JsonBody(req): JsonBody<NewSandbox>) -> Result<Response, ApiFailure> {
    let create = create_request(&front, req)?;
    let s = front.client.create(&create).await?;
    Ok((StatusCode::CREATED, Json(front.created(&s))).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    state: Option<String>,
    metadata: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
    order: Option<String>,
}

async fn list(
    State(front): State<Shared>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiFailure> {
    let Query(q) = q.map_err(|e| invalid(format!("the query is not valid: {}", e.body_text())))?;
    let states: Vec<&str> = match &q.state {
        Some(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).collect(),
        None => vec!["running", "paused"],
    };
    if let Some(bad) = states.iter().find(|s| !["running", "paused"].contains(s)) {
        return Err(invalid(format!("state {bad:?}: use running, paused or both")));
    }
    let wanted: Vec<(String, String)> = match &q.metadata {
        Some(m) => form_pairs(m),
        None => Vec::new(),
    };
    let limit = q.limit.unwrap_or(MAX_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(invalid(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let descending = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(invalid(format!("order {o:?}: use asc or desc"))),
    };
    let mut all: Vec<SandboxInfo> = front.client.list().await?;
    all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    if descending {
        all.reverse();
    }
    let mut page = Vec::new();
    let mut started = q.next_token.is_none();
    let mut next = None;
    for s in &all {
        if !started {
            started = q.next_token.as_deref() == Some(&cursor(s));
            continue;
        }
        let Some(l) = front.listed(s, false) else { continue };
        if !states.contains(&l.state) || !wanted.iter().all(|(k, v)| s.labels.get(k) == Some(v)) {
            continue;
        }
        if page.len() == limit {
            next = page.last().map(|(s, _): &(&SandboxInfo, Listed)| cursor(s));
            break;
        }
        page.push((s, l));
    }
    let mut r = Json(page.into_iter().map(|(_, l)| l).collect::<Vec<_>>()).into_response();
    if let Some(token) = next.and_then(|t| HeaderValue::from_str(&t).ok()) {
        r.headers_mut().insert("x-next-token", token);
    }
    Ok(r)
}

/// Where a page ends: the last sandbox's creation time and id, so that sandboxes created or
/// removed meanwhile shift nothing.
fn cursor(s: &SandboxInfo) -> String {
    format!("{}.{}", s.created_at, s.id)
}

/// The `metadata` filter: the SDK sends `urlencode({quote(k): quote(v)})` as one query value,
/// so after the query's own decoding each pair is form-encoded, and each key and value quoted.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    let unquote = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    form_urlencoded::parse(s.as_bytes()).map(|(k, v)| (unquote(&k), unquote(&v))).collect()
}

async fn detail(State(front): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiFailure> {
    let s = front.visible(&id).await?;
    let listed = front.listed(&s, true).ok_or_else(|| not_found(&id))?;
    Ok(Json(listed).into_response())
}

async fn kill(State(front): State<Shared>, Path(id): Path<String>) -> Result<StatusCode, ApiFailure> {
    let s = front.visible(&id).await?;
    front.client.remove(&s.id, true).await?;
    front.processes.forget(&s.id);
    front.watchers.forget(&s.id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct Timeout {
    timeout: Option<u64>,
}

async fn set_timeout(
    State(front): State<Shared>,
    Path(id): Path<String>,
    JsonBody(t): JsonBody<Timeout>,
) -> Result<StatusCode, ApiFailure> {
    let s = front.visible(&id).await?;
    let secs = t.timeout.ok_or_else(|| invalid("timeout (seconds) is required"))?;
    front.extend(&s, secs, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Connect: a paused sandbox is resumed (201), a running one answered as it is (200); the
/// timeout only ever lengthens the sandbox's life.
async fn connect(
    State(front): State<Shared>,
    Path(id): Path<String>,
    JsonBody(t): JsonBody<Timeout>,
) -> Result<Response, ApiFailure> {
    let s = front.visible(&id).await?;
    let (s, status) = match s.phase {
        Phase::Paused => (front.client.resume(&s.id).await?, StatusCode::CREATED),
        _ => (s, StatusCode::OK),
    };
    if let Some(secs) = t.timeout {
        front.extend(&s, secs, status == StatusCode::OK).await?;
    }
    Ok((status, Json(front.created(&s))).into_response())
}

async fn resume(
    State(front): State<Shared>,
    Path(id): Path<String>,
    JsonBody(t): JsonBody<Timeout>,
) -> Result<Response, ApiFailure> {
    let s = front.visible(&id).await?;
    if s.phase != Phase::Paused {
        return Err(ApiFailure(StatusCode::CONFLICT, format!("sandbox {id} is already running")));
    }
    let s = front.client.resume(&s.id).await?;
    if let Some(secs) = t.timeout {
        front.extend(&s, secs, false).await?;
    }
    Ok((StatusCode::CREATED, Json(front.created(&s))).into_response())
}

async fn pause(
    State(front): State<Shared>,
    Path(id): Path<String>,
    _: JsonBody<serde_json::Value>,
) -> Result<StatusCode, ApiFailure> {
    let s = front.visible(&id).await?;
    if s.phase == Phase::Paused {
        return Err(ApiFailure(StatusCode::CONFLICT, format!("sandbox {id} is already paused")));
    }
    front.client.pause(&s.id).await?;
    // Processes and watchers do not survive a pause (their exec sessions end with the VM).
    front.processes.forget(&s.id);
    front.watchers.forget(&s.id);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_decode_the_sdks_double_quoting() {
        // urlencode({quote("a b"): quote("x/y")}) after the query layer decoded it once.
        assert_eq!(form_pairs("a%2520b=x%252Fy%2526z%253D"), vec![("a b".into(), "x/y&z=".into())]);
        assert_eq!(form_pairs("k=v&k2=%25C3%25A9"), vec![("k".into(), "v".into()), ("k2".into(), "é".into())]);
        assert_eq!(form_pairs(""), vec![]);
        assert_eq!(form_pairs("%zz=%"), vec![("%zz".into(), "%".into())]);
    }

    #[test]
    fn egress_settings_map_to_moat_networks() {
        assert_eq!(net_spec(None, Network::default()).ok().flatten(), None);
        assert_eq!(net_spec(Some(false), Network::default()).ok().flatten().map(|n| n.mode), Some(NetMode::None));
        let n = Network {
            allow_out: vec!["example.com".into(), "10.0.0.0/8".into(), "192.0.2.1".into()],
            deny_out: vec!["0.0.0.0/0".into()],
        };
        let spec = net_spec(None, n).ok().flatten().unwrap();
        assert_eq!(spec.mode, NetMode::Allow);
        assert_eq!(spec.allow, vec!["example.com".to_string()]);
        assert_eq!(spec.allow_cidrs, vec!["10.0.0.0/8".to_string(), "192.0.2.1/32".to_string()]);
        assert!(net_spec(None, Network { allow_out: vec![], deny_out: vec!["10.0.0.0/8".into()] }).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_000_000), "2026-11-30T00:53:20Z");
    }
}
