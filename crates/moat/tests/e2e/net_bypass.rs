//! Allowlist mode against a guest that tries to get around it. `api.test` is allowed; `other.test`
//! is not, and the lab answers both on the same address (a shared front end, as on a CDN). Every
//! trick below reaches `other.test` through `api.test`'s address on a policy that only checks
//! what is easy to check; moat must refuse each with a `net.refused` event naming why, before the
//! server sees anything, while allowed traffic on the same connections keeps working.

use crate::common;

use std::time::Duration;

use common::lab_guest::{give_openssl, guest, guest_ok, refusals, vm_turn, wget};
use common::netlab::{Netlab, SERVER_PUBLIC, UDP_PORT};

/// A TLS ClientHello for `name` (none: without the server name extension), as a client sends it.
fn client_hello(name: Option<&str>) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.enable_sni = name.is_some();
    let server = name.unwrap_or("api.test").to_string().try_into().expect("a valid name");
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).expect("a client starts");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("the hello is written to a Vec");
    hello
}

/// A ClientHello of `len` bytes, in TLS records of at most 16 KiB: longer than moat reads.
fn huge_client_hello(len: usize) -> Vec<u8> {
    let mut message = vec![1u8, (len >> 16) as u8, (len >> 8) as u8, len as u8];
    message.extend(std::iter::repeat_n(0x41, len));
    let mut out = Vec::new();
    for record in message.chunks(16 * 1024) {
        out.extend_from_slice(&[0x16, 0x03, 0x01, (record.len() >> 8) as u8, record.len() as u8]);
        out.extend_from_slice(record);
    }
    out
}

