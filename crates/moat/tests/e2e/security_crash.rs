//! The daemon SIGKILLed in the middle of an operation: snapshot, fork, pause, stop and rm, each
//! cut short at points the test sees happen (a snapshot directory or state file appearing, QEMU
//! ending). The next daemon brings every sandbox that was running back running, with the same
//! guest and its processes (or to a clear phase at rest), and leaks nothing: no stray QEMU, no
//! half snapshot, no helper directory. A guest that does not answer does not hold the restarted
//! daemon up. Real daemons, real VMs under TCG, driven through the CLI.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{daemon_pid, moat_in, qemu_processes_mentioning, wait_for, OwnHome};

/// Longest any single CLI call may take here; a restarted daemon that does not come up in time
/// is the failure these tests look for.
const CALL_LIMIT: Duration = Duration::from_secs(45);

/// `moat args` must succeed within [`CALL_LIMIT`], waiting out an adoption; its stdout.
fn moat_ok(h: &Path, args: &[&str]) -> String {
    common::moat_ok_through_adoption(h, args, CALL_LIMIT)
}

fn json(h: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&moat_ok(h, args)).expect("--json prints JSON")
}

/// The sandbox's record, or `None` once it is gone.
fn sandbox(h: &Path, name: &str) -> Option<serde_json::Value> {
    json(h, &["ps", "-a", "--json"]).as_array().expect("a list").iter().find(|s| s["name"] == name).cloned()
}

fn phase(h: &Path, name: &str) -> String {
    sandbox(h, name).map(|s| s["phase"].as_str().unwrap_or_default().to_string()).unwrap_or_else(|| "gone".into())
}

fn qemu_pid(h: &Path, name: &str) -> u32 {
    let s = sandbox(h, name).unwrap_or_else(|| panic!("sandbox {name} exists"));
    s["pid"].as_u64().unwrap_or_else(|| panic!("{name} has a QEMU: {s}")) as u32
}

/// The guest's boot id: the same value after a crash means the same guest, never rebooted.
fn boot_id(h: &Path, name: &str) -> String {
    moat_ok(h, &["exec", name, "--", "cat", "/proc/sys/kernel/random/boot_id"]).trim().to_string()
}

/// The pids of a sandbox's background processes.
fn jobs(h: &Path, name: &str) -> Vec<u64> {
    json(h, &["ps", name, "--json"]).as_array().expect("a list").iter().filter_map(|j| j["pid"].as_u64()).collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether process `pid` runs (a zombie waiting to be reaped does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false)
}

/// The QEMUs of the sandbox whose run directory is `dir` (by command line: pids are reused).
fn qemus_of(dir: &Path) -> Vec<u32> {
    qemu_processes_mentioning(&format!("{}/", dir.display()))
}

/// SIGKILL the daemon of `h` and wait until it is gone for good: its threads die only when their
/// system calls return (a file copy, an fsync), and until the last one has, its socket still
/// takes connections. Its pidfd turns readable only then.
fn kill_daemon(h: &Path) {
    use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
    let daemon = daemon_pid(h).and_then(Pid::from_raw).expect("a daemon runs");
    let pidfd = pidfd_open(daemon, PidfdFlags::empty()).expect("the daemon can be pinned");
    pidfd_send_signal(&pidfd, Signal::Kill).expect("the daemon can be killed");
    let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
    assert_eq!(rustix::event::poll(&mut fds, 20_000).expect("polling a pidfd"), 1, "the killed daemon ends");
}

/// Prints the daemon's log when a test fails: the home goes with the test.
struct LogOnFailure<'a>(&'a Path);

impl Drop for LogOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.0.join("daemon.log")).unwrap_or_default();
            eprintln!("daemon.log of the failed test:\n{log}");
        }
    }
}

/// A sandbox with a guest that must survive every crash below: its boot id and a background
/// process that must still run.
struct Survivor {
    name: &'static str,
    boot_id: String,
    job: u64,
}

impl Survivor {
    fn start(h: &Path, name: &'static str) -> Survivor {
        moat_ok(h, &["run", "-d", "--name", name, "--memory", "256"]);
        moat_ok(h, &["exec", "-d", name, "--", "sleep", "100000"]);
        let job = jobs(h, name)[0];
        Survivor { name, boot_id: boot_id(h, name), job }
    }

    fn dir(&self, h: &Path) -> PathBuf {
        let id = sandbox(h, self.name).expect("the survivor exists")["id"].as_str().expect("an id").to_string();
        h.join("run").join(id)
    }

    /// Still the same guest, answering exec, its process alive.
    fn check(&self, h: &Path, after: &str) {
        assert_eq!(boot_id(h, self.name), self.boot_id, "after {after}: {} runs the same guest", self.name);
        assert_eq!(jobs(h, self.name), vec![self.job], "after {after}: its background process runs on");
        assert_eq!(phase(h, self.name), "running", "after {after}");
    }
}

