//! Secrets that never enter the VM. The guest sees a placeholder; HTTPS to a host a secret is bound
//! to is terminated here with a leaf from the sandbox's own CA (installed in the guest's trust
//! store), the placeholder is replaced by the real value in the query and header values (and the
//! body, for a secret that asks for it), and the request goes on over a fresh TLS connection that
//! checks the real server's certificate. Everything that comes back has the value, and its common
//! encodings, replaced by the placeholder again, so a server that echoes what it got (an error
//! page, a redirect, a reflected `Origin`) cannot hand the value to the guest.

mod ca;
mod forms;
mod rewrite;

pub use ca::Ca;

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{
    HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST, IF_RANGE, RANGE,
    SEC_WEBSOCKET_EXTENSIONS,
};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use rewrite::{RewriteStream, Rewriter, Rewritten};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A guest that opens a connection and never finishes a request head is cut off after this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's default (~400 KiB) would let one request head hold that much per connection.
const MAX_BUF_SIZE: usize = 64 * 1024;
const ALPN_HTTP1: &[u8] = b"http/1.1";
/// A request body a secret goes into is read whole, so it keeps a `Content-Length`, when it
/// declares at most this much (a form posting a client secret); a longer one is sent chunked.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// What an upgraded connection (a WebSocket) shows instead of a value: as long as the value,
/// since its frames say how long they are.
const IN_PLACE_MASK: u8 = b'*';

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the sandbox CA failed: {0}")]
    CaGenerate(rcgen::Error),
    #[error("the stored sandbox CA is unusable: {what}: {reason}")]
    CaLoad { what: &'static str, reason: rcgen::Error },
    #[error("the stored sandbox CA key does not sign certificates its CA certificate verifies ({0}); store the key that belongs to the certificate")]
    CaMismatch(rustls::Error),
    #[error("issuing a certificate for {host} failed: {reason}")]
    Leaf { host: String, reason: rcgen::Error },
    #[error("{0:?} is not a host name a TLS certificate can be made for")]
    InvalidHost(String),
    #[error("building the TLS configuration failed: {0}")]
    Config(rustls::Error),
    #[error("TLS handshake with the guest for {host} failed: {reason}")]
    GuestHandshake { host: String, reason: io::Error },
    #[error("TLS handshake with {host} failed: {reason}")]
    UpstreamHandshake { host: String, reason: io::Error },
    #[error("TLS handshake for {host} did not finish within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout { host: String },
    #[error("HTTP from the guest to {host} failed: {reason}")]
    Guest { host: String, reason: hyper::Error },
    #[error("HTTP to {host} failed: {reason}")]
    Upstream { host: String, reason: hyper::Error },
    #[error("the relay task for {host} stopped: {reason}")]
    Task { host: String, reason: tokio::task::JoinError },
    #[error("relaying the upgraded connection (e.g. a WebSocket) with {host} failed: {reason}")]
    Upgraded { host: String, reason: io::Error },
    #[error("preparing the search for the secrets' values failed: {0}; bind fewer or shorter secrets to this host")]
    Rewriter(aho_corasick::BuildError),
}

/// The roots upstream servers are checked against: the host's trust store via
/// rustls-native-certs, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`. Loaded once.
pub fn upstream_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::warn!("loading the host's trusted certificates: {e}");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
            if ignored > 0 {
                tracing::warn!("ignored {ignored} unparsable certificates in the host's trust store");
            }
            if added == 0 {
                tracing::warn!(
                    "the host trusts no certificates, so no HTTPS request carrying a secret can be sent; \
                     hint: install ca-certificates or set SSL_CERT_FILE"
                );
            }
            Arc::new(roots)
        })
        .clone()
}

/// One secret: where `placeholder` appears in a request to a host it is bound to, in a header
/// value or the query (and the body, with `in_body`), `value` goes instead; wherever `value`
/// appears in what comes back, `placeholder` does.
#[derive(Clone)]
pub struct Secret {
    pub placeholder: String,
    pub value: String,
    /// Also replace the placeholder in request bodies. Off by default: a body is what servers
    /// store and show again (a chat message, a stored object, an echoed parameter).
    pub in_body: bool,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("placeholder", &self.placeholder)
            .field("value", &"<redacted>")
            .field("in_body", &self.in_body)
            .finish()
    }
}

