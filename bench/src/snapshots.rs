//! Snapshot benchmarks, all through the `moat` CLI on the `minimal` image with 256 MiB: a sandbox
//! started from its image's template next to a cold boot (each to its first exec done), `moat
//! fork` into K sandboxes next to K cold boots (with each clone's QEMU start, state load and agent
//! answer), and the host memory (PSS of QEMU) per sandbox of 1, K and 25 forks next to K
//! cold-booted sandboxes.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moat_api::{Forked, SandboxInfo, SnapshotInfo, SnapshotKind};

use crate::files::moat;
use crate::{median, ms};

/// The sandbox `moat fork` copies; its forks are `FORK_PREFIX1`…
const SOURCE: &str = "bench-fork-src";
const FORK_PREFIX: &str = "bench-f-";
/// Booted once before sampling, so the daemon saves the template the samples restore.
const WARMUP: &str = "bench-template";
/// The most forks whose memory is measured at once (besides 1 and `--forks`).
const MANY_FORKS: usize = 25;

fn forks_of(forks: usize) -> Vec<String> {
    (1..=forks).map(|i| format!("{FORK_PREFIX}{i}")).collect()
}

fn cold_boxes(forks: usize) -> Vec<String> {
    (1..=forks).map(|i| format!("bench-c-{i}")).collect()
}

pub async fn bench(moat_bin: &Path, home: &Path, runs: usize, forks: usize) -> anyhow::Result<()> {
    // Medians of fewer samples move too much between runs to compare.
    let runs = runs.max(10);
    if forks == 0 {
        bail!("--forks must be at least 1");
    }
    // Leftovers of an interrupted run; most of these names do not exist, so errors are expected.
    let mut leftovers = [forks_of(forks.max(MANY_FORKS)), cold_boxes(forks)].concat();
    leftovers.extend((0..runs).flat_map(|i| [format!("bench-cold-{i}"), format!("bench-template-{i}")]));
    leftovers.push(WARMUP.into());
    let _ = teardown(moat_bin, home, &leftovers);

    let measured = measure(moat_bin, home, runs, forks);
    // A whole measurement has removed its forks already; one cut short may have left any of them.
    let boxes = match &measured {
        Ok(()) => cold_boxes(forks),
        Err(_) => [forks_of(forks.max(MANY_FORKS)), cold_boxes(forks)].concat(),
    };
    let cleaned = teardown(moat_bin, home, &boxes);
    // A failed measurement leaves some of the names unmade, so its cleanup errors say nothing new.
    measured.and(cleaned)
}

