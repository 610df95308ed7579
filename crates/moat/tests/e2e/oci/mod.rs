//! Images made by the tests, in memory or on disk: tar layers, `docker save` archives, OCI image
//! layouts (as an archive, or as a directory that `skopeo` can push to a registry).
#![allow(dead_code)] // Each test file uses a different part of the module.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A tar stream built in memory.
pub struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    pub fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    pub fn file(mut self, path: &str, data: &[u8], mode: u32) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        self.0.append_data(&mut h, path, data).expect("in-memory tar");
        self
    }

    /// A file at a path the tar crate itself would refuse to write (`..`): set in the header raw.
    pub fn hostile_file(mut self, path: &str, data: &[u8]) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().expect("a GNU header").name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        self.0.append(&h, data).expect("in-memory tar");
        self
    }

    pub fn dir(mut self, path: &str) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Directory);
        self.0.append_data(&mut h, path, &[][..]).expect("in-memory tar");
        self
    }

    /// A directory with an owner and a mode of the test's choosing (the sticky bit included).
    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Directory);
        self.0.append_data(&mut h, path, &[][..]).expect("in-memory tar");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(tar::EntryType::Symlink);
        self.0.append_link(&mut h, path, target).expect("in-memory tar");
        self
    }

    pub fn bytes(self) -> Vec<u8> {
        self.0.into_inner().expect("in-memory tar")
    }
}

/// Hex SHA-256 of `data`, without the `sha256:` prefix.
pub fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `sha256:<hex>` of `data`, as digests appear in manifests and registry URLs.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha(data))
}

/// The base layer: the host's static busybox with a shell and the tools the tests use.
pub fn base_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed (apt-get install busybox-static)");
    let mut t = Tar::new().dir("bin").dir("etc").dir("tmp").dir("proc").dir("sys").dir("dev").dir("root");
    t = t.file("bin/busybox", &busybox, 0o755);
    for applet in ["sh", "cat", "ls", "echo", "id", "env", "pwd", "test"] {
        t = t.symlink(&format!("bin/{applet}"), "busybox");
    }
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644).file("etc/group", b"root:x:0:\n", 0o644).bytes()
}

/// The second layer: deletes a file of the base, adds the greeting.
pub fn app_layer() -> Vec<u8> {
    Tar::new()
        .file("etc/.wh.group", b"", 0o644)
        .dir("srv")
        .file("srv/hello.txt", b"hello from a layer\n", 0o644)
        .bytes()
}

pub const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","GREETING=hi"],"WorkingDir":"/srv","Cmd":["cat","hello.txt"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;

/// `docker save` layout: manifest.json, <id>.json, <dir>/layer.tar.
pub fn docker_save(layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    docker_save_with(layers, tag, CONFIG)
}

/// [`docker_save`] with an image config of the caller's.
pub fn docker_save_with(layers: &[Vec<u8>], tag: &str, config: &str) -> Vec<u8> {
    let mut t = Tar::new();
    let config_name = format!("{}.json", sha(config.as_bytes()));
    t = t.file(&config_name, config.as_bytes(), 0o644);
    let mut names = Vec::new();
    for l in layers {
        let name = format!("{}/layer.tar", sha(l));
        t = t.file(&name, l, 0o644);
        names.push(name);
    }
    let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": [tag], "Layers": names }]);
    t.file("manifest.json", manifest.to_string().as_bytes(), 0o644).bytes()
}

/// OCI image layout: oci-layout, index.json, blobs/sha256/*; layers gzip-compressed.
pub fn oci_layout(layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    let mut t = Tar::new().file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644);
    let mut descs = Vec::new();
    for l in layers {
        let blob = gzip(l, flate2::Compression::fast());
        descs.push(serde_json::json!({"mediaType": LAYER_GZIP, "digest": digest(&blob), "size": blob.len()}));
        t = t.file(&format!("blobs/sha256/{}", sha(&blob)), &blob, 0o644);
    }
    t = t.file(&format!("blobs/sha256/{}", sha(CONFIG.as_bytes())), CONFIG.as_bytes(), 0o644);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": IMAGE_CONFIG, "digest": digest(CONFIG.as_bytes()), "size": CONFIG.len()},
        "layers": descs,
    })
    .to_string();
    t = t.file(&format!("blobs/sha256/{}", sha(manifest.as_bytes())), manifest.as_bytes(), 0o644);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": MANIFEST, "digest": digest(manifest.as_bytes()), "size": manifest.len(), "annotations": {REF_NAME: tag}}],
    });
    t.file("index.json", index.to_string().as_bytes(), 0o644).bytes()
}

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation an OCI layout's index.json uses to name (tag) an entry.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn gzip(data: &[u8], level: flate2::Compression) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 2), level);
    gz.write_all(data).expect("gzip in memory");
    gz.finish().expect("gzip in memory")
}

