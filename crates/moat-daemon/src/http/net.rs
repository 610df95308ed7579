//! A sandbox's network: its spec, live allowlist changes and port forwards.

use axum::extract::{Path, State};
use axum::Json;

use super::extract::{ApiResult, JsonBody, Svc};

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
