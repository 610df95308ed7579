//! Typed client of the moat daemon's REST API over its unix socket, over TCP or TLS with a bearer
//! token (see [`Endpoint`]), or in memory for a front the daemon serves itself. The CLI, the MCP server and the tests all use it, so there is one way to
//! talk to sandboxes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use moat_api::{
    ApiError, BuildImage, ChangeAllowlist, CreateSandbox, ErrorCode, Event, ExecClientMessage, ExecServerMessage,
    ExecStart, Health, ImageInfo, ImageProgress, JobInfo, KillProcess, LifecycleEntry, LogSource, NetSpec, PortForward,
    ProcessStarted, PullImage, Reclaimed, RenewLease, SandboxInfo, StartProcess, STDERR_TAG, STDOUT_TAG,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the moat daemon at {path}")]
    Connect { path: String, source: std::io::Error },
    /// A TCP or HTTPS daemon's address could not be connected to.
    #[error("cannot reach the moat daemon at {addr}")]
    Unreachable { addr: String, source: std::io::Error },
    #[error("no connection to the moat daemon at {addr} within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("the TLS handshake with the moat daemon at {addr} failed")]
    Tls { addr: String, source: std::io::Error },
    #[error("cannot use {} as the CA of the daemon's certificate: {reason}", path.display())]
    TlsCa { path: PathBuf, reason: String },
    #[error("{given:?} is not a daemon address: {reason}")]
    Endpoint { given: String, reason: &'static str },
    /// A TCP daemon refused the bearer token (or its absence).
    #[error("the moat daemon at {addr} refused the request: {}", if *sent { "wrong token" } else { "no token" })]
    Unauthorized { addr: String, sent: bool },
    /// The daemon answered with an error; its hint is the daemon's.
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error("talking to the moat daemon failed: {0}")]
    Transport(String),
}

impl moat_hint::Hint for ClientError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            ClientError::Connect { .. } => Some("start it with `moat serve` (the CLI starts one on its own)".into()),
            ClientError::Unreachable { .. } | ClientError::Timeout { .. } => Some(
                "check the address (MOAT_HOST or --host) and that the daemon there runs `moat serve --tcp ADDR`".into(),
            ),
            ClientError::Tls { .. } => Some(
                "a daemon with a self-signed certificate needs it (or its CA) given with --tls-ca FILE (MOAT_TLS_CA); \
                 the address's host must be a name or address the certificate is for"
                    .into(),
            ),
            ClientError::TlsCa { .. } => Some(
                "give a PEM file of the certificate the daemon's --tls-cert is signed by \
                 (for a self-signed one, that certificate itself)"
                    .into(),
            ),
            ClientError::Endpoint { .. } => {
                Some("write tcp://HOST:PORT, https://HOST:PORT or unix:///PATH/moat.sock".into())
            }
            ClientError::Unauthorized { .. } => Some(
                "give the daemon's token (the file $MOAT_HOME/token on its host) in MOAT_TOKEN, or its file with \
                 --token-file FILE (MOAT_TOKEN_FILE)"
                    .into(),
            ),
            ClientError::Api(e) => (!e.hint.is_empty()).then(|| e.hint.clone().into()),
            ClientError::Transport(_) => Some("the daemon may have stopped; see $MOAT_HOME/daemon.log".into()),
        }
    }
}

