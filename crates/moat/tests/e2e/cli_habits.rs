//! The CLI habits of Docker users, through the real daemon and real VMs: `ps` that hides ended
//! sandboxes unless `-a`, `-q`, `--filter`, `--format`; `logs --tail/--since`; and `events`
//! filtered by sandbox, kind and time.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::{moat_in, moat_ok, text, OwnHome};

/// `moat args` that must fail; its stderr.
fn moat_err(h: &std::path::Path, args: &[&str]) -> String {
    let out = moat_in(h).args(args).stdin(Stdio::null()).output().expect("moat runs");
    assert!(!out.status.success(), "moat {args:?} should fail: {}", text(&out.stdout));
    text(&out.stderr)
}

/// Now, to the second, as RFC 3339.
fn rfc3339_now() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().expect("date runs");
    text(&out.stdout).trim().to_string()
}

#[test]
fn ps_filters_and_formats_like_docker_and_logs_and_events_narrow_down() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["run", "-d", "--name", "web", "--memory", "256", "--label", "team=web"]);
    moat_ok(h, &["run", "-d", "--name", "old", "--memory", "256"]);
    let old_id = moat_ok(h, &["ps", "-q", "--filter", "name=old"]).trim().to_string();
    assert_eq!(old_id.len(), 12, "ps -q prints ids: {old_id:?}");
    moat_ok(h, &["stop", "old"]);

    // Ended sandboxes are hidden, and it says so; -a and a phase filter show them.
    let out = moat_in(h).args(["ps"]).stdin(Stdio::null()).output().unwrap();
    let (table, err) = (text(&out.stdout), text(&out.stderr));
    assert!(table.contains("web") && !table.contains("old"), "{table}");
    assert!(err.contains("1 ended sandboxes not shown (`moat ps -a` shows them)"), "{err}");
    assert!(moat_ok(h, &["ps", "-a"]).contains("old"));
    assert_eq!(moat_ok(h, &["ps", "-q", "-f", "phase=stopped"]).trim(), old_id);
    assert_eq!(moat_ok(h, &["ps", "-q", "-f", "phase=stopped", "-f", "phase=running"]).lines().count(), 2);
    assert_eq!(moat_ok(h, &["ps", "-q", "-f", "label=team=web", "-f", "phase=stopped"]), "");
    assert_eq!(moat_ok(h, &["ps", "--format", "{{.Name}}\\t{{.Phase}} {{.Labels.team}}"]), "web\trunning web\n");
    let fields = moat_ok(h, &["ps", "-a", "--format", "name,phase,cpus"]);
    let rows: Vec<Vec<&str>> = fields.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["NAME", "PHASE", "CPUS"], "{fields}");
    assert!(rows.contains(&vec!["old", "stopped", "1"]) && rows.contains(&vec!["web", "running", "1"]), "{fields}");
    let line: serde_json::Value = serde_json::from_str(moat_ok(h, &["ps", "--format", "json"]).trim()).unwrap();
    assert_eq!(line["name"], "web");
    assert!(moat_err(h, &["ps", "-f", "phase=asleep"]).contains("phases: creating"));
    assert!(moat_err(h, &["ps", "--format", "{{.Nope}}"]).contains("is not a field of a sandbox"));
    // `moat rm $(moat ps -q -f phase=stopped)`.
    let stopped = moat_ok(h, &["ps", "-q", "-f", "phase=stopped"]);
    let ids: Vec<&str> = stopped.split_whitespace().collect();
    assert_eq!(moat_ok(h, &[&["rm"][..], &ids].concat()), "old\n");

    // The console: the last lines, and only what came after a time.
    let exec = |script: &str| moat_ok(h, &["exec", "web", "--", "sh", "-c", script]);
    exec("for i in 1 2 3 4 5; do echo early-$i > /dev/console; done");
    // The guest's terminal ends lines with CR LF.
    let tail = moat_ok(h, &["logs", "web", "--tail", "2"]).replace('\r', "");
    assert_eq!(tail, "early-4\nearly-5\n", "the console's last two lines");
    // The console's times are known to about a second.
    std::thread::sleep(Duration::from_millis(3000));
    let between = rfc3339_now();
    std::thread::sleep(Duration::from_millis(1500));
    exec("echo late > /dev/console");
    std::thread::sleep(Duration::from_millis(1500));
    let since = moat_ok(h, &["logs", "web", "--since", &between]);
    assert!(since.contains("late") && !since.contains("early"), "{since:?}");
    assert!(moat_ok(h, &["logs", "web", "--since", "1h"]).contains("early-1"));
    assert!(moat_err(h, &["logs", "web", "--source", "qemu", "--since", "1h"]).contains("use tail instead"));
    assert!(moat_err(h, &["logs", "web", "--since", "yesterday"]).contains("is not a time"));

    // Events of one sandbox (a removed one's too, by id), of a kind, in a time window.
    let events = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = moat_ok(h, &[&["events", "--json"][..], args].concat());
        out.lines().map(|l| serde_json::from_str(l).expect("an event per line")).collect()
    };
    let removed = events(&["--sandbox", &old_id]);
    assert!(removed.len() >= 3, "the removed sandbox's phases: {removed:?}");
    assert!(removed.iter().all(|e| e["sandbox"] == old_id.as_str()));
    let phases = events(&["--sandbox", "web", "--kind", "phase"]);
    assert!(!phases.is_empty() && phases.iter().all(|e| e["kind"] == "phase" && e["sandbox"] != old_id.as_str()));
    let prefixed = events(&["--kind", "pha*"]);
    assert!(prefixed.len() > phases.len() && prefixed.iter().all(|e| e["kind"].as_str().unwrap().starts_with("pha")));
    assert!(events(&["--until", "2000-01-01T00:00:00Z"]).is_empty());
    assert!(events(&["--since", &between, "--kind", "phase", "--sandbox", "web"]).is_empty(), "web ran before");
    assert!(moat_err(h, &["events", "--kind", "a b"]).contains("is not an event kind"));
}
