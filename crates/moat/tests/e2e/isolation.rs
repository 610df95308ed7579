//! Host isolation with real VMs: every QEMU runs jailed (a uid of its own, its own namespaces, a
//! root holding only its files, no capabilities, seccomp), and an escaped QEMU could not open the
//! daemon's state even when it asks QEMU to.

use crate::common;

use std::path::{Path, PathBuf};

use common::{moat_ok, OwnHome};
use moat_vmm::{Accel, Jail, JailIds, Vm, VmConfig};
use serde_json::{json, Value};

/// The tests here run one at a time: one of them measures how responsive a sandbox stays, which
/// other tests' boots would disturb.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn inspect(h: &Path, name: &str) -> Value {
    serde_json::from_str(&moat_ok(h, &["inspect", name, "--json"])).expect("inspect prints JSON")
}

/// `Key:\tvalue` of /proc/<pid>/status.
fn status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process runs");
    let line = text.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap_or_else(|| panic!("{key} in {text}"));
    line.split_once(':').map(|(_, v)| v.trim().to_string()).unwrap_or_default()
}

/// Every path in the jail's root (as the host sees it through /proc/<pid>/root), but the
/// host's read-only /usr, relative to that root.
fn jail_tree(pid: u32) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let path = entry.path();
            let rel = format!("/{}", path.strip_prefix(root).expect("under the root").display());
            if rel == "/usr" {
                out.push(rel);
                continue;
            }
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            out.push(rel);
            if is_dir {
                walk(root, &path, out);
            }
        }
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

#[test]
fn a_sandboxs_qemu_runs_jailed_as_a_uid_of_its_own_and_sees_only_its_files() {
    let _serial = serial();
    let h = OwnHome::new();
    moat_ok(h.path(), &["run", "-d", "--name", "one"]);
    moat_ok(h.path(), &["run", "-d", "--name", "two"]);
    let one = inspect(h.path(), "one");
    let two = inspect(h.path(), "two");
    let pid = one["pid"].as_u64().expect("a running sandbox has a QEMU") as u32;
    let other = two["pid"].as_u64().expect("a running sandbox has a QEMU") as u32;
    let daemon = common::daemon_pid(h.path()).expect("the daemon runs") as u32;

    // Its uid is neither root nor the daemon's, and no other sandbox shares it.
    let uids = status(pid, "Uid");
    let uid: u32 = uids.split_whitespace().next().unwrap().parse().unwrap();
    assert!(uids.split_whitespace().all(|u| u == uid.to_string()), "real, effective, saved, fs uid: {uids}");
    assert_ne!(uid, 0);
    assert_ne!(uids, status(daemon, "Uid"));
    assert_ne!(uids, status(other, "Uid"), "each sandbox has a uid of its own");
    assert_eq!(status(pid, "CapEff"), "0000000000000000");
    assert_eq!(status(pid, "CapBnd"), "0000000000000000");
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    assert_eq!(status(pid, "Seccomp"), "2", "QEMU's own seccomp filter (-sandbox on) is on");
    // PID 1 of a PID namespace of its own.
    assert_eq!(status(pid, "NSpid").split_whitespace().last(), Some("1"));
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).expect("namespace link");
        assert_ne!(of(pid), of(daemon), "{ns} namespace");
        assert_ne!(of(pid), of(other), "{ns} namespace");
    }

    // Its root holds its own files and nothing of the daemon's or the other sandbox's.
    let home = std::fs::canonicalize(h.path()).unwrap();
    let tree = jail_tree(pid);
    let home_s = home.display().to_string();
    let id = one["id"].as_str().unwrap();
    let other_id = two["id"].as_str().unwrap();
    for present in [
        format!("{home_s}/run/{id}/root.qcow2"),
        format!("{home_s}/run/{id}/console.log"),
        format!("{home_s}/run/{id}/sock"),
        "/dev/null".to_string(),
        "/usr".to_string(),
    ] {
        assert!(tree.contains(&present), "{present} is in the jail: {tree:#?}");
    }
    let places = [
        format!("{home_s}/run/{id}"),
        format!("{home_s}/images"),
        format!("{home_s}/snapshots"),
        format!("{home_s}/cache"),
        "/dev".to_string(),
        "/boot/vmlinuz".to_string(),
    ];
    for line in &tree {
        // A place, something in it, or a directory on the way to it.
        let allowed = ["/usr", "/lib", "/lib64", "/bin", "/sbin"].contains(&line.as_str())
            || places.iter().any(|p| line.starts_with(p.as_str()) || p.starts_with(&format!("{line}/")));
        assert!(allowed, "{line} should not be in the jail: {tree:#?}");
        assert!(!line.contains(other_id), "the other sandbox's files are not there: {line}");
        if line.starts_with(&format!("{home_s}/cache/")) {
            assert!(line.contains("/cache/initramfs-"), "only the initramfs of the cache: {line}");
        }
    }
    for absent in ["state.db", "secrets.json", "daemon.log", "moat.sock"] {
        assert!(!Path::new(&format!("/proc/{pid}/root{home_s}/{absent}")).exists(), "{absent} is not in the jail");
    }
    assert!(!Path::new(&format!("/proc/{pid}/root/etc")).exists(), "no /etc in the jail");
    assert!(!Path::new(&format!("/proc/{pid}/root/proc")).exists(), "no /proc in the jail");

    // In its mount namespace, even root finds nothing of the host's: what the process sees.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .args(["--", "/usr/bin/cat"])
        .arg(home.join("state.db"))
        .output()
        .expect("nsenter runs (util-linux)");
    assert!(!out.status.success(), "state.db is readable in the jail's mount namespace");
    assert!(common::text(&out.stderr).contains("No such file"), "{}", common::text(&out.stderr));

    // The files QEMU may write are its uid's; the run directory stays the daemon's.
    use std::os::unix::fs::MetadataExt;
    let run = home.join("run").join(id);
    assert_eq!(std::fs::metadata(&run).unwrap().uid(), 0);
    assert_eq!(std::fs::metadata(run.join("root.qcow2")).unwrap().uid(), uid);
    assert_eq!(std::fs::metadata(run.join("sock")).unwrap().uid(), uid);

    // And the sandbox works: exec, a file round trip.
    assert_eq!(moat_ok(h.path(), &["exec", "one", "--", "echo", "jailed"]).trim(), "jailed");
}

