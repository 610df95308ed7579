//! The image store: content-addressed read-only bases (qcow2) and their metadata.
//!
//! ```text
//! <root>/<digest-hex>/base.qcow2    the base disk, never written after it is registered
//! <root>/<digest-hex>/image.json    the Image record
//! <root>/index.json                 name → digest
//! ```
//! An image is built in a temporary directory inside the store and renamed into place, so an
//! interrupted build leaves nothing registered (only a `tmp-*` directory that gc removes).

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// Bumped whenever the minimal image's recipe changes.
const MINIMAL_RECIPE: &str = "moat-minimal-1";
/// Virtual size of the minimal image's file system; only used blocks take space.
const MINIMAL_SIZE: u64 = 1 << 30;
const BUSYBOX: &str = "/bin/busybox";

/// How processes start in an image, as in an OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A registered image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// `sha256:<hex>` identifying the base's content (for built images: its recipe and inputs).
    pub digest: String,
    pub base: PathBuf,
    pub config: ImageConfig,
    /// Virtual size of the base disk.
    pub size_bytes: u64,
}

pub struct ImageStore {
    root: PathBuf,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

fn run(cmd: &mut Command, hint: &str) -> Result<(), ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Tool { command: format!("{cmd:?}"), output: format!("{e}; {hint}") })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            command: format!("{cmd:?}"),
            output: format!("{} {}", String::from_utf8_lossy(&out.stderr).trim(), String::from_utf8_lossy(&out.stdout).trim()),
        });
    }
    Ok(())
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
        Ok(ImageStore { root: root.to_path_buf() })
    }

    fn index(&self) -> BTreeMap<String, String> {
        std::fs::read(self.root.join("index.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn load(&self, digest: &str) -> Option<Image> {
        let hex = digest.strip_prefix("sha256:")?;
        let b = std::fs::read(self.root.join(hex).join("image.json")).ok()?;
        serde_json::from_slice::<Image>(&b).ok().filter(|i| i.base.is_file())
    }

    /// The image called `name`; the built-in `minimal` image is built on first use.
    pub fn resolve(&self, name: &str) -> Result<Image, ImageError> {
        if name == "minimal" {
            return self.minimal();
        }
        self.index()
            .get(name)
            .and_then(|d| self.load(d))
            .ok_or_else(|| ImageError::NotFound(name.to_string()))
    }

    fn register(&self, image: &Image) -> Result<(), ImageError> {
        let mut index = self.index();
        index.insert(image.name.clone(), image.digest.clone());
        let tmp = tempfile::NamedTempFile::new_in(&self.root).map_err(io("creating a temp file"))?;
        std::fs::write(tmp.path(), serde_json::to_vec_pretty(&index).expect("index serializes")).map_err(io("writing index.json"))?;
        tmp.persist(self.root.join("index.json")).map_err(|e| ImageError::Io { what: "writing index.json".into(), source: e.error })?;
        Ok(())
    }

    fn minimal(&self) -> Result<Image, ImageError> {
        let busybox = std::fs::read(BUSYBOX).map_err(|e| ImageError::Tool {
            command: format!("reading {BUSYBOX}"),
            output: format!("{e}; install it with `apt-get install busybox-static`"),
        })?;
        let mut h = Sha256::new();
        h.update(MINIMAL_RECIPE);
        h.update(&busybox);
        let hex = hex::encode(h.finalize());
        let digest = format!("sha256:{hex}");
        if let Some(image) = self.load(&digest) {
            return Ok(image);
        }
        let work = tempfile::Builder::new().prefix("tmp-").tempdir_in(&self.root).map_err(io("creating a build directory"))?;
        let tree = work.path().join("tree");
        build_minimal_tree(&tree)?;
        let raw = work.path().join("root.ext4");
        let f = std::fs::File::create(&raw).map_err(io("creating the ext4 file"))?;
        f.set_len(MINIMAL_SIZE).map_err(io("sizing the ext4 file"))?;
        drop(f);
        run(
            Command::new("mkfs.ext4").args(["-q", "-F", "-L", "moat-root", "-E", "root_owner=0:0", "-d"]).arg(&tree).arg(&raw),
            "install it with `apt-get install e2fsprogs`",
        )?;
        let final_dir = self.root.join(&hex);
        let base = final_dir.join("base.qcow2");
        run(
            Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(work.path().join("base.qcow2")),
            "install it with `apt-get install qemu-utils`",
        )?;
        std::fs::remove_file(&raw).map_err(io("removing the raw ext4 file"))?;
        std::fs::remove_dir_all(&tree).map_err(io("removing the build tree"))?;
        let image = Image {
            name: "minimal".into(),
            digest: digest.clone(),
            base,
            config: ImageConfig {
                env: vec![("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())],
                working_dir: Some("/".into()),
                user: None,
                entrypoint: vec![],
                cmd: vec!["/bin/sh".into()],
            },
            size_bytes: MINIMAL_SIZE,
        };
        std::fs::write(work.path().join("image.json"), serde_json::to_vec_pretty(&image).expect("image serializes"))
            .map_err(io("writing image.json"))?;
        let work = work.keep();
        if let Err(e) = std::fs::rename(&work, &final_dir) {
            let _ = std::fs::remove_dir_all(&work);
            // Another process built the same image at the same time; use theirs.
            return self.load(&digest).ok_or(ImageError::Io { what: format!("registering {}", final_dir.display()), source: e });
        }
        self.register(&image)?;
        Ok(image)
    }

    /// Create a thin qcow2 overlay on the image's base; `size` grows the virtual disk.
    pub fn create_overlay(&self, image: &Image, overlay: &Path, size: Option<u64>) -> Result<(), ImageError> {
        let base = std::fs::canonicalize(&image.base).map_err(io(format!("resolving {}", image.base.display())))?;
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(overlay);
        if let Some(s) = size.filter(|&s| s > image.size_bytes) {
            cmd.arg(s.to_string());
        }
        run(&mut cmd, "install it with `apt-get install qemu-utils`")
    }
}

/// The root tree of the minimal image: busybox and its applets, and the few files a shell expects.
fn build_minimal_tree(tree: &Path) -> Result<(), ImageError> {
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "var/tmp", "tmp", "root", "home"] {
        std::fs::create_dir_all(tree.join(d)).map_err(io(format!("creating {d}")))?;
    }
    use std::os::unix::fs::PermissionsExt;
    for (d, mode) in [("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o700)] {
        std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {d}")))?;
    }
    std::fs::copy(BUSYBOX, tree.join("bin/busybox")).map_err(io("copying busybox"))?;
    let out = Command::new(BUSYBOX).arg("--list-full").output().map_err(io("running busybox --list-full"))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet.contains("..") || applet == "bin/busybox" || applet.ends_with("/init") || applet == "linuxrc" {
            continue;
        }
        let link = tree.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        symlink("/bin/busybox", &link).map_err(io(format!("linking {applet}")))?;
    }
    let files = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "moat\n"),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("etc/os-release", "NAME=\"moat minimal\"\nID=moat-minimal\nPRETTY_NAME=\"moat minimal (busybox)\"\n"),
        ("etc/profile", "export PS1='\\h:\\w\\$ '\n"),
    ];
    for (path, content) in files {
        std::fs::write(tree.join(path), content).map_err(io(format!("writing {path}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_image_builds_once_and_overlays_point_at_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let image = store.resolve("minimal").expect("builds (needs busybox-static, e2fsprogs, qemu-utils)");
        assert!(image.base.is_file());
        assert_eq!(store.resolve("minimal").unwrap(), image, "second resolve reuses the build");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("tmp-")).collect();
        assert!(leftovers.is_empty(), "no build directories left");

        let overlay = dir.path().join("o.qcow2");
        store.create_overlay(&image, &overlay, Some(4 << 30)).unwrap();
        let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(&overlay).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 4u64 << 30);
        assert_eq!(info["backing-filename"], std::fs::canonicalize(&image.base).unwrap().to_string_lossy().as_ref());
        assert!(std::fs::metadata(&overlay).unwrap().len() < 1 << 20, "the overlay is thin");
    }

    #[test]
    fn unknown_images_say_where_images_come_from() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageStore::open(dir.path()).unwrap().resolve("debian:bookworm").unwrap_err();
        assert!(err.to_string().contains("debian:bookworm") && err.to_string().contains("minimal"), "{err}");
    }
}