/// What one intercepted connection rewrites, made once from its secrets.
struct Rules {
    /// Placeholder to value, in request header values.
    headers: Arc<Rewriter>,
    /// Placeholder to percent-encoded value, in the query.
    query: Arc<Rewriter>,
    /// Placeholder to value in the bodies of secrets that ask for it; percent-encoded in forms.
    body: Arc<Rewriter>,
    form_body: Arc<Rewriter>,
    /// Every form of every value back to its placeholder, in responses.
    reflected: Arc<Rewriter>,
    /// The same with replacements as long as what they replace, for upgraded connections.
    reflected_in_place: Arc<Rewriter>,
}

impl Rules {
    fn new(secrets: &[Secret]) -> Result<Rules, TlsError> {
        let build = |rules: Vec<(Vec<u8>, Bytes)>| Rewriter::new(rules).map(Arc::new).map_err(TlsError::Rewriter);
        let to_value = |s: &Secret| (s.placeholder.as_bytes().to_vec(), Bytes::from(s.value.clone()));
        let to_encoded =
            |s: &Secret| (s.placeholder.as_bytes().to_vec(), Bytes::from(forms::percent_encode(s.value.as_bytes())));
        let in_body = || secrets.iter().filter(|s| s.in_body);
        let reflections = || {
            secrets.iter().flat_map(|s| forms::reflections(s.value.as_bytes()).into_iter().map(move |form| (s, form)))
        };
        Ok(Rules {
            headers: build(secrets.iter().map(to_value).collect())?,
            query: build(secrets.iter().map(to_encoded).collect())?,
            body: build(in_body().map(to_value).collect())?,
            form_body: build(in_body().map(to_encoded).collect())?,
            reflected: build(reflections().map(|(s, form)| (form, Bytes::from(s.placeholder.clone()))).collect())?,
            reflected_in_place: build(
                reflections().map(|(_, form)| (form.clone(), Bytes::from(vec![IN_PLACE_MASK; form.len()]))).collect(),
            )?,
        })
    }
}

/// Intercepts one guest connection to `host`: TLS with the guest using a leaf from `ca`, TLS to
/// `upstream` checked against `roots`, then HTTP/1.1 requests relayed in order, each with the
/// placeholders of `secrets` replaced in its query (percent-encoded) and header values, and in
/// its body for secrets with `in_body`. Never in the path or the Host: a path is what error
/// pages and redirects echo. Responses, upgraded connections included, come back with every
/// value (as is, percent-encoded, JSON-escaped, or in base64) replaced by its placeholder;
/// compressed ones cannot be searched, so moat asks for `identity` and refuses any other.
/// Requests naming another host (Host header or absolute URI) are refused with 421 so a shared
/// front end cannot route a secret elsewhere. Returns when either side closes. `secrets` must be
/// only those bound to `host`.
pub async fn intercept<G>(
    guest: G,
    host: &str,
    upstream: TcpStream,
    ca: &Ca,
    roots: Arc<RootCertStore>,
    secrets: &[Secret],
) -> Result<(), TlsError>
where
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let host = normalize_host(host);
    let server_name = ServerName::try_from(host.clone()).map_err(|_| TlsError::InvalidHost(host.clone()))?;
    let rules = Rules::new(secrets)?;
    let acceptor = TlsAcceptor::from(ca.server_config(&host)?);
    let mut client_config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let connector = TlsConnector::from(Arc::new(client_config));

    let handshakes = async {
        tokio::try_join!(
            async {
                acceptor
                    .accept(guest)
                    .await
                    .map_err(|source| TlsError::GuestHandshake { host: host.clone(), reason: source })
            },
            async {
                connector
                    .connect(server_name, upstream)
                    .await
                    .map_err(|source| TlsError::UpstreamHandshake { host: host.clone(), reason: source })
            },
        )
    };
    let (guest, upstream) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes)
        .await
        .map_err(|_| TlsError::HandshakeTimeout { host: host.clone() })??;

    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(upstream))
        .await
        .map_err(|source| TlsError::Upstream { host: host.clone(), reason: source })?;
    let mut upstream_conn = Task(tokio::spawn(connection.with_upgrades()));

    let relay = Arc::new(Relay {
        host: host.clone(),
        rules,
        upstream: tokio::sync::Mutex::new(sender),
        upgrade_requested: AtomicBool::new(false),
        upgraded: Mutex::new(None),
    });
    let service = {
        let relay = relay.clone();
        hyper::service::service_fn(move |req| {
            let relay = relay.clone();
            async move { Ok::<_, Infallible>(relay.forward(req).await) }
        })
    };
    let server = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(guest), service)
        .with_upgrades();
    tokio::pin!(server);

    enum First {
        Guest(Result<(), hyper::Error>),
        Upstream(Result<Result<(), hyper::Error>, tokio::task::JoinError>),
    }
    let first = tokio::select! {
        r = server.as_mut() => First::Guest(r),
        r = &mut upstream_conn.0 => First::Upstream(r),
    };
    let guest_error = |source| TlsError::Guest { host: host.clone(), reason: source };
    match first {
        First::Guest(r) => unless_hung_up(r).map_err(guest_error)?,
        First::Upstream(r) => {
            let upstream_result = match r {
                Ok(r) => unless_hung_up(r).map_err(|source| TlsError::Upstream { host: host.clone(), reason: source }),
                Err(source) => Err(TlsError::Task { host: host.clone(), reason: source }),
            };
            // Let the guest finish reading the response in flight, then close; after a 101 the
            // upstream connection ends because it was handed over, not closed.
            if !relay.upgrade_requested.load(Ordering::SeqCst) {
                server.as_mut().graceful_shutdown();
            }
            unless_hung_up(server.as_mut().await).map_err(guest_error)?;
            upstream_result?;
        }
    }
    let tunnel = relay.upgraded.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(mut tunnel) = tunnel {
        match (&mut tunnel.0).await {
            Ok(r) => r?,
            Err(source) => return Err(TlsError::Task { host, reason: source }),
        }
    }
    tracing::debug!(host, "intercepted connection closed");
    Ok(())
}

