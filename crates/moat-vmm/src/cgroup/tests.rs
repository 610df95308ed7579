//! Real cgroups on this host (root, cgroup v1 or v2), and the v2 file layer against a directory
//! tree that mimics one.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::*;

/// A test cgroup, removed (after killing its child) even when the test fails.
struct Held {
    cg: Option<SandboxCgroup>,
    child: Option<Child>,
}

impl Held {
    fn cg(&self) -> &SandboxCgroup {
        self.cg.as_ref().expect("the cgroup is held until the test removes it")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cg) = self.cg.take() {
            let _ = cg.remove();
        }
    }
}

fn host() -> CgroupHost {
    let host = CgroupHost::detect().unwrap_or_else(|e| panic!("{}", moat_hint::Report::new(&e)));
    for (name, usable) in host.controllers() {
        if name != "io" {
            usable.unwrap_or_else(|u| panic!("the {name} controller is not usable here: {u}; fix: {}", u.fix));
        }
    }
    host
}

fn unique(tag: &str) -> String {
    format!("test-{tag}-{}", std::process::id())
}

/// Starts `cmd` inside `cg` the way QEMU is: a `pre_exec` hook writes "0" into each cgroup.procs.
fn spawn_in(cg: &SandboxCgroup, cmd: &mut Command) -> Child {
    let files: Vec<CString> = cg
        .procs_files()
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()).expect("a cgroup path has no NUL"))
        .collect();
    let join = move || {
        for f in &files {
            // SAFETY: `f` is a NUL-terminated path that lives until exec.
            let fd = unsafe { libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd is open; the buffer is one valid byte.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = std::io::Error::last_os_error();
            // SAFETY: fd is open and ours.
            unsafe { libc::close(fd) };
            if n != 1 {
                return Err(err);
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls open, write and close (async-signal-safe) on memory made before the fork.
    unsafe { cmd.pre_exec(join) };
    cmd.stdin(Stdio::null()).spawn().expect("spawn the test child")
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display())).trim().into()
}

#[test]
fn cgroup_limits_are_written_and_a_joined_process_is_counted_then_removed() {
    let host = host();
    let name = unique("limits");
    let limits = CgroupLimits { memory_bytes: 256 << 20, cpus: 2, cpu_weight: 200, pids: 64, io_weight: 300 };
    let mut held = Held { cg: Some(SandboxCgroup::create(&host, &name, &limits).unwrap()), child: None };
    // Created twice: the second reuses it and applies the limits again.
    let again = SandboxCgroup::create(&host, &name, &CgroupLimits { pids: 32, ..limits }).unwrap();
    assert_eq!(again.dirs(), held.cg().dirs());
    let dirs: Vec<PathBuf> = held.cg().dirs().iter().map(|d| d.to_path_buf()).collect();
    let dir_of = |kind: Kind| held.cg().dirs.iter().find(|(k, _)| k.contains(&kind)).map(|(_, d)| d.clone());
    let (mem, cpu, pids) = (dir_of(Kind::Memory).unwrap(), dir_of(Kind::Cpu).unwrap(), dir_of(Kind::Pids).unwrap());
    match host.version() {
        CgroupVersion::V1 => {
            assert_eq!(read(&mem, "memory.limit_in_bytes"), (256u64 << 20).to_string());
            if mem.join("memory.memsw.limit_in_bytes").exists() {
                assert_eq!(read(&mem, "memory.memsw.limit_in_bytes"), (256u64 << 20).to_string());
            }
            assert_eq!(read(&cpu, "cpu.cfs_period_us"), "100000");
            assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "200000");
            assert_eq!(read(&cpu, "cpu.shares"), "2048");
            if let Some(io) = dir_of(Kind::Io) {
                assert_eq!(read(&io, "blkio.bfq.weight"), "300");
            }
        }
        CgroupVersion::V2 => {
            assert_eq!(read(&mem, "memory.max"), (256u64 << 20).to_string());
            assert_eq!(read(&cpu, "cpu.max"), "200000 100000");
            assert_eq!(read(&cpu, "cpu.weight"), "200");
        }
    }
    assert_eq!(read(&pids, "pids.max"), "32");
    assert!(sandbox_cgroups(&host).contains(&name), "{:?}", sandbox_cgroups(&host));

    let child = spawn_in(held.cg(), Command::new("sleep").arg("30"));
    let pid = child.id();
    held.child = Some(child);
    assert!(held.cg().contains(pid), "pid {pid} is not in {dirs:?}");
    assert!(!held.cg().contains(std::process::id()), "the test itself joined");
    let opened = SandboxCgroup::open(&host, &name).expect("open the existing cgroup");
    assert!(opened.contains(pid));
    let stats = opened.stats();
    assert!(stats.pids_current.is_some_and(|n| n >= 1), "{stats:?}");
    assert_eq!(stats.pids_max, Some(32), "{stats:?}");
    assert_eq!(stats.memory_max, Some(256 << 20), "{stats:?}");
    assert!(stats.memory_current.is_some(), "{stats:?}");
    assert!(stats.cpu_usage_usec.is_some(), "{stats:?}");

    let cg = held.cg.take().expect("held");
    let err = remove_dir(&dirs[0]).unwrap_err();
    assert!(matches!(&err, CgroupError::Busy { pids, .. } if pids.contains(&pid)), "{err}");
    let mut child = held.child.take().expect("held");
    child.kill().unwrap();
    child.wait().unwrap();
    cg.remove().unwrap();
    for d in &dirs {
        assert!(!d.exists(), "{} is still there", d.display());
    }
    assert!(SandboxCgroup::open(&host, &name).is_none());
    assert!(!sandbox_cgroups(&host).contains(&name));
}

