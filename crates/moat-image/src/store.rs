//! The image store: content-addressed read-only base disks (qcow2), their metadata, and a small
//! name → digest index.
//!
//! ```text
//! <root>/sha256/<hex>/base.qcow2    the base disk; never written once it is committed
//! <root>/sha256/<hex>/image.json    the Image record
//! <root>/blobs/sha256/<hex>         layer blobs of pulled images, verified, shared between images
//! <root>/blobs/partial/<hex>        downloads not yet complete (a new pull resumes them)
//! <root>/remote/sha256/<hex>        blobs of pulled snapshots (bases are used in place from here)
//! <root>/remote/partial/<hex>       their downloads not yet complete
//! <root>/index.json                 {"names": {"minimal": "sha256:<hex>", …}}
//! <root>/.lock                      serializes commits and index updates between processes
//! <root>/.operations                held shared by image operations in flight (see `gc`)
//! <root>/tmp-*/                     images being assembled (or left by an interrupted build)
//! ```
//! Every way of making an image (the built-in `minimal`, later OCI pulls and debootstrap builds)
//! assembles it in a staging directory inside the store and commits it with one rename, so an
//! interrupted build never leaves anything registered.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{disk, ImageError};

/// The built-in image: busybox on ext4, built locally on first use.
pub const MINIMAL: &str = "minimal";

const BASE_FILE: &str = "base.qcow2";
const META_FILE: &str = "image.json";
const INDEX_FILE: &str = "index.json";
const STAGING_PREFIX: &str = "tmp-";
/// How long [`ImageStore::gc`] keeps an unused blob of a pulled snapshot, or an interrupted
/// download of one: long enough for a pull cut short (a crash, a restart) to continue.
const REMOTE_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Serializes commits and index updates.
const INDEX_LOCK: &str = ".lock";
/// Held shared by every image operation in flight, so `gc` can tell whether any runs.
const OPERATIONS_LOCK: &str = ".operations";

/// How processes start in an image, as in an OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A committed image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// `sha256:<hex>`: for pulled images the content digest, for built ones the digest of the
    /// recipe and its inputs.
    pub digest: String,
    /// The read-only base disk (qcow2).
    pub base: PathBuf,
    pub config: ImageConfig,
    /// Virtual size of the base disk in bytes.
    pub size_bytes: u64,
    /// Where it came from: `pull REF`, `import`, `build debian:SUITE +PACKAGES`, `built-in`.
    #[serde(default)]
    pub source: String,
    /// When it was committed, in seconds since the Unix epoch.
    #[serde(default)]
    pub created: u64,
    /// The digests of the layer blobs it was unpacked from (pulled images), in order. They stay in
    /// the blob cache while an image needs them.
    #[serde(default)]
    pub layers: Vec<String>,
}

/// What the maker of an image records about it besides its contents.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub source: String,
    pub layers: Vec<String>,
}

/// The image store under a root directory (`$MOAT_HOME/images`).
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// Defaulted so an index from before this layout (a bare name map) reads as empty.
    #[serde(default)]
    names: BTreeMap<String, String>,
}

/// A directory inside the store where a new image is assembled. Dropped without
/// [`ImageStore::commit`], it is removed. While it exists, [`ImageStore::gc`] leaves young
/// unreferenced files alone (they may be this operation's downloads).
pub(crate) struct Staging {
    dir: tempfile::TempDir,
    _operation: Operation,
}

/// An image operation in flight (see [`ImageStore::begin_operation`]).
pub struct Operation(#[allow(dead_code)] File);

impl Staging {
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the assembled base disk must be before commit.
    pub(crate) fn base(&self) -> PathBuf {
        self.dir.path().join(BASE_FILE)
    }
}

/// `sha256:<64 hex>` → `<64 hex>`; anything else (a damaged index) is refused before it becomes a path.
pub(crate) fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))).then_some(hex)
}