/// Aborts the task when dropped, so nothing outlives the intercept that started it.
struct Task<T>(JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the guest gets: a response from upstream, or moat's own answer.
type Body = Either<Rewritten<Incoming>, Full<Bytes>>;
/// What upstream gets: the guest's body as it is, with secrets put in as it streams, or read
/// whole with them put in.
type UpstreamBody = Either<Incoming, Either<Rewritten<Incoming>, Full<Bytes>>>;

/// The state shared by the requests of one intercepted connection.
struct Relay {
    host: String,
    rules: Rules,
    upstream: tokio::sync::Mutex<SendRequest<UpstreamBody>>,
    /// Set while a request asking for an upgrade is out, so the upstream connection ending
    /// because it was handed over is not taken for the upstream closing.
    upgrade_requested: AtomicBool,
    /// The byte relay started after a 101 Switching Protocols.
    upgraded: Mutex<Option<Task<Result<(), TlsError>>>>,
}

impl Relay {
    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        tracing::debug!(host = self.host, method = %req.method(), "intercepted request");
        let guest_upgrade = hyper::upgrade::on(&mut req);
        let req = match prepare(req, &self.host, &self.rules) {
            Ok(req) => req,
            Err(refusal) => return refusal.into_response(),
        };
        let (mut parts, body) = req.into_parts();
        let body = match self.request_body(&mut parts.headers, body).await {
            Ok(body) => body,
            Err(refusal) => return refusal.into_response(),
        };
        let req = Request::from_parts(parts, body);
        let asks_upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let mut upstream = self.upstream.lock().await;
        self.upgrade_requested.store(asks_upgrade, Ordering::SeqCst);
        let sent = match upstream.ready().await {
            Ok(()) => upstream.send_request(req).await,
            Err(e) => Err(e),
        };
        drop(upstream);
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(host = self.host, "request to upstream failed: {e}");
                return Refusal(StatusCode::BAD_GATEWAY, format!("moat: the request to {} failed: {e}\n", self.host))
                    .into_response();
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let host = self.host.clone();
            let back = RewriteStream::new(self.rules.reflected_in_place.clone());
            let tunnel = tokio::spawn(async move {
                let upgraded_error =
                    |e: hyper::Error| TlsError::Upgraded { host: host.clone(), reason: io::Error::other(e) };
                let guest = guest_upgrade.await.map_err(upgraded_error)?;
                let upstream = upstream_upgrade.await.map_err(upgraded_error)?;
                match relay_upgraded(TokioIo::new(guest), TokioIo::new(upstream), back).await {
                    Err(e) if !is_hang_up(&e) => Err(TlsError::Upgraded { host, reason: e }),
                    _ => Ok(()),
                }
            });
            *self.upgraded.lock().unwrap_or_else(|e| e.into_inner()) = Some(Task(tunnel));
        }
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            self.upgrade_requested.store(false, Ordering::SeqCst);
        }
        if let Some(coding) = unreadable_coding(&resp) {
            tracing::warn!(host = self.host, "refused a response with content-encoding {coding}");
            return Refusal(
                StatusCode::BAD_GATEWAY,
                format!(
                    "moat: {} answered with content-encoding {coding} although moat asked for identity; a compressed \
                     body cannot be checked for secrets, so it is not passed on\n",
                    self.host
                ),
            )
            .into_response();
        }
        // HTTP/3 would go around this relay over UDP, carrying the bare placeholder.
        resp.headers_mut().remove(hyper::header::ALT_SVC);
        self.rules.reflected.rewrite_headers(resp.headers_mut());
        // hyper writes a reason phrase it got back as it is; the canonical one says the same.
        resp.extensions_mut().remove::<hyper::ext::ReasonPhrase>();
        if !resp.body().is_end_stream() {
            // A value and its placeholder differ in length. A HEAD's Content-Length stays.
            resp.headers_mut().remove(CONTENT_LENGTH);
        }
        let reflected = self.rules.reflected.clone();
        resp.map(|body| Either::Left(Rewritten::new(body, reflected)))
    }

    /// The request body with the secrets that go into bodies put in: read whole, with its
    /// `Content-Length` fixed, when it declares one up to [`MAX_BUFFERED_BODY`]; else streamed
    /// chunked, since its length changes.
    async fn request_body(&self, headers: &mut HeaderMap, body: Incoming) -> Result<UpstreamBody, Refusal> {
        let form = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
        let rules = if form { &self.rules.form_body } else { &self.rules.body };
        if rules.is_empty() || body.is_end_stream() {
            return Ok(Either::Left(body));
        }
        let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n <= MAX_BUFFERED_BODY) {
            let whole = Limited::new(body, MAX_BUFFERED_BODY as usize).collect().await.map_err(|e| {
                Refusal(StatusCode::BAD_REQUEST, format!("moat: reading the request body failed: {e}\n"))
            })?;
            let whole = whole.to_bytes();
            let body = rules.replace_all(&whole).map(Bytes::from).unwrap_or(whole);
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            return Ok(Either::Right(Either::Right(Full::new(body))));
        }
        headers.remove(CONTENT_LENGTH);
        Ok(Either::Right(Either::Left(Rewritten::new(body, rules.clone()))))
    }
}