#[test]
fn a_process_over_the_memory_limit_is_oom_killed() {
    let host = host();
    let limits = CgroupLimits { memory_bytes: 64 << 20, ..CgroupLimits::for_vm(0, 1) };
    let mut held = Held { cg: Some(SandboxCgroup::create(&host, &unique("oom"), &limits).unwrap()), child: None };
    // With no newline in its input, tail keeps all of it in memory: 300 MiB against a 64 MiB limit.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "head -c 300M /dev/zero | tail"]).stdout(Stdio::null()).stderr(Stdio::null());
    held.child = Some(spawn_in(held.cg(), &mut cmd));
    let status = held.child.as_mut().expect("held").wait().unwrap();
    // sh reports its last command killed by SIGKILL as 128 + 9.
    assert!(status.code() == Some(137) || status.signal() == Some(libc::SIGKILL), "{status}");
    let stats = held.cg().stats();
    assert!(stats.oom_kills.is_some_and(|n| n >= 1), "{stats:?}");
    held.child = None;
    held.cg.take().expect("held").remove().unwrap();
}

#[test]
fn a_bad_name_or_limit_is_refused() {
    let host = host();
    let ok = CgroupLimits::for_vm(128, 1);
    for name in ["", "a/b", "..", ".", "../x", "cgroup.procs", &"x".repeat(65), "a b", "a\0b"] {
        let err = SandboxCgroup::create(&host, name, &ok).unwrap_err();
        assert!(matches!(err, CgroupError::InvalidName { .. }), "{name:?}: {err}");
        assert!(SandboxCgroup::open(&host, name).is_none());
    }
    check_name(&"a".repeat(64)).unwrap();
    check_name("0123456789ab").unwrap();
    for bad in [
        CgroupLimits { memory_bytes: 0, ..ok },
        CgroupLimits { cpus: 0, ..ok },
        CgroupLimits { pids: 0, ..ok },
        CgroupLimits { cpu_weight: 0, ..ok },
        CgroupLimits { cpu_weight: 10_001, ..ok },
        CgroupLimits { io_weight: 0, ..ok },
        CgroupLimits { io_weight: 1001, ..ok },
    ] {
        let err = SandboxCgroup::create(&host, &unique("bad"), &bad).unwrap_err();
        assert!(matches!(err, CgroupError::InvalidLimits(_)), "{bad:?}: {err}");
    }
    assert!(SandboxCgroup::open(&host, &unique("bad")).is_none());
}

#[test]
fn for_vm_adds_the_qemu_overhead() {
    let l = CgroupLimits::for_vm(512, 2);
    assert_eq!(l.memory_bytes, (512 + u64::from(QEMU_OVERHEAD_MIB)) << 20);
    assert_eq!((l.cpus, l.cpu_weight, l.io_weight), (2, 100, 100));
    assert_eq!(CgroupLimits { cpu_weight: 1, ..l }.cpu_shares(), 10);
    assert_eq!(CgroupLimits { cpu_weight: 10_000, ..l }.cpu_shares(), 102_400);
}