impl ClientError {
    /// The API error code, when the daemon gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

pub(crate) fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// Escape a path segment (sandbox references are validated by the daemon; this only keeps `/`
/// and friends from changing the route).
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Image names may hold `/` (registry paths); each part is escaped on its own.
fn image_path(name: &str) -> String {
    name.split('/').map(segment).collect::<Vec<_>>().join("/")
}

/// Read an NDJSON [`ImageProgress`] stream to its end.
async fn follow_progress(
    status: StatusCode,
    incoming: hyper::body::Incoming,
    mut progress: impl FnMut(ImageProgress),
) -> Result<ImageInfo, ClientError> {
    let mut body = http_body_util::BodyStream::new(incoming);
    if !status.is_success() {
        let mut bytes = Vec::new();
        while let Some(Ok(f)) = body.next().await {
            if let Ok(d) = f.into_data() {
                bytes.extend_from_slice(&d);
            }
        }
        return Err(match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => ClientError::Api(e),
            Err(_) => transport(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
        });
    }
    let mut buf = Vec::new();
    while let Some(frame) = body.next().await {
        let Ok(data) = frame.map_err(transport)?.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            match serde_json::from_slice::<ImageProgress>(&line).map_err(transport)? {
                ImageProgress::Done { image } => return Ok(image),
                ImageProgress::Error { error } => return Err(ClientError::Api(error)),
                step => progress(step),
            }
        }
    }
    Err(transport("the daemon ended the operation without a result"))
}

mod connect;
pub mod copy;
mod files;
mod snapshots;
pub use connect::Endpoint;
pub use copy::CopyError;
pub use files::Download;

/// A byte stream to the daemon's API.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Opens a connection to a daemon in this process (see [`Client::in_process`]).
pub type Connector = Arc<dyn Fn() -> Box<dyn Io> + Send + Sync>;

/// A client of one daemon.
#[derive(Clone)]
pub struct Client {
    target: Target,
    /// The bearer token of a TCP daemon.
    token: Option<Arc<str>>,
    /// How long opening a connection may take (see [`Client::with_connect_timeout`]).
    connect_timeout: Option<Duration>,
}

#[derive(Clone)]
enum Target {
    Socket(PathBuf),
    InProcess(Connector),
    Tcp { addr: String },
    Tls { addr: String, name: rustls::pki_types::ServerName<'static>, tls: tokio_rustls::TlsConnector },
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Client").field("endpoint", &self.endpoint()).finish()
    }
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Client {
        Client { target: Target::Socket(socket.to_path_buf()), token: None, connect_timeout: None }
    }

    /// A client of a daemon in this process: `connect` opens an in-memory connection that the
    /// daemon serves with the same router as its socket (`moat_daemon::Door`), so a front mounted
    /// in the daemon behaves exactly like one outside it, without going through a socket.
    pub fn in_process(connect: Connector) -> Client {
        Client { target: Target::InProcess(connect), token: None, connect_timeout: None }
    }

    /// One request; returns the status and the response body stream.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, hyper::body::Incoming), ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(transport)?;
        tokio::spawn(conn);
        let mut req = self.request(method, path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(transport)?;
        let resp = sender.send_request(req).await.map_err(transport)?;
        if let Some(refused) = self.refused(resp.status()) {
            return Err(refused);
        }
        Ok((resp.status(), resp.into_body()))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request types always serialize"));
        let (status, incoming) = self.send(method, path, body).await?;
        let bytes = incoming.collect().await.map_err(transport)?.to_bytes();
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api(e),
                Err(_) => ClientError::Transport(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| transport(format!("unexpected response: {e}")))
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call(Method::GET, "/v1/health", None::<&()>).await
    }

