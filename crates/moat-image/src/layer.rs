//! Applying OCI / Docker image layers onto a root directory.
//!
//! A layer is a tar stream, plain or compressed with gzip or zstd (told apart by magic bytes),
//! applied with the OCI image-spec semantics: `.wh.<name>` deletes `<name>` from the layers below
//! and `.wh..wh..opq` empties a directory of what the layers below put there.
//!
//! Layers are untrusted: a hostile registry or a guest-built image may send any bytes. So
//! - every path is normalised (a leading `/` or `./` is dropped: `/etc/x` lands at `<root>/etc/x`,
//!   as Docker and containerd do) and refused when it holds `..`, a NUL byte, or is over-long;
//! - parent directories are resolved with `openat2(RESOLVE_IN_ROOT)`: a symbolic link on the way
//!   is followed as the guest would see it, with `<root>` as `/`, so it can never lead outside.
//!   On a kernel without `openat2` (before 5.6) a symbolic link on the way is refused instead;
//! - the last component is never followed: an existing entry is unlinked first and the new one is
//!   created with `O_EXCL | O_NOFOLLOW`, so a file replacing a symbolic link replaces the link;
//! - hard links must name an entry that already exists inside `<root>`;
//! - GNU long names and PAX headers are read with a size bound, file data is streamed.
//!
//! Nothing here panics on malformed input; the fuzz-style test below holds that.

mod applier;
mod compression;
#[cfg(test)]
mod fixture;
mod member;
mod path;
mod resolve;
mod whiteout;

use std::io::{self, BufReader, Read};
use std::path::Path;

use crate::ImageError;
use applier::Applier;
use compression::{Compression, ZstdFrames};
use member::{member, read_extension, Pending};

/// What applying one layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Members of the tar stream, not counting extension headers (GNU long names, PAX); whiteouts
    /// and skipped members are included.
    pub entries: u64,
    /// Whiteouts applied: `.wh.<name>` and opaque markers.
    pub whiteouts: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Members that were not created: device nodes when not running as root (or when `mknod` is
    /// not permitted), aufs metadata (`.wh..wh.*` other than the opaque marker) and unknown types.
    pub skipped: u64,
}

/// Apply one layer (plain tar, gzip or zstd — detected by magic bytes) onto `root`.
///
/// Regular files, directories, symbolic links (target kept verbatim), hard links, FIFOs, device
/// nodes and `SCHILY.xattr.*` extended attributes are created with the layer's mode and mtime;
/// owners too when running as root. Without root, device nodes are skipped and counted in
/// [`LayerStats::skipped`], and owners are left to the caller. Extended attributes the kernel
/// or file system refuses for lack of privilege or support (`EPERM`, `EACCES`, `EOPNOTSUPP`,
/// typically `security.*` or `trusted.*` unprivileged) are logged and skipped; other failures
/// fail the layer. The metadata of `root` itself (an entry `./`) is left alone.
pub fn apply_layer(layer: impl Read, root: &Path) -> Result<LayerStats, ImageError> {
    let mut layer = layer;
    let mut head = Vec::with_capacity(6);
    (&mut layer).take(6).read_to_end(&mut head).map_err(|e| unreadable(format!("reading the first bytes: {e}")))?;
    let mut magic = [0u8; 6];
    magic[..head.len()].copy_from_slice(&head);
    let input = io::Cursor::new(head).chain(layer);
    match Compression::of(&magic) {
        Compression::None => apply_tar(input, root),
        Compression::Gzip => apply_tar(flate2::read::MultiGzDecoder::new(input), root),
        Compression::Zstd => apply_tar(ZstdFrames::new(BufReader::new(input)), root),
        Compression::Unsupported(name) => {
            Err(unreadable(format!("it is compressed with {name}, which moat does not read (only gzip and zstd)")))
        }
    }
}

fn unreadable(reason: impl Into<String>) -> ImageError {
    ImageError::LayerUnreadable { reason: reason.into() }
}

fn shown(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut shown: String = text.chars().take(200).collect();
    if text.chars().nth(200).is_some() {
        shown.push('…');
    }
    shown
}

fn apply_tar(input: impl Read, root: &Path) -> Result<LayerStats, ImageError> {
    apply_tar_with(input, Applier::new(root, true)?)
}

