//! Connect RPC with the JSON codec, as the E2B SDKs speak it
//! (<https://connectrpc.com/docs/protocol>): unary calls are a JSON body answered with JSON;
//! streams are envelopes, `flags: u8 | length: u32 BE | JSON`, ending with an end-stream
//! envelope (flag `0x02`) that carries the error, if any.
//!
//! Written here rather than taken from a crate: the Rust Connect implementations generate code
//! from `.proto` files with a protobuf toolchain and bring their own server stack, while envd's
//! few messages are plain serde structs over axum, and this is the whole wire format.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Code, Failure};

/// The largest message the front accepts, unary or in a stream (stdin chunks are the big ones).
pub(crate) const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// An envelope's header: flags and the big-endian length.
const HEADER: usize = 5;
/// Flag of a compressed envelope: the front never negotiates compression.
const FLAG_COMPRESSED: u8 = 0x01;
/// Flag of the end-stream envelope.
const FLAG_END: u8 = 0x02;
/// How long a stream may stay silent before a keepalive message, when the client names no
/// interval (envd's default).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// A failure said the Connect way: as a unary error answer (its HTTP status and
/// `{"code": "...", "message": ...}`).
#[derive(Debug)]
pub(crate) struct RpcError(pub Failure);

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        self.0.connect_response()
    }
}

impl<E: Into<Failure>> From<E> for RpcError {
    fn from(e: E) -> RpcError {
        RpcError(e.into())
    }
}

pub(crate) type RpcResult<T> = Result<axum::Json<T>, RpcError>;

/// A unary call's request message.
pub(crate) struct Unary<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Unary<T> {
    type Rejection = RpcError;

    async fn from_request(req: Request, _: &S) -> Result<Self, RpcError> {
        let content_type = content_type(req.headers());
        if content_type != "application/json" {
            return Err(wrong_content_type(&content_type, "application/json"));
        }
        let bytes = read_bounded(req.into_body(), MAX_MESSAGE_BYTES).await?;
        Ok(Unary(parse(&bytes)?))
    }
}

/// A server-streaming call's request: its one message, the deadline the client set
/// (`Connect-Timeout-Ms`) and how often it wants a keepalive (`Keepalive-Ping-Interval`).
pub(crate) struct StreamRequest<T> {
    pub message: T,
    pub deadline: Option<Duration>,
    pub keepalive: Duration,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for StreamRequest<T> {
    type Rejection = RpcError;

    async fn from_request(req: Request, _: &S) -> Result<Self, RpcError> {
        let (deadline, keepalive) = (deadline(req.headers())?, keepalive(req.headers()));
        // The whole body, not just its first envelope: a connection closed with request bytes
        // unread is reset, and the reset can destroy response bytes the client has not read.
        let (parts, body) = req.into_parts();
        let body = read_bounded(body, MAX_MESSAGE_BYTES + 2 * HEADER + 2).await?;
        let mut envelopes = Envelopes::from_request(Request::from_parts(parts, Body::from(body)))?;
        let message = match envelopes.next().await {
            Some(m) => m?,
            None => return Err(RpcError(Failure::invalid("the stream carried no request message"))),
        };
        Ok(StreamRequest { message, deadline, keepalive })
    }
}

/// The `Connect-Timeout-Ms` of a request: its whole deadline.
pub(crate) fn deadline(headers: &HeaderMap) -> Result<Option<Duration>, Failure> {
    let Some(v) = headers.get("connect-timeout-ms") else { return Ok(None) };
    let ms: u64 = v
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&ms| ms > 0)
        .ok_or_else(|| Failure::invalid("Connect-Timeout-Ms must be a positive number of milliseconds"))?;
    Ok(Some(Duration::from_millis(ms)))
}

/// The `Keepalive-Ping-Interval` (seconds) of a request, within 1 s and 1 h.
fn keepalive(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_KEEPALIVE, |s| Duration::from_secs(s.clamp(1, 3600)))
}

/// The envelopes of a streaming request body, decoded as they arrive (the SDK streams client
/// messages with chunked encoding).
pub(crate) struct Envelopes {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    ended: bool,
}

impl Envelopes {
    /// The request's envelopes; its content type must be Connect's streaming JSON.
    pub(crate) fn from_request(req: Request) -> Result<Envelopes, RpcError> {
        let content_type = content_type(req.headers());
        if content_type != "application/connect+json" {
            return Err(wrong_content_type(&content_type, "application/connect+json"));
        }
        Ok(Envelopes { body: req.into_body().into_data_stream(), buf: Vec::new(), ended: false })
    }

