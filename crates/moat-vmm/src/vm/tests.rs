//! Real QEMU processes: spawn, stop, adopt, save.

use super::*;
use crate::Accel;

/// The distribution's cloud kernel the real-VM tests boot.
pub(crate) fn host_kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    kernels.sort();
    kernels.pop().expect("a /boot/vmlinuz-*-cloud-amd64 kernel (apt-get install linux-image-cloud-amd64)")
}

/// Processes whose command line carries `needle` (QEMU's `-name ...process=moat-<name>`).
pub(crate) fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc is mounted")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

fn config(dir: &Path, name: &str, kernel: PathBuf, initrd: PathBuf) -> VmConfig {
    VmConfig {
        qemu: crate::find_qemu(None).expect("qemu-system-x86_64 installed (apt-get install qemu-system-x86)"),
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 256,
        initrd,
        kernel,
        cmdline: String::new(),
        root_disk: None,
        run_dir: dir.to_path_buf(),
        seccomp: true,
        name: format!("{name}-{}", std::process::id()),
        memory: None,
        incoming: false,
        nic: false,
        jail: None,
        cgroups: None,
    }
}

#[tokio::test]
async fn a_missing_kernel_is_reported_with_qemus_message_and_leaves_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "badkernel", "/nonexistent/vmlinuz".into(), "/nonexistent/initrd".into());
    let started = Instant::now();
    let err = Vm::spawn(&cfg, true).await.err().expect("QEMU cannot start without a kernel");
    let msg = err.to_string();
    assert!(matches!(err, VmmError::QemuExited { .. }), "{msg}");
    assert!(msg.starts_with("QEMU exited before the VM started") && msg.contains("/nonexistent/vmlinuz"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5), "reported fast: {:?}", started.elapsed());
    assert_eq!(processes_with(&format!("process=moat-{}", cfg.name)), Vec::<u32>::new(), "no QEMU left behind");
    assert!(!cfg.qmp_socket().exists() && !cfg.pid_file().exists());
}

#[tokio::test]
async fn long_socket_paths_are_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("x".repeat(120));
    let err = Vm::spawn(&config(&deep, "long", "/k".into(), "/i".into()), true).await.err().expect("fails");
    assert!(matches!(err, VmmError::PathTooLong(_)), "{err}");
    assert!(moat_hint::Hint::hint(&err).is_some_and(|h| h.contains("MOAT_HOME")), "{err}");
}

/// Without an initrd the kernel cannot mount a root and panics; `panic=-1` reboots at once and
/// `-no-reboot` turns that into QEMU exiting — the whole life of a VM in a few seconds.
#[tokio::test]
async fn a_kernel_without_initrd_boots_panics_and_qemu_exits() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let cfg = config(dir.path(), "panic", host_kernel(), empty);
    let started = Instant::now();
    let mut vm = Vm::spawn(&cfg, true).await.expect("QEMU starts");
    assert!(cfg.pid_file().exists());
    let status = vm.qmp().unwrap().execute("query-status", None).await.expect("query-status");
    assert!(["running", "prelaunch"].contains(&status["status"].as_str().unwrap_or("")), "{status}");
    let exit = vm.wait(Duration::from_secs(30)).await.unwrap();
    let console = vm.console_tail(30);
    let elapsed = started.elapsed();
    vm.stop(Duration::ZERO).await.unwrap();
    assert!(exit.is_some(), "QEMU exited within 30 s; console:\n{console}");
    assert!(console.contains("Kernel panic"), "the console has the kernel's output:\n{console}");
    assert!(matches!(vm.qmp(), Err(VmmError::NotRunning)));
    assert!(!cfg.qmp_socket().exists() && !cfg.agent_socket().exists() && !cfg.pid_file().exists());
    vm.stop(Duration::ZERO).await.expect("stop is idempotent");
    eprintln!("boot to panic under TCG: {elapsed:?}");
}

