//! moat as a service: a CLI driving a daemon on another "machine" over TCP and TLS (an empty home
//! of its own, MOAT_HOST and the token), deadlines on a hung daemon, `moat daemon
//! status|stop|restart|logs` on the background daemon, its capped log, and `moat setup --service`.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_pid, moat_in, text, wait_for, OwnHome};

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// `moat serve ARGS` in `home`, in the foreground of the test; killed when dropped.
struct Served(Child);

impl Served {
    fn start(home: &Path, args: &[&str], port: u16) -> Served {
        let log = std::fs::File::create(home.join("serve.log")).expect("the serve log");
        let child = moat_in(home)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log twice"))
            .stderr(log)
            .spawn()
            .expect("moat serve starts");
        let served = Served(child);
        wait_for("the daemon to listen on TCP", Duration::from_secs(120), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        served
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the daemon this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// `moat` with an empty home of its own and the daemon at `url`: a machine without moat state.
fn remote(client_home: &Path, url: &str, token: &str) -> Command {
    let mut cmd = moat_in(client_home);
    cmd.env("MOAT_HOST", url).env("MOAT_TOKEN", token).stdin(Stdio::null());
    cmd
}

fn ok(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "{what}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn failed(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().expect("moat runs");
    assert_ne!(out.status.code(), Some(0), "{what} should fail: {}", text(&out.stdout));
    text(&out.stderr)
}

fn token(home: &Path) -> String {
    std::fs::read_to_string(home.join("token")).expect("the daemon wrote its token").trim().to_string()
}

#[test]
fn a_cli_without_a_daemon_drives_a_remote_one_over_tcp_with_its_token() {
    let server = OwnHome::new();
    let port = free_port();
    let _daemon = Served::start(server.path(), &["--tcp", &format!("127.0.0.1:{port}")], port);
    let (client, url, token) =
        (tempfile::tempdir().expect("a home"), format!("tcp://127.0.0.1:{port}"), token(server.path()));
    let c = client.path();

    let out = ok(
        {
            let mut m = remote(c, &url, &token);
            m.args(["run", "--", "echo", "hi"]);
            m
        },
        "run",
    );
    assert_eq!(out, "hi\n");
    let ps = ok(
        {
            let mut m = remote(c, &url, &token);
            m.arg("ps");
            m
        },
        "ps",
    );
    assert!(ps.starts_with("ID"), "{ps}");
    let status = ok(
        {
            let mut m = remote(c, &url, &token);
            m.args(["daemon", "status"]);
            m
        },
        "status",
    );
    assert!(status.contains(&format!("tcp: tcp://127.0.0.1:{port}")), "{status}");

    // Wrong or missing token: refused, saying where the token comes from.
    let e = failed(
        {
            let mut m = remote(c, &url, "not-the-token");
            m.arg("ps");
            m
        },
        "a wrong token",
    );
    assert!(e.contains("wrong token") && e.contains("MOAT_TOKEN"), "{e}");
    let e = failed(
        {
            let mut m = remote(c, &url, &token);
            m.env_remove("MOAT_TOKEN").arg("ps");
            m
        },
        "no token",
    );
    assert!(e.contains("needs its token"), "{e}");
    // What needs the daemon's machine says so.
    let e = failed(
        {
            let mut m = remote(c, &url, &token);
            m.args(["run", "-v", "./src:/src", "--", "true"]);
            m
        },
        "-v",
    );
    assert!(e.contains("host directories cannot be mounted") && e.contains("moat cp"), "{e}");
    let e = failed(
        {
            let mut m = remote(c, &url, &token);
            m.args(["daemon", "stop"]);
            m
        },
        "stop",
    );
    assert!(e.contains("this machine's daemon only"), "{e}");

    // The client's home stayed empty: no daemon was started, no state read or written there.
    let left: Vec<_> = std::fs::read_dir(c).expect("the client home").flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn exec_and_ps_reach_a_daemon_over_tls_with_a_self_signed_certificate() {
    let server = OwnHome::new();
    let files = tempfile::tempdir().expect("a temp dir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("a certificate");
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("writing the key");
    let port = free_port();
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let args = ["--tcp", &format!("127.0.0.1:{port}"), "--tls-cert", &cert_arg, "--tls-key", &key_arg];
    let _daemon = Served::start(server.path(), &args, port);
    let client = tempfile::tempdir().expect("a home");
    let (c, token) = (client.path(), token(server.path()));
    let url = format!("https://localhost:{port}");
    let tls = |args: &[&str]| {
        let mut m = remote(c, &url, &token);
        m.arg("--tls-ca").arg(&cert).args(args);
        m
    };

    // The system's roots do not vouch for a self-signed daemon.
    let e = failed(
        {
            let mut m = remote(c, &url, &token);
            m.arg("ps");
            m
        },
        "no CA",
    );
    assert!(e.contains("TLS handshake") && e.contains("--tls-ca"), "{e}");

    assert_eq!(ok(tls(&["run", "-d", "--name", "box"]), "run -d"), "box\n");
    // Exec is a WebSocket upgrade: it carries the token through TLS too.
    assert_eq!(ok(tls(&["exec", "box", "--", "echo", "over", "tls"]), "exec"), "over tls\n");
    assert!(ok(tls(&["ps"]), "ps").contains("box"));
    ok(tls(&["rm", "-f", "box"]), "rm");
}

/// Run `moat args` in `home`; its output and how long it took.
fn timed(home: &Path, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = moat_in(home).args(args).stdin(Stdio::null()).output().expect("moat runs");
    (out, start.elapsed())
}

#[test]
fn the_background_daemon_is_managed_with_moat_daemon_and_keeps_its_log_small() {
    let home = OwnHome::new();
    let h = home.path();
    let moat = |args: &[&str]| {
        let mut m = moat_in(h);
        // A tiny log cap and a chatty daemon: the log is moved aside within a few commands.
        m.env("MOAT_LOG_MAX_SIZE", "4K").env("MOAT_LOG", "trace").args(args).stdin(Stdio::null());
        m
    };
    ok(moat(&["ps"]), "ps starts the daemon");
    let pid = daemon_pid(h).expect("the daemon runs");

    // A daemon that accepts but never answers: the deadline, not a hang, with what to do.
    // SAFETY: SIGSTOP to the daemon of this test's home.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let (out, took) = timed(h, &["ps", "--timeout", "2s"]);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let e = text(&out.stderr);
    assert!(!out.status.success() && took < Duration::from_secs(4), "{took:?}: {e}");
    assert!(e.contains(&format!("the daemon (pid {pid}) did not answer within 2s")), "{e}");
    assert!(e.contains("moat daemon restart") && e.contains("moat daemon logs"), "{e}");
    ok(moat(&["ps", "--timeout", "2s"]), "ps once the daemon runs again");

    let status = ok(moat(&["daemon", "status"]), "status");
    assert!(status.contains(&format!("running: pid {pid}")), "{status}");
    assert!(status.contains("started in the background") && status.contains("daemon.log"), "{status}");
    assert!(status.contains("tcp: off") && status.contains("accelerator: "), "{status}");
    let json: serde_json::Value = serde_json::from_str(&ok(moat(&["daemon", "status", "--json"]), "json")).unwrap();
    assert_eq!(json["pid"], pid);

    let tail = ok(moat(&["daemon", "logs", "--tail", "3"]), "logs");
    assert!(!tail.is_empty() && tail.lines().count() <= 3, "{tail}");

    // Restart: a new daemon with the same arguments (so still logging to its capped file).
    ok(moat(&["daemon", "restart"]), "restart");
    let restarted = daemon_pid(h).expect("a daemon runs after a restart");
    assert_ne!(restarted, pid);
    let log = h.join("daemon.log");
    wait_for("the daemon's log to be moved aside", Duration::from_secs(30), || {
        ok(moat(&["ps"]), "ps");
        h.join("daemon.log.1").exists()
    });
    let size = std::fs::metadata(&log).expect("the log").len();
    assert!(size <= 4096, "the log is {size} bytes");
    assert!(std::fs::metadata(h.join("daemon.log.1")).expect("the old log").len() <= 4096 + 1024);

    // Stop works on a stopped daemon too, and waits until it is gone.
    // SAFETY: SIGSTOP to the daemon of this test's home.
    unsafe { libc::kill(restarted, libc::SIGSTOP) };
    let out = moat(&["daemon", "stop", "--timeout", "20s"]).output().expect("moat runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("keep running"), "{}", text(&out.stderr));
    // The lock is free at once; the process itself is reaped by init in its own time.
    let out = moat(&["daemon", "status"]).output().expect("moat runs");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("not running"));
    wait_for("the stopped daemon to be reaped", Duration::from_secs(20), || daemon_pid(h).is_none());
}

#[test]
fn setup_service_writes_a_unit_that_runs_this_binary() {
    let exe = env!("CARGO_BIN_EXE_moat");
    let home = tempfile::tempdir().expect("a home");
    let dry = ok(
        {
            let mut m = moat_in(home.path());
            m.args(["setup", "--service", "--dry-run"]);
            m
        },
        "dry run",
    );
    assert!(dry.lines().any(|l| l.starts_with("ExecStart=") && l.contains(&format!("{exe} serve"))), "{dry}");
    assert!(dry.contains("KillMode=process") && dry.contains("MOAT_HOME=/var/lib/moat"), "{dry}");

    let units = tempfile::tempdir().expect("a unit dir");
    let mut install = moat_in(home.path());
    install.env("MOAT_SYSTEMD_DIR", units.path()).args(["setup", "--service", "--group", "root"]).stdin(Stdio::null());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let e = failed(install, "setup --service as a user");
        assert!(e.contains("needs root") && e.contains("sudo"), "{e}");
        return;
    }
    let out = install.output().expect("moat runs");
    let e = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{e}");
    let unit = std::fs::read_to_string(units.path().join("moat.service")).expect("the unit was written");
    assert!(unit.contains(&format!("{exe} serve --group root")), "{unit}");
    if !Path::new("/run/systemd/system").is_dir() {
        assert!(e.contains("systemd does not run this machine") && e.contains("serve --group root"), "{e}");
    }
}
