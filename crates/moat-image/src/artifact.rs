//! Snapshots as OCI artifacts, so that a saved machine (memory, device state, disk) travels through
//! any registry that speaks the OCI distribution API.
//!
//! One artifact is an OCI image manifest with the artifact type [`ARTIFACT_TYPE`], a JSON config
//! ([`SnapshotArtifact`]: what a restore must match, checked before anything large is fetched)
//! and four layers:
//!
//! | media type | what |
//! |---|---|
//! | [`BASE_TYPE`] | the image's base disk (qcow2) as it is, so it is pulled once per host and used in place |
//! | [`DISK_TYPE`] | the snapshot's disk layer (qcow2 on that base), zstd |
//! | [`STATE_TYPE`] | QEMU's device state without RAM, zstd |
//! | [`MEM_TYPE`] | guest RAM, zstd (zero pages come back as holes) |
//!
//! Downloads land in their own cache in the image store (`remote/`), verified by digest, resumed
//! after an interruption, and kept a while unused so a pull cut short continues later.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use oci_client::client::Client;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pull::{auth_of, client_for, fetch_blob, parse, registry_error, Fetch};
use crate::store::{digest_hex, ImageStore};
use crate::{disk, ImageConfig, ImageError, PullOptions, PullProgress};

/// The manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.moat.snapshot.v1";
/// The config blob: a [`SnapshotArtifact`] as JSON.
pub const CONFIG_TYPE: &str = "application/vnd.moat.snapshot.config.v1+json";
pub const BASE_TYPE: &str = "application/vnd.moat.disk.base.v1.qcow2";
pub const DISK_TYPE: &str = "application/vnd.moat.disk.layer.v1.qcow2+zstd";
pub const STATE_TYPE: &str = "application/vnd.moat.vm.state.v1+zstd";
pub const MEM_TYPE: &str = "application/vnd.moat.vm.memory.v1+zstd";
/// The version of [`SnapshotArtifact`] this build writes and reads.
pub const FORMAT: u32 = 1;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Largest config accepted.
const MAX_CONFIG: i64 = 1 << 20;
/// Largest device state accepted, decompressed (QEMU's is a few hundred KiB).
const MAX_STATE: u64 = 256 << 20;
/// What a disk layer may hold beyond the disk's size: qcow2 metadata.
const DISK_SLACK: u64 = 256 << 20;
/// zstd level: the fastest, which still turns zero pages into almost nothing.
const LEVEL: i32 = 1;

/// The machine a snapshot can only be restored with, and the sizes it was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMachine {
    pub qemu: String,
    pub accel: String,
    pub kernel: String,
    pub initramfs: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    pub nic: bool,
}

/// The image the snapshot's disk sits on, by its host-independent identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactImage {
    pub name: String,
    /// The config digest (pulled images) or recipe digest (built ones): the same on every host.
    pub digest: String,
    pub config: ImageConfig,
    pub size_bytes: u64,
}

/// The config blob of a snapshot artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotArtifact {
    pub format: u32,
    /// `snapshot` or `template`.
    pub kind: String,
    pub machine: ArtifactMachine,
    pub image: ArtifactImage,
    /// For templates: the key a host looks it up by.
    #[serde(default)]
    pub template_key: Option<String>,
    /// Unix seconds when the snapshot was taken.
    pub created_at: i64,
}

/// The files of a saved machine, to push. The base disk is the one `disk` sits on.
pub struct SnapshotFiles<'a> {
    pub disk: &'a Path,
    pub state: &'a Path,
    pub mem: &'a Path,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The manifest's digest.
    pub digest: String,
    /// Bytes sent to the registry (blobs it already had are not sent).
    pub uploaded_bytes: u64,
    /// Bytes of blobs the registry already had.
    pub reused_bytes: u64,
}

/// A registry and repository to talk to.
struct Remote {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
    text: String,
    registry: String,
}

