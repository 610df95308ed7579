//! A network lab that keeps every packet on this machine: two network namespaces joined by a veth
//! pair. `D` holds a moat daemon of the lab's own home; `S` holds the servers the guests talk to:
//! HTTP on :80, HTTPS on :443 (a test CA, a leaf for the lab's names) and DNS on :53. Neither
//! namespace has a default route, so nothing can leave.
//!
//! ```text
//!   D: 198.51.100.1/24, 10.77.0.1/24  ── veth ──  S: 198.51.100.10/24, 10.77.0.10/24
//!      moat serve → QEMU guests                      HTTP :80, HTTPS :443, DNS :53
//! ```
//!
//! 198.51.100.0/24 is TEST-NET-2: public as far as moat's policy is concerned, yet routed nowhere.
//! Creating namespaces needs root; the lab fails (never skips) without it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{moat_in, qemu_processes_mentioning, text, OwnHome};

/// The servers' "public" address (TEST-NET-2).
pub const SERVER_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The servers' private (RFC 1918) address: default egress must refuse it.
pub const SERVER_PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
/// The daemon's own addresses: the host of the sandboxes, which default egress must refuse.
pub const DAEMON_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const DAEMON_PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The daemon's public address as seen through a cloud's 1:1 NAT: no interface of `D` has it,
/// yet it reaches a host (here `S` holds it, as the NAT's hairpin would lead back to the host).
/// The daemon is told with `MOAT_HOST_ADDRESSES`, and must refuse it like its own.
pub const DAEMON_NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// Names the lab's DNS server answers, all with [`SERVER_PUBLIC`]; so does every name under
/// [`WILD_DOMAIN`]. Every other name is NXDOMAIN.
pub const LAB_NAMES: [&str; 3] = ["api.test", "other.test", "files.test"];
pub const WILD_DOMAIN: &str = "wild.test";
/// The UDP port on which the lab counts datagrams, on each of the servers' two addresses.
pub const UDP_PORT: u16 = 6969;

/// Largest request head the lab servers read; anything longer is cut off.
const MAX_HEAD: usize = 64 * 1024;
/// How long a lab daemon may take to come up (a fresh home builds its initramfs and image).
const DAEMON_START: Duration = Duration::from_secs(180);

/// One request a lab server answered.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The address the client connected to (which of the servers' addresses).
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The TLS server name the client sent, for https.
    pub sni: Option<String>,
    /// e.g. `GET /hello HTTP/1.1`.
    pub request_line: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or("")
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the lab's servers observed, shared with the tests.
#[derive(Clone, Default)]
pub struct Observed {
    requests: Arc<Mutex<Vec<Seen>>>,
    /// Every TCP connection accepted on :80 or :443 (local, peer), with or without a request.
    connections: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>,
    /// Every DNS question: (name without the trailing dot, type).
    dns: Arc<Mutex<Vec<(String, String)>>>,
    /// Every datagram on [`UDP_PORT`]: (local, peer).
    datagrams: Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>,
}

