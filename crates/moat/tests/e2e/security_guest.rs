//! A hostile guest against the daemon and the agent: nothing a guest puts in its files, or makes
//! the agent answer, may wedge, exhaust or crash the daemon, or crash the agent. Every command
//! runs under a time limit, so a wedge fails the test instead of hanging it.

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_pid, moat_in, moat_ok, stop_daemon, text, OwnHome};
use moat_api::{ErrorCode, ExecStart};
use moat_client::{Client, ClientError};

/// The guest file moat reads to build the CA bundle of a sandbox with secrets.
const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// A cold boot under TCG on a loaded host, and the CA's installation after it.
const START_LIMIT: Duration = Duration::from_secs(120);
/// Commands that boot nothing.
const QUICK_LIMIT: Duration = Duration::from_secs(30);
/// What the daemon may grow to while a guest offers it 64 GiB (it idles at a few tens of MiB).
const DAEMON_RSS_LIMIT_KIB: u64 = 256 << 10;

/// Run a command to completion, killing it (and failing the test) if it takes longer than
/// `limit`. `watch` runs while it waits, e.g. to stop a daemon that is eating the host's memory.
fn within(mut cmd: Command, limit: Duration, mut watch: impl FnMut()) -> Output {
    let what = format!("{cmd:?}");
    let what = if what.len() > 300 { format!("{}…", &what[..300]) } else { what };
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starts");
    let mut pipes = [child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), None];
    pipes[1] = child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>);
    let readers: Vec<_> = pipes
        .into_iter()
        .map(|p| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = p.expect("piped").read_to_end(&mut v);
                v
            })
        })
        .collect();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child works") {
            break status;
        }
        watch();
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = readers.into_iter().map(|r| r.join().expect("reader thread"));
    Output { status, stdout: out.next().unwrap(), stderr: out.next().unwrap() }
}

fn moat_within(home: &Path, args: &[&str], limit: Duration) -> Output {
    let mut cmd = moat_in(home);
    cmd.args(args).env("TOKEN", "sk-test-value");
    within(cmd, limit, || {})
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').trim().strip_suffix(" kB")?.parse().ok())
        .unwrap_or(0)
}