impl Remote {
    async fn connect(reference: &str, options: &PullOptions, op: RegistryOperation) -> Result<Remote, ImageError> {
        let parsed = parse(reference)?;
        let registry = parsed.resolve_registry().to_string();
        let remote = Remote {
            client: client_for(&registry, options.insecure),
            auth: auth_of(options),
            reference: parsed,
            text: reference.to_string(),
            registry,
        };
        remote.client.auth(&remote.reference, &remote.auth, op).await.map_err(|e| remote.error(e))?;
        Ok(remote)
    }

    fn error(&self, e: oci_client::errors::OciDistributionError) -> ImageError {
        registry_error(&self.text, &self.registry, e)
    }

    fn fetch_error(&self, e: Fetch) -> ImageError {
        match e {
            Fetch::Registry(e) => self.error(e),
            Fetch::Image(e) => e,
        }
    }
}

/// A blob staged for upload.
struct Blob {
    media_type: &'static str,
    path: PathBuf,
    digest: String,
    size: u64,
}

impl Blob {
    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// Whether `path` names a file under `dir` by its components: absolute, and no `..` to climb out.
fn in_dir(path: &Path, dir: &Path) -> bool {
    path.is_absolute() && path.starts_with(dir) && !path.components().any(|c| c == std::path::Component::ParentDir)
}

/// Push a saved machine to `reference` (`registry/repository:tag`). Blobs the registry has already
/// (the base of an image pushed before, say) are not sent again.
pub async fn push_snapshot(
    store: &ImageStore,
    reference: &str,
    options: &PullOptions,
    files: SnapshotFiles<'_>,
    artifact: &SnapshotArtifact,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Pushed, ImageError> {
    let remote = Remote::connect(reference, options, RegistryOperation::Push).await?;
    let staging = store.stage()?;
    progress("compressing memory, device state and disk".into());
    let base = match disk::info(files.disk)?.backing_file {
        Some(b) if in_dir(Path::new(&b), store.root()) => PathBuf::from(b),
        other => {
            return Err(ImageError::StoreCorrupt {
                path: files.disk.to_path_buf(),
                reason: format!("the snapshot's disk sits on {other:?}, not on a base disk in the image store"),
            })
        }
    };
    let work =
        [(DISK_TYPE, files.disk, "disk.zst"), (STATE_TYPE, files.state, "state.zst"), (MEM_TYPE, files.mem, "mem.zst")]
            .map(|(t, p, name)| (t, p.to_path_buf(), staging.path().join(name)));
    let mut blobs = tokio::task::spawn_blocking(move || -> Result<Vec<Blob>, ImageError> {
        let mut blobs = vec![base_blob(&base)?];
        for (media_type, from, to) in work {
            let (digest, size) = compress(&from, &to)?;
            blobs.push(Blob { media_type, path: to, digest, size });
        }
        Ok(blobs)
    })
    .await
    .map_err(|e| ImageError::io("compressing a snapshot")(std::io::Error::other(e.to_string())))??;
    let config = serde_json::to_vec(artifact).expect("an artifact config serializes");
    let config_path = staging.path().join("config.json");
    std::fs::write(&config_path, &config).map_err(ImageError::io(format!("writing {}", config_path.display())))?;
    let config_blob = Blob {
        media_type: CONFIG_TYPE,
        path: config_path,
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&config))),
        size: config.len() as u64,
    };
    let (mut uploaded_bytes, mut reused_bytes) = (0, 0);
    blobs.push(config_blob);
    for blob in &blobs {
        if remote.client.blob_exists(&remote.reference, &blob.digest).await.map_err(|e| remote.error(e))? {
            reused_bytes += blob.size;
            progress(format!("{} {} is in the registry already", kind_of(blob.media_type), short(&blob.digest)));
            continue;
        }
        progress(format!("uploading {} ({} MiB)", kind_of(blob.media_type), blob.size.div_ceil(1 << 20)));
        upload(&remote, blob).await?;
        uploaded_bytes += blob.size;
    }
    let config_blob = blobs.pop().expect("the config was pushed last");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": config_blob.descriptor(),
        "layers": blobs.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        "annotations": {
            "dev.moat.image": artifact.image.name,
        },
    });
    let body = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    remote
        .client
        .push_manifest_raw(&remote.reference, body, MANIFEST_TYPE.parse().expect("a valid header value"))
        .await
        .map_err(|e| remote.error(e))?;
    progress(format!("pushed {reference} ({digest})"));
    Ok(Pushed { digest, uploaded_bytes, reused_bytes })
}

