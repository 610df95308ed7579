//! What the E2B front costs: `Sandbox.create()` + `commands.run("true")` + `kill()` through the
//! unmodified `e2b` Python SDK, next to the same through moat's own CLI, `moat run -- bash -l -c
//! true` (create, exec, remove: the SDK runs every command as `/bin/bash -l -c CMD`), on the
//! same daemon and image, samples interleaved. The SDK side is timed inside
//! Python, so the interpreter's start is not counted; the CLI side is the whole process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{median, ms};

/// The SDK version measured (the one the tests pin).
const SDK: &str = "e2b==2.63.0";

const SAMPLE: &str = r#"
import sys, time
from e2b import Sandbox
t = time.perf_counter()
s = Sandbox.create(template="base")
r = s.commands.run("true")
s.kill()
took = time.perf_counter() - t
assert r.exit_code == 0, r
print(took)
"#;

/// A daemon serving the E2B API, on a home of its own, for as long as this lives.
struct Served {
    home: PathBuf,
    daemon: std::process::Child,
    env: Vec<(String, String)>,
}

impl Served {
    fn start(moat_bin: &Path, home: &Path) -> anyhow::Result<Served> {
        let home = home.with_file_name(format!(
            "{}-e2b",
            home.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
        let daemon = Command::new(moat_bin)
            .args(["serve", "--e2b", "127.0.0.1:0"])
            .env("MOAT_HOME", &home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a daemon with the E2B API")?;
        let mut me = Served { home, daemon, env: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = Command::new(moat_bin).args(["e2b", "env"]).env("MOAT_HOME", &me.home).output()?;
            if out.status.success() {
                me.env = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                return Ok(me);
            }
            if Instant::now() > deadline || me.daemon.try_wait()?.is_some() {
                bail!("the daemon with --e2b did not come up (see {}/daemon.log)", me.home.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // The daemon this process started and has not reaped: its pid is still its own.
        if let Some(pid) = rustix::process::Pid::from_raw(self.daemon.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::Term);
        }
        let _ = self.daemon.wait();
    }
}

/// A Python with the SDK, in a venv made once under the target directory.
fn python(moat_bin: &Path) -> anyhow::Result<PathBuf> {
    let venv = moat_bin.with_file_name("e2b-bench-venv");
    let python = venv.join("bin/python");
    let ok = |p: &Path| Command::new(p).args(["-c", "import e2b"]).output().is_ok_and(|o| o.status.success());
    if ok(&python) {
        return Ok(python);
    }
    let made = Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv).status()?;
    let installed =
        made.success() && Command::new(&python).args(["-m", "pip", "install", "--quiet", SDK]).status()?.success();
    if !installed || !ok(&python) {
        bail!("could not install {SDK} into {}: apt-get install -y python3-venv python3-pip", venv.display());
    }
    Ok(python)
}

pub async fn bench(moat_bin: &Path, home: &Path, runs: usize) -> anyhow::Result<()> {
    let runs = runs.max(5);
    let python = python(moat_bin)?;
    let served = Served::start(moat_bin, home)?;
    let cli = || -> anyhow::Result<Duration> {
        let t = Instant::now();
        let status = Command::new(moat_bin)
            .args(["run", "--", "/bin/bash", "-l", "-c", "true"])
            .env("MOAT_HOME", &served.home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("`moat run -- bash -l -c true` failed: {status}");
        }
        Ok(t.elapsed())
    };
    let sdk = || -> anyhow::Result<Duration> {
        let out = Command::new(&python).args(["-c", SAMPLE]).envs(served.env.iter().cloned()).output()?;
        if !out.status.success() {
            bail!("the SDK sample failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().context("the SDK sample's time")?;
        Ok(Duration::from_secs_f64(secs))
    };
    // The first run builds the default image and saves its template; neither is measured.
    cli()?;
    sdk()?;
    let (mut cli_t, mut sdk_t) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        cli_t.push(cli()?);
        sdk_t.push(sdk()?);
    }
    let (c, s) = (median(cli_t), median(sdk_t));
    println!("\nE2B front: create, run `bash -l -c true`, remove; default image (median of {runs})");
    println!("  moat run (baseline)            {:>10}", ms(c));
    println!("  e2b SDK through the front      {:>10}", ms(s));
    println!("  ratio                          {:>10.2}x", s.as_secs_f64() / c.as_secs_f64());
    Ok(())
}
