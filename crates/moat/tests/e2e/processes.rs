//! Background processes through the CLI, daemon and agent: `exec -d`, `ps BOX`, `wait`,
//! `attach` with the output printed while nobody watched, `kill` of a process that ignores
//! SIGTERM, processes that outlive a daemon restart, and exec output limits.

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{moat_in, moat_ok, stop_daemon, text, wait_for, OwnHome};

fn jobs(home: &Path) -> Vec<moat_api::JobInfo> {
    serde_json::from_str(&moat_ok(home, &["ps", "jobs", "--json"])).expect("ps BOX --json")
}

#[test]
fn background_processes_are_listed_attached_killed_and_outlive_the_daemon() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["run", "-d", "--name", "jobs", "--memory", "256"]);
    let stubborn = "echo start; trap '' TERM; i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done";
    let pid = moat_ok(h, &["exec", "-d", "jobs", "--", "sh", "-c", stubborn]).trim().parse::<u32>().expect("a pid");
    let quick = moat_ok(h, &["exec", "-d", "jobs", "--", "sh", "-c", "echo quick; exit 3"])
        .trim()
        .parse::<u32>()
        .expect("a pid");

    let out = moat_in(h).args(["wait", "jobs", &quick.to_string()]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "wait exits with the process's code: {}", text(&out.stderr));
    let listed = jobs(h);
    let state = |p: u32| listed.iter().find(|j| j.pid == p).map(|j| j.exit.map(|s| (s.code, s.signal)));
    assert_eq!(state(quick), Some(Some((Some(3), None))));
    assert_eq!(state(pid), Some(None), "still running");
    assert!(moat_ok(h, &["top", "jobs"]).contains("exited (3)"));

    // The daemon goes away and comes back; the agent keeps its processes.
    stop_daemon(h);
    wait_for("a few ticks", Duration::from_secs(30), || {
        jobs(h).iter().any(|j| j.pid == pid && j.exit.is_none() && j.output_bytes > 20)
    });

    // SIGTERM is ignored: the process prints on after it was sent. An attach replays what was
    // printed, then SIGKILL ends it.
    let printed = jobs(h).iter().find(|j| j.pid == pid).map_or(0, |j| j.output_bytes);
    moat_ok(h, &["kill", "jobs", &pid.to_string()]);
    wait_for("a tick printed after SIGTERM", Duration::from_secs(30), || {
        jobs(h).iter().any(|j| j.pid == pid && j.exit.is_none() && j.output_bytes > printed)
    });
    let mut attach = moat_in(h)
        .args(["attach", "jobs", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat attach starts");
    let mut stdout = attach.stdout.take().expect("stdout is piped");
    let (replayed, replay) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let (mut seen, mut buf) = (Vec::new(), [0u8; 512]);
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(7).any(|w| w == b"tick 2\n") {
                let _ = replayed.send(());
            }
        }
        seen
    });
    replay.recv_timeout(Duration::from_secs(30)).expect("attach replays what was printed");
    moat_ok(h, &["kill", "-s", "KILL", "jobs", &pid.to_string()]);
    let out = attach.wait_with_output().expect("attach ends when the process does");
    let stdout = text(&reader.join().expect("the reader thread"));
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));
    assert!(stdout.starts_with("start\ntick 1\ntick 2\n"), "replayed: {stdout}");
    assert_eq!(jobs(h).iter().find(|j| j.pid == pid).and_then(|j| j.exit).and_then(|s| s.signal), Some(9));

    // Output limits: the process runs to its end, the output stops at the limit with a marker.
    let out = moat_in(h)
        .args(["exec", "--max-output", "1K", "jobs", "--", "sh", "-c", "yes | head -c 100000; exit 4"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!((out.status.code(), out.stdout.len()), (Some(4), 1024), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("[moat: output truncated after 1024 bytes]"), "{}", text(&out.stderr));

    let out = moat_in(h).args(["kill", "jobs", "999999"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("no background process 999999"), "{}", text(&out.stderr));
    let out = moat_in(h).args(["kill", "-s", "BOGUS", "jobs", &pid.to_string()]).output().unwrap();
    assert!(text(&out.stderr).contains("not a signal"), "{}", text(&out.stderr));
}
