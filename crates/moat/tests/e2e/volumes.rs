//! Named volumes through the real daemon: `moat volume create|ls|inspect|rm` and
//! `/v1/volumes`, the ext4 file each one is, what a bad request is told, and volumes outliving
//! the daemon, `moat gc` and `moat prune`. Then volumes attached to sandboxes (`moat run -v`).

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{daemon_pid, moat_in, moat_ok, stop_daemon, text, wait_for, OwnHome};
use moat_api::{ErrorCode, VolumeInfo};
use moat_client::Client;

const MIB: u64 = 1 << 20;

fn moat_out(h: &Path, args: &[&str]) -> Output {
    moat_in(h).args(args).stdin(Stdio::null()).output().expect("moat runs")
}

/// `moat args` fails with `code`, saying `says` and giving a hint; its stderr.
fn moat_fails(h: &Path, args: &[&str], code: i32, says: &str) -> String {
    let out = moat_out(h, args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "moat {args:?}: {err}");
    assert!(err.contains(says), "moat {args:?} should say {says:?}: {err}");
    err
}

fn inspect(h: &Path, volume: &str) -> VolumeInfo {
    serde_json::from_str(&moat_ok(h, &["volume", "inspect", volume, "--json"])).expect("inspect --json is a volume")
}

fn ls(h: &Path) -> Vec<VolumeInfo> {
    serde_json::from_str(&moat_ok(h, &["volume", "ls", "--json"])).expect("ls --json is a list of volumes")
}

fn file_of(h: &Path, v: &VolumeInfo) -> PathBuf {
    h.join("volumes").join(format!("{}.img", v.id))
}

/// `e2fsck -fn` finds nothing to fix.
fn assert_clean_ext4(file: &Path) {
    let fsck = std::process::Command::new("e2fsck").arg("-fn").arg(file).output().expect("e2fsck runs");
    assert!(fsck.status.success(), "e2fsck -fn {}: {}{}", file.display(), text(&fsck.stdout), text(&fsck.stderr));
}

// The volume resource itself

