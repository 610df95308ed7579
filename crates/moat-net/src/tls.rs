//! Secrets that never enter the VM. The guest sees a placeholder; HTTPS to a host a secret is bound
//! to is terminated here with a leaf from the sandbox's own CA (installed in the guest's trust
//! store), the placeholder is replaced by the real value in the request line and headers, and the
//! request goes on over a fresh TLS connection that checks the real server's certificate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, HOST};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Leaves kept per CA; a sandbox talks to a handful of secret hosts, so this only bounds a guest
/// that makes up names.
const MAX_CACHED_LEAVES: usize = 256;
/// Leaves are valid this long and reissued after `LEAF_REFRESH`, so a long-lived daemon never
/// serves an expired one.
const LEAF_VALIDITY: time::Duration = time::Duration::days(90);
const LEAF_REFRESH: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start a day early so a guest clock that lags a little still accepts them.
const BACKDATE: time::Duration = time::Duration::days(1);
const CA_VALIDITY: time::Duration = time::Duration::days(3652);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A guest that opens a connection and never finishes a request head is cut off after this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// hyper's default (~400 KiB) would let one request head hold that much per connection.
const MAX_BUF_SIZE: usize = 64 * 1024;
const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the sandbox CA failed: {0}")]
    CaGenerate(#[source] rcgen::Error),
    #[error("the stored sandbox CA is unusable: {what}: {source}")]
    CaLoad {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the stored sandbox CA key does not sign certificates its CA certificate verifies ({0}); store the key that belongs to the certificate")]
    CaMismatch(#[source] rustls::Error),
    #[error("issuing a certificate for {host} failed: {source}")]
    Leaf {
        host: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0:?} is not a host name a TLS certificate can be made for")]
    InvalidHost(String),
    #[error("building the TLS configuration failed: {0}")]
    Config(#[source] rustls::Error),
    #[error("TLS handshake with the guest for {host} failed: {source}")]
    GuestHandshake {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {host} failed: {source}")]
    UpstreamHandshake {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake for {host} did not finish within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout { host: String },
    #[error("HTTP from the guest to {host} failed: {source}")]
    Guest {
        host: String,
        #[source]
        source: hyper::Error,
    },
    #[error("HTTP to {host} failed: {source}")]
    Upstream {
        host: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the relay task for {host} stopped: {source}")]
    Task {
        host: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("relaying the upgraded connection (e.g. a WebSocket) with {host} failed: {source}")]
    Upgraded {
        host: String,
        #[source]
        source: io::Error,
    },
}

/// A per-sandbox certificate authority (ECDSA P-256). Its PEM is what the daemon stores, what
/// forks inherit, and what goes into the guest's trust store.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Leaf>>,
}

struct Leaf {
    issued: Instant,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA named "moat sandbox CA `label`", valid for ten years.
    pub fn generate(label: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::CaGenerate)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("moat sandbox CA {label}"));
        name.push(DnType::OrganizationName, "moat");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key).map_err(TlsError::CaGenerate)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA stored by [`Ca::cert_pem`] and [`Ca::key_pem`]. Fails if the key is not the
    /// certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| TlsError::CaLoad { what: "reading its key", source })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|source| TlsError::CaLoad { what: "reading its certificate", source })?;
        let ca = Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            leaves: Mutex::new(HashMap::new()),
        };
        ca.check_signs_for_itself()?;
        Ok(ca)
    }

    /// The CA certificate, PEM; the guest trusts it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM; never give it to the guest.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A TLS server configuration presenting a leaf for `host` signed by this CA, offering only
    /// HTTP/1.1. Leaves are cached per host.
    pub(crate) fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let host = normalize_host(host);
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(leaf) = leaves.get(&host) {
            if leaf.issued.elapsed() < LEAF_REFRESH {
                return Ok(leaf.config.clone());
            }
        }
        let (cert, key) = self.issue(&host)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= MAX_CACHED_LEAVES && !leaves.contains_key(&host) {
            let evict = leaves.iter().min_by_key(|(_, leaf)| leaf.issued).map(|(name, _)| name.clone());
            if let Some(name) = evict {
                leaves.remove(&name);
            }
        }
        leaves.insert(host, Leaf { issued: Instant::now(), config: config.clone() });
        Ok(config)
    }

    fn issue(&self, host: &str) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        let leaf_error = |source| TlsError::Leaf { host: host.to_owned(), source };
        // rcgen takes any IA5 string as a DNS name; a guest must not get a leaf for "a b".
        ServerName::try_from(host).map_err(|_| TlsError::InvalidHost(host.to_owned()))?;
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(|_| TlsError::InvalidHost(host.to_owned()))?),
        };
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.subject_alt_names = vec![san];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(leaf_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(leaf_error)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert.der().clone(), key))
    }

    /// Catches a key stored next to the wrong certificate before any guest sees a leaf it rejects.
    fn check_signs_for_itself(&self) -> Result<(), TlsError> {
        const PROBE: &str = "ca-check.moat.invalid";
        let ca_cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| {
            TlsError::CaMismatch(rustls::Error::General(format!("the certificate PEM does not parse: {e}")))
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert).map_err(TlsError::CaMismatch)?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::CaMismatch(rustls::Error::General(e.to_string())))?;
        let (leaf, _) = self.issue(PROBE)?;
        let name = ServerName::try_from(PROBE).expect("the probe name is a valid DNS name");
        verifier.verify_server_cert(&leaf, &[], &name, &[], UnixTime::now()).map_err(TlsError::CaMismatch)?;
        Ok(())
    }
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

