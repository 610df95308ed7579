//! Keeping the state safe, against a real daemon and real VMs: `moat state backup` while a
//! sandbox runs, `moat state restore` with the daemon stopped (and refused with it running, or
//! for a file that is not a moat state), the daemon's periodic backups and their retention, idle
//! sandboxes stopped by their policy but never under a running command, and ended sandboxes
//! pruned after `--prune-after`.

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{moat_in, moat_ok, moat_ok_through_adoption, stop_daemon, text, wait_for, OwnHome};
use moat_api::{Phase, SandboxInfo};

/// TCG boots share two cores with other tests.
const BOOT: Duration = Duration::from_secs(120);

fn ps(h: &Path) -> Vec<SandboxInfo> {
    let out = moat_ok(h, &["ps", "--all", "--json"]);
    serde_json::from_str(&out).expect("ps --json is a list of sandboxes")
}

fn phase(h: &Path, name: &str) -> Option<Phase> {
    ps(h).into_iter().find(|s| s.name == name).map(|s| s.phase)
}

/// `moat args` must fail; its stderr.
fn moat_err(h: &Path, args: &[&str]) -> String {
    let out = moat_in(h).args(args).stdin(Stdio::null()).output().expect("moat runs");
    assert!(!out.status.success(), "moat {args:?} succeeded: {}", text(&out.stdout));
    text(&out.stderr)
}

#[test]
fn a_backup_restores_a_removed_sandbox_and_refuses_what_is_not_one() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["run", "-d", "--name", "keep", "--memory", "256"]);
    let backup = h.join("backup.db");
    let out = moat_ok(h, &["state", "backup", backup.to_str().unwrap()]);
    assert!(out.contains("1 sandboxes"), "{out}");
    let err = moat_err(h, &["state", "backup", backup.to_str().unwrap()]);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    moat_ok(h, &["state", "backup", "--force", backup.to_str().unwrap()]);
    assert!(!h.join("backup.db.tmp").exists());

    // After the backup: one sandbox goes, another comes.
    moat_ok(h, &["rm", "-f", "keep"]);
    moat_ok(h, &["run", "-d", "--name", "late", "--memory", "256"]);
    let late_dir = h.join("run").join(ps(h).into_iter().find(|s| s.name == "late").unwrap().id);
    assert!(late_dir.exists());

    let err = moat_err(h, &["state", "restore", backup.to_str().unwrap()]);
    assert!(err.contains("daemon is running") && err.contains("moat daemon stop"), "{err}");
    stop_daemon(h);

    // Garbage and a newer schema are refused, and the state stays as it was.
    let before = std::fs::read(h.join("state.db")).unwrap();
    let garbage = h.join("garbage.db");
    std::fs::write(&garbage, vec![b'x'; 4096]).unwrap();
    let err = moat_err(h, &["state", "restore", garbage.to_str().unwrap()]);
    assert!(err.contains("is not a moat state database") && err.contains("hint:"), "{err}");
    let newer = h.join("newer.db");
    std::fs::copy(&backup, &newer).unwrap();
    let set = std::process::Command::new("sqlite3").arg(&newer).arg("PRAGMA user_version = 999").status();
    if set.is_ok_and(|s| s.success()) {
        let err = moat_err(h, &["state", "restore", newer.to_str().unwrap()]);
        assert!(err.contains("newer moat") && err.contains("hint:"), "{err}");
    }
    assert_eq!(std::fs::read(h.join("state.db")).unwrap(), before, "the state is untouched");

    let out = moat_ok(h, &["state", "restore", backup.to_str().unwrap()]);
    assert!(out.contains("restored") && out.contains("before-restore"), "{out}");
    let kept: Vec<_> = std::fs::read_dir(h)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("state.db.before-restore-"))
        .collect();
    assert!(!kept.is_empty(), "the replaced state is kept");

    // The next daemon: the removed sandbox is listed again, failed, saying why; `late` is
    // unknown to the restored state, and gc reclaims its VM and files.
    let start = Instant::now();
    let list: Vec<SandboxInfo> =
        serde_json::from_str(&moat_ok_through_adoption(h, &["ps", "--all", "--json"], BOOT)).unwrap();
    let keep = list.iter().find(|s| s.name == "keep").expect("the removed sandbox is back");
    assert!(list.iter().all(|s| s.name != "late"), "{list:?}");
    wait_for("the restored sandbox to settle", BOOT.saturating_sub(start.elapsed()), || {
        phase(h, "keep") == Some(Phase::Failed)
    });
    let inspect = moat_ok(h, &["inspect", "keep"]);
    assert!(inspect.contains("files are gone"), "{inspect}");
    let _ = keep;
    moat_ok(h, &["gc"]);
    wait_for("gc to reclaim the unknown sandbox", Duration::from_secs(30), || !late_dir.exists());
    moat_ok(h, &["rm", "keep"]);
    assert!(ps(h).is_empty());
}

