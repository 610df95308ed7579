//! Find-and-replace on bytes that arrive in pieces: what puts a secret into a request body, and
//! takes it out of everything that flows back to the guest.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::HeaderValue;
use hyper::HeaderMap;

/// Patterns and what each becomes. Matches are leftmost-longest and never overlap, and a
/// replacement is never searched again, so a value that contains a placeholder stays as it is.
pub(crate) struct Rewriter {
    finder: AhoCorasick,
    patterns: Vec<Vec<u8>>,
    replacements: Vec<Bytes>,
    /// Which bytes begin a pattern: only there can a match cut by a read begin.
    starts: [bool; 256],
    longest: usize,
}

impl Rewriter {
    /// Each pattern is replaced by its replacement. Empty patterns and repeats of an earlier
    /// pattern are left out.
    pub(crate) fn new(rules: impl IntoIterator<Item = (Vec<u8>, Bytes)>) -> Result<Rewriter, aho_corasick::BuildError> {
        let (mut patterns, mut replacements) = (Vec::<Vec<u8>>::new(), Vec::new());
        for (pattern, replacement) in rules {
            if !pattern.is_empty() && !patterns.contains(&pattern) {
                patterns.push(pattern);
                replacements.push(replacement);
            }
        }
        let finder = AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(&patterns)?;
        let mut starts = [false; 256];
        for p in &patterns {
            starts[usize::from(p[0])] = true;
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Rewriter { finder, patterns, replacements, starts, longest })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `input` with every match replaced, or `None` if there was none.
    pub(crate) fn replace_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        for m in self.finder.find_iter(input) {
            let out = out.get_or_insert_with(|| Vec::with_capacity(input.len() + self.longest));
            out.extend_from_slice(&input[copied..m.start()]);
            out.extend_from_slice(&self.replacements[m.pattern()]);
            copied = m.end();
        }
        out.map(|mut out| {
            out.extend_from_slice(&input[copied..]);
            out
        })
    }

    /// Every header value with its matches replaced. A value the result cannot be a header
    /// value of is dropped rather than passed on unreplaced.
    pub(crate) fn rewrite_headers(&self, headers: &mut HeaderMap) {
        let mut unfit = Vec::new();
        for (name, value) in headers.iter_mut() {
            if let Some(replaced) = self.replace_all(value.as_bytes()) {
                match HeaderValue::from_maybe_shared(Bytes::from(replaced)) {
                    Ok(replaced) => *value = replaced,
                    Err(_) => unfit.push(name.clone()),
                }
            }
        }
        for name in unfit {
            headers.remove(name);
        }
    }

    /// How many bytes at the end of `buf` could be the start of a match that the next read
    /// completes: the longest suffix that is a proper prefix of a pattern.
    fn undecided(&self, buf: &[u8]) -> usize {
        let from = buf.len().saturating_sub(self.longest.saturating_sub(1));
        (from..buf.len())
            .find(|&at| {
                let tail = &buf[at..];
                self.starts[usize::from(tail[0])]
                    && self.patterns.iter().any(|p| p.len() > tail.len() && p.starts_with(tail))
            })
            .map_or(0, |at| buf.len() - at)
    }
}

/// One stream through a [`Rewriter`]: its output is what [`Rewriter::replace_all`] makes of the
/// whole input, however the input is cut. It holds back at most the longest pattern less one
/// byte, and only bytes that could begin a match, so a stream that pauses (server-sent events,
/// a WebSocket) is delayed only when its last bytes look like the start of a pattern.
pub(crate) struct RewriteStream {
    rules: Arc<Rewriter>,
    carry: Vec<u8>,
}

impl RewriteStream {
    pub(crate) fn new(rules: Arc<Rewriter>) -> RewriteStream {
        RewriteStream { rules, carry: Vec::new() }
    }

