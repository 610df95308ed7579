//! A network lab for `bench/run --only net`: the modes that act on names (allowlist, secret
//! interception) need the guest to reach a *name* at a public-looking address that is not the
//! host's own; the host's loopback, reached with `--allow-cidr`, skips every name check. Two
//! network namespaces joined by a veth pair, with no route out of them:
//!
//! ```text
//!   D: 198.51.100.1/24  ── veth ──  S: 198.51.100.10/24
//!      moat serve → guests            HTTP :80, HTTPS :443 (bench.test, signed by the bench's CA)
//! ```
//!
//! The daemon in D trusts the bench's CA through `SSL_CERT_FILE`; the guests are given the name
//! with `--add-host bench.test:198.51.100.10`, which moat's DNS answers itself. Creating
//! namespaces needs root.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// The name the guests reach, and the address moat's DNS gives them for it (TEST-NET-2: public as
/// far as moat's policy is concerned, routed nowhere).
pub const NAME: &str = "bench.test";
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const DAEMON: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Namespaces and temp dirs are named `moatbench-…-PID`, so that a later run can tell those of a
/// killed run (its pid is gone) from those of a run still going.
const PREFIX: &str = "moatbench";
/// A fresh home builds its initramfs and the `minimal` image before the daemon answers.
const DAEMON_START: Duration = Duration::from_secs(180);
/// Largest request head the servers read.
const MAX_HEAD: usize = 16 * 1024;

/// A request the servers saw on a `/probe/…` path (the bench's checks that each mode is what it
/// claims to be); the timed requests are not recorded.
#[derive(Clone, Debug)]
pub struct Probe {
    pub path: String,
    pub authorization: Option<String>,
}

