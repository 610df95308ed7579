//! The daemon end to end: `moat serve` as a real process on a home of its own, driven through the
//! typed client and the `moat` binary, booting real VMs under QEMU. Each test has its own home and
//! daemon, so they run side by side.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use moat_api::{CreateSandbox, ErrorCode, ExecStart, OnExpire, Phase, SandboxInfo};
use moat_client::{Client, ClientError};

use common::{moat_in, text};

/// The first start on a home builds the initramfs and the minimal image.
const DAEMON_START: Duration = Duration::from_secs(120);
/// TCG boots share two cores with the other tests; a slow boot is not what these tests check.
const BOOT_TIMEOUT_SECS: u64 = 240;

/// A home of its own and the daemons started on it. Dropping it, even when the test failed, ends
/// the daemons (SIGTERM, then SIGKILL) and kills every QEMU left under the home.
struct Home {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

impl Home {
    fn new() -> Home {
        common::require_host();
        Home { dir: tempfile::tempdir().expect("a temp dir can be created"), daemons: Vec::new() }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    fn client(&self) -> Client {
        Client::new(&moat_daemon::socket_path(self.path()))
    }

    /// The QEMU processes under this home's run directory.
    fn qemus(&self) -> Vec<(u32, PathBuf)> {
        moat_vmm::find_qemus_under(&self.run_dir())
    }

    /// The names in the run directory (one per sandbox that has files).
    fn run_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.run_dir())
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Spawn `moat serve` with `args`, its output appended to `log` in the home.
    fn spawn_daemon(&mut self, args: &[&str], log: &str) -> u32 {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(log))
            .expect("the daemon log can be opened");
        let child = Command::new(env!("CARGO_BIN_EXE_moat"))
            .arg("serve")
            .args(args)
            .env("MOAT_HOME", self.path())
            .env("MOAT_LOG", "info")
            .env_remove("MOAT_KERNEL")
            .env_remove("MOAT_ACCEL")
            .env_remove("MOAT_MAX_SANDBOXES")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log fd can be duplicated"))
            .stderr(log)
            .spawn()
            .expect("moat serve starts");
        let pid = child.id();
        self.daemons.push(child);
        pid
    }

    fn daemon(&mut self, pid: u32) -> &mut Child {
        self.daemons.iter_mut().find(|c| c.id() == pid).expect("the daemon is one this test started")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }

    /// Start a daemon and wait until it answers; returns its client.
    async fn serve(&mut self, args: &[&str]) -> Client {
        let pid = self.spawn_daemon(args, "daemon.log");
        let client = self.client();
        let deadline = Deadline::new("the daemon to answer", DAEMON_START);
        loop {
            match client.health().await {
                Ok(h) => {
                    assert_eq!(h.pid, pid, "the daemon that answers is the one just started");
                    return client;
                }
                Err(e) => {
                    if let Some(status) = self.daemon(pid).try_wait().expect("child state readable") {
                        panic!("the daemon exited ({status}) before answering:\n{}", self.log("daemon.log"));
                    }
                    deadline.tick(&e).await;
                }
            }
        }
    }

    /// Start `moat serve` expecting it to refuse: returns its exit status and output.
    async fn serve_refused(&mut self, args: &[&str]) -> (ExitStatus, String) {
        let log = "refused.log";
        let _ = std::fs::remove_file(self.path().join(log));
        let pid = self.spawn_daemon(args, log);
        let deadline = Deadline::new("moat serve to refuse to start", Duration::from_secs(30));
        loop {
            if let Some(status) = self.daemon(pid).try_wait().expect("child state readable") {
                return (status, self.log(log));
            }
            deadline.tick(&self.log(log)).await;
        }
    }

    /// The pid the running daemon wrote to daemon.lock.
    fn daemon_pid(&self) -> u32 {
        common::daemon_pid(self.path()).expect("a daemon runs on this home") as u32
    }

    /// SIGKILL the running daemon, as a crash would, and reap it.
    fn kill_daemon(&mut self) {
        let pid = self.daemon_pid();
        signal(pid, libc::SIGKILL);
        self.daemon(pid).wait().expect("the killed daemon is reaped");
    }

