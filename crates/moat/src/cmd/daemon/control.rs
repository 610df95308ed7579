//! `moat daemon status|stop|restart|logs`: the daemon as a process on this machine (the
//! background daemon the CLI starts, or the systemd service), or a remote one's status.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use moat_api::Health;
use moat_client::Client;
use serde::Serialize;

use super::log_file;
use super::reach::{deadline, host_client, require_local, Reach};
use crate::cli::{DaemonCommand, HostArgs};
use crate::error::Hinted;

/// `moat daemon status` exits with this when no daemon runs (as `systemctl status` does).
const NOT_RUNNING: i32 = 3;

pub async fn daemon(command: DaemonCommand, host: &HostArgs) -> anyhow::Result<i32> {
    match command {
        DaemonCommand::Status { json } => status(host, json).await,
        DaemonCommand::Stop => {
            let home = require_local(host, "moat daemon stop")?;
            stop(host, &home).await.map(|_| 0)
        }
        DaemonCommand::Restart => restart(host).await,
        DaemonCommand::Logs { tail, follow } => logs(host, tail, follow),
    }
}

/// The pid of the daemon holding `home`'s lock, if it runs.
pub fn daemon_pid(home: &Path) -> Option<i32> {
    let pid = std::fs::read_to_string(home.join("daemon.lock")).ok()?.trim().parse::<i32>().ok()?;
    (pid > 0 && !lock_free(home)).then_some(pid)
}

/// Whether no process holds `home`'s daemon lock: the daemon is gone (its descriptors are closed
/// before it is reaped, so a zombie holds nothing). Read from /proc/locks rather than by taking
/// the lock, which would make a daemon starting at that moment give up.
fn lock_free(home: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(home.join("daemon.lock")) else { return true };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        // No /proc/locks: whether the pid in the file lives.
        let pid = std::fs::read_to_string(home.join("daemon.lock")).ok().and_then(|s| s.trim().parse::<i32>().ok());
        // SAFETY: signal 0 only checks that the process exists.
        return !pid.is_some_and(|p| p > 0 && unsafe { libc::kill(p, 0) } == 0);
    };
    let file = format!("{:02x}:{:02x}:{}", libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
    // `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`
    // Waiters (`->`) hold nothing.
    !locks.lines().any(|l| l.contains("FLOCK") && !l.contains("->") && l.split_whitespace().any(|f| f == file))
}

/// The systemd unit a local process runs in (`/system.slice/NAME.service`), from its cgroup.
fn systemd_unit_of(pid: i32) -> Option<String> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroup.lines().find_map(|line| {
        let unit = line.splitn(3, ':').nth(2)?.strip_prefix("/system.slice/")?.split('/').next()?;
        unit.ends_with(".service").then(|| unit.to_string())
    })
}

/// A process's arguments, without the program.
fn arguments_of(pid: i32) -> Option<Vec<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<OsString> =
        raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| std::ffi::OsStr::from_bytes(a).to_owned()).collect();
    args.get(1..).map(<[OsString]>::to_vec)
}

