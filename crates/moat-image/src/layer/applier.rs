//! Creating each member in the root: files, directories, links and nodes with their mode, owner,
//! extended attributes and mtime, never following the last component.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::io::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;

use super::member::Member;
use super::path::{normalize, os, split, MAX_PATH};
use super::whiteout::{remove, WHITEOUT};
use super::{shown, unreadable, LayerStats};
use crate::ImageError;

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

/// What a failure while streaming file data from the layer (not writing it) is reported as.
const READING: &str = "reading the layer";

pub(super) const DIR_FLAGS: OFlags = OFlags::DIRECTORY.union(OFlags::RDONLY).union(OFlags::CLOEXEC);

/// A directory whose mode and mtime are set once the whole layer is in, so that a read-only
/// directory can still be filled and later entries do not bump its mtime.
struct DeferredDir {
    path: Vec<u8>,
    mode: u32,
    mtime: i64,
}

pub(super) struct Applier {
    pub(super) root: OwnedFd,
    /// `openat2(RESOLVE_IN_ROOT)` works here; otherwise symbolic links on the way are refused.
    pub(super) in_root: bool,
    privileged: bool,
    /// Paths this layer created and their ancestors: whiteouts and opaque markers only remove
    /// what the layers below put there.
    pub(super) added: HashSet<Vec<u8>>,
    dirs: Vec<DeferredDir>,
    pub(super) stats: LayerStats,
}

/// Why an entry failed: refused as unsafe, or an I/O error while doing `what`.
pub(super) enum Failure {
    Refused(String),
    Io(&'static str, io::Error),
}

pub(super) trait Doing<T> {
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

pub(super) fn is_dir(stat: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::Directory
}

impl Applier {
    /// `try_openat2: false` forces the fallback that refuses symbolic links on the way (tests).
    pub(super) fn new(root: &Path, try_openat2: bool) -> Result<Applier, ImageError> {
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

    pub(super) fn apply(&mut self, data: &mut impl Read, member: Member) -> Result<(), ImageError> {
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
    pub(super) fn record(&mut self, path: &[u8]) {
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

    /// Make room for a new entry at `name` in `dir`: remove what is there, unless it is a
    /// directory and `keep_dir`. Returns whether a directory was kept.
    pub(super) fn clear(&self, dir: &OwnedFd, name: &[u8], keep_dir: bool) -> Result<bool, Failure> {
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
    pub(super) fn finish(mut self) -> Result<LayerStats, ImageError> {
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::Path;

    use rustix::fs::XattrFlags;
    use tar::EntryType;

    use crate::layer::fixture::{apply_all, scratch, Layer};
    use crate::layer::LayerStats;

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
        if let Err(e) = rustix::fs::setxattr(&probe, "user.probe", b"1", XattrFlags::empty()) {
            panic!(
                "{} has no user xattrs ({e}); run the tests with TMPDIR on a file system that has them (ext4, xfs, btrfs)",
                root.display()
            );
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
}
