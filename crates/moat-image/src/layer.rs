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

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps, XattrFlags};
use rustix::io::Errno;
use ruzstd::frame::ReadFrameHeaderError;
use ruzstd::frame_decoder::FrameDecoderError;
use ruzstd::{BlockDecodingStrategy, FrameDecoder};
use tar::EntryType;

use crate::ImageError;

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

/// Longest path (bytes) and component accepted, as Linux's `PATH_MAX - 1` and `NAME_MAX`.
const MAX_PATH: usize = 4095;
const MAX_NAME: usize = 255;
/// Deepest path accepted in a layer, in components.
const MAX_COMPONENTS: usize = 256;
/// Deepest directory tree a whiteout removes; bounds recursion and open descriptors.
const MAX_REMOVE_DEPTH: usize = 512;
/// Largest GNU long name or PAX header read into memory.
const MAX_EXTENSION: u64 = 1 << 20;

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

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

#[derive(Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
    Unsupported(&'static str),
}

impl Compression {
    fn of(magic: &[u8; 6]) -> Compression {
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

fn unreadable(reason: impl Into<String>) -> ImageError {
    ImageError::LayerUnreadable { reason: reason.into() }
}

/// A zstd stream of any number of frames (zstd:chunked layers have many, plus skippable ones).
struct ZstdFrames<R: BufRead> {
    source: R,
    decoder: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
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

/// Remembers whether reading failed, so a failed copy can blame the layer or the disk.
struct Tracked<R> {
    inner: R,
    failed: bool,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf);
        self.failed |= r.is_err();
        r
    }
}

/// Extension headers seen before the member they describe.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// One member, with its extension headers folded in.
struct Member {
    /// The path as written in the layer, for messages.
    shown: String,
    kind: EntryType,
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    device: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
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

fn read_extension(entry: &mut impl Read) -> Result<Vec<u8>, ImageError> {
    let mut data = Vec::new();
    entry
        .take(MAX_EXTENSION + 1)
        .read_to_end(&mut data)
        .map_err(|e| unreadable(format!("reading an extension header: {e}")))?;
    if data.len() as u64 > MAX_EXTENSION {
        return Err(unreadable(format!("an extension header is larger than {MAX_EXTENSION} bytes")));
    }
    Ok(data)
}

fn member<R: Read>(entry: &tar::Entry<'_, R>, pending: Pending) -> Result<Member, ImageError> {
    let header = entry.header();
    let header_path = header.path_bytes();
    let trim = |mut v: Vec<u8>| {
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    };
    let mut path = pending.long_name.map(trim).unwrap_or_else(|| header_path.to_vec());
    let mut link = pending.long_link.map(trim).or_else(|| header.link_name_bytes().map(|l| l.to_vec()));
    let bad = |what: &str, e: io::Error| ImageError::LayerEntryRefused {
        entry: shown(&header_path),
        reason: format!("its header has a bad {what} field ({e})"),
    };
    // Some writers leave numeric fields blank; tar reads those as 0.
    let old = header.as_old();
    let number = |what: &str, raw: &[u8], parsed: io::Result<u64>| match parsed {
        Ok(n) => Ok(n),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(bad(what, e)),
    };
    let mut uid = number("uid", &old.uid, header.uid())?;
    let mut gid = number("gid", &old.gid, header.gid())?;
    let mut mtime = i64::try_from(number("mtime", &old.mtime, header.mtime())?).unwrap_or(i64::MAX);
    let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
    let device = match header.entry_type() {
        EntryType::Char | EntryType::Block => (
            header.device_major().map_err(|e| bad("device", e))?.unwrap_or(0),
            header.device_minor().map_err(|e| bad("device", e))?.unwrap_or(0),
        ),
        _ => (0, 0),
    };
    let mut xattrs = Vec::new();
    if let Some(pax) = &pending.pax {
        let pax_number = |key: &str, value: &[u8]| {
            std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
                ImageError::LayerEntryRefused {
                    entry: shown(&header_path),
                    reason: format!("its PAX header has a bad {key} value"),
                }
            })
        };
        for ext in tar::PaxExtensions::new(pax) {
            let ext = ext.map_err(|e| unreadable(format!("a PAX header is malformed: {e}")))?;
            let value = ext.value_bytes();
            match ext.key_bytes() {
                b"path" => path = value.to_vec(),
                b"linkpath" => link = Some(value.to_vec()),
                b"uid" => uid = pax_number("uid", value)?,
                b"gid" => gid = pax_number("gid", value)?,
                b"mtime" => {
                    // Seconds with an optional fraction; the fraction is dropped.
                    let whole = value.split(|&b| b == b'.').next().unwrap_or_default();
                    if let Some(secs) = std::str::from_utf8(whole).ok().and_then(|v| v.parse::<i64>().ok()) {
                        mtime = secs;
                    }
                }
                b"size" => {
                    // Raw iteration reads the header's size; a disagreeing PAX size would make this
                    // parser see a different archive than others do.
                    if pax_number("size", value)? != entry.size() {
                        return Err(unreadable(format!(
                            "the PAX size of {:?} disagrees with its header (files over 8 GiB are not supported)",
                            shown(&path)
                        )));
                    }
                }
                key => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(Member { shown: shown(&path), kind: header.entry_type(), path, link, mode, uid, gid, mtime, device, xattrs })
}

/// `raw` made relative to the layer's root: empty and `.` components dropped (so a leading `/`
/// or `./` is), `..`, NUL bytes and over-long paths refused. The result joins components by `/`.
fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    if raw.len() > MAX_PATH {
        return Err(format!("the path is longer than {MAX_PATH} bytes"));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut count = 0;
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err("the path climbs out with `..`".into()),
            _ if part.len() > MAX_NAME => return Err(format!("a path component is longer than {MAX_NAME} bytes")),
            _ => {}
        }
        count += 1;
        if count > MAX_COMPONENTS {
            return Err(format!("the path is more than {MAX_COMPONENTS} levels deep"));
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// `path` split into its parent and last component.
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// What a failure while streaming file data from the layer (not writing it) is reported as.
const READING: &str = "reading the layer";

const DIR_FLAGS: OFlags = OFlags::DIRECTORY.union(OFlags::RDONLY).union(OFlags::CLOEXEC);

/// A directory whose mode and mtime are set once the whole layer is in, so that a read-only
/// directory can still be filled and later entries do not bump its mtime.
struct DeferredDir {
    path: Vec<u8>,
    mode: u32,
    mtime: i64,
}

struct Applier {
    root: OwnedFd,
    /// `openat2(RESOLVE_IN_ROOT)` works here; otherwise symbolic links on the way are refused.
    in_root: bool,
    privileged: bool,
    /// Paths this layer created and their ancestors: whiteouts and opaque markers only remove
    /// what the layers below put there.
    added: HashSet<Vec<u8>>,
    dirs: Vec<DeferredDir>,
    stats: LayerStats,
}

/// Why an entry failed: refused as unsafe, or an I/O error while doing `what`.
enum Failure {
    Refused(String),
    Io(&'static str, io::Error),
}

trait Doing<T> {
    fn doing(self, what: &'static str) -> Result<T, Failure>;
}

impl<T> Doing<T> for io::Result<T> {
    fn doing(self, what: &'static str) -> Result<T, Failure> {
        self.map_err(|e| Failure::Io(what, e))
    }
}

impl<T> Doing<T> for rustix::io::Result<T> {
    fn doing(self, what: &'static str) -> Result<T, Failure> {
        self.map_err(|e| Failure::Io(what, e.into()))
    }
}

fn timestamps(mtime: i64) -> Timestamps {
    let at = rustix::fs::Timespec { tv_sec: mtime, tv_nsec: 0 };
    Timestamps { last_access: at, last_modification: at }
}

fn is_dir(stat: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::Directory
}

impl Applier {
    /// `try_openat2: false` forces the fallback that refuses symbolic links on the way (tests).
    fn new(root: &Path, try_openat2: bool) -> Result<Applier, ImageError> {
        let fd = rustix::fs::open(root, DIR_FLAGS, Mode::empty())
            .map_err(|e| ImageError::io(format!("opening the image root {}", root.display()))(e.into()))?;
        let in_root = try_openat2
            && match rustix::fs::openat2(&fd, ".", DIR_FLAGS, Mode::empty(), ResolveFlags::IN_ROOT) {
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "openat2 is unavailable; symbolic links on a layer path are refused");
                    false
                }
            };
        Ok(Applier {
            root: fd,
            in_root,
            privileged: rustix::process::geteuid().is_root(),
            added: HashSet::new(),
            dirs: Vec::new(),
            stats: LayerStats::default(),
        })
    }

    fn apply(&mut self, data: &mut impl Read, member: Member) -> Result<(), ImageError> {
        let shown = member.shown.clone();
        match self.apply_member(data, member) {
            Ok(()) => Ok(()),
            Err(Failure::Refused(reason)) => Err(ImageError::LayerEntryRefused { entry: shown, reason }),
            Err(Failure::Io(READING, e)) => Err(unreadable(format!("reading the data of {shown:?}: {e}"))),
            Err(Failure::Io(what, source)) => Err(ImageError::LayerEntryIo { entry: shown, what: what.into(), source }),
        }
    }

    fn apply_member(&mut self, data: &mut impl Read, m: Member) -> Result<(), Failure> {
        let path = normalize(&m.path).map_err(Failure::Refused)?;
        let (parent, name) = split(&path);
        if name.starts_with(WHITEOUT) {
            return self.whiteout(parent, name);
        }
        if path.is_empty() {
            if m.kind == EntryType::Directory {
                return Ok(());
            }
            return Err(Failure::Refused("a non-directory entry names the root".into()));
        }
        match m.kind {
            EntryType::Regular | EntryType::Continuous => self.file(data, &path, &m)?,
            EntryType::Directory => self.dir(&path, &m)?,
            EntryType::Symlink => self.symlink(&path, &m)?,
            EntryType::Link => self.hard_link(&path, &m)?,
            EntryType::Char | EntryType::Block | EntryType::Fifo => self.node(&path, &m)?,
            EntryType::GNUSparse => return Err(Failure::Refused("GNU sparse files are not supported".into())),
            other => {
                tracing::debug!(entry = %m.shown, kind = ?other, "skipping a layer member of an unknown type");
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.record(&path);
        Ok(())
    }

    /// Remember `path` and its ancestors as this layer's own.
    fn record(&mut self, path: &[u8]) {
        let mut end = path.len();
        loop {
            if !self.added.insert(path[..end].to_vec()) {
                return;
            }
            match path[..end].iter().rposition(|&b| b == b'/') {
                Some(i) => end = i,
                None => return,
            }
        }
    }

    /// Open the directory `path` (relative to root), following symbolic links only inside root;
    /// with `create`, make missing directories (mode 0755, as Docker does).
    fn open_dir(&self, path: &[u8], create: bool) -> Result<OwnedFd, Failure> {
        let opened = self.resolve(path);
        match opened {
            Err(Failure::Io(_, e)) if create && e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let parts: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        // Where each prefix of `path` ends: "a/b/c" -> "a", "a/b", "a/b/c".
        let ends = path.iter().enumerate().filter(|&(_, &b)| b == b'/').map(|(i, _)| i).chain([path.len()]);
        let mut fd = self.resolve(b"")?;
        let mut existing = 0;
        for end in ends {
            match self.resolve(&path[..end]) {
                Ok(next) => {
                    fd = next;
                    existing += 1;
                }
                Err(Failure::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            }
        }
        for part in &parts[existing..] {
            let made = match rustix::fs::mkdirat(&fd, os(part), Mode::from_raw_mode(0o755)) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => return Err(Failure::Io("creating a parent directory", e.into())),
            };
            fd = match rustix::fs::openat(&fd, os(part), DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    return Err(Failure::Refused(
                        "a parent directory is a symbolic link that leads nowhere, or not a directory".into(),
                    ))
                }
                Err(e) => return Err(Failure::Io("opening a parent directory", e.into())),
            };
            if made {
                // 0755 whatever the daemon's umask (077): the guest's users must get through.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755)).doing("setting a parent directory's mode")?;
            }
        }
        Ok(fd)
    }

    /// Open the directory `path`, which this layer says is a directory: whatever else is there
    /// (a symbolic link included) is replaced by an empty one.
    fn own_dir(&self, path: &[u8]) -> Result<OwnedFd, Failure> {
        if path.is_empty() {
            return self.resolve(path);
        }
        let (parent, name) = split(path);
        let dir = self.open_dir(parent, true)?;
        if !self.clear(&dir, name, true)? {
            rustix::fs::mkdirat(&dir, os(name), Mode::from_raw_mode(0o755)).doing("creating the directory")?;
        }
        rustix::fs::openat(&dir, os(name), DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty()).doing("opening the directory")
    }

    /// Open an existing directory inside root.
    fn resolve(&self, path: &[u8]) -> Result<OwnedFd, Failure> {
        if path.is_empty() {
            return rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty()).doing("opening the root");
        }
        if self.in_root {
            let flags = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
            return match rustix::fs::openat2(&self.root, os(path), DIR_FLAGS, Mode::empty(), flags) {
                Err(Errno::NOTDIR) => Err(Failure::Refused("a parent is not a directory".into())),
                other => other.doing("opening a parent directory"),
            };
        }
        let mut fd = self.resolve(b"")?;
        for part in path.split(|&b| b == b'/') {
            fd = match rustix::fs::openat(&fd, os(part), DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty()) {
                Ok(fd) => fd,
                // O_DIRECTORY | O_NOFOLLOW on a symbolic link fails with ENOTDIR (or ELOOP).
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let link = rustix::fs::statat(&fd, os(part), AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|stat| FileType::from_raw_mode(stat.st_mode) == FileType::Symlink);
                    return Err(Failure::Refused(if link {
                        "a parent directory is a symbolic link, and this kernel lacks openat2 to follow it safely"
                            .into()
                    } else {
                        "a parent is not a directory".into()
                    }));
                }
                Err(e) => return Err(Failure::Io("opening a parent directory", e.into())),
            };
        }
        Ok(fd)
    }

    fn whiteout(&mut self, parent: &[u8], name: &[u8]) -> Result<(), Failure> {
        self.stats.whiteouts += 1;
        if name == OPAQUE {
            let dir = self.own_dir(parent)?;
            self.record(parent);
            return self.purge(&dir, parent, 0);
        }
        if name.starts_with(b".wh..wh.") {
            // aufs bookkeeping (`.wh..wh.plnk` and the like): not a whiteout of anything.
            self.stats.whiteouts -= 1;
            self.stats.skipped += 1;
            return Ok(());
        }
        let target = &name[WHITEOUT.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(Failure::Refused(format!("the whiteout names {:?}", String::from_utf8_lossy(target))));
        }
        let dir = match self.open_dir(parent, false) {
            Ok(dir) => dir,
            // Nothing below to hide.
            Err(Failure::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut path = parent.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(target);
        self.hide_lower(&dir, target, &path, 0)
    }

    /// Remove `name` in `dir` unless this layer added it; of a directory this layer added, remove
    /// what the layers below put in it.
    fn hide_lower(&self, dir: &OwnedFd, name: &[u8], path: &[u8], depth: usize) -> Result<(), Failure> {
        let stat = match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(Failure::Io("looking up a whited-out entry", e.into())),
        };
        if !self.added.contains(path) {
            return remove(dir, name, depth);
        }
        if is_dir(&stat) {
            let child = rustix::fs::openat(dir, os(name), DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())
                .doing("opening a directory to empty")?;
            self.purge(&child, path, depth + 1)?;
        }
        Ok(())
    }

    /// Empty `dir` (at `path`) of everything this layer did not add.
    fn purge(&self, dir: &OwnedFd, path: &[u8], depth: usize) -> Result<(), Failure> {
        if depth > MAX_REMOVE_DEPTH {
            return Err(Failure::Refused(format!("the tree to remove is more than {MAX_REMOVE_DEPTH} levels deep")));
        }
        for name in names(dir)? {
            let mut child = path.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            self.hide_lower(dir, &name, &child, depth)?;
        }
        Ok(())
    }

    /// Make room for a new entry at `name` in `dir`: remove what is there, unless it is a
    /// directory and `keep_dir`. Returns whether a directory was kept.
    fn clear(&self, dir: &OwnedFd, name: &[u8], keep_dir: bool) -> Result<bool, Failure> {
        match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(Failure::Io("looking up the existing entry", e.into())),
            Ok(stat) if keep_dir && is_dir(&stat) => Ok(true),
            Ok(_) => remove(dir, name, 0).map(|()| false),
        }
    }

    fn file(&mut self, data: &mut impl Read, path: &[u8], m: &Member) -> Result<(), Failure> {
        let (parent, name) = split(path);
        let dir = self.open_dir(parent, true)?;
        self.clear(&dir, name, false)?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut file = File::from(
            rustix::fs::openat(&dir, os(name), flags, Mode::from_raw_mode(0o600)).doing("creating the file")?,
        );
        let mut tracked = Tracked { inner: data, failed: false };
        let copied = io::copy(&mut tracked, &mut file);
        let written = match copied {
            Ok(n) => n,
            Err(e) if tracked.failed => return Err(Failure::Io(READING, e)),
            Err(e) => return Err(Failure::Io("writing the file", e)),
        };
        self.stats.bytes += written;
        self.own(&file, m)?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(m.mode)).doing("setting the file's mode")?;
        self.xattrs(XattrTarget::Fd(&file), m)?;
        rustix::fs::futimens(&file, &timestamps(m.mtime)).doing("setting the file's mtime")?;
        Ok(())
    }

    fn dir(&mut self, path: &[u8], m: &Member) -> Result<(), Failure> {
        let fd = self.own_dir(path)?;
        self.own(&fd, m)?;
        self.xattrs(XattrTarget::Fd(&fd), m)?;
        if !self.privileged {
            // Keep it writable for the rest of the layer; the real mode comes in `finish`.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(m.mode | 0o700)).doing("setting the directory's mode")?;
        }
        self.dirs.push(DeferredDir { path: path.to_vec(), mode: m.mode, mtime: m.mtime });
        Ok(())
    }

    fn symlink(&mut self, path: &[u8], m: &Member) -> Result<(), Failure> {
        let target = m.link.as_deref().unwrap_or_default();
        if target.is_empty() || target.contains(&0) || target.len() > MAX_PATH {
            return Err(Failure::Refused(
                "the symbolic link's target is empty, holds a NUL byte or is too long".into(),
            ));
        }
        let (parent, name) = split(path);
        let dir = self.open_dir(parent, true)?;
        self.clear(&dir, name, false)?;
        // The target is stored verbatim: it is only ever resolved inside the guest (or inside
        // root by `openat2`), so an absolute or `..` target is harmless here.
        rustix::fs::symlinkat(os(target), &dir, os(name)).doing("creating the symbolic link")?;
        self.finish_node(&dir, name, m, false)
    }

    fn hard_link(&mut self, path: &[u8], m: &Member) -> Result<(), Failure> {
        let raw = m.link.as_deref().unwrap_or_default();
        let target =
            normalize(raw).map_err(|why| Failure::Refused(format!("its hard-link target is refused: {why}")))?;
        if target.is_empty() {
            return Err(Failure::Refused("the hard link points at the root".into()));
        }
        let (target_parent, target_name) = split(&target);
        let missing = || Failure::Refused(format!("the hard-link target {:?} does not exist in the image", shown(raw)));
        let target_dir = match self.open_dir(target_parent, false) {
            Err(Failure::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            other => other?,
        };
        let target_stat = match rustix::fs::statat(&target_dir, os(target_name), AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => return Err(missing()),
            other => other.doing("looking up the hard-link target")?,
        };
        if is_dir(&target_stat) {
            return Err(Failure::Refused("the hard-link target is a directory".into()));
        }
        let (parent, name) = split(path);
        let dir = self.open_dir(parent, true)?;
        if let Ok(existing) = rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            if existing.st_dev == target_stat.st_dev && existing.st_ino == target_stat.st_ino {
                // Already this very file (linked to itself, or through a symbolic link).
                return Ok(());
            }
        }
        self.clear(&dir, name, false)?;
        rustix::fs::linkat(&target_dir, os(target_name), &dir, os(name), AtFlags::empty())
            .doing("creating the hard link")?;
        Ok(())
    }

    fn node(&mut self, path: &[u8], m: &Member) -> Result<(), Failure> {
        let file_type = match m.kind {
            EntryType::Char => FileType::CharacterDevice,
            EntryType::Block => FileType::BlockDevice,
            _ => FileType::Fifo,
        };
        if file_type != FileType::Fifo && !self.privileged {
            tracing::debug!(entry = %m.shown, "skipping a device node: creating one needs root");
            self.stats.skipped += 1;
            return Ok(());
        }
        let (parent, name) = split(path);
        let dir = self.open_dir(parent, true)?;
        self.clear(&dir, name, false)?;
        let dev = rustix::fs::makedev(m.device.0, m.device.1);
        match rustix::fs::mknodat(&dir, os(name), file_type, Mode::from_raw_mode(0o600), dev) {
            Ok(()) => {}
            Err(Errno::PERM) if file_type != FileType::Fifo => {
                tracing::debug!(entry = %m.shown, "skipping a device node: mknod is not permitted here");
                self.stats.skipped += 1;
                return Ok(());
            }
            Err(e) => return Err(Failure::Io("creating the node", e.into())),
        }
        self.finish_node(&dir, name, m, true)
    }

    /// Owner, mode, xattrs and mtime of a symbolic link or node just created at `name` in `dir`.
    fn finish_node(&mut self, dir: &OwnedFd, name: &[u8], m: &Member, chmod: bool) -> Result<(), Failure> {
        if self.privileged {
            let (uid, gid) = ids(m)?;
            rustix::fs::chownat(dir, os(name), Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .doing("setting the owner")?;
        }
        if chmod {
            // fchmodat cannot refuse to follow a link on Linux, but this entry is the node created
            // a moment ago, and nothing else writes into root while a layer is applied.
            rustix::fs::chmodat(dir, os(name), Mode::from_raw_mode(m.mode), AtFlags::empty())
                .doing("setting the mode")?;
        }
        self.xattrs(XattrTarget::At(dir, name), m)?;
        rustix::fs::utimensat(dir, os(name), &timestamps(m.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .doing("setting the mtime")?;
        Ok(())
    }

    fn own(&self, fd: &impl AsFd, m: &Member) -> Result<(), Failure> {
        if !self.privileged {
            return Ok(());
        }
        let (uid, gid) = ids(m)?;
        rustix::fs::fchown(fd, Some(uid), Some(gid)).doing("setting the owner")
    }

    fn xattrs(&self, target: XattrTarget<'_>, m: &Member) -> Result<(), Failure> {
        for (name, value) in &m.xattrs {
            let set = match &target {
                XattrTarget::Fd(fd) => rustix::fs::fsetxattr(fd, os(name), value, XattrFlags::empty()),
                XattrTarget::At(dir, entry) => {
                    // There is no lsetxattrat: go through the directory's descriptor, which
                    // /proc resolves to exactly that directory; the entry itself is not followed.
                    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
                    path.extend_from_slice(entry);
                    rustix::fs::lsetxattr(os(&path), os(name), value, XattrFlags::empty())
                }
            };
            match set {
                Ok(()) => {}
                Err(e @ (Errno::PERM | Errno::ACCESS | Errno::OPNOTSUPP)) => {
                    tracing::warn!(entry = %m.shown, xattr = %String::from_utf8_lossy(name), error = %e,
                        "skipping an extended attribute this host does not allow");
                }
                Err(e) => return Err(Failure::Io("setting an extended attribute", e.into())),
            }
        }
        Ok(())
    }

    /// Set the deferred directory modes and mtimes, deepest first.
    fn finish(mut self) -> Result<LayerStats, ImageError> {
        for deferred in std::mem::take(&mut self.dirs).into_iter().rev() {
            let shown = shown(&deferred.path);
            let (parent, name) = split(&deferred.path);
            let opened = self
                .resolve(parent)
                .ok()
                .and_then(|dir| rustix::fs::openat(&dir, os(name), DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty()).ok());
            // None: removed or replaced later in the same layer.
            let Some(fd) = opened else { continue };
            let set = rustix::fs::fchmod(&fd, Mode::from_raw_mode(deferred.mode))
                .and_then(|()| rustix::fs::futimens(&fd, &timestamps(deferred.mtime)));
            set.map_err(|e| ImageError::LayerEntryIo {
                entry: shown,
                what: "setting the directory's mode and mtime".into(),
                source: e.into(),
            })?;
        }
        Ok(self.stats)
    }
}

enum XattrTarget<'a> {
    Fd(&'a dyn AsFd),
    At(&'a OwnedFd, &'a [u8]),
}

fn ids(m: &Member) -> Result<(rustix::fs::Uid, rustix::fs::Gid), Failure> {
    match (u32::try_from(m.uid), u32::try_from(m.gid)) {
        (Ok(uid), Ok(gid)) if uid != u32::MAX && gid != u32::MAX => {
            // SAFETY: any u32 but -1 (which chown reads as "leave unchanged") is a valid id.
            Ok(unsafe { (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid)) })
        }
        _ => Err(Failure::Refused(format!("its owner {}:{} is out of range", m.uid, m.gid))),
    }
}

/// The names in `dir`, without `.` and `..`.
fn names(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, Failure> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir).doing("reading a directory")? {
        let entry = entry.doing("reading a directory")?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Remove `name` in `dir`, a whole tree if it is a directory, never following symbolic links.
fn remove(dir: &OwnedFd, name: &[u8], depth: usize) -> Result<(), Failure> {
    match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(Failure::Io("removing an entry", e.into())),
    }
    if depth > MAX_REMOVE_DEPTH {
        return Err(Failure::Refused(format!("the tree to remove is more than {MAX_REMOVE_DEPTH} levels deep")));
    }
    let child = rustix::fs::openat(dir, os(name), DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())
        .doing("opening a directory to remove")?;
    for entry in names(&child)? {
        remove(&child, &entry, depth + 1)?;
    }
    rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR).doing("removing a directory")
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A layer built in memory.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Layer {
            Layer(tar::Builder::new(Vec::new()))
        }

        /// Any member, with the name written byte for byte (the builder refuses hostile ones).
        fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], mode: u32, data: &[u8]) -> Layer {
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

        fn header(kind: EntryType, mode: u32, size: u64) -> tar::Header {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_mtime(1_600_000_000);
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(size);
            header
        }

        fn file(mut self, path: &str, data: &[u8]) -> Layer {
            let mut header = Layer::header(EntryType::Regular, 0o644, data.len() as u64);
            self.0.append_data(&mut header, path, data).expect("appending to a Vec");
            self
        }

        fn dir(mut self, path: &str) -> Layer {
            let mut header = Layer::header(EntryType::Directory, 0o755, 0);
            self.0.append_data(&mut header, path, io::empty()).expect("appending to a Vec");
            self
        }

        fn symlink(mut self, path: &str, target: &str) -> Layer {
            let mut header = Layer::header(EntryType::Symlink, 0o777, 0);
            header.set_link_name_literal(target).expect("a short target");
            self.0.append_data(&mut header, path, io::empty()).expect("appending to a Vec");
            self
        }

        fn hard_link(self, path: &str, target: &str) -> Layer {
            self.raw(EntryType::Link, path.as_bytes(), target.as_bytes(), 0o644, b"")
        }

        fn whiteout(self, path: &str) -> Layer {
            self.raw(EntryType::Regular, path.as_bytes(), b"", 0o644, b"")
        }

        fn tar(self) -> Vec<u8> {
            self.0.into_inner().expect("finishing a Vec")
        }
    }

    fn gzip(tar: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).expect("writing to a Vec");
        gz.finish().expect("finishing a Vec")
    }

