//! Who may reach the API: the unix socket's owner and group, and the TCP listener, which strangers
//! can connect to before they show the token.
//!
//! The TCP listener serves HTTP/1.1 (and TLS when given a certificate) with hyper directly instead
//! of `axum::serve`, for what that lacks: a deadline for each request's headers (also the idle
//! timeout between requests), and a bound on connections that have not yet shown the token.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

/// How long a client has to send a request's headers, and how long a connection may sit idle
/// between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that have not yet shown the token; when a new one comes, the oldest is closed.
pub const MAX_PENDING: usize = 256;

/// Why the daemon cannot listen the way it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("refusing to serve the API in clear text on {addr}, which is not a loopback address: the token and every secret sent to the API would cross the network readable")]
    Cleartext { addr: SocketAddr },
    #[error("--tls-cert and --tls-key go together")]
    TlsHalf,
    #[error("cannot use {} for TLS: {reason}", path.display())]
    TlsFile { path: PathBuf, reason: String },
    #[error("there is no group {name}")]
    NoGroup { name: String },
    #[error("cannot hand {} to group {name}: {reason}", path.display())]
    Chgrp { path: PathBuf, name: String, reason: std::io::Error },
    #[error("cannot set the mode of {}: {reason}", path.display())]
    Chmod { path: PathBuf, reason: std::io::Error },
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: std::io::Error },
}

impl moat_hint::Hint for ListenError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        Some(match self {
            ListenError::Cleartext { .. } => {
                "give the listener a certificate (--tls-cert CERT.pem --tls-key KEY.pem), \
                 listen on 127.0.0.1, or take the risk with --insecure-tcp"
                    .into()
            }
            ListenError::TlsHalf => "give both, PEM files of the certificate chain and its private key".into(),
            ListenError::TlsFile { .. } => "--tls-cert takes the PEM certificate chain (server first), --tls-key its \
                 PEM private key (PKCS#8, PKCS#1 or SEC1)"
                .into(),
            ListenError::NoGroup { name } => format!(
                "create it (`groupadd {name}`) and add the users who may drive this daemon, or leave out --group"
            )
            .into(),
            ListenError::Chgrp { name, .. } => format!("the daemon must run as root, or as a member of {name}").into(),
            ListenError::Chmod { .. } => return None,
            ListenError::Bind { .. } => "pick a free address and port with --tcp".into(),
        })
    }
}

/// Who may use the unix socket (and so the whole daemon, secrets included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAccess {
    /// The daemon's user alone.
    Owner,
    /// Also the members of the group the operator named with `--group`.
    Group { name: String, gid: u32 },
}

impl SocketAccess {
    /// The access `--group` asks for; `gid_of` looks a group name up. Nothing but an explicit
    /// group opens the socket: a group that merely exists, or the user's own, never does.
    pub fn decide(group: Option<&str>, gid_of: impl Fn(&str) -> Option<u32>) -> Result<SocketAccess, ListenError> {
        match group {
            None => Ok(SocketAccess::Owner),
            Some(name) => match gid_of(name) {
                Some(gid) => Ok(SocketAccess::Group { name: name.to_string(), gid }),
                None => Err(ListenError::NoGroup { name: name.to_string() }),
            },
        }
    }

    pub fn socket_mode(&self) -> u32 {
        match self {
            SocketAccess::Owner => 0o600,
            SocketAccess::Group { .. } => 0o660,
        }
    }

    /// What `$MOAT_HOME` may allow: a group must be able to pass through it to the socket, and do
    /// nothing else there (everything inside stays the owner's).
    pub fn home_mode(&self) -> u32 {
        match self {
            SocketAccess::Owner => 0o700,
            SocketAccess::Group { .. } => 0o710,
        }
    }

