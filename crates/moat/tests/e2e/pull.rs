//! Pulling from a real registry (Debian's `docker-registry` on loopback, images pushed by skopeo)
//! through the real daemon, then booting what was pulled: credentials from the Docker config,
//! multi-platform indexes, whiteouts, a corrupted blob, and a registry that goes down mid-pull.

use crate::common;
use crate::oci;
use crate::registry;

use std::path::Path;
use std::process::{Output, Stdio};

use common::{moat_in, moat_ok, text, OwnHome};
use oci::{app_layer, base_layer, big_layer, Layer, OciLayoutDir, Tar, CONFIG};
use registry::{CutProxy, Registry};

fn moat(home: &Path, args: &[&str]) -> Output {
    moat_in(home).args(args).stdin(Stdio::null()).output().expect("moat runs")
}

fn image_names(home: &Path) -> Vec<String> {
    let list: Vec<moat_api::ImageInfo> =
        serde_json::from_str(&moat_ok(home, &["image", "ls", "--json"])).expect("image ls --json");
    list.into_iter().map(|i| i.name).collect()
}

/// Files directly in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// A Docker config directory holding `user:password` for `registry`, as `docker login` writes it.
fn docker_config(dir: &Path, registry: &str, user: &str, password: &str) {
    let auth = registry::basic_auth(user, password);
    let auth = auth.trim_start_matches("Basic ");
    let config = serde_json::json!({"auths": {registry: {"auth": auth}}});
    std::fs::write(dir.join("config.json"), config.to_string()).expect("tempdir is writable");
}

#[test]
fn images_pull_with_docker_credentials_resolve_indexes_and_boot() {
    let home = OwnHome::new();
    let h = home.path();
    let registry = Registry::start(Some(("agent", "s3cret")));
    let work = tempfile::tempdir().expect("tempdir");
    let mut layout = OciLayoutDir::create(&work.path().join("layout"));
    let base = Layer::gzip(&base_layer());
    let app = layout.add_image("app", &[Layer::gzip(&base_layer()), Layer::gzip(&app_layer())], CONFIG);
    layout.add_multi_platform("multi", &[base]);
    registry.push(layout.path(), "app", "moat/app:1");
    registry.push(layout.path(), "multi", "moat/multi:1");
    let app_ref = format!("{}/moat/app:1", registry.addr());
    let multi_ref = format!("{}/moat/multi:1", registry.addr());

    // Without credentials the registry refuses; the error says how to log in, nothing is kept.
    let no_docker_config = work.path().join("empty-docker-config");
    std::fs::create_dir(&no_docker_config).expect("tempdir is writable");
    let out = moat_in(h).env("DOCKER_CONFIG", &no_docker_config).args(["image", "pull", &multi_ref]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("docker login"), "{}", text(&out.stderr));
    assert!(!image_names(h).contains(&multi_ref));

    // Credentials from the Docker config, as `docker login` leaves them; the index resolves to
    // linux/amd64 although arm64 is listed first, and the image's Cmd runs.
    let docker = work.path().join("docker");
    std::fs::create_dir(&docker).expect("tempdir is writable");
    docker_config(&docker, &registry.addr(), "agent", "s3cret");
    let pull = |reference: &str| {
        moat_in(h).env("DOCKER_CONFIG", &docker).args(["image", "pull", reference]).stdin(Stdio::null()).output()
    };
    let out = pull(&multi_ref).expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("verified"), "layer progress is shown: {}", text(&out.stderr));
    let out = moat_in(h).env("DOCKER_CONFIG", &docker).args(["run", "--image", &multi_ref]).output().unwrap();
    assert_eq!(text(&out.stdout), "amd64\n", "{}", text(&out.stderr));

    // A second pull finds it up to date.
    let out = pull(&multi_ref).expect("moat runs");
    assert!(text(&out.stderr).contains("up to date"), "{}", text(&out.stderr));

    // `moat run --image REF` pulls on first use, here with the password on stdin instead of the
    // Docker config. The second layer's whiteout hides the base's /etc/group.
    let out = moat_in(h)
        .env("DOCKER_CONFIG", &no_docker_config)
        .args(["image", "pull", "--name", "app", "--username", "agent", "--password-stdin", &app_ref])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("piped").write_all(b"s3cret\n")?;
            child.wait_with_output()
        })
        .expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("app {}", app.config)), "{}", text(&out.stdout));
    let out = moat_in(h)
        .env("DOCKER_CONFIG", &docker)
        .args([
            "run",
            "--image",
            &app_ref,
            "--",
            "sh",
            "-c",
            "test -e /etc/group && echo present || echo gone; cat hello.txt; echo $GREETING",
        ])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "gone\nhello from a layer\nhi\n", "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("pulling it"), "{}", text(&out.stderr));

    let list: Vec<moat_api::ImageInfo> =
        serde_json::from_str(&moat_ok(h, &["image", "ls", "--json"])).expect("image ls --json");
    let app_image = list.iter().find(|i| i.name == app_ref).expect("the run pulled the app image");
    assert_eq!(app_image.digest, app.config, "images are keyed by their config digest");
    assert!(app_image.source.starts_with(&format!("pull {app_ref}@sha256:")), "{}", app_image.source);
    // The base layer is shared: one blob in the cache serves the app and the multi-platform image.
    let blobs = files_in(&h.join("images/blobs/sha256"));
    assert!(blobs.contains(&app.layers[0].trim_start_matches("sha256:").to_string()), "{blobs:?}");
    assert_eq!(blobs.len(), 3, "base, app layer and the amd64 arch layer, not the arm64 one: {blobs:?}");
}