/// The value of `--log-file` in a daemon's arguments.
fn log_file_in(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--log-file" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|a| a.strip_prefix("--log-file=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// "3d 4h", "5m 3s", "12s".
fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// The first answer of a daemon, within the deadline.
async fn health_within(client: &Client, limit: Duration) -> Result<Health, Option<moat_client::ClientError>> {
    match tokio::time::timeout(limit, client.health()).await {
        Ok(Ok(h)) => Ok(h),
        Ok(Err(e)) => Err(Some(e)),
        Err(_) => Err(None),
    }
}

#[derive(Serialize)]
struct Status {
    running: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    home: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    health: Option<Health>,
    /// `systemd`, `background` (started by the CLI), or `foreground` (`moat serve` run by hand).
    #[serde(skip_serializing_if = "Option::is_none")]
    managed_by: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<String>,
}

async fn status(host: &HostArgs, json: bool) -> anyhow::Result<i32> {
    let limit = deadline(host)?;
    let reach = Reach::of(host)?;
    let home = reach.local_home();
    let (client, endpoint) = match &reach {
        Reach::Host(endpoint) => (host_client(host, endpoint)?, Some(endpoint.to_string())),
        Reach::Home(home) => (Client::new(&moat_daemon::socket_path(home)), None),
    };
    let client = client.with_connect_timeout(limit);
    let pid = home.as_deref().and_then(daemon_pid);
    if home.is_some() && pid.is_none() {
        let s = Status { running: false, home, endpoint, health: None, managed_by: None, log: None };
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            println!("not running (home {})", s.home.as_deref().unwrap_or(Path::new("?")).display());
        }
        return Ok(NOT_RUNNING);
    }
    let health = match health_within(&client, limit).await {
        Ok(h) => h,
        Err(None) => return Err(super::not_answering(pid, &client.endpoint(), limit).into()),
        Err(Some(e)) => return Err(e).context(format!("asking the daemon at {} for its status", client.endpoint())),
    };
    let (managed_by, log) = match (&health.systemd_unit, pid.and_then(arguments_of)) {
        (Some(unit), _) => (Some("systemd"), Some(format!("journalctl -u {unit}"))),
        (None, Some(args)) => match log_file_in(&args) {
            Some(file) => (Some("background"), Some(file.display().to_string())),
            None => (Some("foreground"), Some("its standard error".into())),
        },
        (None, None) => (None, None),
    };
    let s = Status { running: true, home, endpoint, health: Some(health), managed_by, log };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    let h = s.health.as_ref().expect("a running daemon's status has its health");
    println!("running: pid {}, moat {}, up {}", h.pid, h.version, uptime(h.uptime_secs));
    if let Some(endpoint) = &s.endpoint {
        println!("daemon: {endpoint}");
    }
    if let Some(home) = &s.home {
        println!("home: {}", home.display());
    }
    println!("accelerator: {}", h.accel);
    println!("sandboxes: {} live (at most {})", h.sandboxes, h.max_sandboxes);
    println!("socket: {}", if h.socket.is_empty() { "?" } else { &h.socket });
    println!("tcp: {}", h.tcp.as_deref().unwrap_or("off"));
    match (&h.systemd_unit, s.managed_by) {
        (Some(unit), _) => println!("service: systemd ({unit})"),
        (None, Some("background")) => println!("service: none (started in the background by the CLI)"),
        (None, Some(_)) => println!("service: none (`moat serve` run by hand)"),
        (None, None) => println!("service: none"),
    }
    if let Some(log) = &s.log {
        println!("log: {log}");
    }
    Ok(0)
}

/// What `stop` stopped.
struct Stopped {
    pid: i32,
    args: Option<Vec<OsString>>,
}

