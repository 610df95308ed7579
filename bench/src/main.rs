//! moat benchmarks. Every number is printed next to a baseline measured in the same run, because
//! these machines are noisy: ratios travel between runs, absolute times do not.
//!
//! - `moat run -- true`: wall time of the whole CLI (boot, exec, teardown), median of N runs,
//!   next to the boot part alone (QEMU start → agent handshake).
//! - exec round trip of `true` in one running VM, median of M, next to the guest's own
//!   fork+exec+wait of `/bin/true` measured inside the guest.
//! - the daemon: create → running next to the boot alone, and list / inspect latency (p50, p99
//!   of 1000) next to a bare health round trip on the same socket.
//! - `moat cp` in and out next to the guest's own `dd`, and the exec round trip during a copy.
//! - images: pull + unpack throughput from a registry on loopback next to a plain download of the
//!   same blob, and the first run of the pulled image next to the built-in one.
//! - snapshots: a sandbox restored from its image's template next to a cold boot (each to its
//!   first exec done, median of at least 10), `moat fork` into K (`--forks`, 10) next to K cold
//!   boots, and the host memory (PSS of QEMU) of the K forks next to K cold-booted sandboxes.
//! - warm pools: a create served from a warm pool (restored and paused ahead of time) to its
//!   first exec done, next to a template restore without a pool and a cold boot.
//! - density: sandboxes from the template kept running up to `--density` (50): the create time
//!   of the 1st, 10th, 25th and 50th, the PSS of all their QEMUs, and list / inspect latency with
//!   them running next to the same with none, on a daemon of its own.
//! - the jail: template restore, cold boot (each to the first exec) and `moat fork` into K with
//!   the QEMU jail on, next to the same with `MOAT_JAIL=off` on a second daemon.
//! - the E2B front: `Sandbox.create()` + `commands.run("true")` + `kill()` through the `e2b`
//!   Python SDK next to `moat run -- true` on the same daemon (needs PyPI for the SDK once).
//! - volumes: sequential write and read and an untar + `find` of small files in a named volume
//!   and in a host directory mount, next to the same on the root disk of the same sandbox.
//! - network: a guest downloading from a server on the host's loopback through moat's stack, and
//!   the rate of small sequential requests, next to the same busybox client on the host and next
//!   to the guest's own loopback; then the same for default egress, allowlist mode and secret
//!   interception side by side, in a lab of network namespaces (needs root).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moat_proto::ExecRequest;
use moat_sandbox::{Runtime, RuntimeConfig, Sandbox, SandboxSpec};

mod density;
mod e2b;
mod files;
mod images;
mod jail;
mod lab;
mod net;
mod pool;
mod remote;
mod snapshots;
mod volumes;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

const USAGE: &str = "\
usage: bench/run [OPTIONS]

  --only PART       run one part: files, images, snapshots, pool, remote, density, jail, e2b, volumes
                    or net
  --runs N          samples of each timed step; medians are printed (5)
  --execs N         exec round trips in one VM (100)
  --requests N      daemon API requests of each kind (1000)
  --copy-mib N      size of the file `moat cp` copies (256)
  --layer-mib N     size of the image layer pulled (256)
  --forks N         sandboxes `moat fork` makes, next to as many boots (10)
  --density N       sandboxes the density part keeps running at once (50)
  --net-mib N       size of each network download, HTTP and HTTPS (64)
  --conns N         small sequential requests per network route, split into --runs batches (200)
  --seq-mib N       size of the volumes part's sequential write and read (64)
  --small-files N   files in the volumes part's untarred tree (500)

The network part also measures default egress, allowlist mode (--net allow=bench.test) and secret
interception (--secret BENCH_TOKEN@bench.test) side by side, in network namespaces it creates and
removes: it needs root and `ip` (iproute2), and the host's openssl for the guests' HTTPS client.

