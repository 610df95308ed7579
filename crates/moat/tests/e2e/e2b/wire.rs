//! HTTP/1.1 and Connect framing by hand, over a plain `TcpStream`: the requests no SDK would
//! send (truncated envelopes, absurd frame lengths, missing headers), and a reader that turns
//! a server that never answers into a test failure instead of a hang.
#![allow(dead_code)] // Not every test uses every helper.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long any answer may take: the front must answer garbage at once, not wait for more.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// An HTTP response, its body de-chunked.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the reply) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("the body is not JSON ({e}): {self:?}"))
    }

    /// The Connect envelopes of a streaming answer: (flags, message).
    pub fn envelopes(&self) -> Vec<(u8, serde_json::Value)> {
        let mut rest = &self.body[..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            assert!(rest.len() >= 5, "a truncated envelope header at the end of {:?}", self.text());
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            assert!(rest.len() >= 5 + len, "an envelope longer than the body: {:?}", self.text());
            let message = serde_json::from_slice(&rest[5..5 + len])
                .unwrap_or_else(|e| panic!("an envelope that is not JSON ({e}): {:?}", self.text()));
            out.push((rest[0], message));
            rest = &rest[5 + len..];
        }
        out
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} {}",
            self.status,
            self.header("content-type"),
            self.text().chars().take(300).collect::<String>()
        )
    }
}

/// A Connect envelope: flags, big-endian length, message.
pub fn envelope(flags: u8, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// `body` in the chunked transfer coding, as SDKs from 2.35 on send streaming requests.
pub fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(7) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// One request: `headers` as given (plus `Connection: close`, `Host` unless given and, unless
/// the caller set a length or a transfer coding, `Content-Length`), then `body` as is.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    let framed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding"));
    if !framed {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    let mut stream = connect(addr);
    stream.write_all(&raw).expect("the request can be sent");
    read_reply(stream, &format!("{method} {path}"))
}

/// Send `head` (ending with the blank line) and then up to `limit` bytes of `filler` while
/// reading: a server that refuses a body too large answers before it has all of it.
pub fn request_streaming_body(addr: SocketAddr, head: &str, filler: u8, limit: usize) -> Reply {
    let mut stream = connect(addr);
    stream.write_all(head.as_bytes()).expect("the request head can be sent");
    let reader = stream.try_clone().expect("the socket can be cloned");
    let what = head.lines().next().unwrap_or_default().to_string();
    let answer = std::thread::spawn(move || read_reply(reader, &what));
    stream.set_write_timeout(Some(Duration::from_secs(5))).expect("a write timeout can be set");
    let chunk = vec![filler; 64 << 10];
    let mut sent = 0;
    while sent < limit && !answer.is_finished() {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            // The server stopped reading (it answered, or it is not listening): read its answer.
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    match answer.join() {
        Ok(reply) => reply,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the E2B listener at {addr} accepts connections: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout can be set");
    stream
}

/// Read the whole answer (the server closes after it: `Connection: close`). Panics when no
/// complete answer comes within [`ANSWER_WITHIN`].
fn read_reply(mut stream: TcpStream, what: &str) -> Reply {
    let start = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            // A reset after a complete answer is the server closing with our body unread.
            Err(e) if complete(&raw) => {
                eprintln!("{what}: {e} after a complete answer");
                break;
            }
            Err(e) => panic!("{what}: the connection failed before a complete answer ({e}); got {:?}", lossy(&raw)),
        }
        assert!(
            start.elapsed() < ANSWER_WITHIN,
            "{what}: no complete answer within {ANSWER_WITHIN:?} (a hang); got so far: {:?}",
            lossy(&raw)
        );
    }
    parse(&raw).unwrap_or_else(|| panic!("{what}: not an HTTP response: {:?}", lossy(&raw)))
}

fn lossy(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(2000)]).into_owned()
}

fn complete(raw: &[u8]) -> bool {
    parse(raw).is_some()
}

/// Parse a whole response; `None` while it is incomplete or malformed.
fn parse(raw: &[u8]) -> Option<Reply> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().ok()?;
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Some(Reply { status, headers, body })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        if rest.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
