//! Pulling images from registries that speak the OCI distribution API, with the `oci-client`
//! crate (manifests, indexes, the token dance, digest checks of whole blobs).
//!
//! Layer blobs land in the store's blob cache keyed by digest, so images that share layers share
//! downloads, and an interrupted download resumes from where it stopped (a `Range` request; the
//! digest is then checked over the whole file). The image is committed under its config digest
//! only after every layer is verified and applied, so an interrupted pull registers nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::store::{ImageStore, Provenance};
use crate::{disk, Image, ImageError};

/// Largest image config read into memory.
const MAX_CONFIG: i64 = 4 << 20;
/// More layers than any real image has; a manifest listing more is refused.
const MAX_LAYERS: usize = 256;
/// Bytes between two progress reports of a layer.
const REPORT_EVERY: u64 = 256 << 10;
/// Layers downloaded at once.
const PARALLEL_LAYERS: usize = 3;
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Allow plain http to a registry that is not on loopback.
    pub insecure: bool,
    /// Username and password (or token as password) for the registry; anonymous without.
    pub credentials: Option<(String, String)>,
}

/// What a pull reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    Message(String),
    /// Bytes of one layer blob downloaded so far (`done == total` once it is verified).
    Layer {
        digest: String,
        done: u64,
        total: u64,
    },
}

/// The registry host of a reference as users write it (`alpine` → `docker.io`), for looking up
/// credentials.
pub fn registry_of(reference: &str) -> Result<String, ImageError> {
    Ok(parse(reference)?.registry().to_string())
}

/// A registry client for `registry`: https, or plain http on loopback or with `insecure`. Blobs
/// are pushed in one request each (moat streams them from files whose size it knows).
pub(crate) fn client_for(registry: &str, insecure: bool) -> Client {
    let plain_http = insecure || is_loopback(registry);
    // reqwest's rustls needs a process-wide crypto provider; another part of the process may have
    // installed one already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: if plain_http {
            ClientProtocol::HttpsExcept(vec![registry.to_string()])
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(60)),
        user_agent: concat!("moat/", env!("CARGO_PKG_VERSION")),
        use_monolithic_push: true,
        ..ClientConfig::default()
    })
}

pub(crate) fn auth_of(options: &PullOptions) -> RegistryAuth {
    match &options.credentials {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => RegistryAuth::Anonymous,
    }
}

/// Registry credentials for `reference` from the Docker config (`docker login`, credential
/// helpers), if it has any.
pub fn docker_credentials(reference: &str) -> Result<Option<(String, String)>, ImageError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let registry = registry_of(reference)?;
    let refuse = |reason: String, hint: &str| ImageError::Registry {
        reference: reference.to_string(),
        reason,
        hint: hint.into(),
    };
    match docker_credential::get_credential(&registry) {
        Ok(DockerCredential::UsernamePassword(user, password)) => Ok(Some((user, password))),
        Ok(DockerCredential::IdentityToken(_)) => Err(refuse(
            format!("the Docker config holds an identity token for {registry}, which moat cannot use yet"),
            "pass a user and a password or access token instead",
        )),
        Err(E::ConfigNotFound | E::ConfigReadError | E::NoCredentialConfigured) => Ok(None),
        Err(e) => Err(refuse(
            format!("reading the credentials for {registry} from the Docker config failed: {e}"),
            "check ~/.docker/config.json (or $DOCKER_CONFIG) and its credential helper",
        )),
    }
}

pub(crate) fn parse(reference: &str) -> Result<Reference, ImageError> {
    reference.parse().map_err(|e| ImageError::BadReference { reference: reference.to_string(), reason: format!("{e}") })
}

