//! The sandbox network, end to end: real VMs behind a daemon that runs in a network namespace of
//! its own (tests/e2e/common/netlab.rs), talking to real HTTP, HTTPS and DNS servers in another
//! namespace. Nothing leaves the machine. The tests need root (namespaces) and `ip` (iproute2).

use crate::common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::lab_guest::{
    assert_refusal_event, assert_refused, exec_in, exec_within, give_openssl, guest, guest_ok, inspect, output_within,
    random_token, vm_turn, wget,
};
use common::netlab::{Netlab, DAEMON_NAT, DAEMON_PUBLIC, SERVER_PRIVATE, SERVER_PUBLIC, UDP_PORT};
use common::{file_contains, log_files, moat_in, text, wait_for, OwnHome};

/// The lab's DNS server, as the daemon's upstream resolver.
const LAB_DNS: &str = "198.51.100.10";

/// The allowlist in `moat net show --json`: the array of strings that holds `marker` (a name only
/// the allowlist has), wherever the document puts it.
fn allowlist(shown: &serde_json::Value, marker: &str) -> Vec<String> {
    fn find(v: &serde_json::Value, marker: &str) -> Option<Vec<String>> {
        match v {
            serde_json::Value::Array(items) if items.iter().any(|i| i == marker) => {
                Some(items.iter().filter_map(|i| i.as_str().map(String::from)).collect())
            }
            serde_json::Value::Array(items) => items.iter().find_map(|i| find(i, marker)),
            serde_json::Value::Object(fields) => fields.values().find_map(|f| find(f, marker)),
            _ => None,
        }
    }
    find(shown, marker).unwrap_or_else(|| panic!("no list holding {marker:?} in `moat net show --json`: {shown}"))
}

fn net_show(lab: &Netlab, sandbox: &str) -> serde_json::Value {
    serde_json::from_str(&lab.moat_ok(&["net", "show", sandbox, "--json"])).expect("`moat net show --json` prints JSON")
}

/// Plain HTTP GET through a TCP connection from this process's namespace; the whole response.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response)?;
    Ok(text(&response))
}

/// `ADDR:PORT -> GUESTPORT` as printed by `moat port-forward`: (host address, guest port).
fn parse_forward(line: &str) -> (SocketAddr, u16) {
    let (host, guest) = line.trim().split_once(" -> ").unwrap_or_else(|| panic!("not `ADDR:PORT -> PORT`: {line:?}"));
    (
        host.parse().unwrap_or_else(|e| panic!("{host:?} in {line:?}: {e}")),
        guest.parse().unwrap_or_else(|e| panic!("{guest:?} in {line:?}: {e}")),
    )
}

