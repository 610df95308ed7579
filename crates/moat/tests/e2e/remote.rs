//! Portable snapshots: pushed to a real registry on loopback by one daemon, pulled and restored
//! by others with homes of their own (as on other hosts), and templates shared through a template
//! store; damaged, incompatible and interrupted pulls, and a registry that wants a password.

use crate::common;
use crate::registry::{CutProxy, Registry};

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{daemon_pid, moat_in, moat_ok, text, wait_for, OwnHome};

fn sh(home: &Path, sandbox: &str, script: &str) -> String {
    moat_ok(home, &["exec", sandbox, "--", "sh", "-c", script]).trim().to_string()
}

fn count(home: &Path, sandbox: &str) -> u64 {
    sh(home, sandbox, "cat /tmp/count 2>/dev/null || echo 0").parse().expect("a number")
}

fn inspect(home: &Path, sandbox: &str) -> serde_json::Value {
    serde_json::from_str(&moat_ok(home, &["inspect", sandbox, "--json"])).expect("inspect prints JSON")
}

fn snapshots(home: &Path) -> serde_json::Value {
    serde_json::from_str(&moat_ok(home, &["snapshot", "ls", "--json"])).expect("snapshot ls prints JSON")
}

/// Run `moat args` in `home`; it must fail. Its stderr.
fn moat_err(home: &Path, args: &[&str]) -> String {
    let out = moat_in(home).args(args).stdin(Stdio::null()).output().expect("moat runs");
    assert_ne!(out.status.code(), Some(0), "moat {args:?} should fail: {}", text(&out.stdout));
    text(&out.stderr)
}

/// The manifest of `repo:tag` and the digests of its layers by media type.
fn layers(registry: &Registry, repo: &str, tag: &str) -> (serde_json::Value, Vec<(String, String)>) {
    let got = registry.get(&format!("/v2/{repo}/manifests/{tag}"), "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let manifest: serde_json::Value = serde_json::from_slice(&got.body).expect("a JSON manifest");
    let layers = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| (l["mediaType"].as_str().unwrap().to_string(), l["digest"].as_str().unwrap().to_string()))
        .collect();
    (manifest, layers)
}

fn digest_of(layers: &[(String, String)], kind: &str) -> String {
    layers.iter().find(|(t, _)| t.contains(kind)).map(|(_, d)| d.clone()).unwrap_or_else(|| panic!("a {kind} layer"))
}

/// Lines of the registry's log that fetch or upload blob `digest`.
fn blob_requests(registry: &Registry, method: &str, digest: &str) -> usize {
    let log = std::fs::read_to_string(registry.log_path()).unwrap_or_default();
    let hex = digest.trim_start_matches("sha256:");
    log.lines()
        .filter(|l| l.contains("response completed") && l.contains(&format!("http.request.method={method} ")))
        .filter(|l| l.contains(hex))
        .count()
}