    pub async fn create(&self, req: &CreateSandbox) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, "/v1/sandboxes", Some(req)).await
    }

    pub async fn list(&self) -> Result<Vec<SandboxInfo>, ClientError> {
        self.call(Method::GET, "/v1/sandboxes", None::<&()>).await
    }

    /// The sandboxes that carry every one of `labels` (`KEY`, `VALUE` pairs), oldest first.
    pub async fn list_labeled(&self, labels: &[(String, String)]) -> Result<Vec<SandboxInfo>, ClientError> {
        let selectors: Vec<moat_api::LabelSelector> =
            labels.iter().map(|(k, v)| moat_api::LabelSelector { key: k.clone(), value: Some(v.clone()) }).collect();
        self.list_selected(&selectors).await
    }

    /// The sandboxes that match every selector (a label with a given value, or with any value).
    pub async fn list_selected(&self, selectors: &[moat_api::LabelSelector]) -> Result<Vec<SandboxInfo>, ClientError> {
        let query: Vec<String> = selectors.iter().map(|s| format!("label={}", segment(&s.to_string()))).collect();
        let url =
            if query.is_empty() { "/v1/sandboxes".to_string() } else { format!("/v1/sandboxes?{}", query.join("&")) };
        self.call(Method::GET, &url, None::<&()>).await
    }

    pub async fn inspect(&self, reference: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/sandboxes/{}", segment(reference)), None::<&()>).await
    }

    pub async fn lifecycle(&self, reference: &str) -> Result<Vec<LifecycleEntry>, ClientError> {
        self.call(Method::GET, &format!("/v1/sandboxes/{}/lifecycle", segment(reference)), None::<&()>).await
    }

    pub async fn stop(&self, reference: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/stop", segment(reference)), None::<&()>).await
    }

    pub async fn start(&self, reference: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/start", segment(reference)), None::<&()>).await
    }

    pub async fn remove(&self, reference: &str, force: bool) -> Result<SandboxInfo, ClientError> {
        self.call(Method::DELETE, &format!("/v1/sandboxes/{}?force={force}", segment(reference)), None::<&()>).await
    }

    pub async fn renew(&self, reference: &str, ttl_secs: u64) -> Result<SandboxInfo, ClientError> {
        let body = RenewLease { ttl_secs };
        self.call(Method::POST, &format!("/v1/sandboxes/{}/lease", segment(reference)), Some(&body)).await
    }

    /// Every volume, by name.
    pub async fn volumes(&self) -> Result<Vec<moat_api::VolumeInfo>, ClientError> {
        self.call(Method::GET, "/v1/volumes", None::<&()>).await
    }

    /// A volume by name, id or unique id prefix.
    pub async fn volume(&self, reference: &str) -> Result<moat_api::VolumeInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/volumes/{}", segment(reference)), None::<&()>).await
    }

    pub async fn create_volume(&self, req: &moat_api::CreateVolume) -> Result<moat_api::VolumeInfo, ClientError> {
        self.call(Method::POST, "/v1/volumes", Some(req)).await
    }

    /// Remove a volume and its data; `force` removes one that sandboxes at rest still mount.
    pub async fn remove_volume(&self, reference: &str, force: bool) -> Result<moat_api::VolumeInfo, ClientError> {
        self.call(Method::DELETE, &format!("/v1/volumes/{}?force={force}", segment(reference)), None::<&()>).await
    }

    /// A sandbox's network (secret values left out).
    pub async fn net(&self, reference: &str) -> Result<NetSpec, ClientError> {
        self.call(Method::GET, &format!("/v1/sandboxes/{}/net", segment(reference)), None::<&()>).await
    }

    pub async fn change_allowlist(&self, reference: &str, change: &ChangeAllowlist) -> Result<NetSpec, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/net/allow", segment(reference)), Some(change)).await
    }

    pub async fn ports(&self, reference: &str) -> Result<Vec<PortForward>, ClientError> {
        self.call(Method::GET, &format!("/v1/sandboxes/{}/ports", segment(reference)), None::<&()>).await
    }

    /// Forward a host port to a running sandbox; the answer has the port picked for host port 0.
    pub async fn add_port(&self, reference: &str, port: &PortForward) -> Result<PortForward, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/ports", segment(reference)), Some(port)).await
    }

    pub async fn remove_port(&self, reference: &str, host_port: u16) -> Result<NetSpec, ClientError> {
        self.call(Method::DELETE, &format!("/v1/sandboxes/{}/ports/{host_port}", segment(reference)), None::<&()>).await
    }

    /// One TCP connection to `guest_port` in a running sandbox, carried over a connection to the
    /// daemon (no port opens on the host). Errors (not running, no network, port not open) come
    /// back here; the stream ends when either side closes.
    pub async fn connect_port(&self, reference: &str, guest_port: u16) -> Result<Box<dyn Io>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(transport)?;
        // The connection task must run for the upgrade to complete; it ends with it.
        tokio::spawn(conn.with_upgrades());
        let req = self
            .request(Method::GET, &format!("/v1/sandboxes/{}/ports/{guest_port}/connect", segment(reference)))
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, "tcp")
            .body(Full::new(Bytes::new()))
            .map_err(transport)?;
        let resp = sender.send_request(req).await.map_err(transport)?;
        let status = resp.status();
        if let Some(refused) = self.refused(status) {
            return Err(refused);
        }
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp.into_body().collect().await.map_err(transport)?.to_bytes();
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api(e),
                Err(_) => transport(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(transport)?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }

    pub async fn prune(&self) -> Result<Reclaimed, ClientError> {
        self.call(Method::POST, "/v1/prune", None::<&()>).await
    }

    pub async fn gc(&self) -> Result<Reclaimed, ClientError> {
        self.call(Method::POST, "/v1/gc", None::<&()>).await
    }

    /// Every warm pool and how full it is.
    pub async fn pools(&self) -> Result<Vec<moat_api::PoolInfo>, ClientError> {
        self.call(Method::GET, "/v1/pools", None::<&()>).await
    }

    /// Set a warm pool's size (0 removes it).
    pub async fn set_pool(&self, req: &moat_api::SetPool) -> Result<moat_api::PoolInfo, ClientError> {
        self.call(Method::PUT, "/v1/pools", Some(req)).await
    }

    /// Disk use by kind, and what prune and gc would free (`moat df`).
    pub async fn df(&self) -> Result<moat_api::DiskUsage, ClientError> {
        self.call(Method::GET, "/v1/df", None::<&()>).await
    }

    /// A support bundle (a gzipped tar, secrets redacted by the daemon).
    pub async fn bundle(&self, req: &moat_api::CreateBundle) -> Result<Bytes, ClientError> {
        let body = serde_json::to_vec(req).expect("CreateBundle serializes");
        let (status, incoming) = self.send(Method::POST, "/v1/bundle", Some(body)).await?;
        let bytes = incoming.collect().await.map_err(transport)?.to_bytes();
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api(e),
                Err(_) => transport(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
            });
        }
        Ok(bytes)
    }

    /// A fresh, consistent copy of the daemon's state database (an SQLite file), as it streams.
    pub async fn backup_state(&self) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError> {
        self.stream("/v1/state/backup").await
    }

    pub async fn images(&self) -> Result<Vec<ImageInfo>, ClientError> {
        self.call(Method::GET, "/v1/images", None::<&()>).await
    }

    pub async fn image(&self, name: &str) -> Result<ImageInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/images/{}", image_path(name)), None::<&()>).await
    }

    pub async fn remove_image(&self, name: &str) -> Result<ImageInfo, ClientError> {
        self.call(Method::DELETE, &format!("/v1/images/{}", image_path(name)), None::<&()>).await
    }

    pub async fn image_gc(&self) -> Result<Reclaimed, ClientError> {
        self.call(Method::POST, "/v1/images/gc", None::<&()>).await
    }

    /// Pull an image from a registry; `progress` sees each step and layer. Returns the image.
    pub async fn pull_image(
        &self,
        req: &PullImage,
        progress: impl FnMut(ImageProgress),
    ) -> Result<ImageInfo, ClientError> {
        let body = serde_json::to_vec(req).expect("PullImage serializes");
        let (status, incoming) = self.send(Method::POST, "/v1/images/pull", Some(body)).await?;
        follow_progress(status, incoming, progress).await
    }

    /// Build an image from Debian packages; `progress` sees each step. Returns the image.
    pub async fn build_image(
        &self,
        req: &BuildImage,
        progress: impl FnMut(ImageProgress),
    ) -> Result<ImageInfo, ClientError> {
        let body = serde_json::to_vec(req).expect("BuildImage serializes");
        let (status, incoming) = self.send(Method::POST, "/v1/images/build", Some(body)).await?;
        follow_progress(status, incoming, progress).await
    }

    /// Import a `docker save` or OCI archive read from `archive`, streamed to the daemon.
    pub async fn import_image(
        &self,
        archive: impl tokio::io::AsyncRead + Send + Sync + 'static,
        name: Option<&str>,
        progress: impl FnMut(ImageProgress),
    ) -> Result<ImageInfo, ClientError> {
        let path = match name {
            Some(n) => format!("/v1/images/import?name={}", segment(n)),
            None => "/v1/images/import".to_string(),
        };
        let (status, incoming) = self.upload(Method::POST, &path, "application/x-tar", archive).await?;
        follow_progress(status, incoming, progress).await
    }

    /// One request whose body streams from `body`.
    async fn upload(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: impl tokio::io::AsyncRead + Send + Sync + 'static,
    ) -> Result<(StatusCode, hyper::body::Incoming), ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(transport)?;
        tokio::spawn(conn);
        let frames =
            tokio_util::io::ReaderStream::with_capacity(body, 64 << 10).map(|r| r.map(hyper::body::Frame::data));
        let req = self
            .request(method, path)
            .header("content-type", content_type)
            .body(http_body_util::StreamBody::new(frames))
            .map_err(transport)?;
        let resp = sender.send_request(req).await.map_err(transport)?;
        if let Some(refused) = self.refused(resp.status()) {
            return Err(refused);
        }
        Ok((resp.status(), resp.into_body()))
    }

    /// Raw request for tests of bad input: returns the status and body text.
    pub async fn raw(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, String), ClientError> {
        let method = Method::from_bytes(method.as_bytes()).map_err(transport)?;
        let (status, incoming) = self.send(method, path, Some(body)).await?;
        let bytes = incoming.collect().await.map_err(transport)?.to_bytes();
        Ok((status.as_u16(), String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// A log as a stream of chunks; with `follow` it ends when the sandbox stops.
    pub async fn logs(
        &self,
        reference: &str,
        source: LogSource,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError> {
        let source = match source {
            LogSource::Console => "console",
            LogSource::Qemu => "qemu",
        };
        let path = format!("/v1/sandboxes/{}/logs?source={source}&follow={follow}", segment(reference));
        self.stream(&path).await
    }

    /// A log as a stream of chunks, with every option of the query (tail, since).
    pub async fn logs_query(
        &self,
        reference: &str,
        q: &moat_api::LogsQuery,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError> {
        let query = serde_urlencoded::to_string(q).map_err(transport)?;
        self.stream(&format!("/v1/sandboxes/{}/logs?{query}", segment(reference))).await
    }

    /// Events (NDJSON lines) after `since`; with `follow` the stream stays open.
    pub async fn events(
        &self,
        since: i64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Event, ClientError>>, ClientError> {
        self.events_query(&moat_api::EventsQuery { since, follow, ..Default::default() }).await
    }

    /// Events (NDJSON lines) that match the query's filters.
    pub async fn events_query(
        &self,
        q: &moat_api::EventsQuery,
    ) -> Result<impl Stream<Item = Result<Event, ClientError>>, ClientError> {
        let query = serde_urlencoded::to_string(q).map_err(transport)?;
        let chunks = self.stream(&format!("/v1/events?{query}")).await?;
        let mut buf = Vec::new();
        Ok(chunks.flat_map(move |chunk| {
            let mut out = Vec::new();
            match chunk {
                Ok(c) => {
                    buf.extend_from_slice(&c);
                    while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        out.push(serde_json::from_slice::<Event>(&line).map_err(transport));
                    }
                }
                Err(e) => out.push(Err(e)),
            }
            futures_util::stream::iter(out)
        }))
    }

    async fn stream(&self, path: &str) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError> {
        let (status, incoming) = self.send(Method::GET, path, None).await?;
        if !status.is_success() {
            let bytes = incoming.collect().await.map_err(transport)?.to_bytes();
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api(e),
                Err(_) => ClientError::Transport(format!("HTTP {status}")),
            });
        }
        Ok(http_body_util::BodyStream::new(incoming).filter_map(|frame| async move {
            match frame {
                Ok(f) => f.into_data().ok().filter(|d| !d.is_empty()).map(Ok),
                Err(e) => Some(Err(transport(e))),
            }
        }))
    }

    /// Start a process in a running sandbox. Errors before the start (unknown sandbox, stopped
    /// sandbox, missing program) come back here.
    pub async fn exec(&self, reference: &str, start: &ExecStart) -> Result<ExecSession, ClientError> {
        // A plain GET first turns "no such sandbox" into an API error instead of a failed upgrade.
        let info = self.inspect(reference).await?;
        let mut ws = self.websocket(&format!("/v1/sandboxes/{}/exec", segment(&info.id))).await?;
        let text = serde_json::to_string(start).expect("ExecStart always serializes");
        ws.send(WsMessage::Text(text.into())).await.map_err(transport)?;
        let mut session = ExecSession { ws, pid: 0 };
        match session.next().await? {
            ExecOutput::Started(pid) => {
                session.pid = pid;
                Ok(session)
            }
            ExecOutput::Failed(e) => Err(ClientError::Api(e)),
            other => Err(transport(format!("expected the start of the process, got {other:?}"))),
        }
    }

    /// Start a background process; it outlives this call (see [`Client::attach`]).
    pub async fn start_process(&self, reference: &str, req: &StartProcess) -> Result<ProcessStarted, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/processes", segment(reference)), Some(req)).await
    }

    /// The sandbox's background processes, running and ended.
    pub async fn processes(&self, reference: &str) -> Result<Vec<JobInfo>, ClientError> {
        self.call(Method::GET, &format!("/v1/sandboxes/{}/processes", segment(reference)), None::<&()>).await
    }

    /// Signal a background process's group.
    pub async fn kill_process(&self, reference: &str, pid: u32, signal: i32) -> Result<(), ClientError> {
        let url = format!("/v1/sandboxes/{}/processes/{pid}/kill", segment(reference));
        let _: serde_json::Value = self.call(Method::POST, &url, Some(&KillProcess { signal })).await?;
        Ok(())
    }

    /// A background process's output (what it printed so far when `replay`, then live) and its
    /// exit, as an exec session; dropping it leaves the process running.
    pub async fn attach(&self, reference: &str, pid: u32, replay: bool) -> Result<ExecSession, ClientError> {
        let info = self.inspect(reference).await?;
        let url = format!("/v1/sandboxes/{}/processes/{pid}/attach?replay={replay}", segment(&info.id));
        Ok(ExecSession { ws: self.websocket(&url).await?, pid })
    }

    async fn websocket(&self, path: &str) -> Result<Ws, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = self.connect().await?;
        let mut req = format!("ws://{}{path}", self.authority()).into_client_request().map_err(transport)?;
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}").parse().map_err(transport)?;
            req.headers_mut().insert(hyper::header::AUTHORIZATION, value);
        }
        let (ws, _) = tokio_tungstenite::client_async(req, stream).await.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) if self.refused(resp.status()).is_some() => {
                self.refused(resp.status()).expect("checked by the guard")
            }
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let body = resp.body().clone().unwrap_or_default();
                match serde_json::from_slice::<ApiError>(&body) {
                    Ok(e) => ClientError::Api(e),
                    Err(_) => transport(format!("HTTP {}", resp.status())),
                }
            }
            e => transport(e),
        })?;
        Ok(ws)
    }
}