    /// SIGTERM the running daemon and wait for it to exit; it must exit cleanly.
    async fn stop_daemon(&mut self) {
        let pid = self.daemon_pid();
        signal(pid, libc::SIGTERM);
        let deadline = Deadline::new("the daemon to exit after SIGTERM", Duration::from_secs(20));
        loop {
            if let Some(status) = self.daemon(pid).try_wait().expect("child state readable") {
                assert!(status.success(), "the daemon exits cleanly on SIGTERM: {status}");
                return;
            }
            deadline.tick(&"still running").await;
        }
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The home goes away with the test: show what the daemon said while it is still there.
            let log = self.log("daemon.log");
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- daemon.log (last lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        for child in &mut self.daemons {
            if !matches!(child.try_wait(), Ok(None)) {
                continue;
            }
            signal(child.id(), libc::SIGTERM);
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A daemon the CLI started on its own (if ours had died) names this home on its command line.
        if let Some(pid) = common::daemon_pid(self.path()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| text(&c)).unwrap_or_default();
            if cmdline.contains("serve") && cmdline.contains(&*self.path().to_string_lossy()) {
                signal(pid as u32, libc::SIGTERM);
                let start = Instant::now();
                while common::daemon_pid(self.path()).is_some() && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        // A stopped daemon leaves its VMs running on purpose; these are ours to end.
        let start = Instant::now();
        loop {
            let left = self.qemus();
            if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
                break;
            }
            for (pid, _) in left {
                signal(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill with a pid this test started (or found under its own home) and a valid signal.
    unsafe { libc::kill(pid as i32, sig) };
}

/// A time limit for a condition that is polled.
struct Deadline {
    what: String,
    start: Instant,
    timeout: Duration,
}

impl Deadline {
    fn new(what: impl Into<String>, timeout: Duration) -> Deadline {
        Deadline { what: what.into(), start: Instant::now(), timeout }
    }

    /// Wait a little before looking again; panics, showing what was last seen, once time is up.
    async fn tick(&self, last_seen: &impl std::fmt::Debug) {
        assert!(
            self.start.elapsed() < self.timeout,
            "timed out after {:?} waiting for {}; last seen: {last_seen:?}",
            self.timeout,
            self.what
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small sandbox that may take its time to boot.
fn spec(name: &str) -> CreateSandbox {
    CreateSandbox {
        name: Some(name.into()),
        image: Some("minimal".into()),
        memory_mib: Some(256),
        boot_timeout_secs: Some(BOOT_TIMEOUT_SECS),
        ..Default::default()
    }
}

/// Run a shell script in a sandbox: (stdout, stderr, exit code).
async fn sh(client: &Client, sandbox: &str, script: &str) -> (String, String, i32) {
    let start = ExecStart { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() };
    let session = client.exec(sandbox, &start).await.unwrap_or_else(|e| panic!("exec in {sandbox} starts: {e}"));
    let (out, err, code) = session.collect().await.unwrap_or_else(|e| panic!("exec in {sandbox} ends: {e}"));
    (text(&out), text(&err), code)
}

/// Whether `pid` is a live QEMU (a zombie has no command line, so it does not count).
fn qemu_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| text(&c).contains("qemu-system"))
}

async fn wait_phase(client: &Client, reference: &str, phase: Phase, timeout: Duration) -> SandboxInfo {
    let deadline = Deadline::new(format!("sandbox {reference} to be {phase}"), timeout);
    loop {
        let info = client.inspect(reference).await.unwrap_or_else(|e| panic!("inspect {reference}: {e}"));
        if info.phase == phase {
            return info;
        }
        deadline.tick(&info).await;
    }
}

async fn wait_qemu_gone(pid: u32) {
    let deadline = Deadline::new(format!("QEMU {pid} to exit"), Duration::from_secs(15));
    while qemu_alive(pid) {
        deadline.tick(&"alive").await;
    }
}

#[track_caller]
fn assert_code<T>(r: Result<T, ClientError>, code: ErrorCode) {
    match r {
        Err(ClientError::Api(e)) => assert_eq!(e.code, code, "{e:?}"),
        Err(e) => panic!("expected the API error {code:?}, got {e:?}"),
        Ok(_) => panic!("expected the API error {code:?}, but the call succeeded"),
    }
}

fn phases(entries: &[moat_api::LifecycleEntry]) -> Vec<Phase> {
    entries.iter().map(|e| e.phase).collect()
}

#[tokio::test]
async fn a_sandbox_lives_through_create_exec_stop_start_and_remove() {
    let mut home = Home::new();
    let client = home.serve(&[]).await;

    let sb = client.create(&spec("box")).await.expect("create");
    assert_eq!((sb.name.as_str(), sb.phase, sb.accel.as_str(), sb.memory_mib), ("box", Phase::Running, "tcg", 256));
    let pid = sb.pid.expect("a running sandbox has a QEMU pid");
    assert!(qemu_alive(pid), "QEMU {pid} runs");
    assert_eq!(home.qemus(), vec![(pid, home.run_dir().join(&sb.id))], "the one QEMU is in the sandbox's run dir");
    assert_eq!(client.list().await.expect("list"), vec![sb.clone()]);

    let (out, err, code) = sh(&client, "box", "echo hello; echo oops >&2; exit 3").await;
    assert_eq!((out.as_str(), err.as_str(), code), ("hello\n", "oops\n", 3));
    let (_, err, code) = sh(&client, "box", "echo kept > /root/marker && sync").await;
    assert_eq!(code, 0, "{err}");

    let stopped = client.stop("box").await.expect("stop");
    assert_eq!((stopped.phase, stopped.pid), (Phase::Stopped, None));
    assert!(!qemu_alive(pid), "QEMU is gone once stop returns");
    assert!(home.qemus().is_empty());
    assert!(home.run_dir().join(&sb.id).is_dir(), "a stopped sandbox keeps its files");

    let started = client.start("box").await.expect("start");
    assert_eq!((started.id.as_str(), started.phase), (sb.id.as_str(), Phase::Running));
    let new_pid = started.pid.expect("running again with a QEMU pid");
    assert!(qemu_alive(new_pid));
    let (out, _, code) = sh(&client, "box", "cat /root/marker").await;
    assert_eq!((out.as_str(), code), ("kept\n", 0), "the disk survived the stop");

    let lifecycle = client.lifecycle("box").await.expect("lifecycle");
    use Phase::*;
    assert_eq!(phases(&lifecycle), [Creating, Booting, Running, Stopping, Stopped, Booting, Running]);
    assert_eq!(lifecycle.iter().map(|e| e.version).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    assert!(lifecycle.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "{lifecycle:?}");
    assert_eq!(started.version, 7);

    assert_code(client.remove("box", false).await, ErrorCode::InvalidPhase);
    assert_eq!(client.inspect("box").await.expect("still there").phase, Running);
    let removed = client.remove("box", true).await.expect("forced remove");
    assert_eq!(removed.id, sb.id);
    assert!(client.list().await.expect("list").is_empty());
    assert_code(client.inspect(&sb.id).await, ErrorCode::NotFound);
    assert!(!home.run_dir().join(&sb.id).exists(), "the run dir is gone");
    assert!(!qemu_alive(new_pid) && home.qemus().is_empty(), "no QEMU left");
}

#[tokio::test]
async fn bad_requests_fail_with_stable_codes_and_change_nothing() {
    let mut home = Home::new();
    let client = home.serve(&[]).await;
    let keep = client.create(&spec("keep")).await.expect("create");
    client.stop("keep").await.expect("stop");
    let before = client.list().await.expect("list");
    assert_eq!(before.len(), 1);

    assert_code(client.inspect("nope").await, ErrorCode::NotFound);
    assert_code(client.lifecycle("nope").await, ErrorCode::NotFound);
    assert_code(client.stop("nope").await, ErrorCode::NotFound);
    assert_code(client.start("nope").await, ErrorCode::NotFound);
    assert_code(client.renew("nope", 60).await, ErrorCode::NotFound);
    assert_code(client.remove("nope", true).await, ErrorCode::NotFound);
    assert_code(
        client.exec("nope", &ExecStart { argv: vec!["true".into()], ..Default::default() }).await,
        ErrorCode::NotFound,
    );

    assert_code(client.create(&spec("keep")).await, ErrorCode::NameTaken);
    assert_code(client.create(&CreateSandbox { ttl_secs: Some(0), ..spec("ttl0") }).await, ErrorCode::InvalidRequest);
    assert_code(client.create(&CreateSandbox { vcpus: Some(0), ..spec("cpu0") }).await, ErrorCode::InvalidRequest);
    assert_code(client.create(&CreateSandbox { memory_mib: Some(1), ..spec("mem1") }).await, ErrorCode::InvalidRequest);
    assert_code(client.create(&spec("-bad name")).await, ErrorCode::InvalidRequest);

    let echo = ExecStart { argv: vec!["echo".into(), "hi".into()], ..Default::default() };
    assert_code(client.exec("keep", &echo).await, ErrorCode::InvalidPhase);
    assert_code(client.stop("keep").await, ErrorCode::InvalidPhase);
    assert_code(client.renew("keep", 60).await, ErrorCode::InvalidPhase);

    let api_error = |status: u16, body: &str, want_status: u16, want: ErrorCode| {
        assert_eq!(status, want_status, "{body}");
        let e: moat_api::ApiError =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("an API error body: {e}: {body}"));
        assert_eq!(e.code, want, "{body}");
        assert!(!e.hint.is_empty(), "every error says what to do: {body}");
        e
    };
    let (status, body) = client.raw("POST", "/v1/sandboxes", b"this is not json".to_vec()).await.expect("answered");
    api_error(status, &body, 400, ErrorCode::InvalidRequest);
    // Valid JSON, only too long: the size is what is refused.
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(moat_api::MAX_BODY + 1000));
    let (status, body) = client.raw("POST", "/v1/sandboxes", big.into_bytes()).await.expect("answered");
    api_error(status, &body, 413, ErrorCode::BodyTooLarge);
    let unknown = br#"{"name":"colourful","memory_mib":256,"colour":"red"}"#.to_vec();
    let (status, body) = client.raw("POST", "/v1/sandboxes", unknown).await.expect("answered");
    let e = api_error(status, &body, 400, ErrorCode::InvalidRequest);
    assert!(e.message.contains("colour"), "the error names the unknown field: {}", e.message);
    let (status, body) =
        client.raw("POST", "/v1/sandboxes/keep/lease", br#"{"ttl_secs":"soon"}"#.to_vec()).await.expect("answered");
    api_error(status, &body, 400, ErrorCode::InvalidRequest);

    assert_eq!(client.list().await.expect("list"), before, "nothing changed");
    assert_eq!(home.run_entries(), vec![keep.id.clone()], "no files of refused sandboxes");
    assert!(home.qemus().is_empty(), "no VM was started");
}

#[tokio::test]
async fn eight_sandboxes_created_and_removed_in_parallel() {
    let mut home = Home::new();
    let client = home.serve(&[]).await;
    let names: Vec<String> = (0..8).map(|i| format!("par-{i}")).collect();

    let created = futures::future::join_all(names.iter().map(|n| {
        let req = spec(n);
        let client = client.clone();
        async move { client.create(&req).await }
    }))
    .await;
    let created: Vec<SandboxInfo> =
        created.into_iter().enumerate().map(|(i, r)| r.unwrap_or_else(|e| panic!("par-{i} created: {e}"))).collect();
    for sb in &created {
        assert_eq!(sb.phase, Phase::Running, "{sb:?}");
    }
    let mut pids: Vec<u32> = created.iter().map(|s| s.pid.expect("running with a pid")).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 8, "eight distinct QEMUs");
    assert_eq!(home.qemus().len(), 8);

    let outputs =
        futures::future::join_all(created.iter().map(|s| sh(&client, &s.name, "hostname; echo $((6 * 7))"))).await;
    for (sb, (out, err, code)) in created.iter().zip(outputs) {
        assert_eq!((out, code), (format!("{}\n42\n", sb.hostname), 0), "exec in {}: {err}", sb.name);
    }

    let removed = futures::future::join_all(names.iter().map(|n| client.remove(n, true))).await;
    for (n, r) in names.iter().zip(removed) {
        r.unwrap_or_else(|e| panic!("{n} removed: {e}"));
    }
    assert!(client.list().await.expect("list").is_empty());
    assert!(home.qemus().is_empty(), "no QEMU under the home");
    assert!(pids.iter().all(|p| !qemu_alive(*p)));
    assert_eq!(home.run_entries(), Vec::<String>::new(), "the run dir is empty");
}

#[tokio::test]
async fn leases_run_out_and_can_be_renewed() {
    let mut home = Home::new();
    let client = home.serve(&[]).await;
    let short_rm = CreateSandbox { ttl_secs: Some(3), on_expire: Some(OnExpire::Remove), ..spec("short-rm") };
    let short_stop = CreateSandbox { ttl_secs: Some(3), on_expire: Some(OnExpire::Stop), ..spec("short-stop") };
    let long = CreateSandbox { ttl_secs: Some(600), ..spec("long") };
    let (short_rm, short_stop, long) =
        futures::join!(client.create(&short_rm), client.create(&short_stop), client.create(&long));
    let (short_rm, short_stop, long) =
        (short_rm.expect("short-rm created"), short_stop.expect("short-stop created"), long.expect("long created"));

    let deadline = Deadline::new("short-rm to remove itself", Duration::from_secs(60));
    loop {
        match client.inspect("short-rm").await {
            Err(e) if e.code() == Some(ErrorCode::NotFound) => break,
            r => deadline.tick(&r).await,
        }
    }
    wait_qemu_gone(short_rm.pid.expect("had a QEMU")).await;
    assert!(!home.run_dir().join(&short_rm.id).exists(), "its files are gone");

    let expired = wait_phase(&client, "short-stop", Phase::Expired, Duration::from_secs(60)).await;
    assert_eq!(expired.pid, None);
    assert!(!qemu_alive(short_stop.pid.expect("had a QEMU")), "an expired sandbox has no VM");
    assert!(home.run_dir().join(&short_stop.id).is_dir(), "an expired sandbox keeps its disk");
    let lifecycle = client.lifecycle("short-stop").await.expect("lifecycle");
    assert_eq!(phases(&lifecycle).last(), Some(&Phase::Expired), "{lifecycle:?}");
    assert_code(client.renew("short-stop", 60).await, ErrorCode::LeaseExpired);
    assert_eq!(
        client.inspect("short-stop").await.expect("inspect").phase,
        Phase::Expired,
        "the refused renew changed nothing"
    );

    let still = client.inspect("long").await.expect("inspect");
    assert_eq!(still.phase, Phase::Running, "a lease that has not run out keeps the sandbox");
    let before = long.expires_at.expect("created with a lease");
    let renewed = client.renew("long", 3600).await.expect("renew");
    let after = renewed.expires_at.expect("still a lease");
    assert!(after >= before + 3000, "the lease moved forward: {before} -> {after}");
    assert_eq!(client.inspect("long").await.expect("inspect").expires_at, Some(after));
    assert_eq!(home.qemus().len(), 1, "only the renewed sandbox runs");
}

#[tokio::test]
async fn a_sandbox_survives_a_daemon_killed_mid_run() {
    let mut home = Home::new();
    let client = home.serve(&[]).await;
    let sb = client.create(&spec("survivor")).await.expect("create");
    let pid = sb.pid.expect("running with a pid");
    let (out, _, _) = sh(&client, "survivor", "echo before; echo state > /root/f").await;
    assert_eq!(out, "before\n");

    home.kill_daemon();
    assert!(qemu_alive(pid), "QEMU outlives a crashed daemon");
    assert!(matches!(client.health().await, Err(ClientError::Connect { .. })), "no daemon answers");

    let client = home.serve(&[]).await;
    let adopted = client.inspect("survivor").await.expect("inspect");
    assert_eq!((adopted.phase, adopted.pid), (Phase::Running, Some(pid)), "adopted, same QEMU");
    let (out, err, code) = sh(&client, "survivor", "echo after; cat /root/f").await;
    assert_eq!((out.as_str(), code), ("after\nstate\n", 0), "{err}");
    let events: Vec<moat_api::Event> = {
        use futures::StreamExt;
        client.events(0, false).await.expect("events").map(|e| e.expect("event")).collect().await
    };
    assert!(
        events.iter().any(|e| e.kind == "adopted" && e.sandbox.as_deref() == Some(&sb.id)),
        "the adoption is recorded: {events:?}"
    );

    client.remove("survivor", true).await.expect("remove");
    assert!(!qemu_alive(pid), "the adopted QEMU is gone once remove returns");
    assert!(home.qemus().is_empty());
    assert_eq!(home.run_entries(), Vec::<String>::new());
}

#[tokio::test]
async fn a_killed_qemu_marks_the_sandbox_failed() {
    let mut home = Home::new();
    let client = home.serve(&[]).await;
    let sb = client.create(&spec("victim")).await.expect("create");
    let pid = sb.pid.expect("running with a pid");

    signal(pid, libc::SIGKILL);
    let failed = wait_phase(&client, "victim", Phase::Failed, Duration::from_secs(20)).await;
    let err = failed.last_error.expect("a failed sandbox says why");
    assert!(err.contains("QEMU exited"), "{err}");
    assert!(err.contains("SIGKILL") || err.contains("signal: 9") || err.contains("signal 9"), "{err}");
    assert_eq!(failed.pid, None);
    let lifecycle = client.lifecycle("victim").await.expect("lifecycle");
    let last = lifecycle.last().expect("entries");
    assert_eq!(last.phase, Phase::Failed);
    assert!(last.error.as_deref().is_some_and(|e| e.contains("QEMU exited")), "{last:?}");
    let echo = ExecStart { argv: vec!["true".into()], ..Default::default() };
    assert_code(client.exec("victim", &echo).await, ErrorCode::InvalidPhase);

    client.remove("victim", false).await.expect("a failed sandbox is removed without --force");
    assert_eq!(home.run_entries(), Vec::<String>::new());
}

#[tokio::test]
async fn gc_reclaims_what_a_crash_leaked_and_a_reset_kills_orphans() {
    let mut home = Home::new();
    let client = home.serve(&[]).await;
    let sb = client.create(&spec("adoptee")).await.expect("create");
    let pid = sb.pid.expect("running with a pid");
    let run_dir = home.run_dir();
    let stray = |name: &str| {
        let dir = run_dir.join(name);
        std::fs::create_dir_all(&dir).expect("stray dir");
        std::fs::write(dir.join("disk.qcow2"), b"leaked").expect("stray file");
        dir
    };

    home.kill_daemon();
    let before_restart = stray("deadbeef0000");
    let client = home.serve(&[]).await;
    assert!(!before_restart.exists(), "the startup reconcile removed the stray dir");
    assert_eq!(client.inspect("adoptee").await.expect("inspect").pid, Some(pid), "adopted");

    let after_restart = stray("deadbeef0001");
    let reclaimed = client.gc().await.expect("gc");
    assert_eq!(reclaimed.paths, vec![after_restart.display().to_string()], "{reclaimed:?}");
    assert!(reclaimed.processes.is_empty() && reclaimed.sandboxes.is_empty(), "{reclaimed:?}");
    assert!(!after_restart.exists());
    let untouched = client.inspect("adoptee").await.expect("inspect");
    assert_eq!((untouched.phase, untouched.pid), (Phase::Running, Some(pid)));
    assert!(qemu_alive(pid));
    let (out, _, _) = sh(&client, "adoptee", "echo alive").await;
    assert_eq!(out, "alive\n");
    assert_eq!(client.gc().await.expect("gc"), Default::default(), "a second gc finds nothing");

    // The state is thrown away: the old sandbox's VM is now an orphan and the reconcile ends it.
    home.kill_daemon();
    assert!(qemu_alive(pid));
    let client = home.serve(&["--reset-state"]).await;
    assert!(client.list().await.expect("list").is_empty(), "a reset starts with no sandboxes");
    wait_qemu_gone(pid).await;
    assert!(home.qemus().is_empty());
    assert_eq!(home.run_entries(), Vec::<String>::new(), "the orphan's files are gone");
    let kept = std::fs::read_dir(home.path())
        .expect("home readable")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("state.db.broken-"));
    assert!(kept, "the old database was moved aside, not deleted");
}

/// `moat doctor`'s "state db" line, which must be a FAIL naming the recovery.
fn doctor_state_line(home: &Path) -> String {
    let out = moat_in(home).arg("doctor").stdin(Stdio::null()).output().expect("moat doctor runs");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let i = lines.iter().position(|l| l.contains("state db")).unwrap_or_else(|| panic!("no state db check: {stdout}"));
    assert!(lines[i].starts_with("FAIL"), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "doctor fails: {stdout}");
    format!("{}\n{}", lines[i], lines.get(i + 1).copied().unwrap_or_default())
}

#[tokio::test]
async fn a_deleted_or_damaged_state_db_is_refused_not_replaced() {
    let mut home = Home::new();
    home.serve(&[]).await;
    home.stop_daemon().await;
    let db = home.path().join("state.db");
    let db_files = |db: &Path| ["", "-wal", "-shm"].map(|s| PathBuf::from(format!("{}{s}", db.display())));
    assert!(db.exists(), "the daemon created its database");

    for f in db_files(&db) {
        let _ = std::fs::remove_file(f);
    }
    let start = Instant::now();
    let (status, out) = home.serve_refused(&[]).await;
    assert!(!status.success(), "refused: {out}");
    assert!(start.elapsed() < Duration::from_secs(15), "refused quickly ({:?})", start.elapsed());
    assert!(out.contains(&db.display().to_string()) && out.contains("--reset-state"), "{out}");
    assert!(!db.exists(), "no empty database took the lost one's place");
    assert!(!moat_daemon::socket_path(home.path()).exists(), "nothing listens");
    let doctor = doctor_state_line(home.path());
    assert!(doctor.contains("missing") && doctor.contains("--reset-state"), "{doctor}");

    // Recovery works, and starts a new database.
    home.serve(&["--reset-state"]).await;
    home.stop_daemon().await;

    let garbage = b"this is not an sqlite database, it is garbage. ".repeat(200);
    std::fs::write(&db, &garbage).expect("overwrite the db");
    for f in &db_files(&db)[1..] {
        let _ = std::fs::remove_file(f);
    }
    let start = Instant::now();
    let (status, out) = home.serve_refused(&[]).await;
    assert!(!status.success(), "refused: {out}");
    assert!(start.elapsed() < Duration::from_secs(15), "refused quickly ({:?})", start.elapsed());
    assert!(
        out.contains(&db.display().to_string()) && out.contains("damaged") && out.contains("--reset-state"),
        "{out}"
    );
    assert_eq!(std::fs::read(&db).expect("the db is still there"), garbage, "the damaged file is left for recovery");
    let doctor = doctor_state_line(home.path());
    assert!(doctor.contains("damaged") && doctor.contains("--reset-state"), "{doctor}");
}

/// The `moat` binary against a running daemon: the lifecycle a user drives from the shell.
#[tokio::test]
async fn the_cli_drives_a_detached_sandbox() {
    let mut home = Home::new();
    home.serve(&[]).await;
    let moat = |args: &[&str]| {
        let out = moat_in(home.path()).args(args).stdin(Stdio::null()).output().expect("moat runs");
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let ps = || -> Vec<SandboxInfo> {
        let (code, out, err) = moat(&["ps", "-a", "--json"]);
        assert_eq!(code, Some(0), "{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ps -a --json prints sandboxes: {e}: {out}"))
    };

    let (code, out, err) = moat(&["run", "-d", "--name", "box", "--ttl", "30m", "--memory", "256"]);
    assert_eq!((code, out.as_str()), (Some(0), "box\n"), "{err}");
    let list = ps();
    assert_eq!(list.len(), 1, "{list:?}");
    let sb = &list[0];
    assert_eq!((sb.name.as_str(), sb.phase, sb.memory_mib), ("box", Phase::Running, 256));
    let lease = sb.expires_at.expect("a lease") - sb.created_at;
    assert!((1795..=1805).contains(&lease), "a 30 min lease, got {lease} s");
    assert_eq!(home.daemon_pid(), home.daemons[0].id(), "the CLI used the running daemon");

    let (code, out, err) = moat(&["exec", "box", "--", "sh", "-c", "echo hi; echo err >&2; exit 4"]);
    assert_eq!((code, out.as_str(), err.as_str()), (Some(4), "hi\n", "err\n"));

    // The table lines up: each value starts under its header.
    let (_, table, _) = moat(&["ps"]);
    let mut lines = table.lines();
    let (header, row) = (lines.next().expect("a header"), lines.next().expect("a row"));
    for (col, value) in [("PHASE", "running"), ("IMAGE", "minimal"), ("ACCEL", sb.accel.as_str())] {
        assert_eq!(header.find(col), row.find(value), "{col} column aligned:\n{table}");
    }
    // Software emulation says what it means for isolation.
    let (_, shown, _) = moat(&["inspect", "box"]);
    let accel = shown.lines().find(|l| l.starts_with("accel:")).unwrap_or_default();
    match sb.accel.as_str() {
        "tcg" => {
            assert!(
                accel.ends_with("tcg (software emulation: QEMU is the only boundary, not a hardware one)"),
                "{accel}"
            )
        }
        other => assert!(accel.ends_with(other), "{accel}"),
    }

    let (code, _, err) = moat(&["stop", "box"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(ps()[0].phase, Phase::Stopped);
    assert!(home.qemus().is_empty());
    let (code, _, err) = moat(&["start", "box"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(ps()[0].phase, Phase::Running);

    let (code, _, err) = moat(&["rm", "box"]);
    assert_ne!(code, Some(0), "a running sandbox is not removed without -f");
    assert!(err.contains("rm -f"), "the error says what to do: {err}");
    let (code, _, err) = moat(&["rm", "-f", "box"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(ps().is_empty());
    assert!(home.qemus().is_empty());
    assert_eq!(home.run_entries(), Vec::<String>::new());
}

/// A daemon whose memory budget is a sliver of the host refuses `moat run` before anything boots,
/// and the error gives the numbers and the flag that changes the ratio.
#[tokio::test]
async fn a_run_past_the_memory_budget_is_refused_with_the_numbers_and_boots_nothing() {
    let mut home = Home::new();
    let client = home.serve(&["--memory-overcommit", "0.0001"]).await;
    let out = moat_in(home.path()).args(["run", "--", "true"]).stdin(Stdio::null()).output().expect("moat runs");
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("not enough memory: this sandbox asks for 512 MiB + 160 MiB QEMU overhead; 0 MiB of the"),
        "{err}"
    );
    assert!(
        err.contains("RAM × 0.0001) is committed to 0 live sandboxes;") && err.contains("free on the host"),
        "{err}"
    );
    assert!(err.contains("`moat serve --memory-overcommit R` (config `memory_overcommit`)"), "{err}");
    assert!(client.list().await.expect("the daemon lists").is_empty(), "nothing was recorded");
    assert!(home.qemus().is_empty(), "no VM was booted");
    assert_eq!(home.run_entries(), Vec::<String>::new());
}

/// `moat serve --require-kvm` runs sandboxes under KVM or not at all: where KVM is unusable (as
/// on hosts without nested virtualisation) it refuses to start, saying why.
#[tokio::test]
async fn serve_with_require_kvm_starts_only_where_kvm_works() {
    let mut home = Home::new();
    // Contradicting settings and ratios out of range stop it before anything is touched.
    let (status, log) = home.serve_refused(&["--require-kvm", "--accel", "tcg"]).await;
    assert!(!status.success() && log.contains("--require-kvm and --accel tcg contradict each other"), "{log}");
    for bad in ["0", "-1", "NaN", "inf", "101"] {
        let (status, log) = home.serve_refused(&[&format!("--disk-overcommit={bad}")]).await;
        assert!(!status.success() && log.contains("a number above 0 and at most 100"), "{bad}: {log}");
    }

    let pid = home.spawn_daemon(&["--require-kvm"], "daemon.log");
    let client = home.client();
    let deadline = Deadline::new("the daemon to answer or refuse", DAEMON_START);
    loop {
        if let Some(status) = home.daemon(pid).try_wait().expect("child state readable") {
            let log = home.log("daemon.log");
            assert!(!status.success(), "{log}");
            assert!(
                log.contains(
                    "KVM is required (--require-kvm), and sandboxes on this host would run under TCG: kvm unusable: "
                ),
                "the refusal says why KVM is unusable: {log}"
            );
            assert!(log.contains("drop --require-kvm (config `require_kvm`)"), "{log}");
            assert!(home.qemus().is_empty());
            return;
        }
        match client.health().await {
            Ok(h) => {
                assert_eq!(h.accel, "kvm", "a daemon that requires KVM runs only with it: {}", h.accel_reason);
                return;
            }
            Err(e) => deadline.tick(&e).await,
        }
    }
}
