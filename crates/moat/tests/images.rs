//! Images brought by users: `docker save` tarballs and OCI layouts made by the test, imported
//! through the real daemon and booted; malicious and damaged archives refused with nothing
//! registered.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use common::{moat_in, stop_daemon, text};
use sha2::{Digest, Sha256};

/// A tar stream built in memory.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn file(mut self, path: &str, data: &[u8], mode: u32) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        self.0.append_data(&mut h, path, data).expect("in-memory tar");
        self
    }

    /// A file at a path the tar crate itself would refuse to write (`..`): set in the header raw.
    fn hostile_file(mut self, path: &str, data: &[u8]) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().expect("a GNU header").name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        self.0.append(&h, data).expect("in-memory tar");
        self
    }

    fn dir(mut self, path: &str) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Directory);
        self.0.append_data(&mut h, path, &[][..]).expect("in-memory tar");
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Tar {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(tar::EntryType::Symlink);
        self.0.append_link(&mut h, path, target).expect("in-memory tar");
        self
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().expect("in-memory tar")
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The base layer: the host's static busybox with a shell and the tools the tests use.
fn base_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed (apt-get install busybox-static)");
    let mut t = Tar::new().dir("bin").dir("etc").dir("tmp").dir("proc").dir("sys").dir("dev").dir("root");
    t = t.file("bin/busybox", &busybox, 0o755);
    for applet in ["sh", "cat", "ls", "echo", "id", "env", "pwd", "test"] {
        t = t.symlink(&format!("bin/{applet}"), "busybox");
    }
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644).file("etc/group", b"root:x:0:\n", 0o644).bytes()
}

/// The second layer: deletes a file of the base, adds the greeting.
fn app_layer() -> Vec<u8> {
    Tar::new()
        .file("etc/.wh.group", b"", 0o644)
        .dir("srv")
        .file("srv/hello.txt", b"hello from a layer\n", 0o644)
        .bytes()
}

const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","GREETING=hi"],"WorkingDir":"/srv","Cmd":["cat","hello.txt"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;

/// `docker save` layout: manifest.json, <id>.json, <dir>/layer.tar.
fn docker_save(layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    let mut t = Tar::new();
    let config_name = format!("{}.json", sha(CONFIG.as_bytes()));
    t = t.file(&config_name, CONFIG.as_bytes(), 0o644);
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
fn oci_layout(layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    use std::io::Write;
    let mut t = Tar::new().file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644);
    let mut descs = Vec::new();
    for l in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(l).expect("gzip in memory");
        let blob = gz.finish().expect("gzip in memory");
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", sha(&blob)), "size": blob.len()}));
        t = t.file(&format!("blobs/sha256/{}", sha(&blob)), &blob, 0o644);
    }
    t = t.file(&format!("blobs/sha256/{}", sha(CONFIG.as_bytes())), CONFIG.as_bytes(), 0o644);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(CONFIG.as_bytes())), "size": CONFIG.len()},
        "layers": descs,
    })
    .to_string();
    t = t.file(&format!("blobs/sha256/{}", sha(manifest.as_bytes())), manifest.as_bytes(), 0o644);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", sha(manifest.as_bytes())), "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    t.file("index.json", index.to_string().as_bytes(), 0o644).bytes()
}

/// Run `moat` in `home` with `input` on stdin.
fn moat_with_stdin(home: &Path, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = moat_in(home)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat starts");
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(input).expect("moat reads stdin");
    drop(stdin);
    child.wait_with_output().expect("moat finishes")
}

