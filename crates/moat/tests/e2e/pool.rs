//! Warm pools against real VMs: a pool fills in the background; a create of its image and size
//! claims a member, which is indistinguishable from a fresh sandbox (its own name, hostname,
//! machine id, clock, entropy and network policy, nothing left of the warm-up); the pool refills;
//! other sizes, `--cold` and `--net none` do not claim; gc leaves members alone; a member whose
//! QEMU died does not fail a create; removing the pool and stopping the daemon end them.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{moat_in, moat_ok, qemu_processes_mentioning, stop_daemon, text, wait_for, OwnHome};
use serde_json::Value;

fn pools(h: &Path) -> Vec<Value> {
    serde_json::from_str(&moat_ok(h, &["pool", "ls", "--json"])).expect("pool ls --json is JSON")
}

fn pool_field(h: &Path, field: &str) -> u64 {
    let all = pools(h);
    assert_eq!(all.len(), 1, "one pool: {all:?}");
    all[0][field].as_u64().unwrap_or_else(|| panic!("{field} in {:?}", all[0]))
}

fn wait_full(h: &Path) {
    wait_for("the pool to hold 2 ready members", Duration::from_secs(240), || pool_field(h, "ready") == 2);
}

fn exec(h: &Path, name: &str, script: &str) -> String {
    moat_ok(h, &["exec", name, "--", "sh", "-c", script]).trim().to_string()
}

fn inspect(h: &Path, name: &str) -> Value {
    serde_json::from_str(&moat_ok(h, &["inspect", name, "--json"])).expect("inspect --json is JSON")
}

/// The userspace processes of a guest (busybox `ps` shows kernel threads in brackets).
fn processes(h: &Path, name: &str) -> Vec<String> {
    let mut names: Vec<String> = exec(h, name, "ps -o args")
        .lines()
        .skip(1)
        .map(|l| l.trim().to_string())
        .filter(|l| !l.starts_with('[') && !l.starts_with("ps ") && !l.starts_with("sh -c"))
        .collect();
    names.sort();
    names
}

/// An HTTP server on the host's loopback that answers `hello` to every connection.
fn hello_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        }
    });
    port
}