fn inspect(home: &Path, name: &str) -> serde_json::Value {
    let out = moat_within(home, &["inspect", "--json", name], QUICK_LIMIT);
    assert!(out.status.success(), "moat inspect {name}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

/// Stop and start a sandbox whose guest broke its CA bundle: the start must fail promptly, with
/// the reason, and the sandbox must be failed and removable.
fn restart_fails_with(home: &Path, name: &str, says: &str, mut watch: impl FnMut()) {
    let out = moat_within(home, &["stop", name], QUICK_LIMIT);
    assert!(out.status.success(), "moat stop {name}: {}", text(&out.stderr));
    let mut cmd = moat_in(home);
    cmd.args(["start", name]).env("TOKEN", "sk-test-value");
    let out = within(cmd, START_LIMIT, &mut watch);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "moat start {name} succeeded with a broken CA bundle");
    assert!(stderr.contains(says), "moat start {name} says {stderr:?}, not {says:?}");
    assert!(stderr.contains(&format!("moat rm -f {name}")), "no hint in {stderr:?}");
    let info = inspect(home, name);
    assert_eq!(info["phase"], "failed", "{info}");
    assert!(info["last_error"].as_str().is_some_and(|e| e.contains(says)), "{info}");
}

#[test]
fn a_guest_that_plants_a_fifo_or_a_huge_file_as_its_ca_bundle_fails_only_itself() {
    let home = OwnHome::new();
    let h = home.path();
    for name in ["fifo", "sparse"] {
        let args = ["run", "-d", "--name", name, "--memory", "256", "--secret", "TOKEN@host.test"];
        let out = moat_within(h, &args, START_LIMIT);
        assert!(out.status.success(), "moat run {name}: {}", text(&out.stderr));
    }
    let plant = |name: &str, how: &str| {
        let script = format!("mkdir -p /etc/ssl/certs && rm -f {BUNDLE} && {how} {BUNDLE} && ls -l {BUNDLE}");
        let out = moat_within(h, &["exec", name, "--", "sh", "-c", &script], QUICK_LIMIT);
        assert!(out.status.success(), "planting in {name}: {}", text(&out.stderr));
    };
    plant("fifo", "mkfifo");
    plant("sparse", "truncate -s 64G");

    // A restarted daemon adopts both before it listens: it must listen all the same.
    stop_daemon(h);
    let out = moat_within(h, &["ps"], Duration::from_secs(90));
    assert!(out.status.success(), "moat ps after a daemon restart: {}", text(&out.stderr));
    let daemon = daemon_pid(h).expect("the daemon runs");
    assert!(status_kib(daemon, "VmHWM") < DAEMON_RSS_LIMIT_KIB, "adoption grew the daemon");

    restart_fails_with(h, "fifo", "is a FIFO, not a regular file", || {});
    // The daemon would buffer 64 GiB; stop it long before it takes the host down.
    let mut peak = 0;
    restart_fails_with(h, "sparse", "is over 4096 KiB", || {
        peak = peak.max(status_kib(daemon, "VmRSS"));
        if peak > 4 * DAEMON_RSS_LIMIT_KIB {
            // SAFETY: SIGKILL to the daemon of this test's own home.
            unsafe { libc::kill(daemon, libc::SIGKILL) };
            panic!("the daemon grew to {peak} KiB reading the guest's CA bundle");
        }
    });
    let hwm = status_kib(daemon, "VmHWM");
    assert!(hwm < DAEMON_RSS_LIMIT_KIB, "the daemon peaked at {hwm} KiB");
    assert_eq!(daemon_pid(h), Some(daemon), "the daemon survived");

    let out = moat_within(h, &["rm", "-f", "fifo", "sparse"], QUICK_LIMIT);
    assert!(out.status.success(), "moat rm -f: {}", text(&out.stderr));
}

/// An exec start message just under the API's 1 MiB limit, whose request to the agent grows past
/// the agent link's limit once the image's environment is added.
fn just_under_the_api_limit() -> ExecStart {
    let piece = 96 * 1024; // Under the guest kernel's 128 KiB limit per argument.
    let mut start = ExecStart { argv: vec!["true".into()], ..Default::default() };
    let size = |s: &ExecStart| serde_json::to_string(s).unwrap().len();
    while size(&start) + piece < 1 << 20 {
        start.argv.push("x".repeat(piece));
    }
    let room = (1 << 20) - 16 - size(&start);
    start.argv.push("y".repeat(room));
    start
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_exec_request_or_listing_is_refused_and_the_sandbox_answers_on() {
    let home = OwnHome::new();
    let h = home.path().to_path_buf();
    let out = moat_within(&h, &["run", "-d", "--name", "big", "--memory", "256"], START_LIMIT);
    assert!(out.status.success(), "moat run: {}", text(&out.stderr));
    let client = Client::new(&moat_daemon::socket_path(&h));
    let alive = |h: &Path| {
        let out = moat_within(h, &["exec", "big", "--", "echo", "alive"], QUICK_LIMIT);
        assert_eq!(text(&out.stdout), "alive\n", "exec after the refusal: {}", text(&out.stderr));
    };

    // A listing over the frame limit: 20 000 names of 200 bytes.
    let script =
        "mkdir /tmp/many && cd /tmp/many && awk 'BEGIN { for (i = 0; i < 20000; i++) printf \"%0200d\\n\", i }' \
                  | xargs touch && ls | wc -l";
    let out = moat_within(&h, &["exec", "big", "--", "sh", "-c", script], Duration::from_secs(120));
    assert_eq!(text(&out.stdout).trim(), "20000", "{}", text(&out.stderr));
    let listing = tokio::time::timeout(QUICK_LIMIT, client.list_dir("big", "/tmp/many", true)).await;
    match listing.expect("the listing answers") {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{e:?}");
            assert!(e.message.contains("list a narrower path"), "{e:?}");
        }
        other => panic!("a listing too large for one answer gave {other:?}"),
    }
    alive(&h);

    // Over the API's 1 MiB, through the CLI: refused, with the reason.
    let mut cmd = moat_in(&h);
    cmd.args(["exec", "big", "--", "true"]).args((0..20).map(|_| "z".repeat(100 * 1024)));
    // SAFETY: setrlimit is async-signal-safe; a larger stack limit lets execve take 2 MiB of
    // arguments (the kernel allows a quarter of it).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let limit = libc::rlimit { rlim_cur: 64 << 20, rlim_max: libc::RLIM_INFINITY };
            libc::setrlimit(libc::RLIMIT_STACK, &limit);
            Ok(())
        })
    };
    let out = within(cmd, QUICK_LIMIT, || {});
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a 2 MiB exec request succeeded");
    assert!(stderr.contains("1 MiB") || stderr.contains("1048576"), "{stderr}");
    alive(&h);

    // Under the API's limit, over the agent link's once the image's Env is added.
    let start = just_under_the_api_limit();
    match tokio::time::timeout(QUICK_LIMIT, client.exec("big", &start)).await.expect("the exec answers") {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{e:?}");
            assert!(e.message.contains("fit one message"), "{e:?}");
        }
        Err(e) => panic!("an exec request over the link's limit gave {e}"),
        Ok(_) => panic!("an exec request over the link's limit started"),
    }
    alive(&h);
    moat_ok(&h, &["rm", "-f", "big"]);
}
