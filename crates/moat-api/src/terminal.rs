//! Guest text on the operator's terminal. The console, error tails and `last_error` carry bytes
//! a hostile guest chose; a terminal acts on control sequences in them (OSC 52 writes the
//! clipboard, OSC 0 the title, CSI moves the cursor and hides earlier output). Like `journalctl`,
//! moat shows C0 and C1 controls as escapes instead, keeping only `\n`, `\t` and the `\r` of a
//! `\r\n` line end (a serial console ends its lines so).

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every control character except `\n`, `\t` and the `\r` of `\r\n` written as an
/// escape (`\x1b`, `\u{9b}`). Borrowed when there is nothing to escape.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    let mut chars = text.chars().peekable();
    let mut clean = true;
    while let Some(c) = chars.next() {
        if needs_escape(c, chars.peek().copied()) {
            clean = false;
            break;
        }
    }
    if clean {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    escape_into(&mut out, text);
    Cow::Owned(out)
}

/// [`escape_controls`] for a byte stream that arrives in chunks (`moat logs`): a UTF-8 sequence
/// or a `\r\n` split between chunks is held until the next one. Bytes that are not UTF-8 are
/// written as `\xNN`.
#[derive(Debug, Default)]
pub struct ControlEscaper {
    held: Vec<u8>,
}

impl ControlEscaper {
    /// The escaped text of `bytes`, less what must wait for the next chunk.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut input = std::mem::take(&mut self.held);
        input.extend_from_slice(bytes);
        let mut out = String::with_capacity(input.len());
        let mut rest = &input[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    // A final `\r` may be the start of a `\r\n`.
                    let (text, cr) = match text.strip_suffix('\r') {
                        Some(t) => (t, true),
                        None => (text, false),
                    };
                    escape_into(&mut out, text);
                    if cr {
                        self.held.push(b'\r');
                    }
                    return out;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    escape_into(&mut out, std::str::from_utf8(valid).expect("valid_up_to ends valid UTF-8"));
                    match e.error_len() {
                        // An incomplete sequence at the end: the next chunk may complete it.
                        None => {
                            self.held.extend_from_slice(after);
                            return out;
                        }
                        Some(n) => {
                            for b in &after[..n] {
                                let _ = write!(out, "\\x{b:02x}");
                            }
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
    }

    /// What is still held at the end of the stream, escaped.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        for b in std::mem::take(&mut self.held) {
            match b {
                b'\t' | b'\n' => out.push(b as char),
                _ => {
                    let _ = write!(out, "\\x{b:02x}");
                }
            }
        }
        out
    }
}

fn needs_escape(c: char, next: Option<char>) -> bool {
    match c {
        '\n' | '\t' => false,
        '\r' => next != Some('\n'),
        c => c.is_control(),
    }
}

fn escape_into(out: &mut String, text: &str) {
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if !needs_escape(c, chars.peek().copied()) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_escaped_and_line_breaks_kept() {
        let osc52 = "copy\x1b]52;c;ZWNobyBwd25lZA==\x07 clear\x1b[2J\u{9b}31m bell\x07 del\x7f";
        assert_eq!(
            escape_controls(osc52),
            "copy\\x1b]52;c;ZWNobyBwd25lZA==\\x07 clear\\x1b[2J\\u{9b}31m bell\\x07 del\\x7f"
        );
        assert!(matches!(escape_controls("a\tb\r\nc\nd é"), Cow::Borrowed("a\tb\r\nc\nd é")));
        // A lone carriage return would let a line overwrite the one before it.
        assert_eq!(escape_controls("ok\rEVIL"), "ok\\x0dEVIL");
        assert_eq!(escape_controls("end\r"), "end\\x0d");
        // Escaping twice changes nothing more: the escapes are printable.
        assert_eq!(escape_controls(&escape_controls("\x1b[2J")), "\\x1b[2J");
    }

    #[test]
    fn a_stream_is_escaped_across_chunk_boundaries() {
        let input = "é line\r\n\x1b]0;title\x07 \u{9b}2J done\r\n".as_bytes();
        let whole = escape_controls(std::str::from_utf8(input).unwrap()).into_owned();
        // Every split point, including inside `é`, `\u{9b}` (2 bytes each) and `\r\n`.
        for at in 0..=input.len() {
            let mut e = ControlEscaper::default();
            let mut out = e.push(&input[..at]);
            out += &e.push(&input[at..]);
            out += &e.finish();
            assert_eq!(out, whole, "split at {at}");
        }
        let mut e = ControlEscaper::default();
        let mut out = e.push(b"bad \xff\x9b byte\xc3");
        out += &e.finish();
        assert_eq!(out, "bad \\xff\\x9b byte\\xc3");
        let mut e = ControlEscaper::default();
        assert_eq!(e.push(b"x\r") + &e.push(b"y") + &e.finish(), "x\\x0dy");
    }
}