#[test]
fn allowlist_bypasses_are_refused_and_allowed_traffic_passes() {
    let _turn = vm_turn();
    let lab = Netlab::start();
    let dns = SERVER_PUBLIC.to_string();
    lab.moat_ok(&["run", "-d", "--name", "fence", "--memory", "256", "--dns", &dns, "--net", "allow=api.test"]);
    let files = tempfile::tempdir().expect("a temp dir");
    for (name, bytes) in [("nosni", client_hello(None)), ("huge", huge_client_hello(40 * 1024))] {
        let path = files.path().join(name);
        std::fs::write(&path, bytes).expect("the temp dir is writable");
        lab.moat_ok(&["cp", &path.display().to_string(), &format!("fence:/tmp/{name}")]);
    }
    let other_sni = files.path().join("othersni");
    std::fs::write(&other_sni, client_hello(Some("other.test"))).expect("the temp dir is writable");
    lab.moat_ok(&["cp", &other_sni.display().to_string(), "fence:/tmp/othersni"]);
    // The guest pins api.test's address through moat's DNS, as a client would.
    assert!(guest_ok(&lab, "fence", "nslookup api.test").contains(&dns));
    let before = lab.observed.connections_to(SERVER_PUBLIC);

    // Every attempt at once (each keeps its connection open a few seconds so the answer can come
    // back), then the lab's view of what arrived.
    let attempts: &[(&str, &str)] = &[
        ("late", r"(sleep 3; printf 'GET /late HTTP/1.1\r\nHost: other.test\r\n\r\n'; sleep 3) | nc api.test 80"),
        ("crlf", r"(printf '\r\nGET /crlf HTTP/1.1\r\nHost: other.test\r\n\r\n'; sleep 3) | nc api.test 80"),
        (
            "absolute",
            r"(printf 'GET http://other.test/absolute HTTP/1.1\r\nHost: api.test\r\n\r\n'; sleep 3) | nc api.test 80",
        ),
        (
            "connect",
            r"(printf 'CONNECT api.test:80 HTTP/1.1\r\nHost: api.test\r\n\r\nGET /tunnel HTTP/1.1\r\nHost: other.test\r\n\r\n'; sleep 3) | nc api.test 80",
        ),
        ("h2c", r"(printf 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'; sleep 3) | nc api.test 80"),
        (
            "upgrade",
            r"(printf 'GET /upgrade HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n'; sleep 3) | nc api.test 80",
        ),
        ("nosni", "(cat /tmp/nosni; sleep 3) | nc api.test 443"),
        ("othersni", "(cat /tmp/othersni; sleep 3) | nc api.test 443"),
        ("huge", "(cat /tmp/huge; sleep 3) | nc api.test 443"),
        ("silent", "sleep 14 | nc api.test 80"),
        ("udp", &format!("tftp -g -r probe -l /dev/null api.test {UDP_PORT}")),
    ];
    let script: String = attempts
        .iter()
        .map(|(name, cmd)| format!("( timeout 20 sh -c \"{}\" > /tmp/{name}.out 2>&1 ) &\n", cmd.replace('"', "\\\"")))
        .chain(["wait\n".to_string()])
        .collect();
    let ran = guest(&lab, "fence", &script);
    assert!(ran.code.is_some(), "the attempts ran:\n{ran}");

    let seen: Vec<String> = lab.observed.requests().iter().map(|r| r.request_line.clone()).collect();
    assert!(
        lab.observed.connections_to(SERVER_PUBLIC) == before,
        "the server saw connections from refused attempts; requests it read: {seen:?}"
    );
    assert_eq!(lab.observed.datagrams_to(SERVER_PUBLIC), 0, "UDP to an allowed name's address went through");
    // What each attempt is refused for, as the events say it.
    let reasons: &[(&str, &[&str])] = &[
        ("late/crlf: another Host", &["other.test", "not on the allowlist"]),
        ("absolute-form naming another host", &["absolute", "other.test"]),
        ("CONNECT", &["CONNECT"]),
        ("h2c prior knowledge", &["other than HTTP/1"]),
        ("upgrade to h2c", &["h2c"]),
        ("TLS without SNI", &["no server name"]),
        ("TLS with another SNI", &["other.test", "not on the allowlist"]),
        ("an oversized ClientHello", &["longer than"]),
        ("a client that sends nothing", &["sent nothing"]),
        ("UDP", &["udp", &format!("{UDP_PORT}")]),
    ];
    let events = refusals(&lab, "fence");
    for (what, needles) in reasons {
        assert!(
            events.iter().any(|e| needles.iter().all(|n| e.contains(n))),
            "no net.refused event for {what} (mentioning {needles:?}); events:\n{}",
            events.join("\n")
        );
    }
    // The guest got an answer saying why for the HTTP ones, not a silent hang.
    let late = guest_ok(&lab, "fence", "cat /tmp/late.out");
    assert!(late.contains("403") && late.contains("other.test"), "{late}");

    // Allowed traffic on the same paths: a keep-alive connection whose second request names
    // another host gets its first answered and its second refused.
    let pipelined = guest(
        &lab,
        "fence",
        r"(printf 'GET /first HTTP/1.1\r\nHost: api.test\r\n\r\nGET /pipelined HTTP/1.1\r\nHost: other.test\r\n\r\n'; sleep 3) | timeout 20 nc api.test 80",
    );
    assert!(pipelined.stdout.contains("GET /first"), "{pipelined}");
    assert!(lab.observed.requests_to("/pipelined").is_empty(), "the pipelined request for other.test arrived");
    let keep = guest(
        &lab,
        "fence",
        r"(printf 'GET /one HTTP/1.1\r\nHost: api.test\r\n\r\nGET /two HTTP/1.1\r\nHost: API.test:80\r\nConnection: close\r\n\r\n'; sleep 3) | timeout 20 nc api.test 80",
    );
    assert!(keep.stdout.contains("GET /one") && keep.stdout.contains("GET /two"), "{keep}");
    let plain = wget(&lab, "fence", "http://api.test/plain");
    assert!(plain.ok() && plain.stdout.contains("GET /plain"), "{plain}");
    give_openssl(&lab, "fence");
    let tls = guest(&lab, "fence", "timeout 30 wget --no-check-certificate -q -O - https://api.test/tls");
    assert!(tls.ok() && tls.stdout.contains("GET /tls"), "{tls}");
    lab.moat_ok(&["rm", "-f", "fence"]);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon runs");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("/proc/PID/status has VmRSS");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS is a number of kB")
}