    /// A zstd stream of uncompressed blocks: a skippable frame, then `data` split over two frames.
    fn zstd(data: &[u8]) -> Vec<u8> {
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

    fn apply_all(root: &Path, layers: &[Vec<u8>]) -> Vec<LayerStats> {
        layers.iter().map(|layer| apply_layer(&layer[..], root).expect("applying a good layer")).collect()
    }

    fn refused(result: Result<LayerStats, ImageError>) -> String {
        match result {
            Err(ImageError::LayerEntryRefused { entry, reason }) => format!("{entry}: {reason}"),
            other => panic!("expected a refused entry, got {other:?}"),
        }
    }

    /// A root inside a scratch directory, with a sibling `outside` that must stay untouched.
    fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let scratch = tempfile::tempdir().expect("a temporary directory");
        let root = scratch.path().join("root");
        let outside = scratch.path().join("outside");
        fs::create_dir(&root).expect("creating root");
        fs::create_dir(&outside).expect("creating outside");
        (scratch, root, outside)
    }

    fn is_empty(dir: &Path) -> bool {
        fs::read_dir(dir).expect("listing a directory").next().is_none()
    }

    #[test]
    fn layer_whiteouts_delete_a_file_and_a_whole_directory_of_the_layer_below() {
        let (_scratch, root, _) = scratch();
        let lower = Layer::new()
            .file("etc/keep", b"k")
            .file("etc/gone", b"g")
            .file("var/cache/a", b"a")
            .file("var/cache/sub/b", b"b")
            .tar();
        let upper = Layer::new().whiteout("etc/.wh.gone").whiteout("./var/.wh.cache").whiteout(".wh.never-there").tar();
        let stats = apply_all(&root, &[lower, upper]);
        assert_eq!(stats[1], LayerStats { entries: 3, whiteouts: 3, bytes: 0, skipped: 0 });
        assert_eq!(fs::read(root.join("etc/keep")).unwrap(), b"k");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("etc/.wh.gone").exists());
        assert!(root.join("var").is_dir());
        assert!(!root.join("var/cache").exists());
        assert!(!root.join("var/.wh.cache").exists());
    }

