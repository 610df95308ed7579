//! `moat doctor --smoke` and `moat doctor --bundle` against real sandboxes.

use crate::common;
use crate::oci;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::{moat_in, moat_ok, text, wait_for, OwnHome};
use oci::{base_layer, docker_save_with};

const STEPS: &[&str] = &["daemon", "create", "exec", "files", "network", "snapshot", "restore", "remove"];

fn random_hex() -> String {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The names of the sandboxes `moat ps` lists.
fn sandboxes(h: &std::path::Path) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(&moat_ok(h, &["ps", "-a", "--json"])).expect("ps --json is JSON");
    list.as_array().expect("a list").iter().map(|s| s["name"].as_str().expect("a name").to_string()).collect()
}

/// The line of `step` in the smoke test's output.
fn line<'a>(out: &'a str, step: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(step))
        .unwrap_or_else(|| panic!("no line for step {step}:\n{out}"))
}

#[test]
fn smoke_test_runs_every_step_and_leaves_nothing() {
    let home = OwnHome::new();
    let h = home.path();
    let out = moat_ok(h, &["doctor", "--smoke"]);
    for step in STEPS {
        let l = line(&out, step);
        let mut words = l.split_whitespace();
        assert_eq!(words.next(), Some("ok"), "{l}\n{out}");
        let time = words.nth(1).expect("a time");
        assert!(time.ends_with('s') && time.trim_end_matches('s').parse::<f64>().is_ok(), "a time: {l}");
    }
    assert!(!sandboxes(h).iter().any(|s| s.starts_with("doctor-smoke-")), "the smoke sandbox is removed");
    let snapshots = moat_ok(h, &["snapshot", "ls", "--json"]);
    assert!(!snapshots.contains("doctor-smoke-"), "its snapshot went with it: {snapshots}");
}

#[test]
fn failed_smoke_test_names_its_step_and_keep_leaves_the_sandbox() {
    let home = OwnHome::new();
    let h = home.path();
    // busybox with a shell but no wget: everything works up to the network step.
    let archive = h.join("nowget.tar");
    let config = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    std::fs::write(&archive, docker_save_with(&[base_layer()], "nowget:test", config)).expect("archive written");
    moat_ok(h, &["image", "import", archive.to_str().expect("a UTF-8 path")]);

    let out = moat_in(h)
        .args(["doctor", "--smoke", "--keep", "--image", "nowget:test"])
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", text(&out.stderr));
    for step in ["daemon", "create", "exec", "files"] {
        assert!(line(&stdout, step).starts_with("ok"), "{stdout}");
    }
    assert!(line(&stdout, "network").starts_with("FAIL"), "{stdout}");
    assert!(line(&stdout, "snapshot").starts_with("skip"), "{stdout}");
    let kept: Vec<String> = sandboxes(h).into_iter().filter(|s| s.starts_with("doctor-smoke-")).collect();
    assert_eq!(kept.len(), 1, "--keep keeps the sandbox: {kept:?}\n{stdout}");
    assert!(stdout.contains(&format!("moat rm -f {}", kept[0])), "says how to remove it:\n{stdout}");
    moat_ok(h, &["rm", "-f", &kept[0]]);
}

#[test]
fn bundle_holds_the_logs_and_none_of_the_secrets() {
    let home = OwnHome::new();
    let h = home.path();
    let (secret, env_value, token) = (random_hex(), random_hex(), random_hex());
    // The daemon's API token, as `moat serve --tcp` would have made it.
    std::fs::write(h.join("token"), &token).expect("token written");
    let out = moat_in(h)
        .args(["run", "-d", "--name", "leaky", "--memory", "256", "--secret", "DOCTOR_SECRET@example.com"])
        .args(["-e", &format!("DOCTOR_KEY={env_value}")])
        .env("DOCTOR_SECRET", &secret)
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Every value reaches the console, and the env value a command's argv too.
    let script = format!(
        "echo \"key=$DOCTOR_KEY\" > /dev/console; echo 'secret={secret} token={token}' > /dev/console; \
         echo \"kmsg=$DOCTOR_KEY\" > /dev/kmsg; echo {env_value}"
    );
    assert_eq!(moat_ok(h, &["exec", "leaky", "--", "sh", "-c", &script]).trim(), env_value);
    wait_for("the values on the console", Duration::from_secs(20), || {
        let console = moat_ok(h, &["logs", "leaky"]);
        [&secret, &env_value, &token].iter().all(|v| console.contains(v.as_str()))
    });

    let bundle = h.join("bundle.tar.gz");
    let path = bundle.to_str().expect("a UTF-8 path");
    moat_ok(h, &["doctor", "--bundle", "--out", path]);
    assert_eq!(std::fs::metadata(&bundle).expect("written").permissions().mode() & 0o777, 0o600);
    let refused = moat_in(h).args(["doctor", "--bundle", "--out", path]).stdin(Stdio::null()).output().unwrap();
    assert_ne!(refused.status.code(), Some(0), "an existing file is not overwritten without --force");
    assert!(text(&refused.stderr).contains("--force"), "{}", text(&refused.stderr));

    // The whole archive, decompressed: headers, names and every file.
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&bundle).unwrap()).read_to_end(&mut raw).expect("gzip");
    for (what, value) in [("secret", &secret), ("env value", &env_value), ("token", &token)] {
        assert!(!raw.windows(value.len()).any(|w| w == value.as_bytes()), "the {what} is in the bundle");
    }
    let mut files = std::collections::BTreeMap::new();
    for entry in tar::Archive::new(raw.as_slice()).entries().expect("a tar") {
        let mut entry = entry.expect("an entry");
        let name = entry.path().unwrap().to_string_lossy().split_once('/').expect("a top directory").1.to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        files.insert(name, text(&data));
    }
    for expected in [
        "doctor.json",
        "config.json",
        "versions.json",
        "manifest.json",
        "daemon.log",
        "events.ndjson",
        "sandboxes/leaky/info.json",
        "sandboxes/leaky/lifecycle.json",
        "sandboxes/leaky/events.ndjson",
        "sandboxes/leaky/console.log",
        "sandboxes/leaky/qemu.log",
    ] {
        assert!(files.contains_key(expected), "{expected} is in the bundle: {:?}", files.keys());
    }
    let console = &files["sandboxes/leaky/console.log"];
    assert!(console.contains("key=[REDACTED]") && console.contains("token=[REDACTED]"), "{console}");
    assert!(files["sandboxes/leaky/info.json"].contains("DOCTOR_KEY"), "the env names stay");
    let doctor: serde_json::Value = serde_json::from_str(&files["doctor.json"]).expect("doctor.json is JSON");
    assert!(doctor.as_array().is_some_and(|c| !c.is_empty()), "the checks: {doctor}");
    moat_ok(h, &["rm", "-f", "leaky"]);
}