/// A layer ready to go in an image: the gzip blob and its digests.
pub struct Layer {
    /// The compressed blob, as stored in a layout or registry.
    pub blob: Vec<u8>,
    /// `sha256:` of the blob: the layer's digest in the manifest and the registry.
    pub digest: String,
    /// `sha256:` of the uncompressed tar: the layer's entry in the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

impl Layer {
    /// Gzip `tar` (fast level).
    pub fn gzip(tar: &[u8]) -> Layer {
        let blob = gzip(tar, flate2::Compression::fast());
        Layer { digest: digest(&blob), blob, diff_id: digest(tar) }
    }
}

/// A layer holding one file of `mib` MiB of incompressible bytes at `path`, the same for the same
/// `seed`, for transfer tests (resume, throughput) where the bytes on the wire must be real.
///
/// Hashing and compressing are slow in a debug build (about 15 s for 64 MiB), so the layer is
/// kept under the cargo target dir and made once per (path, size, seed). The gzip stream uses
/// stored blocks: deflate could not shrink the data anyway.
pub fn big_layer(path: &str, mib: usize, seed: u64) -> Layer {
    // Bump when what this function produces changes, so old cached layers are not used.
    const VERSION: u32 = 1;
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oci-big-layers");
    let key = format!("v{VERSION}-{mib}mib-seed{seed}-{}", &sha(path.as_bytes())[..16]);
    let (blob_path, ids_path) = (cache.join(format!("{key}.tar.gz")), cache.join(format!("{key}.ids")));
    if let (Ok(blob), Ok(ids)) = (std::fs::read(&blob_path), std::fs::read_to_string(&ids_path)) {
        if let Some((digest, diff_id)) = ids.split_once('\n') {
            return Layer { blob, digest: digest.to_string(), diff_id: diff_id.trim().to_string() };
        }
    }
    let mut data = vec![0u8; mib << 20];
    // splitmix64: deterministic, and no compressor gets anything out of it.
    let mut state = seed;
    for chunk in data.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    let tar = Tar::new().file(path, &data, 0o644).bytes();
    drop(data);
    let blob = gzip(&tar, flate2::Compression::none());
    let layer = Layer { digest: digest(&blob), blob, diff_id: digest(&tar) };
    // Tests run in parallel: write under a unique name, then rename into place (atomic); the ids
    // go last, so a reader that finds them finds the whole blob.
    std::fs::create_dir_all(&cache).expect("the target dir is writable");
    let unique = format!("{}-{:?}", std::process::id(), std::thread::current().id());
    for (dest, bytes) in
        [(&blob_path, &layer.blob[..]), (&ids_path, format!("{}\n{}\n", layer.digest, layer.diff_id).as_bytes())]
    {
        let tmp = dest.with_extension(format!("tmp-{unique}"));
        std::fs::write(&tmp, bytes).expect("the target dir is writable");
        std::fs::rename(&tmp, dest).expect("the target dir is writable");
    }
    layer
}

/// What a test needs to know about an image it wrote; every digest is `sha256:<hex>`.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    /// The manifest's digest: what the tag resolves to in a registry after a push.
    pub manifest: String,
    /// The config blob's digest, which is the image id.
    pub config: String,
    /// The compressed layer blobs, base first.
    pub layers: Vec<String>,
    /// The uncompressed layers (`rootfs.diff_ids` of the config), base first.
    pub diff_ids: Vec<String>,
}

/// A multi-platform image: an index whose first entry is linux/arm64 and second linux/amd64.
#[derive(Debug, Clone)]
pub struct WrittenIndex {
    /// The image index's digest: what the tag resolves to.
    pub index: String,
    pub arm64: WrittenImage,
    pub amd64: WrittenImage,
}

/// An OCI image layout written as a directory (oci-layout, index.json, blobs/sha256/…), holding any
/// number of tagged images; `skopeo copy oci:DIR:TAG …` reads it.
pub struct OciLayoutDir {
    path: PathBuf,
    entries: Vec<serde_json::Value>,
}

