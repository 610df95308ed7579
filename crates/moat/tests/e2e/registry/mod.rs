//! A real OCI registry on loopback for end-to-end pull tests: Debian's `docker-registry`
//! (distribution 2.8) with filesystem storage in a tempdir, optional htpasswd auth, images pushed
//! with `skopeo`, plus a proxy that can cut the connection mid-transfer.
#![allow(dead_code)] // Each test file uses a different part of the fixture.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INSTALL: &str = "install it with: apt-get install -y docker-registry skopeo apache2-utils";
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const LOG: &str = "registry.log";

/// A `docker-registry` process serving 127.0.0.1:PORT over plain HTTP; killed on drop.
pub struct Registry {
    // Declared before `dir`: the process dies before its storage is removed.
    process: Process,
    port: u16,
    creds: Option<(String, String)>,
    dir: tempfile::TempDir,
}

/// A child process killed (and reaped) on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Registry {
    /// Start a registry; with `auth`, it requires HTTP basic auth as that user (htpasswd, bcrypt).
    /// Returns once `GET /v2/` answers.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        for tool in [REGISTRY_BIN, "/usr/bin/skopeo"] {
            assert!(Path::new(tool).exists(), "the registry tests need {tool}: {INSTALL}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        let mut auth_section = String::new();
        if let Some((user, password)) = &creds {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, bcrypt_line(user, password)).expect("tempdir is writable");
            auth_section = format!("auth:\n  htpasswd:\n    realm: moat-test\n    path: {}\n", htpasswd.display());
        }
        // The port is chosen by binding :0 then releasing it; another process may take it before
        // the registry binds, so a failure to listen is retried on another port.
        let mut log = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: info\n\
                     storage:\n  filesystem:\n    rootdirectory: {root}\n  \
                     maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: moat-test-secret\n\
                     {auth_section}",
                    root = dir.path().join("storage").display(),
                ),
            )
            .expect("tempdir is writable");
            let log_file = std::fs::File::create(dir.path().join(LOG)).expect("tempdir is writable");
            let mut cmd = Command::new(REGISTRY_BIN);
            cmd.arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("a log file descriptor"))
                .stderr(log_file);
            // REGISTRY_* variables override the config file; the test's config must be the one used.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(k);
                }
            }
            let child = cmd.spawn().unwrap_or_else(|e| panic!("{REGISTRY_BIN} does not start: {e}; {INSTALL}"));
            // From here the registry is killed on drop, even if waiting for it panics.
            let mut process = Process(child);
            match wait_ready(&mut process, port, creds.is_some()) {
                Ok(()) => return Registry { process, port, creds, dir },
                Err(why) => {
                    drop(process);
                    log = format!("{why}; its log ends with:\n{}", log_tail(dir.path()));
                    if !log.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("the registry did not start: {log}");
    }

    /// `127.0.0.1:PORT`, with no scheme: the registry speaks plain HTTP.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The user and password the registry requires, if any.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The registry's log file (one line per request at level info).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG)
    }

    /// The registry's log so far (last 40 lines), for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// Push the image tagged `tag_in_layout` in the OCI layout directory `layout_dir` to
    /// `repo_and_tag` (e.g. `moat/hello:1`) with skopeo, keeping an index as an index (`--all`).
    pub fn push(&self, layout_dir: &Path, tag_in_layout: &str, repo_and_tag: &str) {
        let skopeo_tmp = self.dir.path().join("skopeo-tmp");
        std::fs::create_dir_all(&skopeo_tmp).expect("tempdir is writable");
        // No registries.conf or auth file from the host: this push talks to loopback only.
        let registries_conf = self.dir.path().join("registries.conf");
        std::fs::write(&registries_conf, "").expect("tempdir is writable");
        let mut cmd = Command::new("/usr/bin/skopeo");
        cmd.args(["--insecure-policy", "--registries-conf"])
            .arg(&registries_conf)
            .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
            .env("TMPDIR", &skopeo_tmp)
            .env("REGISTRY_AUTH_FILE", self.dir.path().join("auth.json"))
            .stdin(Stdio::null());
        match self.creds() {
            Some((user, password)) => cmd.arg("--dest-creds").arg(format!("{user}:{password}")),
            None => cmd.arg("--dest-no-creds"),
        };
        cmd.arg(format!("oci:{}:{tag_in_layout}", layout_dir.display()))
            .arg(format!("docker://{}/{repo_and_tag}", self.addr()));
        let out = cmd.output().unwrap_or_else(|e| panic!("skopeo does not start: {e}; {INSTALL}"));
        assert!(
            out.status.success(),
            "skopeo copy {tag_in_layout} -> {repo_and_tag} failed: {}\nregistry log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// Where the registry keeps the bytes of blob `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256: digest");
        self.dir.path().join(format!("storage/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// Replace the stored bytes of blob `digest` with different bytes of the same length: the
    /// registry still serves it under that digest, so a pull sees a digest mismatch.
    pub fn corrupt_blob(&self, digest: &str) {
        let path = self.blob_path(digest);
        let mut data = std::fs::read(&path).unwrap_or_else(|e| panic!("blob {digest} is stored at {path:?}: {e}"));
        assert!(!data.is_empty(), "blob {digest} is empty: nothing to corrupt");
        for b in &mut data {
            *b ^= 0xff;
        }
        std::fs::write(&path, data).expect("registry storage is writable");
    }

    /// `GET path` on the registry, with the registry's credentials when it has some.
    pub fn get(&self, path: &str, accept: &str) -> HttpResponse {
        let auth = self.creds().map(|(u, p)| basic_auth(u, p));
        let mut headers = vec![("Accept", accept.to_string())];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        http_get(&self.addr(), path, &headers)
    }

    /// Put `body` on the registry as a blob (one monolithic upload); its digest.
    pub fn put_blob(&self, repo: &str, body: &[u8]) -> String {
        use sha2::Digest;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(body)));
        let started = self.send("POST", &format!("/v2/{repo}/blobs/uploads/"), "", &[]);
        assert_eq!(started.status, 202, "starting an upload: {started:?}");
        let location = started.header("location").expect("an upload location").to_string();
        let path = location
            .split_once("127.0.0.1")
            .map_or(location.as_str(), |(_, rest)| &rest[rest.find('/').unwrap_or(0)..]);
        let sep = if path.contains('?') { '&' } else { '?' };
        let done = self.send("PUT", &format!("{path}{sep}digest={digest}"), "application/octet-stream", body);
        assert_eq!(done.status, 201, "finishing an upload: {done:?}");
        digest
    }

    /// Put a manifest under `repo:tag`.
    pub fn put_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) {
        let done = self.send("PUT", &format!("/v2/{repo}/manifests/{tag}"), media_type, body);
        assert_eq!(done.status, 201, "putting a manifest: {done:?} {}", String::from_utf8_lossy(&done.body));
    }

    fn send(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> HttpResponse {
        let mut head =
            format!("{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n", self.addr(), body.len());
        if !content_type.is_empty() {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        if let Some((u, p)) = self.creds() {
            head.push_str(&format!("Authorization: {}\r\n", basic_auth(u, p)));
        }
        let mut stream = TcpStream::connect(self.addr()).expect("the registry listens");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("a socket takes a timeout");
        stream
            .write_all(format!("{head}\r\n").as_bytes())
            .and_then(|()| stream.write_all(body))
            .expect("a request is sent");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("a response arrives");
        parse_response(&raw).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

/// Poll `GET /v2/` until the registry answers as configured: 200, or 401 when it requires auth.
fn wait_ready(process: &mut Process, port: u16, auth: bool) -> Result<(), String> {
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = process.0.try_wait() {
            return Err(format!("it exited ({status})"));
        }
        if let Ok(resp) = try_http_get(&addr, "/v2/", &[]) {
            return match (resp.status, auth) {
                (200, false) | (401, true) => Ok(()),
                (s, _) => Err(format!("GET /v2/ answered {s}")),
            };
        }
        if Instant::now() > deadline {
            return Err("GET /v2/ did not answer in 15s".to_string());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last 40 lines of the registry log in `dir`.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join(LOG)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// An htpasswd line with a bcrypt hash (the only kind distribution accepts), made by `htpasswd`.
fn bcrypt_line(user: &str, password: &str) -> String {
    let out = Command::new("htpasswd")
        .args(["-B", "-b", "-n", user, password])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("htpasswd (apache2-utils) does not run: {e}; {INSTALL}"));
    assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).expect("htpasswd prints text");
    assert!(line.starts_with(&format!("{user}:$2y$")), "htpasswd -B makes a bcrypt line: {line}");
    line
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// `Basic <base64(user:password)>`.
pub fn basic_auth(user: &str, password: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A response read whole from an HTTP/1.0 exchange.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

/// A plain `GET` over HTTP/1.0 (so the server closes the connection and never chunks).
pub fn http_get(addr: &str, path: &str, headers: &[(&str, String)]) -> HttpResponse {
    try_http_get(addr, path, headers).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// Send a `GET` over HTTP/1.0 and return whatever arrives (headers and body) until the connection
/// closes or fails: for looking at truncated responses.
pub fn http_get_raw(addr: &str, path: &str, headers: &[(&str, String)]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("a socket takes a timeout");
    stream.write_all(request(addr, path, headers).as_bytes()).unwrap_or_else(|e| panic!("send to {addr}: {e}"));
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        raw.extend_from_slice(&buf[..n]);
    }
    raw
}

fn request(addr: &str, path: &str, headers: &[(&str, String)]) -> String {
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request + "\r\n"
}

fn try_http_get(addr: &str, path: &str, headers: &[(&str, String)]) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(request(addr, path, headers).as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse { status, headers, body: raw[split + 4..].to_vec() })
}

/// A TCP proxy on loopback in front of the registry that can play "the registry went down
/// mid-pull": after a budget of bytes towards the client it closes every connection and closes
/// each new one on accept, until `set_pass`.
pub struct CutProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept_thread: Option<std::thread::JoinHandle<()>>,
}

struct ProxyShared {
    upstream: String,
    state: Mutex<ProxyState>,
    to_client: AtomicU64,
    stopping: AtomicBool,
}

struct ProxyState {
    mode: Mode,
    next_id: u64,
    /// Both sockets of every open connection, to shut them down when the link is cut.
    open: Vec<(u64, TcpStream, TcpStream)>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Pass,
    /// This many more bytes may go to clients.
    Budget(u64),
    Down,
}

impl CutProxy {
    /// A proxy to `upstream` (`host:port`), passing everything.
    pub fn start(upstream: &str) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().expect("bound socket has an address").port();
        let shared = Arc::new(ProxyShared {
            upstream: upstream.to_string(),
            state: Mutex::new(ProxyState { mode: Mode::Pass, next_id: 0, open: Vec::new() }),
            to_client: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let accept_thread = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if s.state.lock().expect("proxy state lock").mode == Mode::Down {
                    drop(client);
                    continue;
                }
                let s = Arc::clone(&s);
                std::thread::spawn(move || relay(&s, client));
            }
        });
        CutProxy { port, shared, accept_thread: Some(accept_thread) }
    }

    /// `127.0.0.1:PORT` of the proxy: use it as the registry address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Forward everything, and accept connections again after a cut.
    pub fn set_pass(&self) {
        self.shared.state.lock().expect("proxy state lock").mode = Mode::Pass;
    }

    /// From now on, forward at most `bytes` more bytes from the registry to clients (in total,
    /// across connections); then close every connection, and close new ones as they arrive.
    pub fn set_cut_after(&self, bytes: u64) {
        let mut state = self.shared.state.lock().expect("proxy state lock");
        state.mode = Mode::Budget(bytes);
        if bytes == 0 {
            cut(&mut state);
        }
    }

    /// Bytes forwarded from the registry to clients since the proxy started.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::SeqCst)
    }

    /// Whether the budget of `set_cut_after` ran out (the link is down).
    pub fn is_cut(&self) -> bool {
        self.shared.state.lock().expect("proxy state lock").mode == Mode::Down
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        cut(&mut self.shared.state.lock().expect("proxy state lock"));
        // Wake the accept loop so it sees `stopping`.
        let _ = TcpStream::connect(self.addr());
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn cut(state: &mut ProxyState) {
    state.mode = Mode::Down;
    for (_, a, b) in state.open.drain(..) {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    }
}

fn relay(shared: &Arc<ProxyShared>, client: TcpStream) {
    let Ok(upstream) = TcpStream::connect(&shared.upstream) else { return };
    let (Ok(client_r), Ok(upstream_w), Ok(client_k), Ok(upstream_k)) =
        (client.try_clone(), upstream.try_clone(), client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let id = {
        let mut state = shared.state.lock().expect("proxy state lock");
        if state.mode == Mode::Down {
            return;
        }
        state.next_id += 1;
        let id = state.next_id;
        state.open.push((id, client_k, upstream_k));
        id
    };
    // Client to registry: unmetered.
    let requests = std::thread::spawn(move || {
        let (mut from, mut to) = (client_r, upstream_w);
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
    // Registry to client: metered against the budget.
    let (mut from, mut to) = (upstream, client);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let allowed = {
            let mut state = shared.state.lock().expect("proxy state lock");
            match state.mode {
                Mode::Pass => n,
                Mode::Down => 0,
                Mode::Budget(left) => {
                    let allowed = n.min(usize::try_from(left).unwrap_or(usize::MAX));
                    state.mode = Mode::Budget(left - allowed as u64);
                    allowed
                }
            }
        };
        // Counted before writing, so a client that has read N bytes sees a count of at least N.
        shared.to_client.fetch_add(allowed as u64, Ordering::SeqCst);
        if allowed > 0 && to.write_all(&buf[..allowed]).is_err() {
            break;
        }
        if allowed < n || shared.state.lock().expect("proxy state lock").mode == Mode::Budget(0) {
            cut(&mut shared.state.lock().expect("proxy state lock"));
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
    let _ = requests.join();
    shared.state.lock().expect("proxy state lock").open.retain(|(i, _, _)| *i != id);
}