/// Whether plain http may be used for `registry` without `--insecure`: only on loopback.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Pull `reference` into `store` and name it `name` (the reference as written, without one).
pub async fn pull(
    store: &ImageStore,
    reference: &str,
    name: Option<&str>,
    options: &PullOptions,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<Image, ImageError> {
    let name = name.unwrap_or(reference);
    crate::validate_image_name(name)?;
    let image_ref = parse(reference)?;
    let registry = image_ref.resolve_registry().to_string();
    let client = client_for(&registry, options.insecure);
    let auth = auth_of(options);
    let err = |e: OciDistributionError| registry_error(reference, &registry, e);

    progress(PullProgress::Message(format!("resolving {reference}")));
    let (manifest, manifest_digest, _list) =
        client.pull_image_manifest_and_list_digest(&image_ref, &auth).await.map_err(err)?;
    check_manifest(reference, &manifest)?;
    let fetch_err = |e: Fetch| match e {
        Fetch::Registry(e) => err(e),
        Fetch::Image(e) => e,
    };
    let config_bytes = fetch_config(&client, &image_ref, &manifest.config).await.map_err(fetch_err)?;
    let config_digest = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
    let config = crate::import::parse_config(&config_bytes)?;
    check_platform(reference, &config_bytes)?;
    if let Some(image) = store.load(&config_digest)? {
        progress(PullProgress::Message(format!("{reference} is up to date ({config_digest})")));
        store.ensure_named(name, &config_digest)?;
        return Ok(Image { name: name.to_string(), ..image });
    }

    // Staged before downloading: the staging marks the operation, so `gc` spares the new blobs.
    let staging = store.stage()?;
    let layers = manifest.layers.clone();
    // Collected first: a lazy `map` closure in the stream makes the future not provably `Send`.
    let fetches: Vec<_> = layers
        .iter()
        .map(|layer| async {
            let (blob, partial) = (store.blob_path(&layer.digest)?, store.partial_blob_path(&layer.digest)?);
            fetch_blob(&client, &image_ref, layer, &blob, &partial, progress).await
        })
        .collect();
    futures_util::stream::iter(fetches)
        .buffer_unordered(PARALLEL_LAYERS)
        .try_collect::<Vec<()>>()
        .await
        .map_err(fetch_err)?;

    let tree = staging.path().join("tree");
    let blobs: Vec<PathBuf> = layers.iter().map(|l| store.blob_path(&l.digest)).collect::<Result<_, _>>()?;
    let total = blobs.len();
    let staging = tokio::task::block_in_place(|| -> Result<_, ImageError> {
        std::fs::create_dir(&tree).map_err(ImageError::io(format!("creating {}", tree.display())))?;
        for (i, blob) in blobs.iter().enumerate() {
            progress(PullProgress::Message(format!("applying layer {}/{total}", i + 1)));
            let file = std::fs::File::open(blob).map_err(ImageError::io(format!("opening {}", blob.display())))?;
            crate::apply_layer(std::io::BufReader::new(file), &tree)?;
        }
        progress(PullProgress::Message("making the base disk".into()));
        disk::pack_tree(&tree, &staging.base(), "moat-root")?;
        std::fs::remove_dir_all(&tree).map_err(ImageError::io(format!("removing {}", tree.display())))?;
        Ok(staging)
    })?;
    let provenance = Provenance {
        source: format!("pull {}@{manifest_digest}", image_ref.whole().split('@').next().unwrap_or(reference)),
        layers: layers.iter().map(|l| l.digest.clone()).collect(),
    };
    let image = store.commit(staging, name, &config_digest, config, provenance)?;
    progress(PullProgress::Message(format!("pulled {reference} as {name} ({config_digest})")));
    Ok(image)
}

/// The manifest is untrusted: bounded layer count and sizes, known layer types.
fn check_manifest(reference: &str, m: &OciImageManifest) -> Result<(), ImageError> {
    let bad = |reason: String| ImageError::BadManifest { reference: reference.to_string(), reason };
    if m.layers.is_empty() || m.layers.len() > MAX_LAYERS {
        return Err(bad(format!("it lists {} layers (1 to {MAX_LAYERS} are accepted)", m.layers.len())));
    }
    if m.config.size < 0 || m.config.size > MAX_CONFIG {
        return Err(bad(format!("its config is {} bytes (at most {MAX_CONFIG} are accepted)", m.config.size)));
    }
    for l in &m.layers {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(bad(format!(
                "layer {} has the media type {:?}, which is not a filesystem layer",
                l.digest, l.media_type
            )));
        }
        if l.size < 0 {
            return Err(bad(format!("layer {} has a negative size", l.digest)));
        }
        crate::store::digest_hex(&l.digest).ok_or_else(|| bad(format!("{:?} is not a sha256 digest", l.digest)))?;
    }
    Ok(())
}

/// A single-platform manifest can still be for another architecture; say so before downloading.
fn check_platform(reference: &str, config: &[u8]) -> Result<(), ImageError> {
    #[derive(serde::Deserialize)]
    struct Platform {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
    }
    let p: Platform = serde_json::from_slice(config).map_err(|e| ImageError::BadManifest {
        reference: reference.to_string(),
        reason: format!("its config: {e}"),
    })?;
    let ok = |v: &str, want: &str| v.is_empty() || v == want;
    if !ok(&p.os, "linux") || !ok(&p.architecture, "amd64") {
        return Err(ImageError::WrongPlatform {
            reference: reference.to_string(),
            platform: format!("{}/{}", p.os, p.architecture),
        });
    }
    Ok(())
}