    /// The output that `chunk` settles; what is still undecided waits for the next one.
    pub(crate) fn push(&mut self, chunk: Bytes) -> Bytes {
        let buf = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.extend_from_slice(&chunk);
            Bytes::from(std::mem::take(&mut self.carry))
        };
        // A match starting in the undecided tail might yet be longer, or lose to one starting
        // earlier there: it waits. One starting before it is final (leftmost-longest).
        let undecided_from = buf.len() - self.rules.undecided(&buf);
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        for m in self.rules.finder.find_iter(&buf[..]) {
            if m.start() >= undecided_from {
                break;
            }
            let out = out.get_or_insert_with(|| Vec::with_capacity(buf.len() + self.rules.longest));
            out.extend_from_slice(&buf[copied..m.start()]);
            out.extend_from_slice(&self.rules.replacements[m.pattern()]);
            copied = m.end();
        }
        let settled = copied.max(undecided_from);
        self.carry.extend_from_slice(&buf[settled..]);
        match out {
            None => buf.slice(..settled),
            Some(mut out) => {
                out.extend_from_slice(&buf[copied..settled]);
                Bytes::from(out)
            }
        }
    }

    /// The rest, once the input has ended.
    pub(crate) fn finish(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.carry);
        Bytes::from(self.rules.replace_all(&rest).unwrap_or(rest))
    }
}

/// A body passed through a [`RewriteStream`]; trailers are rewritten like headers. Its length
/// is unknown until it ends, since a replacement need not be as long as what it replaces.
pub(crate) struct Rewritten<B> {
    inner: B,
    stream: RewriteStream,
    trailers: Option<HeaderMap>,
    ended: bool,
}

impl<B> Rewritten<B> {
    pub(crate) fn new(inner: B, rules: Arc<Rewriter>) -> Rewritten<B> {
        Rewritten { inner, stream: RewriteStream::new(rules), trailers: None, ended: false }
    }
}

