//! What another local user or a remote client tries against a daemon: read the guest memory and
//! disks it keeps, use its socket, flood its TCP port. Each test performs the attack.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{moat_in, moat_ok, text, wait_for, OwnHome};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("the path exists").permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Everything under `dir` (links not followed) that someone other than its owner may use.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut open = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("a directory under the home").flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.file_type().is_symlink() {
                continue;
            }
            // Files of the jailed QEMUs' shared group (image bases, snapshot RAM, the initramfs)
            // are theirs to read; no local user has that group, and the home keeps everyone
            // else out.
            let jails_only =
                meta.is_file() && Some(meta.gid()) == moat_sandbox::jail_ids().shared_gid() && meta.mode() & 0o017 == 0;
            if meta.permissions().mode() & 0o077 != 0 && !jails_only {
                open.push(format!("{} {:o}", path.display(), meta.permissions().mode() & 0o7777));
            }
            if meta.is_dir() {
                todo.push(path);
            }
        }
    }
    open
}

/// A `moat serve` this test started, stopped (and reaped) when the test ends.
struct Daemon(Child);

impl Daemon {
    /// `moat serve ARGS` on `home`, logging to `log` (outside the home: the home must stay private).
    fn start(home: &Path, log: &Path, args: &[&str]) -> Daemon {
        let out = std::fs::File::create(log).expect("a log file");
        let child = moat_in(home)
            .arg("serve")
            .args(args)
            .env("MOAT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("the log file"))
            .stderr(out)
            .spawn()
            .expect("moat serve starts");
        Daemon(child)
    }

    /// Wait until it answers on TCP `port` and has written the token; the token.
    fn token_once_listening(&mut self, home: &Path, log: &Path, port: u16) -> String {
        wait_for("the daemon to listen on TCP", Duration::from_secs(180), || {
            let exited = self.0.try_wait().ok().flatten();
            assert!(exited.is_none(), "moat serve exited: {}", std::fs::read_to_string(log).unwrap_or_default());
            TcpStream::connect(("127.0.0.1", port)).is_ok() && home.join("token").exists()
        });
        std::fs::read_to_string(home.join("token")).expect("the token").trim().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the daemon this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// One request for /v1/health on `stream`; the whole answer.
fn health<S: Read + Write>(mut stream: S, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET /v1/health HTTP/1.1\r\nHost: moat\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("sending the request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    text(&answer)
}

#[test]
fn a_home_made_by_the_cli_is_private_from_the_start() {
    let home = OwnHome::new();
    let h = home.path();
    // The CLI makes the home itself (and starts the daemon in it).
    std::fs::remove_dir(h).expect("the empty home can go");
    moat_ok(h, &["ps"]);
    assert_eq!(mode(h), 0o700, "the home");
    assert_eq!(mode(&h.join("daemon.log")), 0o600, "the daemon's log");
    // No group may use the socket unless the operator names one (`moat serve --group`).
    assert_eq!(mode(&h.join("moat.sock")), 0o600, "the socket");
    assert_eq!(open_to_others(h), Vec::<String>::new());
}

#[test]
fn other_users_cannot_read_guest_memory_or_disks() {
    let home = OwnHome::new();
    let h = home.path();
    // A home an older moat (or a person) left open, with something in it.
    chmod(h, 0o755);
    std::fs::write(h.join("notes"), b"the operator's notes").expect("a file in the home");
    chmod(&h.join("notes"), 0o644);

    moat_ok(h, &["run", "-d", "--name", "box", "--memory", "256"]);
    // Repaired at start, and the operator is told what was open.
    assert_eq!((mode(h), mode(&h.join("notes"))), (0o700, 0o600));
    let log = std::fs::read_to_string(h.join("daemon.log")).expect("the daemon's log");
    let warning = log.lines().find(|l| l.contains("private now")).unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(warning.contains(&h.join("notes").display().to_string()), "{warning}");

    // Guest RAM and disks: a template, the sandbox's overlay, a snapshot.
    moat_ok(h, &["snapshot", "box", "--name", "saved"]);
    assert_eq!(open_to_others(h), Vec::<String>::new(), "files under the home others may use");
    // The image, built under the daemon's private umask, still works for the guest's own users.
    let out = moat_ok(
        h,
        &[
            "exec",
            "-u",
            "nobody",
            "box",
            "--",
            "sh",
            "-c",
            "cat /etc/passwd >/dev/null && ls /usr/bin >/dev/null && id -u",
        ],
    );
    assert_eq!(out, "65534\n");
    moat_ok(h, &["rm", "-f", "box"]);
}

#[test]
fn only_a_group_the_operator_names_may_use_the_socket() {
    let home = OwnHome::new();
    let logs = tempfile::tempdir().expect("a temp dir");
    let (h, log) = (home.path(), logs.path().join("serve.log"));
    let refused = moat_in(h).args(["serve", "--accel", "tcg", "--group", "no-such-group"]).output().expect("moat runs");
    assert_ne!(refused.status.code(), Some(0));
    let err = text(&refused.stderr);
    assert!(err.contains("there is no group no-such-group") && err.contains("hint:"), "{err}");

    // `users` (gid 100) is in every Debian's /etc/group.
    let _daemon = Daemon::start(h, &log, &["--accel", "tcg", "--group", "users"]);
    wait_for("the daemon to listen", Duration::from_secs(180), || {
        std::os::unix::net::UnixStream::connect(h.join("moat.sock")).is_ok()
    });
    let sock = std::fs::metadata(h.join("moat.sock")).expect("the socket");
    assert_eq!((sock.mode() & 0o777, sock.gid()), (0o660, 100), "the socket");
    // The group passes through the home to the socket, and can do nothing else in there.
    let dir = std::fs::metadata(h).expect("the home");
    assert_eq!((dir.mode() & 0o777, dir.gid()), (0o710, 100), "the home");
    let socket = h.join("moat.sock").display().to_string();
    let open: Vec<String> = open_to_others(h).into_iter().filter(|p| !p.starts_with(&socket)).collect();
    assert_eq!(open, Vec::<String>::new());
}

#[test]
fn cleartext_tcp_on_a_public_address_is_refused() {
    let home = OwnHome::new();
    let out = moat_in(home.path())
        .args(["serve", "--accel", "tcg", "--tcp", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat serve starts");
    let mut daemon = Daemon(out);
    let started = Instant::now();
    wait_for("moat serve to refuse", Duration::from_secs(60), || daemon.0.try_wait().ok().flatten().is_some());
    assert!(started.elapsed() < Duration::from_secs(10), "the refusal should come before any start-up work");
    let mut stderr = String::new();
    daemon.0.stderr.take().expect("piped").read_to_string(&mut stderr).expect("its stderr");
    assert_ne!(daemon.0.try_wait().ok().flatten().and_then(|s| s.code()), Some(0));
    assert!(
        stderr.contains("clear text") && stderr.contains("--tls-cert") && stderr.contains("--insecure-tcp"),
        "{stderr}"
    );
}

#[test]
fn a_flood_of_idle_tcp_connections_neither_blocks_the_api_nor_stays_open() {
    let home = OwnHome::new();
    let logs = tempfile::tempdir().expect("a temp dir");
    let (h, log) = (home.path(), logs.path().join("serve.log"));
    let port = free_port();
    let mut daemon = Daemon::start(h, &log, &["--accel", "tcg", "--tcp", &format!("127.0.0.1:{port}")]);
    let token = daemon.token_once_listening(h, &log, port);

    // Slowloris: connections that start a request and never finish its headers.
    let flood_started = Instant::now();
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
            s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: moat\r\n").expect("half a request");
            s
        })
        .collect();
    // A client with the token is still served, at once.
    let asked = Instant::now();
    let answer = health(TcpStream::connect(("127.0.0.1", port)).expect("connecting"), Some(&token));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(asked.elapsed() < Duration::from_secs(1), "health took {:?} during the flood", asked.elapsed());
    let stranger = health(TcpStream::connect(("127.0.0.1", port)).expect("connecting"), None);
    assert!(stranger.starts_with("HTTP/1.1 401"), "{stranger}");

    // Every idle connection is closed by the header deadline (10 s after the daemon accepted it),
    // most of them at once.
    let deadline = flood_started + Duration::from_secs(20);
    let mut still_open = Vec::new();
    for (i, mut s) in idle.into_iter().enumerate() {
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            s.set_read_timeout(Some(left)).expect("a read timeout");
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // an error answer before the close
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    still_open.push(i);
                    break;
                }
                Err(_) => break, // reset
            }
        }
    }
    assert!(
        still_open.is_empty(),
        "{} idle connections still open 20 s after the flood, the first: {:?}",
        still_open.len(),
        &still_open[..still_open.len().min(10)]
    );
}

#[test]
fn the_tcp_listener_serves_tls_with_the_operators_certificate() {
    let home = OwnHome::new();
    let files = tempfile::tempdir().expect("a temp dir");
    let (h, log) = (home.path(), files.path().join("serve.log"));
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let (cert, key): (PathBuf, PathBuf) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("writing the key");
    let port = free_port();
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let mut daemon = Daemon::start(
        h,
        &log,
        &["--accel", "tcg", "--tcp", &format!("127.0.0.1:{port}"), "--tls-cert", &cert_arg, "--tls-key", &key_arg],
    );
    let token = daemon.token_once_listening(h, &log, port);

    // A client that trusts the certificate gets the API.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("the certificate is a root");
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().expect("a name"))
        .expect("a TLS client");
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    let answer = health(rustls::Stream::new(&mut conn, &mut tcp), Some(&token));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Clear text gets nothing from a TLS listener.
    let plain = health(TcpStream::connect(("127.0.0.1", port)).expect("connecting"), Some(&token));
    assert!(!plain.contains("200 OK"), "{plain}");
}
