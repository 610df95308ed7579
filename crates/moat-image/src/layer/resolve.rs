//! Opening directories inside the root: symbolic links on the way are followed as the guest
//! would see them (`openat2(RESOLVE_IN_ROOT)`), or refused on a kernel without it.

use std::io;
use std::os::unix::io::OwnedFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::applier::{Applier, Doing, Failure, DIR_FLAGS};
use super::path::{os, split};

impl Applier {
    /// Open the directory `path` (relative to root), following symbolic links only inside root;
    /// with `create`, make missing directories (mode 0755, as Docker does).
    pub(super) fn open_dir(&self, path: &[u8], create: bool) -> Result<OwnedFd, Failure> {
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
    pub(super) fn own_dir(&self, path: &[u8]) -> Result<OwnedFd, Failure> {
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
    pub(super) fn resolve(&self, path: &[u8]) -> Result<OwnedFd, Failure> {
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
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use crate::layer::applier::Applier;
    use crate::layer::fixture::{apply_all, is_empty, refused, scratch, Layer};
    use crate::layer::{apply_layer, apply_tar_with};
    use crate::ImageError;

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
}