/// The content coding of a response body that moat cannot search for secrets, if it has one.
fn unreadable_coding<B: hyper::body::Body>(resp: &Response<B>) -> Option<String> {
    if resp.body().is_end_stream() {
        return None;
    }
    let codings: Vec<String> = resp
        .headers()
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes()).split(',').map(|c| c.trim().to_ascii_lowercase()).collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    (!codings.is_empty()).then(|| codings.join(", "))
}

/// Relays an upgraded connection both ways until both are done; what comes back has every
/// value replaced in place.
async fn relay_upgraded<G, U>(guest: G, upstream: U, mut back: RewriteStream) -> io::Result<()>
where
    G: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut guest_read, mut guest_write) = tokio::io::split(guest);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let out = async {
        tokio::io::copy(&mut guest_read, &mut upstream_write).await?;
        upstream_write.shutdown().await
    };
    let back = async {
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = upstream_read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            guest_write.write_all(&back.push(Bytes::copy_from_slice(&buf[..n]))).await?;
        }
        guest_write.write_all(&back.finish()).await?;
        guest_write.shutdown().await
    };
    tokio::try_join!(out, back).map(|_| ())
}

/// A peer hanging up without a TLS close_notify, or before ours is written, has closed the
/// connection, not broken it: most clients do, and HTTP/1.1 frames its messages anyway.
fn unless_hung_up(r: Result<(), hyper::Error>) -> Result<(), hyper::Error> {
    match r {
        Err(e) if e.is_shutdown() || is_hang_up(&e) => Ok(()),
        r => r,
    }
}

