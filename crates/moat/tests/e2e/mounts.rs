//! Volumes and host directories mounted in real sandboxes, through the CLI and the daemon: data
//! that outlives sandboxes and is never rolled back by a revert, one read-write user at a time,
//! forks that copy, and host directories the guest cannot leave or write when read-only.

use crate::common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Duration;

use common::{moat_in, moat_ok, text, wait_for, OwnHome};

/// Run `moat args`; it must fail. Its stderr.
fn moat_fails(h: &Path, args: &[&str]) -> String {
    let out = moat_in(h).args(args).stdin(Stdio::null()).output().expect("moat runs");
    assert_ne!(out.status.code(), Some(0), "moat {args:?} should fail; it printed {}", text(&out.stdout));
    text(&out.stderr)
}

/// A shell command in sandbox `sb`: its stdout, or its stderr when it fails.
fn sh(h: &Path, sb: &str, script: &str) -> Result<String, String> {
    let out = moat_in(h).args(["exec", sb, "--", "sh", "-c", script]).stdin(Stdio::null()).output().expect("moat runs");
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
    }
}

/// The image file of volume `name`.
fn volume_file(h: &Path, name: &str) -> PathBuf {
    let info: serde_json::Value =
        serde_json::from_str(&moat_ok(h, &["volume", "inspect", name, "--json"])).expect("inspect --json is JSON");
    let id = info["id"].as_str().expect("a volume has an id");
    let file = h.join("volumes").join(format!("{id}.img"));
    assert!(file.exists(), "{} is where volume {name} lives", file.display());
    file
}

/// `e2fsck -fn` finds nothing to fix.
fn assert_fs_clean(file: &Path) {
    let out = Command::new("e2fsck").args(["-fn"]).arg(file).output().expect("e2fsck runs (apt-get install e2fsprogs)");
    assert_eq!(out.status.code(), Some(0), "e2fsck -fn {}: {}{}", file.display(), text(&out.stdout), text(&out.stderr));
}

#[test]
fn a_volume_outlives_its_sandboxes_and_a_revert_never_rolls_it_back() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["volume", "create", "work", "--size", "64M"]);
    moat_ok(h, &["run", "-d", "--name", "box", "--memory", "256", "-v", "work:/work"]);
    // A fresh volume's root belongs to the image's user (root in the minimal image).
    sh(h, "box", "echo one > /work/f").unwrap();

    // write, snapshot, write more, revert: the later data is there, the disk checks clean.
    moat_ok(h, &["snapshot", "box", "--name", "s1"]);
    assert_eq!(sh(h, "box", "cat /work/f").unwrap(), "one\n", "the volume is back after the snapshot");
    sh(h, "box", "echo two >> /work/f; echo root-disk > /root-file").unwrap();
    moat_ok(h, &["revert", "box", "s1"]);
    assert!(sh(h, "box", "cat /root-file").is_err(), "the root disk is rolled back");
    assert_eq!(sh(h, "box", "cat /work/f").unwrap(), "one\ntwo\n", "the volume is not");
    sh(h, "box", "echo three >> /work/f").unwrap();

    // A fork needs its own copy of a read-write volume.
    let e = moat_fails(h, &["fork", "box"]);
    assert!(e.contains("read-write") && e.contains("--volumes copy"), "{e}");
    moat_ok(h, &["fork", "box", "--volumes", "copy", "--name-prefix", "fork"]);
    assert_eq!(sh(h, "fork1", "cat /work/f").unwrap(), "one\ntwo\nthree\n");
    sh(h, "fork1", "echo fork >> /work/f").unwrap();
    assert_eq!(sh(h, "box", "cat /work/f").unwrap(), "one\ntwo\nthree\n", "the fork wrote its own copy");
    let info = moat_ok(h, &["volume", "inspect", "fork1-work"]);
    assert!(info.contains("fork1"), "{info}");

    // One running sandbox has it read-write; nobody else gets it meanwhile, not even read-only.
    let e = moat_fails(h, &["run", "-d", "--name", "other", "--memory", "256", "-v", "work:/w"]);
    assert!(e.contains("volume work") && e.contains("running sandbox box"), "{e}");
    let e = moat_fails(h, &["run", "-d", "--name", "other", "--memory", "256", "-v", "work:/w:ro"]);
    assert!(e.contains("read-write"), "{e}");
    let inspect = moat_ok(h, &["volume", "inspect", "work"]);
    assert!(inspect.contains("box") && inspect.contains("/work"), "{inspect}");

    // Removing every sandbox keeps the data, cleanly unmounted.
    moat_ok(h, &["rm", "-f", "box", "fork1"]);
    assert_fs_clean(&volume_file(h, "work"));
    assert!(moat_ok(h, &["volume", "ls"]).contains("work"));
    moat_ok(h, &["gc"]);

    // Read-only in several sandboxes at once; writes fail.
    for sb in ["reader1", "reader2"] {
        moat_ok(h, &["run", "-d", "--name", sb, "--memory", "256", "-v", "work:/data:ro"]);
        assert_eq!(sh(h, sb, "cat /data/f").unwrap(), "one\ntwo\nthree\n");
    }
    assert!(sh(h, "reader1", "echo x > /data/g").is_err(), "a read-only volume takes no writes");
    let e = moat_fails(h, &["volume", "rm", "work"]);
    assert!(e.contains("reader1") || e.contains("in use"), "{e}");
    moat_ok(h, &["rm", "-f", "reader1", "reader2"]);
    moat_ok(h, &["volume", "rm", "work", "fork1-work"]);
    assert!(!moat_ok(h, &["volume", "ls"]).contains("work"));
}

