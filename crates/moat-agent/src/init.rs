//! PID 1 duties before serving: console, file systems, kernel modules, the root switch, hostname
//! and loopback.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cmdline::Cmdline;
use crate::modules::{self, ModuleError};
use crate::power;

/// Where the initramfs lists the modules to load, in order.
pub const MODULE_LIST: &str = "/moat/modules";
/// Where it lists the modules loaded on first use, by group ([`modules::load_group`]).
pub const LATER_MODULE_LIST: &str = "/moat/modules.later";

/// How long to wait for the root disk's device node after the modules are loaded.
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// What the accelerator probe looks for on the console (moat-vmm's `PROBE_MARKER`).
pub const PROBE_MARKER: &str = "moat: probe ok";

/// A failed init step; the agent reports it on the console and powers off.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {fstype} on {target} failed: {reason}")]
    Mount { fstype: String, target: String, reason: std::io::Error },
    #[error("the root disk {device} did not appear within {}s; loaded modules: {modules}{}", ROOT_WAIT.as_secs(), failed_modules(.failed))]
    NoRootDevice { device: String, modules: String, failed: Vec<String> },
    #[error("switching into the root disk failed at {step}: {reason}")]
    SwitchRoot { step: &'static str, reason: std::io::Error },
    #[error("the kernel command line or a path holds a NUL byte: {0:?}")]
    Nul(String),
}

fn failed_modules(failed: &[String]) -> String {
    if failed.is_empty() {
        String::new()
    } else {
        format!("; failed modules: {}", failed.join("; "))
    }
}

/// What boot found out, for the serving part.
#[derive(Debug)]
pub struct Booted {
    pub cmdline: Cmdline,
    /// Modules that failed to load, to name when the port never appears.
    pub module_errors: Vec<ModuleError>,
}

fn cstr(s: &str) -> Result<CString, InitError> {
    CString::new(s).map_err(|_| InitError::Nul(s.into()))
}

/// True when `path` is the root of a mount (its device differs from its parent's).
fn is_mount_point(path: &str) -> bool {
    let (Ok(me), Ok(parent)) = (std::fs::metadata(path), std::fs::metadata(Path::new(path).join(".."))) else {
        return false;
    };
    me.dev() != parent.dev() || me.ino() == parent.ino()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<(), InitError> {
    let failed = |source| InitError::Mount { fstype: fstype.into(), target: target.into(), reason: source };
    if is_mount_point(target) {
        return Ok(()); // Already mounted (by the kernel or an earlier attempt).
    }
    std::fs::create_dir_all(target).map_err(failed)?;
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(failed(e));
        }
    }
    Ok(())
}