    /// Give the socket (and for a group, the home it is in) this access.
    pub fn apply(&self, home: &Path, sock: &Path) -> Result<(), ListenError> {
        use std::os::unix::fs::PermissionsExt;
        if let SocketAccess::Group { name, gid } = self {
            for path in [home, sock] {
                std::os::unix::fs::chown(path, None, Some(*gid)).map_err(|reason| ListenError::Chgrp {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    reason,
                })?;
            }
            std::fs::set_permissions(home, std::fs::Permissions::from_mode(self.home_mode()))
                .map_err(|reason| ListenError::Chmod { path: home.to_path_buf(), reason })?;
        }
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(self.socket_mode()))
            .map_err(|reason| ListenError::Chmod { path: sock.to_path_buf(), reason })
    }
}

/// The gid of a group in /etc/group.
pub fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// How the API listens on TCP.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    pub addr: SocketAddr,
    /// Certificate chain and key (PEM): serve HTTPS.
    pub tls: Option<TlsFiles>,
    /// Serve clear text on a non-loopback address anyway.
    pub insecure: bool,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Both files, or neither.
    pub fn pair(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>, ListenError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            _ => Err(ListenError::TlsHalf),
        }
    }

    fn acceptor(&self) -> Result<TlsAcceptor, ListenError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |path: &Path| {
            let path = path.to_path_buf();
            move |reason: String| ListenError::TlsFile { path, reason }
        };
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(&self.cert)(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad(&self.cert)("it holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| bad(&self.key)(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| bad(&self.key)(format!("the key does not go with the certificate, or is unusable: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl TcpConfig {
    /// Check the settings before the daemon starts: clear text only on loopback unless the
    /// operator insists, and a certificate that loads. The TLS acceptor, when there is one.
    pub fn prepare(&self) -> Result<Option<TlsAcceptor>, ListenError> {
        if self.tls.is_none() && !self.addr.ip().is_loopback() {
            if !self.insecure {
                return Err(ListenError::Cleartext { addr: self.addr });
            }
            tracing::warn!(
                addr = %self.addr,
                "serving the API in CLEAR TEXT on a non-loopback address (--insecure-tcp): anyone on the path reads the token and the secrets"
            );
        }
        self.tls.as_ref().map(TlsFiles::acceptor).transpose()
    }

    pub fn bind(&self) -> Result<TcpListener, ListenError> {
        let socket = match self.addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        // The kernel's most (net.core.somaxconn): a burst of connections waits in the queue, where
        // it costs no descriptor, instead of being dropped and retried by the clients for seconds.
        socket
            .and_then(|s| {
                s.set_reuseaddr(true)?;
                s.bind(self.addr)?;
                s.listen(4096)
            })
            .map_err(|reason| ListenError::Bind { addr: self.addr, reason })
    }
}

/// Serve `app` (which must answer 401 to every request without the token) on `listener` until the
/// task is aborted.
pub async fn serve_tcp(listener: TcpListener, tls: Option<TlsAcceptor>, app: Router) {
    let pending = Arc::new(Pending::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: pause rather than spin.
                tracing::debug!("accepting a TCP connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = pending.admit();
        tokio::spawn(serve_connection(stream, tls.clone(), app.clone(), ticket));
    }
}

async fn serve_connection(stream: TcpStream, tls: Option<TlsAcceptor>, app: Router, ticket: Ticket) {
    let _ = stream.set_nodelay(true);
    let evicted = ticket.evicted.clone();
    let ticket = Arc::new(ticket);
    let served = async move {
        match tls {
            None => http(stream, app, ticket).await,
            Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => http(stream, app, ticket).await,
                Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            },
        }
    };
    tokio::select! {
        _ = served => {}
        // Dropping the connection closes its socket.
        _ = evicted.notified() => tracing::debug!("closed a connection that never showed the token, to make room"),
    }
}

async fn http<S>(stream: S, app: Router, ticket: Arc<Ticket>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (mut app, ticket) = (app.clone(), ticket.clone());
        async move {
            let response = tower_service::Service::call(&mut app, req).await;
            // The token check answers 401 to anyone without the token: any other answer means
            // this client has it, and its connection is no longer a stranger's.
            if let Ok(r) = &response {
                if r.status() != hyper::StatusCode::UNAUTHORIZED {
                    ticket.authenticated();
                }
            }
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await {
        tracing::debug!("TCP API connection: {e}");
    }
}

/// The connections that have not yet shown the token, oldest first.
#[derive(Default)]
struct Pending {
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    next: std::sync::atomic::AtomicU64,
}

/// A connection's place among the pending ones; it leaves when the connection ends or shows the
/// token.
struct Ticket {
    id: u64,
    pending: Arc<Pending>,
    evicted: Arc<Notify>,
}

impl Pending {
    /// A place for a new connection, closing the oldest pending one when there is no room: a
    /// stranger holding connections open only ever holds [`MAX_PENDING`] of them, and a client
    /// that sends its request at once is served however many strangers wait.
    fn admit(self: &Arc<Self>) -> Ticket {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while queue.len() >= MAX_PENDING {
            if let Some((_, oldest)) = queue.pop_front() {
                oldest.notify_one();
            }
        }
        queue.push_back((id, evicted.clone()));
        Ticket { id, pending: self.clone(), evicted }
    }

    fn leave(&self, id: u64) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = queue.iter().position(|(i, _)| *i == id) {
            queue.remove(at);
        }
    }
}

impl Ticket {
    fn authenticated(&self) {
        self.pending.leave(self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pending.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_group_the_operator_names_can_use_the_socket() {
        // A `moat` group exists, but nobody asked for it: owner only.
        let groups = |name: &str| (name == "moat").then_some(990);
        let access = SocketAccess::decide(None, groups).unwrap();
        assert_eq!(access, SocketAccess::Owner);
        assert_eq!((access.socket_mode(), access.home_mode()), (0o600, 0o700));

        let access = SocketAccess::decide(Some("moat"), groups).unwrap();
        assert_eq!(access, SocketAccess::Group { name: "moat".into(), gid: 990 });
        assert_eq!((access.socket_mode(), access.home_mode()), (0o660, 0o710));

        let missing = SocketAccess::decide(Some("nosuchgroup"), groups).unwrap_err();
        let shown = moat_hint::Report::new(&missing).to_string();
        assert!(shown.contains("there is no group nosuchgroup\nhint: create it"), "{shown}");
    }

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let (addr, p, io) =
            (|| SocketAddr::from(([0, 0, 0, 0], 80)), || PathBuf::from("/p"), || std::io::Error::other("x"));
        let cases = [
            (ListenError::Cleartext { addr: addr() }, true),
            (ListenError::TlsHalf, true),
            (ListenError::TlsFile { path: p(), reason: "x".into() }, true),
            (ListenError::NoGroup { name: "g".into() }, true),
            (ListenError::Chgrp { path: p(), name: "g".into(), reason: io() }, true),
            (ListenError::Chmod { path: p(), reason: io() }, false),
            (ListenError::Bind { addr: addr(), reason: io() }, true),
        ];
        for (e, hinted) in &cases {
            moat_hint::check(e, *hinted).unwrap();
        }
    }

    #[test]
    fn strangers_hold_at_most_max_pending_connections_and_the_oldest_goes_first() {
        let pending = Arc::new(Pending::default());
        let tickets: Vec<Ticket> = (0..MAX_PENDING).map(|_| pending.admit()).collect();
        let authenticated = pending.admit();
        // The oldest was told to close; the rest were not.
        assert!(futures_util::FutureExt::now_or_never(tickets[0].evicted.notified()).is_some());
        assert!(futures_util::FutureExt::now_or_never(tickets[1].evicted.notified()).is_none());
        // A connection that shows the token frees its place without closing anyone.
        authenticated.authenticated();
        let next = pending.admit();
        assert!(futures_util::FutureExt::now_or_never(tickets[1].evicted.notified()).is_none());
        assert_eq!(pending.queue.lock().unwrap().len(), MAX_PENDING);
        drop(next);
        assert_eq!(pending.queue.lock().unwrap().len(), MAX_PENDING - 1);
    }
}
