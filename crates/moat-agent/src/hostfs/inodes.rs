//! The FUSE inode numbers of one host mount and the paths they stand for.
//!
//! Calls name files by path, so every inode the kernel holds maps to the path it was looked up
//! by. Numbers are the agent's own (never reused, so the generation is always 0); the kernel's
//! lookup count decides when one is dropped. A rename moves a whole subtree, an unlink or rmdir
//! detaches one: an inode without a path answers ENOENT until the kernel forgets it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;

use moat_proto::hostfs::{Kind, MAX_PATH};

/// `FUSE_ROOT_ID`: the mount's root, the empty path.
pub(crate) const ROOT: u64 = 1;

/// What a directory listing says for an entry the kernel has not looked up (libfuse's
/// `FUSE_UNKNOWN_INO`): its real number comes with `stat`.
pub(crate) const UNKNOWN_INO: u64 = 0xffff_ffff;

#[derive(Debug)]
struct Node {
    /// `None` once the file was removed or replaced under this inode.
    path: Option<String>,
    kind: Kind,
    /// Lookups the kernel has not forgotten yet.
    nlookup: u64,
}

/// The inode ↔ path table of one mount.
#[derive(Debug)]
pub(crate) struct Inodes {
    nodes: HashMap<u64, Node>,
    /// Ordered, so a directory's descendants (`dir/…`) are one range.
    by_path: BTreeMap<String, u64>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Inodes {
        let root = Node { path: Some(String::new()), kind: Kind::Dir, nlookup: 1 };
        Inodes {
            nodes: HashMap::from([(ROOT, root)]),
            by_path: BTreeMap::from([(String::new(), ROOT)]),
            next: ROOT + 1,
        }
    }
}

/// `parent/name`, or `name` under the root.
pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// The directory holding `path` ("" for the root's children and the root itself).
pub(crate) fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

/// The longest file name Linux has (`NAME_MAX`); the kernel refuses listings with longer ones.
const NAME_MAX: usize = 255;

/// Whether `name` can be one component of a call's path.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= NAME_MAX && name != "." && name != ".." && !name.contains(['/', '\0'])
}

impl Inodes {
    /// The path of inode `ino`, or the errno that answers a call on it.
    pub(crate) fn path(&self, ino: u64) -> Result<&str, i32> {
        let node = self.nodes.get(&ino).ok_or(libc::ESTALE)?;
        node.path.as_deref().ok_or(libc::ENOENT)
    }

    /// The path of `name` in directory `parent`, checked the way the host will check it.
    pub(crate) fn child(&self, parent: u64, name: &OsStr) -> Result<String, i32> {
        let name = name.to_str().ok_or(libc::EINVAL)?;
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        if !valid_name(name) {
            return Err(libc::EINVAL);
        }
        let path = join(self.path(parent)?, name);
        if path.len() > MAX_PATH {
            return Err(libc::ENAMETOOLONG);
        }
        Ok(path)
    }

