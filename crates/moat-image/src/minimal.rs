//! The built-in `minimal` image: the host's static busybox with a link per applet and the few
//! files a shell expects, on ext4. Built locally from installed packages, so it needs no network.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::store::{Image, ImageConfig, ImageStore, Provenance, MINIMAL};
use crate::{disk, elf, ImageError};

/// Bump when the build below changes in a way the tables do not show (they are hashed too).
const RECIPE: &str = "moat-minimal-2";
const BUSYBOX: &str = "/bin/busybox";
/// Size of the file system; the raw file is sparse and qcow2 keeps only used blocks, so this
/// costs nothing until the guest writes.
const FS_SIZE: u64 = 1 << 30;
const LABEL: &str = "moat-root";

const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    // Parents too: the daemon's umask (077) would make them the owner's alone.
    ("usr", 0o755),
    ("var", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("var/tmp", 0o1777),
    ("root", 0o700),
    ("home", 0o755),
];

const FILES: &[(&str, &str)] = &[
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hostname", "moat\n"),
    // Empty until the agent writes the sandbox's id into it (as systemd images ship it).
    ("etc/machine-id", ""),
    ("etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"),
    (
        "etc/os-release",
        "NAME=\"moat minimal\"\nID=moat-minimal\nPRETTY_NAME=\"moat minimal (busybox)\"\nHOME_URL=\"\"\n",
    ),
    (
        "etc/profile",
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\h:\\w\\$ '\n",
    ),
];

/// Applets not linked: the agent is PID 1, so busybox's init must not be mistaken for one.
const SKIPPED_APPLETS: &[&str] = &["sbin/init", "linuxrc"];

fn config() -> ImageConfig {
    ImageConfig {
        env: vec![
            ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("HOME".into(), "/root".into()),
        ],
        working_dir: Some("/".into()),
        user: None,
        entrypoint: Vec::new(),
        cmd: vec!["/bin/sh".into()],
    }
}