impl ImageStore {
    /// Open (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        std::fs::create_dir_all(root.join("sha256"))
            .map_err(ImageError::io(format!("creating the image store {}", root.display())))?;
        Ok(ImageStore { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image the index names `name` (`resolve`, in `minimal.rs`, also knows the built-in
    /// image).
    pub(crate) fn lookup(&self, name: &str) -> Result<Image, ImageError> {
        let index = self.read_index()?;
        let digest = index.names.get(name).ok_or_else(|| ImageError::NotFound { name: name.to_string() })?;
        let mut image = self.load(digest)?.ok_or_else(|| ImageError::NotFound { name: name.to_string() })?;
        image.name = name.to_string();
        Ok(image)
    }

    /// The image with `digest`, shown as `name`: what a sandbox made from `name` boots from
    /// whatever the name points to now.
    pub fn by_digest(&self, name: &str, digest: &str) -> Result<Image, ImageError> {
        let gone = || ImageError::DigestGone { name: name.to_string(), digest: digest.to_string() };
        let mut image = self.load(digest)?.ok_or_else(gone)?;
        image.name = name.to_string();
        Ok(image)
    }

    /// All named images, by name.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut images = Vec::new();
        for (name, digest) in self.read_index()?.names {
            if let Some(mut image) = self.load(&digest)? {
                image.name = name;
                images.push(image);
            }
        }
        Ok(images)
    }

    /// Create a thin qcow2 overlay at `overlay` backed by the image's base. Its virtual size is
    /// the larger of the base's and `size`. Nothing is copied.
    ///
    /// A larger disk only grows the block device; the file system on it keeps its size until the
    /// guest resizes it.
    pub fn create_overlay(&self, image: &Image, overlay: &Path, size: Option<u64>) -> Result<(), ImageError> {
        let base = std::fs::canonicalize(&image.base).map_err(ImageError::io(format!(
            "finding the base disk {} of image {} (run `moat image ls`; the store may have been cleaned)",
            image.base.display(),
            image.name
        )))?;
        disk::create_overlay(&base, overlay, size.filter(|&s| s > image.size_bytes))
    }

    /// Copy a sandbox's disk overlay (not in use, or its VM paused) to `dest` as a layer on the
    /// image's base alone. When the overlay sits on another saved layer, that layer's data is
    /// folded in, so saved disks never depend on one another and chains stay two deep.
    pub fn freeze_overlay(&self, image: &Image, overlay: &Path, dest: &Path) -> Result<(), ImageError> {
        let base = std::fs::canonicalize(&image.base).map_err(ImageError::io(format!(
            "finding the base disk {} of image {}",
            image.base.display(),
            image.name
        )))?;
        std::fs::copy(overlay, dest).map_err(ImageError::io(format!(
            "copying {} to {}",
            overlay.display(),
            dest.display()
        )))?;
        if disk::info(dest)?.backing_file.map(PathBuf::from) != Some(base.clone()) {
            disk::rebase(dest, &base)?;
        }
        Ok(())
    }

    /// A new overlay whose backing is the saved layer `layer` (see [`ImageStore::freeze_overlay`]).
    pub fn overlay_on_layer(&self, layer: &Path, overlay: &Path) -> Result<(), ImageError> {
        disk::create_overlay(layer, overlay, None)
    }

    /// Where the verified layer blob `digest` is cached (`<root>/blobs/sha256/<hex>`).
    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        self.blob_dir("sha256", digest)
    }

    /// Where a download of `digest` in progress (or interrupted) is kept until it is verified.
    pub(crate) fn partial_blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        self.blob_dir("partial", digest)
    }

