//! Secrets put into HTTPS requests by interception: real TLS on loopback between a guest-side
//! client that trusts only the sandbox CA, `tls::intercept`, and an upstream server with its own
//! test CA.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Channel, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use moat_net::tls::{self, Ca, Secret, TlsError};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

const HOST: &str = "api.test";
const PLACEHOLDER: &str = "moat_placeholder_K";
const VALUE: &str = "sk-live/42";

/// Fails the test instead of hanging it.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut).await.unwrap_or_else(|_| panic!("{what} did not finish in 10 s"))
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn secrets() -> Vec<Secret> {
    vec![Secret { placeholder: PLACEHOLDER.into(), value: VALUE.into(), in_body: false }]
}

/// What the upstream server was sent.
#[derive(Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// An HTTPS server for `HOST` on loopback, with its own CA, that reports every request and
/// every body chunk as it arrives, and echoes bytes after a 101 to `Upgrade: echo`. Under
/// `/echo` it reflects what it was sent the way careless servers do (see [`reflect`]).
struct Upstream {
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    seen: mpsc::UnboundedReceiver<Seen>,
    chunks: mpsc::UnboundedReceiver<Bytes>,
    /// Lets a reflecting response send the second half of its split body.
    resume: Arc<Notify>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    async fn start() -> Upstream {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![HOST.to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let config = ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (chunks_tx, chunks) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let resume = Arc::new(Notify::new());
        let resumed = resume.clone();
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let (seen_tx, chunks_tx, resumed) = (seen_tx.clone(), chunks_tx.clone(), resumed.clone());
                served.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        record(req, seen_tx.clone(), chunks_tx.clone(), resumed.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream { addr, roots: Arc::new(roots), seen, chunks, resume, connections, task }
    }

    async fn next_seen(&mut self) -> Seen {
        within("the upstream seeing a request", self.seen.recv()).await.expect("the upstream server is running")
    }
}

type RespBody = BoxBody<Bytes, Infallible>;

async fn record(
    mut req: Request<Incoming>,
    seen: mpsc::UnboundedSender<Seen>,
    chunks: mpsc::UnboundedSender<Bytes>,
    resume: Arc<Notify>,
) -> Result<Response<RespBody>, hyper::Error> {
    let upgrade = hyper::upgrade::on(&mut req);
    let (parts, mut body) = req.into_parts();
    let mut whole = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            whole.extend_from_slice(&data);
            let _ = chunks.send(data);
        }
    }
    let echo = parts.headers.get("upgrade").is_some_and(|v| v == "echo");
    let uri = parts.uri.to_string();
    let authorization = parts.headers.get("authorization").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
    let _ = seen.send(Seen {
        method: parts.method.to_string(),
        uri: uri.clone(),
        headers: parts.headers.clone(),
        body: whole.clone(),
    });
    if parts.uri.path().starts_with("/echo") {
        return Ok(reflect(&uri, &parts.headers, resume));
    }
    if parts.uri.path() == "/gzip" {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"\x1f\x8b not really gzip")).boxed());
        resp.headers_mut().insert("content-encoding", HeaderValue::from_static("gzip"));
        return Ok(resp);
    }
    if echo {
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.unwrap());
            // A server that greets a WebSocket with the credentials it was given.
            let _ = io.write_all(&[b"you sent ", &authorization[..], b"\n"].concat()).await;
            let mut buf = [0; 1024];
            while let Ok(n @ 1..) = io.read(&mut buf).await {
                if io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()).boxed());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert("upgrade", HeaderValue::from_static("echo"));
        resp.headers_mut().insert("connection", HeaderValue::from_static("upgrade"));
        return Ok(resp);
    }
    let last = uri == "/last";
    let mut resp = Response::new(Full::new(Bytes::from(format!("upstream got {} body bytes", whole.len()))).boxed());
    resp.headers_mut().insert("alt-svc", HeaderValue::from_static("h3=\":443\""));
    if last {
        resp.headers_mut().insert("connection", HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// A 404 that reflects the request the way real servers do: the URI in `Location` and the body,
/// `Origin` in `Access-Control-Allow-Origin`, the credentials in a cookie and, encoded, in the
/// body; the bare key last, split across two body chunks: the second is sent once
/// `resume` is notified.
fn reflect(uri: &str, headers: &HeaderMap, resume: Arc<Notify>) -> Response<RespBody> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let header = |name| headers.get(name).map(|v| v.as_bytes().to_vec()).unwrap_or_default();
    let authorization = header("authorization");
    let key = authorization.strip_prefix(b"Bearer ").unwrap_or(&authorization).to_vec();
    let json = String::from_utf8_lossy(&key).replace('/', "\\/");
    let first = [
        format!("no page at {uri}\n").as_bytes(),
        format!("auth {}\n", STANDARD.encode(&authorization)).as_bytes(),
        format!("basic {}\n", STANDARD.encode([&b"user:"[..], &key].concat())).as_bytes(),
        format!("key {}\n", URL_SAFE_NO_PAD.encode(&key)).as_bytes(),
        format!("json {{\"key\":\"{json}\"}}\n").as_bytes(),
        b"split ",
        &key[..key.len() / 2],
    ]
    .concat();
    let second = [&key[key.len() / 2..], b"\n"].concat();
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(2);
    tokio::spawn(async move {
        if tx.send_data(Bytes::from(first)).await.is_ok() {
            resume.notified().await;
            let _ = tx.send_data(Bytes::from(second)).await;
        }
    });
    let mut resp = Response::new(body.boxed());
    *resp.status_mut() = StatusCode::NOT_FOUND;
    let mut reflected = |name, value: Vec<u8>| {
        resp.headers_mut().insert(name, HeaderValue::from_bytes(&value).unwrap());
    };
    reflected("location", uri.as_bytes().to_vec());
    reflected("access-control-allow-origin", header("origin"));
    reflected("set-cookie", [&b"last-auth="[..], &key, b"; Secure"].concat());
    resp
}

/// One guest connection to `HOST` going through `tls::intercept` to `upstream`.
struct Guest {
    intercept: Intercept,
    client_end: DuplexStream,
}

impl Guest {
    async fn connect(upstream: &Upstream, ca: Arc<Ca>, secrets: Vec<Secret>) -> Guest {
        let (guest_end, client_end) = tokio::io::duplex(64 * 1024);
        let tcp = TcpStream::connect(upstream.addr).await.unwrap();
        let roots = upstream.roots.clone();
        let intercept = tokio::spawn(async move { tls::intercept(guest_end, HOST, tcp, &ca, roots, &secrets).await });
        Guest { intercept: Intercept(intercept), client_end }
    }

    /// The guest's TLS handshake, trusting only `trusted` (PEM).
    async fn tls(
        self,
        trusted: &str,
    ) -> (Result<tokio_rustls::client::TlsStream<DuplexStream>, std::io::Error>, Intercept) {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(trusted.as_bytes()).unwrap()).unwrap();
        let mut config = ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from(HOST).unwrap();
        let tls = within("the guest's TLS handshake", connector.connect(name, self.client_end)).await;
        (tls, self.intercept)
    }

    /// An HTTP/1.1 client over TLS trusting `trusted`.
    async fn http(self, trusted: &str) -> (SendRequest<ReqBody>, Intercept) {
        let (tls, rest) = self.tls(trusted).await;
        let tls = tls.expect("the guest trusts the sandbox CA's leaf");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "only HTTP/1.1 is offered to the guest");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        (sender, rest)
    }
}

