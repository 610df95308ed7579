//! A small QMP client.
//!
//! Hand-written on purpose: the `qapi` crate generates the whole QAPI schema of one QEMU version
//! at build time (a large codegen dependency pinned to a schema we do not control), while moat
//! needs a handful of commands (`qmp_capabilities`, `query-status`, `stop`, `cont`, `quit`,
//! migration) and must bound everything it reads.
//!
//! Replies are matched to commands by an `id` moat attaches, so a command whose future was
//! dropped (a timeout) cannot leave its late reply to be mistaken for the next command's.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP line accepted; QEMU's replies to our commands are far smaller.
pub const MAX_LINE: usize = 1024 * 1024;
/// Events kept for [`Qmp::wait_event`]; the oldest are dropped first.
pub const MAX_EVENTS: usize = 64;

/// Errors of a QMP session.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection (it has probably exited)")]
    Closed,
    #[error("QMP sent a line longer than {MAX_LINE} bytes; the QMP socket is corrupted")]
    LineTooLong,
    #[error("QMP sent invalid JSON")]
    Json(#[from] serde_json::Error),
    #[error("QMP sent an unexpected message: {0}")]
    Unexpected(String),
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

impl moat_hint::Hint for QmpError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            QmpError::Io(_) | QmpError::Closed => {
                Some("QEMU has probably exited; see qemu.log in the run directory".into())
            }
            QmpError::LineTooLong | QmpError::Json(_) | QmpError::Unexpected(_) | QmpError::Command { .. } => None,
        }
    }
}

/// An asynchronous QMP event such as `SHUTDOWN`, `STOP` or `RESUME`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    /// `seconds.microseconds` as QEMU stamped it.
    pub timestamp: Option<f64>,
}

impl QmpEvent {
    fn from_value(v: &Value) -> Option<QmpEvent> {
        let event = v.get("event")?.as_str()?.to_string();
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        let timestamp = v.get("timestamp").and_then(|t| {
            let s = t.get("seconds")?.as_f64()?;
            let us = t.get("microseconds")?.as_f64()?;
            Some(s + us / 1e6)
        });
        Some(QmpEvent { event, data, timestamp })
    }
}

/// A QMP session in command mode.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// The part of a line read so far; kept here so a dropped read loses nothing.
    partial: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    greeting: Value,
}

impl Qmp {
    /// Connect, read the greeting and enter command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Qmp::handshake(crate::jail::connect_vm_socket(path).await?).await
    }

    /// Read the greeting on an open stream and negotiate `qmp_capabilities`.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp, QmpError> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            partial: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
        };
        let greeting = qmp.read_message().await?;
        match greeting.get("QMP") {
            Some(g) => qmp.greeting = g.clone(),
            None => return Err(QmpError::Unexpected(truncated(&greeting))),
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version as the greeting reported it, e.g. `7.2.22`.
    pub fn qemu_version(&self) -> Option<String> {
        let q = self.greeting.get("version")?.get("qemu")?;
        Some(format!("{}.{}.{}", q.get("major")?, q.get("minor")?, q.get("micro")?))
    }

    /// One JSON message. Cancel-safe: bytes already consumed stay in `self.partial`.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(QmpError::Closed);
            }
            let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            if self.partial.len() + chunk.len() > MAX_LINE {
                // The rest of the line is unknown; the session cannot resynchronise reliably.
                self.partial.clear();
                return Err(QmpError::LineTooLong);
            }
            self.partial.extend_from_slice(chunk);
            let n = chunk.len();
            self.reader.consume(n);
            if done {
                let line = std::mem::take(&mut self.partial);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(serde_json::from_slice(&line)?);
            }
        }
    }

    fn buffer_event(&mut self, v: &Value) {
        if let Some(ev) = QmpEvent::from_value(v) {
            tracing::debug!(event = %ev.event, "QMP event");
            if self.events.len() == MAX_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(ev);
        }
    }

    /// Run a command and return its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None).await
    }

    /// Run a command, passing `fd` along with it (SCM_RIGHTS), as `getfd` and `add-fd` expect.
    /// This is how QEMU under `-sandbox spawn=deny` reads and writes migration streams.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        let mut sent = 0;
        if let Some(fd) = fd {
            sent = self.send_with_fd(&line, fd).await?;
        }
        self.writer.write_all(&line[sent..]).await?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                self.buffer_event(&reply);
                continue;
            }
            // A reply to an earlier command whose caller gave up waiting.
            if reply.get("id").is_some_and(|r| r != &json!(id)) {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command { command: command.into(), class: s("class"), desc: s("desc") });
            }
            return Err(QmpError::Unexpected(truncated(&reply)));
        }
    }

    /// Send the start of `bytes` with `fd` attached; how many bytes went (at least one).
    async fn send_with_fd(&mut self, bytes: &[u8], fd: BorrowedFd<'_>) -> Result<usize, QmpError> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let stream: &UnixStream = self.writer.as_ref();
        loop {
            stream.writable().await?;
            let fds = [fd];
            let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            let iov = [std::io::IoSlice::new(bytes)];
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg(stream, &iov, &mut control, SendFlags::NOSIGNAL).map_err(std::io::Error::from)
            }) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Wait for an event by name. Events that arrived earlier (also during commands) count; other
    /// events read meanwhile stay buffered. Wrap in `tokio::time::timeout` to bound the wait.
    pub async fn wait_event(&mut self, name: &str) -> Result<QmpEvent, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e.event == name) {
            return Ok(self.events.remove(i).expect("index from position"));
        }
        loop {
            let msg = self.read_message().await?;
            match QmpEvent::from_value(&msg) {
                Some(ev) if ev.event == name => return Ok(ev),
                Some(_) => self.buffer_event(&msg),
                None => tracing::debug!(msg = %truncated(&msg), "QMP reply without a waiting command"),
            }
        }
    }

    /// Take all buffered events, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }
}