fn apply_tar_with(input: impl Read, mut applier: Applier) -> Result<LayerStats, ImageError> {
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(|e| unreadable(e.to_string()))?;
    // Raw iteration: the tar crate would read long names and PAX headers of any size into memory.
    let mut pending = Pending::default();
    for entry in entries.raw(true) {
        let mut entry = entry.map_err(|e| unreadable(e.to_string()))?;
        let kind = entry.header().entry_type();
        if kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions() {
            let data = read_extension(&mut entry)?;
            let slot = match () {
                () if kind.is_gnu_longname() => &mut pending.long_name,
                () if kind.is_gnu_longlink() => &mut pending.long_link,
                () => &mut pending.pax,
            };
            if slot.replace(data).is_some() {
                return Err(unreadable("two extension headers of the same kind describe one member"));
            }
            continue;
        }
        if kind.is_pax_global_extensions() {
            // Global defaults (usually just a comment); nothing in OCI layers relies on them.
            continue;
        }
        let member = member(&entry, std::mem::take(&mut pending))?;
        applier.stats.entries += 1;
        applier.apply(&mut entry, member)?;
    }
    if !pending.is_empty() {
        return Err(unreadable("the layer ends with an extension header that describes no member"));
    }
    applier.finish()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::fixture::{gzip, is_empty, scratch, zstd, Layer};
    use super::*;

    #[test]
    fn layer_garbage_and_truncated_streams_fail_without_panicking() {
        let (scratch, root, outside) = scratch();
        let good = Layer::new()
            .dir("etc")
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
            .symlink("escape", "/etc")
            .symlink("away", outside.to_str().unwrap())
            .symlink("up", "../..")
            .hard_link("etc/shadow", "etc/passwd")
            .file(&format!("{}/long", "n".repeat(120)), b"long")
            .whiteout("etc/.wh.group")
            .whiteout("etc/.wh..wh..opq")
            .file("escape/x", b"x")
            .file("up/y", b"y")
            .whiteout("up/.wh.away")
            .tar();
        let bases = [good.clone(), gzip(&good), zstd(&good)];
        for base in &bases {
            let root = scratch.path().join("good");
            fs::create_dir(&root).unwrap();
            assert_eq!(apply_layer(&base[..], &root).unwrap().entries, 12);
            assert_eq!(fs::read(root.join("etc/x")).unwrap(), b"x");
            assert!(!root.join("away").exists());
            fs::remove_dir_all(&root).unwrap();
        }
        let mut applied = 0;
        let mut rng = StdRng::seed_from_u64(0x6d6f6174);
        for i in 0..3000 {
            let base = &bases[i % bases.len()];
            let input: Vec<u8> = match rng.gen_range(0..4) {
                0 => (0..rng.gen_range(0..2048)).map(|_| rng.gen()).collect(),
                1 => base[..rng.gen_range(0..base.len())].to_vec(),
                2 => {
                    let mut mutated = base.clone();
                    for _ in 0..rng.gen_range(1..8) {
                        let at = rng.gen_range(0..mutated.len());
                        mutated[at] = rng.gen();
                    }
                    mutated
                }
                _ => {
                    // Headers are the interesting part of a tar: mutate a block of the plain one.
                    let mut mutated = good.clone();
                    let block = rng.gen_range(0..mutated.len() / 512) * 512;
                    for _ in 0..rng.gen_range(1..4) {
                        mutated[block + rng.gen_range(0..512)] = rng.gen();
                    }
                    // With a fresh checksum, so that the mutation gets past the parser.
                    let header = &mut mutated[block..block + 512];
                    header[148..156].fill(b' ');
                    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
                    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                    mutated
                }
            };
            let root = scratch.path().join(format!("fuzz{i}"));
            fs::create_dir(&root).unwrap();
            applied += u32::from(apply_layer(&input[..], &root).is_ok());
            fs::remove_dir_all(&root).unwrap_or_else(|e| panic!("cleaning {}: {e}", root.display()));
        }
        eprintln!("APPLIED {applied}");
        // Mutations that keep the stream valid must exercise the whole applier, not just the parser.
        assert!(applied > 300, "only {applied} mutated layers applied");
        assert!(is_empty(&outside), "a mutated layer wrote outside root");
        assert!(is_empty(&root));
    }
}
