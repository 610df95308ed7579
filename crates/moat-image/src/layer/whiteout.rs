//! Whiteouts: `.wh.<name>` removes `<name>` of the layers below, `.wh..wh..opq` empties a
//! directory of what they put there; never what this layer added, never following a link.

use std::io;
use std::os::unix::io::OwnedFd;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::applier::{is_dir, Applier, Doing, Failure, DIR_FLAGS};
use super::path::os;

/// Deepest directory tree a whiteout removes; bounds recursion and open descriptors.
const MAX_REMOVE_DEPTH: usize = 512;

pub(super) const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

impl Applier {
    pub(super) fn whiteout(&mut self, parent: &[u8], name: &[u8]) -> Result<(), Failure> {
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
pub(super) fn remove(dir: &OwnedFd, name: &[u8], depth: usize) -> Result<(), Failure> {
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

    use tar::EntryType;

    use crate::layer::apply_layer;
    use crate::layer::fixture::{apply_all, refused, scratch, Layer};
    use crate::layer::LayerStats;

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
}