/// A QEMU started the way the daemon starts it, asked over QMP to open a host file: jailed, the
/// file is not there; without the jail (the control) the same command opens it.
#[test]
fn a_jailed_qemu_asked_to_open_a_host_file_cannot() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    rt.block_on(ask_qemus_to_open_a_host_file());
}

async fn ask_qemus_to_open_a_host_file() {
    common::require_host();
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let secret = dir.join("state.db");
    std::fs::write(&secret, b"the daemon's secrets").unwrap();
    let empty = dir.join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let kernel = moat_image::find_kernel(None).expect("a guest kernel (apt-get install linux-image-cloud-amd64)");
    let config = |name: &str, jail: Option<Jail>| VmConfig {
        qemu: moat_vmm::find_qemu(None).expect("QEMU (apt-get install qemu-system-x86)"),
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 64,
        kernel: kernel.path.clone(),
        initrd: empty.clone(),
        cmdline: "panic=0".into(),
        root_disk: None,
        run_dir: dir.join(name),
        seccomp: true,
        name: format!("{name}-{}", std::process::id()),
        memory: None,
        // Paused before the guest runs: only QEMU is under test, and a guest that ran could end
        // QEMU (a reset with `-no-reboot`) before the test asks it anything.
        incoming: true,
        nic: false,
        jail,
        cgroups: None,
    };
    let jail = Jail {
        helper: env!("CARGO_BIN_EXE_moat").into(),
        ids: JailIds::Range { base: moat_vmm::DEFAULT_UID_BASE, count: moat_vmm::DEFAULT_UID_COUNT },
        read_roots: vec![dir.clone()],
    };
    let open = json!({ "driver": "file", "node-name": "stolen", "filename": secret, "read-only": true });

    let mut jailed = Vm::spawn(&config("jailed", Some(jail)), true).await.expect("a jailed QEMU starts");
    let err = jailed.qmp().unwrap().execute("blockdev-add", Some(open.clone())).await.expect_err("refused");
    assert!(err.to_string().contains("No such file or directory"), "{err}");
    jailed.kill().await;

    let mut free = Vm::spawn(&config("free", None), true).await.expect("an unjailed QEMU starts");
    free.qmp().unwrap().execute("blockdev-add", Some(open)).await.expect("without a jail QEMU opens any file");
    free.kill().await;
}

/// Point a qcow2 header at `to` without looking at it, as a QEMU that escaped could.
fn rewrite_backing(disk: &Path, to: &Path, format: &str) {
    let ok = std::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", format, "-b"])
        .arg(to)
        .arg(disk)
        .status()
        .expect("qemu-img runs")
        .success();
    assert!(ok);
}

