//! The forms in which a secret's value can come back from the server it was sent to: as is,
//! and in the encodings that servers apply to what they echo.

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;

/// A base64 piece shorter than this is not looked for: it would match ordinary text (and
/// replace it) while saying little about a value that short.
const MIN_BASE64_PIECE: usize = 8;

/// The value as is; percent-encoded (upper- and lowercase hex, and `+` for a space as in forms);
/// JSON-escaped (`\/`); and, for base64 in the standard and the URL-safe alphabet, the part of
/// its encoding that does not depend on the bytes around it, at each of the three offsets it can
/// have in the encoded data, so the value is also found inside an encoded `user:value` (Basic
/// auth) or a token. Without repeats.
pub(super) fn reflections(value: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = vec![value.to_vec(), percent_encoded(value, UPPER), percent_encoded(value, LOWER)];
    if value.contains(&b' ') {
        let parts: Vec<Vec<u8>> = value.split(|&b| b == b' ').map(|p| percent_encoded(p, UPPER)).collect();
        forms.push(parts.join(&b'+'));
    }
    forms.push(json_escaped(value));
    for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        for offset in 0..3 {
            let piece = base64_piece(&engine, value, offset);
            if piece.len() >= MIN_BASE64_PIECE {
                forms.push(piece);
            }
        }
    }
    let mut unique = Vec::with_capacity(forms.len());
    for form in forms {
        if !form.is_empty() && !unique.contains(&form) {
            unique.push(form);
        }
    }
    unique
}

const UPPER: &[u8; 16] = b"0123456789ABCDEF";
const LOWER: &[u8; 16] = b"0123456789abcdef";

/// Every byte but the unreserved ones (RFC 3986) as `%XX`, so a `/`, `&` or `+` in a value put
/// into a query keeps its meaning as data.
pub(super) fn percent_encode(value: &[u8]) -> Vec<u8> {
    percent_encoded(value, UPPER)
}

fn percent_encoded(value: &[u8], hex: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 0xf)]]);
        }
    }
    out
}

/// As a JSON encoder that escapes `/` writes it (PHP's does by default).
fn json_escaped(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if matches!(b, b'/' | b'"' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// The base64 characters that only `value`'s bytes decide when it starts `offset` bytes into a
/// 3-byte group: the first characters also carry bits of the bytes before it (two of them at
/// offset 1, three at offset 2), and the last, if the value ends inside a group, bits of the
/// bytes after it.
fn base64_piece(engine: &impl Engine, value: &[u8], offset: usize) -> Vec<u8> {
    let mut shifted = vec![0; offset];
    shifted.extend_from_slice(value);
    let encoded = engine.encode(&shifted).into_bytes();
    let skip = [0, 2, 3][offset];
    let end = if shifted.len().is_multiple_of(3) { encoded.len() } else { encoded.len() - 1 };
    encoded.get(skip..end).map(<[u8]>::to_vec).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    fn found_in(forms: &[Vec<u8>], text: &[u8]) -> bool {
        forms.iter().any(|f| text.windows(f.len()).any(|w| w == f))
    }

    #[test]
    fn the_value_is_found_in_base64_at_every_offset_in_both_alphabets() {
        let value = b"sk-live/42?>~";
        let forms = reflections(value);
        for before in 0..6 {
            for after in 0..4 {
                let data = [&b"user:pass"[..before], value, &b"\x00\xff\xfe"[..after]].concat();
                for encoded in [STANDARD.encode(&data), URL_SAFE.encode(&data)] {
                    assert!(found_in(&forms, encoded.as_bytes()), "{before} before, {after} after: {encoded}");
                }
            }
        }
        // Basic auth as servers echo it.
        let basic = STANDARD.encode([&b"me:"[..], value].concat());
        assert!(found_in(&forms, basic.as_bytes()), "{basic}");
    }

    #[test]
    fn percent_json_and_form_encodings_are_found() {
        let forms = reflections(b"a/b c&d");
        for echoed in [&b"a%2Fb%20c%26d"[..], b"a%2fb%20c%26d", b"a%2Fb+c%26d", b"a\\/b c&d", b"a/b c&d"] {
            assert!(found_in(&forms, echoed), "{}", String::from_utf8_lossy(echoed));
        }
        assert_eq!(percent_encode(b"a/b+c=d&e f~g"), b"a%2Fb%2Bc%3Dd%26e%20f~g");
    }

    #[test]
    fn a_short_value_has_no_base64_pieces_and_no_repeats() {
        assert_eq!(reflections(b"abc"), [b"abc".to_vec()], "nothing to encode: one form");
        assert!(reflections(b"").is_empty());
    }
}