impl OciLayoutDir {
    /// Start an empty layout in `path` (created if missing).
    pub fn create(path: &Path) -> OciLayoutDir {
        std::fs::create_dir_all(path.join("blobs/sha256")).expect("layout dir is writable");
        std::fs::write(path.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout dir is writable");
        let layout = OciLayoutDir { path: path.to_path_buf(), entries: Vec::new() };
        layout.write_index();
        layout
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Add an image tagged `tag`: `config` is the image config JSON, whose `rootfs` is replaced
    /// by one listing the layers' diff ids, so the config is consistent with the layers.
    pub fn add_image(&mut self, tag: &str, layers: &[Layer], config: &str) -> WrittenImage {
        let (image, manifest) = self.write_image(layers, config);
        self.tag(tag, MANIFEST, &image.manifest, manifest.len());
        image
    }

    /// Add a multi-platform image tagged `tag`: an image index of linux/arm64 (listed first) and
    /// linux/amd64. Each platform is `base` plus a layer with `/arch.txt` holding `arm64\n` or
    /// `amd64\n`, and its config runs `cat /arch.txt`; a pull that picks the host's platform
    /// (amd64) rather than the first entry prints `amd64`.
    pub fn add_multi_platform(&mut self, tag: &str, base: &[Layer]) -> WrittenIndex {
        let platform = |arch: &str, variant: Option<&str>| {
            let mut layers: Vec<&Layer> = base.iter().collect();
            let arch_layer = Layer::gzip(&Tar::new().file("arch.txt", format!("{arch}\n").as_bytes(), 0o644).bytes());
            layers.push(&arch_layer);
            let mut config = serde_json::json!({
                "architecture": arch,
                "os": "linux",
                "config": {"Env": ["PATH=/bin"], "Cmd": ["cat", "/arch.txt"]},
            });
            let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
            if let Some(v) = variant {
                config["variant"] = v.into();
                platform["variant"] = v.into();
            }
            let (image, manifest) = self.write_image_refs(&layers, &config.to_string());
            let desc = serde_json::json!({
                "mediaType": MANIFEST, "digest": image.manifest, "size": manifest.len(), "platform": platform,
            });
            (image, desc)
        };
        let (arm64, arm64_desc) = platform("arm64", Some("v8"));
        let (amd64, amd64_desc) = platform("amd64", None);
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": [arm64_desc, amd64_desc]})
            .to_string();
        let index_digest = self.write_blob(index.as_bytes());
        self.tag(tag, INDEX, &index_digest, index.len());
        WrittenIndex { index: index_digest, arm64, amd64 }
    }

    fn write_image(&self, layers: &[Layer], config: &str) -> (WrittenImage, String) {
        self.write_image_refs(&layers.iter().collect::<Vec<_>>(), config)
    }

    fn write_image_refs(&self, layers: &[&Layer], config: &str) -> (WrittenImage, String) {
        let mut config: serde_json::Value = serde_json::from_str(config).expect("the test's config is JSON");
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
        let config = config.to_string();
        let config_digest = self.write_blob(config.as_bytes());
        let descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| {
                self.write_blob_as(&l.digest, &l.blob);
                serde_json::json!({"mediaType": LAYER_GZIP, "digest": l.digest, "size": l.blob.len()})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": IMAGE_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": descs,
        })
        .to_string();
        let image = WrittenImage {
            manifest: self.write_blob(manifest.as_bytes()),
            config: config_digest,
            layers: layers.iter().map(|l| l.digest.clone()).collect(),
            diff_ids,
        };
        (image, manifest)
    }

    /// Store a blob (once) and return its digest.
    fn write_blob(&self, data: &[u8]) -> String {
        let digest = digest(data);
        self.write_blob_as(&digest, data);
        digest
    }

    /// Store a blob whose digest is already known.
    fn write_blob_as(&self, digest: &str, data: &[u8]) {
        let hex = digest.strip_prefix("sha256:").expect("a sha256: digest");
        let path = self.path.join("blobs/sha256").join(hex);
        if !path.exists() {
            std::fs::write(&path, data).expect("layout dir is writable");
        }
    }

    fn tag(&mut self, tag: &str, media_type: &str, digest: &str, size: usize) {
        self.entries.retain(|e| e["annotations"][REF_NAME] != tag);
        self.entries.push(serde_json::json!({
            "mediaType": media_type, "digest": digest, "size": size, "annotations": {REF_NAME: tag},
        }));
        self.write_index();
    }

    fn write_index(&self) {
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": self.entries});
        std::fs::write(self.path.join("index.json"), index.to_string()).expect("layout dir is writable");
    }
}