#[test]
fn a_busy_volume_refuses_the_snapshot_and_names_who_holds_it() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["volume", "create", "busy", "--size", "32M"]);
    moat_ok(h, &["run", "-d", "--name", "holder", "--memory", "256", "-v", "busy:/busy"]);
    moat_ok(h, &["exec", "-d", "holder", "--", "sh", "-c", "cd /busy && touch ready && exec sleep 600"]);
    wait_for("the process to settle in /busy", Duration::from_secs(30), || {
        sh(h, "holder", "test -f /busy/ready").is_ok()
    });
    let e = moat_fails(h, &["snapshot", "holder"]);
    assert!(e.contains("/busy") && e.contains("sleep"), "{e}");
    // The sandbox runs on with its volume.
    sh(h, "holder", "echo still > /busy/x && cat /busy/x").unwrap();
    sh(h, "holder", "pkill sleep || killall sleep").unwrap();
    moat_ok(h, &["snapshot", "holder"]);
    assert_eq!(sh(h, "holder", "cat /busy/x").unwrap(), "still\n");

    // A restarted daemon finds the volume plugged in, and unplugs it for the next snapshot.
    common::stop_daemon(h);
    let limit = Duration::from_secs(60);
    common::moat_ok_through_adoption(h, &["exec", "holder", "--", "sh", "-c", "echo again >> /busy/x"], limit);
    moat_ok(h, &["snapshot", "holder"]);
    assert_eq!(sh(h, "holder", "cat /busy/x").unwrap(), "still\nagain\n");
}