/// The running `tls::intercept`, awaited once the guest is done.
struct Intercept(JoinHandle<Result<(), TlsError>>);

impl Intercept {
    async fn finished(self) -> Result<(), TlsError> {
        within("the intercept returning", self.0).await.expect("the intercept does not panic")
    }
}

type ReqBody = BoxBody<Bytes, Infallible>;

fn get(uri: &str) -> hyper::http::request::Builder {
    Request::get(uri).header("host", HOST)
}

/// A whole response as the guest sees it.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(sender: &mut SendRequest<ReqBody>, req: Request<ReqBody>) -> Answer {
    within("a response", async {
        sender.ready().await.unwrap();
        let (parts, body) = sender.send_request(req).await.unwrap().into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
    })
    .await
}

fn empty() -> ReqBody {
    Empty::new().boxed()
}

#[tokio::test]
async fn the_bound_host_gets_the_real_value_in_uri_and_headers_and_the_body_streams_unchanged() {
    let mut upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let guest = Guest::connect(&upstream, ca.clone(), secrets()).await;
    let (mut http, intercept) = guest.http(ca.cert_pem()).await;

    let req = get(&format!("/v1?key={PLACEHOLDER}"))
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .header("x-other", "moat_placeholder_OTHER")
        .body(empty())
        .unwrap();
    let answer = send(&mut http, req).await;
    assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, "upstream got 0 body bytes"));
    assert_eq!(answer.headers.get("alt-svc"), None, "the guest is not invited to HTTP/3, which would bypass moat");
    let seen = upstream.next_seen().await;
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/v1?key=sk-live%2F42", "the value is percent-encoded in the URI");
    assert_eq!(seen.headers["authorization"], "Bearer sk-live/42");
    assert_eq!(seen.headers["x-other"], "moat_placeholder_OTHER", "a secret not given stays a placeholder");
    assert_eq!(seen.headers["host"], HOST);

    // A second request on the same connection, whose body the upstream must see chunk by chunk:
    // the second chunk is only sent once the first has arrived, so buffering would hang here.
    let (mut body_tx, body) = Channel::<Bytes, Infallible>::new(1);
    let req = Request::post("/v1/upload")
        .header("host", HOST)
        .header("transfer-encoding", "chunked")
        .body(body.boxed())
        .unwrap();
    let response = tokio::spawn(async move {
        let r = send(&mut http, req).await;
        (r, http)
    });
    let first = format!("first chunk with {PLACEHOLDER} in it;");
    body_tx.send_data(Bytes::from(first.clone())).await.unwrap();
    let arrived = within("the first body chunk", upstream.chunks.recv()).await.unwrap();
    assert_eq!(arrived, first.as_bytes());
    body_tx.send_data(Bytes::from_static(b"second chunk")).await.unwrap();
    drop(body_tx);
    let (answer, http) = within("the POST", response).await.unwrap();
    let sent = format!("{first}second chunk");
    assert_eq!((answer.status, answer.body), (StatusCode::OK, format!("upstream got {} body bytes", sent.len())));
    let seen = upstream.next_seen().await;
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body, sent.as_bytes(), "bodies pass untouched, placeholders included");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1, "both requests used one upstream connection");

    drop(http);
    intercept.finished().await.unwrap();
}