    /// The inode of `path` if the kernel holds one.
    pub(crate) fn known(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// Count one more kernel lookup of `path`, a file of `kind`, and return its inode. A path
    /// whose file became another kind (replaced on the host) gets a fresh inode.
    pub(crate) fn remember(&mut self, path: &str, kind: Kind) -> u64 {
        if let Some(ino) = self.known(path) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                if node.kind == kind || ino == ROOT {
                    node.nlookup += 1;
                    return ino;
                }
            }
            self.removed(path);
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, Node { path: Some(path.to_string()), kind, nlookup: 1 });
        self.by_path.insert(path.to_string(), ino);
        ino
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub(crate) fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.nodes.get_mut(&ino) else { return };
        node.nlookup = node.nlookup.saturating_sub(n);
        if node.nlookup == 0 {
            if let Some(path) = self.nodes.remove(&ino).and_then(|n| n.path) {
                if self.by_path.get(&path) == Some(&ino) {
                    self.by_path.remove(&path);
                }
            }
        }
    }

    /// `path` and everything below it no longer exist (unlink, rmdir, replaced by a rename).
    pub(crate) fn removed(&mut self, path: &str) {
        if path.is_empty() {
            return; // The root stays.
        }
        for (_, ino) in self.take_subtree(path) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.path = None;
            }
        }
    }

    /// `from` was renamed to `to` (with everything below it); with `exchange`, `to` moved to
    /// `from` at the same time.
    pub(crate) fn renamed(&mut self, from: &str, to: &str, exchange: bool) {
        if from.is_empty() || to.is_empty() || from == to {
            return;
        }
        let moving = self.take_subtree(from);
        let other = self.take_subtree(to);
        if exchange {
            self.place(other, to, from);
        } else {
            for (_, ino) in other {
                if let Some(node) = self.nodes.get_mut(&ino) {
                    node.path = None;
                }
            }
        }
        self.place(moving, from, to);
    }

    /// Remove `path` and its descendants from the path index, returning them.
    fn take_subtree(&mut self, path: &str) -> Vec<(String, u64)> {
        let prefix = format!("{path}/");
        let mut taken: Vec<(String, u64)> = self
            .by_path
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        if let Some(ino) = self.by_path.get(path) {
            taken.push((path.to_string(), *ino));
        }
        for (p, _) in &taken {
            self.by_path.remove(p);
        }
        taken
    }

    /// Put paths taken from under `old` back under `new`.
    fn place(&mut self, entries: Vec<(String, u64)>, old: &str, new: &str) {
        for (path, ino) in entries {
            let moved = format!("{new}{}", &path[old.len()..]);
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.path = Some(moved.clone());
            }
            self.by_path.insert(moved, ino);
        }
    }

    /// How many inodes the kernel holds (the root included).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn looked_up(t: &mut Inodes, path: &str, kind: Kind) -> u64 {
        let ino = t.remember(path, kind);
        assert_eq!(t.path(ino), Ok(path));
        ino
    }

    #[test]
    fn lookups_name_children_of_their_parent() {
        let mut t = Inodes::default();
        assert_eq!(t.path(ROOT), Ok(""));
        assert_eq!(t.child(ROOT, OsStr::new("src")), Ok("src".into()));
        let src = looked_up(&mut t, "src", Kind::Dir);
        assert_eq!(t.child(src, OsStr::new("main.rs")), Ok("src/main.rs".into()));
        assert_eq!(t.remember("src", Kind::Dir), src, "a second lookup is the same inode");
        for bad in ["", ".", "..", "a/b"] {
            assert_eq!(t.child(src, OsStr::new(bad)), Err(libc::EINVAL), "{bad:?}");
        }
        assert_eq!(t.child(src, OsStr::new(&"n".repeat(256))), Err(libc::ENAMETOOLONG));
        let deep = t.remember(&vec!["d".repeat(200); 20].join("/"), Kind::Dir);
        assert_eq!(t.child(deep, OsStr::new(&"n".repeat(100))), Err(libc::ENAMETOOLONG), "over MAX_PATH");
        assert_eq!(t.child(999, OsStr::new("a")), Err(libc::ESTALE), "unknown inode");
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(t.child(ROOT, OsStr::from_bytes(b"\xff")), Err(libc::EINVAL), "not UTF-8");
    }

    #[test]
    fn renaming_a_directory_moves_everything_below_it() {
        let mut t = Inodes::default();
        let a = looked_up(&mut t, "a", Kind::Dir);
        let b = looked_up(&mut t, "a/b", Kind::Dir);
        let c = looked_up(&mut t, "a/b/c.txt", Kind::File);
        let sibling = looked_up(&mut t, "ab", Kind::File); // shares the prefix "a", not "a/"
        t.renamed("a", "z/y", false);
        assert_eq!(t.path(a), Ok("z/y"));
        assert_eq!(t.path(b), Ok("z/y/b"));
        assert_eq!(t.path(c), Ok("z/y/b/c.txt"));
        assert_eq!(t.path(sibling), Ok("ab"));
        assert_eq!(t.known("a/b"), None);
        assert_eq!(t.known("z/y/b/c.txt"), Some(c));
        assert_eq!(t.child(b, OsStr::new("new")), Ok("z/y/b/new".into()));
    }

    #[test]
    fn a_rename_over_a_file_detaches_the_one_replaced() {
        let mut t = Inodes::default();
        let from = looked_up(&mut t, "new", Kind::File);
        let old = looked_up(&mut t, "config", Kind::File);
        t.renamed("new", "config", false);
        assert_eq!(t.path(from), Ok("config"));
        assert_eq!(t.path(old), Err(libc::ENOENT));
        assert_eq!(t.known("new"), None);
        t.forget(old, 1);
        assert_eq!(t.path(from), Ok("config"), "forgetting the replaced inode keeps the path");
    }

    #[test]
    fn an_exchange_swaps_both_subtrees() {
        let mut t = Inodes::default();
        let x = looked_up(&mut t, "x", Kind::Dir);
        let x1 = looked_up(&mut t, "x/1", Kind::File);
        let y = looked_up(&mut t, "y", Kind::Dir);
        let y2 = looked_up(&mut t, "y/2", Kind::File);
        t.renamed("x", "y", true);
        assert_eq!((t.path(x), t.path(x1)), (Ok("y"), Ok("y/1")));
        assert_eq!((t.path(y), t.path(y2)), (Ok("x"), Ok("x/2")));
    }

    #[test]
    fn removal_detaches_and_forget_frees() {
        let mut t = Inodes::default();
        let d = looked_up(&mut t, "d", Kind::Dir);
        let f = looked_up(&mut t, "d/f", Kind::File);
        t.remember("d/f", Kind::File); // two lookups
        t.removed("d");
        assert_eq!((t.path(d), t.path(f)), (Err(libc::ENOENT), Err(libc::ENOENT)));
        let again = t.remember("d", Kind::Dir);
        assert_ne!(again, d, "a new directory at the same path is a new inode");
        t.forget(f, 1);
        assert_eq!(t.path(f), Err(libc::ENOENT), "one lookup is still held");
        t.forget(f, 1);
        assert_eq!(t.path(f), Err(libc::ESTALE), "all lookups forgotten: gone");
        t.forget(d, 5);
        t.forget(ROOT, 100);
        assert_eq!(t.path(ROOT), Ok(""), "the root is never forgotten");
        assert_eq!(t.len(), 2, "the root and the new d");
        t.forget(again, 1);
        assert_eq!(t.known("d"), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn forgetting_an_old_inode_keeps_the_path_of_a_new_one() {
        let mut t = Inodes::default();
        let file = looked_up(&mut t, "p", Kind::File);
        let dir = looked_up(&mut t, "p", Kind::Dir); // replaced on the host by a directory
        assert_ne!(file, dir);
        assert_eq!(t.path(file), Err(libc::ENOENT));
        t.forget(file, 1);
        assert_eq!(t.known("p"), Some(dir));
    }

    #[test]
    fn paths_split_and_join() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
        assert_eq!(parent_of("a/b/c"), "a/b");
        assert_eq!(parent_of("a"), "");
    }
}
