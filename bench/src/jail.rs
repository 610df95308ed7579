//! What the QEMU jail costs: a sandbox from its template to its first exec, a cold boot to its
//! first exec, and `moat fork -n K`, each with the jail on (the home the other benchmarks use)
//! and off (a second daemon on a home of its own, started with `MOAT_JAIL=off`), samples
//! interleaved so both sides see the same machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::files::moat;
use crate::snapshots::first_exec;
use crate::{median, ms};

const BOX: &str = "bench-jail";
const SOURCE: &str = "bench-jail-src";
const FORK_PREFIX: &str = "bench-jf-";

/// A daemon without the jail, on its own home, for as long as this lives.
struct Unjailed {
    home: PathBuf,
    daemon: std::process::Child,
}

impl Unjailed {
    fn start(moat_bin: &Path, home: &Path) -> anyhow::Result<Unjailed> {
        let home = home.with_file_name(format!(
            "{}-nojail",
            home.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
        let daemon = Command::new(moat_bin)
            .arg("serve")
            .env("MOAT_HOME", &home)
            .env("MOAT_JAIL", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a daemon without the jail")?;
        let mut me = Unjailed { home, daemon };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !me.home.join("moat.sock").exists() {
            if Instant::now() > deadline || me.daemon.try_wait()?.is_some() {
                bail!("the daemon with MOAT_JAIL=off did not come up (see {}/daemon.log)", me.home.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }
}

impl Drop for Unjailed {
    fn drop(&mut self) {
        // The daemon this process started and has not reaped: its pid is still its own.
        if let Some(pid) = rustix::process::Pid::from_raw(self.daemon.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
        }
        let _ = self.daemon.wait();
    }
}

/// `moat fork SOURCE -n forks`, then the forks removed.
fn fork(moat_bin: &Path, home: &Path, forks: usize) -> anyhow::Result<Duration> {
    let n = forks.to_string();
    let (took, _) = moat(moat_bin, home, &["fork", SOURCE, "-n", &n, "--name-prefix", FORK_PREFIX])?;
    let names: Vec<String> = (1..=forks).map(|i| format!("{FORK_PREFIX}{i}")).collect();
    let mut rm = vec!["rm", "-f"];
    rm.extend(names.iter().map(String::as_str));
    moat(moat_bin, home, &rm)?;
    Ok(took)
}

pub async fn bench(moat_bin: &Path, home: &Path, runs: usize, forks: usize) -> anyhow::Result<()> {
    let runs = runs.max(5);
    let off = Unjailed::start(moat_bin, home)?;
    let homes = [home, off.home.as_path()];
    for h in homes {
        // The first create of an image saves its template; the samples restore it.
        first_exec(moat_bin, h, BOX, false)?;
        moat(moat_bin, h, &["run", "-d", "--name", SOURCE, "--image", "minimal", "--memory", "256"])?;
    }
    let mut samples: [[Vec<Duration>; 2]; 3] = Default::default();
    for _ in 0..runs {
        for (side, h) in homes.iter().enumerate() {
            samples[0][side].push(first_exec(moat_bin, h, BOX, false)?);
            samples[1][side].push(first_exec(moat_bin, h, BOX, true)?);
        }
    }
    // A fork of K is long and steady: fewer samples.
    for _ in 0..runs.div_ceil(2) {
        for (side, h) in homes.iter().enumerate() {
            samples[2][side].push(fork(moat_bin, h, forks)?);
        }
    }
    for h in homes {
        moat(moat_bin, h, &["rm", "-f", SOURCE])?;
    }
    println!("\nthe QEMU jail: on (a uid, namespaces and a root of its own) vs off (MOAT_JAIL=off), medians");
    println!("  {:<34}{:>10}{:>10}{:>9}", "", "jail on", "jail off", "on/off");
    let labels =
        ["template → first exec".to_string(), "cold boot → first exec".into(), format!("moat fork -n {forks}")];
    for (label, [on, off]) in labels.iter().zip(samples) {
        let (on, off) = (median(on), median(off));
        println!("  {label:<34}{:>10}{:>10}{:>8.2}x", ms(on), ms(off), on.as_secs_f64() / off.as_secs_f64());
    }
    Ok(())
}
