//! The daemon's API for a front it serves itself (MCP today): an in-memory connection served by
//! the same router as the unix socket, so the front calls the service in this process and still
//! sees exactly what a client outside sees (the same routes, validation, errors and streams).

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// How much a connection buffers in each direction before the writer waits.
const PIPE_BYTES: usize = 256 << 10;

/// Opens in-memory connections to the daemon's API; cheap to clone.
#[derive(Clone)]
pub struct Door {
    app: Router,
}

impl Door {
    pub(crate) fn new(app: Router) -> Door {
        Door { app }
    }

    /// A new connection: HTTP/1 (with upgrades, for the exec WebSocket) over an in-memory pipe.
    /// The connection is served until the returned end is dropped.
    pub fn connect(&self) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        let app = self.app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                tower_service::Service::call(&mut app.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), service);
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("in-process API connection: {e}");
            }
        });
        client
    }
}
