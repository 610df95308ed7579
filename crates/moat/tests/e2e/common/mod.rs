//! Shared fixture for the end-to-end tests: a moat home under target/, real QEMU, real kernel.
#![allow(dead_code)] // Each test file uses a different part of the fixture.

pub mod lab_guest;
pub mod netlab;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use moat_sandbox::{Runtime, RuntimeConfig, Sandbox, SandboxSpec, Shape};

/// The state directory all end-to-end tests share, so the initramfs and image are built once.
pub fn home() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-home");
    std::fs::create_dir_all(&dir).expect("target dir is writable");
    dir
}

/// Fail (never skip) with the install command when the host lacks what the tests need.
pub fn require_host() {
    let mut missing = Vec::new();
    for (tool, package) in
        [("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"), ("mkfs.ext4", "e2fsprogs")]
    {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            missing.push(package);
        }
    }
    if !Path::new("/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    let has_kernel = std::fs::read_dir("/boot")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
        .unwrap_or(false);
    if !has_kernel {
        missing.push("linux-image-cloud-amd64");
    }
    assert!(
        missing.is_empty(),
        "the end-to-end tests need host packages that are missing: {0}\n\
         install them with: sudo moat setup   (or: sudo apt-get install -y --no-install-recommends {0})",
        missing.join(" ")
    );
}

/// The `moat` binary under test, with MOAT_HOME pointing at the shared test home. The daemon it
/// starts exits on its own once the tests leave it idle.
pub fn moat() -> Command {
    moat_in(&home())
}

/// The `moat` binary with its own home (and so its own daemon).
pub fn moat_in(home: &Path) -> Command {
    require_host();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moat"));
    // The busybox image unless a test asks for another: the default image needs a Debian build.
    cmd.env("MOAT_HOME", home)
        .env("MOAT_IDLE_EXIT", "20s")
        .env("MOAT_IMAGE", "minimal")
        .env_remove("MOAT_KERNEL")
        .env_remove("MOAT_ACCEL");
    cmd
}

/// The pid of the daemon serving `home`, if one runs.
pub fn daemon_pid(home: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(home.join("daemon.lock")).ok()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Stop the daemon of `home` (SIGTERM) and wait until it is gone.
pub fn stop_daemon(home: &Path) {
    if let Some(pid) = daemon_pid(home) {
        // SAFETY: kill with a pid read from the daemon's lock file and a valid signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_for("the daemon to exit", Duration::from_secs(20), || daemon_pid(home).is_none());
    }
}

/// Run `moat` to completion with no stdin.
pub fn moat_output(args: &[&str]) -> Output {
    moat().args(args).stdin(Stdio::null()).output().expect("moat binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A runtime on the shared home, for tests that drive sandboxes through the library.
pub async fn runtime() -> Runtime {
    require_host();
    let mut config = RuntimeConfig::from_env().expect("MOAT_* variables are valid");
    config.home = home();
    config.kernel = None;
    Runtime::prepare(config).await.expect("the runtime prepares on a host with the packages installed")
}

pub async fn boot(rt: &Runtime) -> Sandbox {
    let shape = Shape::new(1, 256, Shape::default().disk_mib()).expect("a small shape is valid");
    Sandbox::boot(rt, &SandboxSpec { shape, ..SandboxSpec::default() }).await.expect("sandbox boots")
}

/// QEMU processes whose command line mentions `needle` (e.g. a sandbox run dir).
pub fn qemu_processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        // QEMU itself, not the `moat __jail` helper that started it (its arguments name QEMU too).
        let program = text(cmdline.split(|b| *b == 0).next().unwrap_or_default());
        let cmdline = text(&cmdline);
        if program.contains("qemu-system") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Wait for a condition, polling; panics with `what` if it does not hold in time.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A home of its own for one test; its daemon is stopped when the test ends, even by a panic.
pub struct OwnHome(pub tempfile::TempDir);

impl OwnHome {
    pub fn new() -> OwnHome {
        OwnHome(tempfile::tempdir().expect("a temp dir can be created"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for OwnHome {
    fn drop(&mut self) {
        if std::thread::panicking() {
            keep_logs(self.0.path());
        }
        stop_daemon(self.0.path());
        // VMs outlive their daemon on purpose; a test that failed half-way must not leak them.
        for pid in qemu_processes_mentioning(&self.0.path().display().to_string()) {
            // SAFETY: SIGKILL to a QEMU whose command line names this test's own home.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// A failed test's logs (the daemon's, QEMU's, the guests' consoles) would go with its home:
/// copy them to `target/tmp/failed/TEST/` and print their tails with the failure.
fn keep_logs(home: &Path) {
    let test = std::thread::current().name().unwrap_or("unnamed").replace("::", "-");
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("failed").join(test);
    for log in log_files(home) {
        let relative = log.strip_prefix(home).unwrap_or(&log);
        let to = keep.join(relative);
        let copied = to.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::copy(&log, &to));
        let content = std::fs::read(&log).unwrap_or_default();
        let tail: Vec<&str> = std::str::from_utf8(&content).unwrap_or("").lines().rev().take(30).collect();
        eprintln!("--- {} (last {} lines; kept: {:?})", relative.display(), tail.len(), copied.map(|_| to));
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
    }
}

/// Whether `needle` occurs anywhere in the file at `path`, read in chunks (guest RAM and disks
/// are large). A file that went away meanwhile holds nothing.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else { return false };
    let mut window = Vec::new();
    let mut chunk = vec![0u8; 4 << 20];
    loop {
        let n =
            std::io::Read::read(&mut file, &mut chunk).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if n == 0 {
            return false;
        }
        // The tail of the previous chunk stays, so a match across the boundary is found.
        let keep = window.len().saturating_sub(needle.len());
        window.drain(..keep);
        window.extend_from_slice(&chunk[..n]);
        if window.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
}

/// Every file under `dir` whose name ends with `.log`.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            logs.extend(log_files(&path));
        } else if path.extension().is_some_and(|e| e == "log") {
            logs.push(path);
        }
    }
    logs
}

/// Run `moat args`, killing it if it takes longer than `limit`.
pub fn moat_timed(h: &Path, args: &[&str], limit: Duration) -> Output {
    let mut child = moat_in(h)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat runs");
    let start = Instant::now();
    while child.try_wait().expect("child state readable").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("killed child is reaped");
            panic!("moat {args:?} did not finish within {limit:?}: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("moat's output is readable")
}

/// `moat args` in `h` must succeed, each call within `limit`; its stdout. A sandbox still being
/// adopted by a daemon that has just started is the one failure worth waiting out (up to `limit`).
pub fn moat_ok_through_adoption(h: &Path, args: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let out = moat_timed(h, args, limit);
        if out.status.success() {
            return text(&out.stdout);
        }
        let err = text(&out.stderr);
        assert!(
            err.contains("being adopted") && start.elapsed() < limit,
            "moat {args:?} failed ({}): {err}",
            out.status
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Run `moat args` in `home` with no stdin; it must succeed. Its stdout.
pub fn moat_ok(home: &Path, args: &[&str]) -> String {
    let out = moat_in(home).args(args).stdin(Stdio::null()).output().expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "moat {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A new pseudo-terminal: its controller and its replica, for a command the test runs on it.
pub fn pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).expect("openpt");
    grantpt(&controller).expect("grantpt");
    unlockpt(&controller).expect("unlockpt");
    let name = ptsname(&controller, Vec::new()).expect("ptsname");
    let replica = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .expect("open the replica");
    (controller, replica)
}