fn is_hang_up(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<io::Error>() {
            use io::ErrorKind::*;
            if matches!(e.kind(), UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// A request answered by moat itself instead of being sent on.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl Refusal {
    fn into_response(self) -> Response<Body> {
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(self.1))));
        *resp.status_mut() = self.0;
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        resp
    }
}

/// Checks that `req` is for `host`, puts the secrets into its query and header values, and asks
/// for what the response side can search: an unencoded body, and the whole of it.
fn prepare<B>(req: Request<B>, host: &str, rules: &Rules) -> Result<Request<B>, Refusal> {
    let misdirected = || {
        Refusal(
            StatusCode::MISDIRECTED_REQUEST,
            format!("moat: this connection is for {host}; a request for another host is refused so secrets cannot reach it\n"),
        )
    };
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        return Err(Refusal(StatusCode::METHOD_NOT_ALLOWED, "moat: CONNECT is not relayed to a secret host\n".into()));
    }
    if let Some(authority) = parts.uri.authority() {
        if !names_host(authority.as_str(), host) {
            return Err(misdirected());
        }
    }
    let mut hosts = parts.headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) => {
            let value = HeaderValue::from_str(host).map_err(|_| misdirected())?;
            parts.headers.insert(HOST, value);
        }
        (Some(value), None) => {
            if !value.to_str().is_ok_and(|v| names_host(v, host)) {
                return Err(misdirected());
            }
        }
        (Some(_), Some(_)) => {
            return Err(Refusal(StatusCode::BAD_REQUEST, "moat: a request has more than one Host header\n".into()))
        }
    }

    if let Some(query) = parts.uri.query().and_then(|q| rules.query.replace_all(q.as_bytes())) {
        let bad_uri =
            || Refusal(StatusCode::BAD_REQUEST, "moat: the URI is not valid once its secrets are put in\n".into());
        let mut path_and_query = parts.uri.path().as_bytes().to_vec();
        path_and_query.push(b'?');
        path_and_query.extend_from_slice(&query);
        let mut uri = parts.uri.into_parts();
        uri.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(path_and_query)).map_err(|_| bad_uri())?);
        parts.uri = Uri::from_parts(uri).map_err(|_| bad_uri())?;
    }
    for (name, value) in parts.headers.iter_mut() {
        if name == HOST {
            continue;
        }
        if let Some(replaced) = rules.headers.replace_all(value.as_bytes()) {
            *value = HeaderValue::from_maybe_shared(Bytes::from(replaced)).map_err(|_| {
                Refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "moat: a secret's value cannot go in the {name} header: it has bytes a header may not hold\n"
                    ),
                )
            })?;
            // Keeps the value out of anything that honours the flag (e.g. HPACK indexing).
            value.set_sensitive(true);
        }
    }
    // A compressed body cannot be searched for the values, and a range could return one in
    // pieces, none of them recognisable; a compressed WebSocket neither.
    parts.headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    for unsearchable in [RANGE, IF_RANGE, SEC_WEBSOCKET_EXTENSIONS] {
        parts.headers.remove(unsearchable);
    }
    // Nothing the guest's server connection attached means anything to the upstream one.
    parts.extensions = Default::default();
    Ok(Request::from_parts(parts, body))
}