/// What an exec session delivers.
#[derive(Debug, PartialEq)]
pub enum ExecOutput {
    Started(u32),
    Stdout(Bytes),
    Stderr(Bytes),
    Exit { code: Option<i32>, signal: Option<i32>, timed_out: bool },
    Failed(ApiError),
}

impl ExecOutput {
    /// The exit code a shell would report: the code, or 128 + signal.
    pub fn shell_code(code: Option<i32>, signal: Option<i32>) -> i32 {
        code.unwrap_or_else(|| 128 + signal.unwrap_or(0))
    }
}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// A running process: read its output with [`ExecSession::next`]; send stdin and signals through
/// an [`ExecInput`] from [`ExecSession::split`].
pub struct ExecSession {
    ws: Ws,
    pid: u32,
}

/// The input half of an exec session.
pub struct ExecInput {
    sink: futures_util::stream::SplitSink<Ws, WsMessage>,
}

/// The output half of an exec session.
pub struct ExecOutputs {
    stream: futures_util::stream::SplitStream<Ws>,
}

fn decode(
    msg: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
) -> Option<Result<ExecOutput, ClientError>> {
    let msg = match msg {
        None => return Some(Err(transport("the daemon closed the exec session without an exit status"))),
        Some(Err(e)) => return Some(Err(transport(e))),
        Some(Ok(m)) => m,
    };
    match msg {
        WsMessage::Binary(b) if !b.is_empty() => {
            let data = b.slice(1..);
            match b[0] {
                STDOUT_TAG => Some(Ok(ExecOutput::Stdout(data))),
                STDERR_TAG => Some(Ok(ExecOutput::Stderr(data))),
                _ => None,
            }
        }
        WsMessage::Text(t) => match serde_json::from_str::<ExecServerMessage>(&t) {
            Ok(ExecServerMessage::Started { pid }) => Some(Ok(ExecOutput::Started(pid))),
            Ok(ExecServerMessage::Exit { code, signal, timed_out }) => {
                Some(Ok(ExecOutput::Exit { code, signal, timed_out }))
            }
            Ok(ExecServerMessage::Error { error }) => Some(Ok(ExecOutput::Failed(error))),
            Err(e) => Some(Err(transport(format!("bad message from the daemon: {e}")))),
        },
        WsMessage::Close(_) => Some(Err(transport("the daemon closed the exec session without an exit status"))),
        _ => None,
    }
}