/// A message for an error text, cut so a huge message does not flood logs.
fn truncated(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 512 {
        let mut end = 512;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const GREETING: &[u8] =
        b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\n";

    /// A fake QEMU: sends the greeting, then for each expected command reads one line and writes
    /// the scripted reply (`{id}` is replaced by the command's id). Returns what it received.
    async fn fake(script: Vec<&'static str>) -> (Qmp, tokio::task::JoinHandle<String>) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let mut b = BufReader::new(b);
            b.get_mut().write_all(GREETING).await.unwrap();
            let mut received = String::new();
            for reply in std::iter::once("{\"return\": {}, \"id\": {id}}\n").chain(script) {
                let mut line = String::new();
                b.read_line(&mut line).await.unwrap();
                let cmd: Value = serde_json::from_str(&line).unwrap();
                received.push_str(&line);
                let reply = reply.replace("{id}", &cmd["id"].to_string());
                b.get_mut().write_all(reply.as_bytes()).await.unwrap();
            }
            received
        });
        let qmp = Qmp::handshake(a).await.unwrap();
        (qmp, server)
    }

    #[tokio::test]
    async fn greeting_capabilities_and_a_command() {
        let (mut qmp, server) =
            fake(vec!["{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": {id}}\n"]).await;
        assert_eq!(qmp.qemu_version().as_deref(), Some("7.2.22"));
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        let sent = server.await.unwrap();
        let first: Value = serde_json::from_str(sent.lines().next().unwrap()).unwrap();
        assert_eq!(first["execute"], "qmp_capabilities");
        assert!(sent.contains("\"execute\":\"query-status\""));
    }

    #[tokio::test]
    async fn errors_carry_class_and_description() {
        let (mut qmp, server) =
            fake(vec!["{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}, \"id\": {id}}\n"])
                .await;
        let err = qmp.execute("bogus", Some(json!({"x": 1}))).await.unwrap_err();
        assert!(matches!(&err, QmpError::Command { class, .. } if class == "CommandNotFound"), "{err}");
        assert!(err.to_string().contains("`bogus`") && err.to_string().contains("has not been found"), "{err}");
        assert!(server.await.unwrap().contains("\"arguments\":{\"x\":1}"));
    }

    #[tokio::test]
    async fn events_are_buffered_while_commands_run() {
        let (mut qmp, server) = fake(vec![
            "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 10, \"microseconds\": 500000}}\n\
             {\"event\": \"RESUME\"}\n\
             {\"return\": {}, \"id\": {id}}\n\
             {\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-reset\"}}\n",
        ])
        .await;
        qmp.execute("stop", None).await.unwrap();
        // SHUTDOWN is read from the socket past the buffered RESUME, which stays buffered.
        let shutdown = qmp.wait_event("SHUTDOWN").await.unwrap();
        assert_eq!(shutdown.data["reason"], "guest-reset");
        let stop = qmp.wait_event("STOP").await.unwrap();
        assert_eq!(stop.timestamp, Some(10.5));
        let rest: Vec<String> = qmp.take_events().into_iter().map(|e| e.event).collect();
        assert_eq!(rest, ["RESUME"]);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_event_buffer_is_bounded() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let mut b = BufReader::new(b);
            b.get_mut().write_all(GREETING).await.unwrap();
            let mut line = String::new();
            b.read_line(&mut line).await.unwrap();
            let mut out = String::new();
            for i in 0..MAX_EVENTS + 10 {
                out.push_str(&format!("{{\"event\": \"E{i}\"}}\n"));
            }
            out.push_str("{\"return\": {}, \"id\": 1}\n");
            b.get_mut().write_all(out.as_bytes()).await.unwrap();
            b
        });
        let mut qmp = Qmp::handshake(a).await.unwrap();
        let events = qmp.take_events();
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(events[0].event, "E10", "the oldest events are dropped first");
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn a_late_reply_of_an_abandoned_command_is_skipped() {
        let (mut qmp, server) =
            fake(vec!["{\"return\": {\"stale\": true}, \"id\": 999}\n{\"return\": {\"fresh\": true}, \"id\": {id}}\n"])
                .await;
        let r = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(r["fresh"], true);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn over_long_lines_are_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            let junk = vec![b'x'; MAX_LINE + 10];
            let _ = b.write_all(&junk).await;
            b
        });
        assert!(matches!(Qmp::handshake(a).await, Err(QmpError::LineTooLong)));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_closed_socket_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(matches!(Qmp::handshake(a).await, Err(QmpError::Closed)));
    }

    #[tokio::test]
    async fn a_peer_that_is_not_qmp_is_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"hello\": 1}\n").await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1), b.read_to_end(&mut sink)).await;
        assert!(matches!(Qmp::handshake(a).await, Err(QmpError::Unexpected(_))));
    }
}
