//! The QEMU command line for a microvm sandbox.

use std::ffi::OsString;
use std::path::PathBuf;

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
    /// Holds `qmp.sock`, `agent.sock`, `console.log`, `qemu.pid`.
    pub run_dir: PathBuf,
    /// Enable QEMU's seccomp sandbox.
    pub seccomp: bool,
    /// Sandbox name; the QEMU process is called `moat-<name>` so `ps` and gc can recognise it.
    pub name: String,
}

/// Kernel arguments every sandbox gets. `reboot=t` + `-no-reboot` turns a guest reboot or panic
/// into QEMU exiting; the rest trims probing of hardware microvm does not have.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet loglevel=4 rdinit=/init \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 tsc=reliable no_timer_check \
    random.trust_cpu=on";

impl VmConfig {
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }
}

/// The full argv (without the program) for QEMU.
pub fn command_line(cfg: &VmConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(OsString::from));
    let p = |path: &PathBuf| path.to_string_lossy().into_owned();

    push(&["-name", &format!("guest=moat-{0},process=moat-{0}", cfg.name)]);
    push(&["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,pic=off"]);
    match cfg.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "max"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none"]);
    push(&["-smp", &cfg.vcpus.to_string(), "-m", &format!("{}M", cfg.memory_mib)]);
    push(&["-kernel", &p(&cfg.kernel), "-initrd", &p(&cfg.initrd)]);
    let cmdline = if cfg.cmdline.is_empty() { BASE_CMDLINE.to_string() } else { format!("{BASE_CMDLINE} {}", cfg.cmdline) };
    push(&["-append", &cmdline]);
    push(&["-chardev", &format!("file,id=console,path={}", p(&cfg.console_log())), "-serial", "chardev:console"]);
    push(&["-device", "virtio-serial-device,max_ports=2"]);
    push(&["-chardev", &format!("socket,id=agent,path={},server=on,wait=off", p(&cfg.agent_socket()))]);
    push(&["-device", "virtserialport,chardev=agent,name=moat.agent"]);
    if let Some(disk) = &cfg.root_disk {
        push(&[
            "-drive",
            &format!("file={},if=none,id=root,format=qcow2,discard=unmap,detect-zeroes=unmap,cache=writeback", p(disk)),
        ]);
        push(&["-device", "virtio-blk-device,drive=root"]);
    }
    push(&["-qmp", &format!("unix:{},server=on,wait=off", p(&cfg.qmp_socket()))]);
    push(&["-pidfile", &p(&cfg.pid_file())]);
    if cfg.seccomp {
        push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
    }

    fn joined(c: &VmConfig) -> String {
        command_line(c).iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn microvm_with_disk_agent_port_and_seccomp() {
        let s = joined(&cfg());
        assert!(s.contains("-M microvm,"));
        assert!(s.contains("-accel tcg"));
        assert!(s.contains("-smp 2 -m 512M"));
        assert!(s.contains("process=moat-abc"));
        assert!(s.contains("virtserialport,chardev=agent,name=moat.agent"));
        assert!(s.contains("socket,id=agent,path=/run/x/agent.sock,server=on,wait=off"));
        assert!(s.contains("file=/run/x/root.qcow2,if=none"));
        assert!(s.contains("virtio-blk-device,drive=root"));
        assert!(s.contains("-qmp unix:/run/x/qmp.sock"));
        assert!(s.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"));
        assert!(s.contains("-no-reboot"));
        let append = command_line(&cfg()).windows(2).find(|w| w[0] == "-append").map(|w| w[1].clone()).unwrap();
        let append = append.to_string_lossy();
        assert!(append.starts_with("console=ttyS0 reboot=t panic=-1"));
        assert!(append.ends_with(" moat.root=/dev/vda"));
    }

    #[test]
    fn no_disk_and_no_seccomp_and_kvm() {
        let c = VmConfig { root_disk: None, seccomp: false, accel: Accel::Kvm, ..cfg() };
        let s = joined(&c);
        assert!(!s.contains("virtio-blk"));
        assert!(!s.contains("-sandbox"));
        assert!(s.contains("-accel kvm"));
    }
}
