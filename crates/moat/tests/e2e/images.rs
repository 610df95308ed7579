//! Images brought by users: `docker save` tarballs and OCI layouts made by the test, imported
//! through the real daemon and booted; malicious and damaged archives refused with nothing
//! registered.

use crate::common;
use crate::oci;

use std::path::Path;
use std::process::{Output, Stdio};

use common::{moat_in, moat_ok, text, OwnHome};
use oci::{app_layer, base_layer, docker_save, docker_save_with, oci_layout, Tar, CONFIG};

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

#[test]
fn docker_save_and_oci_archives_import_and_boot_with_their_config() {
    let home = OwnHome::new();
    let h = home.path();
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
    // The archive's /etc has passwd; resolv.conf is moat's resolver, written by the agent.
    assert_eq!(&lines[..4], ["hi", "/srv", "passwd", "resolv.conf"], "{out}");
    assert!(lines[4].contains("/bin/sh -> busybox"), "{out}");
}

#[test]
fn a_sandbox_keeps_its_image_when_the_name_moves() {
    let home = OwnHome::new();
    let h = home.path();
    let layers = [base_layer(), app_layer()];
    let import = |greeting: &str| {
        let config = CONFIG.replace("GREETING=hi", &format!("GREETING={greeting}"));
        let out = moat_with_stdin(h, &["image", "import", "-"], &docker_save_with(&layers, "pin:test", &config));
        assert_eq!(out.status.code(), Some(0), "import: {}", text(&out.stderr));
    };
    import("first");
    moat_ok(h, &["run", "-d", "--name", "pinned", "--memory", "256", "--image", "pin:test"]);
    let greeting = || moat_ok(h, &["exec", "pinned", "--", "sh", "-c", "echo $GREETING"]);
    assert_eq!(greeting(), "first\n");
    let digest = |name: &str| -> String {
        let info: serde_json::Value = serde_json::from_str(&moat_ok(h, &["inspect", name, "--json"])).expect("JSON");
        info["image_digest"].as_str().expect("inspect shows image_digest").to_string()
    };
    let made_from = digest("pinned");

    // The name now points to another image; the sandbox, stopped and started, boots the one it
    // was made from, and so does a sandbox restored from its snapshot. New sandboxes get the new.
    moat_ok(h, &["stop", "pinned"]);
    import("second");
    moat_ok(h, &["start", "pinned"]);
    assert_eq!(greeting(), "first\n", "a restart took the re-pointed name's image");
    assert_eq!(digest("pinned"), made_from);
    moat_ok(h, &["snapshot", "pinned", "--name", "pin-snap"]);
    moat_ok(h, &["run", "-d", "--name", "restored", "--memory", "256", "--from", "pinned:pin-snap"]);
    assert_eq!(digest("restored"), made_from, "a restore took the re-pointed name's image");
    assert_eq!(moat_ok(h, &["exec", "restored", "--", "sh", "-c", "echo $GREETING"]), "first\n");
    let fresh = moat_ok(h, &["run", "--memory", "256", "--image", "pin:test", "--", "sh", "-c", "echo $GREETING"]);
    assert_eq!(fresh, "second\n");
}

#[test]
fn malicious_or_damaged_archives_are_refused_and_nothing_is_registered() {
    let home = OwnHome::new();
    let h = home.path();
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
fn the_default_image_is_built_on_first_use_and_runs_python() {
    let home = OwnHome::new();
    let h = home.path();
    assert!(
        std::path::Path::new("/usr/sbin/debootstrap").exists(),
        "the build test needs debootstrap: apt-get install -y debootstrap (or `moat setup`)"
    );
    let run = |script: &str| {
        moat_in(h)
            .env_remove("MOAT_IMAGE")
            .args(["run", "--memory", "512", "--", "bash", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("moat runs")
    };
    let script =
        "python3 -c 'print(6*7)'; python3 -m pip --version | cut -c1-4; ls /var/lib/apt/lists | grep -c _Packages; \
                  stat -c %G /etc/shadow; grep -c nameserver /etc/resolv.conf; grep -c 'nameserver 10.0.2.3' /etc/resolv.conf";
    let out = run(script);
    let stderr = text(&out.stderr);
    // The build's own resolver is gone from the image: the one nameserver is moat's.
    assert_eq!(text(&out.stdout), "42\npip \n0\nshadow\n1\n1\n", "stderr: {stderr}");
    // Its steps, not debootstrap's hundreds of lines (those are in the daemon's log, and with
    // --verbose).
    assert!(
        stderr.contains("building the default image")
            && stderr.contains("packing")
            && !stderr.contains("I: Retrieving"),
        "the first run shows the build's steps: {stderr}"
    );
    let log = std::fs::read_to_string(h.join("daemon.log")).unwrap_or_default();
    assert!(log.contains("I: Retrieving"), "the daemon's log keeps every line of the build");

    let out = run("python3 -c 'print(7*6)'");
    assert_eq!(text(&out.stdout), "42\n", "stderr: {}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("building"), "later runs start at once: {}", text(&out.stderr));

    // The same recipe built by hand (packages in another order) is the same image, not a rebuild.
    let mut packages = moat_api::DEFAULT_IMAGE_PACKAGES.to_vec();
    packages.reverse();
    let out = moat_in(h)
        .args(["image", "build", "py", "--from", "debian:12", "--packages", &packages.join(",")])
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "build: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("reusing it"), "{}", text(&out.stderr));
    let list = moat_ok(h, &["image", "ls", "--json"]);
    let list: Vec<moat_api::ImageInfo> = serde_json::from_str(&list).expect("image ls --json");
    let digest = |n: &str| list.iter().find(|i| i.name == n).map(|i| i.digest.clone());
    assert!(digest("py").is_some() && digest("py") == digest("default"), "{list:?}");
    let source = &list.iter().find(|i| i.name == "py").expect("listed").source;
    assert!(source.starts_with("build debian:bookworm +ca-certificates,curl,python3"), "{source}");
}

/// A request the daemon refuses is refused before the missing default image is built, and the
/// CLI says nothing of building it.
#[test]
fn a_bad_size_is_refused_before_the_default_image_is_built() {
    let home = OwnHome::new();
    let out = moat_in(home.path())
        .env_remove("MOAT_IMAGE")
        .args(["run", "--memory", "99999999", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("out of range") && !stderr.contains("building"), "{stderr}");
    let images: Vec<moat_api::ImageInfo> =
        serde_json::from_str(&moat_ok(home.path(), &["image", "ls", "--json"])).expect("image ls --json");
    assert!(images.iter().all(|i| i.name != moat_api::DEFAULT_IMAGE), "nothing was built: {images:?}");
}
