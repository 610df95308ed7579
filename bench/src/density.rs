//! Density: sandboxes of `minimal` with 128 MiB, each restored from the template and kept running,
//! up to `--density` (50). Printed: the create time (`moat run -d` + the first exec) of the sandbox
//! that makes 1, 10, 25 and 50 running next to the first one's, and the host memory of all their
//! QEMUs (PSS) at those counts; then, with all running, list and inspect latency next to a bare
//! health round trip, next to the same with none running.
//!
//! It runs on a daemon of its own (a home next to the shared one): the default limit of live
//! sandboxes is 32, fifty sandboxes on the shared daemon would refuse everyone else's creates, and
//! other people's sandboxes would be in the list being timed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moat_client::Client;

use crate::files::moat;
use crate::snapshots::pss_kib;
use crate::{ms, percentile};

const PREFIX: &str = "bench-d-";
/// Started and stopped before the others: its create saves the template they restore, and
/// stopped it is the record inspected while none runs.
const WARMUP: &str = "bench-d-template";
const MEMORY_MIB: &str = "128";
/// Running counts whose create time and memory are printed (and the last one, whatever it is).
const CHECKPOINTS: [usize; 4] = [1, 10, 25, 50];

fn names(max: usize) -> Vec<String> {
    (1..=max).map(|i| format!("{PREFIX}{i}")).collect()
}

/// A daemon on a home of its own, with room for `max` live sandboxes, for as long as this lives.
struct OwnDaemon {
    home: PathBuf,
    daemon: Child,
}