#[test]
fn lab_servers_answer_inside_the_lab() {
    let lab = Netlab::without_daemon();

    // Plain HTTP, from the daemon's namespace, on both of the servers' addresses.
    let (public, private, bytes) = lab.in_d(|| {
        (
            http_get(SocketAddr::from((SERVER_PUBLIC, 80)), "/selftest"),
            http_get(SocketAddr::from((SERVER_PRIVATE, 80)), "/selftest-private"),
            http_get(SocketAddr::from((SERVER_PUBLIC, 80)), "/bytes/100000"),
        )
    });
    let public = public.expect("the HTTP server answers on 198.51.100.10 inside D");
    assert!(public.starts_with("HTTP/1.1 200 OK") && public.contains("GET /selftest HTTP/1.0"), "{public}");
    assert!(private.expect("the HTTP server answers on 10.77.0.10").contains("GET /selftest-private"));
    let bytes = bytes.expect("/bytes/N answers");
    let body = bytes.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert_eq!(body.len(), 100_000, "/bytes/100000 serves 100000 bytes");
    let seen = lab.observed.requests_to("/selftest");
    assert_eq!(seen.len(), 1, "the server records what it saw");
    assert_eq!(seen[0].local.ip(), SERVER_PUBLIC);
    assert_eq!(seen[0].peer.ip(), DAEMON_PUBLIC, "D reaches S over the veth pair");
    assert_eq!(lab.observed.connections_to(SERVER_PRIVATE), 1);

    // HTTPS: a client that trusts only the lab's CA verifies the chain for both names.
    let ca_pem = std::fs::read(&lab.ca_pem).expect("the lab wrote its CA");
    for name in ["api.test", "other.test"] {
        let response = lab.in_d(|| https_get(&ca_pem, name, "/tls-selftest"));
        assert!(response.starts_with("HTTP/1.1 200 OK") && response.contains(&format!("Host: {name}")), "{response}");
    }
    let tls: Vec<_> = lab.observed.requests_to("/tls-selftest");
    assert_eq!(tls.len(), 2);
    assert!(tls.iter().all(|r| r.scheme == "https"));
    assert_eq!(tls[0].sni.as_deref(), Some("api.test"));
    assert_eq!(tls[1].sni.as_deref(), Some("other.test"));

    // DNS: the lab's names, a wildcard domain, NXDOMAIN for the rest.
    let answers = lab.in_d(|| {
        ["api.test", "files.test", "x.wild.test", "nope.example"]
            .map(|name| dns_query(SocketAddr::from((SERVER_PUBLIC, 53)), name))
    });
    assert_eq!(answers[0], Ok(vec![SERVER_PUBLIC]));
    assert_eq!(answers[1], Ok(vec![SERVER_PUBLIC]));
    assert_eq!(answers[2], Ok(vec![SERVER_PUBLIC]));
    assert_eq!(answers[3], Err("NXDomain".to_string()));
    assert!(lab.observed.dns_asked("nope.example"));

    // UDP datagrams are counted per address.
    lab.in_d(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.send_to(b"probe", (SERVER_PRIVATE, UDP_PORT)).unwrap();
    });
    wait_for("the private UDP counter", Duration::from_secs(5), || lab.observed.datagrams_to(SERVER_PRIVATE) == 1);
    assert_eq!(lab.observed.datagrams_to(SERVER_PUBLIC), 0);

    // The guests' clients against the lab's servers: busybox wget (plain, and https through
    // `openssl s_client` as in the tests' sandboxes), busybox nslookup, and OpenSSL verifying the
    // lab's certificate through SSL_CERT_FILE, as the daemon's upstream connections will.
    let in_d = |env: &[&str], args: &[&str]| {
        let mut argv = env.to_vec();
        argv.extend_from_slice(args);
        let out = lab.d.exec("env", &argv);
        assert!(out.status.success(), "{args:?} in D: {}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    };
    assert!(in_d(&[], &["busybox", "wget", "-q", "-O", "-", "http://198.51.100.10/bb-plain"])
        .contains("GET /bb-plain HTTP/1.1"));
    let tls =
        in_d(&[], &["busybox", "wget", "--no-check-certificate", "-q", "-O", "-", "https://198.51.100.10/bb-tls"]);
    assert!(tls.contains("GET /bb-tls HTTP/1.1"), "{tls}");
    assert_eq!(lab.observed.requests_to("/bb-tls")[0].scheme, "https");
    assert!(in_d(&[], &["busybox", "nslookup", "api.test", LAB_DNS]).contains("198.51.100.10"));
    let ca_file = format!("SSL_CERT_FILE={}", lab.ca_pem.display());
    let verify = ["openssl", "s_client", "-connect", "198.51.100.10:443", "-servername", "api.test"];
    let verified =
        in_d(&[&ca_file], &[&verify[..], &["-verify_hostname", "api.test", "-verify_return_error"]].concat());
    assert!(verified.contains("Verify return code: 0 (ok)"), "{verified}");
    let untrusted = lab.d.exec("openssl", &[&verify[..], &["-verify_return_error"]].concat());
    assert!(!untrusted.status.success(), "without SSL_CERT_FILE the lab's CA is not trusted");

    // Nothing can leave: no default route in either namespace.
    for ns in [&lab.d, &lab.s] {
        let routes = Command::new("ip").args(["-n", &ns.name, "route", "show", "default"]).output().unwrap();
        assert_eq!(text(&routes.stdout).trim(), "", "{} has no default route", ns.name);
    }

    // The lab takes its namespaces with it.
    let names = [lab.d.name.clone(), lab.s.name.clone()];
    drop(lab);
    let list = text(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout);
    for name in names {
        assert!(!list.contains(&name), "{name} is left after the lab was dropped:\n{list}");
    }
}

/// GET over TLS to 198.51.100.10:443 with server name `name`, trusting only `ca_pem`.
fn https_get(ca_pem: &[u8], name: &str, path: &str) -> String {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("the lab's CA is valid PEM")).expect("the lab's CA is a valid root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect((SERVER_PUBLIC, 443)).await.expect("the HTTPS server accepts");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server_name = ServerName::try_from(name.to_string()).unwrap();
        let mut tls = connector.connect(server_name, tcp).await.expect("the lab's certificate verifies against its CA");
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        text(&response)
    })
}

