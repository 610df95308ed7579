//! In-memory layers and scratch roots shared by the layer tests.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::{apply_layer, LayerStats};
use crate::ImageError;

/// A layer built in memory.
pub(super) struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    pub(super) fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    /// Any member, with the name written byte for byte (the builder refuses hostile ones).
    pub(super) fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], mode: u32, data: &[u8]) -> Layer {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_mtime(1_600_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.0.append(&header, data).expect("appending to a Vec");
        self
    }

    pub(super) fn header(kind: EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_mtime(1_600_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(size);
        header
    }

    pub(super) fn file(mut self, path: &str, data: &[u8]) -> Layer {
        let mut header = Layer::header(EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut header, path, data).expect("appending to a Vec");
        self
    }

    pub(super) fn dir(mut self, path: &str) -> Layer {
        let mut header = Layer::header(EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut header, path, io::empty()).expect("appending to a Vec");
        self
    }

    pub(super) fn symlink(mut self, path: &str, target: &str) -> Layer {
        let mut header = Layer::header(EntryType::Symlink, 0o777, 0);
        header.set_link_name_literal(target).expect("a short target");
        self.0.append_data(&mut header, path, io::empty()).expect("appending to a Vec");
        self
    }

    pub(super) fn hard_link(self, path: &str, target: &str) -> Layer {
        self.raw(EntryType::Link, path.as_bytes(), target.as_bytes(), 0o644, b"")
    }

    pub(super) fn whiteout(self, path: &str) -> Layer {
        self.raw(EntryType::Regular, path.as_bytes(), b"", 0o644, b"")
    }

    pub(super) fn tar(self) -> Vec<u8> {
        self.0.into_inner().expect("finishing a Vec")
    }
}

pub(super) fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).expect("writing to a Vec");
    gz.finish().expect("finishing a Vec")
}

/// A zstd stream of uncompressed blocks: a skippable frame, then `data` split over two frames.
pub(super) fn zstd(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, b'x', b'y', b'z'];
    let (first, second) = data.split_at(data.len() / 2);
    for frame in [first, second] {
        // Magic, a descriptor without content size, a 2 MiB window.
        out.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]);
        let blocks: Vec<&[u8]> = frame.chunks(100_000).collect();
        for (i, block) in blocks.iter().enumerate() {
            let last = u32::from(i + 1 == blocks.len());
            let header = last | (block.len() as u32) << 3;
            out.extend_from_slice(&header.to_le_bytes()[..3]);
            out.extend_from_slice(block);
        }
        if blocks.is_empty() {
            out.extend_from_slice(&[1, 0, 0]);
        }
    }
    out
}

pub(super) fn apply_all(root: &Path, layers: &[Vec<u8>]) -> Vec<LayerStats> {
    layers.iter().map(|layer| apply_layer(&layer[..], root).expect("applying a good layer")).collect()
}

pub(super) fn refused(result: Result<LayerStats, ImageError>) -> String {
    match result {
        Err(ImageError::LayerEntryRefused { entry, reason }) => format!("{entry}: {reason}"),
        other => panic!("expected a refused entry, got {other:?}"),
    }
}

/// A root inside a scratch directory, with a sibling `outside` that must stay untouched.
pub(super) fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let root = scratch.path().join("root");
    let outside = scratch.path().join("outside");
    fs::create_dir(&root).expect("creating root");
    fs::create_dir(&outside).expect("creating outside");
    (scratch, root, outside)
}

pub(super) fn is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).expect("listing a directory").next().is_none()
}