/// `moat start NAME` must fail: its stderr.
fn start_fails(h: &Path, name: &str) -> String {
    let out = common::moat_in(h).args(["start", name]).output().expect("moat runs");
    let err = common::text(&out.stderr);
    assert!(!out.status.success(), "{name} must not start: {err}");
    assert!(err.contains("moat rm"), "the remedy is named: {err}");
    err
}

/// A QEMU that rewrote its own disk's header to name another file as the backing file (what an
/// escape could do, for the next start to bind that file in) is refused before it starts: another
/// sandbox's snapshot in the store, because moat noted what it made the disk on; a host file,
/// even for a disk from before that note, because it is outside the stores.
#[test]
fn a_disk_whose_backing_file_was_changed_is_refused() {
    let _serial = serial();
    let h = OwnHome::new();
    moat_ok(h.path(), &["run", "-d", "--name", "box"]);
    moat_ok(h.path(), &["run", "-d", "--name", "other"]);
    moat_ok(h.path(), &["snapshot", "other", "--name", "theirs"]);
    let id = inspect(h.path(), "box")["id"].as_str().unwrap().to_string();
    moat_ok(h.path(), &["stop", "box"]);
    let disk = h.path().join("run").join(&id).join("root.qcow2");
    let theirs = std::fs::read_dir(h.path().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("disk.qcow2"))
        .find(|d| d.exists())
        .expect("the snapshot's disk");
    let theirs = std::fs::canonicalize(theirs).unwrap();

    rewrite_backing(&disk, &theirs, "qcow2");
    let err = start_fails(h.path(), "box");
    assert!(err.contains("but moat made it on") && err.contains(&theirs.display().to_string()), "{err}");

    // A disk made before moat noted its backing file.
    std::fs::remove_file(h.path().join("run").join(&id).join("root.qcow2.backing")).unwrap();
    rewrite_backing(&disk, &h.path().join("state.db"), "raw");
    let err = start_fails(h.path(), "box");
    assert!(err.contains("outside the image and snapshot stores") && err.contains("state.db"), "{err}");
    assert!(common::qemu_processes_mentioning(&id).is_empty(), "no QEMU was left running");
}

/// A control file of the cgroup holding `pid`: in the v1 hierarchy of `controller` when there is
/// one, else in the unified (v2) hierarchy.
fn cgroup_value(pid: u32, controller: &str, v1: &str, v2: &str) -> String {
    let table = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("the process runs");
    let v1_path = table.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then(|| format!("/sys/fs/cgroup/{controller}{path}/{v1}"))
    });
    let path = v1_path.unwrap_or_else(|| {
        let path = table.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup");
        format!("/sys/fs/cgroup{path}/{v2}")
    });
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().to_string()
}

fn median(mut times: Vec<std::time::Duration>) -> std::time::Duration {
    times.sort();
    times[times.len() / 2]
}

/// Median time of `moat exec NAME -- true`, over `n` round trips.
fn exec_round_trip(h: &Path, name: &str, n: usize) -> std::time::Duration {
    median(
        (0..n)
            .map(|_| {
                let t = std::time::Instant::now();
                moat_ok(h, &["exec", name, "--", "true"]);
                t.elapsed()
            })
            .collect(),
    )
}

