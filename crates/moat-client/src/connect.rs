//! Where the daemon is and how a connection to it is opened: its unix socket, TCP (plain HTTP),
//! TLS, or a daemon in this process. Remote daemons get the bearer token on every request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use crate::{Client, ClientError, Io, Target};

/// Largest CA file read for `--tls-ca`: a bundle of a few hundred certificates.
const MAX_CA_FILE: u64 = 4 << 20;

/// The address of a daemon: `unix:///path/moat.sock`, `tcp://HOST:PORT` (plain HTTP) or
/// `https://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `HOST:PORT`, IPv6 hosts in brackets.
    Tcp(String),
    Https(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
            Endpoint::Https(addr) => write!(f, "https://{addr}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Endpoint, ClientError> {
        let bad = |reason: &'static str| ClientError::Endpoint { given: s.to_string(), reason };
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("the socket's path must be absolute (unix:///path/moat.sock)"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let (https, rest) = match s.split_once("://") {
            Some(("tcp" | "http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some(_) => return Err(bad("the scheme is not one of unix, tcp, http or https")),
            None => return Err(bad("it has no scheme")),
        };
        let addr = rest.strip_suffix('/').unwrap_or(rest);
        if addr.contains(['/', '?', '#', '@']) {
            return Err(bad("it names more than a host and a port"));
        }
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("it has no port"))?;
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("the port is not a number from 1 to 65535"));
        }
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let bare = bracketed.unwrap_or(host);
        let ipv6_ok = bracketed.map_or(!host.contains(':'), |h| h.parse::<std::net::Ipv6Addr>().is_ok());
        if bare.is_empty() || !ipv6_ok {
            return Err(bad("the host is empty or not valid (write IPv6 addresses in brackets)"));
        }
        Ok(if https { Endpoint::Https(addr.to_string()) } else { Endpoint::Tcp(addr.to_string()) })
    }
}

