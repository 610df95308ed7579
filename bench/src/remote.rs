//! Snapshots between hosts, through a real registry on loopback (Debian's `docker-registry`), with
//! a daemon per home as on separate hosts, on `minimal` with 256 MiB:
//!
//! - a cross-home fork (snapshot, push, pull into an empty home, restore, first exec) next to a
//!   local `moat fork -n 1` of the same sandbox to its first exec;
//! - the first create on an empty home through the template store (pull, restore, first exec)
//!   next to a cold boot in that home.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::files::moat;
use crate::images::Registry;
use crate::snapshots::inspect;
use crate::{median, ms};

const SOURCE: &str = "bench-remote-src";
const MEMORY: &str = "256";

/// `moat args` in `home`, with `MOAT_TEMPLATE_STORE` set when `store` is.
fn moat_store(bin: &Path, home: &Path, store: Option<&str>, args: &[&str]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut cmd = Command::new(bin);
    cmd.args(args).env("MOAT_HOME", home).stdin(Stdio::null());
    if let Some(store) = store {
        cmd.env("MOAT_TEMPLATE_STORE", store);
    }
    let out = cmd.output().context("running moat")?;
    if !out.status.success() {
        bail!("`moat {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed())
}

/// Empty homes next to the bench's own, each with its daemon stopped and its files removed on drop.
struct Homes {
    bin: PathBuf,
    homes: Vec<PathBuf>,
}

impl Homes {
    /// A new empty home whose daemon already runs (so the timing leaves its start out).
    fn fresh(&mut self, base: &Path, store: Option<&str>) -> anyhow::Result<PathBuf> {
        let home = base.with_file_name(format!(
            "{}-remote-{}",
            base.file_name().and_then(|n| n.to_str()).unwrap_or("moat"),
            self.homes.len()
        ));
        let _ = std::fs::remove_dir_all(&home);
        self.homes.push(home.clone());
        moat_store(&self.bin, &home, store, &["ps"])?;
        // The minimal image is built on first use: here, not in the timing.
        moat_store(&self.bin, &home, store, &["image", "inspect", "minimal"])?;
        Ok(home)
    }
}

impl Drop for Homes {
    fn drop(&mut self) {
        for home in &self.homes {
            let listed = Command::new(&self.bin).args(["ps", "-a", "--json"]).env("MOAT_HOME", home).output();
            let names: Vec<String> = listed
                .ok()
                .and_then(|o| serde_json::from_slice::<Vec<moat_api::SandboxInfo>>(&o.stdout).ok())
                .map(|l| l.into_iter().map(|s| s.name).collect())
                .unwrap_or_default();
            for name in names {
                let _ = moat_store(&self.bin, home, None, &["rm", "-f", &name]);
            }
            let _ = moat_store(&self.bin, home, None, &["daemon", "stop"]);
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

/// Run `moat run -d …` then a first exec in `home`; the time of both and whether it restored.
fn create_to_first_exec(
    bin: &Path,
    home: &Path,
    store: Option<&str>,
    args: &[&str],
    name: &str,
) -> anyhow::Result<(Duration, bool)> {
    let t = Instant::now();
    let mut run = vec!["run", "-d", "--name", name];
    run.extend_from_slice(args);
    moat_store(bin, home, store, &run)?;
    moat_store(bin, home, store, &["exec", name, "--", "true"])?;
    let took = t.elapsed();
    Ok((took, inspect(bin, home, name)?.snapshot_id.is_some()))
}

pub async fn bench(bin: &Path, home: &Path, runs: usize) -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let mut homes = Homes { bin: bin.to_path_buf(), homes: Vec::new() };
    let _ = moat(bin, home, &["rm", "-f", SOURCE]);
    let measured = measure(bin, home, &registry.addr, runs, &mut homes);
    let _ = moat(bin, home, &["rm", "-f", SOURCE]);
    measured
}

fn measure(bin: &Path, home: &Path, registry: &str, runs: usize, homes: &mut Homes) -> anyhow::Result<()> {
    moat(bin, home, &["run", "-d", "--name", SOURCE, "--image", "minimal", "--memory", MEMORY])?;
    moat(bin, home, &["exec", SOURCE, "--", "sh", "-c", "echo state > /root/state"])?;
    let (mut local, mut remote, mut push) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let prefix = format!("bench-lfork{i}-");
        let t = Instant::now();
        moat(bin, home, &["fork", SOURCE, "-n", "1", "--name-prefix", &prefix])?;
        moat(bin, home, &["exec", &format!("{prefix}1"), "--", "true"])?;
        local.push(t.elapsed());
        moat(bin, home, &["rm", "-f", &format!("{prefix}1")])?;

        let other = homes.fresh(home, None)?;
        let reference = format!("{registry}/bench/env:s{i}");
        let t = Instant::now();
        moat(bin, home, &["snapshot", SOURCE, "--name", &format!("push{i}")])?;
        moat(bin, home, &["snapshot", "push", &format!("{SOURCE}:push{i}"), &reference])?;
        push.push(t.elapsed());
        let (_, restored) = create_to_first_exec(bin, &other, None, &["--from", &reference], "there")?;
        remote.push(t.elapsed());
        if !restored {
            bail!("the sandbox in the other home was not restored from {reference}");
        }
    }
    let (l, r, p) = (median(local), median(remote), median(push));
    println!("\nsnapshots between homes (minimal, {MEMORY} MiB, median of {runs})");
    println!("  local fork -n 1 to first exec            {:>10}", ms(l));
    println!("  snapshot + push + pull + restore + exec  {:>10}  ({} of it snapshot + push)", ms(r), ms(p));
    println!(
        "  ratio cross-home / local                 {:>9.2}x  (goal: cross-home ≤ 2 s)",
        r.as_secs_f64() / l.as_secs_f64()
    );

    // The template store: one home boots and pushes the template; empty homes restore it.
    let store = format!("{registry}/bench/templates");
    let seed = homes.fresh(home, Some(&store))?;
    create_to_first_exec(bin, &seed, Some(&store), &["--image", "minimal", "--memory", MEMORY], "seed")?;
    let tags = || {
        Command::new(bin)
            .args(["snapshot", "ls", "--json"])
            .env("MOAT_HOME", &seed)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("template"))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tags() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    // The push runs in the background after the create: give it time to land.
    std::thread::sleep(Duration::from_secs(3));
    let (mut stored, mut cold) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let empty = homes.fresh(home, Some(&store))?;
        let (t, restored) =
            create_to_first_exec(bin, &empty, Some(&store), &["--image", "minimal", "--memory", MEMORY], "first")?;
        if !restored {
            bail!("the first sandbox of an empty home booted instead of restoring the store's template");
        }
        stored.push(t);
        let (t, _) = create_to_first_exec(
            bin,
            &empty,
            Some(&store),
            &["--image", "minimal", "--memory", MEMORY, "--cold"],
            "cold",
        )?;
        cold.push(t);
    }
    let (s, c) = (median(stored), median(cold));
    println!("\nfirst create on an empty home (minimal, {MEMORY} MiB, median of {runs})");
    println!("  cold boot to first exec                  {:>10}", ms(c));
    println!("  template store pull + restore + exec     {:>10}", ms(s));
    println!("  ratio store / cold                       {:>9.2}x  (goal ≤ 0.5x)", s.as_secs_f64() / c.as_secs_f64());
    Ok(())
}