fn kind_of(media_type: &str) -> &'static str {
    match media_type {
        BASE_TYPE => "base disk",
        DISK_TYPE => "disk layer",
        STATE_TYPE => "device state",
        MEM_TYPE => "memory",
        _ => "config",
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

/// The base disk as a blob: its digest is the file's (kept next to it once computed, since a
/// base never changes; a base pulled from a registry is named by it already).
fn base_blob(base: &Path) -> Result<Blob, ImageError> {
    let size = std::fs::metadata(base).map_err(ImageError::io(format!("reading {}", base.display())))?.len();
    let named = base.file_name().and_then(|n| n.to_str()).map(|n| format!("sha256:{n}"));
    let noted = sidecar(base);
    let digest = match named.filter(|d| digest_hex(d).is_some()) {
        Some(d) => d,
        None => match std::fs::read_to_string(&noted).ok().filter(|d| digest_hex(d.trim()).is_some()) {
            Some(d) => d.trim().to_string(),
            None => {
                let mut hasher = Sha256::new();
                let mut f = File::open(base).map_err(ImageError::io(format!("reading {}", base.display())))?;
                std::io::copy(&mut f, &mut hasher).map_err(ImageError::io(format!("reading {}", base.display())))?;
                let d = format!("sha256:{}", hex::encode(hasher.finalize()));
                // Only a shortcut: without it the next push hashes again.
                let _ = std::fs::write(&noted, &d);
                d
            }
        },
    };
    Ok(Blob { media_type: BASE_TYPE, path: base.to_path_buf(), digest, size })
}

/// Where the digest of a base disk is noted.
fn sidecar(base: &Path) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Compress `from` into `to` with zstd; the digest and size of what was written.
fn compress(from: &Path, to: &Path) -> Result<(String, u64), ImageError> {
    let io = |what: &str, p: &Path| ImageError::io(format!("{what} {}", p.display()));
    let mut input = File::open(from).map_err(io("reading", from))?;
    let out = HashingWriter { inner: File::create(to).map_err(io("creating", to))?, hasher: Sha256::new(), size: 0 };
    let mut encoder = zstd::Encoder::new(out, LEVEL).map_err(io("compressing into", to))?;
    // Guest memory is the bulk of a push: every core compresses.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    encoder.multithread(cores).map_err(io("compressing into", to))?;
    std::io::copy(&mut input, &mut encoder).map_err(io("compressing", from))?;
    let out = encoder.finish().map_err(io("compressing into", to))?;
    Ok((format!("sha256:{}", hex::encode(out.hasher.finalize())), out.size))
}

struct HashingWriter {
    inner: File,
    hasher: Sha256,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Send one blob, streamed from its file.
async fn upload(remote: &Remote, blob: &Blob) -> Result<(), ImageError> {
    let file =
        tokio::fs::File::open(&blob.path).await.map_err(ImageError::io(format!("reading {}", blob.path.display())))?;
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e.into()), file)),
        }
    });
    remote
        .client
        .push_blob_stream(&remote.reference, chunks.boxed(), &blob.digest, Some(blob.size))
        .await
        .map_err(|e| remote.error(e))?;
    Ok(())
}

/// A snapshot artifact in a registry, its config read (nothing large is fetched yet).
pub struct RemoteSnapshot {
    remote: Remote,
    /// The manifest's digest.
    pub digest: String,
    pub artifact: SnapshotArtifact,
    layers: [OciDescriptor; 4],
}