#[test]
fn snapshots_travel_between_hosts_through_a_registry() {
    let registry = Registry::start(None);
    let reg = registry.addr();
    let (a, b, c) = (OwnHome::new(), OwnHome::new(), OwnHome::new());
    let (ha, hb, hc) = (a.path(), b.path(), c.path());

    // Host A: a sandbox with a file and a process counting in memory, snapshotted and pushed.
    moat_ok(ha, &["run", "-d", "--name", "box", "--memory", "256"]);
    sh(ha, "box", "echo from-a > /root/data");
    let counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 1; done";
    moat_ok(ha, &["exec", "-d", "box", "--", "sh", "-c", counter]);
    wait_for("the counter to run", Duration::from_secs(30), || count(ha, "box") >= 2);
    moat_ok(ha, &["snapshot", "box", "--name", "clean"]);
    let saved = count(ha, "box");
    let clean = format!("{reg}/team/env:clean");
    let pushed = moat_ok(ha, &["snapshot", "push", "box:clean", &clean]);
    assert!(pushed.trim().starts_with(&format!("{clean}@sha256:")), "{pushed}");
    let (manifest, clean_layers) = layers(&registry, "team/env", "clean");
    assert_eq!(manifest["artifactType"], "application/vnd.moat.snapshot.v1");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.moat.snapshot.config.v1+json");
    let base = digest_of(&clean_layers, "disk.base");
    let mem = digest_of(&clean_layers, "memory");
    assert_eq!(blob_requests(&registry, "PUT", &base), 1, "the base went up once");

    // A second push of the same image sends no base bytes.
    moat_ok(ha, &["snapshot", "box", "--name", "two"]);
    let out = moat_in(ha).args(["snapshot", "push", "box:two", &format!("{reg}/team/env:two")]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("base disk sha256:") && text(&out.stderr).contains("in the registry already"));
    let (_, two_layers) = layers(&registry, "team/env", "two");
    assert_eq!(digest_of(&two_layers, "disk.base"), base, "the same base blob");
    assert_eq!(blob_requests(&registry, "PUT", &base), 1, "no second upload of the base");

    // Host B, an empty home: runs from the reference. The file is there, the process counts on
    // from where it was, and the machine has its own identity.
    moat_ok(hb, &["run", "-d", "--from", &clean, "--name", "there"]);
    assert_eq!(sh(hb, "there", "cat /root/data"), "from-a");
    let resumed = count(hb, "there");
    assert!(resumed >= saved && resumed <= saved + 3, "the counter goes on from {saved}: {resumed}");
    wait_for("the counter to count on", Duration::from_secs(30), || count(hb, "there") > resumed);
    assert_ne!(sh(hb, "there", "hostname"), sh(ha, "box", "hostname"));
    assert_ne!(sh(hb, "there", "cat /etc/machine-id"), sh(ha, "box", "cat /etc/machine-id"));
    let pulled = snapshots(hb);
    let entry = pulled.as_array().unwrap().iter().find(|s| s["remote"] == clean.as_str()).expect("the pulled snapshot");
    assert_eq!(entry["dependents"], serde_json::json!(["there"]));
    // Forks of the reference use what is pulled already.
    let gets = blob_requests(&registry, "GET", &mem);
    let forked = moat_ok(hb, &["fork", "--snapshot", &clean, "-n", "2"]);
    assert_eq!(forked.lines().collect::<Vec<_>>(), ["clean-1", "clean-2"]);
    assert_eq!(sh(hb, "clean-2", "cat /root/data"), "from-a");
    assert_eq!(blob_requests(&registry, "GET", &mem), gets, "memory is not fetched again");

    // An artifact saved with another QEMU is refused from its config, before its memory is fetched.
    let config = registry.get(
        &format!("/v2/team/env/blobs/{}", manifest["config"]["digest"].as_str().unwrap()),
        "application/octet-stream",
    );
    let mut alien: serde_json::Value = serde_json::from_slice(&config.body).expect("a JSON config");
    alien["machine"]["qemu"] = "0.0.1".into();
    let alien_config = serde_json::to_vec(&alien).unwrap();
    let mut alien_manifest = manifest.clone();
    alien_manifest["config"]["digest"] = registry.put_blob("team/env", &alien_config).into();
    alien_manifest["config"]["size"] = alien_config.len().into();
    let media = "application/vnd.oci.image.manifest.v1+json";
    registry.put_manifest("team/env", "alien", media, &serde_json::to_vec(&alien_manifest).unwrap());
    let gets = blob_requests(&registry, "GET", &mem);
    let err = moat_err(hc, &["snapshot", "pull", &format!("{reg}/team/env:alien")]);
    assert!(err.contains("cannot be restored on this host") && err.contains("QEMU 0.0.1"), "{err}");
    assert_eq!(blob_requests(&registry, "GET", &mem), gets, "refused before the memory is fetched");

    // A damaged blob: a digest error, and nothing is registered.
    let (_, two_layers) = layers(&registry, "team/env", "two");
    registry.corrupt_blob(&digest_of(&two_layers, "vm.state"));
    let err = moat_err(hc, &["run", "-d", "--from", &format!("{reg}/team/env:two"), "--name", "damaged"]);
    assert!(err.contains("digest"), "{err}");
    assert_eq!(snapshots(hc), serde_json::json!([]), "nothing registered");

    // Host C pulls through a link that drops half way and is killed (-9) right then; after a
    // restart and gc the next pull reuses what was verified and resumes what was not.
    let proxy = CutProxy::start(&reg);
    let cut_clean = format!("{}/team/env:clean", proxy.addr());
    let size = |d: &str| std::fs::metadata(registry.blob_path(d)).unwrap().len();
    let (mem_size, all): (u64, u64) = (size(&mem), clean_layers.iter().map(|(_, d)| size(d)).sum());
    // Blobs come in the order base, disk, state, memory: the link drops half way through memory.
    proxy.set_cut_after(all - mem_size / 2);
    let mut pull = moat_in(hc)
        .args(["snapshot", "pull", &cut_clean])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the link to drop", Duration::from_secs(60), || proxy.is_cut());
    let pid = daemon_pid(hc).expect("C's daemon runs");
    // SAFETY: SIGKILL to this test's own daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = pull.wait();
    proxy.set_pass();
    moat_ok(hc, &["gc"]);
    let before = proxy.bytes_to_client();
    moat_ok(hc, &["snapshot", "pull", &cut_clean]);
    let sent = proxy.bytes_to_client() - before;
    assert!(
        sent < mem_size * 3 / 4,
        "verified blobs are not fetched again and memory resumes: {sent} bytes sent, {mem_size} bytes of memory"
    );
    moat_ok(hc, &["run", "-d", "--from", &cut_clean, "--name", "third"]);
    assert_eq!(sh(hc, "third", "cat /root/data"), "from-a");

    // Bad references get a clear error.
    for bad in ["nope:tag", "UPPER/case:x"] {
        let err = moat_err(hc, &["snapshot", "pull", bad]);
        assert!(err.contains("hint:"), "{bad}: {err}");
    }
}