/// One sandbox does its worst to the host — a fork bomb, a memory hog, a disk-filling loop and a
/// console flood at once — and hits its own limits, while another sandbox's exec round trip stays
/// within 2x of what it is with the attacker frozen. The two are measured in turns (the attacker's
/// QEMU stopped, then running), so whatever else loads the machine — the other test thread — weighs
/// on both sides alike.
#[test]
fn a_guest_exhausting_its_sandbox_leaves_its_neighbour_responsive() {
    let _serial = serial();
    let h = OwnHome::new();
    moat_ok(h.path(), &["run", "-d", "--name", "calm", "--memory", "256"]);
    moat_ok(h.path(), &["run", "-d", "--name", "hog", "--memory", "256", "--disk", "512"]);
    let hog = inspect(h.path(), "hog");
    let pid = hog["pid"].as_u64().expect("hog runs") as u32;

    // The limits are in place: RAM + QEMU's overhead, one CPU for one vCPU, bounded tasks.
    let memory: u64 = cgroup_value(pid, "memory", "memory.limit_in_bytes", "memory.max").parse().unwrap();
    assert_eq!(memory, (256 + u64::from(moat_vmm::QEMU_OVERHEAD_MIB)) << 20);
    let quota = cgroup_value(pid, "cpu", "cpu.cfs_quota_us", "cpu.max");
    assert!(quota == "100000" || quota == "100000 100000", "one CPU: {quota}");
    assert_eq!(cgroup_value(pid, "pids", "pids.max", "pids.max"), moat_vmm::CgroupLimits::DEFAULT_PIDS.to_string());

    exec_round_trip(h.path(), "calm", 3);

    let attack = "for job in 'yes flood > /dev/console' 'dd if=/dev/zero of=/fill bs=1M' \
                  'head -c 1000M /dev/zero | tail' 'b() { b | b & }; b'; do \
                  setsid sh -c \"$job\" </dev/null >/dev/null 2>&1 & done; echo started";
    assert_eq!(moat_ok(h.path(), &["exec", "hog", "--", "sh", "-c", attack]).trim(), "started");
    std::thread::sleep(std::time::Duration::from_secs(5));
    let (mut frozen, mut attacking) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        // SAFETY: signals to the hog's own QEMU, which this test started.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        frozen.push(exec_round_trip(h.path(), "calm", 3));
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(std::time::Duration::from_millis(300));
        attacking.push(exec_round_trip(h.path(), "calm", 3));
    }
    let (idle, loaded) = (median(frozen), median(attacking));
    eprintln!("calm's exec round trip: hog frozen {idle:?}, hog attacking {loaded:?}");
    assert!(loaded <= idle * 2, "the neighbour slowed from {idle:?} to {loaded:?}");

    // The hog stayed inside its limits, and its QEMU is still the one it was.
    let used: u64 = cgroup_value(pid, "memory", "memory.max_usage_in_bytes", "memory.peak").parse().unwrap();
    assert!(used <= memory, "{used} bytes used under a limit of {memory}");
    let console = std::fs::metadata(h.path().join("run").join(hog["id"].as_str().unwrap()).join("console.log"));
    assert!(console.map(|m| m.len()).unwrap_or(0) <= 2 * moat_vmm::CONSOLE_LOG_CAP, "the console log stays capped");
    assert_eq!(inspect(h.path(), "hog")["pid"].as_u64(), Some(u64::from(pid)));
    moat_ok(h.path(), &["rm", "-f", "hog"]);
    assert_eq!(moat_ok(h.path(), &["exec", "calm", "--", "echo", "fine"]).trim(), "fine");
}

/// A daemon that is not root keeps every layer but the uid: its helper builds the jail in a user
/// namespace that maps only its own ids. Here the helper runs as `nobody`, as such a daemon's
/// would, around a command that reports what it sees.
#[test]
fn without_root_the_jail_is_built_in_a_user_namespace_of_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (root, report) = (tmp.path().join("root"), tmp.path().join("report"));
    std::fs::create_dir(&root).unwrap();
    for dir in [tmp.path(), root.as_path()] {
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
    }
    let helper = tmp.path().join("as-nobody");
    let script = format!(
        "#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups {} \"$@\" 2>{}\n",
        env!("CARGO_BIN_EXE_moat"),
        report.display()
    );
    std::fs::write(&helper, script).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let jail = Jail { helper, ids: JailIds::Own, read_roots: Vec::new() };
    moat_vmm::probe_jail(&jail, &root)
        .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&report).unwrap_or_default()));
}

/// Every QEMU restored from a template maps its RAM file, and QEMU 7.2 opens it read-write: a
/// QEMU that escaped could write to it and so reach every later sandbox. A write breaks the
/// template's seal, and the next create refuses it, drops it and boots instead.
#[test]
fn a_template_written_to_after_it_was_saved_is_refused_and_dropped() {
    let _serial = serial();
    let h = OwnHome::new();
    moat_ok(h.path(), &["run", "-d", "--name", "first", "--memory", "256"]);
    let templates: Vec<PathBuf> = std::fs::read_dir(h.path().join("snapshots"))
        .expect("the template is saved")
        .flatten()
        .map(|e| e.path().join("mem"))
        .filter(|m| m.exists())
        .collect();
    let [mem] = templates.as_slice() else { panic!("one template: {templates:?}") };
    // The same byte back where it was: the content is unchanged, the file was still written.
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(mem).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 4096).unwrap();
        file.write_all_at(&byte, 4096).unwrap();
    }
    moat_ok(h.path(), &["run", "-d", "--name", "second", "--memory", "256"]);
    let second = inspect(h.path(), "second");
    assert!(second["snapshot_id"].is_null(), "booted, not restored from the written template: {second}");
    let log = std::fs::read_to_string(h.path().join("daemon.log")).unwrap();
    assert!(log.contains("was written to after it was saved"), "the reason is logged:\n{log}");
    assert!(!mem.exists(), "the template is dropped");
}
