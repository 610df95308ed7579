//! The QEMU command line for a microvm sandbox.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::Accel;

/// Everything that decides how one VM is started.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to moat's base kernel arguments.
    pub cmdline: String,
    /// qcow2 root disk, attached as virtio-blk (`/dev/vda` in the guest).
    pub root_disk: Option<PathBuf>,
    /// Holds `console.log`, `qemu.pid`, and the sockets in `sock/`.
    pub run_dir: PathBuf,
    /// Enable QEMU's seccomp sandbox.
    pub seccomp: bool,
    /// Sandbox name; the QEMU process is called `moat-<name>` so `ps` and gc can recognise it.
    pub name: String,
    /// Where guest RAM lives; anonymous memory when absent.
    pub memory: Option<Memory>,
    /// Start paused, waiting for a saved state ([`crate::Vm::load`]) instead of booting.
    pub incoming: bool,
    /// Give the guest a NIC (virtio-net) whose frames go over a stream socket QEMU listens on at
    /// [`VmConfig::net_socket`], where moat's network stack connects.
    pub nic: bool,
    /// Run QEMU in a jail ([`crate::Jail`]); `None` runs it as the daemon's own user, with the
    /// host's whole filesystem in view.
    pub jail: Option<crate::Jail>,
    /// Put QEMU in a cgroup of its own (`<parent>/moat/<name>`) limited to guest RAM plus
    /// [`crate::QEMU_OVERHEAD_MIB`], `vcpus` CPUs and [`crate::CgroupLimits::DEFAULT_PIDS`] tasks;
    /// `None` leaves it in the daemon's.
    pub cgroups: Option<crate::CgroupHost>,
}

/// Guest RAM backed by a file, which is what makes snapshots cheap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// A file only this VM uses, mapped shared: guest writes land in the file, so a snapshot saves
    /// the device state alone (`x-ignore-shared`) and copies the file.
    Own(PathBuf),
    /// A snapshot's RAM file, mapped private: every VM restored from it shares its pages until it
    /// writes them (copy-on-write), and the file never changes.
    Snapshot(PathBuf),
}

impl Memory {
    /// Whether guest RAM is mapped shared, so migration streams leave it out.
    pub fn is_shared(&self) -> bool {
        matches!(self, Memory::Own(_))
    }
}

/// Every guest NIC has the same MAC: each sandbox has a network of its own.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

/// Kernel arguments every sandbox gets. `reboot=t` + `-no-reboot` turns a guest reboot or panic
/// into QEMU exiting; the rest trims probing of hardware microvm does not have.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet loglevel=4 rdinit=/init \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 tsc=reliable no_timer_check \
    random.trust_cpu=on";

/// QEMU's `-sandbox` (seccomp) policy. `spawn=deny` means QEMU can never fork, so snapshots must
/// hand it file descriptors instead of `exec:` URIs.
pub const SECCOMP_POLICY: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The names of the files QEMU's side of a sandbox keeps in its run directory, defined once.
/// QEMU creates its sockets in `sock/` (`crate::jail::SOCKET_DIR`), the only directory of the
/// run directory it may write to.
pub mod run_files {
    pub const QMP_SOCKET: &str = "sock/qmp.sock";
    pub const AGENT_SOCKET: &str = "sock/agent.sock";
    /// The NIC's stream netdev, which moat's network stack connects to.
    pub const NET_SOCKET: &str = "sock/net.sock";
    pub const CONSOLE_LOG: &str = "console.log";
    pub const PID_FILE: &str = "qemu.pid";
    /// QEMU's own stderr (start-up errors, warnings).
    pub const QEMU_LOG: &str = "qemu.log";
}

impl VmConfig {
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join(run_files::QMP_SOCKET)
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join(run_files::AGENT_SOCKET)
    }
    pub fn net_socket(&self) -> PathBuf {
        self.run_dir.join(run_files::NET_SOCKET)
    }
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join(run_files::CONSOLE_LOG)
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join(run_files::PID_FILE)
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join(run_files::QEMU_LOG)
    }
}

