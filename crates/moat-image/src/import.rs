//! Importing images from archives: `docker save` tarballs and OCI image-layout archives.
//!
//! The archive is untrusted: it is unpacked (regular files and directories only, paths checked)
//! into a staging directory, its manifest and config are parsed with bounded sizes, every OCI
//! blob is checked against its digest, and the layers are applied in order with
//! [`crate::apply_layer`]. The image is committed under the digest of its config (the image id),
//! so importing the same image twice shares one base.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::store::{ImageStore, Provenance};
use crate::{disk, Image, ImageConfig, ImageError};

/// Largest manifest, index or config JSON read into memory.
const MAX_JSON: u64 = 4 << 20;

fn bad(reason: impl Into<String>) -> ImageError {
    ImageError::BadArchive { reason: reason.into() }
}

/// Import the archive read from `archive` as `name` (or, without one, the first tag it carries).
pub fn import_archive(
    store: &ImageStore,
    archive: impl Read,
    name: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<Image, ImageError> {
    let staging = store.stage()?;
    let unpacked = staging.path().join("archive");
    progress("unpacking the archive");
    unpack_archive(archive, &unpacked)?;
    let found = if unpacked.join("manifest.json").is_file() {
        docker_manifest(&unpacked)?
    } else if unpacked.join("index.json").is_file() {
        oci_manifest(&unpacked)?
    } else {
        return Err(bad("it has neither manifest.json (docker save) nor index.json (OCI image layout)"));
    };
    let name = match name.map(str::to_string).or(found.tag) {
        Some(n) => n,
        None => return Err(bad("it names no image; give one with `--name`")),
    };
    crate::validate_image_name(&name)?;
    let config_bytes = read_bounded(&unpacked.join(&found.config))?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
    let config = parse_config(&config_bytes)?;
    if let Some(image) = store.load(&digest)? {
        store.ensure_named(&name, &digest)?;
        return Ok(Image { name, ..image });
    }
    let tree = staging.path().join("tree");
    std::fs::create_dir(&tree).map_err(ImageError::io(format!("creating {}", tree.display())))?;
    for (i, layer) in found.layers.iter().enumerate() {
        progress(&format!("applying layer {}/{}", i + 1, found.layers.len()));
        let path = unpacked.join(layer);
        let file = std::fs::File::open(&path).map_err(|_| bad(format!("layer {} is missing", layer.display())))?;
        crate::apply_layer(std::io::BufReader::new(file), &tree)?;
    }
    std::fs::remove_dir_all(&unpacked).map_err(ImageError::io(format!("removing {}", unpacked.display())))?;
    progress("making the base disk");
    disk::pack_tree(&tree, &staging.base(), "moat-root")?;
    std::fs::remove_dir_all(&tree).map_err(ImageError::io(format!("removing {}", tree.display())))?;
    store.commit(staging, &name, &digest, config, Provenance { source: "import".into(), layers: Vec::new() })
}

/// What a manifest says: the config file, the layer files in order, the first tag.
struct Found {
    config: PathBuf,
    layers: Vec<PathBuf>,
    tag: Option<String>,
}

/// A path from an archive's JSON, which must stay inside the archive.
fn inner_path(p: &str) -> Result<PathBuf, ImageError> {
    let path = Path::new(p);
    if p.is_empty()
        || p.contains('\0')
        || !path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad(format!("it refers to {p:?}, a path outside the archive")));
    }
    Ok(path.to_path_buf())
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ImageError> {
    let file = std::fs::File::open(path).map_err(|_| bad(format!("{} is missing", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1).read_to_end(&mut bytes).map_err(ImageError::io(format!("reading {}", path.display())))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(bad(format!("{} is larger than {MAX_JSON} bytes", path.display())));
    }
    Ok(bytes)
}

fn json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    serde_json::from_slice(&read_bounded(path)?).map_err(|e| bad(format!("{}: {e}", path.display())))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_manifest(root: &Path) -> Result<Found, ImageError> {
    let entries: Vec<DockerEntry> = json(&root.join("manifest.json"))?;
    let entry = entries.into_iter().next().ok_or_else(|| bad("manifest.json lists no image"))?;
    Ok(Found {
        config: inner_path(&entry.config)?,
        layers: entry.layers.iter().map(|l| inner_path(l)).collect::<Result<_, _>>()?,
        tag: entry.repo_tags.and_then(|t| t.into_iter().next()),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The blob file of a digest, after checking the file really has that digest.
fn blob(root: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| bad(format!("{digest:?} is not a sha256 digest")))?;
    let path = root.join("blobs/sha256").join(hex);
    let mut file = std::fs::File::open(&path).map_err(|_| bad(format!("blob {digest} is missing")))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(ImageError::io(format!("reading {}", path.display())))?;
    if hex::encode(hasher.finalize()) != hex.to_ascii_lowercase() {
        return Err(ImageError::DigestMismatch {
            what: format!("blob {}", path.display()),
            expected: digest.to_string(),
        });
    }
    Ok(PathBuf::from("blobs/sha256").join(hex))
}

const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

fn oci_manifest(root: &Path) -> Result<Found, ImageError> {
    let index: Index = json(&root.join("index.json"))?;
    let first = index.manifests.into_iter().next().ok_or_else(|| bad("index.json lists no image"))?;
    let tag = first.annotations.get("org.opencontainers.image.ref.name").cloned();
    let mut desc = first;
    // A nested index (multi-platform) resolves to linux/amd64.
    for _ in 0..4 {
        if !desc.media_type.as_deref().is_some_and(|t| INDEX_TYPES.contains(&t)) {
            break;
        }
        let nested: Index = json(&root.join(blob(root, &desc.digest)?))?;
        desc = nested
            .manifests
            .into_iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
            .ok_or_else(|| bad("the image index has no linux/amd64 image"))?;
    }
    let manifest: Manifest = json(&root.join(blob(root, &desc.digest)?))?;
    Ok(Found {
        config: blob(root, &manifest.config.digest)?,
        layers: manifest.layers.iter().map(|l| blob(root, &l.digest)).collect::<Result<_, _>>()?,
        tag,
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct OciConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<OciConfig>,
}

/// The parts of an image config moat honours: Env, WorkingDir, User, Entrypoint, Cmd.
pub(crate) fn parse_config(bytes: &[u8]) -> Result<ImageConfig, ImageError> {
    let file: ConfigFile = serde_json::from_slice(bytes).map_err(|e| bad(format!("the image config: {e}")))?;
    let c = file.config.unwrap_or_default();
    let env = c
        .env
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    Ok(ImageConfig {
        env,
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
    })
}

/// Unpack the outer archive: only directories and regular files, at checked paths. (Layers
/// inside are tars themselves and applied later with full semantics.)
fn unpack_archive(archive: impl Read, dest: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dest).map_err(ImageError::io(format!("creating {}", dest.display())))?;
    let mut tar = tar::Archive::new(archive);
    let entries = tar.entries().map_err(|e| bad(format!("it is not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("it is not a valid tar archive: {e}")))?;
        let raw = entry.path().map_err(|e| bad(format!("an entry has a bad path: {e}")))?.into_owned();
        let rel = raw.to_string_lossy().trim_start_matches("./").to_string();
        if rel.is_empty() {
            continue;
        }
        let rel = inner_path(&rel)?;
        let target = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(ImageError::io(format!("creating {}", target.display())))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(ImageError::io(format!("creating {}", parent.display())))?;
                }
                let mut out =
                    std::fs::File::create(&target).map_err(ImageError::io(format!("creating {}", target.display())))?;
                std::io::copy(&mut entry, &mut out).map_err(|e| bad(format!("reading {}: {e}", rel.display())))?;
            }
            // Symlinks in the outer archive (docker's legacy layer dedup) are not needed: every
            // layer the manifest names must be a real file.
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_stay_inside() {
        assert!(inner_path("blobs/sha256/ab").is_ok());
        for bad_path in ["../x", "/etc/passwd", "a/../../b", "", "a\0b"] {
            assert!(inner_path(bad_path).is_err(), "{bad_path:?}");
        }
    }

    #[test]
    fn configs_keep_what_moat_honours() {
        let c = parse_config(
            br#"{"config":{"Env":["PATH=/bin","A=b=c","junk"],"WorkingDir":"/srv","User":"1000","Cmd":["sh"],"Entrypoint":null}}"#,
        )
        .unwrap();
        assert_eq!(c.env, [("PATH".to_string(), "/bin".to_string()), ("A".to_string(), "b=c".to_string())]);
        assert_eq!((c.working_dir.as_deref(), c.user.as_deref()), (Some("/srv"), Some("1000")));
        assert_eq!(c.cmd, ["sh"]);
        assert!(c.entrypoint.is_empty());
        assert_eq!(parse_config(b"{}").unwrap(), ImageConfig::default());
        assert!(parse_config(b"not json").is_err());
    }
}