#[test]
fn a_claimed_member_is_a_fresh_sandbox_and_the_pool_refills() {
    let home = OwnHome::new();
    let h = home.path();

    // Bad input is refused with the remedy, and sets nothing.
    let out = moat_in(h).args(["pool", "set", "minimal", "--size", "65"]).output().expect("moat runs");
    assert!(!out.status.success() && text(&out.stderr).contains("at most 64"), "{}", text(&out.stderr));
    let out = moat_in(h).args(["pool", "set", "no-such-image", "--size", "1"]).output().expect("moat runs");
    assert!(!out.status.success() && text(&out.stderr).contains("pull, build or import"), "{}", text(&out.stderr));
    let out = moat_in(h).args(["pool", "set", "minimal", "--size", "1", "--memory", "1"]).output().expect("moat runs");
    assert!(!out.status.success(), "a pool of 1 MiB sandboxes was accepted");
    assert!(pools(h).is_empty(), "refused settings left a pool: {:?}", pools(h));

    // The built-in image exists once a sandbox of it ran. A reference sandbox, restored from the
    // template without a pool, to compare the claimed ones with.
    moat_ok(h, &["run", "--image", "minimal", "--memory", "256", "--", "true"]);
    moat_ok(h, &["run", "-d", "--name", "fresh", "--image", "minimal", "--memory", "256"]);
    moat_ok(h, &["pool", "set", "minimal", "--size", "2", "--memory", "256"]);
    wait_full(h);
    assert_eq!(pool_field(h, "claimed"), 0);
    let listed: Vec<Value> = serde_json::from_str(&moat_ok(h, &["ps", "-a", "--json"])).expect("JSON");
    assert_eq!(listed.len(), 1, "members are not sandboxes until claimed: {listed:?}");
    // gc leaves the members alone: they have no record, but they are the daemon's.
    moat_ok(h, &["gc"]);
    assert_eq!(pool_field(h, "ready"), 2, "gc ended pool members");

    let port = hello_server();
    let allow = ["--allow-cidr", "127.0.0.1/32"];
    let mut run_a = vec!["run", "-d", "--name", "pool-a", "--image", "minimal", "--memory", "256"];
    run_a.extend(allow);
    moat_ok(h, &run_a);
    moat_ok(h, &["run", "-d", "--name", "pool-b", "--image", "minimal", "--memory", "256", "--hostname", "bee"]);
    assert_eq!(pool_field(h, "claimed"), 2, "both creates were served by the pool");

    let (a, b, fresh) = (inspect(h, "pool-a"), inspect(h, "pool-b"), inspect(h, "fresh"));
    for s in [&a, &b] {
        assert_eq!(s["phase"], "running", "{s}");
        assert!(s["snapshot_id"].is_string(), "a claimed sandbox builds on the template: {s}");
    }
    let id_a = a["id"].as_str().expect("id");
    assert_eq!(exec(h, "pool-a", "hostname"), format!("moat-{}", &id_a[..8]));
    assert_eq!(exec(h, "pool-b", "hostname"), "bee");
    let machine_ids: Vec<String> =
        ["pool-a", "pool-b", "fresh"].iter().map(|n| exec(h, n, "cat /etc/machine-id")).collect();
    assert!(
        machine_ids[0] != machine_ids[1] && machine_ids[0] != machine_ids[2] && machine_ids[1] != machine_ids[2],
        "every sandbox has its own machine id: {machine_ids:?}"
    );
    // The clock is the host's, though the member was paused since it was made.
    let host_now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64;
    let guest_now: i64 = exec(h, "pool-a", "date +%s").parse().expect("a number");
    assert!((guest_now - host_now).abs() <= 5, "guest clock {guest_now}, host {host_now}");
    let random = |n: &str| exec(h, n, "head -c 16 /dev/urandom | od -An -tx1");
    assert_ne!(random("pool-a"), random("pool-b"), "two claimed sandboxes drew the same random bytes");
    // Nothing of the warm-up is left, and the guest looks like the fresh one.
    assert_eq!(processes(h, "pool-a"), processes(h, "fresh"), "processes differ from a fresh sandbox's");
    assert_eq!(exec(h, "pool-a", "ls -A /tmp"), exec(h, "fresh", "ls -A /tmp"));
    assert_eq!(fresh["vcpus"], a["vcpus"]);
    // Each claim's own network policy: a may reach the host's loopback, b may not.
    let url = format!("http://10.0.2.2:{port}/");
    assert_eq!(exec(h, "pool-a", &format!("timeout 10 wget -q -O - {url}")), "hello");
    let refused = moat_in(h)
        .args(["exec", "pool-b", "--", "timeout", "10", "wget", "-q", "-O", "-", &url])
        .output()
        .expect("moat runs");
    assert!(!refused.status.success(), "pool-b reached the host's loopback: {}", text(&refused.stdout));

    // The pool refills in the background.
    wait_full(h);
    // Another size, --cold and a sandbox without a network do not claim.
    moat_ok(h, &["run", "-d", "--name", "other-size", "--image", "minimal", "--memory", "192"]);
    moat_ok(h, &["run", "-d", "--name", "cold", "--image", "minimal", "--memory", "256", "--cold"]);
    moat_ok(h, &["run", "-d", "--name", "no-net", "--image", "minimal", "--memory", "256", "--net", "none"]);
    assert_eq!(pool_field(h, "claimed"), 2, "only matching creates claim");
    assert_eq!(pool_field(h, "ready"), 2);

    // A member whose QEMU died while it waited does not fail a create: the template serves it.
    let run_root = h.join("run");
    let names = ["pool-a", "pool-b", "fresh", "other-size", "cold", "no-net"];
    let sandbox_qemus: Vec<u32> = names
        .iter()
        .flat_map(|n| {
            qemu_processes_mentioning(&run_root.join(inspect(h, n)["id"].as_str().expect("id")).display().to_string())
        })
        .collect();
    let members: Vec<u32> = qemu_processes_mentioning(&run_root.display().to_string())
        .into_iter()
        .filter(|p| !sandbox_qemus.contains(p))
        .collect();
    assert_eq!(members.len(), 2, "two members' QEMUs beside the sandboxes' {sandbox_qemus:?}");
    for pid in members {
        // SAFETY: SIGKILL to a QEMU of this test's daemon.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    moat_ok(
        h,
        &["run", "-d", "--name", "after-crash", "--image", "minimal", "--memory", "256", "--hostname", "phoenix"],
    );
    assert_eq!(exec(h, "after-crash", "hostname"), "phoenix");

    // Removing the pool ends its members; the sandboxes claimed from it run on.
    let sandboxes = 7;
    moat_ok(h, &["pool", "rm", "minimal", "--memory", "256"]);
    wait_for("the members' QEMUs to end", Duration::from_secs(30), || {
        qemu_processes_mentioning(&run_root.display().to_string()).len() == sandboxes
    });
    assert!(pools(h).is_empty(), "{:?}", pools(h));
    assert_eq!(exec(h, "pool-a", "echo still"), "still");

    // A daemon that stops ends its members (they have no record to adopt) and keeps sandboxes.
    moat_ok(h, &["pool", "set", "minimal", "--size", "1", "--memory", "256"]);
    wait_for("one ready member", Duration::from_secs(120), || pool_field(h, "ready") == 1);
    assert_eq!(qemu_processes_mentioning(&run_root.display().to_string()).len(), sandboxes + 1);
    stop_daemon(h);
    assert_eq!(
        qemu_processes_mentioning(&run_root.display().to_string()).len(),
        sandboxes,
        "a member outlived its daemon"
    );
    // The next daemon keeps the setting and fills the pool again.
    wait_for("the pool to fill after a restart", Duration::from_secs(120), || pool_field(h, "ready") == 1);
    assert_eq!(exec(h, "pool-b", "hostname"), "bee");
    let mut rm = vec!["rm", "-f", "after-crash"];
    rm.extend(names);
    moat_ok(h, &rm);
    moat_ok(h, &["pool", "rm", "minimal", "--memory", "256"]);
}