#[tokio::test]
async fn stop_quits_a_running_vm_and_drop_kills() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    // A guest that never powers off by itself: panic=-1 is overridden to "wait forever".
    let mut cfg = config(dir.path(), "stop", host_kernel(), empty);
    cfg.cmdline = "panic=0".into();
    let mut vm = Vm::spawn(&cfg, true).await.expect("QEMU starts");
    let started = Instant::now();
    vm.stop(Duration::from_millis(100)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "QMP quit ends QEMU promptly");
    assert!(vm.try_exited().is_some());

    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.run_dir = dir2.path().to_path_buf();
    cfg2.name = format!("drop-{}", std::process::id());
    let vm = Vm::spawn(&cfg2, true).await.expect("QEMU starts");
    let pid = vm.pid();
    drop(vm);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        assert!(Instant::now() < deadline, "QEMU {pid} still runs after the Vm was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn adopt_refuses_a_process_that_is_not_our_qemu_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "notqemu", "/k".into(), "/i".into());
    let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().expect("sleep runs");
    let pid = sleeper.id();
    // Until `execve` has set up the new image, /proc shows an empty command line.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep")) {
        assert!(Instant::now() < deadline, "sleep {pid} never showed its command line");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = Vm::adopt(&cfg, pid).await.err().expect("a sleep is not QEMU");
    assert!(matches!(err, VmmError::NotOurProcess { pid: p, .. } if p == pid), "{err}");
    assert!(err.to_string().contains("not qemu-system"), "{err}");
    let alive = sleeper.try_wait().unwrap().is_none();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(alive, "adopt must never signal a process it refused");
    let err = Vm::adopt(&cfg, u32::MAX - 1).await.err().expect("no such process");
    assert!(matches!(err, VmmError::NotOurProcess { .. }), "{err}");
}

/// What a daemon restart does: the old daemon detaches from a running VM, a new handle adopts
/// it by pid, drives it over QMP, and ends it; a watcher started before sees the exit.
#[tokio::test]
async fn a_save_cut_short_is_cancelled_and_the_guest_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let mut cfg = config(dir.path(), "resume", host_kernel(), empty);
    cfg.cmdline = "panic=0".into();
    let mut vm = Vm::spawn(&cfg, true).await.expect("QEMU starts");
    assert!(!vm.resume_if_paused().await.expect("QMP answers"), "a running guest is left alone");

    // As a daemon killed mid-save leaves it: paused, its state streaming to a reader that
    // never reads (the stream holds 256 MiB of RAM, so it stalls once the socket is full).
    let sink = dir.path().join("sink.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sink).unwrap();
    let qmp = vm.qmp().unwrap();
    qmp.execute("stop", None).await.unwrap();
    qmp.execute("migrate", Some(json!({ "uri": format!("unix:{}", sink.display()) }))).await.unwrap();
    let migration = qmp.execute("query-migrate", None).await.unwrap();
    assert!(migration["status"] == "setup" || migration["status"] == "active", "in flight: {migration}");

    assert!(vm.resume_if_paused().await.expect("the save is cancelled"), "the guest was paused");
    let qmp = vm.qmp().unwrap();
    assert_eq!(qmp.execute("query-status", None).await.unwrap()["running"], true);
    assert_eq!(qmp.execute("query-migrate", None).await.unwrap()["status"], "cancelled");
    vm.kill().await;
}

#[tokio::test]
async fn a_detached_vm_keeps_running_and_is_adopted_by_a_new_handle() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let mut cfg = config(dir.path(), "adopt", host_kernel(), empty);
    cfg.cmdline = "panic=0".into();
    // die_with_parent: should the test fail half-way, QEMU still dies with the test thread.
    let vm = Vm::spawn(&cfg, true).await.expect("QEMU starts");
    let pid = vm.pid();
    let mut exited = tokio::spawn(vm.exit_watcher().expect("watcher").wait());
    vm.detach();

    let mut other = cfg.clone();
    other.name = format!("other-{}", std::process::id());
    let err = Vm::adopt(&other, pid).await.err().expect("another sandbox's config does not adopt it");
    assert!(matches!(err, VmmError::NotOurProcess { .. }) && err.to_string().contains("-name"), "{err}");

    let mut adopted = Vm::adopt(&cfg, pid).await.expect("the detached QEMU is adopted");
    assert!(adopted.is_adopted() && adopted.pid() == pid);
    let status = adopted.qmp().unwrap().execute("query-status", None).await.expect("QMP answers");
    assert!(status.get("status").is_some(), "{status}");
    assert_eq!(adopted.wait(Duration::from_millis(100)).await.unwrap(), None);
    assert_eq!(adopted.try_exited(), None);
    drop(adopted);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut exited).await.is_err(),
        "dropping an adopted Vm must leave QEMU running"
    );

    let mut again = Vm::adopt(&cfg, pid).await.expect("adopted again once the first handle let go of QMP");
    again.kill().await;
    assert_eq!(again.try_exited(), Some(Exit::Unknown));
    tokio::time::timeout(Duration::from_secs(5), exited).await.expect("the watcher sees the exit").unwrap();
    again.stop(Duration::ZERO).await.expect("stop after kill cleans up");
    assert!(!cfg.qmp_socket().exists() && !cfg.pid_file().exists());
    let err = Vm::adopt(&cfg, pid).await.err().expect("an exited QEMU cannot be adopted");
    assert!(matches!(err, VmmError::NotOurProcess { .. }), "{err}");
}