    #[test]
    fn layer_opaque_directory_hides_lower_contents_and_keeps_its_own_in_either_order() {
        for marker_first in [true, false] {
            let (_scratch, root, _) = scratch();
            let lower = Layer::new()
                .file("d/old", b"o")
                .file("d/sub/older", b"o")
                .file("d/kept/old", b"o")
                .file("other/stays", b"s")
                .tar();
            let mut upper = Layer::new().dir("d");
            if marker_first {
                upper = upper.whiteout("d/.wh..wh..opq");
            }
            upper = upper.file("d/new", b"n").file("d/kept/new", b"n");
            if !marker_first {
                upper = upper.whiteout("d/.wh..wh..opq");
            }
            let stats = apply_all(&root, &[lower, upper.tar()]);
            assert_eq!(stats[1].whiteouts, 1, "marker first: {marker_first}");
            assert_eq!(fs::read(root.join("d/new")).unwrap(), b"n");
            assert_eq!(fs::read(root.join("d/kept/new")).unwrap(), b"n");
            assert!(!root.join("d/old").exists(), "marker first: {marker_first}");
            assert!(!root.join("d/sub").exists(), "marker first: {marker_first}");
            assert!(!root.join("d/kept/old").exists(), "marker first: {marker_first}");
            assert!(!root.join("d/.wh..wh..opq").exists());
            assert!(root.join("other/stays").exists());
        }
    }

