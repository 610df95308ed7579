//! The REST API against its own OpenAPI document, tried as a new client would: schemathesis (from
//! PyPI, in a venv under the target directory) reads `/openapi.json` from a daemon serving TCP
//! with its bearer token, sends what the document says is valid and what it says is not, and
//! checks every answer (status, content type, body, headers) against the document.
//!
//! Bounded: image build, pull and import are left out (they reach registries and Debian
//! mirrors), the daemon may run one sandbox at a time, and each operation gets a fixed number of
//! examples.

use crate::common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{moat_in, text, wait_for, OwnHome};

/// The schemathesis the test runs: 4.x reads OpenAPI 3.1 and has the checks used here.
const SCHEMATHESIS: &str = "schemathesis>=4.32,<5";

/// Operations that reach the network outside this host, and volume creation, which makes a real
/// file system of any size asked (up to 16 TiB sparse; `volumes.rs` tests its bad input).
const EXCLUDED: &[&str] = &[
    "/v1/images/build",
    "/v1/images/pull",
    "/v1/images/import",
    "/v1/volumes",
    "/v1/snapshots/pull",
    "/v1/snapshots/{reference}/push",
    "/v1/snapshots/{reference}/fork",
];

/// The whole run, schemathesis included, must end within this.
const RUN_LIMIT: Duration = Duration::from_secs(170);

/// A schemathesis in a venv made once per target directory.
fn schemathesis() -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-venv");
    let st = venv.join("bin/st");
    let installed = |st: &Path| Command::new(st).arg("--version").output().is_ok_and(|o| o.status.success());
    if installed(&st) {
        return st;
    }
    let install = "install it with: sudo apt-get install -y python3-venv python3-pip";
    let out = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output()
        .unwrap_or_else(|e| panic!("the API conformance test needs python3 ({e}); {install}"));
    assert!(out.status.success(), "python3 -m venv failed: {}\n{install}", text(&out.stderr));
    let out = Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", SCHEMATHESIS])
        .output()
        .expect("the venv's python runs");
    assert!(
        out.status.success(),
        "pip install {SCHEMATHESIS} failed: {}{}\nthe API conformance test needs PyPI; {install}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(installed(&st), "schemathesis does not run after pip install {SCHEMATHESIS}");
    st
}

/// `moat serve` on TCP, stopped (SIGTERM) when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the daemon this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// How schemathesis runs here; what the document cannot say is explained where it is set.
const SCHEMATHESIS_CONFIG: &str = r#"
# Written by crates/moat/tests/e2e/api_conformance.rs.
[generation]
database = "none"

# The body limit (64 KiB, documented as 413) refuses an oversized body before its fields are
# read, whatever else is wrong with it: a rejection like 400.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# A followed stream never ends by design (the document says so); schemathesis reads only
# text/event-stream answers as they come, so here it asks for the stream up to now.
[[operations]]
include-path = "/v1/events"
parameters = { "query.follow" = "false" }

[[operations]]
include-path = "/v1/sandboxes/{reference}/logs"
parameters = { "query.follow" = "false" }

# MCP's transport: the client accepts both answer types (OpenAPI ignores an `Accept` parameter),
# and every message but `initialize` needs the session that initialize's answer names, a state
# the document cannot carry into generated requests: 400 is what a valid message without one
# gets (404 with an unknown one), and 405 what a session-less protocol version (2026-07-28)
# answers a GET or DELETE. The MCP library (rmcp) reads a JSON-RPC id or error code only when it
# is spelled as an integer (`2`, not `2.0`, which JSON Schema's `integer` admits): 415.
[[operations]]
include-path = "/mcp"
headers = { "Accept" = "application/json, text/event-stream" }
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "405", "415"]
"#;

/// Tar archives are bytes like any other: schemathesis sends them as it sends octet-stream.
/// A create makes a missing image by default (a Debian build or a registry pull), which reaches
/// the network like the image routes left out: every create here says `pull: never`, so an image
/// not in the store is `not_found`. Mounts are left out (random host directories would be
/// served to the guests it makes).
const SCHEMATHESIS_HOOKS: &str = r#"
import schemathesis
from schemathesis.core import NOT_SET

schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.method.upper() != "POST" or case.operation.path != "/v1/sandboxes":
        return
    if isinstance(case.body, dict):
        case.body["pull"] = "never"
        # Mounts name volumes and host directories; mounts.rs and volumes.rs test them.
        case.body.pop("mounts", None)
        # A `from` with a `/` is a registry reference, pulled like an image; remote.rs tests them.
        if "/" in str(case.body.get("from", "")):
            case.body.pop("from")
    elif case.body is NOT_SET or case.body is None:
        case.body = {"pull": "never"}
        case.media_type = "application/json"
"#;

#[test]
fn the_api_answers_as_its_openapi_document_says() {
    let st = schemathesis();
    let home = OwnHome::new();
    let h = home.path();
    let work = tempfile::tempdir().expect("a temp dir");
    let log_path = work.path().join("serve.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let log = std::fs::File::create(&log_path).expect("a log file");
    // One sandbox at a time, and one per MCP session: whatever schemathesis creates stays small.
    let mut daemon = Daemon(
        moat_in(h)
            .args(["serve", "--tcp", &format!("127.0.0.1:{port}"), "--max-sandboxes", "1"])
            .args(["--mcp-max-sandboxes", "1", "--no-templates"])
            .env("MOAT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .spawn()
            .expect("moat serve starts"),
    );
    wait_for("the daemon to listen on TCP", Duration::from_secs(180), || {
        let exited = daemon.0.try_wait().ok().flatten();
        assert!(exited.is_none(), "moat serve exited: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && h.join("token").exists()
    });
    let token = std::fs::read_to_string(h.join("token")).expect("the token").trim().to_string();
    let config = work.path().join("schemathesis.toml");
    std::fs::write(&config, SCHEMATHESIS_CONFIG).expect("the config is written");
    let hooks = work.path().join("hooks.py");
    std::fs::write(&hooks, SCHEMATHESIS_HOOKS).expect("the hooks are written");

    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(&st);
    cmd.env("SCHEMATHESIS_HOOKS", &hooks);
    cmd.arg("--config-file").arg(&config).arg("--no-color");
    cmd.args(["run", &format!("{base}/openapi.json"), "--url", &base]);
    cmd.args(["--header", &format!("Authorization: Bearer {token}")]);
    for path in EXCLUDED {
        cmd.args(["--exclude-path", path]);
    }
    cmd.args(["--checks", "all", "--max-examples", "20", "--workers", "1", "--request-timeout", "20"]);
    let started = Instant::now();
    let mut child = cmd
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("schemathesis starts");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("schemathesis's state is readable") {
            break Some(status);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = format!(
        "{}{}",
        text(&out_reader.join().expect("stdout is read")),
        text(&err_reader.join().expect("stderr is read"))
    );
    eprintln!("{output}\n(schemathesis ran {:?})", started.elapsed());
    let daemon_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some(status) = status else {
        panic!("schemathesis did not finish within {RUN_LIMIT:?}:\n{output}");
    };
    assert!(
        status.success(),
        "schemathesis found answers that do not match docs/openapi.json ({status}); fix the document \
         (crates/moat-api/src/openapi) or the daemon.\n--- the daemon's log, last lines ---\n{}",
        daemon_log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}
