//! Plain HTTP in allowlist mode: hyper reads every request of the guest's connection and lets it
//! on only when it names an allowed host, so a keep-alive or pipelined request cannot name
//! another host behind the same address. The connection to the server is made for the first
//! request let through; a refused first request leaves the server untouched.
//!
//! Refused: `CONNECT` (a tunnel to anywhere), upgrades other than WebSocket (h2c would carry
//! requests moat cannot read), a Host missing or given twice, an absolute-form URI naming another
//! host than Host, and anything that is not HTTP/1 at all (h2 prior knowledge included).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BUF_SIZE: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a request may go to host `name`: why not, if not.
type Check = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the gate asks of the stack.
pub(crate) struct Gate {
    /// Where allowed requests go.
    pub upstream: SocketAddrV4,
    pub check: Check,
    /// Records a refusal (a `net.refused` event).
    pub refused: Box<dyn Fn(String) + Send + Sync>,
}

type Body = Either<Incoming, Full<Bytes>>;

/// Serve the guest's connection until either side closes it.
pub(crate) async fn serve<G>(guest: G, gate: Gate) -> io::Result<()>
where
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(State { gate, upstream: tokio::sync::Mutex::new(None), tunnel: Mutex::new(None) });
    let service = {
        let state = state.clone();
        hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(state.forward(req).await) }
        })
    };
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .preserve_header_case(true)
        // A client that sends its requests and then closes its side still gets the answers.
        .half_close(true)
        .serve_connection(TokioIo::new(guest), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        if e.is_parse() || e.is_parse_too_large() {
            (state.gate.refused)(format!(
                "tcp {} refused: the client sent something other than HTTP/1 requests (h2c and other protocols \
                 cannot be checked by name; allow a CIDR for them) (rule allowlist)",
                state.gate.upstream
            ));
        } else {
            tracing::debug!("allowlist gate to {}: {e}", state.gate.upstream);
        }
    }
    let tunnel = state.tunnel.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(tunnel) = tunnel {
        let _ = tunnel.await;
    }
    Ok(())
}

struct State {
    gate: Gate,
    /// The connection to the server, made for the first request let through.
    upstream: tokio::sync::Mutex<Option<(SendRequest<Incoming>, AbortOnDrop)>>,
    /// The byte relay after a WebSocket upgrade.
    tunnel: Mutex<Option<JoinHandle<()>>>,
}

/// Ends the upstream connection's task with the gate.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl State {
    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        if let Err(why) = admit(&req).and_then(|name| (self.gate.check)(&name).map_err(|e| format!("{name}: {e}"))) {
            (self.gate.refused)(format!("http {} refused: {why} (rule allowlist)", self.gate.upstream));
            return answer(StatusCode::FORBIDDEN, format!("moat: refused by the sandbox's allowlist: {why}\n"));
        }
        let guest_upgrade = hyper::upgrade::on(&mut req);
        let mut upstream = self.upstream.lock().await;
        if upstream.as_ref().is_none_or(|(sender, _)| sender.is_closed()) {
            *upstream = match connect(self.gate.upstream).await {
                Ok(connected) => Some(connected),
                Err(e) => {
                    let why = format!("moat: connecting to {} failed: {e}\n", self.gate.upstream);
                    return answer(StatusCode::BAD_GATEWAY, why);
                }
            };
        }
        let sent = match upstream.as_mut() {
            Some((sender, _)) => match sender.ready().await {
                Ok(()) => sender.send_request(req).await,
                Err(e) => Err(e),
            },
            None => return answer(StatusCode::BAD_GATEWAY, "moat: no connection to the server\n".into()),
        };
        drop(upstream);
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => return answer(StatusCode::BAD_GATEWAY, format!("moat: the request failed: {e}\n")),
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let tunnel = tokio::spawn(async move {
                if let (Ok(guest), Ok(upstream)) = (guest_upgrade.await, upstream_upgrade.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(guest), &mut TokioIo::new(upstream)).await;
                }
            });
            *self.tunnel.lock().unwrap_or_else(|e| e.into_inner()) = Some(tunnel);
        }
        resp.map(Either::Left)
    }
}

/// The host a request names, if it may be checked at all: one Host header, the same host in an
/// absolute-form URI, no tunnel, no upgrade but to WebSocket.
fn admit<B>(req: &Request<B>) -> Result<String, String> {
    if req.method() == Method::CONNECT {
        return Err("CONNECT opens a tunnel moat cannot check".into());
    }
    let upgrades: Vec<&[u8]> = req.headers().get_all(UPGRADE).iter().map(HeaderValue::as_bytes).collect();
    let h2c = req.headers().contains_key("http2-settings")
        || upgrades.iter().any(|u| !u.split(|b| *b == b',').all(|p| p.trim_ascii().eq_ignore_ascii_case(b"websocket")));
    if h2c {
        return Err("an upgrade to h2c or another protocol carries requests moat cannot check".into());
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(host), None) => host,
        (None, _) => return Err("a request without a Host header".into()),
        (Some(_), Some(_)) => return Err("a request with more than one Host header".into()),
    };
    let name = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<Authority>().ok())
        .map(|a| normalize(a.host()))
        .ok_or_else(|| "a Host header that is no host name".to_string())?;
    if let Some(absolute) = req.uri().authority() {
        if normalize(absolute.host()) != name {
            return Err(format!("an absolute-form URI naming {} with Host {name}", normalize(absolute.host())));
        }
    }
    Ok(name)
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

async fn connect(to: SocketAddrV4) -> io::Result<(SendRequest<Incoming>, AbortOnDrop)> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("allowlist gate upstream {to}: {e}");
        }
    });
    Ok((sender, AbortOnDrop(task)))
}

/// moat's own answer; the connection closes after it.
fn answer(status: StatusCode, message: String) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(message))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn requests_name_one_host_or_are_refused() {
        assert_eq!(admit(&request("GET", "/", &[("Host", "API.test:80")])), Ok("api.test".into()));
        assert_eq!(admit(&request("GET", "http://api.test./x", &[("Host", "api.test")])), Ok("api.test".into()));
        let refused = [
            request("GET", "/", &[]),
            request("GET", "/", &[("Host", "api.test"), ("Host", "other.test")]),
            request("GET", "http://other.test/x", &[("Host", "api.test")]),
            request("CONNECT", "api.test:443", &[("Host", "api.test")]),
            request("GET", "/", &[("Host", "api.test"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMA")]),
            request("GET", "/", &[("Host", "api.test"), ("Upgrade", "websocket, h2c")]),
            request("GET", "/", &[("Host", "api.test"), ("HTTP2-Settings", "AAMA")]),
            request("GET", "/", &[("Host", "not a host")]),
        ];
        for req in refused {
            assert!(admit(&req).is_err(), "{req:?} admitted");
        }
        assert!(admit(&request("GET", "/", &[("Host", "api.test"), ("Upgrade", "WebSocket")])).is_ok());
    }
}