impl OwnDaemon {
    async fn start(moat_bin: &Path, home: &Path, max: usize) -> anyhow::Result<OwnDaemon> {
        let home = home.with_file_name(format!(
            "{}-density",
            home.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
        // An interrupted run leaves its daemon holding the home; its sandboxes outlive it, and the
        // daemon started below adopts them so they can be removed by name. Most often none runs.
        let _ = moat(moat_bin, &home, &["daemon", "stop"]);
        let log = home.join("daemon.log");
        let daemon = Command::new(moat_bin)
            .args(["serve", "--max-sandboxes", &max.to_string(), "--log-file"])
            .arg(&log)
            .env("MOAT_HOME", &home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the density benchmark's daemon")?;
        let mut me = OwnDaemon { home, daemon };
        let client = Client::new(&me.home.join("moat.sock"));
        let deadline = Instant::now() + Duration::from_secs(60);
        // The socket file can be an old daemon's: only an answer says this one is up.
        while client.health().await.is_err() {
            if Instant::now() > deadline || me.daemon.try_wait()?.is_some() {
                bail!("the density benchmark's daemon did not come up (see {})", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(me)
    }
}

impl Drop for OwnDaemon {
    fn drop(&mut self) {
        // The daemon this process started and has not reaped: its pid is still its own.
        if let Some(pid) = rustix::process::Pid::from_raw(self.daemon.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
        }
        let _ = self.daemon.wait();
    }
}

/// One row of the fill: the sandbox that made `running` sandboxes run.
struct Step {
    running: usize,
    /// None for the last count reached when admission stopped the fill between checkpoints.
    create: Option<Duration>,
    pss_kib: u64,
}

pub async fn bench(moat_bin: &Path, home: &Path, max: usize, requests: usize) -> anyhow::Result<()> {
    if max == 0 {
        bail!("--density must be at least 1");
    }
    let requests = requests.max(1);
    let own = OwnDaemon::start(moat_bin, home, max).await?;
    let home = own.home.as_path();
    let mut leftovers = names(max);
    leftovers.push(WARMUP.into());
    let _ = remove(moat_bin, home, &leftovers);

    let measured = measure(moat_bin, home, max, requests).await;
    // Most of the names may not exist (a failed or refused fill): what counts is that none is left.
    let _ = remove(moat_bin, home, &leftovers);
    let client = Client::new(&home.join("moat.sock"));
    let left = client.list().await;
    measured?;
    let left: Vec<String> = left?.into_iter().map(|s| s.name).filter(|n| leftovers.contains(n)).collect();
    if !left.is_empty() {
        bail!("`moat rm -f` left {left:?} on {}", home.display());
    }
    Ok(())
}

async fn measure(moat_bin: &Path, home: &Path, max: usize, requests: usize) -> anyhow::Result<()> {
    let client = Client::new(&home.join("moat.sock"));
    // The first create of the image on this home boots and saves the template.
    moat(moat_bin, home, &["run", "-d", "--name", WARMUP, "--image", "minimal", "--memory", MEMORY_MIB])?;
    moat(moat_bin, home, &["exec", WARMUP, "--", "true"])?;
    moat(moat_bin, home, &["stop", WARMUP])?;
    let idle = api_latency(&client, WARMUP, requests).await?;
    moat(moat_bin, home, &["rm", "-f", WARMUP])?;

    let all = names(max);
    let mut steps = Vec::new();
    let mut refused = None;
    let mut running = 0;
    for (i, name) in all.iter().enumerate() {
        let t = Instant::now();
        if let Err(e) =
            moat(moat_bin, home, &["run", "-d", "--name", name, "--image", "minimal", "--memory", MEMORY_MIB])
        {
            // The host being full is a result of this benchmark, not a failure of it.
            if format!("{e:#}").contains("not enough memory") {
                refused = Some(e);
                break;
            }
            return Err(e);
        }
        running = i + 1;
        moat(moat_bin, home, &["exec", name, "--", "true"])?;
        let create = t.elapsed();
        // The daemon boots when the template does not restore: that would be a boot under the
        // template's label.
        if client.inspect(name).await?.snapshot_id.is_none() {
            bail!("{name} was booted, not restored from the template of `minimal` (see {}/daemon.log)", home.display());
        }
        if CHECKPOINTS.contains(&running) || running == max {
            let pss_kib = total_pss(moat_bin, home, &all[..running])?;
            steps.push(Step { running, create: Some(create), pss_kib });
        }
    }
    let Some(first) = steps.first().and_then(|s| s.create) else {
        let refused = refused.context("the fill ended without a sandbox and without a refusal")?;
        return Err(refused.context("memory admission refused the first sandbox"));
    };
    if steps.last().is_some_and(|s| s.running != running) {
        let pss_kib = total_pss(moat_bin, home, &all[..running])?;
        steps.push(Step { running, create: None, pss_kib });
    }

    println!("\ndensity: sandboxes of minimal with {MEMORY_MIB} MiB from the template, kept running (one run)");
    if let Some(e) = &refused {
        println!("  memory admission refused sandbox {} of {max}, so the fill stops at {running}:", running + 1);
        println!("    {}", format!("{e:#}").trim());
    }
    println!("  {:<10}{:>16}{:>10}{:>16}{:>16}", "running", "create+exec", "vs 1st", "PSS of QEMUs", "per sandbox");
    let mib = |kib: u64| kib as f64 / 1024.0;
    for s in &steps {
        let (create, ratio) = match s.create {
            Some(c) => (ms(c), format!("{:.2}x", c.as_secs_f64() / first.as_secs_f64())),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "  {:<10}{:>16}{:>10}{:>12.1} MiB{:>12.1} MiB",
            s.running,
            create,
            ratio,
            mib(s.pss_kib),
            mib(s.pss_kib) / s.running as f64
        );
    }

    let t = Instant::now();
    for name in &all[..running] {
        moat(moat_bin, home, &["exec", name, "--", "true"]).with_context(|| format!("{name} stopped answering"))?;
    }
    println!("  all {running} answer `moat exec NAME -- true` ({} each, in turn)", ms(t.elapsed() / running as u32));

    let busy = api_latency(&client, &all[0], requests).await?;
    println!("\ndaemon API latency with {running} sandboxes running vs none ({requests} requests each, p50 / p99)");
    println!("  {:<26}{:>22}{:>22}{:>18}", "", "none running", format!("{running} running"), "running / none");
    let labels = ["GET /v1/health", "GET /v1/sandboxes", "GET /v1/sandboxes/{name}"];
    for (i, label) in labels.iter().enumerate() {
        let ([i50, i99], [b50, b99]) = (idle[i], busy[i]);
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
        println!(
            "  {label:<26}{:>22}{:>22}{:>18}",
            format!("{} / {}", ms(i50), ms(i99)),
            format!("{} / {}", ms(b50), ms(b99)),
            format!("{:.2}x / {:.2}x", ratio(b50, i50), ratio(b99, i99))
        );
        if i > 0 {
            let [h50, h99] = idle[0];
            let [g50, g99] = busy[0];
            println!(
                "  {:<26}{:>22}{:>22}",
                "  next to health",
                format!("{:.2}x / {:.2}x", ratio(i50, h50), ratio(i99, h99)),
                format!("{:.2}x / {:.2}x", ratio(b50, g50), ratio(b99, g99))
            );
        }
    }
    println!("  (with none running, {{name}} is the warm-up sandbox, stopped)");
    Ok(())
}

/// p50 and p99 of health, list and inspect of `name`, in that order.
async fn api_latency(client: &Client, name: &str, requests: usize) -> anyhow::Result<[[Duration; 2]; 3]> {
    let mut samples: [Vec<Duration>; 3] = Default::default();
    // Interleaved, so load and noise hit all three alike.
    for _ in 0..requests {
        let t = Instant::now();
        client.health().await?;
        samples[0].push(t.elapsed());
        let t = Instant::now();
        client.list().await?;
        samples[1].push(t.elapsed());
        let t = Instant::now();
        client.inspect(name).await?;
        samples[2].push(t.elapsed());
    }
    Ok(samples.map(|mut v| [percentile(&mut v, 0.5), percentile(&mut v, 0.99)]))
}

/// PSS of the QEMUs of `names`, summed: pages they share (the template's) count once in all.
fn total_pss(moat_bin: &Path, home: &Path, names: &[String]) -> anyhow::Result<u64> {
    names.iter().map(|n| pss_kib(moat_bin, home, n)).sum()
}

/// `moat rm -f` of every name; names that do not exist are errors the caller may ignore.
fn remove(moat_bin: &Path, home: &Path, names: &[String]) -> anyhow::Result<()> {
    let mut rm = vec!["rm", "-f"];
    rm.extend(names.iter().map(String::as_str));
    moat(moat_bin, home, &rm).map(drop)
}