/// Stop `home`'s daemon and wait until its lock is free. `None` when none ran.
async fn stop(host: &HostArgs, home: &Path) -> anyhow::Result<Option<Stopped>> {
    let limit = deadline(host)?;
    let Some(pid) = daemon_pid(home) else {
        eprintln!("moat: no daemon runs for {}", home.display());
        return Ok(None);
    };
    if let Some(unit) = systemd_unit_of(pid) {
        systemctl(&["stop", &unit])?;
        eprintln!("moat: stopped {unit} (pid {pid}); its sandboxes keep running and the next daemon adopts them");
        return Ok(Some(Stopped { pid, args: None }));
    }
    let args = arguments_of(pid);
    // How many sandboxes keep running, when it still answers; a hung daemon is stopped anyway.
    let client = Client::new(&moat_daemon::socket_path(home)).with_connect_timeout(limit);
    let live = health_within(&client, limit.min(Duration::from_secs(2))).await.ok().map(|h| h.sandboxes);
    // SAFETY: kill with a pid read from the lock file that a process still holds, and valid signals.
    // SIGCONT lets a stopped (SIGSTOP) daemon take the SIGTERM.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
        libc::kill(pid, libc::SIGCONT);
    }
    let started = Instant::now();
    while !lock_free(home) {
        if started.elapsed() > limit {
            return Err(Hinted::new(
                format!("the daemon (pid {pid}) did not exit within {limit:?} of SIGTERM"),
                format!(
                    "see what it is doing in `moat daemon logs`; `kill -KILL {pid}` ends it at once (sandboxes keep \
                     running either way, and the next daemon adopts them)"
                ),
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = match live {
        Some(0) => "no sandboxes were running".to_string(),
        Some(1) => "its sandbox keeps running and the next daemon adopts it".to_string(),
        Some(n) => format!("its {n} sandboxes keep running and the next daemon adopts them"),
        None => "its sandboxes keep running and the next daemon adopts them".to_string(),
    };
    eprintln!("moat: stopped the daemon (pid {pid}); {kept}");
    Ok(Some(Stopped { pid, args }))
}

async fn restart(host: &HostArgs) -> anyhow::Result<i32> {
    let home = require_local(host, "moat daemon restart")?;
    if let Some(unit) = daemon_pid(&home).and_then(systemd_unit_of) {
        systemctl(&["restart", &unit])?;
        eprintln!("moat: restarted {unit}");
        return Ok(0);
    }
    let stopped = stop(host, &home).await?;
    // The same daemon again: a `moat serve --tcp …` run by hand keeps its listener.
    let args = stopped.as_ref().and_then(|s| s.args.clone()).filter(|a| a.iter().any(|x| x == "serve"));
    let mut daemon = super::start_daemon(host, &home, args)?;
    let client = Client::new(&moat_daemon::socket_path(&home));
    let h = super::wait_started(&client, &mut daemon, &home).await?;
    match stopped {
        Some(s) => eprintln!("moat: restarted the daemon (pid {} → {})", s.pid, h.pid),
        None => eprintln!("moat: started the daemon (pid {})", h.pid),
    }
    Ok(0)
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("systemctl").args(args).status().context("running systemctl")?;
    if !status.success() {
        return Err(Hinted::new(
            format!("`systemctl {}` failed ({status})", args.join(" ")),
            "run it as root (sudo), and see `journalctl -u moat` for why",
        )
        .into());
    }
    Ok(())
}

fn logs(host: &HostArgs, tail: Option<usize>, follow: bool) -> anyhow::Result<i32> {
    let home = require_local(host, "moat daemon logs")?;
    let pid = daemon_pid(&home);
    if let Some(unit) = pid.and_then(systemd_unit_of) {
        let mut cmd = Command::new("journalctl");
        cmd.args(["-u", &unit, "--no-pager"]);
        if let Some(n) = tail {
            cmd.arg("-n").arg(n.to_string());
        }
        if follow {
            cmd.arg("-f");
        }
        let status = cmd.status().context("running journalctl")?;
        return Ok(status.code().unwrap_or(1));
    }
    // A daemon run by hand with its own --log-file logs there.
    let path = pid
        .and_then(arguments_of)
        .and_then(|a| log_file_in(&a))
        .map(|p| if p.is_absolute() { p } else { home.join(p) })
        .unwrap_or_else(|| home.join("daemon.log"));
    let text = log_file::tail(&path, tail).map_err(|e| {
        anyhow::Error::new(e).context(Hinted::new(
            format!("cannot read the daemon's log {}", path.display()),
            "the CLI's background daemon logs there; `moat serve` run by hand logs to its standard error",
        ))
    })?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(&text)?;
    out.flush()?;
    if follow {
        let from = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        log_file::follow(&path, from, &mut out)?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_like_a_person_wrote_them() {
        assert_eq!(uptime(12), "12s");
        assert_eq!(uptime(303), "5m 3s");
        assert_eq!(uptime(3 * 3600 + 120), "3h 2m");
        assert_eq!(uptime(2 * 86400 + 5 * 3600), "2d 5h");
    }

    #[test]
    fn the_log_file_is_found_in_a_daemons_arguments() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(log_file_in(&args(&["serve", "--log-file", "/h/daemon.log"])), Some("/h/daemon.log".into()));
        assert_eq!(log_file_in(&args(&["serve", "--log-file=/x.log"])), Some("/x.log".into()));
        assert_eq!(log_file_in(&args(&["serve", "--tcp", "127.0.0.1:1"])), None);
    }

    #[test]
    fn a_home_without_a_daemon_has_a_free_lock() {
        let dir = tempfile::tempdir().unwrap();
        assert!(lock_free(dir.path()) && daemon_pid(dir.path()).is_none());
        std::fs::write(dir.path().join("daemon.lock"), std::process::id().to_string()).unwrap();
        assert!(daemon_pid(dir.path()).is_none(), "a pid in a lock nobody holds is no daemon");
    }
}