impl<B> Body for Rewritten<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.stream.push(data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body: what was held back goes out before them.
                        if let Ok(mut trailers) = frame.into_trailers() {
                            this.stream.rules.rewrite_headers(&mut trailers);
                            this.trailers = Some(trailers);
                        }
                        this.ended = true;
                        let rest = this.stream.finish();
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.ended = true;
                    let rest = this.stream.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none() && (self.ended || (self.stream.carry.is_empty() && self.inner.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Channel};
    use proptest::prelude::*;

    fn rewriter(rules: &[(&str, &str)]) -> Arc<Rewriter> {
        let rules = rules.iter().map(|(p, r)| (p.as_bytes().to_vec(), Bytes::copy_from_slice(r.as_bytes())));
        Arc::new(Rewriter::new(rules).unwrap())
    }

    /// The whole output of a stream fed `chunks`.
    fn streamed(rules: &Arc<Rewriter>, chunks: &[&[u8]]) -> Vec<u8> {
        let mut stream = RewriteStream::new(rules.clone());
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&stream.push(Bytes::copy_from_slice(chunk)));
            assert!(stream.carry.len() < rules.longest.max(1), "at most the longest pattern less one byte waits");
        }
        out.extend_from_slice(&stream.finish());
        out
    }

    fn replaced(rules: &Rewriter, input: &[u8]) -> Vec<u8> {
        rules.replace_all(input).unwrap_or_else(|| input.to_vec())
    }

    #[test]
    fn leftmost_longest_wins_and_replacements_are_not_rescanned() {
        let rules = rewriter(&[("P_K", "k-value P_KEY"), ("P_KEY", "key-value"), ("", "never")]);
        assert_eq!(
            rules.replace_all(b"a P_K b P_KEY c P_K").as_deref(),
            Some(&b"a k-value P_KEY b key-value c k-value P_KEY"[..])
        );
        assert_eq!(rules.replace_all(b"nothing here, not even P_"), None);
        assert_eq!(rules.replace_all(b""), None);
    }

    #[test]
    fn a_value_split_at_every_offset_is_caught() {
        let rules = rewriter(&[("sk-live/42", "PH"), ("c2stbGl2ZS80Mg", "PH")]);
        for text in [&b"before sk-live/42 after"[..], b"sk-live/42", b"xx c2stbGl2ZS80Mg=="] {
            let whole = replaced(&rules, text);
            assert!(!whole.windows(4).any(|w| w == b"live" || w == b"c2st"), "{whole:?}");
            for cut in 0..=text.len() {
                assert_eq!(streamed(&rules, &[&text[..cut], &text[cut..]]), whole, "cut at {cut}");
            }
            let bytes: Vec<&[u8]> = text.chunks(1).collect();
            assert_eq!(streamed(&rules, &bytes), whole, "one byte at a time");
        }
    }

    #[test]
    fn overlapping_prefixes_resolve_as_in_one_piece() {
        // "abcd" starts before "bc" and is longer than "ab": only the rest of the stream says
        // which one it is, so the stream must wait rather than settle for the first it sees.
        let rules = rewriter(&[("abcd", "1"), ("bc", "2"), ("ab", "3"), ("aab", "4")]);
        for text in [&b"abcd"[..], b"abce", b"aabcd", b"aaab", b"abab", b"xbcd", b"ab"] {
            let whole = replaced(&rules, text);
            for cut in 0..=text.len() {
                for cut2 in cut..=text.len() {
                    let chunks = [&text[..cut], &text[cut..cut2], &text[cut2..]];
                    assert_eq!(streamed(&rules, &chunks), whole, "{text:?} cut at {cut}, {cut2}");
                }
            }
        }
    }

    #[test]
    fn text_that_cannot_begin_a_pattern_is_not_held_back() {
        let rules = rewriter(&[("secret", "PH")]);
        let mut stream = RewriteStream::new(rules.clone());
        assert_eq!(stream.push(Bytes::from_static(b"data: {}\n\n")), &b"data: {}\n\n"[..]);
        assert_eq!(stream.push(Bytes::from_static(b"a sec")), &b"a "[..], "a possible start waits");
        assert_eq!(stream.push(Bytes::from_static(b"ond")), &b"second"[..]);
        assert_eq!(stream.push(Bytes::from_static(b"se")), &b""[..]);
        assert_eq!(stream.finish(), &b"se"[..], "the end of the input settles the rest");
        assert_eq!(streamed(&rewriter(&[]), &[b"as is"]), b"as is");
    }

    #[test]
    fn header_values_are_rewritten_and_unfit_results_dropped() {
        let rules = rewriter(&[("sk-1", "PH"), ("bad", "line\nbreak")]);
        let mut headers = HeaderMap::new();
        headers.insert("location", HeaderValue::from_static("/x?k=sk-1"));
        headers.append("set-cookie", HeaderValue::from_static("a=sk-1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert("x-bad", HeaderValue::from_static("bad"));
        rules.rewrite_headers(&mut headers);
        assert_eq!(headers["location"], "/x?k=PH");
        assert_eq!(headers.get_all("set-cookie").iter().collect::<Vec<_>>(), ["a=PH", "b=2"]);
        assert!(!headers.contains_key("x-bad"));
    }

    #[tokio::test]
    async fn a_rewritten_body_flushes_what_it_held_before_its_trailers() {
        let rules = rewriter(&[("sk-1", "PH")]);
        let (mut tx, inner) = Channel::<Bytes>::new(4);
        let body = Rewritten::new(inner, rules);
        assert!(!body.is_end_stream());
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("sk-1"));
        tx.send_data(Bytes::from_static(b"a sk")).await.unwrap();
        tx.send_data(Bytes::from_static(b"-1 b s")).await.unwrap();
        tx.send_trailers(trailers).await.unwrap();
        drop(tx);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "PH");
        assert_eq!(collected.to_bytes(), &b"a PH b s"[..]);
    }

    proptest! {
        /// However the input is cut, the stream says what the whole input says; and with
        /// replacements that cannot make a pattern, no pattern is left in the output.
        #[test]
        fn streaming_equals_one_piece(
            patterns in prop::collection::vec("[ab]{1,5}", 1..4),
            text in "[abc]{0,40}",
            cuts in prop::collection::vec(0usize..41, 0..6),
        ) {
            let rules: Vec<(Vec<u8>, Bytes)> =
                patterns.iter().map(|p| (p.clone().into_bytes(), Bytes::from_static(b"#"))).collect();
            let rules = Arc::new(Rewriter::new(rules).unwrap());
            let text = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([text.len()]) {
                chunks.push(&text[at..cut]);
                at = cut;
            }
            let whole = replaced(&rules, text);
            prop_assert_eq!(streamed(&rules, &chunks), whole.clone());
            for p in &patterns {
                prop_assert!(!whole.windows(p.len()).any(|w| w == p.as_bytes()), "{} left in {:?}", p, whole);
            }
        }
    }
}