    #[test]
    fn layer_whiteout_does_not_delete_what_the_same_layer_adds() {
        let (_scratch, root, _) = scratch();
        let lower = Layer::new().file("a/x", b"old").file("a/y", b"old").tar();
        let upper = Layer::new().file("a/x", b"new").whiteout("a/.wh.x").whiteout("a/.wh.y").tar();
        apply_all(&root, &[lower, upper]);
        assert_eq!(fs::read(root.join("a/x")).unwrap(), b"new");
        assert!(!root.join("a/y").exists());
    }

    #[test]
    fn layer_hard_link_shares_the_inode_of_its_target() {
        let (_scratch, root, _) = scratch();
        let layer =
            Layer::new().file("usr/bin/perl5.36", b"#!perl").hard_link("usr/bin/perl", "usr/bin/perl5.36").tar();
        apply_all(&root, &[layer]);
        let target = fs::metadata(root.join("usr/bin/perl5.36")).unwrap();
        let link = fs::metadata(root.join("usr/bin/perl")).unwrap();
        assert_eq!(target.ino(), link.ino());
        assert_eq!(link.nlink(), 2);
    }

    #[test]
    fn layer_symlinks_keep_their_target_verbatim() {
        let (_scratch, root, _) = scratch();
        let layer = Layer::new()
            .symlink("usr/bin/python", "/usr/bin/python3.11")
            .symlink("lib/up", "../../../../etc")
            .symlink("bin", "usr/bin")
            .tar();
        apply_all(&root, &[layer]);
        assert_eq!(fs::read_link(root.join("usr/bin/python")).unwrap(), Path::new("/usr/bin/python3.11"));
        assert_eq!(fs::read_link(root.join("lib/up")).unwrap(), Path::new("../../../../etc"));
        assert_eq!(fs::read_link(root.join("bin")).unwrap(), Path::new("usr/bin"));
    }