/// Legitimate requests and bypass attempts, interleaved, for `MOAT_SOAK_SECS` seconds (60 unless
/// set; the issue's 10-minute soak is `MOAT_SOAK_SECS=600`): every legitimate request passes,
/// no attempt reaches the server, and the daemon's memory stays within a bound once warm.
#[test]
fn soak_of_bypass_attempts_and_legitimate_traffic() {
    /// Most the daemon's resident memory may grow between the end of the warm-up and the end.
    const GROWTH_KIB: u64 = 16 * 1024;
    let secs: u64 = std::env::var("MOAT_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let _turn = vm_turn();
    let lab = Netlab::start();
    let dns = SERVER_PUBLIC.to_string();
    lab.moat_ok(&["run", "-d", "--name", "soak", "--memory", "256", "--dns", &dns, "--net", "allow=api.test"]);
    let files = tempfile::tempdir().expect("a temp dir");
    let nosni = files.path().join("nosni");
    std::fs::write(&nosni, client_hello(None)).expect("the temp dir is writable");
    lab.moat_ok(&["cp", &nosni.display().to_string(), "soak:/tmp/nosni"]);
    let pid = common::daemon_pid(lab.home.path()).expect("the lab daemon runs");

    let script = format!(
        r#"end=$(( $(cut -d. -f1 /proc/uptime) + {secs} )); ok=0; bad=0; n=0
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
  n=$((n+1))
  if wget -q -O - "http://api.test/legit-$n" | grep -q "GET /legit-$n"; then ok=$((ok+1)); else bad=$((bad+1)); fi
  printf 'GET /ok HTTP/1.1\r\nHost: api.test\r\n\r\nGET /bypass-pipelined HTTP/1.1\r\nHost: other.test\r\n\r\n' | timeout 5 nc api.test 80 >/dev/null 2>&1
  printf '\r\nGET /bypass-crlf HTTP/1.1\r\nHost: other.test\r\n\r\n' | timeout 5 nc api.test 80 >/dev/null 2>&1
  timeout 5 nc api.test 443 < /tmp/nosni >/dev/null 2>&1
  tftp -g -r probe -l /dev/null api.test {UDP_PORT} >/dev/null 2>&1 &
done
wait; echo "ok=$ok bad=$bad""#
    );
    let runner = {
        let cmd = lab.moat();
        std::thread::spawn(move || {
            common::lab_guest::exec_within(cmd, "soak", &script, Duration::from_secs(secs + 120))
        })
    };
    // Warm-up: the first tenth of the run (at least 10 s) fills the stack's pools and tables.
    std::thread::sleep(Duration::from_secs((secs / 10).max(10)));
    let warm = rss_kib(pid);
    let mut peak = warm;
    while !runner.is_finished() {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_secs(2));
    }
    let ran = runner.join().expect("the guest loop's thread");
    let end = rss_kib(pid);
    println!("soak of {secs}s: {} daemon RSS {warm} KiB once warm, peak {peak} KiB, end {end} KiB", ran.stdout.trim());
    let counts: Vec<u64> =
        ran.stdout.trim().split(' ').filter_map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok())).collect();
    assert!(matches!(counts[..], [ok, 0] if ok > 0), "legitimate requests failed in the soak:\n{ran}");
    let bypassed: Vec<String> = lab
        .observed
        .requests()
        .iter()
        .filter(|r| r.path().contains("bypass") || r.header("Host").is_some_and(|h| h.contains("other.test")))
        .map(|r| r.request_line.clone())
        .collect();
    assert!(bypassed.is_empty(), "bypass attempts reached the server: {bypassed:?}");
    assert_eq!(lab.observed.datagrams_to(SERVER_PUBLIC), 0, "UDP reached the server");
    assert!(
        peak.saturating_sub(warm) <= GROWTH_KIB,
        "the daemon grew from {warm} KiB to {peak} KiB during the soak (bound: {GROWTH_KIB} KiB)"
    );
    lab.moat_ok(&["rm", "-f", "soak"]);
}