/// The host part of `HOST:PORT`, without IPv6 brackets.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// A rustls client configuration that trusts `ca` (PEM certificates: the daemon's CA, or its
/// self-signed certificate) or else the system's roots.
fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let bad = |reason: String| ClientError::TlsCa { path: path.to_path_buf(), reason };
            let len = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
            if len > MAX_CA_FILE {
                return Err(bad(format!("it is larger than {MAX_CA_FILE} bytes")));
            }
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("it is not PEM: {e}")))?;
            if certs.is_empty() {
                return Err(bad("it holds no certificate".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(format!("a certificate in it is unusable: {e}")))?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped, as every TLS client does.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::TlsCa { path: ca.map(Path::to_path_buf).unwrap_or_default(), reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Client {
    /// A client of the daemon at `endpoint`. TCP and HTTPS daemons need `token` (their
    /// `$MOAT_HOME/token`), sent as a bearer token on every request and WebSocket upgrade; `ca`
    /// is the PEM file an HTTPS daemon's certificate is checked against (default: the system's
    /// roots). A unix socket needs neither.
    pub fn remote(endpoint: &Endpoint, token: Option<String>, ca: Option<&Path>) -> Result<Client, ClientError> {
        let target = match endpoint {
            Endpoint::Unix(path) => Target::Socket(path.clone()),
            Endpoint::Tcp(addr) => Target::Tcp { addr: addr.clone() },
            Endpoint::Https(addr) => {
                let name = ServerName::try_from(host_of(addr).to_string()).map_err(|_| ClientError::Endpoint {
                    given: endpoint.to_string(),
                    reason: "the host is not valid",
                })?;
                Target::Tls { addr: addr.clone(), name, tls: TlsConnector::from(Arc::new(tls_config(ca)?)) }
            }
        };
        Ok(Client { target, token: token.map(Arc::from), connect_timeout: None })
    }

    /// A client of a plain-HTTP TCP daemon (`moat serve --tcp ADDR`) at `HOST:PORT`.
    pub fn tcp(addr: &str, token: &str) -> Client {
        Client { target: Target::Tcp { addr: addr.to_string() }, token: Some(token.into()), connect_timeout: None }
    }

    /// A client of an HTTPS daemon (`moat serve --tcp ADDR --tls-cert …`) at `HOST:PORT`.
    pub fn tls(addr: &str, token: &str, ca: Option<&Path>) -> Result<Client, ClientError> {
        Client::remote(&Endpoint::Https(addr.to_string()), Some(token.to_string()), ca)
    }

    /// Give up opening a connection (TCP connect and TLS handshake) after `limit`; requests
    /// themselves are not bounded, so a long exec or pull runs to its end.
    pub fn with_connect_timeout(mut self, limit: Duration) -> Client {
        self.connect_timeout = Some(limit);
        self
    }

    /// Where this client connects, for messages.
    pub fn endpoint(&self) -> String {
        match &self.target {
            Target::Socket(path) => format!("unix://{}", path.display()),
            Target::InProcess(_) => "in-process".into(),
            Target::Tcp { addr } => format!("tcp://{addr}"),
            Target::Tls { addr, .. } => format!("https://{addr}"),
        }
    }

    /// Whether the daemon is reached over the network (so requests carry the token).
    pub fn is_remote(&self) -> bool {
        matches!(self.target, Target::Tcp { .. } | Target::Tls { .. })
    }

    pub(crate) async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let open = async {
            match &self.target {
                Target::Socket(socket) => match UnixStream::connect(socket).await {
                    Ok(stream) => Ok(Box::new(stream) as Box<dyn Io>),
                    Err(source) => Err(ClientError::Connect { path: socket.display().to_string(), source }),
                },
                Target::InProcess(connect) => Ok(connect()),
                Target::Tcp { addr } => Ok(Box::new(tcp(addr).await?) as Box<dyn Io>),
                Target::Tls { addr, name, tls } => {
                    let stream = tcp(addr).await?;
                    match tls.connect(name.clone(), stream).await {
                        Ok(stream) => Ok(Box::new(stream) as Box<dyn Io>),
                        Err(source) => Err(ClientError::Tls { addr: format!("https://{addr}"), source }),
                    }
                }
            }
        };
        match self.connect_timeout {
            None => open.await,
            Some(limit) => tokio::time::timeout(limit, open)
                .await
                .unwrap_or_else(|_| Err(ClientError::Timeout { addr: self.endpoint(), after: limit })),
        }
    }

    /// The value of the `Host` header.
    pub(crate) fn authority(&self) -> &str {
        match &self.target {
            Target::Tcp { addr } | Target::Tls { addr, .. } => addr,
            _ => "moat",
        }
    }

    /// A request to the daemon with its `Host` and, for a remote daemon, its token.
    pub(crate) fn request(&self, method: hyper::Method, path: &str) -> hyper::http::request::Builder {
        let req = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, self.authority());
        match &self.token {
            Some(token) => req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
            None => req,
        }
    }

    /// The error for an answer that refused the token.
    pub(crate) fn refused(&self, status: StatusCode) -> Option<ClientError> {
        (status == StatusCode::UNAUTHORIZED && self.is_remote())
            .then(|| ClientError::Unauthorized { addr: self.endpoint(), sent: self.token.is_some() })
    }
}

async fn tcp(addr: &str) -> Result<TcpStream, ClientError> {
    let stream =
        TcpStream::connect(addr).await.map_err(|source| ClientError::Unreachable { addr: addr.to_string(), source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for (given, want) in [
            ("tcp://127.0.0.1:7070", Endpoint::Tcp("127.0.0.1:7070".into())),
            ("http://moat.example:80/", Endpoint::Tcp("moat.example:80".into())),
            ("https://[::1]:7443", Endpoint::Https("[::1]:7443".into())),
            ("unix:///var/lib/moat/moat.sock", Endpoint::Unix("/var/lib/moat/moat.sock".into())),
        ] {
            assert_eq!(given.parse::<Endpoint>().unwrap(), want, "{given}");
        }
        assert_eq!(Endpoint::Https("h:1".into()).to_string(), "https://h:1");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("moat.example:80"), "moat.example");
    }

    #[test]
    fn bad_endpoints_say_what_is_wrong() {
        for bad in [
            "127.0.0.1:7070",
            "ftp://h:1",
            "tcp://h",
            "tcp://h:0",
            "tcp://h:99999",
            "tcp://:80",
            "tcp://h:80/v1",
            "tcp://user@h:80",
            "tcp://::1:80",
            "unix://relative.sock",
        ] {
            let e = bad.parse::<Endpoint>().unwrap_err();
            assert!(matches!(e, ClientError::Endpoint { .. }), "{bad}: {e}");
            moat_hint::check(&e, true).unwrap();
        }
    }

    #[test]
    fn remote_requests_carry_the_token_and_local_ones_do_not() {
        let remote = Client::tcp("127.0.0.1:1", "s3cret");
        let req = remote.request(hyper::Method::GET, "/v1/health").body(()).unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer s3cret");
        assert_eq!(req.headers()["host"], "127.0.0.1:1");
        let local = Client::new(Path::new("/nonexistent/moat.sock"));
        let req = local.request(hyper::Method::GET, "/v1/health").body(()).unwrap();
        assert!(req.headers().get("authorization").is_none());
        assert!(
            remote.refused(StatusCode::UNAUTHORIZED).is_some() && local.refused(StatusCode::UNAUTHORIZED).is_none()
        );
    }

    #[test]
    fn a_ca_file_that_is_not_a_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("moat-client-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ca.pem");
        std::fs::write(&file, "not a certificate\n").unwrap();
        let e = Client::tls("localhost:1", "t", Some(&file)).unwrap_err();
        assert!(matches!(e, ClientError::TlsCa { .. }), "{e}");
        let e = Client::tls("localhost:1", "t", Some(&dir.join("missing.pem"))).unwrap_err();
        assert!(matches!(e, ClientError::TlsCa { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = Client::tcp(&addr, "t").health().await.unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
    }
}
