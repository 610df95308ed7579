//! The MCP server driven by a real MCP client nobody here wrote: the official `mcp` package from
//! PyPI, in a venv under the target directory. `tests/e2e/mcp/client.py` plays the agent; these tests
//! set up the daemon, run it, and check what it leaves behind.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::{moat_in, moat_ok, text, wait_for, OwnHome};

/// The MCP SDK the tests speak with (2.x speaks the 2026-07-28 protocol and falls back).
const MCP_PACKAGE: &str = "mcp>=2.3,<3";

/// A Python with the MCP SDK: a venv made once per target directory.
fn python() -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mcp-venv");
    let python = venv.join("bin/python");
    let has_sdk = |python: &Path| {
        Command::new(python).args(["-c", "import mcp, httpx2"]).output().is_ok_and(|o| o.status.success())
    };
    if has_sdk(&python) {
        return python;
    }
    let install = "install it with: sudo apt-get install -y python3-venv python3-pip";
    let out = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output()
        .unwrap_or_else(|e| panic!("the MCP tests need python3 ({e}); {install}"));
    assert!(out.status.success(), "python3 -m venv failed: {}\n{install}", text(&out.stderr));
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", MCP_PACKAGE])
        .output()
        .expect("the venv's python runs");
    assert!(
        out.status.success(),
        "pip install {MCP_PACKAGE} failed: {}{}\nthe MCP tests need PyPI; {install}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(has_sdk(&python), "the MCP SDK does not import after pip install {MCP_PACKAGE}");
    python
}

/// One test at a time: each boots, snapshots and forks VMs, and two at once on a small host
/// (TCG) only slow each other down.
static ONE_TEST: Mutex<()> = Mutex::new(());

/// Run the client script in `mode` with the environment of `moat` in `home`; it must pass.
fn run_client(home: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/mcp/client.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).args(args).stdin(Stdio::null());
    // The same environment the tests give `moat` (home, minimal image, idle exit).
    for (k, v) in moat_in(home).get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().expect("the client script runs");
    let log = format!("--- stdout ---\n{}--- stderr ---\n{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{log}");
    if !out.status.success() {
        let daemon = ["daemon.log", "serve.log"].map(|f| read(&home.join(f))).concat();
        let tail: Vec<&str> = daemon.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!("the MCP client failed:\n{log}--- the daemon's log, last lines ---\n{}", tail.join("\n"));
    }
    assert!(text(&out.stdout).trim_end().ends_with("ok"), "{log}");
}

fn sandbox_names(home: &Path) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(&moat_ok(home, &["ps", "-a", "--json"])).expect("ps prints JSON");
    list.as_array().expect("a list").iter().map(|s| s["name"].as_str().unwrap_or_default().to_string()).collect()
}

#[test]
fn an_agent_uses_sandboxes_through_moat_mcp() {
    let _alone = ONE_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let home = OwnHome::new();
    let h = home.path();
    // A sandbox of the CLI's: hidden from MCP sessions unless they may see everything.
    moat_ok(h, &["run", "-d", "--name", "cli-box", "--memory", "256"]);
    let host_dir = tempfile::tempdir().expect("a temp dir");
    let moat = env!("CARGO_BIN_EXE_moat");
    run_client(h, &["stdio", moat, &host_dir.path().display().to_string()]);
    // Each session's sandboxes went with it; the CLI's stays.
    assert_eq!(sandbox_names(h), ["cli-box"]);
    moat_ok(h, &["rm", "-f", "cli-box"]);
}

#[test]
fn an_agent_uses_sandboxes_through_the_daemons_http_endpoint() {
    let _alone = ONE_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let home = OwnHome::new();
    let h = home.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let log = std::fs::File::create(h.join("serve.log")).expect("a log file");
    let mut daemon = moat_in(h)
        .args(["serve", "--tcp", &format!("127.0.0.1:{port}")])
        .env("MOAT_MCP_IMAGE", "minimal")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("the log file"))
        .stderr(log)
        .spawn()
        .expect("moat serve starts");
    wait_for("the daemon to listen on TCP", Duration::from_secs(180), || {
        assert!(daemon.try_wait().ok().flatten().is_none(), "moat serve exited: {}", read(&h.join("serve.log")));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && h.join("token").exists()
    });
    let url = format!("http://127.0.0.1:{port}/mcp");
    run_client(h, &["http", &url, &h.join("token").display().to_string()]);
    // The sessions ended when the client closed them (DELETE): their sandboxes are removed.
    wait_for("the ended sessions' sandboxes to be removed", Duration::from_secs(60), || sandbox_names(h).is_empty());
    // SAFETY: SIGTERM to the daemon this test started.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