/// Facts about the host that shape the command line, gathered once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// Frequency of the host TSC in kHz, when the host is x86_64 with an invariant TSC.
    pub tsc_khz: Option<u32>,
}

impl HostFacts {
    /// Measured once per process (about 20 ms the first time).
    pub fn get() -> HostFacts {
        static FACTS: OnceLock<HostFacts> = OnceLock::new();
        *FACTS.get_or_init(|| HostFacts { tsc_khz: measure_tsc_khz() })
    }
}

/// Under TCG the guest's TSC is the host's TSC, and the kernel's PIT-based calibration of it is
/// unreliable (measured here: QEMU 7.2, Linux 6.1 — "tsc: Unable to calibrate against PIT", then
/// the guest hangs, in most boots). Telling the guest the frequency (`tsc_early_khz=`) makes the
/// boot deterministic and lets microvm drop the PIT and PIC.
#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u32> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    if !(flags.split_whitespace().any(|f| f == "constant_tsc") && flags.split_whitespace().any(|f| f == "nonstop_tsc"))
    {
        return None;
    }
    // The median of three short windows, so one preemption between reading the two clocks does
    // not skew the result.
    let mut samples: Vec<u64> = (0..3)
        .map(|_| {
            let t0 = std::time::Instant::now();
            // SAFETY: `rdtsc` exists on every x86_64 CPU and has no memory effects.
            let c0 = unsafe { core::arch::x86_64::_rdtsc() };
            std::thread::sleep(std::time::Duration::from_millis(7));
            // SAFETY: as above.
            let c1 = unsafe { core::arch::x86_64::_rdtsc() };
            let ns = t0.elapsed().as_nanos() as u64;
            c1.wrapping_sub(c0).saturating_mul(1_000_000) / ns.max(1)
        })
        .collect();
    samples.sort_unstable();
    let khz = samples[1];
    // Anything outside 100 MHz..10 GHz is a broken measurement, not a CPU.
    (100_000..10_000_000).contains(&khz).then_some(khz as u32)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u32> {
    None
}

/// The id of the virtio-scsi controller volumes are plugged into; its bus is `<id>.0`.
pub(crate) const VOLUME_CONTROLLER: &str = "vols";

/// TCG with its translation cache capped (QEMU's default lets it grow to 1 GiB per VM): the cap
/// is part of the memory QEMU needs beside guest RAM (`cgroup::QEMU_OVERHEAD_MIB`).
const TCG: &str = "tcg,tb-size=64";
/// The CPU model under TCG (see `command_line_for`).
const TCG_CPU: &str = "max,-erms,-fsrm";
/// A restored VM's cache. Every restore translates the guest's code afresh, and what it writes
/// is memory of its own, shared with no other fork: about 20 MiB by the first exec after a
/// restore with the boot's cap (measured, QEMU 7.2). A guest whose hot code outgrows the cap is
/// translated again after each flush: 8 MiB (measured: 8 MiB a fork instead of 20) made the
/// execs of the snapshot e2e test slow enough to miss its timing, 16 MiB keeps them; a boot
/// translates far more code, and keeps the larger cap.
const TCG_RESTORED: &str = "tcg,tb-size=16";

/// The full argv (without the program) for QEMU on this host.
pub fn command_line(cfg: &VmConfig) -> Vec<OsString> {
    command_line_for(cfg, HostFacts::get())
}