/// Writes `files` (name, content) into `dir`, making it.
fn lay(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (f, content) in files {
        std::fs::write(dir.join(f), content).unwrap();
    }
}

fn v2_tables(root: &Path, own: &str) -> (String, String) {
    let mountinfo = format!(
        "24 30 0:22 / /sys rw - sysfs sysfs rw\n35 24 0:30 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        root.display().to_string().replace(' ', "\\040")
    );
    (mountinfo, format!("0::{own}\n"))
}

/// cgroup v2 is not mounted with controllers here: detection and the limit files are checked
/// against a tree shaped like one, with the files the kernel would make already there.
#[test]
fn v2_limits_go_to_the_unified_files_and_controllers_are_enabled_in_the_parents() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cg root");
    let all = "cpuset cpu io memory hugetlb pids rdma misc";
    lay(&root, &[("cgroup.controllers", all), ("cgroup.subtree_control", "cpuset"), ("cgroup.procs", "1\n")]);
    let moat = root.join("moat");
    lay(&moat, &[("cgroup.type", "domain"), ("cgroup.controllers", all), ("cgroup.subtree_control", "")]);
    let leaf = moat.join("0123456789ab");
    let kernel_files = [
        ("cgroup.type", "domain"),
        ("cgroup.procs", "4242\n"),
        ("memory.max", "max"),
        ("memory.swap.max", "max"),
        ("cpu.max", "max 100000"),
        ("cpu.weight", "100"),
        ("pids.max", "max"),
        ("io.weight", "default 100"),
        ("memory.current", "1234"),
        ("memory.peak", "5678"),
        ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n"),
        ("pids.current", "3"),
        ("cpu.stat", "usage_usec 777\nuser_usec 700\nsystem_usec 77\nnr_periods 0\nthrottled_usec 12\n"),
    ];
    lay(&leaf, &kernel_files);

    let (mountinfo, self_cgroup) = v2_tables(&root, "/");
    let host = CgroupHost::from_tables(&mountinfo, &self_cgroup).unwrap();
    assert_eq!(host.version(), CgroupVersion::V2);
    let usable: Vec<_> = host.controllers().into_iter().map(|(n, u)| (n, u.is_ok())).collect();
    assert_eq!(usable, [("memory", true), ("cpu", true), ("pids", true), ("io", true)]);

    let limits = CgroupLimits { memory_bytes: 100 << 20, cpus: 3, cpu_weight: 50, pids: 99, io_weight: 250 };
    let cg = SandboxCgroup::create(&host, "0123456789ab", &limits).unwrap();
    assert_eq!(read(&root, "cgroup.subtree_control"), "+memory +cpu +pids +io");
    assert_eq!(read(&moat, "cgroup.subtree_control"), "+memory +cpu +pids +io");
    assert_eq!(read(&leaf, "memory.max"), (100u64 << 20).to_string());
    assert_eq!(read(&leaf, "memory.swap.max"), "0");
    assert_eq!(read(&leaf, "cpu.max"), "300000 100000");
    assert_eq!(read(&leaf, "cpu.weight"), "50");
    assert_eq!(read(&leaf, "pids.max"), "99");
    assert_eq!(read(&leaf, "io.weight"), "250");
    assert!(!leaf.join("io.bfq.weight").exists(), "a file the kernel did not make was made");
    assert_eq!(cg.procs_files(), [leaf.join("cgroup.procs")]);
    assert!(cg.contains(4242) && !cg.contains(1));
    assert_eq!(
        cg.stats(),
        CgroupStats {
            memory_current: Some(1234),
            memory_peak: Some(5678),
            memory_max: Some(100 << 20),
            oom_kills: Some(1),
            pids_current: Some(3),
            pids_max: Some(99),
            cpu_usage_usec: Some(777),
            cpu_throttled_usec: Some(12),
        }
    );
    assert_eq!(sandbox_cgroups(&host), ["0123456789ab"]);
    assert!(SandboxCgroup::open(&host, "0123456789ab").is_some());
    assert!(SandboxCgroup::open(&host, "abcdef012345").is_none());

    // A controller the parent does not offer is reported, and the others still work.
    std::fs::write(root.join("cgroup.controllers"), "cpu memory pids").unwrap();
    let host = CgroupHost::from_tables(&mountinfo, &self_cgroup).unwrap();
    let io = host.controllers().into_iter().find(|(n, _)| *n == "io").unwrap().1.unwrap_err();
    assert!(io.reason.contains("io controller is not available"), "{io}");
    let cg = SandboxCgroup::create(&host, "0123456789ab", &limits).unwrap();
    assert_eq!(cg.dirs(), [leaf.as_path()]);
}

