//! Volumes on a real VM: an ext4 file on the host, plugged into a booted sandbox, mounted,
//! written, refused while busy, unmounted and unplugged, and clean on the host afterwards.
//!
//! Needs the moat binary beside the test (`cargo build --release -p moat`) for the jail, unless
//! MOAT_JAIL=off, and the agent (`scripts/build-agent`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use moat_proto::{ErrorCode, ExecRequest, Request};
use moat_sandbox::{LinkError, Runtime, RuntimeConfig, Sandbox, SandboxError, SandboxSpec, Shape};

fn home() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("volumes-home");
    std::fs::create_dir_all(&dir).expect("target dir is writable");
    dir
}

async fn runtime() -> Runtime {
    let mut config = RuntimeConfig::from_env().expect("MOAT_* variables are valid");
    config.home = home();
    Runtime::prepare(config).await.expect("the runtime prepares (see the module docs for what it needs)")
}

async fn boot(rt: &Runtime) -> Sandbox {
    let shape = Shape::new(1, 256, Shape::default().disk_mib()).expect("a small shape is valid");
    Sandbox::boot(rt, &SandboxSpec { shape, ..SandboxSpec::default() }).await.expect("sandbox boots")
}

/// Run a shell command in the sandbox as root: (exit code, stdout + stderr).
async fn sh(sb: &Sandbox, script: &str) -> (i32, String) {
    sh_as(sb, None, script).await
}

async fn sh_as(sb: &Sandbox, user: Option<&str>, script: &str) -> (i32, String) {
    let argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
    let req = ExecRequest { argv, user: user.map(Into::into), ..ExecRequest::default() };
    let (out, err, status) = sb.exec(req).await.expect("exec starts").collect().await.expect("exec ends");
    let text = format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    (status.code.unwrap_or(-1), text)
}

/// A sparse file with a fresh ext4 file system.
fn make_volume(path: &Path, mib: u64) {
    std::fs::File::create(path).unwrap().set_len(mib << 20).unwrap();
    let out = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path).output().expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
}

fn open_rw(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap()
}

/// The sandbox is destroyed when the test ends, passing or not.
struct Guard(Option<Sandbox>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(sb) = self.0.take() {
            // Dropping the Vm inside kills QEMU; the run directory goes here.
            let _ = std::fs::remove_dir_all(&sb.dir);
        }
    }
}

