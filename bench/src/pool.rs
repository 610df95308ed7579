//! Warm pools, through the `moat` CLI on `minimal` with 256 MiB: a create served from a pool of
//! sandboxes restored and paused ahead of time, to its first exec done, next to a template restore
//! without a pool and next to a cold boot.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moat_api::PoolInfo;

use crate::files::moat;
use crate::snapshots::first_exec;
use crate::{median, ms};

const IMAGE: &str = "minimal";
const MEMORY_MIB: u32 = 256;
const POOL_SIZE: u32 = 2;
const POOL_SAMPLES: usize = 20;
/// Created once before sampling, so the daemon saves the template that the template samples and
/// the pool's members restore.
const WARMUP: &str = "bench-pool-template";
/// How long the pool may take to refill between samples.
const REFILL_LIMIT: Duration = Duration::from_secs(300);

fn pooled(i: usize) -> String {
    format!("bench-pool-{i}")
}

fn cold(i: usize) -> String {
    format!("bench-pool-cold-{i}")
}

fn restored(i: usize) -> String {
    format!("bench-pool-tpl-{i}")
}

pub async fn bench(moat_bin: &Path, home: &Path, runs: usize) -> anyhow::Result<()> {
    let colds = runs.max(5);
    // Medians of fewer samples move too much between runs to compare.
    let templates = runs.max(10);
    let mut names: Vec<String> = (0..POOL_SAMPLES).map(pooled).collect();
    names.extend((0..colds).map(cold));
    names.extend((0..templates).map(restored));
    names.push(WARMUP.into());
    // Leftovers of an interrupted run; most of them do not exist, so errors are expected.
    let _ = drop_pool(moat_bin, home);
    let _ = remove(moat_bin, home, &names);

    let measured = measure(moat_bin, home, colds, templates);
    // A failed sample leaves its sandbox behind; the others were removed as they went.
    let _ = remove(moat_bin, home, &names);
    let dropped = drop_pool(moat_bin, home);
    measured.and(dropped)
}

fn measure(moat_bin: &Path, home: &Path, colds: usize, templates: usize) -> anyhow::Result<()> {
    let memory = MEMORY_MIB.to_string();
    // The first sandbox of the image (not --cold) boots and saves the template.
    moat(moat_bin, home, &["run", "-d", "--name", WARMUP, "--image", IMAGE, "--memory", &memory])?;
    moat(moat_bin, home, &["rm", "-f", WARMUP])?;
    // Before the pool exists: with it, these creates (same image and sizes) would claim from it.
    let restores: Vec<Duration> =
        (0..templates).map(|i| first_exec(moat_bin, home, &restored(i), false)).collect::<anyhow::Result<_>>()?;

    let size = POOL_SIZE.to_string();
    moat(moat_bin, home, &["pool", "set", IMAGE, "--size", &size, "--memory", &memory])?;
    let first_claimed = wait_ready(moat_bin, home)?.claimed;
    let mut pools = Vec::with_capacity(POOL_SAMPLES);
    let mut cold_boots = Vec::with_capacity(colds);
    // Cold boots interleaved with the pool's samples, so noise hits both alike; each sample starts
    // with the pool full, so no refill competes with it for the CPUs.
    for i in 0..POOL_SAMPLES.max(colds) {
        if i < POOL_SAMPLES {
            let before = wait_ready(moat_bin, home)?.claimed;
            let name = pooled(i);
            pools.push(create_to_exec(moat_bin, home, &name)?);
            let after = find_pool(moat_bin, home)?.claimed;
            if after <= before {
                bail!(
                    "{name} was not served by the pool of {IMAGE} with {MEMORY_MIB} MiB (its `claimed` stayed at \
                     {before}): the create booted or restored on its own (see the daemon log)"
                );
            }
        }
        if i < colds {
            wait_ready(moat_bin, home)?;
            cold_boots.push(first_exec(moat_bin, home, &cold(i), true)?);
        }
    }
    let last_claimed = find_pool(moat_bin, home)?.claimed;

    let (pool, template, cold) = (median(pools), median(restores), median(cold_boots));
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("\ncreate to first exec done, {IMAGE} with {MEMORY_MIB} MiB (medians)");
    println!("  {:<35}{:>10}", format!("from a warm pool of {POOL_SIZE} ({POOL_SAMPLES})"), ms(pool));
    println!("  {:<35}{:>10}", format!("restored from the template ({templates})"), ms(template));
    println!("  {:<35}{:>10}", format!("cold boot ({colds}, baseline)"), ms(cold));
    println!("  cold / pool                        {:>10.2}x", ratio(cold, pool));
    println!("  cold / template                    {:>10.2}x", ratio(cold, template));
    println!("  template / pool                    {:>10.2}x", ratio(template, pool));
    println!("  each pool sample was claimed from the pool (`claimed` {first_claimed} → {last_claimed})");
    Ok(())
}

/// `moat run -d` then the first `moat exec -- true`, timed together; the sandbox is removed after.
fn create_to_exec(moat_bin: &Path, home: &Path, name: &str) -> anyhow::Result<Duration> {
    let memory = MEMORY_MIB.to_string();
    let t = Instant::now();
    moat(moat_bin, home, &["run", "-d", "--name", name, "--image", IMAGE, "--memory", &memory])?;
    moat(moat_bin, home, &["exec", name, "--", "true"])?;
    let took = t.elapsed();
    moat(moat_bin, home, &["rm", "-f", name])?;
    Ok(took)
}

/// The pool once every member is restored and paused.
fn wait_ready(moat_bin: &Path, home: &Path) -> anyhow::Result<PoolInfo> {
    let deadline = Instant::now() + REFILL_LIMIT;
    loop {
        let pool = find_pool(moat_bin, home)?;
        if pool.ready >= pool.size {
            return Ok(pool);
        }
        if Instant::now() > deadline {
            bail!(
                "the pool of {IMAGE} with {MEMORY_MIB} MiB has {} of {} members ready after {}s; its last error: {}",
                pool.ready,
                pool.size,
                REFILL_LIMIT.as_secs(),
                pool.last_error.as_deref().unwrap_or("none (see the daemon log)")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// This benchmark's pool in `moat pool ls --json`: the one of its image and memory.
fn find_pool(moat_bin: &Path, home: &Path) -> anyhow::Result<PoolInfo> {
    let (_, out) = moat(moat_bin, home, &["pool", "ls", "--json"])?;
    let list: Vec<PoolInfo> = serde_json::from_str(&out).context("parsing `moat pool ls --json`")?;
    let mut ours = list.into_iter().filter(|p| p.image == IMAGE && p.memory_mib == MEMORY_MIB);
    match (ours.next(), ours.next()) {
        (Some(pool), None) => Ok(pool),
        _ => bail!("`moat pool ls --json` shows no single pool of {IMAGE} with {MEMORY_MIB} MiB: {out}"),
    }
}

fn drop_pool(moat_bin: &Path, home: &Path) -> anyhow::Result<()> {
    moat(moat_bin, home, &["pool", "rm", IMAGE, "--memory", &MEMORY_MIB.to_string()]).map(drop)
}

/// `moat rm -f` of every name; names that do not exist are errors the caller may ignore.
fn remove(moat_bin: &Path, home: &Path, names: &[String]) -> anyhow::Result<()> {
    let mut rm = vec!["rm", "-f"];
    rm.extend(names.iter().map(String::as_str));
    moat(moat_bin, home, &rm).map(drop)
}
