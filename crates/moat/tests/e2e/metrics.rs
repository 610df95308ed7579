//! `GET /metrics` and `moat df` against a real daemon and real VMs: the numbers move with what
//! sandboxes do, the text parses with Prometheus's own Python parser, and the TCP listener asks
//! for its token on /metrics as on every route. Two small VMs, reused for every check.

use crate::common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{moat_in, moat_ok, text, wait_for, OwnHome};
use serde_json::Value;

/// The parser of the Prometheus Python client, from Debian's python3-prometheus-client (which
/// scripts/test installs): the system interpreter, not whatever `python3` is first on PATH.
const PYTHON: &str = "/usr/bin/python3";

/// Turns the text format into JSON: `[[name, {label: value}, value], …]`.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// A daemon this test started (`moat serve`), stopped when the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the daemon this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Samples of one scrape, by name.
struct Scrape(Vec<(String, HashMap<String, String>, f64)>);

impl Scrape {
    /// The value of `name` with all of `labels` (summed over the other labels); 0 when absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| v)
            .sum()
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.0
            .iter()
            .any(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
    }
}

/// `GET path` on the daemon's unix socket (curl), the body.
fn over_socket(h: &Path, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "30", "--unix-socket"])
        .arg(h.join("moat.sock"))
        .arg(format!("http://moat{path}"))
        .output()
        .expect("curl runs");
    assert!(out.status.success(), "GET {path}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A scrape over the unix socket, parsed by the Python client's parser.
fn scrape(h: &Path) -> Scrape {
    let body = over_socket(h, "/metrics");
    let mut python = Command::new(PYTHON)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 runs (apt-get install python3-prometheus-client)");
    python.stdin.take().expect("piped").write_all(body.as_bytes()).expect("feeding the parser");
    let out = python.wait_with_output().expect("the parser ends");
    assert!(out.status.success(), "the Prometheus parser refused the text: {}\n{body}", text(&out.stderr));
    let samples: Vec<(String, HashMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).expect("the parser's JSON");
    Scrape(samples)
}

/// One HTTP/1.1 GET over TCP; the status line and the head.
fn tcp_get(port: u16, path: &str, token: Option<&str>) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("a read timeout");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: moat\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).expect("sending the request");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    text(&answer)
}

fn df(h: &Path) -> Value {
    serde_json::from_str(&moat_ok(h, &["df", "--json"])).expect("moat df --json prints JSON")
}

fn bytes(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or_else(|| panic!("{path:?} is a number in {v}"))
}