/// The full argv (without the program) for QEMU, given the host's facts. Pure.
pub fn command_line_for(cfg: &VmConfig, host: HostFacts) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(OsString::from));
    let p = |path: &PathBuf| path.to_string_lossy().into_owned();

    push(&["-name", &name_option(cfg)]);
    let mut kernel_args = BASE_CMDLINE.to_string();
    // Chosen by measurement (docs in the crate README): `-cpu max` under TCG boots the kernel to
    // its panic in ~2.6-3.3 s vs ~2.5-2.8 s for the default qemu64 model, and gives the guest
    // SSE4.2/AVX2 that today's wheels and binaries (x86-64-v2/v3) need. Under KVM `max` is the
    // host CPU with what KVM can virtualise; `host` aborts on nested PVM hosts. Under TCG the
    // model goes without ERMS and FSRM: with them the guest's kernel and glibc copy memory with
    // `rep movsb`, which TCG runs one byte per iteration; without, they use word-sized and vector
    // loops (a 256 MiB `dd` from /dev/zero to /dev/null: 0.60 s with, 0.09 s without).
    let machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on";
    let tcg = if cfg.incoming { TCG_RESTORED } else { TCG };
    match (cfg.accel, host.tsc_khz) {
        (Accel::Kvm, _) => {
            push(&["-M", machine, "-accel", "kvm", "-cpu", "max"]);
        }
        (Accel::Tcg, Some(khz)) => {
            push(&["-M", &format!("{machine},pit=off,pic=off"), "-accel", tcg, "-cpu", TCG_CPU]);
            kernel_args.push_str(&format!(" tsc_early_khz={khz}"));
        }
        (Accel::Tcg, None) => {
            push(&["-M", machine, "-accel", tcg, "-cpu", TCG_CPU]);
        }
    }
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none"]);
    push(&["-smp", &cfg.vcpus.to_string(), "-m", &format!("{}M", cfg.memory_mib)]);
    if let Some(memory) = &cfg.memory {
        // QEMU 7.2 opens the file read-write even to map it private (`readonly=on` would make
        // guest RAM read-only, and `rom=off` came with QEMU 8.2): a jail protects a snapshot's
        // RAM file with a seal instead (crate::jail).
        let (path, share) = match memory {
            Memory::Own(path) => (path, "share=on"),
            Memory::Snapshot(path) => (path, "share=off"),
        };
        push(&[
            "-object",
            &format!("memory-backend-file,id=ram,size={}M,mem-path={},{share}", cfg.memory_mib, opt_value(&p(path))),
        ]);
        push(&["-machine", "memory-backend=ram"]);
    }
    if cfg.incoming {
        // Paused until `cont`, so moat decides when the restored guest runs again.
        push(&["-incoming", "defer", "-S"]);
    }
    // A restored guest's kernel is in its RAM already. Loaded anyway, QEMU would keep the whole
    // kernel file (14 MB for Debian's) on its heap for firmware that never asks for it again:
    // memory every restored VM holds for nothing. Nothing of it is in the saved device state.
    if !cfg.incoming {
        push(&["-kernel", &p(&cfg.kernel), "-initrd", &p(&cfg.initrd)]);
        if !cfg.cmdline.is_empty() {
            kernel_args.push(' ');
            kernel_args.push_str(&cfg.cmdline);
        }
        push(&["-append", &kernel_args]);
    }
    push(&[
        "-chardev",
        // Appending, so the console log can be cut while QEMU writes (crate::console).
        &format!("file,id=console,path={},append=on", opt_value(&p(&cfg.console_log()))),
        "-serial",
        "chardev:console",
    ]);
    push(&["-device", "virtio-serial-device,max_ports=2"]);
    push(&["-chardev", &format!("socket,id=agent,path={},server=on,wait=off", opt_value(&p(&cfg.agent_socket())))]);
    push(&["-device", "virtserialport,chardev=agent,name=moat.agent"]);
    if cfg.nic {
        // QEMU listens, so a restarted daemon can connect to a running VM again.
        push(&[
            "-netdev",
            &format!("stream,id=net0,server=on,addr.type=unix,addr.path={}", opt_value(&p(&cfg.net_socket()))),
        ]);
        push(&["-device", &format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}")]);
    }
    if let Some(disk) = &cfg.root_disk {
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=root,format=qcow2,discard=unmap,detect-zeroes=unmap,cache=writeback",
                opt_value(&p(disk))
            ),
        ]);
        push(&["-device", "virtio-blk-device,drive=root"]);
    }
    // The bus volumes are hot-plugged on (crate::volume): virtio-mmio has no hotplug, a SCSI bus
    // does. Plugged only while mounted, a volume never ends up in a snapshot. After the other
    // devices, so they keep their virtio-mmio slots.
    push(&["-device", &format!("virtio-scsi-device,id={VOLUME_CONTROLLER}")]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt_value(&p(&cfg.qmp_socket())))]);
    push(&["-pidfile", &p(&cfg.pid_file())]);
    if cfg.seccomp {
        push(&["-sandbox", SECCOMP_POLICY]);
    }
    a
}

