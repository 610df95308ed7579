//! Network benchmarks (`bench/run --only net`): a guest downloading from an HTTP server on the
//! host's loopback (`10.0.2.2:PORT`, let through with `--allow-cidr 127.0.0.1/32`) through moat's
//! userspace stack, and the rate of small sequential requests — each next to the same busybox
//! client run on the host against the same server, and next to the guest talking to a server on
//! its own loopback (what the guest's CPU under emulation allows, without moat in the path).
//!
//! Then moat's network modes side by side, in a lab of network namespaces (lab.rs) where the guest
//! reaches `bench.test` at a public-looking address: default egress, allowlist mode (the flow
//! admitted by name, every HTTP request's Host checked) and secret interception (HTTPS terminated
//! by moat and re-encrypted). Like is compared with like: allowlist HTTP with default HTTP,
//! intercepted HTTPS with default HTTPS (which moat relays opaquely).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::files::moat;
use crate::lab::{self, Lab};

const BOX: &str = "bench-net";
/// The guest's own server, for the guest-loopback baselines.
const GUEST_HTTPD: &str = "127.0.0.1:8000";

pub async fn bench(moat_bin: &Path, home: &Path, runs: usize, mib: usize, requests: usize) -> anyhow::Result<()> {
    if mib == 0 || requests == 0 {
        bail!("--net-mib and --conns must be at least 1");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the host's HTTP server")?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(serve(listener));
    let _ = moat(moat_bin, home, &["rm", "-f", BOX]);
    // The measurement waits on child processes; the server keeps the runtime's workers.
    let (bin, dir) = (moat_bin.to_path_buf(), home.to_path_buf());
    let measured = tokio::task::spawn_blocking(move || measure(&bin, &dir, port, runs, mib, requests))
        .await
        .context("the measurement panicked")
        .and_then(|r| r);
    let removed = moat(moat_bin, home, &["rm", "-f", BOX]).map(drop);
    server.abort();
    measured.and(removed)?;
    let (bin, rt) = (moat_bin.to_path_buf(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || modes(&bin, &rt, runs, mib, requests))
        .await
        .context("the measurement panicked")?
}

fn measure(moat_bin: &Path, home: &Path, port: u16, runs: usize, mib: usize, requests: usize) -> anyhow::Result<()> {
    let bytes = mib << 20;
    moat(
        moat_bin,
        home,
        &["run", "-d", "--name", BOX, "--image", "minimal", "--memory", "512", "--allow-cidr", "127.0.0.1/32"],
    )?;
    // The guest's own server: a file of the same size in its page cache, and a small one.
    let setup = format!(
        "mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/big bs=1M count={mib} 2>/dev/null && echo ok > /tmp/www/small"
    );
    moat(moat_bin, home, &["exec", BOX, "--", "sh", "-c", &setup])?;
    moat(moat_bin, home, &["exec", "-d", BOX, "--", "httpd", "-f", "-p", GUEST_HTTPD, "-h", "/tmp/www"])?;
    // The first request also proves the path works before anything is timed.
    guest_seconds(moat_bin, home, &format!("wget -q -O /dev/null http://10.0.2.2:{port}/"))?;
    guest_seconds(moat_bin, home, &format!("wget -q -O /dev/null http://{GUEST_HTTPD}/small"))?;

    let host_url = format!("http://127.0.0.1:{port}/bytes/{bytes}");
    let guest_url = format!("http://10.0.2.2:{port}/bytes/{bytes}");
    let (mut via_moat, mut on_host, mut guest_local) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so noise hits all three alike.
    for _ in 0..runs {
        via_moat.push(guest_seconds(moat_bin, home, &format!("wget -q -O /dev/null {guest_url}"))?);
        on_host.push(host_seconds(&format!("busybox wget -q -O /dev/null {host_url}"))?);
        guest_local.push(guest_seconds(moat_bin, home, &format!("wget -q -O /dev/null http://{GUEST_HTTPD}/big"))?);
    }
    let mbs = |secs: f64| bytes as f64 / 1e6 / secs;
    let (moat_rate, host_rate, local_rate) = (mbs(median(via_moat)), mbs(median(on_host)), mbs(median(guest_local)));
    println!("\nnetwork: download of {mib} MiB over HTTP with busybox wget (median of {runs})");
    println!("  guest → host loopback via moat {moat_rate:>10.1} MB/s");
    println!("  host → host loopback (baseline){host_rate:>10.1} MB/s");
    println!("  guest → guest loopback (base.) {local_rate:>10.1} MB/s");
    println!("  host / moat                    {:>10.2}x", host_rate / moat_rate);
    println!("  guest loopback / moat          {:>10.2}x", local_rate / moat_rate);

    let lp = |url: &str, client: &str| {
        format!("i=0; while [ $i -lt {requests} ]; do {client} -q -O /dev/null {url} || exit 1; i=$((i+1)); done")
    };
    let via_moat = guest_seconds(moat_bin, home, &lp(&format!("http://10.0.2.2:{port}/"), "wget"))?;
    let on_host = host_seconds(&lp(&format!("http://127.0.0.1:{port}/"), "busybox wget"))?;
    let guest_local = guest_seconds(moat_bin, home, &lp(&format!("http://{GUEST_HTTPD}/small"), "wget"))?;
    let per_sec = |secs: f64| requests as f64 / secs;
    let (moat_rate, host_rate, local_rate) = (per_sec(via_moat), per_sec(on_host), per_sec(guest_local));
    println!("\nnetwork: {requests} sequential small requests, one connection and one wget each");
    println!("  guest → host loopback via moat {moat_rate:>10.1} conn/s");
    println!("  host → host loopback (baseline){host_rate:>10.1} conn/s");
    println!("  guest → guest loopback (base.) {local_rate:>10.1} conn/s");
    println!("  host / moat                    {:>10.2}x", host_rate / moat_rate);
    println!("  guest loopback / moat          {:>10.2}x", local_rate / moat_rate);
    Ok(())
}

/// The lab's sandboxes, one per mode.
const DEFAULT_BOX: &str = "bench-default";
const ALLOW_BOX: &str = "bench-allow";
const SECRET_BOX: &str = "bench-secret";
/// The bench's CA in the default-mode guest, so that its HTTPS client verifies like the
/// intercepted one does (against moat's CA, through the `SSL_CERT_FILE` moat sets).
const GUEST_BENCH_CA: &str = "/etc/bench-ca.pem";

/// One way from a guest to `bench.test`: the sandbox (and so the mode) and the scheme.
struct Route {
    label: &'static str,
    sandbox: &'static str,
    base: &'static str,
    /// The client verifies the server against the bench's CA (HTTPS relayed as it is).
    bench_ca: bool,
    /// The route this one is compared with, by index in [`ROUTES`].
    baseline: Option<usize>,
}

const ROUTES: [Route; 4] = [
    Route { label: "HTTP  default", sandbox: DEFAULT_BOX, base: "http://bench.test", bench_ca: false, baseline: None },
    Route {
        label: "HTTP  allowlist",
        sandbox: ALLOW_BOX,
        base: "http://bench.test",
        bench_ca: false,
        baseline: Some(0),
    },
    Route {
        label: "HTTPS default (relayed)",
        sandbox: DEFAULT_BOX,
        base: "https://bench.test",
        bench_ca: true,
        baseline: None,
    },
    Route {
        label: "HTTPS intercept",
        sandbox: SECRET_BOX,
        base: "https://bench.test",
        bench_ca: false,
        baseline: Some(2),
    },
];

/// Default egress, allowlist and interception, measured interleaved in one lab.
fn modes(moat_bin: &Path, rt: &tokio::runtime::Handle, runs: usize, mib: usize, requests: usize) -> anyhow::Result<()> {
    use rand::Rng;
    let lab = Lab::start(moat_bin, rt)?;
    let token: String =
        rand::thread_rng().sample_iter(&rand::distributions::Alphanumeric).take(32).map(char::from).collect();
    let add_host = format!("{}:{}", lab::NAME, lab::SERVER);
    let allow = format!("allow={}", lab::NAME);
    let secret = format!("BENCH_TOKEN@{}", lab::NAME);
    let run = |name: &str, extra: &[&str], env: &[(&str, &str)]| {
        let base = ["run", "-d", "--name", name, "--image", "minimal", "--memory", "256", "--add-host", &add_host];
        lab.moat(&[&base[..], extra].concat(), env)
    };
    run(DEFAULT_BOX, &[], &[])?;
    run(ALLOW_BOX, &["--net", &allow], &[])?;
    run(SECRET_BOX, &["--secret", &secret], &[("BENCH_TOKEN", &token)])?;
    let kit = openssl_kit()?;
    for sandbox in [DEFAULT_BOX, SECRET_BOX] {
        give_openssl(&lab, sandbox, kit.path())?;
    }
    lab.moat(&["cp", &lab.ca_pem.display().to_string(), &format!("{DEFAULT_BOX}:{GUEST_BENCH_CA}")], &[])?;
    check_modes(&lab, &token)?;

    let exec = |args: &[&str]| lab.moat(args, &[]);
    let bytes = mib << 20;
    let batch = requests.div_ceil(runs);
    let (mut downloads, mut batches) = (vec![Vec::new(); ROUTES.len()], vec![Vec::new(); ROUTES.len()]);
    // The daemon's CPU time (where moat's network stack runs) per route, for downloads and for
    // connections: on TCG the guest's own TLS is the bottleneck and hides moat's cost from the
    // rates, not from this. Less what the daemon burns anyway with three guests up (measured
    // idle here), which would otherwise be charged to the slowest route.
    let idle = {
        let (before, t) = (lab.daemon_cpu_seconds()?, Instant::now());
        std::thread::sleep(Duration::from_secs(5));
        (lab.daemon_cpu_seconds()? - before) / t.elapsed().as_secs_f64()
    };
    let (mut cpu_downloads, mut cpu_conns) = (vec![0.0; ROUTES.len()], vec![0.0; ROUTES.len()]);
    let timed = |sandbox: &str, script: &str, cpu: &mut f64| -> anyhow::Result<f64> {
        let (before, t) = (lab.daemon_cpu_seconds()?, Instant::now());
        let secs = timed_in(&exec, sandbox, script)?;
        *cpu += (lab.daemon_cpu_seconds()? - before - idle * t.elapsed().as_secs_f64()).max(0.0);
        Ok(secs)
    };
    // Interleaved, each run starting at another route, so that noise and warm-up hit all alike.
    for r in 0..runs {
        for i in (0..ROUTES.len()).map(|i| (i + r) % ROUTES.len()) {
            let route = &ROUTES[i];
            let env = if route.bench_ca { format!("SSL_CERT_FILE={GUEST_BENCH_CA} ") } else { String::new() };
            let get = format!("{env}wget -q -O /dev/null {}/bytes/{bytes}", route.base);
            downloads[i].push(bytes as f64 / 1e6 / timed(route.sandbox, &get, &mut cpu_downloads[i])?);
            let each = format!("{env}wget -q -O /dev/null {}/", route.base);
            let lp = format!("i=0; while [ $i -lt {batch} ]; do {each} || exit 1; i=$((i+1)); done");
            batches[i].push(batch as f64 / timed(route.sandbox, &lp, &mut cpu_conns[i])?);
        }
    }
    let (rates, conns): (Vec<f64>, Vec<f64>) =
        downloads.into_iter().map(median).zip(batches.into_iter().map(median)).unzip();
    let total_mb = (runs * bytes) as f64 / 1e6;
    println!("\nnetwork modes: a guest → bench.test (a namespace of its own) through moat, busybox wget");
    println!("  download of {mib} MiB (median of {runs}); {batch} sequential requests × {runs} (median), one connection each");
    println!(
        "  {:<24} {:>8} {:>6} {:>8} {:>6}  {:>10} {:>12}",
        "", "MB/s", "ratio", "conn/s", "ratio", "moat ms/MB", "moat ms/conn"
    );
    for (i, route) in ROUTES.iter().enumerate() {
        let ratio = |v: &[f64]| route.baseline.map_or("-".to_string(), |b| format!("{:.2}", v[i] / v[b]));
        println!(
            "  {:<24} {:>8.1} {:>6} {:>8.1} {:>6}  {:>10.2} {:>12.2}",
            route.label,
            rates[i],
            ratio(&rates),
            conns[i],
            ratio(&conns),
            cpu_downloads[i] * 1e3 / total_mb,
            cpu_conns[i] * 1e3 / (batch * runs) as f64
        );
    }
    println!("  ratio: to default mode over the same protocol (target ≥ 0.80)");
    println!(
        "  moat ms: the daemon's CPU time, less its idle {:.1} ms/s; includes one `moat exec` per sample",
        idle * 1e3
    );
    Ok(())
}

/// Proves each mode is what it claims to be before anything is timed: the allowlist refuses a
/// request for another name at the allowed address, default HTTPS reaches the guest with the
/// server's own certificate, and intercepted HTTPS carries the real secret to the server.
fn check_modes(lab: &Lab, token: &str) -> anyhow::Result<()> {
    let fetch = |sandbox: &str, script: &str| lab.moat(&["exec", sandbox, "--", "sh", "-c", script], &[]);
    for (sandbox, url) in
        [(DEFAULT_BOX, "http://bench.test/probe/default"), (ALLOW_BOX, "http://bench.test/probe/allow")]
    {
        let body = fetch(sandbox, &format!("timeout 30 wget -q -O - {url}"))?;
        if body.trim() != "ok" {
            bail!("{url} from {sandbox} answered {body:?}, not the lab server's `ok`");
        }
    }
    let spoofed = fetch(ALLOW_BOX, "timeout 30 wget -q -O - --header 'Host: other.test' http://bench.test/probe/spoof");
    if spoofed.is_ok() || lab.probes().iter().any(|p| p.path == "/probe/spoof") {
        bail!("allowlist mode let a request for other.test through to bench.test's address: the allowlist's HTTP gate is not in the path, so its numbers would not measure it");
    }
    fetch(
        DEFAULT_BOX,
        &format!("SSL_CERT_FILE={GUEST_BENCH_CA} timeout 30 wget -q -O - https://bench.test/probe/relay"),
    )
    .context("default-mode HTTPS, verified against the bench's CA (so relayed, not intercepted)")?;
    fetch(
        SECRET_BOX,
        "timeout 30 wget -q -O - --header \"Authorization: Bearer $BENCH_TOKEN\" https://bench.test/probe/intercept",
    )
    .context("intercepted HTTPS, verified against moat's CA")?;
    let seen = lab.probes().into_iter().find(|p| p.path == "/probe/intercept");
    if seen.and_then(|p| p.authorization) != Some(format!("Bearer {token}")) {
        bail!("the intercepted request reached the server without the secret's value: moat did not intercept it");
    }
    Ok(())
}

/// The host's `openssl` and the libraries it loads, for the guests: busybox wget runs
/// `openssl s_client` for HTTPS when there is one; its own TLS client sends no
/// signature_algorithms, which rustls servers (the lab's, moat's interception) refuse.
fn openssl_kit() -> anyhow::Result<tempfile::TempDir> {
    let ldd = Command::new("ldd").arg("/usr/bin/openssl").output();
    let ldd = match ldd {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => bail!("the HTTPS measurements need the host's openssl\nhint: sudo apt-get install -y openssl"),
    };
    let kit = tempfile::tempdir().context("creating a temp dir")?;
    // `libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x…)` and `/lib64/ld-linux-x86-64.so.2 (0x…)`.
    let libs = ldd.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')));
    for file in std::iter::once("/usr/bin/openssl").chain(libs) {
        let name = Path::new(file).file_name().context("a library path names a file")?;
        std::fs::copy(file, kit.path().join(name)).with_context(|| format!("copying {file}"))?;
    }
    Ok(kit)
}

/// Install the kit as the guest's /usr/bin/openssl, run through the kit's own loader.
fn give_openssl(lab: &Lab, sandbox: &str, kit: &Path) -> anyhow::Result<()> {
    let loader = std::fs::read_dir(kit)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("ld-linux"))
        .context("no dynamic loader in `ldd /usr/bin/openssl`")?;
    lab.moat(&["exec", sandbox, "--", "mkdir", "-p", "/opt"], &[])?;
    lab.moat(&["cp", &kit.display().to_string(), &format!("{sandbox}:/opt/tls")], &[])?;
    let wrapper = format!(
        "printf '#!/bin/sh\\nexec /opt/tls/{loader} --library-path /opt/tls /opt/tls/openssl \"$@\"\\n' > /usr/bin/openssl \
         && chmod 755 /usr/bin/openssl && openssl version"
    );
    let version = lab.moat(&["exec", sandbox, "--", "sh", "-c", &wrapper], &[])?;
    if !version.starts_with("OpenSSL") {
        bail!("openssl does not run in {sandbox}: {version:?}");
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds a shell snippet takes inside the loopback benchmark's guest.
fn guest_seconds(moat_bin: &Path, home: &Path, script: &str) -> anyhow::Result<f64> {
    timed_in(&|args| moat(moat_bin, home, args).map(|(_, out)| out), BOX, script)
}

/// Seconds a shell snippet takes inside `sandbox`, by the guest's clock (no exec round trip in
/// it); `moat` runs the CLI with the given arguments and returns its stdout.
pub(crate) fn timed_in(
    moat: &dyn Fn(&[&str]) -> anyhow::Result<String>,
    sandbox: &str,
    script: &str,
) -> anyhow::Result<f64> {
    let timed = format!("read s _ < /proc/uptime; {script} || exit 1; read e _ < /proc/uptime; echo $s $e");
    let out = moat(&["exec", sandbox, "--", "sh", "-c", &timed])?;
    let t: Vec<f64> = out.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    match t[..] {
        [s, e] => Ok((e - s).max(0.01)),
        _ => bail!("unexpected guest timing output {out:?}"),
    }
}

/// Seconds a shell snippet takes on the host.
fn host_seconds(script: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let status = Command::new("sh").arg("-c").arg(script).stdin(Stdio::null()).status().context("running sh")?;
    let took = t.elapsed();
    if !status.success() {
        bail!("`{script}` failed on the host ({status}); is busybox installed (apt-get install busybox-static)?");
    }
    Ok(took.as_secs_f64())
}

/// A minimal HTTP/1.x server: `/bytes/N` answers N bytes, anything else a few; one request per
/// connection.
async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 2048];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 && head.len() < 16 * 1024 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let line = String::from_utf8_lossy(&head);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let n: u64 = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()).unwrap_or(3);
            let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
            if conn.write_all(header.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 256 * 1024];
            let mut left = n;
            while left > 0 {
                let part = left.min(chunk.len() as u64) as usize;
                if conn.write_all(&chunk[..part]).await.is_err() {
                    return;
                }
                left -= part as u64;
            }
            let _ = conn.shutdown().await;
        });
    }
}