    /// Where the verified blob `digest` of a pulled snapshot is cached.
    pub(crate) fn remote_blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        self.cache_path(&["remote", "sha256"], digest)
    }

    pub(crate) fn remote_partial_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        self.cache_path(&["remote", "partial"], digest)
    }

    /// Make sure an image with `image.digest` is in the store, for a pulled snapshot whose disk sits
    /// on `base` (a verified base blob): an image this host does not have is committed as the
    /// pushing host had it (unnamed: the snapshot keeps it), with `base` linked in as its base.
    pub fn adopt_pulled_image(
        &self,
        image: &crate::ArtifactImage,
        base: &Path,
        source: &str,
    ) -> Result<(), ImageError> {
        if self.load(&image.digest)?.is_some() {
            return Ok(());
        }
        let staging = self.stage()?;
        std::fs::hard_link(base, staging.base()).map_err(ImageError::io(format!("linking {}", base.display())))?;
        let provenance = Provenance { source: source.to_string(), layers: Vec::new() };
        self.commit_as(staging, None, &image.digest, image.config.clone(), provenance).map(|_| ())
    }

    fn blob_dir(&self, kind: &str, digest: &str) -> Result<PathBuf, ImageError> {
        self.cache_path(&["blobs", kind], digest)
    }

    fn cache_path(&self, dirs: &[&str], digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest).ok_or_else(|| self.corrupt(format!("{digest:?} is not a sha256 digest")))?;
        let dir = dirs.iter().fold(self.root.clone(), |d, p| d.join(p));
        std::fs::create_dir_all(&dir).map_err(ImageError::io(format!("creating {}", dir.display())))?;
        Ok(dir.join(hex))
    }

    /// A fresh staging directory inside the store (same file system, so commit is a rename).
    pub(crate) fn stage(&self) -> Result<Staging, ImageError> {
        let operation = self.begin_operation()?;
        let dir = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .tempdir_in(&self.root)
            .map_err(ImageError::io(format!("creating a staging directory in {}", self.root.display())))?;
        Ok(Staging { dir, _operation: operation })
    }

    /// Mark an image operation in flight until the guard is dropped, so [`ImageStore::gc`] spares
    /// young files (uploads being spooled, downloads, staging directories).
    pub fn begin_operation(&self) -> Result<Operation, ImageError> {
        Ok(Operation(self.flock(OPERATIONS_LOCK, rustix::fs::FlockOperation::LockShared)?))
    }

    /// Remove what no image needs: image directories no name points at and no sandbox uses
    /// (`in_use`: the digests of sandboxes' images), cached layer blobs no kept image lists,
    /// interrupted downloads and staging directories. While an image operation runs, only what is
    /// older than `older_than` goes (newer files may be that operation's). Blobs of pulled
    /// snapshots stay while `bases` (the base disks snapshots sit on) lists them, or for a day
    /// after their last use. Returns what was removed.
    pub fn gc(&self, in_use: &[String], bases: &[String], older_than: Duration) -> Result<Vec<PathBuf>, ImageError> {
        let idle = self.try_flock(OPERATIONS_LOCK)?;
        let cutoff = match idle {
            Some(_) => SystemTime::now() + Duration::from_secs(60),
            None => SystemTime::now().checked_sub(older_than).unwrap_or(SystemTime::UNIX_EPOCH),
        };
        let old = |p: &Path| std::fs::symlink_metadata(p).and_then(|m| m.modified()).is_ok_and(|t| t < cutoff);
        let _lock = self.lock()?;
        let mut keep: Vec<String> = self.read_index()?.names.into_values().chain(in_use.iter().cloned()).collect();
        keep.sort();
        keep.dedup();
        let mut layers = Vec::new();
        for digest in &keep {
            if let Ok(Some(image)) = self.load(digest) {
                layers.extend(image.layers.into_iter().filter_map(|l| digest_hex(&l).map(str::to_string)));
            }
        }
        let kept_hex: Vec<&str> = keep.iter().filter_map(|d| digest_hex(d)).collect();
        let mut removed = Vec::new();
        let mut sweep = |dir: PathBuf, wanted: &dyn Fn(&str) -> bool| -> Result<(), ImageError> {
            let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if wanted(&name) || !old(&path) {
                    continue;
                }
                let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                result.map_err(ImageError::io(format!("removing {}", path.display())))?;
                removed.push(path);
            }
            Ok(())
        };
        sweep(self.root.join("sha256"), &|hex| kept_hex.contains(&hex))?;
        sweep(self.root.join("blobs").join("sha256"), &|hex| layers.iter().any(|l| l == hex))?;
        sweep(self.root.join("blobs").join("partial"), &|_| false)?;
        sweep(self.root.clone(), &|name| !name.starts_with(STAGING_PREFIX))?;
        let bases: Vec<&str> = bases.iter().filter_map(|d| digest_hex(d)).collect();
        let recent = SystemTime::now().checked_sub(REMOTE_GRACE).unwrap_or(SystemTime::UNIX_EPOCH);
        for kind in ["sha256", "partial"] {
            let Ok(entries) = std::fs::read_dir(self.root.join("remote").join(kind)) else { continue };
            for entry in entries.flatten() {
                let used = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > recent);
                if used || (kind == "sha256" && bases.contains(&entry.file_name().to_string_lossy().as_ref())) {
                    continue;
                }
                std::fs::remove_file(entry.path())
                    .map_err(ImageError::io(format!("removing {}", entry.path().display())))?;
                removed.push(entry.path());
            }
        }
        Ok(removed)
    }

    /// The committed image with this digest, if there is one.
    pub(crate) fn load(&self, digest: &str) -> Result<Option<Image>, ImageError> {
        let Some(hex) = digest_hex(digest) else {
            return Err(self.corrupt(format!("{digest:?} is not a sha256 digest")));
        };
        let dir = self.root.join("sha256").join(hex);
        let meta = dir.join(META_FILE);
        let bytes = match std::fs::read(&meta) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io(format!("reading {}", meta.display()))(e)),
        };
        let mut image: Image =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(format!("{}: {e}", meta.display())))?;
        // The record's own path may predate a move of the store; the layout is authoritative.
        image.base = dir.join(BASE_FILE);
        if image.digest != digest || !image.base.is_file() {
            return Err(self.corrupt(format!("{} does not hold a complete image {digest}", dir.display())));
        }
        Ok(Some(image))
    }

    /// Register the image assembled in `staging` (its [`Staging::base`] must exist) under `name`.
    /// If another process committed the same digest first, theirs is kept and returned.
    pub(crate) fn commit(
        &self,
        staging: Staging,
        name: &str,
        digest: &str,
        config: ImageConfig,
        provenance: Provenance,
    ) -> Result<Image, ImageError> {
        self.commit_as(staging, Some(name), digest, config, provenance)
    }

    /// [`ImageStore::commit`], naming the image only when `name` is given.
    fn commit_as(
        &self,
        staging: Staging,
        name: Option<&str>,
        digest: &str,
        config: ImageConfig,
        provenance: Provenance,
    ) -> Result<Image, ImageError> {
        let name = name.unwrap_or_default();
        let hex = digest_hex(digest).ok_or_else(|| self.corrupt(format!("{digest:?} is not a sha256 digest")))?;
        let info = disk::info(&staging.base())?;
        // Overlays name the base by path; a base must stand alone so the chain is one link deep.
        if info.format != "qcow2" || info.backing_file.is_some() {
            return Err(self.corrupt(format!(
                "the new base disk of {name} is {} with backing file {:?}, not a standalone qcow2",
                info.format, info.backing_file
            )));
        }
        let size_bytes = info.virtual_size;
        let final_dir = self.root.join("sha256").join(hex);
        let image = Image {
            name: name.to_string(),
            digest: digest.to_string(),
            base: final_dir.join(BASE_FILE),
            config,
            size_bytes,
            source: provenance.source,
            created: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            layers: provenance.layers,
        };
        let meta = serde_json::to_vec_pretty(&image).expect("an Image serializes");
        write_synced(&staging.path().join(META_FILE), &meta)?;

        let _lock = self.lock()?;
        let image = match self.load(digest)? {
            Some(existing) => existing,
            None => {
                let path = staging.dir.keep();
                if let Err(e) = std::fs::rename(&path, &final_dir) {
                    let _ = std::fs::remove_dir_all(&path);
                    return Err(ImageError::io(format!("committing {} to {}", path.display(), final_dir.display()))(e));
                }
                image
            }
        };
        if !name.is_empty() {
            let mut index = self.read_index()?;
            index.names.insert(name.to_string(), digest.to_string());
            self.write_index(&index)?;
        }
        Ok(Image { name: name.to_string(), ..image })
    }

    /// Forget the name `name`; the image's files go too when no other name points at them. The
    /// caller checks that no sandbox's overlay is backed by it.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        if name == MINIMAL {
            return Err(ImageError::BadImageName {
                name: name.into(),
                why: "the built-in image cannot be removed".into(),
            });
        }
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let digest = index.names.remove(name).ok_or_else(|| ImageError::NotFound { name: name.to_string() })?;
        self.write_index(&index)?;
        if !index.names.values().any(|d| *d == digest) {
            if let Some(hex) = digest_hex(&digest) {
                let dir = self.root.join("sha256").join(hex);
                std::fs::remove_dir_all(&dir).map_err(ImageError::io(format!("removing {}", dir.display())))?;
            }
        }
        Ok(())
    }

    /// Point `name` at `digest` in the index unless it already does.
    pub(crate) fn ensure_named(&self, name: &str, digest: &str) -> Result<(), ImageError> {
        if self.read_index()?.names.get(name).map(String::as_str) == Some(digest) {
            return Ok(());
        }
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        index.names.insert(name.to_string(), digest.to_string());
        self.write_index(&index)
    }

    fn read_index(&self) -> Result<Index, ImageError> {
        let path = self.root.join(INDEX_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| self.corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(ImageError::io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Replace the index atomically; the caller holds the lock.
    fn write_index(&self, index: &Index) -> Result<(), ImageError> {
        let path = self.root.join(INDEX_FILE);
        let tmp = tempfile::Builder::new()
            .prefix(".index-")
            .tempfile_in(&self.root)
            .map_err(ImageError::io(format!("creating a temporary file in {}", self.root.display())))?;
        write_synced(tmp.path(), &serde_json::to_vec_pretty(index).expect("the index serializes"))?;
        tmp.persist(&path).map_err(|e| ImageError::io(format!("replacing {}", path.display()))(e.error))?;
        Ok(())
    }

    /// An exclusive lock on the store's index, released when the returned file is dropped.
    fn lock(&self) -> Result<File, ImageError> {
        self.flock(INDEX_LOCK, rustix::fs::FlockOperation::LockExclusive)
    }

    fn flock(&self, name: &str, how: rustix::fs::FlockOperation) -> Result<File, ImageError> {
        let (file, path) = self.lock_file(name)?;
        rustix::fs::flock(&file, how).map_err(|e| ImageError::io(format!("locking {}", path.display()))(e.into()))?;
        Ok(file)
    }

    /// The exclusive lock `name` if nobody holds it now.
    fn try_flock(&self, name: &str) -> Result<Option<File>, ImageError> {
        let (file, path) = self.lock_file(name)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(ImageError::io(format!("locking {}", path.display()))(e.into())),
        }
    }

    fn lock_file(&self, name: &str) -> Result<(File, PathBuf), ImageError> {
        let path = self.root.join(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io(format!("opening {}", path.display())))?;
        Ok((file, path))
    }

    fn corrupt(&self, reason: String) -> ImageError {
        ImageError::StoreCorrupt { path: self.root.clone(), reason }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let mut f = File::create(path).map_err(ImageError::io(format!("creating {}", path.display())))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(ImageError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store holding one small committed image called `name`.
    fn store_with(name: &str) -> (tempfile::TempDir, ImageStore, Image) {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let staging = store.stage().unwrap();
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(staging.base())
            .arg("64M")
            .status()
            .unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let config = ImageConfig { cmd: vec!["/bin/sh".into()], ..ImageConfig::default() };
        let image = store.commit(staging, name, &digest, config, Provenance::default()).unwrap();
        (dir, store, image)
    }

    #[test]
    fn committed_images_resolve_by_name_and_list() {
        let (dir, store, image) = store_with("tiny:1");
        assert_eq!(image.size_bytes, 64 << 20);
        assert_eq!(image.base, dir.path().join("sha256").join("ab".repeat(32)).join("base.qcow2"));
        assert_eq!(store.resolve("tiny:1").unwrap(), image);
        assert_eq!(store.list().unwrap(), vec![image.clone()]);
        // Reopening the store (a new process) sees the same.
        assert_eq!(ImageStore::open(dir.path()).unwrap().resolve("tiny:1").unwrap(), image);
        let staged: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
            .collect();
        assert!(staged.is_empty(), "the staging directory became the image");
    }

    #[test]
    fn unknown_images_say_where_images_come_from() {
        let dir = tempfile::tempdir().unwrap();
        let err = crate::report(&ImageStore::open(dir.path()).unwrap().resolve("debian:bookworm").unwrap_err());
        assert!(
            err.contains("debian:bookworm")
                && err.contains("minimal")
                && err.contains("moat image build")
                && err.contains("moat image import"),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_index_is_reported_not_ignored() {
        let (dir, store, _) = store_with("tiny:1");
        std::fs::write(dir.path().join("index.json"), br#"{"names":{"x":"sha256:../../etc"}}"#).unwrap();
        let err = store.resolve("x").unwrap_err().to_string();
        assert!(err.contains("not a sha256 digest") && err.contains("damaged"), "{err}");
        std::fs::write(dir.path().join("index.json"), br#"{"minimal":"sha256:00"}"#).unwrap();
        assert!(store.list().unwrap().is_empty(), "an index of the earlier layout reads as empty");
        std::fs::write(dir.path().join("index.json"), b"{not json").unwrap();
        assert!(store.resolve("tiny:1").unwrap_err().to_string().contains("index.json"));
    }

    #[test]
    fn gc_keeps_what_images_and_sandboxes_use_and_spares_running_operations() {
        let (dir, store, image) = store_with("tiny:1");
        let blob = |hex: &str| {
            let p = store.blob_path(&format!("sha256:{hex}")).unwrap();
            std::fs::write(&p, b"layer").unwrap();
            p
        };
        let orphan_blob = blob(&"cd".repeat(32));
        let partial = store.partial_blob_path(&format!("sha256:{}", "ef".repeat(32))).unwrap();
        std::fs::write(&partial, b"half").unwrap();
        // An image a crash left unnamed, and one only a sandbox still uses.
        let unnamed = dir.path().join("sha256").join("01".repeat(32));
        let used = dir.path().join("sha256").join("02".repeat(32));
        std::fs::create_dir_all(&unnamed).unwrap();
        std::fs::create_dir_all(&used).unwrap();
        // A build in flight: its staging directory and everything young survive.
        let staging = store.stage().unwrap();
        let in_use = vec![format!("sha256:{}", "02".repeat(32))];
        assert!(store.gc(&in_use, &[], Duration::from_secs(3600)).unwrap().is_empty());
        assert!(staging.path().exists() && partial.exists() && orphan_blob.exists());
        // Crashed: the staging directory stays behind, and nothing runs any more.
        let left = staging.dir.keep();
        drop(staging._operation);
        let mut removed = store.gc(&in_use, &[], Duration::from_secs(3600)).unwrap();
        removed.sort();
        let mut expected = vec![orphan_blob, partial, unnamed, left];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(used.exists(), "a sandbox's image stays");
        assert_eq!(store.resolve("tiny:1").unwrap(), image, "named images stay");
    }

    #[test]
    fn overlays_are_thin_and_never_smaller_than_the_base() {
        let (dir, store, image) = store_with("tiny:1");
        let info = |p: &Path| disk::info(p).unwrap();

        let same = dir.path().join("same.qcow2");
        store.create_overlay(&image, &same, None).unwrap();
        assert_eq!(info(&same).virtual_size, image.size_bytes);
        assert_eq!(
            info(&same).backing_file.as_deref(),
            Some(std::fs::canonicalize(&image.base).unwrap().to_str().unwrap())
        );
        assert_eq!(info(&same).format, "qcow2");

        let small = dir.path().join("small.qcow2");
        store.create_overlay(&image, &small, Some(1 << 20)).unwrap();
        assert_eq!(info(&small).virtual_size, image.size_bytes, "a smaller size keeps the base's");

        let big = dir.path().join("big.qcow2");
        store.create_overlay(&image, &big, Some(4 << 30)).unwrap();
        assert_eq!(info(&big).virtual_size, 4 << 30);
        assert!(std::fs::metadata(&big).unwrap().len() < 1 << 20, "the overlay is thin");
    }
}