/// One secret: wherever `placeholder` appears in a request to a host it is bound to, `value`
/// goes instead.
#[derive(Clone)]
pub struct Secret {
    pub placeholder: String,
    pub value: String,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret").field("placeholder", &self.placeholder).field("value", &"<redacted>").finish()
    }
}

/// Intercepts one guest connection to `host`: TLS with the guest using a leaf from `ca`, TLS to
/// `upstream` checked against `roots`, then HTTP/1.1 requests relayed in order, each with the
/// placeholders of `secrets` replaced in its URI (percent-encoded) and header values. Bodies and
/// responses stream through unchanged. Requests naming another host (Host header or absolute
/// URI) are refused with 421 so a shared front end cannot route a secret elsewhere. Returns when
/// either side closes. `secrets` must be only those bound to `host`.
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
                acceptor.accept(guest).await.map_err(|source| TlsError::GuestHandshake { host: host.clone(), source })
            },
            async {
                connector
                    .connect(server_name, upstream)
                    .await
                    .map_err(|source| TlsError::UpstreamHandshake { host: host.clone(), source })
            },
        )
    };
    let (guest, upstream) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes)
        .await
        .map_err(|_| TlsError::HandshakeTimeout { host: host.clone() })??;

    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(upstream))
        .await
        .map_err(|source| TlsError::Upstream { host: host.clone(), source })?;
    let mut upstream_conn = Task(tokio::spawn(connection.with_upgrades()));

    let relay = Arc::new(Relay {
        host: host.clone(),
        secrets: secrets.to_vec(),
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
    let guest_error = |source| TlsError::Guest { host: host.clone(), source };
    match first {
        First::Guest(r) => unless_hung_up(r).map_err(guest_error)?,
        First::Upstream(r) => {
            let upstream_result = match r {
                Ok(r) => unless_hung_up(r).map_err(|source| TlsError::Upstream { host: host.clone(), source }),
                Err(source) => Err(TlsError::Task { host: host.clone(), source }),
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
            Err(source) => return Err(TlsError::Task { host, source }),
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

type Body = Either<Incoming, Full<Bytes>>;

/// The state shared by the requests of one intercepted connection.
struct Relay {
    host: String,
    secrets: Vec<Secret>,
    upstream: tokio::sync::Mutex<SendRequest<Incoming>>,
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
        let req = match prepare(req, &self.host, &self.secrets) {
            Ok(req) => req,
            Err(refusal) => return refusal.into_response(),
        };
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
            let tunnel = tokio::spawn(async move {
                let upgraded_error =
                    |e: hyper::Error| TlsError::Upgraded { host: host.clone(), source: io::Error::other(e) };
                let guest = guest_upgrade.await.map_err(upgraded_error)?;
                let upstream = upstream_upgrade.await.map_err(upgraded_error)?;
                let relayed =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(guest), &mut TokioIo::new(upstream)).await;
                match relayed {
                    Err(e) if !is_hang_up(&e) => Err(TlsError::Upgraded { host, source: e }),
                    _ => Ok(()),
                }
            });
            *self.upgraded.lock().unwrap_or_else(|e| e.into_inner()) = Some(Task(tunnel));
        }
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            self.upgrade_requested.store(false, Ordering::SeqCst);
        }
        // HTTP/3 would go around this relay over UDP, carrying the bare placeholder.
        resp.headers_mut().remove(hyper::header::ALT_SVC);
        resp.map(Either::Left)
    }
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

/// Checks that `req` is for `host` and puts the secrets in.
fn prepare<B>(req: Request<B>, host: &str, secrets: &[Secret]) -> Result<Request<B>, Refusal> {
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

    if let Some(uri) = substitute(parts.uri.to_string().as_bytes(), secrets, true) {
        parts.uri = Uri::from_maybe_shared(Bytes::from(uri)).map_err(|_| {
            Refusal(StatusCode::BAD_REQUEST, "moat: the URI is not valid once its secrets are put in\n".into())
        })?;
    }
    for (name, value) in parts.headers.iter_mut() {
        if name == HOST {
            continue;
        }
        if let Some(replaced) = substitute(value.as_bytes(), secrets, false) {
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
    // Nothing the guest's server connection attached means anything to the upstream one.
    parts.extensions = Default::default();
    Ok(Request::from_parts(parts, body))
}

/// `input` with every placeholder replaced by its value, or `None` if there was none. One pass,
/// longest placeholder first, so `..._KEY` is not eaten by `..._K` and values are never rescanned.
/// In a URI the value is percent-encoded so a `/`, `&` or `+` in it keeps its meaning as data.
fn substitute(input: &[u8], secrets: &[Secret], in_uri: bool) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let (mut at, mut copied) = (0, 0);
    while at < input.len() {
        let found = secrets
            .iter()
            .filter(|s| !s.placeholder.is_empty() && input[at..].starts_with(s.placeholder.as_bytes()))
            .max_by_key(|s| s.placeholder.len());
        let Some(secret) = found else {
            at += 1;
            continue;
        };
        let out = out.get_or_insert_with(|| Vec::with_capacity(input.len() + secret.value.len()));
        out.extend_from_slice(&input[copied..at]);
        if in_uri {
            percent_encode(secret.value.as_bytes(), out);
        } else {
            out.extend_from_slice(secret.value.as_bytes());
        }
        at += secret.placeholder.len();
        copied = at;
    }
    out.map(|mut out| {
        out.extend_from_slice(&input[copied..]);
        out
    })
}

fn percent_encode(value: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
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
        Secret { placeholder: placeholder.into(), value: value.into() }
    }

    fn sub(input: &str, secrets: &[Secret], in_uri: bool) -> Option<String> {
        substitute(input.as_bytes(), secrets, in_uri).map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn every_placeholder_is_replaced_longest_first_and_values_are_not_rescanned() {
        let secrets = [secret("P_K", "k-value P_KEY"), secret("P_KEY", "key-value"), secret("", "never")];
        assert_eq!(
            sub("a P_K b P_KEY c P_K", &secrets, false).as_deref(),
            Some("a k-value P_KEY b key-value c k-value P_KEY")
        );
        assert_eq!(sub("nothing here, not even P_", &secrets, false), None);
        assert_eq!(sub("", &secrets, false), None);
    }

    #[test]
    fn a_value_in_a_uri_is_percent_encoded() {
        let secrets = [secret("P_K", "a/b+c=d&e f~g")];
        assert_eq!(sub("/x?key=P_K&y=1", &secrets, true).as_deref(), Some("/x?key=a%2Fb%2Bc%3Dd%26e%20f~g&y=1"));
        assert_eq!(sub("Bearer P_K", &secrets, false).as_deref(), Some("Bearer a/b+c=d&e f~g"));
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
        let secrets = [secret("P_K", "real")];
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
        let secrets = [secret("P_K", "line\r\nInjected: yes")];
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

    #[test]
    fn leaves_are_cached_per_host_and_the_cache_is_bounded() {
        let ca = Ca::generate("cache").unwrap();
        let first = ca.server_config("api.test").unwrap();
        assert!(Arc::ptr_eq(&first, &ca.server_config("API.test.").unwrap()), "the same host reuses its leaf");
        assert!(!Arc::ptr_eq(&first, &ca.server_config("other.test").unwrap()));
        for i in 0..MAX_CACHED_LEAVES + 10 {
            ca.server_config(&format!("host{i}.test")).unwrap();
        }
        assert_eq!(ca.leaves.lock().unwrap().len(), MAX_CACHED_LEAVES);
        assert!(matches!(ca.server_config("not a host"), Err(TlsError::InvalidHost(_))));
    }

    #[test]
    fn the_ca_is_a_ca_named_after_its_label() {
        let ca = Ca::generate("sbx-123").unwrap();
        let der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let issuer = Issuer::from_ca_cert_der(&der, KeyPair::from_pem(ca.key_pem()).unwrap()).unwrap();
        assert!(issuer.key_usages().contains(&KeyUsagePurpose::KeyCertSign));
        assert!(format!("{issuer:?}").contains("moat sandbox CA sbx-123"), "{issuer:?}");
    }
}