/// A host directory owned by `nobody`, with an outside file only root may read hard-linked in,
/// a symlink out, and a fifo.
fn host_dir(root: &Path) -> PathBuf {
    let dir = root.join("src");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("hello.txt"), "from the host\n").unwrap();
    let secret = root.join("secret");
    std::fs::write(&secret, "host secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(&secret, dir.join("hardlink")).unwrap();
    symlink(&secret, dir.join("symlink")).unwrap();
    symlink("../secret", dir.join("relative")).unwrap();
    let fifo = std::ffi::CString::new(dir.join("fifo").to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    for path in [&dir, &dir.join("hello.txt"), &dir.join("fifo")] {
        std::os::unix::fs::lchown(path, Some(65534), Some(65534)).unwrap();
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn a_host_directory_is_live_both_ways_and_the_guest_cannot_leave_it() {
    let home = OwnHome::new();
    let h = home.path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = host_dir(tmp.path());
    let rw = format!("{}:/src", dir.display());
    let ro = format!("{}:/ro:ro", dir.display());
    moat_ok(h, &["run", "-d", "--name", "mnt", "--memory", "256", "-v", &rw, "-v", &ro]);

    // busybox cat splices the file into its stdout pipe while the agent reads that pipe, and a
    // program and working directory in the mount are used while the agent spawns: none of it
    // may stall the agent that forwards the mount's calls.
    assert_eq!(sh(h, "mnt", "cat /src/hello.txt").unwrap(), "from the host\n");
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho ran in $(pwd)\n").unwrap();
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ran = moat_ok(h, &["exec", "-w", "/src", "mnt", "--", "/src/run.sh"]);
    assert_eq!(ran, "ran in /src\n");
    let out = moat_in(h)
        .args(["exec", "-i", "mnt", "--", "sh", "-c", "cat > /src/piped.txt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("piped").write_all(&vec![b'x'; 1 << 20])?;
            child.wait_with_output()
        })
        .expect("moat exec -i runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(dir.join("piped.txt")).unwrap().len(), 1 << 20);
    sh(h, "mnt", "echo from the guest > /src/new.txt && mkdir -p /src/d/e && echo deep > /src/d/e/f").unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("new.txt")).unwrap(), "from the guest\n");
    assert_eq!(std::fs::read_to_string(dir.join("d/e/f")).unwrap(), "deep\n");
    std::fs::write(dir.join("later.txt"), "written on the host\n").unwrap();
    assert_eq!(sh(h, "mnt", "cat /src/later.txt").unwrap(), "written on the host\n");
    sh(h, "mnt", "mv /src/d /src/moved && test -f /src/moved/e/f && rm -r /src/moved").unwrap();
    assert!(!dir.join("d").exists() && !dir.join("moved").exists());
    // What the directory's owner owns is the image's user's in the guest (root in minimal).
    let owner = sh(h, "mnt", "stat -c %u /src/hello.txt").unwrap();
    assert_eq!(owner.trim(), "0", "{owner}");
    // Files the guest makes belong to the directory's owner on the host.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(dir.join("new.txt")).unwrap().uid(), 65534);

    // Nothing outside: symlinks resolve in the guest, a hard link keeps the owner's rights, a
    // fifo is never opened on the host, `..` stops at the guest's root.
    let guest_secret = sh(h, "mnt", "cat /src/symlink /src/relative 2>&1; cat /src/../secret 2>&1; true").unwrap();
    assert!(!guest_secret.contains("host secret"), "{guest_secret}");
    let e = sh(h, "mnt", "cat /src/hardlink").unwrap_err();
    assert!(!e.contains("host secret") && e.contains("denied"), "{e}");
    let e = sh(h, "mnt", "timeout 5 cat /src/fifo || echo refused").unwrap();
    assert!(e.contains("refused"), "{e}");
    assert!(sh(h, "mnt", "mknod /src/dev c 1 3").is_err(), "no device files");
    assert!(!dir.join("dev").exists());

    // Read-only is the host's doing: even remounted read-write in the guest, writes fail.
    assert!(sh(h, "mnt", "echo x > /ro/x").is_err());
    let _ = sh(h, "mnt", "mount -o remount,rw /ro");
    assert!(sh(h, "mnt", "echo x > /ro/x; rm /ro/hello.txt").is_err());
    assert!(!dir.join("x").exists() && dir.join("hello.txt").exists());

    // A snapshot keeps the mount; a revert sees the host's files as they are now.
    moat_ok(h, &["snapshot", "mnt", "--name", "s"]);
    std::fs::write(dir.join("after.txt"), "after the snapshot\n").unwrap();
    std::fs::write(dir.join("hello.txt"), "changed\n").unwrap();
    moat_ok(h, &["revert", "mnt", "s"]);
    assert_eq!(sh(h, "mnt", "cat /src/after.txt /src/hello.txt").unwrap(), "after the snapshot\nchanged\n");

    // A restarted daemon serves the directory again to the VM it adopts.
    common::stop_daemon(h);
    let limit = Duration::from_secs(60);
    let seen = common::moat_ok_through_adoption(h, &["exec", "mnt", "--", "cat", "/src/after.txt"], limit);
    assert_eq!(seen, "after the snapshot\n");
    moat_ok(h, &["rm", "-f", "mnt"]);
    assert_eq!(std::fs::read_to_string(dir.join("hello.txt")).unwrap(), "changed\n", "the directory stays");
}

#[test]
fn bad_mounts_are_refused_before_anything_boots() {
    let home = OwnHome::new();
    let h = home.path();
    for (spec, needle) in [
        ("nosuch:/x", "nosuch"),
        ("work", "SOURCE:TARGET"),
        ("/nonexistent-dir-for-moat:/x", "nonexistent"),
        ("/etc/passwd:/x", "not a directory"),
        ("./:/", "cannot be `/`"),
        ("./:/proc/x", "/proc"),
        ("./:rel", "absolute"),
    ] {
        let e = moat_fails(h, &["run", "--memory", "256", "-v", spec, "--", "true"]);
        assert!(e.contains(needle), "-v {spec}: {e}");
        // Each says what to do: the daemon's errors with a hint, the CLI's with an example.
        assert!(e.contains("hint:") || e.contains("e.g.") || e.contains("such as"), "-v {spec}: {e}");
    }
    let e = moat_fails(h, &["run", "--memory", "256", "-v", "./:/a", "-v", "./:/a/b", "--", "true"]);
    assert!(e.contains("overlap"), "{e}");
    assert!(moat_ok(h, &["ps", "-a", "--json"]).trim() == "[]", "nothing was made");
}