#[test]
fn a_password_protected_registry_takes_the_docker_config_credentials() {
    let registry = Registry::start(Some(("moat", "s3cret")));
    let (a, b) = (OwnHome::new(), OwnHome::new());
    let (ha, hb) = (a.path(), b.path());
    moat_ok(ha, &["run", "-d", "--name", "box", "--memory", "256"]);
    moat_ok(ha, &["snapshot", "box", "--name", "s"]);
    let reference = format!("{}/private/env:s", registry.addr());
    let err = moat_err(ha, &["snapshot", "push", "box:s", &reference]);
    assert!(err.contains("docker login"), "{err}");

    let docker = tempfile::tempdir().unwrap();
    let auth = crate::registry::basic_auth("moat", "s3cret");
    let config = serde_json::json!({ "auths": { registry.addr(): { "auth": auth.trim_start_matches("Basic ") } } });
    std::fs::write(docker.path().join("config.json"), config.to_string()).unwrap();
    let with_login = |home: &Path, args: &[&str]| {
        let out = moat_in(home).env("DOCKER_CONFIG", docker.path()).args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "moat {args:?}: {}", text(&out.stderr));
    };
    with_login(ha, &["snapshot", "push", "box:s", &reference]);
    let err = moat_err(hb, &["run", "-d", "--from", &reference, "--name", "anon"]);
    assert!(err.contains("docker login"), "{err}");
    with_login(hb, &["run", "-d", "--from", &reference, "--name", "there"]);
    assert_eq!(inspect(hb, "there")["phase"], "running");
}

#[test]
fn hosts_share_templates_through_a_template_store() {
    let registry = Registry::start(None);
    let store = format!("{}/moat/templates", registry.addr());
    let (a, b, c) = (OwnHome::new(), OwnHome::new(), OwnHome::new());
    let with_store = |home: &Path, store: &str, args: &[&str]| {
        let out = moat_in(home).env("MOAT_TEMPLATE_STORE", store).args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "moat {args:?}: {}", text(&out.stderr));
    };

    // A boots, saves the template and pushes it in the background.
    with_store(a.path(), &store, &["run", "-d", "--name", "first", "--memory", "256"]);
    assert!(inspect(a.path(), "first")["snapshot_id"].is_null(), "A booted");
    wait_for("the template to reach the store", Duration::from_secs(60), || {
        let tags = registry.get("/v2/moat/templates/tags/list", "application/json");
        tags.status == 200 && String::from_utf8_lossy(&tags.body).contains("\"tags\":[\"")
    });
    let first = inspect(a.path(), "first");
    assert!(first["last_error"].is_null(), "a store without the template is no failure: {first}");

    // B, an empty home, restores A's template instead of booting.
    with_store(b.path(), &store, &["run", "-d", "--name", "second", "--memory", "256"]);
    let second = inspect(b.path(), "second");
    assert!(second["snapshot_id"].is_string(), "B restored the template: {second}");
    assert!(second["last_error"].is_null(), "{second}");
    let templates = snapshots(b.path());
    let t = &templates.as_array().unwrap()[0];
    assert_eq!(t["kind"], "template");
    assert!(t["remote"].as_str().unwrap().starts_with(&store), "{t}");
    assert_eq!(sh(b.path(), "second", "echo ok"), "ok");

    // A store that cannot be reached never fails a create: the sandbox boots, and says why.
    with_store(c.path(), "127.0.0.1:1/moat/templates", &["run", "-d", "--name", "third", "--memory", "256"]);
    let third = inspect(c.path(), "third");
    assert_eq!(third["phase"], "running");
    assert!(third["last_error"].as_str().unwrap_or("").contains("template store"), "{third}");
    let events = moat_ok(c.path(), &["events"]);
    assert!(events.contains("template store"), "{events}");
}