/// A snapshot's blobs, downloaded and verified.
#[derive(Debug, Clone)]
pub struct FetchedSnapshot {
    /// The base disk, used in place (in the image store's remote cache).
    pub base: PathBuf,
    pub base_digest: String,
    disk: PathBuf,
    state: PathBuf,
    mem: PathBuf,
}

/// Read the manifest and config of the snapshot artifact at `reference`.
pub async fn inspect_snapshot(reference: &str, options: &PullOptions) -> Result<RemoteSnapshot, ImageError> {
    let remote = Remote::connect(reference, options, RegistryOperation::Pull).await?;
    let (body, digest) = remote
        .client
        .pull_manifest_raw(&remote.reference, &remote.auth, &[MANIFEST_TYPE])
        .await
        .map_err(|e| remote.error(e))?;
    let bad = |reason: String| ImageError::BadManifest { reference: reference.to_string(), reason };
    let manifest: OciImageManifest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("it is not an OCI image manifest: {e}")))?;
    if manifest.config.media_type != CONFIG_TYPE {
        return Err(bad(format!(
            "it is not a moat snapshot (its config is {:?}, not {CONFIG_TYPE}); images are pulled with `moat image pull`",
            manifest.config.media_type
        )));
    }
    let layers = check_layers(&manifest).map_err(bad)?;
    let config = fetch_small(&remote, &manifest.config).await?;
    let artifact: SnapshotArtifact =
        serde_json::from_slice(&config).map_err(|e| bad(format!("its config cannot be read: {e}")))?;
    if artifact.format != FORMAT {
        return Err(bad(format!(
            "it is in snapshot format {}, and this moat reads format {FORMAT}; use a moat of the same version",
            artifact.format
        )));
    }
    digest_hex(&artifact.image.digest).ok_or_else(|| bad("its image digest is not a sha256 digest".into()))?;
    Ok(RemoteSnapshot { remote, digest, artifact, layers })
}

/// The four layers in the order base, disk, state, memory; every other shape is refused.
fn check_layers(m: &OciImageManifest) -> Result<[OciDescriptor; 4], String> {
    let one = |t: &str| -> Result<OciDescriptor, String> {
        let mut found = m.layers.iter().filter(|l| l.media_type == t);
        match (found.next(), found.next()) {
            (Some(l), None) if l.size >= 0 && digest_hex(&l.digest).is_some() => Ok(l.clone()),
            (Some(l), None) => Err(format!("its {t} layer has the size {} and the digest {:?}", l.size, l.digest)),
            _ => Err(format!("it needs exactly one {t} layer")),
        }
    };
    if m.layers.len() != 4 {
        return Err(format!("it has {} layers; a snapshot has 4", m.layers.len()));
    }
    if m.config.size < 0 || m.config.size > MAX_CONFIG || digest_hex(&m.config.digest).is_none() {
        return Err(format!("its config is {} bytes with digest {:?}", m.config.size, m.config.digest));
    }
    Ok([one(BASE_TYPE)?, one(DISK_TYPE)?, one(STATE_TYPE)?, one(MEM_TYPE)?])
}

/// A small blob read into memory, no further than its declared size, and verified.
async fn fetch_small(remote: &Remote, desc: &OciDescriptor) -> Result<Vec<u8>, ImageError> {
    let limit = desc.size.clamp(0, MAX_CONFIG) as usize;
    let mut stream = remote.client.pull_blob_stream(&remote.reference, desc).await.map_err(|e| remote.error(e))?;
    let mut bytes = Vec::with_capacity(limit);
    let damaged = || ImageError::DigestMismatch { what: "the snapshot config".into(), expected: desc.digest.clone() };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| remote.error(e.into()))?;
        if bytes.len() + chunk.len() > limit {
            return Err(damaged());
        }
        bytes.extend_from_slice(&chunk);
    }
    if format!("sha256:{}", hex::encode(Sha256::digest(&bytes))) != desc.digest {
        return Err(damaged());
    }
    Ok(bytes)
}

