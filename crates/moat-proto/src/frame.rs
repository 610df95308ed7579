//! Length-prefixed framing.
//!
//! On the wire a frame is `len: u32 LE | channel: u32 LE | kind: u8 | payload`, where `len` counts
//! the channel, kind and payload bytes. Control payloads are JSON; data payloads are a stream byte
//! followed by raw bytes. Nothing from the peer is trusted: lengths are bounded before allocating and
//! every decode error is a value, never a panic.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::message::{Message, Stream, TtySize};

/// Largest payload a frame may carry. Data chunks are far smaller; this bounds control messages.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// Bytes the agent writes right before its hello frame, so a host that connects in the middle of a
/// stream (stale bytes from an earlier connection) can find the start of the conversation.
pub const SYNC_MARKER: &[u8; 16] = b"\x00\x00MOAT-SYNC-v1\x00\x00";

const HEADER: usize = 4 + 4 + 1;

/// A data frame's bytes before its data: the header and the stream byte.
pub const DATA_HEADER: usize = HEADER + 1;

/// The wire bytes of a data frame of `len` bytes on `channel` up to its data, which the sender
/// writes next as they are: an emulated guest sending a file copies no byte for the framing.
pub fn data_header(channel: u32, stream: Stream, len: usize) -> Result<[u8; DATA_HEADER], FrameError> {
    if 1 + len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(1 + len));
    }
    let mut h = [0u8; DATA_HEADER];
    h[0..4].copy_from_slice(&((4 + 1 + 1 + len) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&channel.to_le_bytes());
    h[8] = kind::DATA;
    h[9] = stream as u8;
    Ok(h)
}

/// A decoded frame: a message and the channel it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: u32,
    pub message: Message,
}

/// Why bytes from the peer could not be turned into a frame. Any of these ends the link.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge(usize),
    #[error("frame is shorter than its header")]
    Truncated,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown stream {0}")]
    UnknownStream(u8),
    #[error("malformed {kind} payload: {reason}")]
    Malformed { kind: &'static str, reason: String },
    /// The I/O error is part of the message, not a separate source.
    #[error("agent link I/O failed: {0}")]
    Io(std::io::Error),
    #[error("agent link closed")]
    Closed,
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> FrameError {
        FrameError::Io(e)
    }
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const STARTED: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const EXIT: u8 = 6;
    pub const DATA: u8 = 7;
    pub const EOF: u8 = 8;
    pub const CREDIT: u8 = 9;
    pub const SIGNAL: u8 = 10;
    pub const CLOSE: u8 = 11;
    pub const RESIZE: u8 = 12;
}

/// Append `value` as JSON; the frame kind, for the caller's match.
fn json_into<T: Serialize>(out: &mut Vec<u8>, kind: u8, value: &T) -> u8 {
    serde_json::to_writer(out, value).expect("protocol types always serialize");
    kind
}

fn from_json<T: DeserializeOwned>(kind: &'static str, payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::Malformed { kind, reason: e.to_string() })
}

fn stream_of(byte: Option<&u8>) -> Result<Stream, FrameError> {
    let b = *byte.ok_or(FrameError::Truncated)?;
    Stream::from_u8(b).ok_or(FrameError::UnknownStream(b))
}

impl Frame {
    pub fn new(channel: u32, message: Message) -> Frame {
        Frame { channel, message }
    }