/// An A query for `name`: the addresses, or the response code's name when it is not NOERROR.
fn dns_query(server: SocketAddr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    socket.send_to(&query.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).expect("the DNS server answers");
    let response = Message::from_vec(&buf[..n]).expect("the answer parses");
    assert_eq!(response.metadata.id, query.metadata.id);
    if response.metadata.response_code != ResponseCode::NoError {
        return Err(format!("{:?}", response.metadata.response_code));
    }
    Ok(response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

#[test]
fn default_egress_reaches_public_addresses_and_refuses_private_loopback_and_host() {
    let _turn = vm_turn();
    let lab = Netlab::start();
    lab.moat_ok(&["run", "-d", "--name", "egress", "--memory", "256", "--dns", LAB_DNS]);

    // The guest's side of the network.
    let config = guest_ok(&lab, "egress", "ip -4 addr show; ip route; cat /etc/resolv.conf");
    assert!(config.contains("10.0.2.15/24"), "guest address 10.0.2.15/24:\n{config}");
    assert!(config.contains("default via 10.0.2.2"), "default route via 10.0.2.2:\n{config}");
    assert!(config.contains("nameserver 10.0.2.3"), "resolv.conf points at 10.0.2.3:\n{config}");
    let gateway = guest_ok(&lab, "egress", "nslookup host.moat.internal");
    assert!(gateway.contains("10.0.2.2"), "host.moat.internal is the gateway:\n{gateway}");
    let net = &inspect(&lab, "egress")["net"];
    assert!(net.is_object(), "`moat inspect --json` has a `net` object: {net}");

    // A public address, by name (through the upstream resolver given with --dns) and by IP.
    let by_name = wget(&lab, "egress", "http://api.test/by-name");
    assert!(by_name.ok() && by_name.stdout.contains("GET /by-name HTTP/1.1"), "{by_name}");
    assert!(by_name.stdout.contains("Host: api.test"), "{by_name}");
    assert!(lab.observed.dns_asked("api.test"), "moat's resolver asked the --dns upstream");
    let seen = lab.observed.requests_to("/by-name");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].peer.ip(), DAEMON_PUBLIC, "the flow leaves from the daemon's host");
    let by_ip = wget(&lab, "egress", "http://198.51.100.10/by-ip");
    assert!(by_ip.ok() && by_ip.stdout.contains("GET /by-ip HTTP/1.1"), "{by_ip}");
    give_openssl(&lab, "egress");
    let tls = guest(&lab, "egress", "timeout 30 wget --no-check-certificate -q -O - https://api.test/tls-default");
    assert!(tls.ok() && tls.stdout.contains("GET /tls-default"), "TLS passes through untouched:\n{tls}");
    assert_eq!(lab.observed.requests_to("/tls-default")[0].sni.as_deref(), Some("api.test"));
    // UDP to a public address is allowed too (tftp sends one datagram and waits for an answer
    // that never comes).
    guest(&lab, "egress", &format!("timeout 3 tftp -g -r probe -l /dev/null 198.51.100.10 {UDP_PORT}"));
    wait_for("a datagram to reach 198.51.100.10", Duration::from_secs(10), || {
        lab.observed.datagrams_to(SERVER_PUBLIC) > 0
    });

    // A private address: refused by moat (the server, which listens there, sees nothing).
    let private = wget(&lab, "egress", "http://10.77.0.10/private");
    assert_refused(&private, "tcp to the private 10.77.0.10");
    assert_eq!(lab.observed.connections_to(SERVER_PRIVATE), 0, "nothing reached 10.77.0.10");
    assert_refusal_event(&lab, "egress", &["10.77.0.10:80"]);
    guest(&lab, "egress", &format!("timeout 3 tftp -g -r probe -l /dev/null 10.77.0.10 {UDP_PORT}"));
    assert_refusal_event(&lab, "egress", &[&format!("10.77.0.10:{UDP_PORT}")]);
    assert_eq!(lab.observed.datagrams_to(SERVER_PRIVATE), 0, "no datagram reached 10.77.0.10");

    // The daemon's own address, with a server listening on it in D.
    let own = lab.listener_in_d(SocketAddr::from((DAEMON_PUBLIC, 0)));
    let port = own.addr.port().to_string();
    let to_host = wget(&lab, "egress", &format!("http://198.51.100.1:{port}/own"));
    assert_refused(&to_host, "tcp to the host's own 198.51.100.1");
    assert_eq!(own.accepted(), 0, "nothing reached the host's own address");
    assert_refusal_event(&lab, "egress", &[&format!("198.51.100.1:{port}")]);
    // Its public address behind NAT, which the daemon was told of (MOAT_HOST_ADDRESSES).
    let via_nat = wget(&lab, "egress", &format!("http://{DAEMON_NAT}/via-nat"));
    assert_refused(&via_nat, "tcp to the host's public address behind NAT");
    assert!(lab.observed.requests_to("/via-nat").is_empty(), "the request to the NAT address arrived");
    assert_refusal_event(&lab, "egress", &[&format!("{DAEMON_NAT}:80"), "host"]);

    // The host's loopback through the gateway: refused unless --allow-cidr 127.0.0.1/32.
    let loopback = lab.listener_in_d(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let lport = loopback.addr.port().to_string();
    let to_loopback = wget(&lab, "egress", &format!("http://10.0.2.2:{lport}/loopback"));
    assert_refused(&to_loopback, "tcp to 10.0.2.2 (the host's loopback)");
    assert_eq!(loopback.accepted(), 0, "nothing reached the host's loopback");
    assert_refusal_event(&lab, "egress", &[&lport, "loopback"]);

    // The cloud metadata address.
    let metadata = wget(&lab, "egress", "http://169.254.169.254/latest/meta-data/");
    assert_refused(&metadata, "tcp to 169.254.169.254");
    assert_refusal_event(&lab, "egress", &["169.254.169.254"]);

    // --add-host and --allow-cidr, in a second sandbox of the same daemon.
    lab.moat_ok(&[
        "run",
        "-d",
        "--name",
        "extra",
        "--memory",
        "256",
        "--dns",
        LAB_DNS,
        "--add-host",
        "alias.lab:198.51.100.10",
        "--add-host",
        "private.lab:10.77.0.10",
        "--allow-cidr",
        "10.77.0.10/32",
        "--allow-cidr",
        "127.0.0.1/32",
    ]);
    let alias = guest_ok(&lab, "extra", "nslookup alias.lab");
    assert!(alias.contains("198.51.100.10"), "--add-host answers alias.lab:\n{alias}");
    let by_alias = wget(&lab, "extra", "http://alias.lab/alias");
    assert!(by_alias.ok() && by_alias.stdout.contains("Host: alias.lab"), "{by_alias}");
    let upstream = lab.observed.dns_questions();
    assert!(
        !upstream.iter().any(|(name, kind)| name == "alias.lab" && kind == "A"),
        "--add-host names are answered by moat, not upstream: {upstream:?}"
    );
    let allowed_private = wget(&lab, "extra", "http://private.lab/allowed-private");
    assert!(allowed_private.ok(), "--allow-cidr 10.77.0.10/32 lets the private address through:\n{allowed_private}");
    assert_eq!(lab.observed.requests_to("/allowed-private")[0].local.ip(), SERVER_PRIVATE);
    let allowed_loopback = wget(&lab, "extra", &format!("http://10.0.2.2:{lport}/"));
    assert!(allowed_loopback.ok() && allowed_loopback.stdout.contains("reached"), "{allowed_loopback}");
    assert_eq!(loopback.accepted(), 1, "--allow-cidr 127.0.0.1/32 reaches the host's loopback");
    let still = wget(&lab, "extra", &format!("http://198.51.100.1:{port}/own"));
    assert_refused(&still, "the host's own address, not in --allow-cidr");
    lab.moat_ok(&["rm", "-f", "extra"]);

    // A port forward of the lab daemon is reachable from inside D.
    guest_ok(&lab, "egress", "mkdir -p /www && echo served-by-egress > /www/index.html");
    lab.moat_ok(&["exec", "-d", "egress", "--", "httpd", "-f", "-p", "8080", "-h", "/www"]);
    let added = lab.moat_ok(&["port-forward", "egress", "0:8080"]);
    let (host, guest_port) = parse_forward(&added);
    assert_eq!(guest_port, 8080);
    let mut served = String::new();
    wait_for("the forward to reach busybox httpd", Duration::from_secs(30), || {
        served = lab.in_d(|| http_get(host, "/")).unwrap_or_default();
        served.contains("served-by-egress")
    });

    // A flood of connections neither crashes nor wedges the stack: 4 loops of 300 requests, then
    // 200 connections held open at once.
    let flood = exec_within(
        lab.moat(),
        "egress",
        "for j in 1 2 3 4; do \
           (ok=0; i=0; while [ $i -lt 300 ]; do \
              wget -q -O /dev/null http://198.51.100.10/flood && ok=$((ok+1)); i=$((i+1)); \
            done; echo $ok > /tmp/flood.$j) & \
         done; wait; cat /tmp/flood.1 /tmp/flood.2 /tmp/flood.3 /tmp/flood.4",
        Duration::from_secs(900),
    );
    assert!(flood.ok(), "the flood's loops:\n{flood}");
    let flood = flood.stdout;
    let succeeded: usize = flood.split_whitespace().map(|n| n.parse::<usize>().expect("a count")).sum();
    let arrived = lab.observed.requests_to("/flood").len();
    assert_eq!(succeeded, 1200, "every one of 1200 sequential connections (4 at a time) succeeds; {arrived} arrived");
    assert_eq!(arrived, 1200);
    let held = guest(
        &lab,
        "egress",
        "i=0; while [ $i -lt 200 ]; do (sleep 8 | nc 198.51.100.10 80 >/dev/null 2>&1 &); i=$((i+1)); done; \
         sleep 2; timeout 30 wget -q -O - http://198.51.100.10/during-hold",
    );
    // Whether a new connection gets through while 200 are open is up to the stack's limits;
    // that it recovers afterwards is not.
    eprintln!("a request while 200 connections were open: exit {:?}", held.code);
    guest_ok(&lab, "egress", "while pidof nc >/dev/null; do sleep 1; done");
    let after = wget(&lab, "egress", "http://api.test/after-flood");
    assert!(after.ok() && after.stdout.contains("GET /after-flood"), "a normal request after the flood:\n{after}");
    lab.assert_daemon_alive();
    assert_eq!(inspect(&lab, "egress")["phase"], "running");
    lab.moat_ok(&["rm", "-f", "egress"]);
}

#[test]
fn allowlist_admits_only_allowed_names_and_changes_live() {
    let _turn = vm_turn();
    let lab = Netlab::start();
    lab.moat_ok(&[
        "run",
        "-d",
        "--name",
        "allow",
        "--memory",
        "256",
        "--dns",
        LAB_DNS,
        "--net",
        "allow=api.test,*.wild.test",
    ]);
    let shown = net_show(&lab, "allow");
    let mut list = allowlist(&shown, "*.wild.test");
    list.sort();
    assert_eq!(list, ["*.wild.test", "api.test"], "{shown}");
    let human = lab.moat_ok(&["net", "show", "allow"]);
    assert!(human.contains("api.test"), "{human}");

    // Allowed names, over HTTP and HTTPS, and names under an allowed wildcard.
    let allowed = wget(&lab, "allow", "http://api.test/allowed");
    assert!(allowed.ok() && allowed.stdout.contains("Host: api.test"), "{allowed}");
    give_openssl(&lab, "allow");
    let allowed_tls =
        guest(&lab, "allow", "timeout 30 wget --no-check-certificate -q -O - https://api.test/allowed-tls");
    assert!(allowed_tls.ok(), "{allowed_tls}");
    assert_eq!(lab.observed.requests_to("/allowed-tls")[0].sni.as_deref(), Some("api.test"));
    let wild = wget(&lab, "allow", "http://deep.wild.test/wild");
    assert!(wild.ok() && wild.stdout.contains("Host: deep.wild.test"), "{wild}");

    // Another name fails at DNS: NXDOMAIN from moat, never asked upstream (a query is a channel
    // out, e.g. `<data>.attacker.example`).
    let lookup = guest(&lab, "allow", "nslookup other.test");
    assert!(!lookup.ok() || lookup.stdout.contains("NXDOMAIN"), "other.test must not resolve:\n{lookup}");
    assert!(!lookup.stdout.contains("198.51.100.10"), "other.test must not resolve:\n{lookup}");
    let other = wget(&lab, "allow", "http://other.test/other");
    assert!(!other.ok() && other.stderr.contains("bad address"), "other.test fails at DNS:\n{other}");
    assert!(lab.observed.requests_to("/other").is_empty());
    assert!(!lab.observed.dns_asked("other.test"), "a query for a name outside the allowlist went upstream");
    assert_refusal_event(&lab, "allow", &["other.test"]);

    // An IP literal is refused, although it is the allowed name's address: the HTTP gate
    // answers 403 since the request names no allowed host.
    let literal = wget(&lab, "allow", "http://198.51.100.10/literal");
    assert!(
        !literal.ok() && literal.stderr.contains("403"),
        "an IP literal in allow mode is refused:
{literal}"
    );
    assert!(lab.observed.requests_to("/literal").is_empty());
    assert_refusal_event(&lab, "allow", &["198.51.100.10"]);

    // The allowed name's address, with another name in the Host header or in the TLS SNI.
    let spoofed =
        guest(&lab, "allow", "timeout 30 wget -q -O - --header 'Host: other.test' http://api.test/spoof-host");
    assert!(!spoofed.ok(), "HTTP Host other.test to api.test's address must be refused:\n{spoofed}");
    assert!(lab.observed.requests_to("/spoof-host").is_empty(), "the request with Host other.test arrived");
    let sni = guest(
        &lab,
        "allow",
        "printf 'GET /spoof-sni HTTP/1.0\\r\\nHost: api.test\\r\\n\\r\\n' \
         | timeout 30 openssl s_client -quiet -connect 198.51.100.10:443 -servername other.test",
    );
    assert!(!sni.stdout.contains("200 OK"), "TLS with SNI other.test to api.test's address must be refused:\n{sni}");
    assert!(lab.observed.requests_to("/spoof-sni").is_empty(), "the request with SNI other.test arrived");
    let good_sni = guest(
        &lab,
        "allow",
        "printf 'GET /good-sni HTTP/1.0\\r\\nHost: api.test\\r\\n\\r\\n' \
         | timeout 30 openssl s_client -quiet -connect 198.51.100.10:443 -servername api.test",
    );
    assert!(good_sni.stdout.contains("GET /good-sni"), "the same with SNI api.test is let through:\n{good_sni}");

    // Live changes, effective for the next query and connection.
    lab.moat_ok(&["net", "allow", "allow", "add", "other.test"]);
    let list = allowlist(&net_show(&lab, "allow"), "*.wild.test");
    assert!(list.contains(&"other.test".to_string()), "{list:?}");
    let added = wget(&lab, "allow", "http://other.test/after-add");
    assert!(added.ok() && added.stdout.contains("Host: other.test"), "other.test is allowed now:\n{added}");
    lab.moat_ok(&["net", "allow", "allow", "rm", "api.test"]);
    let mut list = allowlist(&net_show(&lab, "allow"), "*.wild.test");
    list.sort();
    assert_eq!(list, ["*.wild.test", "other.test"], "api.test was removed");
    let gone = wget(&lab, "allow", "http://api.test/after-rm");
    assert!(!gone.ok(), "api.test is no longer allowed:\n{gone}");
    let spoofed =
        guest(&lab, "allow", "timeout 30 wget -q -O - --header 'Host: api.test' http://other.test/after-rm-host");
    assert!(!spoofed.ok(), "Host api.test on a connection to an allowed address must be refused now:\n{spoofed}");
    assert!(lab.observed.requests_to("/after-rm").is_empty() && lab.observed.requests_to("/after-rm-host").is_empty());
    let still = wget(&lab, "allow", "http://other.test/still-allowed");
    assert!(still.ok(), "{still}");
    lab.moat_ok(&["rm", "-f", "allow"]);
}

#[test]
fn secrets_reach_only_their_hosts_and_never_the_guest() {
    let _turn = vm_turn();
    let lab = Netlab::start();
    let secret = random_token("sk-lab-");
    let placeholder = "moat_placeholder_LAB_TOKEN";
    // Booted, not restored, so the guest's RAM is this sandbox's own file (run/<id>/mem).
    let out = output_within(
        {
            let mut cmd = lab.moat();
            cmd.env("LAB_TOKEN", &secret).args([
                "run",
                "-d",
                "--cold",
                "--name",
                "sec",
                "--memory",
                "256",
                "--dns",
                LAB_DNS,
                "--secret",
                "LAB_TOKEN@api.test",
            ]);
            cmd
        },
        Duration::from_secs(180),
    );
    assert!(out.status.success(), "moat run --secret: {}", text(&out.stderr));

    // The guest holds the placeholder and moat's CA, and every exec is told where the CA is.
    assert_eq!(guest_ok(&lab, "sec", "echo \"$LAB_TOKEN\"").trim(), placeholder);
    let env = guest_ok(&lab, "sec", "env");
    for var in [
        "SSL_CERT_FILE=/etc/moat/ca-bundle.pem",
        "REQUESTS_CA_BUNDLE=/etc/moat/ca-bundle.pem",
        "CURL_CA_BUNDLE=/etc/moat/ca-bundle.pem",
        "NODE_EXTRA_CA_CERTS=/etc/moat/ca.pem",
    ] {
        assert!(env.lines().any(|l| l == var), "{var} in every exec's environment:\n{env}");
    }
    let ca = guest_ok(&lab, "sec", "cat /etc/moat/ca.pem");
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let bundle = guest_ok(&lab, "sec", "cat /etc/moat/ca-bundle.pem");
    assert!(bundle.contains(ca.trim()), "the bundle includes moat's CA");

    // HTTPS to the bound host, verifying moat's certificate through SSL_CERT_FILE: the server
    // sees the real value, in a header and in the request line.
    give_openssl(&lab, "sec");
    let call = guest(
        &lab,
        "sec",
        "timeout 30 wget -q -O - --header \"Authorization: Bearer $LAB_TOKEN\" \"https://api.test/noecho/bound?key=$LAB_TOKEN\"",
    );
    assert!(call.ok() && call.stdout.trim() == "ok", "{call}");
    let seen = lab
        .observed
        .requests()
        .into_iter()
        .find(|r| r.path().starts_with("/noecho/bound"))
        .expect("the request arrived");
    assert_eq!(seen.sni.as_deref(), Some("api.test"));
    assert_eq!(seen.header("Authorization"), Some(format!("Bearer {secret}").as_str()), "{seen:?}");
    assert_eq!(seen.path(), format!("/noecho/bound?key={secret}"), "{seen:?}");

    // A server that reflects what it got (in Location, Set-Cookie, another header and a 404
    // body) gives the guest only the placeholder back, while it saw the real value.
    let reflected = guest(
        &lab,
        "sec",
        "printf 'GET /reflect/page?key=%s HTTP/1.1\\r\\nHost: api.test\\r\\nAuthorization: Bearer %s\\r\\nConnection: close\\r\\n\\r\\n' \
         \"$LAB_TOKEN\" \"$LAB_TOKEN\" | timeout 30 openssl s_client -quiet -connect api.test:443 -servername api.test 2>/dev/null",
    );
    let seen = lab.observed.requests().into_iter().find(|r| r.path().starts_with("/reflect/page")).expect("it arrived");
    assert_eq!(seen.header("Authorization"), Some(format!("Bearer {secret}").as_str()), "{seen:?}");
    assert!(!reflected.stdout.contains(&secret), "the guest saw the secret's value:\n{reflected}");
    for reflection in [
        format!("Location: https://api.test/moved?key={placeholder}"),
        format!("Set-Cookie: last=key={placeholder}"),
        format!("X-Echo-Auth: Bearer {placeholder}"),
        format!("Authorization: Bearer {placeholder}"),
    ] {
        assert!(
            reflected.stdout.to_lowercase().contains(&reflection.to_lowercase()),
            "{reflection:?} in the response:\n{reflected}"
        );
    }

    // HTTPS to another host: the placeholder arrives as it was sent.
    let other = guest(
        &lab,
        "sec",
        "timeout 30 wget --no-check-certificate -q -O - --header \"Authorization: Bearer $LAB_TOKEN\" https://other.test/noecho/unbound",
    );
    assert!(other.ok(), "{other}");
    let seen = lab.observed.requests_to("/noecho/unbound");
    assert_eq!(seen[0].sni.as_deref(), Some("other.test"));
    assert_eq!(seen[0].header("Authorization"), Some(format!("Bearer {placeholder}").as_str()), "{seen:?}");

    // The real value is nowhere in the guest: not in its RAM, not on its disk. Probes the guest
    // leaves in both show that the search would find it if it were there.
    let memory_probe = random_token("memory-probe-");
    let disk_probe = random_token("disk-probe-");
    lab.moat_ok(&["exec", "-d", "sec", "--", "sh", "-c", &format!("p={memory_probe}; sleep 600")]);
    guest_ok(&lab, "sec", &format!("env > /root/env.txt; echo {disk_probe} > /root/probe; sync"));
    let id = inspect(&lab, "sec")["id"].as_str().expect("inspect has the id").to_string();
    let run_dir = lab.home.path().join("run").join(&id);
    let mem = run_dir.join("mem");
    let disk = run_dir.join("root.qcow2");
    assert!(mem.exists() && disk.exists(), "a booted sandbox has {} and {}", mem.display(), disk.display());
    assert!(file_contains(&mem, memory_probe.as_bytes()), "the memory probe is found in {}", mem.display());
    assert!(file_contains(&disk, disk_probe.as_bytes()), "the disk probe is found in {}", disk.display());
    assert!(!file_contains(&mem, secret.as_bytes()), "the secret's value is in the guest's RAM");
    assert!(!file_contains(&disk, secret.as_bytes()), "the secret's value is on the guest's disk");
    // Nor in moat's logs (daemon, QEMU, consoles).
    let logs = log_files(lab.home.path());
    assert!(logs.iter().any(|l| l.ends_with("daemon.log")), "the daemon's log is among {logs:?}");
    for log in logs {
        assert!(!file_contains(&log, secret.as_bytes()), "the secret's value is in {}", log.display());
    }
    lab.moat_ok(&["rm", "-f", "sec"]);
}

#[test]
fn port_forwards_round_trip_and_no_network_has_no_nic() {
    let _turn = vm_turn();
    let home = OwnHome::new();
    let h = home.path();
    let moat_ok = |args: &[&str]| {
        let mut cmd = moat_in(h);
        cmd.args(args);
        let out = output_within(cmd, Duration::from_secs(180));
        assert_eq!(out.status.code(), Some(0), "moat {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let sh = |sandbox: &str, script: &str| {
        let g = exec_in(moat_in(h), sandbox, script);
        assert!(g.ok(), "`{script}` in {sandbox}:\n{g}");
        g.stdout
    };

    moat_ok(&["run", "-d", "--name", "web", "--memory", "256", "-p", "0:8080"]);
    let marker = random_token("served-");
    sh("web", &format!("mkdir -p /www && echo {marker} > /www/index.html && head -c 4194304 /dev/urandom > /www/big"));
    let big_sum = sh("web", "sha256sum /www/big | cut -d' ' -f1").trim().to_string();
    moat_ok(&["exec", "-d", "web", "--", "httpd", "-f", "-p", "8080", "-h", "/www"]);

    // The forward given at creation: on 127.0.0.1, a port picked by moat.
    let listed = moat_ok(&["port-forward", "web"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 1, "{listed}");
    let (first, guest_port) = parse_forward(lines[0]);
    assert_eq!(guest_port, 8080);
    assert_eq!(first.ip(), Ipv4Addr::LOCALHOST, "the default address is 127.0.0.1");
    assert_ne!(first.port(), 0, "a real port was picked");
    wait_for("httpd to answer through the forward", Duration::from_secs(30), || {
        http_get(first, "/").is_ok_and(|r| r.contains(&marker))
    });
    // 4 MiB through the forward, intact.
    let big = fetch_body(first, "/big");
    assert_eq!(big.len(), 4 << 20);
    assert_eq!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&big)), big_sum, "the forward corrupts nothing");

    // One added to the running sandbox, then removed.
    let added = moat_ok(&["port-forward", "web", "127.0.0.1:0:8080"]);
    let (second, guest_port) = parse_forward(&added);
    assert_eq!(guest_port, 8080);
    assert!(second.port() != 0 && second != first, "{added}");
    assert!(http_get(second, "/").expect("the new forward answers").contains(&marker));
    let json: serde_json::Value = serde_json::from_str(&moat_ok(&["port-forward", "web", "--json"]))
        .expect("`moat port-forward --json` prints JSON");
    let forwards = json.as_array().or_else(|| json.as_object().and_then(|o| o.values().find_map(|v| v.as_array())));
    assert_eq!(forwards.map(Vec::len), Some(2), "two forwards in `moat port-forward --json`: {json}");
    assert_eq!(moat_ok(&["port-forward", "web"]).lines().count(), 2);
    let inspected: serde_json::Value = serde_json::from_str(&moat_ok(&["inspect", "web", "--json"])).unwrap();
    assert!(inspected["net"].is_object(), "`moat inspect --json` has a `net` object: {inspected}");
    moat_ok(&["port-forward", "web", "--rm", &second.port().to_string()]);
    let listed = moat_ok(&["port-forward", "web"]);
    assert_eq!(listed.lines().map(|l| parse_forward(l).0).collect::<Vec<_>>(), vec![first], "{listed}");
    wait_for("the removed forward to stop listening", Duration::from_secs(10), || {
        TcpStream::connect_timeout(&second, Duration::from_secs(2)).is_err()
    });
    assert!(http_get(first, "/").expect("the first forward still answers").contains(&marker));

    // --net none: no network device at all, and port forwards fail with the reason.
    moat_ok(&["run", "-d", "--name", "nonet", "--memory", "256", "--net", "none"]);
    assert_eq!(sh("nonet", "ls /sys/class/net").split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let mut cmd = moat_in(h);
    cmd.args(["port-forward", "nonet", "0:80"]);
    let out = output_within(cmd, Duration::from_secs(60));
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "a port forward to a sandbox without network must fail");
    assert!(err.contains("none") || err.contains("no network"), "the error says the sandbox has no network: {err}");
    moat_ok(&["rm", "-f", "web", "nonet"]);
}

/// The body of `GET path` (HTTP/1.0, read to the end).
fn fetch_body(addr: SocketAddr, path: &str) -> Vec<u8> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("the forward accepts");
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(conn, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut response = Vec::new();
    conn.read_to_end(&mut response).expect("the response arrives");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    assert!(response.starts_with(b"HTTP/1.") && response[..split].windows(3).any(|w| w == b"200"));
    response.split_off(split)
}