/// Run `moat args` and SIGKILL the daemon as soon as `point` holds (polled every millisecond).
/// Returns whether the daemon was killed before the command finished on its own.
fn kill_daemon_during(h: &Path, args: &[&str], what: &str, mut point: impl FnMut() -> bool) -> bool {
    assert!(daemon_pid(h).is_some(), "a daemon runs before moat {args:?}");
    let mut child = moat_in(h).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let child = child.as_mut().expect("moat runs");
    let start = Instant::now();
    let cut = loop {
        if point() {
            kill_daemon(h);
            break true;
        }
        if child.try_wait().expect("child state readable").is_some() {
            eprintln!("moat {args:?} finished before {what}; the daemon was not killed");
            break false;
        }
        assert!(start.elapsed() < CALL_LIMIT, "{what} never happened during moat {args:?}");
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = child.wait();
    cut
}

/// Nothing leaked: every snapshot directory is a ready snapshot, no helper VM directory is left,
/// and the only QEMUs are those of running sandboxes.
fn assert_no_leaks(h: &Path, after: &str) {
    let consistent = || {
        let listed: Vec<String> = json(h, &["snapshot", "ls", "--json"])
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect();
        let mut running: Vec<u64> = json(h, &["ps", "-a", "--json"])
            .as_array()
            .expect("a list")
            .iter()
            .filter(|s| s["phase"] == "running")
            .filter_map(|s| s["pid"].as_u64())
            .collect();
        running.sort();
        let mut qemus: Vec<u64> =
            qemu_processes_mentioning(&h.display().to_string()).into_iter().map(u64::from).collect();
        qemus.sort();
        entries(&h.join("snapshots")).iter().all(|d| listed.contains(d))
            && !entries(&h.join("run")).iter().any(|d| d.starts_with("save-"))
            && qemus == running
    };
    // The startup reconcile runs once adoption is done; `moat gc` then finds nothing more.
    wait_for(&format!("the reconcile after {after} to leave nothing behind"), Duration::from_secs(30), consistent);
    let reclaimed = moat_ok(h, &["gc"]);
    assert!(
        !reclaimed.contains("killed QEMU"),
        "after {after}: gc found a QEMU the startup reconcile missed: {reclaimed}"
    );
}

/// A file in `dir` appeared (by name prefix).
fn appears(dir: PathBuf, prefix: &'static str) -> impl FnMut() -> bool {
    move || entries(&dir).iter().any(|f| f.starts_with(prefix))
}

/// A snapshot directory that was not there before appeared, holding `file` (any file for "").
fn new_snapshot_with(h: &Path, file: &'static str) -> impl FnMut() -> bool {
    let root = h.join("snapshots");
    let before = entries(&root);
    move || {
        entries(&root)
            .iter()
            .filter(|d| !before.contains(d))
            .any(|d| file.is_empty() || root.join(d).join(file).exists())
    }
}

#[test]
fn a_daemon_killed_mid_snapshot_or_fork_loses_no_sandbox() {
    let home = OwnHome::new();
    let h = home.path();
    let _log = LogOnFailure(h);
    let survivor = Survivor::start(h, "box");

    // Before the save; with the guest paused and its state written; while its RAM and its disk
    // are copied.
    for (what, file) in [
        ("the snapshot directory appearing", ""),
        ("the state file appearing", "state"),
        ("the RAM copy starting", "mem"),
        ("the disk copy starting", "disk.qcow2"),
    ] {
        let after = format!("a crash at {what} during a snapshot");
        kill_daemon_during(h, &["snapshot", "box"], what, new_snapshot_with(h, file));
        survivor.check(h, &after);
        assert_no_leaks(h, &after);
    }

    // A sandbox restored from the template has no RAM file of its own: its snapshot streams RAM
    // into the state file, then a helper VM (`run/save-*`) splits it off. Cut short while the
    // stream is written (the next daemon finds the save still running and cancels it), then
    // while the helper runs.
    let restored = Survivor::start(h, "restored");
    let run = h.join("run");
    for (what, point) in [
        ("the RAM stream being written", Box::new(new_snapshot_with(h, "state.full")) as Box<dyn FnMut() -> bool>),
        ("the helper VM starting", Box::new(appears(run.clone(), "save-"))),
    ] {
        let after = format!("a crash at {what} during a snapshot of a restored sandbox");
        kill_daemon_during(h, &["snapshot", "restored"], what, point);
        restored.check(h, &after);
        survivor.check(h, &after);
        assert_no_leaks(h, &after);
    }
    moat_ok(h, &["rm", "-f", "restored"]);

    // A fork: while its snapshot is written, then while the new sandbox is restored from it.
    kill_daemon_during(h, &["fork", "box"], "the fork's snapshot being written", new_snapshot_with(h, "mem"));
    survivor.check(h, "a crash while a fork's snapshot was written");
    assert_no_leaks(h, "a crash while a fork's snapshot was written");
    let before = entries(&run);
    let restoring = || entries(&run).iter().any(|d| !before.contains(d) && !d.starts_with("save-"));
    let cut = kill_daemon_during(h, &["fork", "box", "--name-prefix", "late-"], "the fork's restore", restoring);
    assert!(cut, "the daemon was killed while the fork was being restored");
    survivor.check(h, "a crash while a fork was restored");
    assert_no_leaks(h, "a crash while a fork was restored");
    match phase(h, "late-1").as_str() {
        "gone" => {}
        "failed" | "running" => {
            moat_ok(h, &["rm", "-f", "late-1"]);
        }
        other => panic!("a fork cut short is running, failed or gone, not {other}"),
    }
    moat_ok(h, &["rm", "-f", "box"]);
    assert_no_leaks(h, "removing every sandbox");
}

#[test]
fn a_daemon_killed_mid_pause_stop_or_rm_loses_no_sandbox() {
    let home = OwnHome::new();
    let h = home.path();
    let _log = LogOnFailure(h);
    let survivor = Survivor::start(h, "box");

    // A pause cut short while the state is saved: QEMU is still there, so the guest runs on (or,
    // if QEMU had already ended, the sandbox is paused and resumes).
    let dir = survivor.dir(h);
    kill_daemon_during(h, &["pause", "box"], "the saved state appearing", appears(dir.clone(), "state"));
    if phase(h, "box") == "paused" {
        moat_ok(h, &["resume", "box"]);
    }
    survivor.check(h, "a crash while a pause saved the state");
    assert_no_leaks(h, "a crash while a pause saved the state");
    assert!(!entries(&dir).iter().any(|f| f.starts_with("state")), "no stale saved state: {:?}", entries(&dir));

    // Cut short once the state is saved and QEMU has ended: the sandbox is paused.
    let pid = qemu_pid(h, "box");
    assert!(kill_daemon_during(h, &["pause", "box"], "QEMU ending", || !alive(pid)), "the pause was cut short");
    assert_eq!(phase(h, "box"), "paused", "a saved VM whose QEMU ended is paused");
    moat_ok(h, &["resume", "box"]);
    survivor.check(h, "a crash right after a pause ended QEMU");
    assert_no_leaks(h, "a crash right after a pause ended QEMU");

    // A stop cut short while QEMU still runs (frozen here, so that the stop takes seconds): the
    // next daemon finishes it, and the sandbox starts again.
    let pid = qemu_pid(h, "box");
    // SAFETY: SIGSTOP to the QEMU of a sandbox this test made.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let started = Instant::now();
    let during = || started.elapsed() > Duration::from_secs(1);
    assert!(kill_daemon_during(h, &["stop", "box"], "the stop under way", during), "the stop was cut short");
    wait_for("the stop to be finished", Duration::from_secs(40), || phase(h, "box") == "stopped");
    assert_eq!(qemus_of(&dir), Vec::<u32>::new(), "the stopped sandbox's QEMU is gone");
    assert_no_leaks(h, "a crash during a stop");
    moat_ok(h, &["start", "box"]);
    moat_ok(h, &["exec", "box", "--", "true"]);

    // An rm cut short once its stop ended QEMU: the sandbox is at rest or gone, and `rm` finishes
    // the job.
    let id = dir.file_name().expect("a run dir name").to_string_lossy().into_owned();
    let pid = qemu_pid(h, "box");
    kill_daemon_during(h, &["rm", "-f", "box"], "QEMU ending", || !alive(pid));
    match phase(h, "box").as_str() {
        "gone" => {}
        "stopped" => {
            moat_ok(h, &["rm", "box"]);
        }
        other => panic!("an rm cut short leaves the sandbox stopped or gone, not {other}"),
    }
    assert_no_leaks(h, "a crash during rm");
    assert!(!entries(&h.join("run")).contains(&id), "the removed sandbox's files are gone");
}

#[test]
fn a_silent_guest_does_not_hold_up_a_restarted_daemon() {
    let home = OwnHome::new();
    let h = home.path();
    let _log = LogOnFailure(h);
    let survivor = Survivor::start(h, "box");
    moat_ok(h, &["run", "-d", "--name", "quiet", "--memory", "256"]);
    let quiet = qemu_pid(h, "quiet");

    // QEMU frozen: neither QMP nor the agent answers, as with a guest that wedged its agent.
    // SAFETY: SIGSTOP to the QEMU of a sandbox this test made.
    unsafe { libc::kill(quiet as i32, libc::SIGSTOP) };
    kill_daemon(h);

    let started = Instant::now();
    let listed = moat_ok(h, &["ps"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "a restarted daemon answered `moat ps` only after {took:?}");
    assert!(listed.contains("box") && listed.contains("quiet"), "{listed}");
    survivor.check(h, "a restart with a silent guest");

    // The silent one fails by itself, saying why, and its QEMU is reclaimed.
    wait_for("the silent sandbox to fail", Duration::from_secs(40), || phase(h, "quiet") == "failed");
    let error = sandbox(h, "quiet").expect("quiet exists")["last_error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("did not answer"), "the failure says why: {error}");
    let quiet_dir = h.join("run").join(sandbox(h, "quiet").expect("quiet exists")["id"].as_str().expect("an id"));
    wait_for("the silent guest's QEMU to be reclaimed", Duration::from_secs(20), || qemus_of(&quiet_dir).is_empty());
    assert_no_leaks(h, "a restart with a silent guest");
    moat_ok(h, &["rm", "-f", "box", "quiet"]);
}
