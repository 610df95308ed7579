//! Requests for the sandbox's other ports (`Sandbox.get_host(port)`, `E2b-Sandbox-Port`): an
//! HTTP/1 reverse proxy over a connection the daemon opens to the guest port. No host port is
//! opened: the only way in is this listener, behind the sandbox's tokens.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use crate::error::json_error;
use crate::{Front, Sandbox};

/// How long the guest's server has to answer the request's head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers that belong to one hop (RFC 9110 §7.6.1) or to the front (tokens, routing): they
/// are not passed to the guest.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "x-access-token",
    "e2b-traffic-access-token",
    "e2b-sandbox-id",
    "e2b-sandbox-port",
];

pub(crate) async fn forward(front: &Front, sandbox: &Sandbox, port: u16, req: Request) -> Response {
    let not_open = |why: String| {
        // The SDK recognises a closed port by "port is not open".
        let message = format!("port is not open: nothing answers on port {port} of sandbox {} ({why})", sandbox.id);
        json_error(StatusCode::BAD_GATEWAY, &message)
    };
    let stream = match front.client.connect_port(&sandbox.id, port).await {
        Ok(s) => s,
        Err(e) => return not_open(e.to_string()),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return not_open(e.to_string()),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("proxied connection to a guest port: {e}");
        }
    });
    let (mut parts, body) = req.into_parts();
    // The connection's own `Connection` header may name more hop-by-hop headers.
    let named: Vec<HeaderName> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|h| h.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
        .collect();
    for h in named {
        parts.headers.remove(h);
    }
    for h in DROPPED {
        parts.headers.remove(*h);
    }
    // The guest sees a plain origin-form request for the host it was asked for.
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    parts.uri = match path.parse() {
        Ok(u) => u,
        Err(_) => return json_error(StatusCode::BAD_REQUEST, "the request's path is not valid"),
    };
    let req = hyper::Request::from_parts(parts, body);
    match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(req)).await {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            for h in DROPPED {
                parts.headers.remove(*h);
            }
            Response::from_parts(parts, Body::new(body)).into_response()
        }
        Ok(Err(e)) => not_open(e.to_string()),
        Err(_) => json_error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("the server on port {port} of sandbox {} did not answer in {RESPONSE_TIMEOUT:?}", sandbox.id),
        ),
    }
}