impl RemoteSnapshot {
    /// Download the base, disk, state and memory blobs into the store's remote cache (what is
    /// there already is not fetched again; an interrupted download resumes).
    pub async fn fetch(
        &self,
        store: &ImageStore,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<FetchedSnapshot, ImageError> {
        // All four at once: the memory blob is most of the bytes, the base most of the rest.
        let fetches = self.layers.iter().map(|layer| async move {
            let (blob, partial) = (store.remote_blob_path(&layer.digest)?, store.remote_partial_path(&layer.digest)?);
            fetch_blob(&self.remote.client, &self.remote.reference, layer, &blob, &partial, progress)
                .await
                .map_err(|e| self.remote.fetch_error(e))?;
            // Touched: the cache keeps blobs by their last use.
            let _ = File::open(&blob).and_then(|f| f.set_modified(std::time::SystemTime::now()));
            Ok::<_, ImageError>(blob)
        });
        let paths: Vec<PathBuf> = futures_util::future::try_join_all(fetches).await?;
        let [base, disk, state, mem] = <[PathBuf; 4]>::try_from(paths).expect("four layers");
        Ok(FetchedSnapshot { base, base_digest: self.layers[0].digest.clone(), disk, state, mem })
    }
}

impl FetchedSnapshot {
    /// Write the saved machine into `dest` (`mem`, `state`, `disk.qcow2` on the fetched base),
    /// refusing anything larger than the machine it claims to be.
    pub fn unpack(&self, machine: &ArtifactMachine, dest: &Path, names: [&str; 3]) -> Result<(), ImageError> {
        let [mem, state, disk_file] = names.map(|n| dest.join(n));
        let memory = u64::from(machine.memory_mib) << 20;
        decompress(&self.mem, &mem, memory, true)?;
        decompress(&self.state, &state, MAX_STATE, false)?;
        decompress(&self.disk, &disk_file, (machine.disk_mib << 20) + DISK_SLACK, false)?;
        // The layer's own idea of its backing file is the pushing host's path: it sits on the
        // fetched base here. Nothing else may point outside the file.
        let info = disk::info(&disk_file)?;
        if info.format != "qcow2" || info.data_file().is_some() {
            return Err(ImageError::BadArchive {
                reason: format!(
                    "the snapshot's disk layer is {} with an external data file {:?}",
                    info.format,
                    info.data_file()
                ),
            });
        }
        disk::set_backing(&disk_file, &self.base)?;
        let mem_file =
            File::options().write(true).open(&mem).map_err(ImageError::io(format!("opening {}", mem.display())))?;
        mem_file.set_len(memory).map_err(ImageError::io(format!("sizing {}", mem.display())))?;
        Ok(())
    }
}

/// Decompress `from` into a new file `to`, at most `limit` bytes; with `sparse`, zero pages are
/// left as holes (guest RAM is mostly zeros).
fn decompress(from: &Path, to: &Path, limit: u64, sparse: bool) -> Result<(), ImageError> {
    let io = |what: &str, p: &Path| ImageError::io(format!("{what} {}", p.display()));
    let input = File::open(from).map_err(io("reading", from))?;
    let mut decoder = zstd::Decoder::new(input).map_err(io("decompressing", from))?.take(limit + 1);
    let out = File::create(to).map_err(io("creating", to))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = read_full(&mut decoder, &mut buf)
            .map_err(|e| ImageError::BadArchive { reason: format!("{} does not decompress: {e}", from.display()) })?;
        if n == 0 {
            break;
        }
        if at + n as u64 > limit {
            return Err(ImageError::BadArchive {
                reason: format!("{} holds more than the {limit} bytes the snapshot declares", from.display()),
            });
        }
        for (i, page) in buf[..n].chunks(4096).enumerate() {
            if !(sparse && page.iter().all(|b| *b == 0)) {
                out.write_all_at(page, at + (i * 4096) as u64).map_err(io("writing", to))?;
            }
        }
        at += n as u64;
    }
    out.set_len(at).map_err(io("writing", to))?;
    out.sync_all().map_err(io("writing", to))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layers: &[(&str, i64)]) -> OciImageManifest {
        let digest = format!("sha256:{}", "a".repeat(64));
        OciImageManifest {
            config: OciDescriptor {
                media_type: CONFIG_TYPE.into(),
                size: 10,
                digest: digest.clone(),
                ..Default::default()
            },
            layers: layers
                .iter()
                .map(|(t, size)| OciDescriptor {
                    media_type: (*t).into(),
                    size: *size,
                    digest: digest.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_base_is_in_the_store_by_its_path_components() {
        let store = Path::new("/var/lib/moat/images");
        assert!(in_dir(Path::new("/var/lib/moat/images/sha256/ab/base.qcow2"), store));
        for outside in ["/var/lib/moat/images2/base.qcow2", "/var/lib/moat/images/../state.db", "images/base.qcow2"] {
            assert!(!in_dir(Path::new(outside), store), "{outside}");
        }
    }

    #[test]
    fn only_the_four_snapshot_layers_are_accepted() {
        let good = [(MEM_TYPE, 1), (BASE_TYPE, 2), (DISK_TYPE, 3), (STATE_TYPE, 4)];
        let layers = check_layers(&manifest(&good)).unwrap();
        assert_eq!(layers.map(|l| l.size), [2, 3, 4, 1]);
        for bad in [
            &good[..3],
            &[(MEM_TYPE, 1), (MEM_TYPE, 2), (DISK_TYPE, 3), (STATE_TYPE, 4)][..],
            &[(MEM_TYPE, -1), (BASE_TYPE, 2), (DISK_TYPE, 3), (STATE_TYPE, 4)][..],
            &[(MEM_TYPE, 1), (BASE_TYPE, 2), (DISK_TYPE, 3), ("application/x-other", 4)][..],
        ] {
            assert!(check_layers(&manifest(bad)).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever a registry sends as a compressed blob (garbage, or a real stream of any
        /// size), decompressing it ends in an error or in at most `limit` bytes: never a panic,
        /// never more.
        #[test]
        fn any_blob_decompresses_within_its_bound_or_is_refused(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            repeat in 0usize..64,
            compressed in proptest::prelude::any::<bool>(),
            limit in 0u64..(64 << 10),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (blob, out) = (dir.path().join("blob"), dir.path().join("out"));
            let body = if compressed { zstd::encode_all(&raw.repeat(repeat)[..], 1).unwrap() } else { raw };
            std::fs::write(&blob, body).unwrap();
            if decompress(&blob, &out, limit, true).is_ok() {
                proptest::prop_assert!(std::fs::metadata(&out).unwrap().len() <= limit);
            }
        }
    }

    #[test]
    fn compression_round_trips_sparsely_and_bounds_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let (src, packed, back) = (dir.path().join("mem"), dir.path().join("mem.zst"), dir.path().join("back"));
        let mut data = vec![0u8; 8 << 20];
        data[5 << 20..(5 << 20) + 4096].fill(7);
        std::fs::write(&src, &data).unwrap();
        let (digest, size) = compress(&src, &packed).unwrap();
        assert_eq!(digest, format!("sha256:{}", hex::encode(Sha256::digest(std::fs::read(&packed).unwrap()))));
        assert!(size < 64 << 10, "{size}");
        decompress(&packed, &back, 8 << 20, true).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&back).unwrap().blocks() * 512 < 1 << 20, "zero pages stay holes");
        // A blob that inflates past what the snapshot declares is refused.
        assert!(matches!(decompress(&packed, &back, 4 << 20, true), Err(ImageError::BadArchive { .. })));
        std::fs::write(&packed, b"not zstd").unwrap();
        assert!(matches!(decompress(&packed, &back, 8 << 20, true), Err(ImageError::BadArchive { .. })));
    }
}