#[test]
fn damaged_and_interrupted_pulls_register_nothing_and_resume() {
    let home = OwnHome::new();
    let h = home.path();
    let registry = Registry::start(None);
    let work = tempfile::tempdir().expect("tempdir");
    let mut layout = OciLayoutDir::create(&work.path().join("layout"));
    let big = big_layer("data/big.bin", 24, 1);
    let big_size = big.blob.len() as u64;
    let big_image = layout.add_image("big", &[Layer::gzip(&base_layer()), big, Layer::gzip(&app_layer())], CONFIG);
    // Its own second layer: registries share blobs between repositories, so corrupting one
    // another image uses would break that image too.
    let odd = Layer::gzip(&Tar::new().file("odd.txt", b"only in the broken image\n", 0o644).bytes());
    let broken = layout.add_image("broken", &[Layer::gzip(&base_layer()), odd], CONFIG);
    registry.push(layout.path(), "big", "moat/big:1");
    registry.push(layout.path(), "broken", "moat/broken:1");

    // Bad references are refused before any traffic.
    for bad in ["Not A Ref", "http://127.0.0.1:1/x", ""] {
        let out = moat(h, &["image", "pull", bad]);
        assert_ne!(out.status.code(), Some(0), "{bad:?}");
        assert!(text(&out.stderr).contains("hint:"), "{bad:?}: {}", text(&out.stderr));
    }

    // A blob whose bytes do not match its digest: a clear error, nothing registered or cached.
    registry.corrupt_blob(&broken.layers[1]);
    let broken_ref = format!("{}/moat/broken:1", registry.addr());
    let out = moat(h, &["image", "pull", &broken_ref]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("digest"), "{}", text(&out.stderr));
    assert!(!image_names(h).contains(&broken_ref));
    let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
    assert!(!files_in(&h.join("images/blobs/sha256")).contains(&hex(&broken.layers[1])));
    assert!(!files_in(&h.join("images/blobs/partial")).contains(&hex(&broken.layers[1])));

    // The registry goes down in the middle of the big layer.
    let proxy = CutProxy::start(&registry.addr());
    let big_ref = format!("{}/moat/big:1", proxy.addr());
    proxy.set_cut_after(big_size / 2);
    let out = moat(h, &["image", "pull", &big_ref]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("resumes"), "the error says the pull can be resumed: {stderr}");
    assert!(!image_names(h).contains(&big_ref), "nothing is registered");
    let partial = h.join("images/blobs/partial").join(hex(&big_image.layers[1]));
    let kept = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0 && kept < big_size, "the partial download is kept ({kept} of {big_size} bytes)");

    // Back up: the pull resumes instead of starting over, and the result is whole.
    proxy.set_pass();
    let before = proxy.bytes_to_client();
    moat_ok(h, &["image", "pull", &big_ref]);
    let sent = proxy.bytes_to_client() - before;
    assert!(sent < big_size - kept / 2, "resumed: {sent} bytes sent for a {big_size}-byte layer with {kept} kept");
    assert!(!partial.exists());
    let out = moat(h, &["run", "--image", &big_ref, "--", "ls", "-l", "/data/big.bin"]);
    assert!(text(&out.stdout).contains(&(24u64 << 20).to_string()), "{}{}", text(&out.stdout), text(&out.stderr));

    // Removing the image and collecting garbage drops its layers from the cache.
    moat_ok(h, &["image", "rm", &big_ref]);
    let removed = moat_ok(h, &["image", "gc"]);
    assert!(removed.contains(&hex(&big_image.layers[1])), "{removed}");
    assert!(files_in(&h.join("images/blobs/sha256")).is_empty());

    // Two pulls of the same image at once download each layer once and both succeed.
    let before = proxy.bytes_to_client();
    let pulls: Vec<_> = (0..2)
        .map(|_| {
            let mut cmd = moat_in(h);
            cmd.args(["image", "pull", &big_ref]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.spawn().expect("moat starts")
        })
        .collect();
    for child in pulls {
        let out = child.wait_with_output().expect("moat finishes");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let sent = proxy.bytes_to_client() - before;
    assert!(sent < big_size + big_size / 2, "{sent} bytes for a {big_size}-byte layer pulled twice at once");
    assert!(files_in(&h.join("images/blobs/partial")).is_empty());
}

/// Image on first use is the daemon's: a create through the API (no CLI) pulls the missing image
/// once for two creates at once, says so on the event stream, and `pull: never` refuses instead.
#[test]
fn a_create_through_the_api_pulls_its_missing_image_once_and_reports_it_as_events() {
    use futures_util::StreamExt;
    use moat_api::{CreateSandbox, ErrorCode, PullPolicy};

    let home = OwnHome::new();
    let h = home.path();
    let registry = Registry::start(None);
    let work = tempfile::tempdir().expect("tempdir");
    let mut layout = OciLayoutDir::create(&work.path().join("layout"));
    let app = layout.add_image("app", &[Layer::gzip(&base_layer()), Layer::gzip(&app_layer())], CONFIG);
    registry.push(layout.path(), "app", "moat/app:1");
    let app_ref = format!("{}/moat/app:1", registry.addr());
    moat_ok(h, &["image", "ls"]); // starts the daemon

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    rt.block_on(async {
        let client = moat_client::Client::new(&moat_daemon::socket_path(h));
        let create = |name: &str, pull: Option<PullPolicy>| CreateSandbox {
            name: Some(name.to_string()),
            image: Some(app_ref.clone()),
            memory_mib: Some(256),
            template: Some(false),
            pull,
            ..CreateSandbox::default()
        };
        let refused = client.create(&create("never", Some(PullPolicy::Never))).await.expect_err("pull: never");
        assert_eq!(refused.code(), Some(ErrorCode::NotFound), "{refused}");

        let (first, second) = (create("first", None), create("second", None));
        let (a, b) = tokio::join!(client.create(&first), client.create(&second));
        assert_eq!(a.expect("the first create pulls and boots").image_digest, app.config);
        assert_eq!(b.expect("the second create waits for that pull").image_digest, app.config);

        let events: Vec<moat_api::Event> =
            client.events(0, false).await.expect("events").map(|e| e.expect("an event")).collect().await;
        let said: Vec<&str> = events.iter().filter(|e| e.kind == "image").map(|e| e.message.as_str()).collect();
        let pulls = said.iter().filter(|m| **m == format!("{app_ref}: not in the store; pulling it")).count();
        assert_eq!(pulls, 1, "one pull for two creates: {said:?}");
        assert!(said.contains(&format!("{app_ref}: ready ({})", app.config).as_str()), "{said:?}");
    });
    assert!(image_names(h).contains(&app_ref));
}