impl ExecSession {
    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next piece of output, the exit, or a failure.
    pub async fn next(&mut self) -> Result<ExecOutput, ClientError> {
        loop {
            if let Some(r) = decode(self.ws.next().await) {
                return r;
            }
        }
    }

    /// Separate input and output, to feed stdin while reading output.
    pub fn split(self) -> (ExecInput, ExecOutputs) {
        let (sink, stream) = self.ws.split();
        (ExecInput { sink }, ExecOutputs { stream })
    }

    /// Read to the end: (stdout, stderr, exit code as a shell reports it).
    pub async fn collect(mut self) -> Result<(Vec<u8>, Vec<u8>, i32), ClientError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.next().await? {
                ExecOutput::Stdout(d) => out.extend_from_slice(&d),
                ExecOutput::Stderr(d) => err.extend_from_slice(&d),
                ExecOutput::Exit { code, signal, .. } => return Ok((out, err, ExecOutput::shell_code(code, signal))),
                ExecOutput::Failed(e) => return Err(ClientError::Api(e)),
                ExecOutput::Started(_) => {}
            }
        }
    }
}

impl ExecOutputs {
    pub async fn next(&mut self) -> Result<ExecOutput, ClientError> {
        loop {
            if let Some(r) = decode(self.stream.next().await) {
                return r;
            }
        }
    }
}

impl ExecInput {
    pub async fn stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.sink.send(WsMessage::Binary(Bytes::copy_from_slice(data))).await.map_err(transport)
    }

    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.control(&ExecClientMessage::StdinEof).await
    }

    pub async fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.control(&ExecClientMessage::Signal { signal }).await
    }

    /// The terminal of an exec started with `tty` changed size.
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.control(&ExecClientMessage::Resize { rows, cols }).await
    }

    async fn control(&mut self, m: &ExecClientMessage) -> Result<(), ClientError> {
        let text = serde_json::to_string(m).expect("control messages always serialize");
        self.sink.send(WsMessage::Text(text.into())).await.map_err(transport)
    }
}
