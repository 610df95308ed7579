//! Guest paths, checked before any system call sees them.

use moat_proto::hostfs::MAX_PATH;
use rustix::io::Errno;

/// The longest file name Linux allows (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// A path the guest named, relative to the shared directory: `/`-separated names, none empty,
/// `.`, `..` or holding NUL, so it can only go down. The root is the empty path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GuestPath<'a>(&'a str);

impl<'a> GuestPath<'a> {
    pub(crate) const ROOT: GuestPath<'static> = GuestPath("");

    pub(crate) fn parse(path: &'a str) -> Result<GuestPath<'a>, Errno> {
        if path.len() > MAX_PATH {
            return Err(Errno::NAMETOOLONG);
        }
        if !path.is_empty() {
            path.split('/').try_for_each(check_name)?;
        }
        Ok(GuestPath(path))
    }

    /// The path as `openat2` takes it beneath the root.
    pub(crate) fn as_relative(&self) -> &'a str {
        if self.0.is_empty() {
            "."
        } else {
            self.0
        }
    }

    /// The directory holding the last name, and that name; the root has neither.
    pub(crate) fn split_last(&self) -> Option<(GuestPath<'a>, &'a str)> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((dir, name)) => (GuestPath(dir), name),
            None => (GuestPath::ROOT, self.0),
        })
    }
}

/// One name of a path (a file name in a directory).
pub(crate) fn check_name(name: &str) -> Result<(), Errno> {
    if name.is_empty() || name == "." || name == ".." || name.contains('\0') || name.contains('/') {
        return Err(Errno::INVAL);
    }
    if name.len() > NAME_MAX {
        return Err(Errno::NAMETOOLONG);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_that_go_down_are_accepted() {
        for ok in ["", "a", "a/b", "a/.b", "..a/b..", "a b/ü", &"x".repeat(255)] {
            assert!(GuestPath::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in ["/", "/etc", "a/", "a//b", ".", "..", "a/../b", "a/./b", "../x", "a/..", "a\0b", "\0"] {
            assert_eq!(GuestPath::parse(bad), Err(Errno::INVAL), "{bad:?}");
        }
        assert_eq!(GuestPath::parse(&"x".repeat(256)), Err(Errno::NAMETOOLONG));
        assert_eq!(GuestPath::parse(&"a/".repeat(MAX_PATH / 2 + 1)), Err(Errno::NAMETOOLONG));
    }

    #[test]
    fn the_last_name_splits_off() {
        let p = |s| GuestPath::parse(s).unwrap();
        assert_eq!(p("").split_last(), None);
        assert_eq!(p("a").split_last(), Some((GuestPath::ROOT, "a")));
        assert_eq!(p("a/b/c").split_last(), Some((p("a/b"), "c")));
        assert_eq!(p("").as_relative(), ".");
        assert_eq!(p("a/b").as_relative(), "a/b");
    }
}