fn measure(moat_bin: &Path, home: &Path, runs: usize, forks: usize) -> anyhow::Result<()> {
    // The first sandbox of the image (not --cold) boots and saves the template.
    moat(moat_bin, home, &["run", "-d", "--name", WARMUP, "--image", "minimal", "--memory", "256"])?;
    moat(moat_bin, home, &["rm", "-f", WARMUP])?;
    let mut colds = Vec::with_capacity(runs);
    let mut templates = Vec::with_capacity(runs);
    // Interleaved, so noise hits both alike.
    for i in 0..runs {
        colds.push(first_exec(moat_bin, home, &format!("bench-cold-{i}"), true)?);
        templates.push(first_exec(moat_bin, home, &format!("bench-template-{i}"), false)?);
    }
    let (cold, template) = (median(colds), median(templates));
    println!("\nstart to first exec done, minimal with 256 MiB (median of {runs} each)");
    println!("  restored from the template     {:>10}", ms(template));
    println!("  cold boot (baseline)           {:>10}", ms(cold));
    println!("  cold / template                {:>10.2}x", cold.as_secs_f64() / template.as_secs_f64());

    moat(moat_bin, home, &["run", "-d", "--name", SOURCE, "--image", "minimal", "--memory", "256"])?;
    let n = u32::try_from(forks).context("--forks is too large")?;
    let (fork, forked) = fork_into(moat_bin, home, forks)?;
    let boots = cold * n;
    println!("\nmoat fork of a running sandbox into {forks} (one run)");
    println!("  {:<31}{:>10}   ({} per clone)", format!("moat fork -n {forks}"), ms(fork), ms(fork / n));
    println!("  {:<31}{:>10}", format!("{forks} cold boots (median × {forks})"), ms(boots));
    println!("  cold boots / fork              {:>10.2}x", boots.as_secs_f64() / fork.as_secs_f64());
    println!("  each clone, as the daemon saw it (ms):");
    println!("    {:<14}{:>8}{:>12}{:>12}{:>8}{:>8}", "clone", "prepare", "qemu start", "state load", "agent", "total");
    for t in &forked.timeline {
        println!(
            "    {:<14}{:>8}{:>12}{:>12}{:>8}{:>8}",
            t.name, t.prepare_ms, t.qemu_start_ms, t.state_load_ms, t.agent_ms, t.total_ms
        );
    }

    // Every sandbox has served one exec, so both sides are up and have done the same work.
    let mut per_fork = vec![(forks, forks_pss_kib(moat_bin, home, forks)?)];
    for k in [1, MANY_FORKS].into_iter().filter(|k| *k != forks) {
        teardown_forks(moat_bin, home, per_fork.last().map_or(forks, |p| p.0))?;
        let (took, _) = fork_into(moat_bin, home, k)?;
        println!("  {:<31}{:>10}", format!("moat fork -n {k}"), ms(took));
        per_fork.push((k, forks_pss_kib(moat_bin, home, k)?));
    }
    teardown_forks(moat_bin, home, per_fork.last().map_or(forks, |p| p.0))?;
    per_fork.sort();
    for name in cold_boxes(forks) {
        moat(moat_bin, home, &["run", "-d", "--cold", "--name", &name, "--image", "minimal", "--memory", "256"])?;
        moat(moat_bin, home, &["exec", &name, "--", "true"])?;
    }
    let mut cold_kib = 0;
    for name in cold_boxes(forks) {
        cold_kib += pss_kib(moat_bin, home, &name)?;
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let one_cold = cold_kib as f64 / forks as f64;
    println!("\nhost memory (PSS of the QEMU processes, each sandbox after one exec)");
    for (k, kib) in &per_fork {
        println!(
            "  {:<31}{:>7.1} MiB a sandbox, {:>7.1} MiB in all = {:.2}x one cold sandbox",
            format!("{k} forks"),
            mib(*kib) / *k as f64,
            mib(*kib),
            *kib as f64 / one_cold
        );
    }
    println!(
        "  {:<31}{:>7.1} MiB a sandbox, {:>7.1} MiB in all (baseline)",
        format!("{forks} cold boots"),
        mib(cold_kib) / forks as f64,
        mib(cold_kib)
    );
    if let Some((_, kib)) = per_fork.iter().find(|(k, _)| *k == forks) {
        println!("  cold / forks ({forks} each)           {:>7.2}x", cold_kib as f64 / (*kib).max(1) as f64);
    }
    Ok(())
}

/// `moat fork SOURCE -n k --json`: its wall time and answer, checked to have made the names.
fn fork_into(moat_bin: &Path, home: &Path, k: usize) -> anyhow::Result<(Duration, Forked)> {
    let count = k.to_string();
    let (took, out) = moat(moat_bin, home, &["fork", SOURCE, "-n", &count, "--name-prefix", FORK_PREFIX, "--json"])?;
    let forked: Forked = serde_json::from_str(&out).context("parsing `moat fork --json`")?;
    let made: Vec<&str> = forked.sandboxes.iter().map(|s| s.name.as_str()).collect();
    if made != forks_of(k) {
        bail!("`moat fork -n {k} --name-prefix {FORK_PREFIX}` made {made:?}, not {FORK_PREFIX}1..{k}");
    }
    Ok((took, forked))
}

/// The PSS of forks 1..=k together, each after one exec.
fn forks_pss_kib(moat_bin: &Path, home: &Path, k: usize) -> anyhow::Result<u64> {
    for name in forks_of(k) {
        moat(moat_bin, home, &["exec", &name, "--", "true"])?;
    }
    forks_of(k).iter().map(|name| pss_kib(moat_bin, home, name)).sum()
}

/// Remove forks 1..=k and the snapshot their fork took.
fn teardown_forks(moat_bin: &Path, home: &Path, k: usize) -> anyhow::Result<()> {
    let names = forks_of(k);
    let mut rm = vec!["rm", "-f"];
    rm.extend(names.iter().map(String::as_str));
    moat(moat_bin, home, &rm)?;
    remove_fork_snapshots(moat_bin, home)
}

/// `moat run -d` then the first `moat exec -- true`, timed together; the sandbox is removed after.
pub(crate) fn first_exec(moat_bin: &Path, home: &Path, name: &str, cold: bool) -> anyhow::Result<Duration> {
    let mut run = vec!["run", "-d", "--name", name, "--image", "minimal", "--memory", "256"];
    if cold {
        run.push("--cold");
    }
    let t = Instant::now();
    moat(moat_bin, home, &run)?;
    moat(moat_bin, home, &["exec", name, "--", "true"])?;
    let took = t.elapsed();
    // The daemon falls back to booting when a template does not restore: that sample would
    // measure a boot under the template's label.
    let restored = inspect(moat_bin, home, name)?.snapshot_id.is_some();
    moat(moat_bin, home, &["rm", "-f", name])?;
    match (cold, restored) {
        (false, false) => {
            bail!("{name} was booted, not restored from the template of `minimal` (the daemon log says why)")
        }
        (true, true) => bail!("{name} was restored from a snapshot despite --cold"),
        _ => Ok(took),
    }
}

pub(crate) fn inspect(moat_bin: &Path, home: &Path, name: &str) -> anyhow::Result<SandboxInfo> {
    let (_, out) = moat(moat_bin, home, &["inspect", name, "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("parsing `moat inspect {name} --json`"))
}

/// Proportional set size of a sandbox's QEMU process: pages shared with other processes (a
/// snapshot's memory mapped by several forks) count once in total.
pub(crate) fn pss_kib(moat_bin: &Path, home: &Path, name: &str) -> anyhow::Result<u64> {
    let pid = inspect(moat_bin, home, name)?.pid.with_context(|| format!("{name} has no QEMU pid; is it running?"))?;
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{path} has no `Pss: N kB` line"))
}

/// Remove `boxes` (forks first), then the snapshots `moat fork` took of the source, then the
/// source: a snapshot cannot go while sandboxes restored from it exist.
fn teardown(moat_bin: &Path, home: &Path, boxes: &[String]) -> anyhow::Result<()> {
    let mut rm = vec!["rm", "-f"];
    rm.extend(boxes.iter().map(String::as_str));
    let removed = moat(moat_bin, home, &rm).map(drop);
    let snapshots = remove_fork_snapshots(moat_bin, home);
    let source = moat(moat_bin, home, &["rm", "-f", SOURCE]).map(drop);
    removed.and(snapshots).and(source)
}

fn remove_fork_snapshots(moat_bin: &Path, home: &Path) -> anyhow::Result<()> {
    let (_, out) = moat(moat_bin, home, &["snapshot", "ls", SOURCE, "--json"])?;
    let list: Vec<SnapshotInfo> = serde_json::from_str(&out).context("parsing `moat snapshot ls --json`")?;
    let refs: Vec<String> = list
        .iter()
        .filter(|s| s.kind == SnapshotKind::Snapshot && s.sandbox_name == SOURCE)
        .map(|s| format!("{}:{}", s.sandbox_name, s.name))
        .collect();
    if refs.is_empty() {
        return Ok(());
    }
    let mut rm = vec!["snapshot", "rm"];
    rm.extend(refs.iter().map(String::as_str));
    moat(moat_bin, home, &rm).map(drop)
}
