//! A daemon client reaching a port in a sandbox without a port forward (`Client::connect_port`,
//! `GET /v1/sandboxes/{reference}/ports/{guest_port}/connect`): the bytes go both ways intact, a
//! closed port and a sandbox without network are clean errors, and nothing listens on the host.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::lab_guest::{exec_in, output_within, random_token, vm_turn};
use common::{daemon_pid, moat_in, text, OwnHome};
use moat_api::ErrorCode;
use moat_client::{Client, ClientError};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// The local addresses of the TCP sockets that process `pid` listens on.
fn tcp_listeners(pid: i32) -> BTreeSet<String> {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors are readable")
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target.strip_prefix("socket:[")?.strip_suffix(']').map(String::from)
        })
        .collect();
    let mut listening = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st … inode (the tenth field); 0A is LISTEN.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                listening.insert(fields[1].to_string());
            }
        }
    }
    listening
}

/// A connection to `port` once the server started in the guest listens (until then the port is
/// "not open", which is the only error worth waiting out).
async fn connect_when_listening(client: &Client, sandbox: &str, port: u16) -> Box<dyn moat_client::Io> {
    let start = Instant::now();
    loop {
        match client.connect_port(sandbox, port).await {
            Ok(stream) => return stream,
            Err(e) if e.to_string().contains("is not open") && start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("connecting to port {port} in {sandbox}: {e}"),
        }
    }
}

/// Everything `stream` sends until it closes, within a minute.
async fn read_all(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut bytes))
        .await
        .expect("the stream ends within a minute")
        .expect("the stream reads without error");
    bytes
}

/// `GET path` over HTTP/1.0 on a fresh connection: (head, body).
async fn http_get(client: &Client, sandbox: &str, port: u16, path: &str) -> (String, Vec<u8>) {
    let mut stream = connect_when_listening(client, sandbox, port).await;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: sandbox\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = read_all(&mut stream).await;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let body = response.split_off(split);
    (text(&response), body)
}

fn refused(result: Result<Box<dyn moat_client::Io>, ClientError>) -> ClientError {
    match result {
        Ok(_) => panic!("the connection was made"),
        Err(e) => e,
    }
}

#[test]
fn a_client_reaches_a_guest_port_through_the_daemon_and_no_host_port_opens() {
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

    moat_ok(&["run", "-d", "--name", "web", "--memory", "256"]);
    let marker = random_token("served-");
    sh("web", &format!("mkdir -p /www && echo {marker} > /www/index.html && head -c 4194304 /dev/urandom > /www/big"));
    let big_sum = sh("web", "sha256sum /www/big | cut -d' ' -f1").trim().to_string();
    moat_ok(&["exec", "-d", "web", "--", "httpd", "-f", "-p", "8080", "-h", "/www"]);
    // An echo server: whatever the client sends comes back, and its end closes the connection.
    moat_ok(&["exec", "-d", "web", "--", "nc", "-l", "-p", "9000", "-e", "cat"]);
    // One that never answers, for a connection held open while the sandbox goes away.
    moat_ok(&["exec", "-d", "web", "--", "nc", "-l", "-p", "9001"]);
    moat_ok(&["run", "-d", "--name", "nonet", "--memory", "256", "--net", "none"]);
    let daemon = daemon_pid(h).expect("the daemon runs");
    let listeners_before = tcp_listeners(daemon);

    let client = Client::new(&moat_daemon::socket_path(h));
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let held = rt.block_on(async {
        // HTTP through the stream: the page, then 4 MiB intact.
        let (head, body) = http_get(&client, "web", 8080, "/").await;
        assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "{head}");
        assert_eq!(text(&body).trim(), marker);
        let (_, big) = http_get(&client, "web", 8080, "/big").await;
        assert_eq!(big.len(), 4 << 20);
        assert_eq!(hex::encode(sha2::Sha256::digest(&big)), big_sum, "the connection corrupts nothing");

        // 1 MiB to the guest and back while both directions run; closing our side ends the echo,
        // which ends the stream.
        let mut echo = connect_when_listening(&client, "web", 9000).await;
        let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let (mut rx, mut tx) = tokio::io::split(&mut echo);
        let write = async {
            tx.write_all(&sent).await.expect("the guest takes the bytes");
            tx.shutdown().await.expect("our side closes");
        };
        let ((), got) = tokio::join!(write, read_all(&mut rx));
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the echo came back changed");

        // Errors before any upgrade, as API errors.
        let started = Instant::now();
        let e = refused(client.connect_port("web", 8081).await);
        assert_eq!(e.code(), Some(ErrorCode::InvalidPhase), "{e}");
        assert!(e.to_string().contains("port 8081 is not open in the sandbox"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "a closed port is refused at once");
        let e = refused(client.connect_port("nonet", 80).await);
        assert_eq!(e.code(), Some(ErrorCode::InvalidPhase), "{e}");
        assert!(e.to_string().contains("no network device"), "{e}");
        assert_eq!(refused(client.connect_port("web", 0).await).code(), Some(ErrorCode::InvalidRequest));
        assert_eq!(refused(client.connect_port("no-such-box", 80).await).code(), Some(ErrorCode::NotFound));
        let (status, body) = client.raw("GET", "/v1/sandboxes/web/ports/8080/connect", Vec::new()).await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("Upgrade: tcp"), "a request that is no upgrade is told what to send: {body}");

        // No forward was made and the daemon listens on nothing new, even with a connection open.
        assert!(client.ports("web").await.expect("the forwards list").is_empty());
        let held = connect_when_listening(&client, "web", 9001).await;
        assert_eq!(tcp_listeners(daemon), listeners_before, "connecting opened a port on the host");
        held
    });
    assert_eq!(moat_ok(&["port-forward", "web"]).trim(), "", "`moat port-forward web` lists nothing");
    // The probe does see the daemon's listeners: a port forward is one.
    moat_ok(&["port-forward", "web", "127.0.0.1:0:8080"]);
    assert_eq!(tcp_listeners(daemon).len(), listeners_before.len() + 1, "a forward listens on the host");

    // The sandbox goes away under an open connection: the stream ends rather than hangs.
    moat_ok(&["rm", "-f", "web"]);
    rt.block_on(async {
        let mut held = held;
        let mut buf = [0u8; 64];
        let ended = tokio::time::timeout(Duration::from_secs(30), held.read(&mut buf)).await;
        assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "the stream to a removed sandbox ends: {ended:?}");
    });
    moat_ok(&["rm", "-f", "nonet"]);
}