/// The digest of the recipe and its one input, the busybox binary.
fn digest(busybox: &[u8]) -> String {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(RECIPE.as_bytes());
    for (dir, mode) in DIRS {
        field(format!("{dir} {mode:o}").as_bytes());
    }
    for (path, text) in FILES {
        field(path.as_bytes());
        field(text.as_bytes());
    }
    field(SKIPPED_APPLETS.join(",").as_bytes());
    field(&FS_SIZE.to_le_bytes());
    field(busybox);
    field(&serde_json::to_vec(&config()).expect("ImageConfig serializes"));
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The minimal image, built into `store` unless this recipe with this busybox already is.
impl ImageStore {
    /// The image called `name`. The built-in `minimal` image is built on first use (a few
    /// seconds, no network) and rebuilt when its recipe or the host's busybox changes. It is
    /// defined here, beside the one image the store makes itself, so the store never imports
    /// this module.
    pub fn resolve(&self, name: &str) -> Result<Image, ImageError> {
        if name == MINIMAL {
            return resolve(self);
        }
        self.lookup(name)
    }
}

fn resolve(store: &ImageStore) -> Result<Image, ImageError> {
    let busybox_path = Path::new(BUSYBOX);
    let unusable = |why: String| ImageError::BusyboxUnusable { path: busybox_path.to_path_buf(), why };
    match elf::check_static(busybox_path) {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Err(unusable(why)),
        Err(e) => return Err(unusable(format!("it cannot be read: {e}"))),
    }
    let busybox = std::fs::read(busybox_path).map_err(|e| unusable(format!("it cannot be read: {e}")))?;
    let digest = digest(&busybox);
    if let Some(mut image) = store.load(&digest)? {
        store.ensure_named(MINIMAL, &digest)?;
        image.name = MINIMAL.into();
        return Ok(image);
    }
    let started = std::time::Instant::now();
    let staging = store.stage()?;
    let tree = staging.path().join("tree");
    let raw = staging.path().join("root.ext4");
    build_tree(&tree, &busybox)?;
    disk::make_ext4(&tree, &raw, FS_SIZE, LABEL, disk::Owners::AllRoot)?;
    disk::convert_to_qcow2(&raw, &staging.base())?;
    std::fs::remove_file(&raw).map_err(ImageError::io(format!("removing {}", raw.display())))?;
    std::fs::remove_dir_all(&tree).map_err(ImageError::io(format!("removing {}", tree.display())))?;
    let image = store.commit(
        staging,
        MINIMAL,
        &digest,
        config(),
        Provenance { source: "built-in".into(), layers: Vec::new() },
    )?;
    tracing::info!(digest = %image.digest, elapsed_ms = started.elapsed().as_millis() as u64, "built the minimal image");
    Ok(image)
}

/// The root tree: directories, busybox and a relative link per applet, and /etc.
fn build_tree(tree: &Path, busybox: &[u8]) -> Result<(), ImageError> {
    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(ImageError::io(format!("setting the mode of {}", path.display())))
    };
    for (dir, mode) in DIRS {
        let path = tree.join(dir);
        std::fs::create_dir_all(&path).map_err(ImageError::io(format!("creating {}", path.display())))?;
        set_mode(&path, *mode)?;
    }
    let bin = tree.join("bin/busybox");
    std::fs::write(&bin, busybox).map_err(ImageError::io(format!("writing {}", bin.display())))?;
    set_mode(&bin, 0o755)?;
    for applet in applets()? {
        let link = tree.join(&applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        let parent = link.parent().expect("an applet path has a directory");
        std::fs::create_dir_all(parent).map_err(ImageError::io(format!("creating {}", parent.display())))?;
        symlink(link_target(&applet), &link).map_err(ImageError::io(format!("linking {}", link.display())))?;
    }
    for (path, text) in FILES {
        let file = tree.join(path);
        std::fs::write(&file, text).map_err(ImageError::io(format!("writing {}", file.display())))?;
        set_mode(&file, 0o644)?;
    }
    Ok(())
}

/// `busybox --list-full`: `usr/bin/awk`, `sbin/ip`, …; only plain relative paths are taken.
fn applets() -> Result<Vec<String>, ImageError> {
    let out = Command::new(BUSYBOX).arg("--list-full").output().map_err(|source| ImageError::ToolMissing {
        tool: BUSYBOX.into(),
        package: "busybox-static".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(ImageError::BusyboxUnusable {
            path: BUSYBOX.into(),
            why: format!("`busybox --list-full` failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let applets: Vec<String> = list
        .lines()
        .map(|l| l.trim().trim_start_matches('/'))
        .filter(|a| {
            let plain = Path::new(a).components().all(|c| matches!(c, Component::Normal(_)));
            plain && a.contains('/') && !a.contains(['"', ' ']) && *a != "bin/busybox" && !SKIPPED_APPLETS.contains(a)
        })
        .map(str::to_string)
        .collect();
    if applets.is_empty() {
        return Err(ImageError::BusyboxUnusable {
            path: BUSYBOX.into(),
            why: "`busybox --list-full` listed no applets".into(),
        });
    }
    Ok(applets)
}

/// `usr/bin/awk` → `../../bin/busybox`, `bin/ls` → `busybox`: relative, so the links also resolve
/// when the disk is mounted somewhere else (as the agent does before it pivots).
fn link_target(applet: &str) -> String {
    let depth = applet.matches('/').count();
    if applet.starts_with("bin/") && depth == 1 {
        "busybox".into()
    } else {
        format!("{}bin/busybox", "../".repeat(depth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applet_links_are_relative_to_bin_busybox() {
        assert_eq!(link_target("bin/ls"), "busybox");
        assert_eq!(link_target("sbin/ip"), "../bin/busybox");
        assert_eq!(link_target("usr/bin/awk"), "../../bin/busybox");
        let list = applets().unwrap();
        assert!(list.iter().any(|a| a == "bin/sh") && list.iter().any(|a| a == "usr/bin/env"), "{list:?}");
        assert!(!list.iter().any(|a| a == "sbin/init" || a == "linuxrc"));
    }

    #[test]
    fn the_tree_has_busybox_applets_and_etc() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        build_tree(&tree, &std::fs::read(BUSYBOX).unwrap()).unwrap();
        for a in applets().unwrap() {
            let link = tree.join(&a);
            assert_eq!(
                std::fs::canonicalize(&link).unwrap(),
                std::fs::canonicalize(tree.join("bin/busybox")).unwrap(),
                "{a}"
            );
        }
        let passwd = std::fs::read_to_string(tree.join("etc/passwd")).unwrap();
        assert!(passwd.starts_with("root:x:0:0:root:/root:/bin/sh\n") && passwd.contains("nobody:x:65534:65534"));
        let mode = |p: &str| std::fs::metadata(tree.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode("tmp"), mode("var/tmp"), mode("root"), mode("bin/busybox")), (0o1777, 0o1777, 0o700, 0o755));
        assert!(std::fs::read_to_string(tree.join("etc/os-release")).unwrap().contains("ID=moat-minimal"));
    }

    #[test]
    fn the_digest_follows_the_recipe_inputs() {
        assert_eq!(digest(b"busybox-1"), digest(b"busybox-1"));
        assert_ne!(digest(b"busybox-1"), digest(b"busybox-2"));
        assert!(digest(b"x").starts_with("sha256:") && digest(b"x").len() == 7 + 64);
    }

    /// The real build: ext4 + qcow2 in a fresh store, reused on the second resolve, and a thin
    /// overlay whose backing file is the base.
    #[test]
    fn the_minimal_image_builds_once_and_overlays_are_backed_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let image = store.resolve(MINIMAL).expect("builds (needs busybox-static, e2fsprogs, qemu-utils)");
        assert_eq!((image.name.as_str(), image.size_bytes), (MINIMAL, FS_SIZE));
        assert!(image.base.starts_with(dir.path().join("sha256")));
        let info = disk::info(&image.base).unwrap();
        assert_eq!((info.format.as_str(), info.virtual_size), ("qcow2", FS_SIZE));
        assert!(std::fs::metadata(&image.base).unwrap().len() < 64 << 20, "only used blocks are stored");

        let modified = std::fs::metadata(&image.base).unwrap().modified().unwrap();
        let again = ImageStore::open(dir.path()).unwrap().resolve(MINIMAL).unwrap();
        assert_eq!(again, image);
        assert_eq!(std::fs::metadata(&image.base).unwrap().modified().unwrap(), modified, "not rebuilt");
        assert_eq!(store.list().unwrap(), vec![image.clone()]);

        // The file system: labelled, root-owned, busybox and relative links inside.
        let raw = dir.path().join("check.raw");
        let status =
            Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&image.base).arg(&raw).status().unwrap();
        assert!(status.success());
        let debugfs = |req: &str| {
            let out = Command::new("debugfs").args(["-R", req]).arg(&raw).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let stat = debugfs("stat /bin/busybox");
        assert!(stat.contains("User:     0") && stat.contains("Group:     0"), "{stat}");
        assert!(debugfs("stat /usr/bin/awk").contains("Fast link dest: \"../../bin/busybox\""));
        let label = Command::new("e2label").arg(&raw).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), LABEL);
        let fsck = Command::new("e2fsck").args(["-fn"]).arg(&raw).output().unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
        std::fs::remove_file(&raw).unwrap();

        let overlay = dir.path().join("sandbox.qcow2");
        store.create_overlay(&image, &overlay, Some(2 << 30)).unwrap();
        let info = disk::info(&overlay).unwrap();
        assert_eq!(info.backing_file.as_deref(), Some(std::fs::canonicalize(&image.base).unwrap().to_str().unwrap()));
        assert_eq!(info.virtual_size, 2 << 30);
        let staged: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
            .collect();
        assert!(staged.is_empty(), "no staging directories left");
    }
}