/// The config blob, read into memory no further than its declared (and bounded) size: a hostile
/// registry cannot make the daemon buffer more.
async fn fetch_config(client: &Client, image: &Reference, desc: &OciDescriptor) -> Result<Vec<u8>, Fetch> {
    let limit = desc.size.clamp(0, MAX_CONFIG) as usize;
    let mut stream = client.pull_blob_stream(image, desc).await.map_err(Fetch::Registry)?;
    let mut bytes = Vec::with_capacity(limit);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Fetch::Registry(e.into()))?;
        if bytes.len() + chunk.len() > limit {
            return Err(Fetch::Image(ImageError::DigestMismatch {
                what: format!("the image config (the registry sent more than its {limit} bytes)"),
                expected: desc.digest.clone(),
            }));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

pub(crate) enum Fetch {
    Registry(OciDistributionError),
    Image(ImageError),
}

impl From<ImageError> for Fetch {
    fn from(e: ImageError) -> Fetch {
        Fetch::Image(e)
    }
}

/// Download one blob to `blob`, resuming a partial download kept at `partial`, and verify its
/// digest.
pub(crate) async fn fetch_blob(
    client: &Client,
    image: &Reference,
    layer: &OciDescriptor,
    blob: &Path,
    partial: &Path,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<(), Fetch> {
    let total = layer.size as u64;
    let report = |done| progress(PullProgress::Layer { digest: layer.digest.clone(), done, total });
    if blob.is_file() {
        report(total);
        return Ok(());
    }
    // Two pulls sharing a layer take turns on its partial file; the second then finds the blob.
    let opened = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(partial)
        .map_err(ImageError::io(format!("opening {}", partial.display())))?;
    let locked = tokio::task::spawn_blocking(move || {
        rustix::fs::flock(&opened, rustix::fs::FlockOperation::LockExclusive).map(|()| opened)
    })
    .await
    .expect("flock does not panic")
    .map_err(|e| ImageError::io(format!("locking {}", partial.display()))(e.into()))?;
    if blob.is_file() {
        if locked.metadata().is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(partial);
        }
        report(total);
        return Ok(());
    }
    let have = locked.metadata().map_or(0, |m| m.len());
    let mut hasher = Sha256::new();
    let (stream, mut done) = if have > 0 && have < total {
        match client.pull_blob_stream_partial(image, layer, have, None).await.map_err(Fetch::Registry)? {
            BlobResponse::Partial(s) => {
                hash_file(partial, &mut hasher)?;
                (s, have)
            }
            BlobResponse::Full(s) => (s, 0),
        }
    } else {
        (client.pull_blob_stream(image, layer).await.map_err(Fetch::Registry)?, 0)
    };
    locked.set_len(done).map_err(ImageError::io(format!("truncating {}", partial.display())))?;
    let mut file = tokio::fs::File::from_std(locked);
    file.seek(std::io::SeekFrom::End(0)).await.map_err(ImageError::io(format!("seeking {}", partial.display())))?;
    report(done);
    let mut reported = done;
    let SizedStream { mut stream, .. } = stream;
    // Whatever arrived is kept on disk before any error is returned, so the next pull resumes.
    let mut broke_off = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                broke_off = Some(e);
                break;
            }
        };
        done += chunk.len() as u64;
        if done > total {
            return Err(discard(partial, layer, &format!(" (the registry sent more than its {total} bytes)")));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(ImageError::io(format!("writing {}", partial.display())))?;
        if done - reported >= REPORT_EVERY {
            reported = done;
            report(done);
        }
    }
    file.sync_all().await.map_err(ImageError::io(format!("writing {}", partial.display())))?;
    // A short body is a broken transfer (oci-client reports it as a digest error of the whole
    // blob); only a complete body that hashes wrong is a damaged blob.
    if done < total {
        let e =
            broke_off.unwrap_or_else(|| std::io::Error::other(format!("the registry sent {done} of {total} bytes")));
        return Err(Fetch::Registry(e.into()));
    }
    if broke_off.is_some() || format!("sha256:{}", hex::encode(hasher.finalize())) != layer.digest {
        return Err(discard(partial, layer, ""));
    }
    // Renamed while still locked (`file` holds the lock), so a waiting pull finds the blob.
    std::fs::rename(partial, blob).map_err(ImageError::io(format!(
        "moving {} to {}",
        partial.display(),
        blob.display()
    )))?;
    drop(file);
    report(total);
    Ok(())
}

