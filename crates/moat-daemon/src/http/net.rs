//! A sandbox's network: its spec, live allowlist changes, port forwards, and connections to a
//! guest port over an upgraded HTTP connection.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use hyper_util::rt::TokioIo;
use moat_api::ErrorCode;

use super::extract::{ApiResult, JsonBody, Svc};
use crate::error::ServiceError;

pub async fn net(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<Json<moat_api::NetSpec>> {
    Ok(Json(svc.resolve(&reference)?.net))
}

pub async fn change_allowlist(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<moat_api::ChangeAllowlist>,
) -> ApiResult<Json<moat_api::NetSpec>> {
    Ok(Json(svc.change_allowlist(&reference, req).await?))
}

pub async fn ports(State(svc): Svc, Path(reference): Path<String>) -> ApiResult<Json<Vec<moat_api::PortForward>>> {
    Ok(Json(svc.resolve(&reference)?.net.ports))
}

pub async fn add_port(
    State(svc): Svc,
    Path(reference): Path<String>,
    JsonBody(req): JsonBody<moat_api::PortForward>,
) -> ApiResult<Json<moat_api::PortForward>> {
    Ok(Json(svc.add_port(&reference, req).await?))
}

pub async fn remove_port(
    State(svc): Svc,
    Path((reference, host_port)): Path<(String, u16)>,
) -> ApiResult<Json<moat_api::NetSpec>> {
    Ok(Json(svc.remove_port(&reference, host_port).await?))
}

/// One TCP connection to a guest port, carried over this HTTP connection once it is upgraded
/// (`Connection: upgrade`, `Upgrade: tcp`). Everything that can fail is answered as a plain API
/// error before the 101; after it, bytes are copied both ways until either side closes.
pub async fn connect_port(
    State(svc): Svc,
    Path((reference, guest_port)): Path<(String, u16)>,
    mut req: Request,
) -> ApiResult<Response> {
    if !asks_for_tcp(&req) {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            "this endpoint upgrades the connection to a TCP stream, and the request does not ask for that",
            "send `Connection: upgrade` and `Upgrade: tcp` (over HTTP/1.1)",
        ));
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let mut guest = svc.connect_port(&reference, guest_port).await?;
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut guest).await {
                    tracing::debug!("connection to guest port {guest_port} ended: {e}");
                }
            }
            Err(e) => tracing::debug!("upgrading a connection to guest port {guest_port} failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "tcp")
        .body(Body::empty())
        .expect("a 101 with two static headers is a valid response"))
}

/// Whether the request asks to become a TCP stream, and the server can hand its connection over
/// (HTTP/1.1: the upgrade extension is there).
fn asks_for_tcp(req: &Request) -> bool {
    let lists = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    lists(header::CONNECTION, "upgrade")
        && lists(header::UPGRADE, "tcp")
        && req.extensions().get::<hyper::upgrade::OnUpgrade>().is_some()
}