/// Whether an authority (`host[:port]`, as in a Host header) names `host`.
fn names_host(authority: &str, host: &str) -> bool {
    authority.parse::<Authority>().is_ok_and(|a| normalize_host(a.host()) == host)
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(placeholder: &str, value: &str) -> Secret {
        Secret { placeholder: placeholder.into(), value: value.into(), in_body: false }
    }

    fn rules(secrets: &[Secret]) -> Rules {
        Rules::new(secrets).unwrap()
    }

    #[test]
    fn a_value_goes_in_header_values_and_percent_encoded_in_the_query_never_the_path() {
        let rules = rules(&[secret("P_K", "a/b+c=d&e f~g")]);
        let req = request("/P_K/x?key=P_K&y=1", &[("authorization", "Bearer P_K"), ("origin", "https://P_K")]);
        let ok = prepare(req, "api.test", &rules).unwrap();
        assert_eq!(ok.uri(), "/P_K/x?key=a%2Fb%2Bc%3Dd%26e%20f~g&y=1");
        assert_eq!(ok.headers()["authorization"], "Bearer a/b+c=d&e f~g");
        assert_eq!(ok.headers()["origin"], "https://a/b+c=d&e f~g");
        let absolute = prepare(request("https://api.test/P_K?k=P_K", &[]), "api.test", &rules).unwrap();
        assert_eq!(absolute.uri(), "https://api.test/P_K?k=a%2Fb%2Bc%3Dd%26e%20f~g");
    }

    #[test]
    fn what_the_response_side_cannot_search_is_not_asked_for() {
        let rules = rules(&[secret("P_K", "real")]);
        let headers = [("accept-encoding", "gzip, br"), ("range", "bytes=0-3"), ("if-range", "\"x\"")];
        let ok = prepare(request("/", &headers), "api.test", &rules).unwrap();
        assert_eq!(ok.headers()["accept-encoding"], "identity");
        assert!(!ok.headers().contains_key("range") && !ok.headers().contains_key("if-range"));
        let ws = request("/", &[("upgrade", "websocket"), ("sec-websocket-extensions", "permessage-deflate")]);
        assert!(!prepare(ws, "api.test", &rules).unwrap().headers().contains_key("sec-websocket-extensions"));
    }

    #[test]
    fn bodies_get_only_the_secrets_that_ask_for_it() {
        let mut body_secret = secret("P_B", "b&1");
        body_secret.in_body = true;
        let rules = rules(&[secret("P_K", "k"), body_secret]);
        assert_eq!(rules.body.replace_all(b"P_K P_B").as_deref(), Some(&b"P_K b&1"[..]));
        assert_eq!(rules.form_body.replace_all(b"k=P_K&b=P_B").as_deref(), Some(&b"k=P_K&b=b%261"[..]));
        assert!(Rules::new(&[secret("P_K", "k")]).unwrap().body.is_empty());
    }

    #[test]
    fn reflected_values_become_placeholders_again() {
        let rules = rules(&[secret("P_K", "sk-live/42"), secret("P_OTHER", "other-value")]);
        // The last base64 character also carries bits of what follows the value: it stays.
        let echoed = b"/x?k=sk-live%2F42 sk-live\\/42 other-value c2stbGl2ZS80Mg";
        assert_eq!(rules.reflected.replace_all(echoed).as_deref(), Some(&b"/x?k=P_K P_K P_OTHER P_Kg"[..]));
        let in_place = rules.reflected_in_place.replace_all(b"[sk-live/42]").unwrap();
        assert_eq!(in_place, b"[**********]", "in place, the length is kept");
    }

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn only_requests_for_the_bound_host_are_prepared() {
        let secrets = rules(&[secret("P_K", "real")]);
        let ok =
            prepare(request("/v1?k=P_K", &[("host", "API.test:443"), ("x-key", "P_K")]), "api.test", &secrets).unwrap();
        assert_eq!(ok.uri(), "/v1?k=real");
        assert_eq!(ok.headers()["x-key"], "real");
        assert!(ok.headers()["x-key"].is_sensitive());
        assert_eq!(ok.headers()["host"], "API.test:443");

        let no_host = prepare(request("/", &[]), "api.test", &secrets).unwrap();
        assert_eq!(no_host.headers()["host"], "api.test", "a missing Host is filled in");

        let refused = |req| prepare(req, "api.test", &secrets).unwrap_err().0;
        assert_eq!(refused(request("/", &[("host", "evil.test")])), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(refused(request("/", &[("host", "api.test.evil.test")])), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(refused(request("https://evil.test/", &[("host", "api.test")])), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(refused(request("/", &[("host", "api.test"), ("host", "evil.test")])), StatusCode::BAD_REQUEST);
        let connect = Request::builder().method(Method::CONNECT).uri("api.test:443").body(()).unwrap();
        assert_eq!(refused(connect), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn a_value_a_header_cannot_hold_is_refused_without_showing_it() {
        let secrets = rules(&[secret("P_K", "line\r\nInjected: yes")]);
        let refusal = prepare(request("/", &[("authorization", "P_K")]), "api.test", &secrets).unwrap_err();
        assert_eq!(refusal.0, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!refusal.1.contains("Injected"), "{}", refusal.1);
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let shown = format!("{:?}", secret("moat_placeholder_K", "sk-very-secret"));
        assert!(shown.contains("moat_placeholder_K") && !shown.contains("sk-very-secret"), "{shown}");
        let ca = Ca::generate("debug").unwrap();
        assert!(!format!("{ca:?}").contains(ca.key_pem().lines().nth(1).unwrap()));
    }
}
