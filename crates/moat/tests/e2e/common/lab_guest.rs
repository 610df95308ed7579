//! Running things in the guests of a [`Netlab`](super::netlab::Netlab): shell scripts with a
//! deadline, the host's openssl as the guests' TLS client, and the daemon's `net.refused` events.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::netlab::Netlab;
use super::text;

/// How long one command in a guest may take before the test calls it wedged.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Tests that boot VMs take turns: on two cores, parallel TCG guests slow each other down until
/// timeouts measure the host's load instead of moat.
pub fn vm_turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run a command to completion, killing it (and failing the test) if it takes longer than
/// `timeout`: a wedged network stack must fail the test, not hang it.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("command starts");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child works") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out_reader.join().unwrap(), stderr: err_reader.join().unwrap() }
}

/// What a shell script in a sandbox printed, and its exit code.
pub struct Guest {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Guest {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// `moat exec SANDBOX -- sh -c SCRIPT` through `cmd` (the `moat` of a lab or of a home).
pub fn exec_in(cmd: Command, sandbox: &str, script: &str) -> Guest {
    exec_within(cmd, sandbox, script, GUEST_TIMEOUT)
}

pub fn exec_within(mut cmd: Command, sandbox: &str, script: &str, timeout: Duration) -> Guest {
    cmd.args(["exec", sandbox, "--", "sh", "-c", script]);
    let out = output_within(cmd, timeout);
    Guest { code: out.status.code(), stdout: text(&out.stdout), stderr: text(&out.stderr) }
}

pub fn guest(lab: &Netlab, sandbox: &str, script: &str) -> Guest {
    exec_in(lab.moat(), sandbox, script)
}

/// A script that must succeed; its stdout.
pub fn guest_ok(lab: &Netlab, sandbox: &str, script: &str) -> String {
    let g = guest(lab, sandbox, script);
    assert!(g.ok(), "`{script}` in {sandbox} failed:\n{g}");
    g.stdout
}

/// `wget` of `url` in the guest, bounded so that a dropped connection cannot hang the test.
pub fn wget(lab: &Netlab, sandbox: &str, url: &str) -> Guest {
    guest(lab, sandbox, &format!("timeout 30 wget -q -O - '{url}'"))
}

/// Give the sandbox the host's `openssl` (with the libraries it loads) as /usr/bin/openssl.
/// busybox wget uses `openssl s_client` for https when it finds one. Its built-in TLS client
/// (busybox 1.35) sends no signature_algorithms extension, which rustls servers (the lab's, and
/// moat's interception) refuse with a handshake failure; OpenSSL's client is a real one. It also
/// verifies certificates against $SSL_CERT_FILE unless wget is given --no-check-certificate.
pub fn give_openssl(lab: &Netlab, sandbox: &str) {
    let ldd = Command::new("ldd").arg("/usr/bin/openssl").output();
    let ldd = match ldd {
        Ok(out) if out.status.success() => text(&out.stdout),
        _ => panic!("the tests need the host's openssl: install it with: sudo apt-get install -y openssl"),
    };
    let stage = tempfile::tempdir().expect("a temp dir can be created");
    let kit = stage.path().join("tls");
    std::fs::create_dir(&kit).unwrap();
    let mut files = vec![std::path::PathBuf::from("/usr/bin/openssl")];
    // `libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x…)` and `/lib64/ld-linux-x86-64.so.2 (0x…)`.
    files.extend(ldd.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))).map(Into::into));
    let mut loader = None;
    for file in &files {
        let name = file.file_name().expect("a library path names a file").to_string_lossy().into_owned();
        if name.starts_with("ld-linux") {
            loader = Some(name.clone());
        }
        std::fs::copy(file, kit.join(&name)).unwrap_or_else(|e| panic!("copying {}: {e}", file.display()));
    }
    let loader = loader.unwrap_or_else(|| panic!("no dynamic loader in `ldd /usr/bin/openssl`:\n{ldd}"));
    guest_ok(lab, sandbox, "mkdir -p /opt");
    lab.moat_ok(&["cp", &kit.display().to_string(), &format!("{sandbox}:/opt/tls")]);
    let wrapper = format!(
        "printf '#!/bin/sh\\nexec /opt/tls/{loader} --library-path /opt/tls /opt/tls/openssl \"$@\"\\n' > /usr/bin/openssl \
         && chmod 755 /usr/bin/openssl && openssl version"
    );
    let version = guest_ok(lab, sandbox, &wrapper);
    assert!(version.starts_with("OpenSSL"), "openssl runs in {sandbox}: {version}");
}

/// A connection the guest attempted must fail the way a refused connection does: promptly, with
/// a reset or refusal (not a timeout, not a DNS failure).
pub fn assert_refused(g: &Guest, what: &str) {
    assert!(!g.ok(), "{what} must be refused, but it succeeded:\n{g}");
    let err = g.stderr.to_lowercase();
    assert!(
        err.contains("refused") || err.contains("reset"),
        "{what} must fail as a refused or reset connection (not a timeout or another error):\n{g}"
    );
}

/// The messages of the daemon's `net.refused` events, for sandbox `name` (or `id`).
pub fn refusals(lab: &Netlab, sandbox: &str) -> Vec<String> {
    let id = inspect(lab, sandbox)["id"].as_str().unwrap_or_default().to_string();
    let out = lab.moat_ok(&["events", "--json"]);
    let mut messages = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("`moat events --json` printed {line:?}: {e}"));
        for field in ["seq", "at_ms", "kind", "message"] {
            assert!(event.get(field).is_some(), "an event without `{field}`: {line}");
        }
        let of_box = matches!(event["sandbox"].as_str(), Some(s) if s == sandbox || s == id);
        if event["kind"] == "net.refused" && of_box {
            messages.push(event["message"].as_str().unwrap_or_default().to_string());
        }
    }
    messages
}

/// Wait for a `net.refused` event of `sandbox` whose message contains every one of `needles`.
pub fn assert_refusal_event(lab: &Netlab, sandbox: &str, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let messages = refusals(lab, sandbox);
        if messages.iter().any(|m| needles.iter().all(|n| m.contains(n))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no net.refused event of {sandbox} mentions {needles:?}; its net.refused events:\n{}",
            messages.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn inspect(lab: &Netlab, sandbox: &str) -> serde_json::Value {
    serde_json::from_str(&lab.moat_ok(&["inspect", sandbox, "--json"])).expect("inspect prints JSON")
}

pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("/dev/urandom is readable");
    format!("{prefix}{}", hex::encode(bytes))
}