    /// The next message; `None` at the end of the body or at an end-stream envelope.
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Option<Result<T, Failure>> {
        loop {
            if self.ended {
                return None;
            }
            match decode_frame(&self.buf, MAX_MESSAGE_BYTES) {
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
                Ok(Some(frame)) => {
                    let parsed = if frame.flags & FLAG_END != 0 {
                        self.ended = true;
                        None
                    } else {
                        Some(parse(frame.payload))
                    };
                    let used = frame.len;
                    self.buf.drain(..used);
                    match parsed {
                        Some(m) => return Some(m),
                        None => return None,
                    }
                }
                Ok(None) => match self.body.next().await {
                    Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        self.ended = true;
                        return Some(Err(Failure::new(Code::Canceled, format!("reading the request: {e}"))));
                    }
                    None => {
                        self.ended = true;
                        return (!self.buf.is_empty())
                            .then(|| Err(Failure::invalid("the request ended inside an envelope")));
                    }
                },
            }
        }
    }
}

/// One envelope at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub flags: u8,
    pub payload: &'a [u8],
    /// Header and payload: how much of the buffer the envelope took.
    pub len: usize,
}

/// The envelope at the start of `buf`: `None` until it is all there; an error for a compressed
/// envelope or one longer than `max`, before its payload is waited for.
pub(crate) fn decode_frame(buf: &[u8], max: usize) -> Result<Option<Frame<'_>>, Failure> {
    let Some(header) = buf.get(..HEADER) else { return Ok(None) };
    let flags = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if flags & FLAG_COMPRESSED != 0 {
        return Err(Failure::new(Code::Unimplemented, "compressed messages are not supported: send identity"));
    }
    if len > max {
        return Err(Failure::new(
            Code::ResourceExhausted,
            format!("a message of {len} bytes is over the limit of {max}"),
        ));
    }
    Ok(buf.get(HEADER..HEADER + len).map(|payload| Frame { flags, payload, len: HEADER + len }))
}

/// One envelope's bytes.
pub(crate) fn encode_frame(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.into()
}

/// A server stream's answer: each message as an envelope as it comes, a keepalive message
/// whenever `keepalive.0` passes without one, then the end-stream envelope — with the error of
/// the first `Err`, which also ends the stream.
pub(crate) fn stream_response(
    messages: impl Stream<Item = Result<serde_json::Value, Failure>> + Send + 'static,
    keepalive: (Duration, serde_json::Value),
) -> Response {
    let (interval, ping) = keepalive;
    let ping = serde_json::to_vec(&ping).unwrap_or_default();
    let frames = futures_util::stream::unfold(Some(Box::pin(messages)), move |state| {
        let ping = ping.clone();
        async move {
            let mut messages = state?;
            let next = tokio::time::timeout(interval, messages.next()).await;
            let frame = match next {
                Err(_) => return Some((Ok::<_, std::convert::Infallible>(encode_frame(0, &ping)), Some(messages))),
                Ok(Some(Ok(m))) => encode_frame(0, &serde_json::to_vec(&m).unwrap_or_default()),
                Ok(Some(Err(f))) => {
                    let end = serde_json::json!({ "error": f.connect_json() });
                    return Some((Ok(encode_frame(FLAG_END, &serde_json::to_vec(&end).unwrap_or_default())), None));
                }
                Ok(None) => return Some((Ok(encode_frame(FLAG_END, b"{}")), None)),
            };
            Some((Ok(frame), Some(messages)))
        }
    });
    let mut r = Response::new(Body::from_stream(frames));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/connect+json"));
    r
}

/// A client stream's answer (`StreamInput`): one empty message, then the end of the stream.
pub(crate) fn client_stream_response(result: Result<(), Failure>) -> Response {
    let body = match result {
        Ok(()) => [encode_frame(0, b"{}"), encode_frame(FLAG_END, b"{}")].concat(),
        Err(f) => {
            let end = serde_json::json!({ "error": f.connect_json() });
            encode_frame(FLAG_END, &serde_json::to_vec(&end).unwrap_or_default()).to_vec()
        }
    };
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/connect+json"));
    r
}

/// A message as JSON, for [`stream_response`].
pub(crate) fn json(message: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(message).unwrap_or_default()
}

