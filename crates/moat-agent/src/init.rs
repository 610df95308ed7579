//! PID 1 duties before serving: file systems, kernel modules, the root switch, hostname, loopback.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cmdline::Cmdline;

/// A failed init step; the agent reports it on the console and powers off.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct InitError {
    pub step: String,
    pub reason: String,
}

fn err(step: impl Into<String>, reason: impl ToString) -> InitError {
    InitError { step: step.into(), reason: reason.to_string() }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("paths and options used by init contain no NUL")
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<(), InitError> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(err(format!("mounting {fstype} on {target}"), e));
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
    mount("devpts", &format!("{root}/dev/pts"), "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "mode=0620,ptmxmode=0666")?;
    mount("tmpfs", &format!("{root}/dev/shm"), "tmpfs", nosuid_nodev, "mode=1777")?;
    mount("tmpfs", &format!("{root}/tmp"), "tmpfs", nosuid_nodev, "mode=1777")?;
    mount("tmpfs", &format!("{root}/run"), "tmpfs", nosuid_nodev, "mode=0755")?;
    Ok(())
}

/// Load the modules listed in /moat/modules, with `MOD.param=` options from the command line.
fn load_modules(cmdline: &Cmdline) -> Result<(), InitError> {
    let list = std::fs::read_to_string("/moat/modules").unwrap_or_default();
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or(path)
            .replace('-', "_");
        let file = std::fs::File::open(path).map_err(|e| err(format!("opening module {path}"), e))?;
        let params = cstr(&cmdline.module_params(&name));
        // SAFETY: finit_module with an open fd and a valid NUL-terminated parameter string.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(err(format!("loading module {name}"), e));
            }
        }
    }
    Ok(())
}

fn wait_for(path: &str, timeout: Duration) -> Result<(), InitError> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > timeout {
            return Err(err(format!("waiting for {path}"), format!("it did not appear within {}s", timeout.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Mount the root disk and make it `/`.
fn switch_root(device: &str) -> Result<(), InitError> {
    wait_for(device, Duration::from_secs(10))?;
    mount(device, "/newroot", "ext4", 0, "")?;
    mount_api_filesystems("/newroot")?;
    std::env::set_current_dir("/newroot").map_err(|e| err("entering /newroot", e))?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = cstr(".");
    // SAFETY: chroot with a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(err("chroot into the root disk", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| err("entering /", e))?;
    Ok(())
}

fn set_hostname(name: &str) {
    if let Err(e) = rustix::system::sethostname(name.as_bytes()) {
        eprintln!("moat-agent: setting the hostname failed: {e}");
    }
}

/// Bring up `lo`; the kernel gives it 127.0.0.1 itself.
fn loopback_up() {
    // SAFETY: a plain socket call; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return;
    }
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own; the union member used
    // for flags is ifru_flags.
    unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &mut req);
        }
        libc::close(sock);
    }
}

/// Flush file systems and end the VM (QEMU runs with -no-reboot, so a reboot ends it).
pub fn power_off() -> ! {
    // SAFETY: kill(-1) signals every process but PID 1 itself; sync and reboot take no pointers.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    let root = cstr("/");
    // SAFETY: remount read-only so ext4 is clean; failure is harmless after sync.
    unsafe {
        libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), libc::MS_REMOUNT | libc::MS_RDONLY, std::ptr::null());
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on failure; PID 1 must not exit, so wait for QEMU to be killed.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Everything PID 1 does before it serves the link. Returns the command line.
pub fn boot() -> Result<Cmdline, InitError> {
    mount_api_filesystems("")?;
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if cmdline.get("moat.probe") == Some("1") {
        eprintln!("{}", PROBE_MARKER);
        power_off();
    }
    load_modules(&cmdline)?;
    if let Some(root) = cmdline.get("moat.root") {
        switch_root(root)?;
    }
    set_hostname(cmdline.get("moat.hostname").unwrap_or("moat"));
    loopback_up();
    Ok(cmdline)
}

/// What the accelerator probe looks for on the console (moat-vmm's `PROBE_MARKER`).
const PROBE_MARKER: &str = "moat: probe ok";
