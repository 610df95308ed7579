//! The REST API: JSON over HTTP/1.1, on the unix socket (and optionally TCP with a bearer token).
//! Exec is a WebSocket; logs and events stream as chunked bodies. Handlers only translate between
//! HTTP and the service; fronts other than REST (MCP) are mounted beside it by the binary.

mod auth;
mod bundle;
mod events;
mod exec_ws;
mod extract;
mod files;
mod images;
mod logs;
mod metrics;
mod net;
mod pools;
mod processes;
mod sandboxes;
mod snapshots;
mod state;
mod volumes;

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use moat_api::{ApiError, ErrorCode};

pub use auth::require_token;

use crate::error::ServiceError;
use crate::service::Service;

/// The checked-in OpenAPI document, served as is.
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.json");

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ApiError::from(self))).into_response()
    }
}

/// All REST routes, on top of the service.
pub fn router(svc: Arc<Service>) -> Router {
    Router::new()
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/v1/health", get(sandboxes::health))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/df", get(metrics::disk_usage))
        .route("/v1/sandboxes", get(sandboxes::list).post(sandboxes::create))
        .route("/v1/sandboxes/{reference}", get(sandboxes::inspect).delete(sandboxes::remove))
        .route("/v1/sandboxes/{reference}/stop", post(sandboxes::stop))
        .route("/v1/sandboxes/{reference}/start", post(sandboxes::start))
        .route("/v1/sandboxes/{reference}/lease", post(sandboxes::renew))
        .route("/v1/sandboxes/{reference}/lifecycle", get(sandboxes::lifecycle))
        .route("/v1/sandboxes/{reference}/snapshots", get(snapshots::sandbox_snapshots).post(snapshots::snapshot))
        .route("/v1/sandboxes/{reference}/revert", post(snapshots::revert))
        .route("/v1/sandboxes/{reference}/fork", post(snapshots::fork))
        .route("/v1/sandboxes/{reference}/pause", post(sandboxes::pause))
        .route("/v1/sandboxes/{reference}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{reference}/net", get(net::net))
        .route("/v1/sandboxes/{reference}/net/allow", post(net::change_allowlist))
        .route("/v1/sandboxes/{reference}/ports", get(net::ports).post(net::add_port))
        .route("/v1/sandboxes/{reference}/ports/{host_port}", delete(net::remove_port))
        .route("/v1/sandboxes/{reference}/ports/{guest_port}/connect", get(net::connect_port))
        .route("/v1/pools", get(pools::list).put(pools::set))
        .route("/v1/snapshots", get(snapshots::snapshots))
        .route("/v1/snapshots/pull", post(snapshots::pull))
        .route("/v1/snapshots/{reference}/push", post(snapshots::push))
        .route("/v1/snapshots/{reference}/fork", post(snapshots::fork_snapshot))
        .route("/v1/snapshots/{reference}", get(snapshots::inspect_snapshot).delete(snapshots::remove_snapshot))
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route("/v1/volumes/{reference}", get(volumes::inspect).delete(volumes::remove))
        .route("/v1/sandboxes/{reference}/exec", get(exec_ws::exec))
        .route("/v1/sandboxes/{reference}/logs", get(logs::logs))
        .route("/v1/sandboxes/{reference}/processes", get(processes::list).post(processes::start))
        .route("/v1/sandboxes/{reference}/processes/{pid}/attach", get(processes::attach))
        .route("/v1/sandboxes/{reference}/processes/{pid}/kill", post(processes::kill))
        .route("/v1/sandboxes/{reference}/files/stat", get(files::stat))
        .route("/v1/sandboxes/{reference}/files/list", get(files::list))
        .route("/v1/sandboxes/{reference}/files/mkdir", post(files::mkdir))
        .route("/v1/sandboxes/{reference}/files/remove", post(files::remove))
        .route("/v1/sandboxes/{reference}/files/rename", post(files::rename))
        .route("/v1/sandboxes/{reference}/files/chmod", post(files::chmod))
        .route("/v1/sandboxes/{reference}/files/watch", get(files::watch))
        .route(
            "/v1/sandboxes/{reference}/files/content",
            get(files::read_content).put(files::write_content).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/sandboxes/{reference}/archive",
            get(files::read_archive).put(files::write_archive).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/events", get(events::events))
        .route("/v1/images", get(images::list))
        .route("/v1/images/build", post(images::build))
        .route("/v1/images/pull", post(images::pull))
        .route("/v1/images/gc", post(images::gc))
        .route("/v1/images/import", post(images::import).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/v1/images/{*name}", get(images::inspect).delete(images::remove))
        .route("/v1/prune", post(sandboxes::prune))
        .route("/v1/gc", post(sandboxes::gc))
        .route("/v1/state/backup", get(state::backup))
        .route("/v1/bundle", post(bundle::bundle))
        .fallback(|| async {
            ServiceError::new(ErrorCode::NotFound, "no such endpoint", "see /openapi.json for the endpoints")
        })
        .with_state(svc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_api::{ExecStart, RenewLease};
    use std::collections::BTreeSet;

    fn doc() -> serde_json::Value {
        serde_json::from_str(OPENAPI).expect("docs/openapi.json is valid JSON")
    }

    /// What the binary mounts beside these routes (`serve`'s `fronts`, see
    /// `crates/moat/src/cmd/daemon.rs`); the document covers it too.
    const FRONTS: &[&str] = &["/mcp"];

    /// Every route the daemon serves is documented, and nothing else is.
    #[test]
    fn openapi_documents_exactly_the_routes() {
        let source = include_str!("mod.rs");
        let mut routed: BTreeSet<String> = source
            .split(".route(")
            .skip(1)
            .filter_map(|s| s.trim_start().strip_prefix('"'))
            .map(|s| s.split('"').next().expect("a quoted path").to_string())
            .filter(|p| p.starts_with('/') && !p.contains(' '))
            .map(|p| p.replace("{*", "{"))
            .collect();
        routed.extend(FRONTS.iter().map(|p| p.to_string()));
        let documented: BTreeSet<String> = doc()["paths"].as_object().expect("paths").keys().cloned().collect();
        assert_eq!(routed, documented);
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    }

    /// Request schemas list exactly the fields the daemon accepts.
    #[test]
    fn openapi_request_schemas_match_the_types() {
        let d = doc();
        let create = moat_api::CreateSandbox {
            name: Some("n".into()),
            image: Some("i".into()),
            vcpus: Some(1),
            memory_mib: Some(1),
            disk_mib: Some(1),
            ttl_secs: Some(1),
            on_expire: Some(moat_api::OnExpire::Stop),
            hostname: Some("h".into()),
            boot_timeout_secs: Some(1),
            from: Some("box:clean".into()),
            template: Some(false),
            net: Some(moat_api::NetSpec::default()),
            pull: Some(moat_api::PullPolicy::Never),
            registry_login: Some(moat_api::RegistryLogin { username: "u".into(), password: "p".into() }),
            labels: [("k".to_string(), "v".to_string())].into(),
            env: vec![("K".into(), "v".into())],
            mounts: vec![moat_api::Mount {
                kind: moat_api::MountType::Volume,
                source: "work".into(),
                target: "/work".into(),
                readonly: true,
            }],
            idle: Some(moat_api::IdlePolicy { secs: 60, action: moat_api::OnIdle::Pause }),
        };
        assert_eq!(
            keys(&serde_json::to_value(create).unwrap()),
            keys(&d["components"]["schemas"]["CreateSandbox"]["properties"])
        );
        let start = ExecStart { argv: vec!["x".into()], ..Default::default() };
        assert_eq!(
            keys(&serde_json::to_value(start).unwrap()),
            keys(&d["components"]["schemas"]["ExecStart"]["properties"])
        );
        assert_eq!(
            keys(&serde_json::to_value(RenewLease { ttl_secs: 1 }).unwrap()),
            keys(&d["components"]["schemas"]["RenewLease"]["properties"])
        );
    }
}