The density part runs its own daemon on a home next to $MOAT_HOME (`<home>-density`), with room
for --density live sandboxes, so the shared daemon's limit and other people's sandboxes stay out.
";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).find(|w| w[0] == name).and_then(|w| w[1].parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    let runs = arg("--runs", 5);
    let execs = arg("--execs", 100);
    let forks = arg("--forks", 10);
    let density = arg("--density", 50);
    let requests = arg("--requests", 1000);
    let moat = std::env::current_exe()?.with_file_name("moat");
    if !moat.exists() {
        bail!("{} is missing; build it with `cargo build --release -p moat` (bench/run does)", moat.display());
    }
    let rt = Runtime::prepare(RuntimeConfig::from_env()?).await?;
    println!(
        "host: QEMU {}, kernel {}, accelerator {} ({})",
        rt.qemu_version, rt.kernel.release, rt.accel.accel, rt.accel.reason
    );
    let home = rt.config.home.clone();
    // `--only files`, `--only images`, `--only snapshots` or `--only net` runs that part alone.
    let only: Option<String> =
        std::env::args().collect::<Vec<_>>().windows(2).find(|w| w[0] == "--only").map(|w| w[1].clone());
    // Warm the image and initramfs caches so the first sample is not a build.
    run_true(&moat, &home)?;
    match only.as_deref() {
        Some("files") => return files::bench(&moat, &home, arg("--copy-mib", 256)).await,
        Some("images") => return images::bench(&moat, &home, runs, arg("--layer-mib", 256)).await,
        Some("snapshots") => return snapshots::bench(&moat, &home, runs, forks).await,
        Some("pool") => return pool::bench(&moat, &home, runs).await,
        Some("remote") => return remote::bench(&moat, &home, runs).await,
        Some("density") => return density::bench(&moat, &home, density, requests).await,
        Some("jail") => return jail::bench(&moat, &home, runs, forks).await,
        Some("e2b") => return e2b::bench(&moat, &home, runs).await,
        Some("volumes") => {
            return volumes::bench(&moat, &home, runs, arg("--seq-mib", 64), arg("--small-files", 500)).await
        }
        Some("net") => return net::bench(&moat, &home, runs, arg("--net-mib", 64), arg("--conns", 200)).await,
        Some(other) => {
            bail!(
                "--only takes `files`, `images`, `snapshots`, `pool`, `remote`, `density`, `jail`, `e2b`, \
                 `volumes` or `net`, not {other:?}"
            )
        }
        None => {}
    }
    let mut walls = Vec::new();
    let mut boots = Vec::new();
    for _ in 0..runs {
        walls.push(run_true(&moat, &home)?);
        let sb = Sandbox::boot(&rt, &SandboxSpec::default()).await?;
        boots.push(sb.boot_time);
        sb.destroy().await?;
    }
    let (wall, boot) = (median(walls), median(boots));
    println!("\n`moat run -- true` (median of {runs})");
    println!("  wall time, whole CLI           {:>10}", ms(wall));
    println!("  boot alone (QEMU → agent up)   {:>10}", ms(boot));
    println!("  boot / wall                    {:>10.2}", boot.as_secs_f64() / wall.as_secs_f64());

    let sb = Sandbox::boot(&rt, &SandboxSpec::default()).await?;
    let mut rtts = Vec::with_capacity(execs);
    for _ in 0..execs {
        let t = Instant::now();
        let (_, _, status) =
            sb.exec(ExecRequest { argv: vec!["true".into()], ..Default::default() }).await?.collect().await?;
        rtts.push(t.elapsed());
        if status.code != Some(0) {
            bail!("`true` exited with {status:?}");
        }
    }
    let guest = guest_fork_exec(&sb, execs).await?;
    sb.destroy().await?;
    let rtt = median(rtts);
    println!("\nexec round trip of `true` in one VM (median of {execs})");
    println!("  host → agent → process → host  {:>10}", ms(rtt));
    println!("  guest fork+exec+wait (baseline){:>10}", ms(guest));
    println!("  ratio                          {:>10.2}x", rtt.as_secs_f64() / guest.as_secs_f64());

    daemon_api(&home, runs, requests, boot).await?;
    files::bench(&moat, &home, arg("--copy-mib", 256)).await?;
    images::bench(&moat, &home, runs, arg("--layer-mib", 256)).await?;
    snapshots::bench(&moat, &home, runs, forks).await?;
    pool::bench(&moat, &home, runs).await?;
    density::bench(&moat, &home, density, requests).await?;
    jail::bench(&moat, &home, runs, forks).await?;
    e2b::bench(&moat, &home, runs).await?;
    net::bench(&moat, &home, runs, arg("--net-mib", 64), arg("--conns", 200)).await
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The daemon `moat run` started above: create → running next to the library's boot alone, and
/// list/inspect latency next to a bare health round trip (same socket, no state read).
async fn daemon_api(home: &std::path::Path, runs: usize, requests: usize, boot: Duration) -> anyhow::Result<()> {
    let client = moat_client::Client::new(&home.join("moat.sock"));
    let create = moat_api::CreateSandbox { image: Some("minimal".into()), memory_mib: Some(512), ..Default::default() };
    let mut creates = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let info = client.create(&create).await?;
        creates.push(t.elapsed());
        client.remove(&info.id, true).await?;
    }
    let create_time = median(creates);
    println!("\ndaemon: create → running (median of {runs})");
    println!("  POST /v1/sandboxes             {:>10}", ms(create_time));
    println!("  boot alone (baseline)          {:>10}", ms(boot));
    println!("  ratio                          {:>10.2}x", create_time.as_secs_f64() / boot.as_secs_f64());

    let info = client.create(&create).await?;
    let mut health = Vec::with_capacity(requests);
    let mut list = Vec::with_capacity(requests);
    let mut inspect = Vec::with_capacity(requests);
    // Interleaved, so load and noise hit all three alike.
    for _ in 0..requests {
        let t = Instant::now();
        client.health().await?;
        health.push(t.elapsed());
        let t = Instant::now();
        client.list().await?;
        list.push(t.elapsed());
        let t = Instant::now();
        client.inspect(&info.name).await?;
        inspect.push(t.elapsed());
    }
    client.remove(&info.id, true).await?;
    let (h50, h99) = (percentile(&mut health, 0.5), percentile(&mut health, 0.99));
    println!("\ndaemon API latency ({requests} requests each, p50 / p99)");
    println!("  GET /v1/health (baseline)      {:>10} / {}", ms(h50), ms(h99));
    for (name, v) in [("GET /v1/sandboxes", &mut list), ("GET /v1/sandboxes/{ref}", &mut inspect)] {
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        println!(
            "  {name:<30} {:>10} / {}   ({:.2}x / {:.2}x health)",
            ms(p50),
            ms(p99),
            p50.as_secs_f64() / h50.as_secs_f64(),
            p99.as_secs_f64() / h99.as_secs_f64()
        );
    }
    Ok(())
}

