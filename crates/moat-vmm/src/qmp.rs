//! A small typed QMP client.
//!
//! Hand-written on purpose: the QMP crates on crates.io generate the whole QAPI schema of one QEMU
//! version at build time, while moat needs a handful of commands and must bound what it reads.

use std::collections::VecDeque;
use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP line accepted; QEMU's replies to our commands are far smaller.
const MAX_LINE: usize = 1024 * 1024;
/// Events kept for `wait_event`; older ones are dropped.
const MAX_EVENTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP sent a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("QMP sent an unexpected message: {0}")]
    Unexpected(String),
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

/// A QMP session in command mode.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connect, read the greeting and enter command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Qmp::handshake(UnixStream::connect(path).await?).await
    }

    pub async fn handshake(stream: UnixStream) -> Result<Qmp, QmpError> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w, events: VecDeque::new() };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Unexpected(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(QmpError::Closed);
            }
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            if line.len() + chunk.len() > MAX_LINE {
                return Err(QmpError::LineTooLong);
            }
            line.extend_from_slice(chunk);
            let n = chunk.len();
            self.reader.consume(n);
            if done {
                return Ok(serde_json::from_slice(&line)?);
            }
        }
    }

    /// Run a command and return its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command { command: command.into(), class: s("class"), desc: s("desc") });
            }
            return Err(QmpError::Unexpected(reply.to_string()));
        }
    }

    /// Wait for an event by name (events seen during commands count).
    pub async fn wait_event(&mut self, name: &str) -> Result<Value, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i).expect("index from position"));
        }
        loop {
            let msg = self.read_message().await?;
            if msg["event"] == name {
                return Ok(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn fake(script: Vec<&'static str>) -> (Qmp, tokio::task::JoinHandle<String>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            b.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
            let mut received = String::new();
            for reply in script {
                let mut buf = [0u8; 4096];
                let n = b.read(&mut buf).await.unwrap();
                received.push_str(&String::from_utf8_lossy(&buf[..n]));
                b.write_all(reply.as_bytes()).await.unwrap();
            }
            received
        });
        let qmp = Qmp::handshake(a).await.unwrap();
        (qmp, server)
    }

    #[tokio::test]
    async fn commands_errors_and_events() {
        let (mut qmp, server) = fake(vec![
            "{\"return\": {}}\n",
            "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
        ])
        .await;
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "paused");
        let err = qmp.execute("bogus", Some(json!({"x": 1}))).await.unwrap_err();
        assert!(err.to_string().contains("GenericError: nope"), "{err}");
        assert_eq!(qmp.wait_event("STOP").await.unwrap()["event"], "STOP");
        let sent = server.await.unwrap();
        assert!(sent.contains("qmp_capabilities") && sent.contains("\"arguments\":{\"x\":1}"));
    }

    #[tokio::test]
    async fn over_long_lines_are_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let junk = vec![b'x'; MAX_LINE + 10];
            let _ = b.write_all(&junk).await;
        });
        assert!(matches!(Qmp::handshake(a).await, Err(QmpError::LineTooLong)));
    }
}
