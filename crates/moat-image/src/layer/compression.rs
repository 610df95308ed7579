//! Telling a layer's compression by its magic bytes, and reading multi-frame zstd streams.

use std::io::{self, BufRead, Read};

use ruzstd::frame::ReadFrameHeaderError;
use ruzstd::frame_decoder::FrameDecoderError;
use ruzstd::{BlockDecodingStrategy, FrameDecoder};

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
    Unsupported(&'static str),
}

impl Compression {
    pub(super) fn of(magic: &[u8; 6]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
            || (magic[0] & 0xf0 == 0x50 && magic[1..4] == [0x2a, 0x4d, 0x18])
        {
            // A zstd frame, or a skippable frame (0x184d2a50..=0x184d2a5f) before one.
            Compression::Zstd
        } else if magic == &[0xfd, b'7', b'z', b'X', b'Z', 0] {
            Compression::Unsupported("xz")
        } else if magic.starts_with(b"BZh") && magic[3].is_ascii_digit() && magic[4..] == [0x31, 0x41] {
            Compression::Unsupported("bzip2")
        } else {
            Compression::None
        }
    }
}

/// A zstd stream of any number of frames (zstd:chunked layers have many, plus skippable ones).
pub(super) struct ZstdFrames<R: BufRead> {
    source: R,
    decoder: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    pub(super) fn new(source: R) -> Self {
        // ruzstd only enforces its 100 MiB window limit when a decoder is reset, not on its first
        // frame; priming it with an empty frame makes every frame of the layer go through the check
        // (a hostile frame could otherwise make it keep terabytes of history).
        const EMPTY_FRAME: [u8; 9] = [0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x00, 0x01, 0x00, 0x00];
        let mut decoder = FrameDecoder::new();
        let primed = decoder.init(&EMPTY_FRAME[..]);
        debug_assert!(primed.is_ok(), "the empty zstd frame is valid");
        ZstdFrames { source, decoder, in_frame: false }
    }
}

fn zstd_error(e: FrameDecoderError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad zstd data: {e}"))
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if self.source.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.decoder.reset(&mut self.source) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                        length, ..
                    })) => {
                        let skipped = io::copy(&mut (&mut self.source).take(length.into()), &mut io::sink())?;
                        if skipped < u64::from(length) {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        continue;
                    }
                    Err(e) => return Err(zstd_error(e)),
                }
            }
            while self.decoder.can_collect() < buf.len() && !self.decoder.is_finished() {
                let wanted = buf.len() - self.decoder.can_collect();
                self.decoder
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(wanted))
                    .map_err(zstd_error)?;
            }
            let n = self.decoder.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.decoder.is_finished() && self.decoder.can_collect() == 0 {
                self.in_frame = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use crate::layer::apply_layer;
    use crate::layer::fixture::{apply_all, gzip, scratch, zstd, Layer};

    #[test]
    fn layer_gzip_and_zstd_streams_are_detected_and_read() {
        let tar = Layer::new().file("etc/os-release", b"ID=test\n").file("big", &vec![7u8; 300_000]).tar();
        for (name, layer) in [("gzip", gzip(&tar)), ("zstd", zstd(&tar))] {
            let (_scratch, root, _) = scratch();
            let stats = apply_all(&root, &[layer]);
            assert_eq!(stats[0].bytes, 8 + 300_000, "{name}");
            assert_eq!(fs::read(root.join("etc/os-release")).unwrap(), b"ID=test\n", "{name}");
            assert_eq!(fs::read(root.join("big")).unwrap().len(), 300_000, "{name}");
        }
    }

    #[test]
    fn layer_compressed_with_xz_is_refused_by_name() {
        let (_scratch, root, _) = scratch();
        let err = apply_layer(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2][..], &root).unwrap_err();
        assert!(err.to_string().contains("xz"), "{err}");
    }
}