#[test]
fn idle_sandboxes_stop_but_not_under_a_running_command_and_ended_ones_are_pruned() {
    let home = OwnHome::new();
    let h = home.path();
    // Pruned a while after they stop: long enough to see them stopped first.
    let run = |name: &str| {
        let out = moat_in(h)
            .env("MOAT_PRUNE_AFTER", "6s")
            .args(["run", "-d", "--name", name, "--memory", "256", "--idle", "5s:stop"])
            .stdin(Stdio::null())
            .output()
            .expect("moat runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    run("nap");
    run("busy");
    let inspect = moat_ok(h, &["inspect", "busy"]);
    assert!(inspect.contains("idle:        stop after 5s unused"), "{inspect}");
    // A command that runs longer than the idle time.
    let mut exec = moat_in(h)
        .args(["exec", "busy", "--", "sleep", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat exec runs");
    let started = Instant::now();
    // Polled with `ps` only: naming a sandbox in a call is use.
    wait_for("the idle sandbox to stop", Duration::from_secs(30), || phase(h, "nap") == Some(Phase::Stopped));
    while started.elapsed() < Duration::from_secs(8) {
        assert_eq!(phase(h, "busy"), Some(Phase::Running), "stopped under a running command");
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = exec.wait().expect("moat exec ends");
    assert!(status.success(), "the command ran to its end");
    wait_for("the sandbox to stop once its command ended", Duration::from_secs(30), || {
        phase(h, "busy") != Some(Phase::Running)
    });
    let events = moat_ok(h, &["events", "--json"]);
    assert!(events.contains("\"kind\":\"idle\""), "{events}");
    // Then both go, --prune-after after they stopped.
    wait_for("the stopped sandboxes to be pruned", Duration::from_secs(30), || ps(h).is_empty());
    let events = moat_ok(h, &["events", "--json"]);
    assert!(events.contains("\"kind\":\"pruned\""), "{events}");
}

#[test]
fn the_daemon_backs_up_its_state_and_keeps_the_newest() {
    let home = OwnHome::new();
    let h = home.path();
    let out = moat_in(h)
        .env("MOAT_BACKUP_EVERY", "1s")
        .env("MOAT_BACKUP_KEEP", "2")
        .args(["ps"])
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = h.join("backups");
    let backups = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.retain(|n| n.starts_with("state-") && n.ends_with(".db"));
        names.sort();
        names
    };
    wait_for("two backups", Duration::from_secs(20), || backups().len() == 2);
    let first = backups();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(backups().len() <= 2, "{:?}", backups());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(backups(), first, "newer backups replace older ones");
    // Each is a whole state database.
    let newest = dir.join(backups().last().unwrap());
    let out = moat_in(h).args(["state", "restore", newest.to_str().unwrap()]).output().unwrap();
    assert!(text(&out.stderr).contains("daemon is running"), "{}", text(&out.stderr));
}
