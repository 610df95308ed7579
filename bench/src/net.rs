//! Network benchmarks (`bench/run --only net`): a guest downloading from an HTTP server on the
//! host's loopback (`10.0.2.2:PORT`, let through with `--allow-cidr 127.0.0.1/32`) through moat's
//! userspace stack, and the rate of small sequential requests — each next to the same busybox
//! client run on the host against the same server, and next to the guest talking to a server on
//! its own loopback (what the guest's CPU under emulation allows, without moat in the path).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::files::moat;

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
    measured.and(removed)
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds a shell snippet takes inside the guest, by the guest's clock (no exec round trip in it).
fn guest_seconds(moat_bin: &Path, home: &Path, script: &str) -> anyhow::Result<f64> {
    let timed = format!("read s _ < /proc/uptime; {script} || exit 1; read e _ < /proc/uptime; echo $s $e");
    let (_, out) = moat(moat_bin, home, &["exec", BOX, "--", "sh", "-c", &timed])?;
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