impl Observed {
    pub fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The requests whose path is `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Seen> {
        self.requests().into_iter().filter(|r| r.path() == path).collect()
    }

    pub fn connections(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Connections accepted on one of the servers' addresses.
    pub fn connections_to(&self, addr: Ipv4Addr) -> usize {
        self.connections().iter().filter(|(local, _)| local.ip() == addr).count()
    }

    pub fn dns_questions(&self) -> Vec<(String, String)> {
        self.dns.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the lab's DNS server was asked about `name` (any type).
    pub fn dns_asked(&self, name: &str) -> bool {
        self.dns_questions().iter().any(|(n, _)| n == name)
    }

    /// Datagrams that arrived on [`UDP_PORT`] of one of the servers' addresses.
    pub fn datagrams_to(&self, addr: Ipv4Addr) -> usize {
        self.datagrams.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|(local, _)| local.ip() == addr).count()
    }
}

/// A named network namespace created with `ip netns add`.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Move the calling thread into this namespace. Sockets it creates afterwards live there, and
    /// keep living there whichever thread uses them.
    fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; CLONE_NEWNET only changes this thread's network
        // namespace, which every thread may do.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {}: {}", self.name, std::io::Error::last_os_error());
    }

    /// Run `f` on a thread inside this namespace and return its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter();
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `ip netns exec NAME program args…`, run to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ip runs")
    }
}

/// The lab: namespaces, servers, a daemon. Dropping it tears all of it down.
pub struct Netlab {
    pub d: Netns,
    pub s: Netns,
    /// The lab daemon's `MOAT_HOME`.
    pub home: OwnHome,
    /// The PEM of the CA that signed the HTTPS server's certificate (the daemon trusts it through
    /// `SSL_CERT_FILE`).
    pub ca_pem: PathBuf,
    pub observed: Observed,
    files: tempfile::TempDir,
    servers: Option<tokio::runtime::Runtime>,
    daemon: Mutex<Option<Child>>,
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// Fail with the reason when the lab cannot be built on this host.
fn require_lab_host() {
    super::require_host();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the network tests create network namespaces and need root: run them as root \
         (e.g. `sudo -E cargo test --release -p moat --test e2e net::`)"
    );
    let has_ip = Command::new("ip").arg("-V").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        has_ip,
        "the network tests need `ip`: install it with: sudo apt-get install -y --no-install-recommends iproute2"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().expect("ip runs");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), text(&out.stderr));
}

/// Namespaces of labs whose test process is gone (killed before its Drop ran).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in text(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("moatlab-d-").or_else(|| name.strip_prefix("moatlab-s-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        // SAFETY: signal 0 only checks that the process exists.
        if pid != std::process::id() as i32 && unsafe { libc::kill(pid, 0) } != 0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Netlab {
    /// Build the namespaces and servers and start the lab daemon.
    pub fn start() -> Netlab {
        let mut lab = Netlab::without_daemon();
        lab.start_daemon();
        lab
    }

    /// The namespaces and servers only.
    pub fn without_daemon() -> Netlab {
        require_lab_host();
        remove_stale_namespaces();
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let d = Netns { name: format!("moatlab-d-{tag}") };
        let s = Netns { name: format!("moatlab-s-{tag}") };
        ip(&["netns", "add", &d.name]);
        // From here on, a failure tears down what exists.
        let mut lab = Netlab {
            d,
            s: Netns { name: String::new() },
            home: OwnHome::new(),
            ca_pem: PathBuf::new(),
            observed: Observed::default(),
            files: tempfile::tempdir().expect("a temp dir can be created"),
            servers: None,
            daemon: Mutex::new(None),
        };
        ip(&["netns", "add", &s.name]);
        lab.s = s;
        let (d, s) = (&lab.d.name, &lab.s.name);
        ip(&["-n", d, "link", "add", "veth-lab", "type", "veth", "peer", "name", "veth-lab", "netns", s]);
        for (ns, addrs) in [
            (d, vec![format!("{DAEMON_PUBLIC}/24"), format!("{DAEMON_PRIVATE}/24")]),
            (s, vec![format!("{SERVER_PUBLIC}/24"), format!("{SERVER_PRIVATE}/24"), format!("{DAEMON_NAT}/24")]),
        ] {
            for addr in &addrs {
                ip(&["-n", ns, "addr", "add", addr, "dev", "veth-lab"]);
            }
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", "veth-lab", "up"]);
        }
        lab.start_servers();
        lab
    }

    fn start_servers(&mut self) {
        let (ca_pem, tls) = test_pki();
        self.ca_pem = self.files.path().join("lab-ca.pem");
        std::fs::write(&self.ca_pem, ca_pem).expect("the lab's temp dir is writable");
        let (http, https, dns) = self.s.run(|| {
            let bind = |port| {
                let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                    .unwrap_or_else(|e| panic!("binding :{port} in the server namespace: {e}"));
                l.set_nonblocking(true).expect("a socket can be made non-blocking");
                l
            };
            let udp = |addr: Ipv4Addr, port| {
                let s = std::net::UdpSocket::bind((addr, port))
                    .unwrap_or_else(|e| panic!("binding udp {addr}:{port} in the server namespace: {e}"));
                s.set_nonblocking(true).expect("a socket can be made non-blocking");
                s
            };
            let dns = udp(Ipv4Addr::UNSPECIFIED, 53);
            let counters = [udp(SERVER_PUBLIC, UDP_PORT), udp(SERVER_PRIVATE, UDP_PORT)];
            (bind(80), bind(443), (dns, counters))
        });
        let (dns, counters) = dns;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("netlab")
            .enable_all()
            .build()
            .expect("a tokio runtime starts");
        let observed = self.observed.clone();
        rt.spawn(accept_loop(http, None, observed.clone()));
        rt.spawn(accept_loop(https, Some(tokio_rustls::TlsAcceptor::from(tls)), observed.clone()));
        for socket in counters {
            rt.spawn(count_datagrams(socket, observed.clone()));
        }
        rt.spawn(dns_server(dns, observed));
        self.servers = Some(rt);
    }

    /// Start `moat serve` for the lab's home inside `D`, trusting the lab's CA, and wait until it
    /// answers on its socket (the CLI, outside the namespace, then finds it there).
    fn start_daemon(&mut self) {
        let home = self.home.path();
        let log_path = home.join("daemon.log");
        let log = std::fs::File::create(&log_path).expect("the lab home is writable");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.d.name, "env"])
            .arg(format!("MOAT_HOME={}", home.display()))
            .arg(format!("SSL_CERT_FILE={}", self.ca_pem.display()))
            .args(["MOAT_IMAGE=minimal", "MOAT_LOG=info"])
            .arg(format!("MOAT_HOST_ADDRESSES={DAEMON_NAT}"))
            .arg(env!("CARGO_BIN_EXE_moat"))
            .args(["serve", "--idle-exit", "1h", "--home"])
            .arg(home)
            .env_remove("MOAT_KERNEL")
            .env_remove("MOAT_ACCEL")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a file handle can be cloned"))
            .stderr(log)
            .spawn()
            .expect("ip netns exec runs");
        *self.daemon.lock().unwrap() = Some(child);
        let started = Instant::now();
        while !health_ok(home) {
            self.assert_daemon_alive();
            assert!(
                started.elapsed() < DAEMON_START,
                "the lab daemon did not answer within {DAEMON_START:?}:\n{}",
                self.daemon_log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Panics with the daemon's log when the lab daemon has exited: every CLI call would otherwise
    /// start a new daemon outside the lab.
    pub fn assert_daemon_alive(&self) {
        let mut daemon = self.daemon.lock().unwrap_or_else(|e| e.into_inner());
        let Some(child) = daemon.as_mut() else { panic!("the lab has no daemon") };
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the lab daemon exited ({status}); its log ends:\n{}", self.daemon_log_tail());
        }
    }

    pub fn daemon_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.home.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The `moat` CLI for the lab's daemon (it runs outside the namespaces; only the daemon is in D).
    pub fn moat(&self) -> Command {
        self.assert_daemon_alive();
        moat_in(self.home.path())
    }

    /// Run `moat args`; it must succeed. Its stdout.
    pub fn moat_ok(&self, args: &[&str]) -> String {
        let out = self.moat().args(args).stdin(Stdio::null()).output().expect("moat runs");
        assert_eq!(out.status.code(), Some(0), "moat {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Run a closure on a thread inside `D` (e.g. to connect to the lab daemon's forwarded ports).
    pub fn in_d<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.d.run(f)
    }

    /// A TCP listener inside `D` on `addr`, counting the connections it accepts; for checking
    /// that a refused destination was never reached.
    pub fn listener_in_d(&self, addr: SocketAddr) -> CountingListener {
        let listener =
            self.in_d(|| std::net::TcpListener::bind(addr)).unwrap_or_else(|e| panic!("binding {addr} in D: {e}"));
        CountingListener::new(listener)
    }
}

impl Drop for Netlab {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // SAFETY: SIGTERM to the daemon this lab started (`ip netns exec` and `env` exec it).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Sandboxes outlive their daemon on purpose; the lab's must not outlive the lab.
        for pid in qemu_processes_mentioning(&self.home.path().display().to_string()) {
            // SAFETY: SIGKILL to a QEMU whose command line names this lab's own home.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let Some(rt) = self.servers.take() {
            rt.shutdown_background();
        }
        for ns in [&self.d, &self.s] {
            if !ns.name.is_empty() {
                let _ = Command::new("ip").args(["netns", "del", &ns.name]).status();
            }
        }
    }
}

/// Whether the daemon of `home` answers `GET /v1/health` on its socket.
fn health_ok(home: &Path) -> bool {
    let Ok(mut sock) = std::os::unix::net::UnixStream::connect(home.join("moat.sock")) else { return false };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    if sock.write_all(b"GET /v1/health HTTP/1.1\r\nHost: moat\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = sock.read_to_end(&mut response);
    response.starts_with(b"HTTP/1.1 200")
}

/// A listener that accepts and counts connections on a background thread, answering each with a
/// short HTTP response; it stops when dropped.
pub struct CountingListener {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

impl CountingListener {
    fn new(listener: std::net::TcpListener) -> CountingListener {
        let addr = listener.local_addr().expect("a bound listener has an address");
        listener.set_nonblocking(true).expect("a socket can be made non-blocking");
        let accepted = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nreached\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        CountingListener { addr, accepted, stop }
    }

    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A fresh CA and a leaf for the lab's names signed by it: (the CA's PEM, the server config).
fn test_pki() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("an ECDSA key can be generated");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("empty SANs are valid");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "moat netlab test CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).expect("the CA signs itself");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().expect("an ECDSA key can be generated");
    let mut names: Vec<String> = LAB_NAMES.iter().map(|n| n.to_string()).collect();
    names.push(SERVER_PUBLIC.to_string());
    let mut leaf_params = CertificateParams::new(names).expect("the lab's names are valid SANs");
    leaf_params.distinguished_name.push(DnType::CommonName, "api.test");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("the CA signs the leaf");

    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
        .expect("the leaf and its key match");
    (ca_cert.pem(), Arc::new(config))
}

async fn accept_loop(listener: std::net::TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, observed: Observed) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a non-blocking listener registers with tokio");
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let Ok(local) = stream.local_addr() else { continue };
        observed.connections.lock().unwrap_or_else(|e| e.into_inner()).push((local, peer));
        let (tls, observed) = (tls.clone(), observed.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_http(stream, "http", local, peer, None, &observed).await,
                Some(acceptor) => {
                    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(30), acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let sni = stream.get_ref().1.server_name().map(str::to_string);
                    serve_http(stream, "https", local, peer, sni, &observed).await
                }
            }
        });
    }
}

/// Answer the requests of one connection, in order, until the client asks to close (HTTP/1.0, or
/// `Connection: close`) or stops sending: 200 with the request line and headers as the body
/// (`/noecho`: just `ok`; `/bytes/N`: N bytes; `/reflect…`: a 404 that reflects the request the
/// way careless servers do, in `Location`, `Set-Cookie`, a header and the body).
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    scheme: &'static str,
    local: SocketAddr,
    peer: SocketAddr,
    sni: Option<String>,
    observed: &Observed,
) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if pending.len() > MAX_HEAD {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&buf[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
        pending.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let seen = Seen { scheme, local, peer, sni: sni.clone(), request_line, headers };
        let path = seen.path().to_string();
        let close = seen.request_line.ends_with("HTTP/1.0")
            || seen.header("Connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let auth = seen.header("Authorization").unwrap_or("").to_string();
        observed.requests.lock().unwrap_or_else(|e| e.into_inner()).push(seen);
        let connection = if close { "close" } else { "keep-alive" };

        if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<u64>().ok()) {
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {connection}\r\n\r\n"
            );
            if stream.write_all(header.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let part = left.min(chunk.len() as u64) as usize;
                if stream.write_all(&chunk[..part]).await.is_err() {
                    return;
                }
                left -= part as u64;
            }
        } else {
            let (status, extra, body) = if path.starts_with("/reflect") {
                let query = path.split_once('?').map_or("", |(_, q)| q);
                (
                    "404 Not Found",
                    format!("Location: https://api.test/moved?{query}\r\nSet-Cookie: last={query}\r\nX-Echo-Auth: {auth}\r\n"),
                    format!("no such page: {head}\r\n"),
                )
            } else if path == "/noecho" || path.starts_with("/noecho/") {
                ("200 OK", String::new(), "ok\n".to_string())
            } else {
                ("200 OK", String::new(), format!("{head}\r\n"))
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n{extra}Content-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
        if close {
            break;
        }
    }
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

async fn dns_server(socket: std::net::UdpSocket, observed: Observed) {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
    let socket = tokio::net::UdpSocket::from_std(socket).expect("a non-blocking socket registers with tokio");
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
        if query.metadata.message_type != MessageType::Query {
            continue;
        }
        let mut response = Message::response(query.metadata.id, query.metadata.op_code);
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.metadata.authoritative = true;
        let mut known = true;
        for q in &query.queries {
            let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
            observed.dns.lock().unwrap_or_else(|e| e.into_inner()).push((name.clone(), q.query_type().to_string()));
            response.add_query(q.clone());
            let wild = name.ends_with(&format!(".{WILD_DOMAIN}"));
            if !LAB_NAMES.contains(&name.as_str()) && !wild {
                known = false;
            } else if q.query_type() == RecordType::A {
                response.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(SERVER_PUBLIC))));
            }
        }
        if !known {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        if let Ok(bytes) = response.to_vec() {
            let _ = socket.send_to(&bytes, from).await;
        }
    }
}

async fn count_datagrams(socket: std::net::UdpSocket, observed: Observed) {
    let socket = tokio::net::UdpSocket::from_std(socket).expect("a non-blocking socket registers with tokio");
    let local = socket.local_addr().expect("a bound socket has an address");
    let mut buf = vec![0u8; 2048];
    loop {
        if let Ok((_, peer)) = socket.recv_from(&mut buf).await {
            observed.datagrams.lock().unwrap_or_else(|e| e.into_inner()).push((local, peer));
        }
    }
}