fn content_type(headers: &HeaderMap) -> String {
    let v = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

fn wrong_content_type(given: &str, wanted: &str) -> RpcError {
    let f = if given.contains("proto") {
        Failure::new(Code::Unimplemented, format!("{given} is not supported: moat speaks Connect with JSON ({wanted})"))
    } else {
        Failure::invalid(format!("content type {given:?}: this call takes {wanted}"))
    };
    RpcError(f)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(bytes).map_err(|e| Failure::invalid(format!("the request message is not valid: {e}")))
}

/// A whole body, refused past `max` bytes without reading further.
pub(crate) async fn read_bounded(body: Body, max: usize) -> Result<Vec<u8>, Failure> {
    let mut body = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Failure::new(Code::Canceled, format!("reading the request: {e}")))?;
        if out.len() + chunk.len() > max {
            return Err(Failure::new(Code::ResourceExhausted, format!("the request is over the limit of {max} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Read what remains of a body and drop it (an answer before the body was read).
#[allow(dead_code)]
pub(crate) async fn drain(body: Body) {
    let _ = body.collect().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_sdk_data_frame_decodes_byte_exact() {
        let frame = encode_frame(0, br#"{"event":{"data":{"stdout":"aGkK"}}}"#);
        assert_eq!(&frame[..5], &[0, 0, 0, 0, 0x24]);
        let f = decode_frame(&frame, 1024).unwrap().unwrap();
        assert_eq!((f.flags, f.len), (0, frame.len()));
        assert_eq!(f.payload, br#"{"event":{"data":{"stdout":"aGkK"}}}"#);
    }

    #[test]
    fn partial_oversized_and_compressed_frames() {
        assert_eq!(decode_frame(&[0, 0, 0], 10), Ok(None));
        assert_eq!(decode_frame(&[0, 0, 0, 0, 3, b'{'], 10), Ok(None));
        assert_eq!(decode_frame(&[0, 0, 0, 1, 0], 10).unwrap_err().code, Code::ResourceExhausted);
        // Refused from the header alone: a client cannot make the front wait for 4 GiB.
        assert_eq!(decode_frame(&[0, 0xff, 0xff, 0xff, 0xff], 10).unwrap_err().code, Code::ResourceExhausted);
        assert_eq!(decode_frame(&[1, 0, 0, 0, 0], 10).unwrap_err().code, Code::Unimplemented);
    }

    async fn envelopes(body: Vec<u8>) -> Vec<Result<serde_json::Value, Code>> {
        let req = Request::builder().header("content-type", "application/connect+json").body(Body::from(body)).unwrap();
        let mut e = Envelopes::from_request(req).unwrap();
        let mut out = Vec::new();
        while let Some(m) = e.next::<serde_json::Value>().await {
            out.push(m.map_err(|f| f.code));
        }
        out
    }

    #[tokio::test]
    async fn request_streams_decode_until_the_end_envelope() {
        let body =
            [encode_frame(0, b"{\"a\":1}"), encode_frame(0, b"{}"), encode_frame(2, b"{}"), encode_frame(0, b"1")]
                .concat();
        assert_eq!(envelopes(body).await, vec![Ok(serde_json::json!({"a":1})), Ok(serde_json::json!({}))]);
        assert_eq!(envelopes(vec![0, 0, 0, 0, 9, b'{']).await, vec![Err(Code::InvalidArgument)]);
        assert_eq!(envelopes(encode_frame(0, b"not json").to_vec()).await, vec![Err(Code::InvalidArgument)]);
    }

    #[tokio::test]
    async fn response_streams_end_with_the_error() {
        let msgs = futures_util::stream::iter(vec![
            Ok(serde_json::json!({"event":{"start":{"pid":1}}})),
            Err(Failure::not_found("gone")),
            Ok(serde_json::json!({"never":true})),
        ]);
        let r = stream_response(msgs, (Duration::from_secs(60), serde_json::json!({})));
        assert_eq!(r.headers()["content-type"], "application/connect+json");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let first = decode_frame(&body, 1024).unwrap().unwrap();
        assert_eq!(first.payload, br#"{"event":{"start":{"pid":1}}}"#);
        let end = decode_frame(&body[first.len..], 1024).unwrap().unwrap();
        assert_eq!(end.flags, FLAG_END);
        assert_eq!(end.payload, br#"{"error":{"code":"not_found","message":"gone"}}"#);
        assert_eq!(first.len + end.len, body.len());
    }

    proptest! {
        // The decoder never panics, never claims more than the buffer, and agrees with the encoder.
        #[test]
        fn decoding_any_bytes_is_safe(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..32) {
            if let Ok(Some(f)) = decode_frame(&buf, max) {
                prop_assert!(f.len <= buf.len() && f.payload.len() <= max);
                prop_assert_eq!(&encode_frame(f.flags, f.payload)[..], &buf[..f.len]);
            }
        }
    }
}