/// The ways `VALUE` shows in `text`: as is, percent-encoded, JSON-escaped, or in a word that
/// decodes (base64, standard or URL-safe) to bytes that contain it.
fn leaks(text: &[u8]) -> Vec<String> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::{alphabet, Engine};
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()));
    let mut found: Vec<String> =
        [VALUE, "sk-live%2F42", "sk-live\\/42"].iter().filter(|f| contains(text, f)).map(|f| f.to_string()).collect();
    let lenient = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    let engines =
        [GeneralPurpose::new(&alphabet::STANDARD, lenient), GeneralPurpose::new(&alphabet::URL_SAFE, lenient)];
    let words = text.split(|b| !(b.is_ascii_alphanumeric() || b"+/-_=".contains(b)));
    for word in words.filter(|w| w.len() >= 8) {
        // A word may carry a few bytes of what came before it; every start is tried.
        for start in 0..4.min(word.len()) {
            for engine in &engines {
                if engine.decode(&word[start..]).is_ok_and(|d| contains(&d, VALUE)) {
                    found.push(format!("base64 {}", String::from_utf8_lossy(word)));
                }
            }
        }
    }
    found
}

#[tokio::test]
async fn a_server_reflecting_the_secret_shows_the_guest_only_the_placeholder() {
    let mut upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let (mut http, intercept) = Guest::connect(&upstream, ca.clone(), secrets()).await.http(ca.cert_pem()).await;

    let req = get(&format!("/echo/{PLACEHOLDER}?q={PLACEHOLDER}"))
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .header("origin", format!("https://{PLACEHOLDER}"))
        .header("accept-encoding", "gzip, br")
        .body(empty())
        .unwrap();
    let (parts, mut body) = within("the reflected response", async {
        http.ready().await.unwrap();
        http.send_request(req).await.unwrap().into_parts()
    })
    .await;
    // The key's second half is only sent once the guest has everything before its first half:
    // a value split across two reads must not slip through.
    let mut got = Vec::new();
    while !got.windows(6).any(|w| w == b"split ") {
        let frame = within("the first half of the body", body.frame()).await.expect("more body").unwrap();
        got.extend_from_slice(&frame.into_data().unwrap_or_default());
    }
    upstream.resume.notify_one();
    got.extend_from_slice(&within("the rest of the body", body.collect()).await.unwrap().to_bytes());

    for (name, value) in &parts.headers {
        assert_eq!(leaks(value.as_bytes()), Vec::<String>::new(), "the {name} header leaks the value: {value:?}");
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(leaks(&got), Vec::<String>::new(), "the body leaks the value:\n{text}");
    assert_eq!(parts.status, StatusCode::NOT_FOUND);
    assert_eq!(parts.headers["location"], format!("/echo/{PLACEHOLDER}?q={PLACEHOLDER}"));
    assert_eq!(parts.headers["access-control-allow-origin"], format!("https://{PLACEHOLDER}"));
    assert!(text.contains(&format!("no page at /echo/{PLACEHOLDER}?q={PLACEHOLDER}\n")), "{text}");
    assert!(text.contains(&format!("json {{\"key\":\"{PLACEHOLDER}\"}}\n")), "{text}");
    assert!(text.ends_with(&format!("split {PLACEHOLDER}\n")), "{text}");

    let seen = upstream.next_seen().await;
    assert_eq!(seen.headers["authorization"], format!("Bearer {VALUE}"), "the server got the real value");
    assert_eq!(seen.uri, format!("/echo/{PLACEHOLDER}?q=sk-live%2F42"), "the path is never substituted");
    assert_eq!(seen.headers["accept-encoding"], "identity", "moat asks for bodies it can read");

    drop(http);
    intercept.finished().await.unwrap();
}

#[tokio::test]
async fn a_secret_that_asks_for_it_goes_into_request_bodies() {
    let mut upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let in_body = secrets().into_iter().map(|s| Secret { in_body: true, ..s }).collect();
    let (mut http, intercept) = Guest::connect(&upstream, ca.clone(), in_body).await.http(ca.cert_pem()).await;

    // A small form keeps a Content-Length, of the body with the value in it, percent-encoded.
    let form = format!("client_secret={PLACEHOLDER}&x=1");
    let req = Request::post("/token")
        .header("host", HOST)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", form.len())
        .body(Full::new(Bytes::from(form)).boxed())
        .unwrap();
    assert_eq!(send(&mut http, req).await.status, StatusCode::OK);
    let seen = upstream.next_seen().await;
    assert_eq!(String::from_utf8_lossy(&seen.body), "client_secret=sk-live%2F42&x=1");
    assert_eq!(seen.headers["content-length"], seen.body.len().to_string());

    // A streamed body with the placeholder cut in two by the guest's writes.
    let (mut body_tx, body) = Channel::<Bytes, Infallible>::new(1);
    let req = Request::post("/v1/upload").header("host", HOST).body(body.boxed()).unwrap();
    let response = tokio::spawn(async move { (send(&mut http, req).await, http) });
    body_tx.send_data(Bytes::from(format!("{{\"key\":\"{}", &PLACEHOLDER[..7]))).await.unwrap();
    body_tx.send_data(Bytes::from(format!("{}\"}}", &PLACEHOLDER[7..]))).await.unwrap();
    drop(body_tx);
    let (answer, http) = within("the POST", response).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&upstream.next_seen().await.body), format!("{{\"key\":\"{VALUE}\"}}"));

    drop(http);
    intercept.finished().await.unwrap();
}