#[test]
fn v2_no_internal_processes_rule_is_reported_with_the_delegation_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let all = "cpu io memory pids";
    lay(root, &[("cgroup.controllers", all), ("cgroup.subtree_control", all), ("cgroup.procs", "")]);
    let own = root.join("user.slice/session-1.scope");
    lay(&own, &[("cgroup.type", "domain"), ("cgroup.controllers", all), ("cgroup.procs", "77\n")]);
    let (mountinfo, self_cgroup) = v2_tables(root, "/user.slice/session-1.scope");
    let host = CgroupHost::from_tables(&mountinfo, &self_cgroup).unwrap();
    for (name, usable) in host.controllers() {
        let u = usable.unwrap_err();
        assert!(u.reason.contains("holds processes") && u.reason.contains("session-1.scope"), "{name}: {u}");
        assert!(u.fix.contains("Delegate=yes"), "{name}: {}", u.fix);
    }
    let err = SandboxCgroup::create(&host, "0123456789ab", &CgroupLimits::for_vm(128, 1)).unwrap_err();
    assert!(matches!(err, CgroupError::NothingUsable { .. }), "{err}");
    assert!(moat_hint::Hint::hint(&err).unwrap_or_default().contains("Delegate=yes"));
    assert!(!own.join("moat").exists());
}

#[test]
fn mountinfo_and_proc_cgroup_are_parsed() {
    let text = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:5 - cgroup cgroup rw,cpu,cpuacct\n\
                40 31 0:37 /docker/abc /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory\n\
                41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                50 1 8:1 / / rw - ext4 /dev/sda1 rw\n";
    let mounts = parse_mountinfo(text);
    assert_eq!(mounts.len(), 3);
    assert_eq!(mounts[0].controllers, ["rw", "cpu", "cpuacct"]);
    assert_eq!(mounts[1].point, Path::new("/sys/fs/cgroup/my mem"));
    let own = "4:memory:/docker/abc/inner\n2:cpu,cpuacct:/\n0::/x\n";
    assert_eq!(own_path(own, Some("cpuacct")), Some("/"));
    assert_eq!(own_path(own, None), Some("/x"));
    assert_eq!(dir_in(&mounts[1], "/docker/abc/inner"), Some("/sys/fs/cgroup/my mem/inner".into()));
    assert_eq!(dir_in(&mounts[1], "/docker/abc"), Some("/sys/fs/cgroup/my mem".into()));
    assert_eq!(dir_in(&mounts[1], "/docker/abcdef"), None);
    assert_eq!(dir_in(&mounts[1], "/other"), None);
    assert_eq!(dir_in(&mounts[0], "/a/../b"), None);
    assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
    assert_eq!(unescape("trailing\\04"), "trailing\\04");
}

#[test]
fn a_control_file_over_its_cap_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("cgroup.procs");
    std::fs::write(&f, "1\n".repeat(40_000)).unwrap();
    let err = files::read_capped(&f, files::SMALL_CAP).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn every_cgroup_error_keeps_its_cause_and_hint_out_of_its_message() {
    let io = || std::io::Error::other("the io cause");
    let p = || PathBuf::from("/sys/fs/cgroup/x");
    let cases = [
        (CgroupError::NotMounted, true),
        (CgroupError::Read { path: p(), source: io() }, false),
        (CgroupError::InvalidName { name: "a/b".into(), reason: "bad" }, true),
        (CgroupError::InvalidLimits("x".into()), true),
        (CgroupError::NothingUsable { first: Unusable::new("no", "do this") }, true),
        (CgroupError::Create { path: p(), source: io() }, true),
        (CgroupError::Enable { path: p(), controllers: "memory".into(), source: io() }, true),
        (CgroupError::Write { path: p(), value: "1".into(), source: io() }, true),
        (CgroupError::Busy { path: p(), pids: vec![1] }, true),
        (CgroupError::Remove { path: p(), source: io() }, false),
    ];
    for (e, hinted) in &cases {
        moat_hint::check(e, *hinted).unwrap();
    }
}