    /// Serialise to wire bytes; a payload over [`MAX_PAYLOAD`] is [`FrameError::TooLarge`], since
    /// the peer would refuse it and end the link. Data chunks never are: senders split them far
    /// below the limit. JSON messages (a request with a huge environment, a long listing) can be.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if let Message::Data { stream, data } = &self.message {
            let mut out = Vec::with_capacity(DATA_HEADER + data.len());
            out.extend_from_slice(&data_header(self.channel, *stream, data.len())?);
            out.extend_from_slice(data);
            return Ok(out);
        }
        // The payload is written in place after the header.
        let mut out = Vec::with_capacity(HEADER + 64);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.channel.to_le_bytes());
        out.push(0);
        let k = match &self.message {
            Message::Hello(h) => json_into(&mut out, kind::HELLO, h),
            Message::HelloAck(h) => json_into(&mut out, kind::HELLO_ACK, h),
            Message::Request(r) => json_into(&mut out, kind::REQUEST, r),
            Message::Started(s) => json_into(&mut out, kind::STARTED, s),
            Message::Error(e) => json_into(&mut out, kind::ERROR, e),
            Message::Exit(e) => json_into(&mut out, kind::EXIT, e),
            Message::Data { .. } => unreachable!("data frames are encoded above"),
            Message::Eof { stream } => {
                out.push(*stream as u8);
                kind::EOF
            }
            Message::Credit { stream, bytes } => {
                out.push(*stream as u8);
                out.extend_from_slice(&bytes.to_le_bytes());
                kind::CREDIT
            }
            Message::Signal(sig) => {
                out.extend_from_slice(&sig.to_le_bytes());
                kind::SIGNAL
            }
            Message::Close => kind::CLOSE,
            Message::Resize(size) => {
                out.extend_from_slice(&size.rows.to_le_bytes());
                out.extend_from_slice(&size.cols.to_le_bytes());
                kind::RESIZE
            }
        };
        let payload = out.len() - HEADER;
        if payload > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(payload));
        }
        out[8] = k;
        out[0..4].copy_from_slice(&((4 + 1 + payload) as u32).to_le_bytes());
        Ok(out)
    }

    /// Decode the body of one frame (everything after the length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
        if body.len() < HEADER - 4 {
            return Err(FrameError::Truncated);
        }
        let channel = u32::from_le_bytes(body[0..4].try_into().expect("slice of 4 bytes"));
        let k = body[4];
        let p = &body[5..];
        let message = match k {
            kind::HELLO => Message::Hello(from_json("hello", p)?),
            kind::HELLO_ACK => Message::HelloAck(from_json("hello_ack", p)?),
            kind::REQUEST => Message::Request(from_json("request", p)?),
            kind::STARTED => Message::Started(from_json("started", p)?),
            kind::ERROR => Message::Error(from_json("error", p)?),
            kind::EXIT => Message::Exit(from_json("exit", p)?),
            kind::DATA => Message::Data { stream: stream_of(p.first())?, data: p[1..].to_vec() },
            kind::EOF => Message::Eof { stream: stream_of(p.first())? },
            kind::CREDIT => {
                let stream = stream_of(p.first())?;
                let bytes = p
                    .get(1..5)
                    .filter(|_| p.len() == 5)
                    .ok_or(FrameError::Malformed { kind: "credit", reason: "expected 5 bytes".into() })?;
                Message::Credit { stream, bytes: u32::from_le_bytes(bytes.try_into().expect("4 bytes")) }
            }
            kind::SIGNAL => {
                let b: [u8; 4] = p
                    .try_into()
                    .map_err(|_| FrameError::Malformed { kind: "signal", reason: "expected 4 bytes".into() })?;
                Message::Signal(i32::from_le_bytes(b))
            }
            kind::CLOSE => Message::Close,
            kind::RESIZE => {
                let b: [u8; 4] = p
                    .try_into()
                    .map_err(|_| FrameError::Malformed { kind: "resize", reason: "expected 4 bytes".into() })?;
                Message::Resize(TtySize {
                    rows: u16::from_le_bytes([b[0], b[1]]),
                    cols: u16::from_le_bytes([b[2], b[3]]),
                })
            }
            other => return Err(FrameError::UnknownKind(other)),
        };
        Ok(Frame { channel, message })
    }
}

/// Incremental decoder for bytes that arrive in arbitrary pieces.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Append bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Forget everything buffered (the peer went away mid-frame).
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// The next complete frame, if the buffer holds one.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[0..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD + HEADER {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode_body(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        frame.map(Some)
    }
}

/// Read one frame from an async reader.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_PAYLOAD + HEADER {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Frame::decode_body(&body)
}

/// Write one frame to an async writer (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), FrameError> {
    w.write_all(&frame.encode()?).await?;
    Ok(())
}

/// Skip bytes until [`SYNC_MARKER`] has been read, giving up after `limit` bytes.
pub async fn read_until_sync<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<(), FrameError> {
    let mut matched = 0usize;
    let mut seen = 0usize;
    let mut byte = [0u8; 1];
    while matched < SYNC_MARKER.len() {
        if seen >= limit {
            return Err(FrameError::Malformed {
                kind: "sync",
                reason: format!("no sync marker in the first {limit} bytes"),
            });
        }
        if r.read(&mut byte).await? == 0 {
            return Err(FrameError::Closed);
        }
        seen += 1;
        matched = if byte[0] == SYNC_MARKER[matched] {
            matched + 1
        } else if byte[0] == SYNC_MARKER[0] {
            // The marker starts with two zero bytes, so a zero can restart a partial match.
            if matched >= 1 && SYNC_MARKER[..matched].iter().all(|&b| b == 0) {
                matched
            } else {
                1
            }
        } else {
            0
        };
    }
    Ok(())
}