    #[test]
    fn layer_files_under_a_usrmerge_symlink_land_inside_root() {
        let (_scratch, root, _) = scratch();
        let lower = Layer::new().dir("usr/bin").symlink("bin", "/usr/bin").tar();
        apply_all(&root, &[lower]);
        let upper = Layer::new().file("bin/sh", b"#!").tar();
        match apply_layer(&upper[..], &root) {
            Ok(_) => assert_eq!(fs::read(root.join("usr/bin/sh")).unwrap(), b"#!"),
            // A kernel without openat2 refuses symbolic links on the way instead.
            Err(e) => assert!(matches!(e, ImageError::LayerEntryRefused { .. }), "{e}"),
        }
        assert!(fs::symlink_metadata(root.join("bin")).unwrap().file_type().is_symlink());
    }

    #[test]
    fn layer_modes_mtimes_and_owners_are_kept() {
        let (_scratch, root, _) = scratch();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = Layer::header(EntryType::Directory, 0o750, 0);
        header.set_mtime(1_000_000);
        header.set_uid(1234);
        header.set_gid(5678);
        builder.append_data(&mut header, "srv", io::empty()).unwrap();
        let mut header = Layer::header(EntryType::Regular, 0o4755, 2);
        header.set_mtime(2_000_000);
        header.set_uid(1000);
        header.set_gid(1001);
        builder.append_data(&mut header, "srv/tool", &b"ok"[..]).unwrap();
        let stats = apply_all(&root, &[builder.into_inner().unwrap()]);
        assert_eq!(stats[0], LayerStats { entries: 2, whiteouts: 0, bytes: 2, skipped: 0 });
        let dir = fs::metadata(root.join("srv")).unwrap();
        let tool = fs::metadata(root.join("srv/tool")).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o750);
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755);
        // The directory's mtime survives the file written into it afterwards.
        assert_eq!(dir.mtime(), 1_000_000);
        assert_eq!(tool.mtime(), 2_000_000);
        if rustix::process::geteuid().is_root() {
            assert_eq!((dir.uid(), dir.gid()), (1234, 5678));
            assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
        }
    }

    #[test]
    fn layer_xattrs_from_pax_headers_are_set() {
        let (_scratch, root, _) = scratch();
        let probe = root.join("probe");
        fs::write(&probe, b"").unwrap();
        if rustix::fs::setxattr(&probe, "user.probe", b"1", XattrFlags::empty()).is_err() {
            return; // This file system has no user xattrs; nothing to check.
        }
        let mut builder = tar::Builder::new(Vec::new());
        builder.append_pax_extensions([("SCHILY.xattr.user.moat", &b"yes"[..])]).unwrap();
        let mut header = Layer::header(EntryType::Regular, 0o644, 1);
        builder.append_data(&mut header, "tagged", &b"x"[..]).unwrap();
        apply_all(&root, &[builder.into_inner().unwrap()]);
        let mut value = [0u8; 8];
        let n = rustix::fs::getxattr(root.join("tagged"), "user.moat", &mut value).unwrap();
        assert_eq!(&value[..n], b"yes");
    }

    #[test]
    fn layer_device_nodes_are_made_as_root_and_skipped_otherwise() {
        let (_scratch, root, _) = scratch();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = Layer::header(EntryType::Char, 0o666, 0);
        header.set_device_major(1).unwrap();
        header.set_device_minor(3).unwrap();
        builder.append_data(&mut header, "dev/null", io::empty()).unwrap();
        let mut header = Layer::header(EntryType::Fifo, 0o620, 0);
        builder.append_data(&mut header, "run/pipe", io::empty()).unwrap();
        let stats = apply_all(&root, &[builder.into_inner().unwrap()]);
        let pipe = fs::metadata(root.join("run/pipe")).unwrap();
        assert!(pipe.file_type().is_fifo());
        assert_eq!(pipe.permissions().mode() & 0o777, 0o620);
        if stats[0].skipped == 0 {
            let null = fs::metadata(root.join("dev/null")).unwrap();
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
            assert_eq!(null.permissions().mode() & 0o777, 0o666);
        } else {
            assert!(!root.join("dev/null").exists());
        }
    }

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

    #[test]
    fn layer_paths_climbing_out_are_refused() {
        for name in [&b"../evil"[..], b"a/../../evil", b"./../evil", b"/../evil"] {
            let (scratch, root, outside) = scratch();
            let layer = Layer::new().raw(EntryType::Regular, name, b"", 0o644, b"x").tar();
            let why = refused(apply_layer(&layer[..], &root));
            assert!(why.contains(".."), "{why}");
            assert!(!scratch.path().join("evil").exists());
            assert!(is_empty(&root) && is_empty(&outside));
        }
    }

    #[test]
    fn layer_absolute_paths_are_taken_inside_root() {
        let (_scratch, root, _) = scratch();
        let layer = Layer::new().raw(EntryType::Regular, b"/etc/x", b"", 0o644, b"inside").tar();
        apply_all(&root, &[layer]);
        assert_eq!(fs::read(root.join("etc/x")).unwrap(), b"inside");
    }

    #[test]
    fn layer_writing_through_a_symlink_to_outside_stays_in_root() {
        for climbing in [false, true] {
            let (_scratch, root, outside) = scratch();
            // An absolute target naming the real outside directory, which also exists inside root,
            // or one that climbs far above root.
            let (target, landing) = if climbing {
                ("../../../../../../..".to_string(), root.clone())
            } else {
                let mirror = root.join(outside.strip_prefix("/").unwrap());
                fs::create_dir_all(&mirror).unwrap();
                (outside.to_str().unwrap().to_string(), mirror)
            };
            let lower = Layer::new().symlink("escape", &target).tar();
            let upper = Layer::new().file("escape/pwned", b"gotcha").tar();
            apply_all(&root, &[lower]);
            match apply_layer(&upper[..], &root) {
                // Resolved as the guest would see it: root is `/`.
                Ok(_) => assert_eq!(fs::read(landing.join("pwned")).unwrap(), b"gotcha"),
                // A kernel without openat2 refuses symbolic links on the way instead.
                Err(e) => assert!(matches!(e, ImageError::LayerEntryRefused { .. }), "{e}"),
            }
            assert!(is_empty(&outside), "a layer wrote outside root through {target}");
            assert!(!root.parent().unwrap().join("pwned").exists());
        }
    }

    #[test]
    fn layer_without_openat2_refuses_symlinks_on_the_way_but_applies_the_rest() {
        let (_scratch, root, outside) = scratch();
        let strict = |layer: Vec<u8>| apply_tar_with(&layer[..], Applier::new(&root, false).unwrap());
        let lower = Layer::new().dir("usr/bin").symlink("bin", "usr/bin").symlink("escape", "/").tar();
        strict(lower).unwrap();
        for path in ["bin/sh", "escape/tmp/pwned"] {
            let why = refused(strict(Layer::new().file(path, b"x").tar()));
            assert!(why.contains("symbolic link"), "{why}");
        }
        let stats = strict(Layer::new().file("usr/bin/sh", b"#!").whiteout("usr/bin/.wh.nothing").tar()).unwrap();
        assert_eq!(stats.entries, 2);
        assert_eq!(fs::read(root.join("usr/bin/sh")).unwrap(), b"#!");
        assert!(is_empty(&outside));
    }

    #[test]
    fn layer_writing_through_a_dangling_symlink_is_refused() {
        let (_scratch, root, outside) = scratch();
        let lower = Layer::new().symlink("escape", outside.to_str().unwrap()).tar();
        let upper = Layer::new().file("escape/pwned", b"gotcha").tar();
        apply_all(&root, &[lower]);
        let why = refused(apply_layer(&upper[..], &root));
        assert!(why.contains("symbolic link"), "{why}");
        assert!(is_empty(&outside));
    }

    #[test]
    fn layer_file_replacing_a_symlink_replaces_the_link_not_its_target() {
        let (_scratch, root, outside) = scratch();
        let victim = outside.join("victim");
        fs::write(&victim, b"original").unwrap();
        let lower =
            Layer::new().symlink("link", victim.to_str().unwrap()).symlink("dirlink", outside.to_str().unwrap()).tar();
        let upper = Layer::new().file("link", b"replaced").dir("dirlink").whiteout(".wh.nothing").tar();
        apply_all(&root, &[lower, upper]);
        assert_eq!(fs::read(&victim).unwrap(), b"original");
        assert!(fs::symlink_metadata(root.join("link")).unwrap().is_file());
        assert_eq!(fs::read(root.join("link")).unwrap(), b"replaced");
        assert!(fs::symlink_metadata(root.join("dirlink")).unwrap().is_dir());
        assert_eq!(fs::metadata(&outside).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn layer_hard_links_out_of_root_or_to_nothing_are_refused() {
        let (_scratch, root, outside) = scratch();
        let secret = outside.join("secret");
        fs::write(&secret, b"s").unwrap();
        let lower = Layer::new().symlink("escape", outside.to_str().unwrap()).tar();
        apply_all(&root, &[lower]);
        for target in ["../outside/secret", "escape/secret", "missing", secret.to_str().unwrap()] {
            let layer = Layer::new().hard_link("stolen", target).tar();
            let why = refused(apply_layer(&layer[..], &root));
            assert!(why.contains("hard-link target") || why.contains(".."), "{target}: {why}");
            assert!(!root.join("stolen").exists());
        }
        assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
    }

    #[test]
    fn layer_whiteouts_that_climb_out_are_refused() {
        let (scratch, root, outside) = scratch();
        fs::write(outside.join("keep"), b"k").unwrap();
        for name in [&b"../outside/.wh.keep"[..], b".wh...", b"a/.wh..", b".wh."] {
            let layer = Layer::new().raw(EntryType::Regular, name, b"", 0o644, b"").tar();
            refused(apply_layer(&layer[..], &root));
        }
        assert!(outside.join("keep").exists());
        assert!(scratch.path().join("root").exists());
    }

    #[test]
    fn layer_long_names_work_and_huge_extension_headers_are_refused() {
        let (_scratch, root, _) = scratch();
        let long = format!("{}/file", "d".repeat(150));
        let layer = Layer::new().file(&long, b"x").tar();
        apply_all(&root, &[layer]);
        assert!(root.join(&long).exists());

        let mut header = Layer::header(EntryType::GNULongName, 0o644, 2 << 20);
        header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, io::repeat(b'a').take(2 << 20)).unwrap();
        let err = apply_layer(&builder.into_inner().unwrap()[..], &root).unwrap_err();
        assert!(matches!(err, ImageError::LayerUnreadable { .. }), "{err}");
    }

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
