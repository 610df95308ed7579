//! What the daemon keeps of a guest stream's stderr (file contents, archives, watches and the
//! daemon's own reads and writes of guest files): the agent writes one sentence there when a
//! stream fails.

/// Most bytes of a stream's stderr the daemon keeps. A compromised agent could write without
/// end, and credit alone would not stop it, since draining the buffer grants more.
const STDERR_TAIL: usize = 64 * 1024;

/// The last [`STDERR_TAIL`] bytes of a guest stream's stderr: the agent's reason, in bounded
/// memory whatever the guest sends.
#[derive(Default)]
pub(crate) struct StderrTail(Vec<u8>);

impl StderrTail {
    pub(crate) fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(STDERR_TAIL)..];
        let excess = (self.0.len() + data.len()).saturating_sub(STDERR_TAIL);
        self.0.drain(..excess);
        self.0.extend_from_slice(data);
    }

    /// As text for an error message.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compromised agent may send endless stderr; the daemon keeps the end of it, bounded.
    #[test]
    fn stderr_tails_stay_bounded() {
        let mut tail = StderrTail::default();
        let chunk = vec![b'x'; moat_proto::MAX_CHUNK];
        for _ in 0..(200 << 20) / chunk.len() {
            tail.push(&chunk);
            assert!(tail.0.len() <= STDERR_TAIL);
        }
        assert!(tail.0.capacity() <= 2 * STDERR_TAIL, "{}", tail.0.capacity());
        tail.push(&vec![b'y'; 3 * STDERR_TAIL]);
        tail.push(b"the reason.");
        let text = tail.text();
        assert_eq!(text.len(), STDERR_TAIL);
        assert!(text.starts_with('y') && text.ends_with("the reason."));
        let mut short = StderrTail::default();
        short.push(b"  /x is a FIFO, not a regular file.\n");
        assert_eq!(short.text(), "/x is a FIFO, not a regular file.");
    }
}
