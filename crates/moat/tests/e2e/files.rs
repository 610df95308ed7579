//! Files in a running sandbox, through the real daemon and agent: `moat cp` both ways with a tree
//! of symlinks, empty directories, modes and a 200 MB file checked by hash, an exec answering
//! while a copy runs, bounded memory on both sides, the file API with its errors, and watch events.

use crate::common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{moat_in, moat_ok, text, OwnHome};
use futures::StreamExt;
use moat_api::{ChangeMode, ErrorCode, FileKind, MakeDir, RemovePath, RenamePath};
use moat_client::Client;
use sha2::{Digest, Sha256};

fn sha_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("readable");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("readable");
    hex::encode(h.finalize())
}

/// Peak resident memory of a process in KiB (VmHWM).
fn peak_kib(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A tree with what a copy must keep: modes, relative and absolute symlinks, an empty
/// directory, and a 200 MB file of incompressible bytes.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/empty")).unwrap();
    std::fs::create_dir_all(root.join("small")).unwrap();
    std::fs::write(root.join("small/one"), b"1").unwrap();
    std::fs::write(root.join("small/two"), b"2").unwrap();
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::fs::write(root.join("sub/secret"), b"s").unwrap();
    std::fs::set_permissions(root.join("sub/secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("run.sh", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("sub/outside")).unwrap();
    let mut f = std::fs::File::create(root.join("sub/big.bin")).unwrap();
    let mut state = 0x1234_5678_u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..200 {
        for b in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
}

#[test]
fn cp_round_trips_a_tree_with_a_big_file_while_execs_keep_answering() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["run", "-d", "--name", "files", "--memory", "256"]);
    moat_ok(h, &["exec", "files", "--", "mkdir", "/srv"]);
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("tree");
    make_tree(&src);
    let daemon = common::daemon_pid(h).expect("the daemon runs");
    let daemon_peak_before = peak_kib(&std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap());

    // Into the sandbox, with execs timed while the copy runs.
    let started = Instant::now();
    let mut copy = moat_in(h)
        .args(["cp", src.to_str().unwrap(), "files:/srv"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat cp starts");
    let mut exec_times = Vec::new();
    while copy.try_wait().expect("wait").is_none() {
        let t = Instant::now();
        assert_eq!(moat_ok(h, &["exec", "files", "--", "echo", "alive"]), "alive\n");
        exec_times.push(t.elapsed());
    }
    let copy = copy.wait_with_output().expect("moat cp ends");
    assert_eq!(copy.status.code(), Some(0), "{}", text(&copy.stderr));
    let copy_time = started.elapsed();
    assert!(!exec_times.is_empty(), "the copy took {copy_time:?}; no exec ran during it");
    let slowest = exec_times.iter().max().unwrap();
    assert!(*slowest < Duration::from_secs(10), "an exec took {slowest:?} during the copy: {exec_times:?}");

    // The big file's bytes are checked by hash after the round trip (hashing 200 MB inside the
    // emulated guest would take longer than the copy); here its size.
    let script =
        "cd /srv/tree && stat -c '%n %a %F' run.sh sub/secret sub/empty link && readlink link && readlink sub/outside \
                  && stat -c %s sub/big.bin && grep VmHWM /proc/1/status";
    let listing = moat_ok(h, &["exec", "files", "--", "sh", "-c", script]);
    let big_sha = sha_file(&src.join("sub/big.bin"));
    for want in [
        "run.sh 751 regular file",
        "sub/secret 600 regular file",
        "sub/empty 755 directory",
        "link 777 symbolic link",
        "run.sh\n/etc/hostname\n",
        "\n209715200\n",
    ] {
        assert!(listing.contains(want), "{want:?} in {listing}");
    }
    // The agent (PID 1) streamed 200 MB holding a window, not the file.
    let agent_peak = peak_kib(&listing);
    assert!(agent_peak < 32 << 10, "the guest agent peaked at {agent_peak} KiB");

    // And back out, next to the original: the same tree.
    let back = work.path().join("back");
    std::fs::create_dir(&back).unwrap();
    moat_ok(h, &["cp", "files:/srv/tree", back.to_str().unwrap()]);
    let copied = back.join("tree");
    assert_eq!(sha_file(&copied.join("sub/big.bin")), big_sha);
    let mode = |p: &str| std::fs::symlink_metadata(copied.join(p)).unwrap().mode() & 0o7777;
    assert_eq!((mode("run.sh"), mode("sub/secret")), (0o751, 0o600));
    assert!(copied.join("sub/empty").is_dir());
    assert_eq!(std::fs::read_link(copied.join("link")).unwrap(), Path::new("run.sh"));
    assert_eq!(std::fs::read_link(copied.join("sub/outside")).unwrap(), Path::new("/etc/hostname"));
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().mtime();
    assert_eq!(mtime(&copied.join("run.sh")), mtime(&src.join("run.sh")), "mtimes are kept");
    let daemon_peak = peak_kib(&std::fs::read_to_string(format!("/proc/{daemon}/status")).unwrap());
    assert!(
        daemon_peak < daemon_peak_before + (64 << 10),
        "the daemon grew from {daemon_peak_before} to {daemon_peak} KiB copying 400 MB"
    );

    // docker cp rules: a file onto a new name, `DIR/.` for contents, a file into a directory.
    moat_ok(h, &["cp", src.join("run.sh").to_str().unwrap(), "files:/srv/renamed.sh"]);
    moat_ok(h, &["cp", &format!("{}/.", src.join("small").display()), "files:/srv/contents"]);
    let out = moat_ok(h, &["exec", "files", "--", "sh", "-c", "ls /srv/renamed.sh /srv/contents"]);
    assert!(out.contains("/srv/renamed.sh") && out.contains("one") && out.contains("two"), "{out}");
    let out = moat_in(h).args(["cp", "files:/no/such", work.path().to_str().unwrap()]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("/no/such does not exist"), "{}", text(&out.stderr));
    let out = moat_in(h).args(["cp", src.to_str().unwrap(), "files:/srv/renamed.sh"]).output().unwrap();
    assert!(text(&out.stderr).contains("cannot copy the directory"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_file_api_reads_writes_lists_and_watches() {
    let home = OwnHome::new();
    let h = home.path().to_path_buf();
    let hh = h.clone();
    tokio::task::spawn_blocking(move || moat_ok(&hh, &["run", "-d", "--name", "api", "--memory", "256"]))
        .await
        .unwrap();
    let c = Client::new(&moat_daemon::socket_path(&h));
    let code = |r: Result<(), moat_client::ClientError>| r.expect_err("refused").code();

    c.mkdir("api", &MakeDir { path: "/work/a/b".into(), parents: true, mode: None, owner: None }).await.unwrap();
    let info = c.write_file("api", "/work/a/f.txt", Some(0o640), true, &b"first"[..]).await.unwrap();
    assert_eq!((info.kind, info.size, info.mode), (FileKind::File, 5, 0o640));
    // An atomic rewrite keeps the mode and leaves no temporary file beside it.
    c.write_file("api", "/work/a/f.txt", None, true, &b"second version"[..]).await.unwrap();
    let read = c.read_file("api", "/work/a/f.txt").await.unwrap();
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut read.into_async_read(), &mut bytes).await.unwrap();
    assert_eq!(bytes, b"second version");
    c.rename("api", &RenamePath { from: "/work/a/f.txt".into(), to: "/work/a/g.txt".into() }).await.unwrap();
    c.chmod("api", &ChangeMode { path: "/work/a/g.txt".into(), mode: 0o600 }).await.unwrap();
    let listing = c.list_dir("api", "/work", true).await.unwrap();
    let seen: Vec<(String, u32)> = listing.entries.iter().map(|e| (e.path.clone(), e.mode)).collect();
    assert_eq!(seen, [("/work/a".into(), 0o755), ("/work/a/b".into(), 0o755), ("/work/a/g.txt".into(), 0o600)]);

    // Errors name the path and what is wrong with it.
    let e = c.stat("api", "/work/missing").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert!(e.to_string().contains("/work/missing does not exist"), "{e}");
    let e = c.read_file("api", "/work/a").await.err().expect("a directory is not a file");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let e = c.write_file("api", "/work/a", None, true, &b"x"[..]).await.unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    let e =
        c.mkdir("api", &MakeDir { path: "/work/a/g.txt/sub".into(), parents: false, mode: None, owner: None }).await;
    assert!(e.unwrap_err().to_string().contains("not a directory"));
    assert_eq!(
        code(c.remove_path("api", &RemovePath { path: "/work".into(), recursive: false }).await),
        Some(ErrorCode::InvalidRequest)
    );
    for bad in ["relative/path", "/nul\0byte", &format!("/{}", "x".repeat(5000))] {
        assert_eq!(c.stat("api", bad).await.unwrap_err().code(), Some(ErrorCode::InvalidRequest), "{bad:?}");
    }
    let e = c.write_file("api", "/proc/version", None, false, &b"x"[..]).await.unwrap_err();
    assert!(matches!(e.code(), Some(ErrorCode::PermissionDenied | ErrorCode::InvalidRequest)), "{e}");

    // Watch: create, modify and delete under a directory arrive as events, in order.
    let mut events = c.watch("api", "/work/a", false).await.unwrap();
    c.write_file("api", "/work/a/new.txt", None, false, &b"1"[..]).await.unwrap();
    c.remove_path("api", &RemovePath { path: "/work/a/new.txt".into(), recursive: false }).await.unwrap();
    let mut kinds = Vec::new();
    while !kinds.contains(&"delete".to_string()) {
        let e = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event in time")
            .expect("the watch goes on")
            .expect("a well-formed event");
        if e.path == "/work/a/new.txt" {
            kinds.push(e.event);
        }
    }
    assert_eq!(kinds.first().map(String::as_str), Some("create"), "{kinds:?}");
    assert!(kinds.contains(&"modify".to_string()), "{kinds:?}");
    drop(events);
    c.remove_path("api", &RemovePath { path: "/work".into(), recursive: true }).await.unwrap();
    assert_eq!(c.stat("api", "/work").await.unwrap_err().code(), Some(ErrorCode::NotFound));
}