fn moat_ok(home: &Path, args: &[&str]) -> String {
    let out = moat_in(home).args(args).stdin(Stdio::null()).output().expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "moat {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Stops the test's daemon even when an assertion fails.
struct Home(tempfile::TempDir);

impl Drop for Home {
    fn drop(&mut self) {
        stop_daemon(self.0.path());
    }
}

#[test]
fn docker_save_and_oci_archives_import_and_boot_with_their_config() {
    let home = Home(tempfile::tempdir().expect("tempdir"));
    let h = home.0.path();
    let layers = [base_layer(), app_layer()];

    let out = moat_with_stdin(h, &["image", "import", "-"], &docker_save(&layers, "hello:docker"));
    assert_eq!(out.status.code(), Some(0), "import: {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("hello:docker sha256:"), "{}", text(&out.stdout));

    let archive = home.0.path().join("oci.tar");
    std::fs::write(&archive, oci_layout(&layers, "hello:oci")).expect("write archive");
    moat_ok(h, &["image", "import", archive.to_str().expect("utf-8 path")]);
    let ls = moat_ok(h, &["image", "ls"]);
    assert!(ls.contains("hello:docker") && ls.contains("hello:oci"), "{ls}");

    // No command: the image's Cmd runs in its WorkingDir.
    for image in ["hello:docker", "hello:oci"] {
        assert_eq!(moat_ok(h, &["run", "--memory", "256", "--image", image]), "hello from a layer\n");
    }
    // Env from the config; the whiteout removed /etc/group, the base layer's /etc/passwd stays.
    let out = moat_ok(
        h,
        &[
            "run",
            "--memory",
            "256",
            "--image",
            "hello:oci",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; ls /etc; ls -l /bin/sh",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["hi", "/srv", "passwd"], "{out}");
    assert!(lines[3].contains("/bin/sh -> busybox"), "{out}");
}

#[test]
fn malicious_or_damaged_archives_are_refused_and_nothing_is_registered() {
    let home = Home(tempfile::tempdir().expect("tempdir"));
    let h = home.0.path();
    let outside = tempfile::tempdir().expect("tempdir");
    let outside_str = outside.path().to_str().expect("utf-8 path");

    let traversal = Tar::new().hostile_file("../../escaped", b"x").bytes();
    let symlink_escape_1 = Tar::new().symlink("escape", outside_str).bytes();
    let symlink_escape_2 = Tar::new().file("escape/pwned", b"x", 0o644).bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("traversal", docker_save(&[base_layer(), traversal], "evil:traversal")),
        ("symlink", docker_save(&[base_layer(), symlink_escape_1, symlink_escape_2], "evil:symlink")),
        ("not-a-tar", b"this is not an archive at all".to_vec()),
    ];
    for (what, archive) in cases {
        let out = moat_with_stdin(h, &["image", "import", "-"], &archive);
        assert_eq!(out.status.code(), Some(125), "{what} is refused: {}", text(&out.stdout));
        assert!(text(&out.stderr).contains("hint:"), "{what}: {}", text(&out.stderr));
    }
    // A layer blob whose content does not match its digest.
    let mut oci = oci_layout(&[base_layer()], "evil:digest");
    let pos = oci.windows(4).rposition(|w| w == b"\x1f\x8b\x08\x00").expect("a gzip blob");
    oci[pos + 40] ^= 0xff;
    let out = moat_with_stdin(h, &["image", "import", "-"], &oci);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("digest"), "{}", text(&out.stderr));

    assert!(std::fs::read_dir(outside.path()).expect("readable").next().is_none(), "nothing written outside");
    let ls = moat_ok(h, &["image", "ls", "--json"]);
    let images: Vec<serde_json::Value> = serde_json::from_str(&ls).expect("json");
    assert!(images.iter().all(|i| !i["name"].as_str().unwrap_or("").starts_with("evil")), "{ls}");
    let leftovers: Vec<_> = std::fs::read_dir(h.join("images"))
        .expect("store exists")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "no staging left: {leftovers:?}");
}

/// `moat image build` from Debian packages (debootstrap from deb.debian.org), then a sandbox of
/// it runs python3; the build streamed progress and tidied the tree for a VM.
#[test]
fn an_image_built_from_debian_packages_runs_python() {
    let home = Home(tempfile::tempdir().expect("tempdir"));
    let h = home.0.path();
    assert!(
        std::path::Path::new("/usr/sbin/debootstrap").exists(),
        "the build test needs debootstrap: apt-get install -y debootstrap (or `moat setup`)"
    );
    let out = moat_in(h)
        .args(["image", "build", "py", "--from", "debian:bookworm", "--packages", "python3"])
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "build: {stderr}");
    assert!(stderr.contains("moat: I: Retrieving") && stderr.contains("packing"), "progress is shown: {stderr}");
    let script = "python3 -c 'print(6*7)'; ls /var/lib/apt/lists | grep -c _Packages; stat -c %G /etc/shadow; \
                  grep -c nameserver /etc/resolv.conf";
    let out = moat_in(h)
        .args(["run", "--memory", "512", "--image", "py", "--", "bash", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    assert_eq!(text(&out.stdout), "42\n0\nshadow\n0\n", "stderr: {}", text(&out.stderr));
}