#[test]
fn metrics_and_disk_use_follow_what_sandboxes_do() {
    let home = OwnHome::new();
    let h = home.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    // The log goes outside the home, which must stay private.
    let logs = tempfile::tempdir().expect("a temp dir");
    let log = std::fs::File::create(logs.path().join("serve.log")).expect("a log file");
    let mut daemon = Daemon(
        moat_in(h)
            .args(["serve", "--tcp", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .spawn()
            .expect("moat serve starts"),
    );
    wait_for("the daemon to listen on its socket and on TCP", Duration::from_secs(180), || {
        assert!(daemon.0.try_wait().ok().flatten().is_none(), "moat serve exited");
        TcpStream::connect(("127.0.0.1", port)).is_ok() && h.join("token").exists()
    });
    let token = std::fs::read_to_string(h.join("token")).expect("the token").trim().to_string();

    // The TCP listener guards /metrics like every route.
    let refused = tcp_get(port, "/metrics", None);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let served = tcp_get(port, "/metrics", Some(&token));
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(served.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{served}");

    let before = scrape(h);
    assert_eq!(before.value("moat_sandboxes", &[]), 0.0);
    assert!(before.has("moat_sandbox_launches_total", &[("kind", "cold")]), "every kind is there from the start");

    // A cold boot, two commands (one refused a connection to a private address), a snapshot and
    // a revert to it, and a second sandbox restored from the snapshot.
    moat_ok(h, &["run", "-d", "--cold", "--name", "box", "--memory", "256"]);
    moat_ok(h, &["exec", "box", "--", "true"]);
    // Until the guest's link is up the connection fails in the guest; then it is refused.
    let refused_in_guest = "for i in 1 2 3 4 5 6 7 8 9 10; do \
        nc -w 3 192.168.77.1 80 </dev/null 2>&1 | grep -q 'refused' && exit 0; sleep 1; done; exit 1";
    moat_ok(h, &["exec", "box", "--", "sh", "-c", refused_in_guest]);
    moat_ok(h, &["snapshot", "box", "--name", "s1"]);
    moat_ok(h, &["revert", "box", "s1"]);
    moat_ok(h, &["run", "-d", "--from", "box:s1", "--name", "copy"]);

    let after = scrape(h);
    let grew = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    assert_eq!(grew("moat_sandbox_launches_total", &[("kind", "cold")]), 1.0);
    assert_eq!(grew("moat_sandbox_launches_total", &[("kind", "revert")]), 1.0);
    assert_eq!(grew("moat_sandbox_launches_total", &[("kind", "snapshot")]), 1.0);
    assert_eq!(grew("moat_sandbox_launch_seconds_count", &[("kind", "snapshot")]), 1.0);
    assert!(after.value("moat_sandbox_launch_seconds_sum", &[("kind", "cold")]) > 0.0);
    assert_eq!(after.value("moat_sandbox_launch_failures_total", &[]), 0.0);
    assert_eq!(grew("moat_execs_total", &[]), 2.0);
    assert_eq!(grew("moat_exec_seconds_count", &[]), 2.0);
    let refusals: Vec<_> = after.0.iter().filter(|(n, _, _)| n == "moat_net_refused_total").collect();
    assert!(after.value("moat_net_refused_total", &[("rule", "private")]) >= 1.0, "{refusals:?}");
    assert_eq!(after.value("moat_sandboxes", &[("phase", "running")]), 2.0);
    assert_eq!(after.value("moat_sandboxes", &[("phase", "stopped")]), 0.0);
    for direction in ["from_guest", "to_guest"] {
        let carried = after.value("moat_sandbox_net_bytes_total", &[("sandbox", "box"), ("direction", direction)]);
        assert!(carried > 0.0, "box's network carried nothing {direction}");
    }
    for kind in ["images", "snapshots", "sandboxes"] {
        assert!(after.value("moat_disk_bytes", &[("kind", kind)]) > 0.0, "no disk use for {kind}");
    }
    assert!(after.value("moat_host_memory_bytes", &[]) > 0.0);
    let committed = after.value("moat_memory_committed_bytes", &[]);
    assert!(committed >= 2.0 * 256.0 * 1024.0 * 1024.0, "two 256 MiB sandboxes: {committed}");
    assert!(after.value("moat_memory_budget_bytes", &[]) >= after.value("moat_host_memory_bytes", &[]));

    // `moat df`: the same numbers, and what prune would free once a sandbox stops.
    let usage = df(h);
    assert!(bytes(&usage, &["images", "bytes"]) > 0, "{usage}");
    assert_eq!(bytes(&usage, &["sandboxes", "count"]), 2, "{usage}");
    assert_eq!(bytes(&usage, &["snapshots", "count"]), 1, "{usage}");
    assert_eq!(bytes(&usage, &["reclaimable", "prune", "bytes"]), 0, "nothing at rest yet: {usage}");
    moat_ok(h, &["stop", "copy"]);
    let usage = df(h);
    assert_eq!(bytes(&usage, &["reclaimable", "prune", "count"]), 1, "{usage}");
    assert!(bytes(&usage, &["reclaimable", "prune", "bytes"]) > 0, "{usage}");
    assert!(bytes(&usage, &["reclaimable", "gc", "bytes"]) >= bytes(&usage, &["reclaimable", "image_gc", "bytes"]));
    let table = moat_ok(h, &["df"]);
    for word in ["images", "layers", "templates", "volumes", "total", "moat prune", "moat gc"] {
        assert!(table.contains(word), "{word} missing from:\n{table}");
    }
    let stopped = scrape(h);
    assert_eq!(stopped.value("moat_sandboxes", &[("phase", "stopped")]), 1.0);
    assert!(stopped.value("moat_disk_reclaimable_bytes", &[("command", "prune")]) > 0.0);

    // A removed sandbox's series goes; the totals keep what it did.
    moat_ok(h, &["rm", "copy"]);
    let removed = scrape(h);
    assert!(!removed.has("moat_sandbox_net_bytes_total", &[("sandbox", "copy")]));
    assert!(removed.has("moat_sandbox_net_bytes_total", &[("sandbox", "box")]));
    assert!(removed.value("moat_net_refused_total", &[("rule", "private")]) >= 1.0);
    moat_ok(h, &["rm", "-f", "box"]);
}