/// A named network namespace (`ip netns add`), deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> anyhow::Result<Netns> {
        ip(&["netns", "add", &name])?;
        Ok(Netns { name })
    }

    /// Run `f` on a thread that has entered this namespace: sockets it creates live there, and
    /// stay there whichever thread uses them later.
    fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                    rustix::thread::move_into_link_name_space(
                        file.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .with_context(|| format!("entering the network namespace {}", self.name))?;
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// The lab: namespaces, servers, and a moat daemon of its own home inside D. Dropping it stops the
/// daemon and its guests and removes the rest.
pub struct Lab {
    /// The lab daemon's `MOAT_HOME`.
    pub home: PathBuf,
    /// The PEM of the CA that signed the HTTPS server's certificate.
    pub ca_pem: PathBuf,
    probes: Arc<Mutex<Vec<Probe>>>,
    moat_bin: PathBuf,
    daemon: Mutex<Option<Child>>,
    servers: Vec<JoinHandle<()>>,
    // Dropped in this order, after `Drop for Lab` has stopped the daemon: the namespaces, then
    // the directory holding the home.
    d: Netns,
    s: Netns,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// Build the namespaces, start the servers in S (on `rt`) and the lab daemon in D.
    pub fn start(moat_bin: &Path, rt: &Handle) -> anyhow::Result<Lab> {
        if !rustix::process::geteuid().is_root() {
            bail!(
                "measuring allowlist and intercept modes creates network namespaces, which needs root\n\
                 hint: run `sudo bench/run --only net`"
            );
        }
        if !Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()) {
            bail!("`ip` is missing\nhint: sudo apt-get install -y --no-install-recommends iproute2");
        }
        remove_stale();
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}-{pid}-"))
            .tempdir()
            .context("creating the lab's temp dir")?;
        let d = Netns::add(format!("{PREFIX}-d-{pid}"))?;
        let s = Netns::add(format!("{PREFIX}-s-{pid}"))?;
        ip(&["-n", &d.name, "link", "add", "veth-b", "type", "veth", "peer", "name", "veth-b", "netns", &s.name])?;
        for (ns, addr) in [(&d.name, DAEMON), (&s.name, SERVER)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "veth-b"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "veth-b", "up"])?;
        }
        let (ca_pem, tls) = pki()?;
        let ca_path = dir.path().join("bench-ca.pem");
        std::fs::write(&ca_path, ca_pem).with_context(|| format!("writing {}", ca_path.display()))?;
        let home = dir.path().join("home");
        let mut lab = Lab {
            home,
            ca_pem: ca_path,
            probes: Arc::default(),
            moat_bin: moat_bin.to_path_buf(),
            daemon: Mutex::new(None),
            servers: Vec::new(),
            d,
            s,
            _dir: dir,
        };
        let (http, https) = lab.s.run(|| {
            let bind = |port| -> anyhow::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                    .with_context(|| format!("binding :{port} in {}", lab.s.name))?;
                l.set_nonblocking(true)?;
                Ok(l)
            };
            Ok((bind(80)?, bind(443)?))
        })?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        lab.servers.push(rt.spawn(accept_loop(http, None, lab.probes.clone())));
        lab.servers.push(rt.spawn(accept_loop(https, Some(acceptor), lab.probes.clone())));
        lab.start_daemon(rt)?;
        Ok(lab)
    }

    /// `moat serve` for the lab's home inside D, trusting the bench's CA; waits until it answers.
    /// The CLI runs outside the namespaces and finds it by its socket.
    fn start_daemon(&mut self, rt: &Handle) -> anyhow::Result<()> {
        std::fs::create_dir(&self.home).with_context(|| format!("creating {}", self.home.display()))?;
        let log = std::fs::File::create(self.home.join("daemon.log")).context("creating the lab daemon's log")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.d.name, "env"])
            .arg(format!("MOAT_HOME={}", self.home.display()))
            .arg(format!("SSL_CERT_FILE={}", self.ca_pem.display()))
            .arg("MOAT_LOG=info")
            .arg(&self.moat_bin)
            // Every guest boots: a restored template and a booted guest need not run alike, and
            // the modes must differ in nothing else.
            .args(["serve", "--no-templates", "--home"])
            .arg(&self.home)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting `ip netns exec … moat serve`")?;
        *self.daemon.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let client = moat_client::Client::new(&self.home.join("moat.sock"));
        let started = Instant::now();
        while rt.block_on(client.health()).is_err() {
            self.check_daemon()?;
            if started.elapsed() > DAEMON_START {
                bail!("the lab daemon did not answer within {DAEMON_START:?}; its log ends:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Fails with the daemon's log when the lab daemon has exited: the CLI would otherwise start
    /// a new daemon outside the lab, and measure something else.
    fn check_daemon(&self) -> anyhow::Result<()> {
        let mut daemon = self.daemon.lock().unwrap_or_else(|e| e.into_inner());
        match daemon.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => bail!("the lab daemon exited ({status}); its log ends:\n{}", self.log_tail()),
            Some(Err(e)) => bail!("waiting on the lab daemon: {e}"),
            None => bail!("the lab has no daemon"),
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.home.join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Run the `moat` CLI against the lab daemon, with `env` added; its stdout.
    pub fn moat(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
        self.check_daemon()?;
        let out = Command::new(&self.moat_bin)
            .args(args)
            .env("MOAT_HOME", &self.home)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .context("running moat")?;
        if !out.status.success() {
            bail!("`moat {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CPU time (user and system) the lab daemon has used so far, in seconds.
    pub fn daemon_cpu_seconds(&self) -> anyhow::Result<f64> {
        let pid = self.daemon.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(Child::id);
        let pid = pid.context("the lab has no daemon")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading the lab daemon's CPU time")?;
        // After `(comm)`, whose name may hold spaces: state is field 3, utime 14 and stime 15, in
        // USER_HZ ticks: 1/100 s on the architectures moat runs on (x86-64, arm64).
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        match (ticks(11), ticks(12)) {
            (Some(user), Some(system)) => Ok((user + system) as f64 / 100.0),
            _ => bail!("unexpected /proc/{pid}/stat: {stat:?}"),
        }
    }

    /// The `/probe/…` requests the servers have seen, oldest first.
    pub fn probes(&self) -> Vec<Probe> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Guests outlive their daemon on purpose, and each runs in namespaces of its own jail, not
        // in D: the lab daemon removes them while it still can.
        if let Ok(ids) = self.moat(&["ps", "-a", "-q"], &[]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.moat(&[&["rm", "-f"][..], &ids].concat(), &[]);
            }
        }
        if let Some(mut child) = self.daemon.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // `ip netns exec` and `env` exec the daemon, so the child's pid is the daemon's.
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever else the lab daemon started in D.
        kill_members(&self.d.name);
        for server in &self.servers {
            server.abort();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The processes inside namespace `ns` (`ip netns pids`).
fn members(ns: &str) -> Vec<rustix::process::Pid> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).stderr(Stdio::null()).output() else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().filter_map(|p| p.parse().ok()).filter_map(rustix::process::Pid::from_raw).collect()
}

/// Stop every process in the lab's namespace D (the daemon and the guests it started): SIGTERM,
/// then SIGKILL what is left after a grace period.
fn kill_members(ns: &str) {
    use rustix::process::{kill_process, Signal};
    for pid in members(ns) {
        let _ = kill_process(pid, Signal::Term);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !members(ns).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in members(ns) {
        let _ = kill_process(pid, Signal::Kill);
    }
}

/// What a killed bench run left behind: its namespaces (with the daemon and guests still in D)
/// and its temp dir. A run is stale when its pid no longer exists.
fn remove_stale() {
    let alive = |pid: &str| {
        pid.parse::<i32>().ok().and_then(rustix::process::Pid::from_raw).is_some_and(|p| {
            p.as_raw_nonzero().get() == std::process::id() as i32 || rustix::process::test_kill_process(p).is_ok()
        })
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(pid) =
                name.strip_prefix(&format!("{PREFIX}-d-")).or_else(|| name.strip_prefix(&format!("{PREFIX}-s-")))
            else {
                continue;
            };
            if !alive(pid) {
                kill_members(name);
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&format!("{PREFIX}-")).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        if !alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A fresh CA and a leaf for [`NAME`] signed by it: (the CA's PEM, the server's config).
fn pki() -> anyhow::Result<(String, Arc<rustls::ServerConfig>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "moat bench CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec![NAME.to_string()])?;
    leaf_params.distinguished_name.push(DnType::CommonName, NAME);
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)?;
    Ok((ca_cert.pem(), Arc::new(config)))
}

async fn accept_loop(
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    probes: Arc<Mutex<Vec<Probe>>>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (tls, probes) = (tls.clone(), probes.clone());
        tokio::spawn(async move {
            match tls {
                None => serve(stream, &probes).await,
                Some(acceptor) => {
                    if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(30), acceptor.accept(stream)).await
                    {
                        serve(stream, &probes).await
                    }
                }
            }
        });
    }
}

/// Answer one request and close: `/bytes/N` gets N bytes, anything else `ok`.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, probes: &Mutex<Vec<Probe>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if head.len() > MAX_HEAD {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next().and_then(|l| l.split(' ').nth(1)).unwrap_or("/").to_string();
    if path.starts_with("/probe/") {
        let authorization = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim().to_string());
        probes.lock().unwrap_or_else(|e| e.into_inner()).push(Probe { path: path.clone(), authorization });
    }
    let bytes: Option<u64> = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok());
    let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", bytes.unwrap_or(3));
    if stream.write_all(header.as_bytes()).await.is_err() {
        return;
    }
    match bytes {
        None => {
            let _ = stream.write_all(b"ok\n").await;
        }
        Some(n) => {
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let part = left.min(chunk.len() as u64) as usize;
                if stream.write_all(&chunk[..part]).await.is_err() {
                    return;
                }
                left -= part as u64;
            }
        }
    }
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}
