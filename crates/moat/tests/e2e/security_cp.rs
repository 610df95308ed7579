//! `moat cp` out of a sandbox against a hostile guest: whatever the guest does, the copy writes
//! nothing on the host but the name asked for and what is under it, and no setuid, setgid or
//! world-writable modes; directories already on the host keep theirs.

use crate::common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{moat_in, moat_ok, text, wait_for, OwnHome};

/// Size of the file the guest grows while it is copied: page-aligned, so every 2048-byte append
/// (one `write`, never crossing a page) leaves the size the agent stats at a stream boundary.
const FILE_MIB: u64 = 16;

/// A whole tar stream of exactly 2048 bytes (header, data block, end marker) holding `pwned`:
/// what lands on the host if the copy carries bytes past the file's size.
fn pwned_archive() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(7);
    header.set_mode(0o755);
    tar.append_data(&mut header, "pwned", &b"pwned!\n"[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    assert_eq!(tar.len(), 2048);
    tar
}

/// A `moat exec` left running, killed when the test ends however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The size of a guest file; 0 while it does not exist.
fn guest_size(h: &Path, path: &str) -> u64 {
    let script = format!("stat -c %s {path} 2>/dev/null || echo 0");
    moat_ok(h, &["exec", "cpx", "--", "sh", "-c", &script]).trim().parse().expect("a size")
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn guest_sets_setuid_bits_and_grows_a_file_while_it_is_copied_out() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["run", "-d", "--name", "cpx", "--memory", "256"]);
    let work = tempfile::tempdir().expect("tempdir");

    // Guest root hands out a setuid tool and world-writable files; the host already has a
    // private directory of the same name, which must keep its mode.
    let script = "mkdir -p /srv/out/open && echo x > /srv/out/tool && echo y > /srv/out/open/f \
                  && chmod 4755 /srv/out/tool && chmod 0777 /srv/out/open && chmod 0666 /srv/out/open/f \
                  && chmod 2777 /srv/out";
    moat_ok(h, &["exec", "cpx", "--", "sh", "-c", script]);
    let dest = work.path().join("modes");
    std::fs::create_dir_all(dest.join("out")).unwrap();
    std::fs::set_permissions(dest.join("out"), std::fs::Permissions::from_mode(0o700)).unwrap();
    moat_ok(h, &["cp", "cpx:/srv/out", dest.to_str().unwrap()]);
    let mode = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("out"), 0o700, "a directory that was on the host keeps its mode");
    assert_eq!((mode("out/tool"), mode("out/open"), mode("out/open/f")), (0o755, 0o755, 0o644));
    assert_eq!(std::fs::read(dest.join("out/open/f")).unwrap(), b"y\n");
    // `SRC/.`: the contents land in the destination, which keeps its own mode.
    let contents = work.path().join("contents");
    std::fs::create_dir(&contents).unwrap();
    std::fs::set_permissions(&contents, std::fs::Permissions::from_mode(0o700)).unwrap();
    moat_ok(h, &["cp", "cpx:/srv/out/.", contents.to_str().unwrap()]);
    assert_eq!(names_in(&contents), ["open", "tool"]);
    assert_eq!(std::fs::metadata(&contents).unwrap().mode() & 0o7777, 0o700);

    // An unprivileged guest process appends whole tar streams to a file while it is copied.
    let payload = work.path().join("payload.tar");
    std::fs::write(&payload, pwned_archive()).unwrap();
    moat_ok(h, &["cp", payload.to_str().unwrap(), "cpx:/var/tmp/payload.tar"]);
    let grow = format!(
        "dd if=/dev/zero of=/var/tmp/out.bin bs=1M count={FILE_MIB} 2>/dev/null \
         && while :; do cat /var/tmp/payload.tar >> /var/tmp/out.bin; usleep 5000; done"
    );
    let _attacker = Running(
        moat_in(h)
            .args(["exec", "--timeout", "120s", "-u", "nobody", "cpx", "--", "sh", "-c", &grow])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moat exec starts"),
    );
    let start = FILE_MIB << 20;
    wait_for("the guest to grow the file", Duration::from_secs(30), || {
        guest_size(h, "/var/tmp/out.bin") > start + 2048
    });
    let before = guest_size(h, "/var/tmp/out.bin");
    let dest = work.path().join("race");
    std::fs::create_dir(&dest).unwrap();
    let out = moat_in(h).args(["cp", "cpx:/var/tmp/out.bin", dest.to_str().unwrap()]).output().expect("moat cp runs");
    let after = guest_size(h, "/var/tmp/out.bin");
    assert_eq!(names_in(&dest), ["out.bin"], "moat cp: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "moat cp: {}", text(&out.stderr));
    assert!(after > before, "the file grew during the copy ({before} then {after} bytes)");
    let copied = std::fs::metadata(dest.join("out.bin")).unwrap().len();
    assert!(
        (before..=after).contains(&copied) && copied.is_multiple_of(2048),
        "copied {copied} bytes of a file of {before} to {after}"
    );
}
