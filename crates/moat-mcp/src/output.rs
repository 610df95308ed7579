//! Output for a model: the beginning and the end of a stream within a byte limit, with a marker
//! saying how much was left out in between. Memory stays at the limit however much arrives.

use std::collections::VecDeque;

/// One output stream, kept as its first and last `limit / 2` bytes.
#[derive(Debug)]
pub struct HeadTail {
    limit: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl HeadTail {
    pub fn new(limit: usize) -> HeadTail {
        HeadTail { limit, head: Vec::new(), tail: VecDeque::new(), total: 0 }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let head_room = (self.limit - self.limit / 2).saturating_sub(self.head.len());
        let n = head_room.min(data.len());
        self.head.extend_from_slice(&data[..n]);
        data = &data[n..];
        let keep = self.limit / 2;
        if data.len() >= keep {
            self.tail.clear();
            self.tail.extend(&data[data.len() - keep..]);
        } else {
            self.tail.extend(data);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
    }

    /// Bytes that arrived, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn truncated(&self) -> bool {
        self.total > (self.head.len() + self.tail.len()) as u64
    }

    /// The text: head, a marker if bytes were left out, tail. Invalid UTF-8 becomes U+FFFD.
    pub fn render(&self) -> String {
        let mut out = String::from_utf8_lossy(&self.head).into_owned();
        if self.truncated() {
            let omitted = self.total - (self.head.len() + self.tail.len()) as u64;
            out.push_str(&format!(
                "\n[moat: {omitted} bytes of output left out here ({} in all, the limit is {}); redirect the output to a file and read the parts you need]\n",
                self.total, self.limit
            ));
        }
        let (a, b) = self.tail.as_slices();
        out.push_str(&String::from_utf8_lossy(&[a, b].concat()));
        out
    }
}

/// `stdout` and `stderr` as sections of one text; empty streams are left out.
pub fn sections(stdout: &HeadTail, stderr: &HeadTail) -> String {
    let mut out = String::new();
    for (name, stream) in [("stdout", stdout), ("stderr", stderr)] {
        if stream.total() > 0 {
            let text = stream.render();
            out.push_str(&format!("--- {name} ---\n{text}"));
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    if out.is_empty() {
        out.push_str("(no output)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_is_whole() {
        let mut h = HeadTail::new(16);
        h.push(b"hello ");
        h.push(b"world");
        assert_eq!(h.render(), "hello world");
        assert!(!h.truncated());
    }

    #[test]
    fn long_output_keeps_both_ends_with_a_marker() {
        let mut h = HeadTail::new(10);
        for chunk in [&b"0123"[..], b"456789abcdef", b"ghij", b"klmnopqrstuvwxyz"] {
            h.push(chunk);
        }
        let text = h.render();
        assert!(text.starts_with("01234\n[moat: 26 bytes of output left out here (36 in all"), "{text}");
        assert!(text.ends_with("]\nvwxyz"), "{text}");
        assert_eq!(h.total(), 36);
    }

    #[test]
    fn sections_skip_empty_streams() {
        let (mut out, err) = (HeadTail::new(100), HeadTail::new(100));
        assert_eq!(sections(&out, &err), "(no output)\n");
        out.push(b"42");
        assert_eq!(sections(&out, &err), "--- stdout ---\n42\n");
    }
}