#[tokio::test]
async fn a_volume_is_plugged_mounted_written_held_busy_and_unplugged_clean() {
    let rt = runtime().await;
    let dir = tempfile::tempdir_in(home()).unwrap();
    let image = dir.path().join("vol.img");
    make_volume(&image, 256);
    let mut guard = Guard(Some(boot(&rt).await));
    let sb = guard.0.as_ref().unwrap();

    let started = Instant::now();
    sb.plug_volume(0, open_rw(&image), "/data", false, Some("nobody")).await.expect("plugs and mounts");
    let first_mount = started.elapsed();
    let e = sb.plug_volume(0, open_rw(&image), "/data", false, None).await.expect_err("slot 0 is taken");
    assert!(e.to_string().contains("volume slot 0 already holds a volume"), "{e}");
    let (_, serial) = sh(sb, "tail -c +5 /sys/block/sda/device/vpd_pg80").await;
    assert!(serial.starts_with("moat-vol-0-"), "the disk's serial names its slot: {serial:?}");
    let mount =
        |path: &str| Request::MountVolume { serial: serial.clone(), path: path.into(), readonly: false, owner: None };
    sb.request(mount("/data")).await.expect("mounting what is mounted there is fine");
    match sb.request(mount("/elsewhere")).await {
        Err(SandboxError::Link(LinkError::Agent(e))) => {
            assert!(e.code == ErrorCode::BadRequest && e.message.contains("already mounted at /data"), "{e:?}")
        }
        other => panic!("a second mount of the volume is refused: {other:?}"),
    }
    let (code, mounts) = sh(sb, "grep ' /data ' /proc/mounts; stat -c '%u:%g' /data").await;
    assert_eq!(code, 0, "{mounts}");
    assert!(mounts.contains(" /data ext4 rw"), "{mounts}");
    assert!(mounts.trim_end().ends_with("65534:65534"), "a fresh volume's root goes to its owner: {mounts}");
    let (code, out) = sh(sb, "echo hello > /data/hello").await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = sh_as(sb, Some("nobody"), "echo mine > /data/mine").await;
    assert_eq!(code, 0, "the owner writes to the volume's root: {out}");

    // Busy: a process with its working directory in the volume keeps it mounted and plugged.
    let holder = ExecRequest {
        argv: vec!["sleep".into(), "600".into()],
        cwd: Some("/data".into()),
        detach: true,
        ..ExecRequest::default()
    };
    let pid = sb.exec(holder).await.expect("a background process starts").pid();
    let busy = sb.unplug_volume(0, "/data").await.expect_err("a volume in use is not unmounted");
    match &busy {
        SandboxError::Link(LinkError::Agent(e)) => {
            assert_eq!(e.code, ErrorCode::Busy, "{e:?}");
            assert!(e.message.contains(&format!("{pid} (sleep)")), "the holder is named: {}", e.message);
            assert!(e.message.contains("Stop them"), "{}", e.message);
        }
        other => panic!("expected the agent's busy error, got {other}"),
    }
    let (code, out) = sh(sb, "cat /data/hello").await;
    assert_eq!((code, out.as_str()), (0, "hello\n"), "still mounted and plugged");
    sb.request(Request::Kill { pid, signal: 9 }).await.expect("the holder is killed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let started = Instant::now();
    loop {
        match sb.unplug_volume(0, "/data").await {
            Ok(()) => break,
            Err(SandboxError::Link(LinkError::Agent(e))) if e.code == ErrorCode::Busy && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("unplug failed: {e}"),
        }
    }
    let unplug = started.elapsed();
    let (_, mounts) = sh(sb, "cat /proc/mounts; ls /sys/block").await;
    assert!(!mounts.contains("/data"), "{mounts}");
    sb.unplug_volume(0, "/data").await.expect("unplugging what is gone is fine");

    // Read-only: the file opened read-only, the journal left alone, writes refused.
    let ro = std::fs::File::open(&image).unwrap();
    sb.plug_volume(3, ro, "/ro", true, Some("nobody")).await.expect("plugs read-only");
    let (code, out) = sh(sb, "cat /ro/hello /ro/mine; grep ' /ro ' /proc/mounts; echo x > /ro/new").await;
    assert_ne!(code, 0, "writing to a read-only volume fails: {out}");
    assert!(out.starts_with("hello\nmine\n") && out.contains(" /ro ext4 ro"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    sb.unplug_volume(3, "/ro").await.expect("unplugs");

    // A disk that is not ext4 fails to mount and is unplugged again.
    let junk = dir.path().join("junk.img");
    std::fs::File::create(&junk).unwrap().set_len(8 << 20).unwrap();
    let e = sb.plug_volume(1, open_rw(&junk), "/junk", false, None).await.expect_err("not ext4");
    assert!(e.to_string().contains("ext4"), "{e}");
    sb.plug_volume(1, open_rw(&image), "/data", false, None).await.expect("slot 1 is free again");
    sb.unplug_volume(1, "/data").await.unwrap();

    let (_, log) = sh(sb, "dmesg").await;
    assert!(!log.contains("EXT4-fs error") && !log.contains("I/O error"), "the guest saw no disk errors:\n{log}");
    let sb = guard.0.take().unwrap();
    sb.destroy().await.unwrap();
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&image).output().expect("e2fsck runs");
    assert!(
        fsck.status.success(),
        "the file system is clean: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let cat = Command::new("debugfs").args(["-R", "cat /hello"]).arg(&image).output().expect("debugfs runs");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "hello\n", "the guest's write reached the host file");
    eprintln!("first plug + mount {first_mount:?}, unmount + unplug {unplug:?}");
}
