//! Snapshots, reverts, forks, pause and resume, and templates, through the CLI and a real daemon
//! booting real VMs under TCG.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{moat_in, moat_ok, text, wait_for, OwnHome};

fn sh(home: &std::path::Path, sandbox: &str, script: &str) -> String {
    moat_ok(home, &["exec", sandbox, "--", "sh", "-c", script]).trim().to_string()
}

fn count(home: &std::path::Path, sandbox: &str) -> u64 {
    sh(home, sandbox, "cat /tmp/count 2>/dev/null || echo 0").parse().expect("a number")
}

fn inspect(home: &std::path::Path, sandbox: &str) -> serde_json::Value {
    serde_json::from_str(&moat_ok(home, &["inspect", sandbox, "--json"])).expect("inspect prints JSON")
}

/// The pids of a sandbox's background processes.
fn job_pids(home: &std::path::Path, sandbox: &str) -> Vec<u64> {
    let jobs: serde_json::Value = serde_json::from_str(&moat_ok(home, &["ps", sandbox, "--json"])).unwrap();
    jobs.as_array().unwrap().iter().map(|j| j["pid"].as_u64().unwrap()).collect()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Run `moat args`; it must fail. Its stderr.
fn moat_err(home: &std::path::Path, args: &[&str]) -> String {
    let out = moat_in(home).args(args).stdin(Stdio::null()).output().expect("moat runs");
    assert_ne!(out.status.code(), Some(0), "moat {args:?} should fail: {}", text(&out.stdout));
    text(&out.stderr)
}

#[test]
fn snapshot_revert_fork_pause_and_templates() {
    let home = OwnHome::new();
    let h = home.path();

    // The first sandbox of an image boots and leaves a template; the next one restores it.
    moat_ok(h, &["run", "-d", "--name", "box", "--memory", "256"]);
    let templates = moat_ok(h, &["snapshot", "ls"]);
    assert!(templates.contains("template") && templates.contains("minimal"), "{templates}");
    moat_ok(h, &["run", "-d", "--name", "quick", "--memory", "256"]);
    let quick = inspect(h, "quick");
    assert!(quick["snapshot_id"].is_string(), "restored from the template: {quick}");
    assert_eq!(sh(h, "quick", "hostname"), quick["hostname"].as_str().unwrap(), "its own hostname");
    moat_ok(h, &["rm", "-f", "quick"]);

    // A process counts in memory, once a second, into a file (replaced by rename, so a read
    // never sees it half written).
    let counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 1; done";
    moat_ok(h, &["exec", "-d", "box", "--", "sh", "-c", counter]);
    wait_for("the counter to run", Duration::from_secs(30), || count(h, "box") >= 2);
    let counter_pids = job_pids(h, "box");
    assert_eq!(counter_pids.len(), 1);
    moat_ok(h, &["snapshot", "box", "--name", "clean"]);
    let saved = count(h, "box");
    sh(h, "box", "echo later > /root/after");
    wait_for("the counter to move on", Duration::from_secs(30), || count(h, "box") >= saved + 5);
    let later = count(h, "box");

    // Revert: memory, processes and files as they were at the snapshot.
    moat_ok(h, &["revert", "box", "clean"]);
    let reverted = count(h, "box");
    assert!(
        reverted <= saved + 2 && reverted < later,
        "the counter is back at the saved value: saved {saved}, later {later}, after revert {reverted}"
    );
    assert_eq!(sh(h, "box", "ls /root/after 2>&1 || echo gone"), "ls: /root/after: No such file or directory\ngone");
    wait_for("the counter to go on from the saved value", Duration::from_secs(30), || count(h, "box") > reverted);
    assert_eq!(job_pids(h, "box"), counter_pids, "the same process runs on");

    // A snapshot of a sandbox that was itself restored (its memory is the snapshot's, mapped
    // copy-on-write) saves and restores too.
    moat_ok(h, &["snapshot", "box", "--name", "second"]);
    let listed = moat_ok(h, &["snapshot", "ls", "box"]);
    assert!(listed.contains("box:clean") && listed.contains("box:second"), "{listed}");

    // Five forks side by side, each its own machine.
    let forks = moat_ok(h, &["fork", "box", "-n", "5", "--snapshot", "clean", "--name-prefix", "f-"]);
    let names: Vec<&str> = forks.lines().collect();
    assert_eq!(names, ["f-1", "f-2", "f-3", "f-4", "f-5"]);
    let identity = "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1";
    let mut seen: std::collections::HashSet<String> = sh(h, "box", identity).lines().map(String::from).collect();
    assert_eq!(seen.len(), 3);
    for name in &names {
        let before = now_secs();
        let out = sh(h, name, &format!("{identity}; date +%s; cat /tmp/count"));
        let after = now_secs();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        let guest_time: u64 = lines[3].trim().parse().unwrap();
        assert!(
            guest_time + 1 >= before && guest_time <= after + 1,
            "{name}: guest clock {guest_time}, host {before}..{after}"
        );
        assert!(lines[4].parse::<u64>().unwrap() <= later, "{name} continues the snapshot's counter: {out}");
        for unique in &lines[..3] {
            assert!(seen.insert(unique.to_string()), "{name} repeats {unique:?} of another fork or of box");
        }
        assert_eq!(lines[0], inspect(h, name)["hostname"].as_str().unwrap());
    }
    sh(h, "f-1", "echo mine > /root/f1");
    assert_eq!(sh(h, "f-2", "cat /root/f1 2>/dev/null || echo absent"), "absent", "forks share no writes");

    // A snapshot that sandboxes build on cannot be removed; the error names them.
    let err = moat_err(h, &["snapshot", "rm", "box:clean"]);
    assert!(err.contains("in use") && err.contains("f-1") && err.contains("f-5"), "{err}");

    // Pause releases the VM; resume continues the same processes and files.
    let qemu_pid = inspect(h, "f-1")["pid"].as_u64().unwrap();
    moat_ok(h, &["pause", "f-1"]);
    assert_eq!(inspect(h, "f-1")["phase"], "paused");
    assert!(!std::path::Path::new(&format!("/proc/{qemu_pid}")).exists(), "QEMU is gone while paused");
    let err = moat_err(h, &["exec", "f-1", "--", "true"]);
    assert!(err.contains("paused"), "{err}");
    moat_ok(h, &["resume", "f-1"]);
    assert_eq!(sh(h, "f-1", "cat /root/f1"), "mine");
    let c = count(h, "f-1");
    wait_for("the counter to run on after resume", Duration::from_secs(30), || count(h, "f-1") > c);

    // A new agent build makes every saved VM unrestorable: refused with the reason, and new
    // sandboxes boot instead of using the old template.
    common::stop_daemon(h);
    let agent = std::path::PathBuf::from(env!("CARGO_BIN_EXE_moat"))
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("x86_64-unknown-linux-gnu/agent/moat-agent"))
        .unwrap();
    let other = h.join("moat-agent-next");
    let mut bytes = std::fs::read(&agent).expect("the static agent is built (scripts/build-agent)");
    bytes.extend_from_slice(b"another build");
    std::fs::write(&other, bytes).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let with_agent = |args: &[&str]| {
        moat_in(h).env("MOAT_AGENT", &other).args(args).stdin(Stdio::null()).output().expect("moat runs")
    };
    let out = with_agent(&["run", "--from", "box:clean", "--", "true"]);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("cannot be restored") && err.contains("agent build") && err.contains("new snapshot"), "{err}");
    let out = with_agent(&["run", "-d", "--name", "fresh", "--memory", "256"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let fresh = with_agent(&["inspect", "fresh", "--json"]);
    let fresh: serde_json::Value = serde_json::from_slice(&fresh.stdout).unwrap();
    assert!(fresh["snapshot_id"].is_null(), "booted, not restored from the old template: {fresh}");

    // A restored sandbox adopted by the new daemon still snapshots (its RAM is not its own file).
    let out = with_agent(&["snapshot", "f-2", "--name", "adopted"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = with_agent(&["run", "--from", "f-2:adopted", "--", "cat", "/tmp/count"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = with_agent(&["rm", "-f", "box", "f-1", "f-2", "f-3", "f-4", "f-5", "fresh"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(common::qemu_processes_mentioning(&h.display().to_string()).is_empty(), "no VM left");
}