/// QEMU's `-name` value: `guest=` labels QMP and logs, `process=` is what `ps` shows; adoption
/// and gc recognise a sandbox's QEMU by it.
pub(crate) fn name_option(cfg: &VmConfig) -> String {
    format!("guest=moat-{0},process=moat-{0}", cfg.name)
}

/// A value inside a QEMU `key=value,...` option string: commas are escaped by doubling them.
fn opt_value(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostFacts = HostFacts { tsc_khz: Some(2_500_000) };

    fn cfg() -> VmConfig {
        VmConfig {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/boot/vmlinuz".into(),
            initrd: "/cache/initrd.cpio".into(),
            cmdline: "moat.root=/dev/vda".into(),
            root_disk: Some("/run/x/root.qcow2".into()),
            run_dir: "/run/x".into(),
            seccomp: true,
            name: "abc".into(),
            memory: None,
            incoming: false,
            nic: false,
            jail: None,
            cgroups: None,
        }
    }

    fn args(c: &VmConfig, host: HostFacts) -> Vec<String> {
        command_line_for(c, host).iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    /// The value following `flag` (the first occurrence).
    fn value(args: &[String], flag: &str) -> String {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .unwrap_or_else(|| panic!("{flag} missing in {args:?}"))
    }

    /// All values following `flag`.
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
    }

    #[test]
    fn a_tcg_microvm_with_disk_agent_port_and_seccomp() {
        let a = args(&cfg(), HOST);
        assert_eq!(value(&a, "-M"), "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,pic=off");
        assert_eq!(value(&a, "-accel"), "tcg,tb-size=64");
        assert_eq!(value(&a, "-cpu"), "max,-erms,-fsrm");
        assert_eq!(value(&a, "-smp"), "2");
        assert_eq!(value(&a, "-m"), "512M");
        assert_eq!(value(&a, "-name"), "guest=moat-abc,process=moat-abc");
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(a.iter().any(|x| x == flag), "{flag} missing");
        }
        assert_eq!(value(&a, "-display"), "none");
        assert_eq!(value(&a, "-kernel"), "/boot/vmlinuz");
        assert_eq!(value(&a, "-initrd"), "/cache/initrd.cpio");
        assert_eq!(value(&a, "-serial"), "chardev:console");
        let chardevs = values(&a, "-chardev");
        assert!(chardevs.contains(&"file,id=console,path=/run/x/console.log,append=on".to_string()), "{chardevs:?}");
        assert!(
            chardevs.contains(&"socket,id=agent,path=/run/x/sock/agent.sock,server=on,wait=off".to_string()),
            "{chardevs:?}"
        );
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-serial-device,max_ports=2".to_string()));
        assert!(devices.contains(&"virtserialport,chardev=agent,name=moat.agent".to_string()));
        assert!(devices.contains(&"virtio-blk-device,drive=root".to_string()));
        assert_eq!(devices.last().map(String::as_str), Some("virtio-scsi-device,id=vols"), "the volume bus comes last");
        assert_eq!(
            value(&a, "-drive"),
            "file=/run/x/root.qcow2,if=none,id=root,format=qcow2,discard=unmap,detect-zeroes=unmap,cache=writeback"
        );
        assert_eq!(value(&a, "-qmp"), "unix:/run/x/sock/qmp.sock,server=on,wait=off");
        assert_eq!(value(&a, "-pidfile"), "/run/x/qemu.pid");
        assert_eq!(value(&a, "-sandbox"), SECCOMP_POLICY);
        let append = value(&a, "-append");
        assert!(append.starts_with("console=ttyS0 reboot=t panic=-1"), "{append}");
        assert!(append.contains(" tsc_early_khz=2500000"), "{append}");
        assert!(append.ends_with(" moat.root=/dev/vda"), "caller's arguments come last: {append}");
    }

    #[test]
    fn ram_in_a_file_shared_or_private_and_incoming() {
        let c = VmConfig { memory: Some(Memory::Own("/run/x/mem".into())), ..cfg() };
        let a = args(&c, HOST);
        assert_eq!(value(&a, "-object"), "memory-backend-file,id=ram,size=512M,mem-path=/run/x/mem,share=on");
        assert_eq!(value(&a, "-machine"), "memory-backend=ram");
        assert!(!a.iter().any(|x| x == "-incoming"));
        let c = VmConfig { memory: Some(Memory::Snapshot("/s/a,b/mem".into())), incoming: true, ..cfg() };
        let a = args(&c, HOST);
        assert_eq!(value(&a, "-object"), "memory-backend-file,id=ram,size=512M,mem-path=/s/a,,b/mem,share=off");
        assert_eq!(value(&a, "-incoming"), "defer");
        assert!(a.iter().any(|x| x == "-S"));
        assert_eq!(value(&a, "-accel"), "tcg,tb-size=16", "a restore's smaller translation cache");
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(!a.iter().any(|x| x == flag), "a restore loads no kernel: {flag} in {a:?}");
        }
        assert!(!args(&cfg(), HOST).iter().any(|x| x == "-object"), "anonymous RAM by default");
    }

    #[test]
    fn without_a_root_disk_or_seccomp() {
        let c = VmConfig { root_disk: None, seccomp: false, cmdline: String::new(), ..cfg() };
        let a = args(&c, HOST);
        assert!(!a.iter().any(|x| x.contains("virtio-blk") || x == "-drive"), "{a:?}");
        assert!(values(&a, "-device").contains(&"virtio-scsi-device,id=vols".to_string()), "every VM can take volumes");
        assert!(!a.iter().any(|x| x == "-sandbox"));
        assert!(value(&a, "-append").ends_with("tsc_early_khz=2500000"));
    }

    #[test]
    fn kvm_keeps_the_pit_and_needs_no_tsc_hint() {
        let c = VmConfig { accel: Accel::Kvm, ..cfg() };
        let a = args(&c, HOST);
        assert_eq!(value(&a, "-accel"), "kvm");
        assert_eq!(value(&a, "-M"), "microvm,x-option-roms=off,isa-serial=on,rtc=on");
        assert!(!value(&a, "-append").contains("tsc_early_khz"));
    }

    #[test]
    fn tcg_without_a_known_tsc_keeps_the_pit_for_calibration() {
        let a = args(&cfg(), HostFacts { tsc_khz: None });
        assert_eq!(value(&a, "-M"), "microvm,x-option-roms=off,isa-serial=on,rtc=on");
        assert!(!value(&a, "-append").contains("tsc_early_khz"));
    }

    #[test]
    fn commas_in_paths_are_escaped_in_option_strings() {
        let c = VmConfig { run_dir: "/tmp/a,b".into(), root_disk: Some("/tmp/a,b/root.qcow2".into()), ..cfg() };
        let a = args(&c, HOST);
        assert_eq!(value(&a, "-qmp"), "unix:/tmp/a,,b/sock/qmp.sock,server=on,wait=off");
        assert!(value(&a, "-drive").starts_with("file=/tmp/a,,b/root.qcow2,if=none"));
    }

    #[test]
    fn the_host_tsc_is_measured_exactly_when_it_is_invariant() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo is readable");
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
        let invariant = ["constant_tsc", "nonstop_tsc"].iter().all(|f| flags.split_whitespace().any(|g| g == *f));
        match HostFacts::get().tsc_khz {
            Some(khz) => assert!(invariant && (100_000..10_000_000).contains(&khz), "{khz} kHz, flags: {flags}"),
            None => assert!(!invariant, "an invariant TSC was not measured (or measured out of range)"),
        }
    }
}