#[test]
fn a_volume_is_created_listed_inspected_and_removed() {
    let home = OwnHome::new();
    let h = home.path();
    assert_eq!(moat_ok(h, &["volume", "create", "data", "--size", "64M"]), "data\n");

    let v = inspect(h, "data");
    assert_eq!((v.name.as_str(), v.size_bytes), ("data", 64 * MIB));
    let used = v.used_bytes.expect("a fresh ext4 reads");
    assert!(used > 0 && used < 16 * MIB, "metadata and journal only: {used}");
    assert!(v.allocated_bytes > 0 && v.allocated_bytes < 32 * MIB, "the file is sparse: {}", v.allocated_bytes);
    assert!(v.users.is_empty(), "{:?}", v.users);
    let file = file_of(h, &v);
    let meta = std::fs::metadata(&file).expect("the volume is a file under the home");
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (64 * MIB, 0o600));
    assert_clean_ext4(&file);
    assert_eq!(inspect(h, &v.id[..5]).id, v.id, "a unique id prefix works");

    let human = moat_ok(h, &["volume", "inspect", "data"]);
    for line in ["name:        data\n", "size:        64.0M (67108864 bytes)\n", "users:       none\n"] {
        assert!(human.contains(line), "{line:?} in:\n{human}");
    }
    assert!(human.contains("allocated:   ") && human.contains("used:        "), "{human}");

    // Without --size: 10 GiB, of which the host holds only what the file system wrote.
    moat_ok(h, &["volume", "create", "big"]);
    let big = inspect(h, "big");
    assert_eq!(big.size_bytes, 10 << 30);
    assert!(big.allocated_bytes < 256 * MIB, "sparse: {}", big.allocated_bytes);
    assert_clean_ext4(&file_of(h, &big));

    let names: Vec<String> = ls(h).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["big", "data"]);
    let table = moat_ok(h, &["volume", "ls"]);
    assert!(table.starts_with("ID ") && table.contains("data") && table.contains("64.0M"), "{table}");
    assert!(table.contains("10.0G"), "{table}");

    assert_eq!(moat_ok(h, &["volume", "rm", "data", "big"]), "data\nbig\n");
    assert!(ls(h).is_empty());
    assert!(!file.exists() && !file_of(h, &big).exists(), "the files go with them");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rest_api_creates_inspects_and_removes_volumes() {
    let home = OwnHome::new();
    let h = home.path().to_path_buf();
    let hh = h.clone();
    tokio::task::spawn_blocking(move || moat_ok(&hh, &["volume", "ls"])).await.unwrap();
    let c = Client::new(&moat_daemon::socket_path(&h));

    let (status, body) =
        c.raw("POST", "/v1/volumes", br#"{"name": "api", "size_bytes": 16777216}"#.to_vec()).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let made: VolumeInfo = serde_json::from_str(&body).unwrap();
    assert_eq!((made.name.as_str(), made.size_bytes), ("api", 16 * MIB));
    assert_clean_ext4(&file_of(&h, &made));
    assert_eq!(c.volume("api").await.unwrap(), made);
    assert_eq!(c.volume(&made.id).await.unwrap(), made);
    assert_eq!(c.volumes().await.unwrap(), std::slice::from_ref(&made));

    let req = moat_api::CreateVolume { name: "client".into(), size_bytes: Some(20 * MIB + 1) };
    let rounded = c.create_volume(&req).await.unwrap();
    assert_eq!(rounded.size_bytes, 20 * MIB + 4096, "rounded up to 4 KiB");
    let e = c.create_volume(&req).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NameTaken), "{e}");

    for (method, path, body, status) in [
        ("POST", "/v1/volumes", r#"{"name": "x1", "size": 1}"#, 400),
        ("POST", "/v1/volumes", r#"{"size_bytes": 16777216}"#, 400),
        ("POST", "/v1/volumes", r#"{"name": "x1", "size_bytes": 16777215}"#, 400),
        ("GET", "/v1/volumes/nothing", "", 404),
        ("DELETE", "/v1/volumes/nothing", "", 404),
        ("DELETE", "/v1/volumes/api?forse=true", "", 400),
    ] {
        let (got, answer) = c.raw(method, path, body.as_bytes().to_vec()).await.unwrap();
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        let e: moat_api::ApiError = serde_json::from_str(&answer).expect("errors are ApiErrors");
        assert!(!e.hint.is_empty(), "{method} {path}: {answer}");
    }

    let (status, body) = c.raw("DELETE", "/v1/volumes/api?force=true", Vec::new()).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<VolumeInfo>(&body).unwrap().id, made.id);
    assert_eq!(c.remove_volume("client", false).await.unwrap().name, "client");
    assert!(c.volumes().await.unwrap().is_empty());
    assert_eq!(c.volume("api").await.unwrap_err().code(), Some(ErrorCode::NotFound));
}

#[test]
fn bad_volume_requests_say_what_to_do() {
    let home = OwnHome::new();
    let h = home.path();
    for name in ["bad name", "deadbeef", ".x", "a/b"] {
        let err = moat_fails(h, &["volume", "create", name, "--size", "16M"], 125, "volume name");
        assert!(err.contains("hint: "), "{err}");
    }
    for size in ["0", "1K", "16777215", "100T"] {
        let err = moat_fails(h, &["volume", "create", "sized", "--size", size], 125, "is out of range");
        assert!(err.contains("hint: give a size from 16 MiB to 16 TiB"), "{size}: {err}");
    }
    moat_fails(h, &["volume", "create", "sized", "--size", "10X"], 2, "unknown unit");
    assert!(ls(h).is_empty(), "nothing was made");
    assert_eq!(std::fs::read_dir(h.join("volumes")).map(|d| d.count()).unwrap_or(0), 0, "no file either");

    moat_ok(h, &["volume", "create", "taken", "--size", "16M"]);
    let err = moat_fails(h, &["volume", "create", "taken", "--size", "32M"], 125, "already exists");
    assert!(err.contains("hint: ") && err.contains("moat volume rm taken"), "{err}");
    assert_eq!(inspect(h, "taken").size_bytes, 16 * MIB, "the first is untouched");

    let err = moat_fails(h, &["volume", "rm", "taken", "ghost"], 1, "ghost: no volume \"ghost\"");
    assert!(err.contains("hint: list volumes with `moat volume ls`"), "{err}");
    assert!(ls(h).is_empty(), "the volumes that exist are removed all the same");
    moat_fails(h, &["volume", "inspect", "ghost"], 125, "no volume \"ghost\"");
    moat_fails(h, &["volume", "rm"], 2, "required");
}

#[test]
fn volumes_outlive_the_daemon_gc_and_prune() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["volume", "create", "keep", "--size", "32M"]);
    let before = inspect(h, "keep");
    let file = file_of(h, &before);
    // What a crash left just now: gc leaves a young file alone, since a create may be making it.
    let young = h.join("volumes").join("0123456789ab.img");
    std::fs::write(&young, b"being made").unwrap();

    stop_daemon(h);
    assert_eq!(inspect(h, "keep"), before, "a new daemon has it as it was");

    // Killed, as a crash would.
    let pid = daemon_pid(h).expect("the CLI started a daemon");
    // SAFETY: SIGKILL to the daemon of this test's own home.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("the killed daemon to be gone", Duration::from_secs(20), || daemon_pid(h).is_none());
    assert_eq!(ls(h), std::slice::from_ref(&before));

    moat_ok(h, &["gc"]);
    moat_ok(h, &["prune"]);
    assert_eq!(ls(h), [before]);
    assert!(young.exists(), "gc does not judge a young file");
    assert_clean_ext4(&file);
}