fn run_true(moat: &PathBuf, home: &std::path::Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let status = Command::new(moat)
        .args(["run", "--image", "minimal", "--", "true"])
        .env("MOAT_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running moat")?;
    let d = t.elapsed();
    if !status.success() {
        bail!("`moat run -- true` failed: {status}");
    }
    Ok(d)
}

/// Mean time of one fork+exec+wait of /bin/true inside the guest, timed by the guest's clock
/// (/proc/uptime: busybox `date` has no sub-second format, so the loop runs long enough for
/// centiseconds to be precise).
async fn guest_fork_exec(sb: &Sandbox, n: usize) -> anyhow::Result<Duration> {
    let n = n.max(1000);
    let script = format!(
        "read s _ < /proc/uptime; i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; read e _ < /proc/uptime; echo $s $e"
    );
    let req = ExecRequest { argv: vec!["sh".into(), "-c".into(), script], ..Default::default() };
    let (out, err, _) = sb.exec(req).await?.collect().await?;
    let text = String::from_utf8_lossy(&out);
    let times: Vec<f64> = text.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let [start, end] = times[..] else {
        bail!("guest timing output {text:?} {}", String::from_utf8_lossy(&err));
    };
    Ok(Duration::from_secs_f64((end - start).max(0.0) / n as f64))
}