/// Throw away a download that cannot be the blob it should be; resuming it would only repeat that.
fn discard(partial: &Path, layer: &OciDescriptor, detail: &str) -> Fetch {
    let _ = std::fs::remove_file(partial);
    Fetch::Image(ImageError::DigestMismatch {
        what: format!("layer {}{detail}", layer.digest),
        expected: layer.digest.clone(),
    })
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> Result<(), ImageError> {
    let mut file = std::fs::File::open(path).map_err(ImageError::io(format!("reading {}", path.display())))?;
    std::io::copy(&mut file, hasher).map_err(ImageError::io(format!("reading {}", path.display())))?;
    Ok(())
}

/// A registry failure as a sentence with the remedy that fits it.
pub(crate) fn registry_error(reference: &str, registry: &str, e: OciDistributionError) -> ImageError {
    let (reason, hint) = match &e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => (
            format!("{registry} refused the credentials (or asked for some): {e}"),
            format!("log in with `docker login {registry}` (moat reads the Docker config and its credential helpers), or check the user and password"),
        ),
        OciDistributionError::RequestError(r) if matches!(r.status().map(|s| s.as_u16()), Some(401 | 403)) => (
            format!("{registry} refused the credentials (or asked for some): {e}"),
            format!("log in with `docker login {registry}` (moat reads the Docker config and its credential helpers), or check the user and password"),
        ),
        OciDistributionError::ImageManifestNotFoundError(_) => {
            return ImageError::RemoteMissing { reference: reference.to_string(), reason: format!("{e}") }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|c| {
                matches!(
                    c.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown | oci_client::errors::OciErrorCode::NameUnknown
                )
            }) =>
        {
            return ImageError::RemoteMissing { reference: reference.to_string(), reason: format!("{e}") }
        }
        OciDistributionError::DigestError(_) => {
            return ImageError::DigestMismatch { what: format!("a blob of {reference}"), expected: format!("{e}") }
        }
        OciDistributionError::ImageIndexParsingNoPlatformResolverError => {
            (format!("{reference} has no linux/amd64 image"), "pick a tag built for linux/amd64".into())
        }
        OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => (
            format!("cannot reach {registry}: {}", error_chain(r)),
            "check that the registry is up and the address is right; a registry on plain http needs `--insecure` unless it is on localhost; the download resumes where it stopped".into(),
        ),
        OciDistributionError::RequestError(r) => (
            format!("talking to {registry} failed: {}", error_chain(r)),
            "run the pull again; the download resumes where it stopped".into(),
        ),
        OciDistributionError::IoError(_) => (
            format!("the download from {registry} broke off: {e}"),
            "run the pull again; it resumes where it stopped".into(),
        ),
        _ => (format!("pulling from {registry} failed: {e}"), "run the pull again; if it keeps failing, check the registry".into()),
    };
    ImageError::Registry { reference: reference.to_string(), reason, hint }
}

/// reqwest's own message hides the cause ("error sending request"); the chain has it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_allowed_only_on_loopback() {
        for r in ["localhost:5000", "localhost", "127.0.0.1:5000", "127.9.9.9", "[::1]:5000"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["docker.io", "index.docker.io", "10.0.0.1:5000", "ghcr.io", "localhost.evil.com", "[::2]:80"] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn references_name_their_registry() {
        assert_eq!(registry_of("alpine").unwrap(), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/app:v1").unwrap(), "127.0.0.1:5000");
        assert_eq!(registry_of(&format!("ghcr.io/org/app@sha256:{}", "a".repeat(64))).unwrap(), "ghcr.io");
        assert!(registry_of("org/UPPER").is_err() && registry_of("a b").is_err());
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let layer = |media: &str, size: i64, digest: &str| OciDescriptor {
            media_type: media.into(),
            size,
            digest: digest.into(),
            ..OciDescriptor::default()
        };
        let good = format!("sha256:{}", "a".repeat(64));
        let manifest = |layers: Vec<OciDescriptor>| OciImageManifest { layers, ..OciImageManifest::default() };
        assert!(check_manifest("x", &manifest(vec![layer(LAYER_TYPES[1], 10, &good)])).is_ok());
        for m in [
            manifest(vec![]),
            manifest(vec![layer(LAYER_TYPES[1], 10, &good); MAX_LAYERS + 1]),
            manifest(vec![layer("application/vnd.in-toto+json", 10, &good)]),
            manifest(vec![layer(LAYER_TYPES[1], -1, &good)]),
            manifest(vec![layer(LAYER_TYPES[1], 10, "sha256:../../etc")]),
        ] {
            assert!(matches!(check_manifest("x", &m), Err(ImageError::BadManifest { .. })), "{m:?}");
        }
    }

    #[test]
    fn images_for_other_platforms_are_refused() {
        assert!(check_platform("x", br#"{"architecture":"amd64","os":"linux"}"#).is_ok());
        let err = check_platform("x", br#"{"architecture":"arm64","os":"linux"}"#).unwrap_err();
        assert!(err.to_string().contains("linux/arm64"), "{err}");
        assert!(check_platform("x", b"7").is_err());
    }
}
