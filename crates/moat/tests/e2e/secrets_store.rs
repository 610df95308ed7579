//! Where the daemon keeps the values of `--secret`: someone who reads the home (a backup, a copy
//! of `state.db`, a log shipped elsewhere) must find them in one 0600 file per sandbox and nowhere
//! else, and a daemon restarted after a crash must still have them without the caller's
//! environment.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::lab_guest::random_token;
use common::{daemon_pid, file_contains, moat_in, text, wait_for, OwnHome};

/// Longest a single `moat` call may take: the first one on a new home builds the initramfs and
/// the minimal image, and TCG boots share two cores with other tests.
const CALL_LIMIT: Duration = Duration::from_secs(240);

/// `moat args` with `env` set, to completion.
fn moat_env(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = moat_in(home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).stdin(Stdio::null()).output().expect("moat runs")
}

/// `moat args` must succeed within [`CALL_LIMIT`], waiting out an adoption; its stdout.
fn moat_ok(home: &Path, args: &[&str]) -> String {
    common::moat_ok_through_adoption(home, args, CALL_LIMIT)
}

fn sandbox_id(home: &Path, name: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&moat_ok(home, &["inspect", name, "--json"])).expect("--json prints JSON");
    info["id"].as_str().unwrap_or_else(|| panic!("{name} has an id: {info}")).to_string()
}

/// Every regular file under `dir` (links not followed) that holds `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() && file_contains(&entry.path(), needle.as_bytes()) {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

/// SIGKILL the daemon of `home` and wait until it is gone.
fn kill_daemon(home: &Path) {
    let pid = daemon_pid(home).expect("a daemon runs");
    // SAFETY: SIGKILL to the pid the daemon wrote into this test home's lock file.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("the killed daemon to be gone", Duration::from_secs(20), || daemon_pid(home).is_none());
}

/// Prints the daemon's log when the test fails: the home goes with the test.
struct LogOnFailure<'a>(&'a Path);

impl Drop for LogOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.0.join("daemon.log")).unwrap_or_default();
            eprintln!("daemon.log of the failed test:\n{log}");
        }
    }
}

#[test]
fn a_reader_of_the_home_finds_secret_values_only_in_their_0600_file_even_across_a_daemon_crash() {
    let home = OwnHome::new();
    let h = home.path();
    let _log = LogOnFailure(h);
    let token = random_token("sk-store-");
    // The daemon is started without the value in its environment, so that later it can only
    // have it from where moat keeps it.
    moat_ok(h, &["ps"]);
    let out = moat_env(
        h,
        &[("STORE_TOKEN", &token)],
        &["run", "-d", "--name", "sec", "--memory", "256", "--secret", "STORE_TOKEN@api.test"],
    );
    assert!(out.status.success(), "moat run --secret: {}", text(&out.stderr));
    let id = sandbox_id(h, "sec");
    let file = h.join("run").join(&id).join("secrets.json");

    // The value is in its file, owner-only, and in no other file: not state.db or its WAL, not
    // the daemon's log, not the sandbox's disk or RAM.
    assert_eq!(files_holding(h, &token), std::slice::from_ref(&file), "files holding the secret's value");
    let mode = std::fs::metadata(&file).expect("the secrets file exists").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "{}", file.display());
    assert!(!moat_ok(h, &["inspect", "sec", "--json"]).contains(&token), "inspect shows no value");

    // A daemon killed outright, and a new one started without the value in its environment:
    // it takes the sandbox over with its network, secrets included.
    kill_daemon(h);
    assert_eq!(
        moat_ok(h, &["exec", "sec", "--", "sh", "-c", "echo \"$STORE_TOKEN\""]).trim(),
        "moat_placeholder_STORE_TOKEN"
    );
    let events = moat_ok(h, &["events"]);
    assert!(events.contains("adopted") && !events.contains("network not restored"), "{events}");

    // It still has the value: a fork gets it, in a file of its own.
    moat_ok(h, &["fork", "sec"]);
    let fork = h.join("run").join(sandbox_id(h, "sec-fork-1")).join("secrets.json");
    let mut both = vec![file.clone(), fork.clone()];
    both.sort();
    assert_eq!(files_holding(h, &token), both, "files holding the secret's value after the fork");

    // A stop and a start keep them: the network with its secrets comes up again from the file.
    moat_ok(h, &["stop", "sec"]);
    moat_ok(h, &["start", "sec"]);
    assert!(!moat_ok(h, &["events"]).contains("network not restored"));

    // Without its file a sandbox does not start, and says how to get it back.
    moat_ok(h, &["stop", "sec"]);
    std::fs::remove_file(&file).expect("the secrets file can be removed");
    let out = moat_env(h, &[], &["start", "sec"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a sandbox without its secrets file started");
    assert!(err.contains("STORE_TOKEN") && err.contains("moat rm"), "the error names the remedy: {err}");

    // `moat rm` takes the file with the sandbox: nothing under the home holds the value any more.
    moat_ok(h, &["rm", "-f", "sec", "sec-fork-1"]);
    assert!(!fork.exists(), "the fork's secrets file went with it");
    assert_eq!(files_holding(h, &token), Vec::<PathBuf>::new(), "files holding the secret's value after rm");
}