/// The pseudo file systems every process expects, under `root` ("" for /).
fn mount_api_filesystems(root: &str) -> Result<(), InitError> {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount("proc", &format!("{root}/proc"), "proc", nosuid_nodev | libc::MS_NOEXEC, "")?;
    mount("sysfs", &format!("{root}/sys"), "sysfs", nosuid_nodev | libc::MS_NOEXEC, "")?;
    mount("devtmpfs", &format!("{root}/dev"), "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount(
        "devpts",
        &format!("{root}/dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=0620,ptmxmode=0666",
    )?;
    mount("tmpfs", &format!("{root}/dev/shm"), "tmpfs", nosuid_nodev, "mode=1777")?;
    mount("tmpfs", &format!("{root}/tmp"), "tmpfs", nosuid_nodev, "mode=1777")?;
    mount("tmpfs", &format!("{root}/run"), "tmpfs", nosuid_nodev, "mode=0755")?;
    dev_links(&format!("{root}/dev"));
    Ok(())
}

/// The /dev symlinks udev would make: ptmx (when devtmpfs has no node), fd and the std streams.
fn dev_links(dev: &str) {
    let links = [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    for (target, name) in links {
        let path = Path::new(dev).join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            let _ = std::os::unix::fs::symlink(target, &path);
        }
    }
}

/// Make fds 0, 1 and 2 the console. Without a /dev/console in the initramfs the kernel starts
/// init with them closed, and the first files opened would take their numbers.
fn attach_console() {
    // SAFETY: fcntl(F_GETFD) only queries whether the descriptors are open.
    let all_open = (0..3).all(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    if all_open {
        return;
    }
    let console = c"/dev/console";
    // SAFETY: open with a valid path; the fd is dup'ed onto 0..2 below and closed if it is above.
    let fd = unsafe { libc::open(console.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        // SAFETY: fcntl/dup2 on descriptors we own; an open one is left alone.
        unsafe {
            if target != fd && libc::fcntl(target, libc::F_GETFD) < 0 {
                libc::dup2(fd, target);
            }
        }
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer needed.
        unsafe { libc::close(fd) };
    }
}

fn wait_for_node(path: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Mount the root disk and make it `/` (switch_root without deleting the initramfs).
fn switch_root(device: &str, module_errors: &[ModuleError]) -> Result<(), InitError> {
    if !wait_for_node(device, ROOT_WAIT) {
        let modules = std::fs::read_to_string("/proc/modules")
            .map(|m| m.lines().filter_map(|l| l.split(' ').next()).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        return Err(InitError::NoRootDevice {
            device: device.into(),
            modules,
            failed: module_errors.iter().map(ToString::to_string).collect(),
        });
    }
    mount(device, "/newroot", "ext4", 0, "")?;
    mount_api_filesystems("/newroot")?;
    let step = |step: &'static str| move |source| InitError::SwitchRoot { step, reason: source };
    std::env::set_current_dir("/newroot").map_err(step("chdir /newroot"))?;
    let (dot, slash) = (c".", c"/");
    // SAFETY: mount(MS_MOVE) and chroot with valid NUL-terminated paths.
    unsafe {
        if libc::mount(dot.as_ptr(), slash.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) != 0 {
            return Err(step("moving the root mount")(std::io::Error::last_os_error()));
        }
        if libc::chroot(dot.as_ptr()) != 0 {
            return Err(step("chroot")(std::io::Error::last_os_error()));
        }
    }
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Take on a sandbox's identity: the kernel hostname, and `/etc/hostname` and `/etc/machine-id`
/// where the image has them (an image without them is left as it is).
pub fn apply_identity(identity: &moat_proto::Identity) {
    if let Err(e) = identity.check() {
        eprintln!("moat-agent: ignoring the host's identity: {e}");
        return;
    }
    set_hostname(&identity.hostname);
    for (path, content) in [("/etc/hostname", &identity.hostname), ("/etc/machine-id", &identity.machine_id)] {
        if std::path::Path::new(path).is_file() {
            if let Err(e) = std::fs::write(path, format!("{content}\n")) {
                eprintln!("moat-agent: writing {path} failed: {e}");
            }
        }
    }
}

fn set_hostname(name: &str) {
    if let Err(e) = rustix::system::sethostname(name.as_bytes()) {
        eprintln!("moat-agent: setting the hostname to {name:?} failed: {e}");
    }
}

/// Everything PID 1 does before it serves the link. The accelerator probe never returns from here.
pub fn boot() -> Result<Booted, InitError> {
    // /dev first, so the console can be attached before anything else opens a file.
    let _ = mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    attach_console();
    mount_api_filesystems("")?;
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if cmdline.get("moat.probe") == Some("1") {
        probe_ok();
    }
    let list = std::fs::read_to_string(MODULE_LIST).unwrap_or_default();
    let module_errors = modules::load_all(&list, &cmdline);
    for e in &module_errors {
        eprintln!("moat-agent: {e}");
    }
    // Before the root switch hides the initramfs.
    let later = std::fs::read_to_string(LATER_MODULE_LIST).unwrap_or_default();
    for e in modules::keep_later(&later, &cmdline) {
        eprintln!("moat-agent: {e}");
    }
    if let Some(root) = cmdline.get("moat.root") {
        switch_root(root, &module_errors)?;
    }
    set_hostname(cmdline.get("moat.hostname").unwrap_or("moat"));
    if let Err(e) = crate::netif::loopback_up() {
        eprintln!("moat-agent: bringing up the loopback interface failed: {e}");
    }
    if crate::netif::has_nic() {
        if let Err(e) = crate::netif::eth0_up() {
            eprintln!("moat-agent: configuring eth0 failed: {e}");
        }
    }
    Ok(Booted { cmdline, module_errors })
}

/// The accelerator probe: say so on the console and end the VM at once.
fn probe_ok() -> ! {
    use std::io::Write;
    let line = format!("{PROBE_MARKER}\n");
    let written =
        std::fs::OpenOptions::new().write(true).open("/dev/console").and_then(|mut c| c.write_all(line.as_bytes()));
    if written.is_err() {
        eprint!("{line}");
    }
    power::reboot()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_recognised() {
        assert!(is_mount_point("/"));
        assert!(is_mount_point("/proc"));
        let dir = std::env::temp_dir().join(format!("moat-agent-mp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!is_mount_point(dir.to_str().unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn init_errors_read_as_sentences() {
        let e = InitError::NoRootDevice {
            device: "/dev/vda".into(),
            modules: "virtio_mmio".into(),
            failed: vec!["x failed".into()],
        };
        assert_eq!(
            e.to_string(),
            "the root disk /dev/vda did not appear within 10s; loaded modules: virtio_mmio; failed modules: x failed"
        );
    }
}