#[tokio::test]
async fn a_compressed_answer_from_a_secret_host_is_refused() {
    let mut upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let (mut http, _intercept) = Guest::connect(&upstream, ca.clone(), secrets()).await.http(ca.cert_pem()).await;
    let answer = send(&mut http, get("/gzip").header("accept-encoding", "gzip").body(empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(answer.body.contains("content-encoding gzip"), "{}", answer.body);
    assert_eq!(upstream.next_seen().await.headers["accept-encoding"], "identity");
}

#[tokio::test]
async fn a_request_naming_another_host_is_refused_and_never_reaches_the_upstream() {
    let mut upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let (mut http, _intercept) = Guest::connect(&upstream, ca.clone(), secrets()).await.http(ca.cert_pem()).await;

    let req = Request::get("/steal")
        .header("host", "evil.test")
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .body(empty())
        .unwrap();
    let answer = send(&mut http, req).await;
    assert_eq!(answer.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(answer.body.contains("this connection is for api.test"), "{}", answer.body);
    let req = Request::get("https://evil.test/steal").header("host", HOST).body(empty()).unwrap();
    assert_eq!(send(&mut http, req).await.status, StatusCode::MISDIRECTED_REQUEST);

    assert_eq!(send(&mut http, get("/after").body(empty()).unwrap()).await.status, StatusCode::OK);
    assert_eq!(upstream.next_seen().await.uri, "/after", "the refused requests were not sent on");
}

#[tokio::test]
async fn an_upgraded_connection_relays_bytes_both_ways() {
    let mut upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let (mut http, intercept) = Guest::connect(&upstream, ca.clone(), secrets()).await.http(ca.cert_pem()).await;

    let req = get("/socket")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .body(empty())
        .unwrap();
    let resp = within("the 101", async {
        http.ready().await.unwrap();
        http.send_request(req).await.unwrap()
    })
    .await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(upstream.next_seen().await.headers["authorization"], "Bearer sk-live/42");
    let mut io = TokioIo::new(within("the upgrade", hyper::upgrade::on(resp)).await.unwrap());
    // The greeting keeps its length (a WebSocket frame says how long it is), not the value.
    let mut greeting = vec![0; "you sent Bearer sk-live/42\n".len()];
    within("the greeting", io.read_exact(&mut greeting)).await.unwrap();
    assert_eq!(leaks(&greeting), Vec::<String>::new(), "{:?}", String::from_utf8_lossy(&greeting));
    assert!(greeting.starts_with(b"you sent Bearer ") && greeting.ends_with(b"\n"));
    io.write_all(b"ping").await.unwrap();
    let mut echoed = [0; 4];
    within("the echo", io.read_exact(&mut echoed)).await.unwrap();
    assert_eq!(&echoed, b"ping");

    drop(io);
    drop(http);
    intercept.finished().await.unwrap();
}

#[tokio::test]
async fn the_upstream_closing_ends_the_intercept_after_the_response() {
    let mut upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let (mut http, intercept) = Guest::connect(&upstream, ca.clone(), secrets()).await.http(ca.cert_pem()).await;
    let answer = send(&mut http, get("/last").body(empty()).unwrap()).await;
    assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, "upstream got 0 body bytes"));
    upstream.next_seen().await;
    // The guest keeps its end open; the intercept still returns.
    intercept.finished().await.unwrap();
    drop(http);
}

#[tokio::test]
async fn a_guest_trusting_another_ca_rejects_the_leaf() {
    let upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let other = Ca::generate("other").unwrap();
    let (tls, intercept) = Guest::connect(&upstream, ca, secrets()).await.tls(other.cert_pem()).await;
    let err = tls.expect_err("a leaf from an untrusted CA is rejected");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    let err = intercept.finished().await.expect_err("the intercept reports the failed handshake");
    assert!(matches!(err, TlsError::GuestHandshake { .. }), "{err}");
}

#[tokio::test]
async fn an_upstream_the_host_does_not_trust_gets_no_request() {
    let upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let (guest_end, _client_end) = tokio::io::duplex(64 * 1024);
    let tcp = TcpStream::connect(upstream.addr).await.unwrap();
    let untrusting = Arc::new(RootCertStore::empty());
    let secrets = secrets();
    let intercept =
        Intercept(tokio::spawn(async move { tls::intercept(guest_end, HOST, tcp, &ca, untrusting, &secrets).await }));
    // The guest never starts its handshake: the upstream's failure alone ends the intercept.
    let err = intercept.finished().await.expect_err("an untrusted upstream fails the intercept");
    assert!(matches!(err, TlsError::UpstreamHandshake { .. }), "{err}");
    assert!(err.to_string().contains(HOST), "{err}");
}

#[tokio::test]
async fn garbage_from_the_guest_is_an_error() {
    let upstream = Upstream::start().await;
    let ca = Arc::new(Ca::generate("test").unwrap());
    let mut guest = Guest::connect(&upstream, ca, secrets()).await;
    guest.client_end.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n").await.unwrap();
    let err = guest.intercept.finished().await.expect_err("plain HTTP is not a TLS handshake");
    assert!(matches!(err, TlsError::GuestHandshake { .. }), "{err}");
}

#[tokio::test]
async fn a_ca_restored_from_pem_issues_leaves_the_original_certificate_verifies() {
    let mut upstream = Upstream::start().await;
    let original = Ca::generate("parent").unwrap();
    let restored = Ca::from_pem(original.cert_pem(), original.key_pem()).unwrap();
    assert_eq!((restored.cert_pem(), restored.key_pem()), (original.cert_pem(), original.key_pem()));

    let (mut http, _intercept) =
        Guest::connect(&upstream, Arc::new(restored), secrets()).await.http(original.cert_pem()).await;
    assert_eq!(send(&mut http, get("/").body(empty()).unwrap()).await.status, StatusCode::OK);
    upstream.next_seen().await;

    let stranger = Ca::generate("stranger").unwrap();
    let err = Ca::from_pem(original.cert_pem(), stranger.key_pem()).expect_err("the key must be the certificate's");
    assert!(matches!(err, TlsError::CaMismatch(_)), "{err}");
    let err = Ca::from_pem("not a certificate", original.key_pem()).expect_err("garbage PEM is refused");
    assert!(matches!(err, TlsError::CaLoad { .. }), "{err}");
}

/// `upstream_roots` reads the environment once per process, so this runs itself again in a
/// child process with `SSL_CERT_FILE` pointing at a test CA.
#[test]
fn upstream_roots_honour_ssl_cert_file() {
    const CHILD: &str = "MOAT_TLS_TEST_EXPECTED_ROOT";
    if let Ok(expected) = std::env::var(CHILD) {
        let roots = tls::upstream_roots();
        let expected = CertificateDer::from_pem_slice(expected.as_bytes()).unwrap();
        let mut store = RootCertStore::empty();
        store.add(expected).unwrap();
        assert_eq!(roots.roots, store.roots, "exactly the CA in SSL_CERT_FILE is trusted");
        return;
    }
    let ca = Ca::generate("roots").unwrap();
    let file = std::env::temp_dir().join(format!("moat-tls-test-roots-{}.pem", std::process::id()));
    std::fs::write(&file, ca.cert_pem()).unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "upstream_roots_honour_ssl_cert_file", "--nocapture"])
        .env(CHILD, ca.cert_pem())
        .env("SSL_CERT_FILE", &file)
        .env_remove("SSL_CERT_DIR")
        .status();
    let _ = std::fs::remove_file(&file);
    assert!(status.unwrap().success(), "the child process's check failed");
}
