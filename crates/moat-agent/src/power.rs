//! Ending the VM. QEMU runs with `-no-reboot`, so a reboot ends it; PID 1 itself must never exit
//! (that panics the kernel).

use std::time::{Duration, Instant};

/// How long to wait for killed processes to die before flushing the disk anyway.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Kill every process, flush and remount the root read-only, and reboot. Never returns.
pub fn power_off() -> ! {
    // SAFETY: kill(-1) signals every process except PID 1 itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let start = Instant::now();
    while start.elapsed() < KILL_GRACE {
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            break; // ECHILD: nothing left.
        }
        if pid == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    unmount_data();
    let root = c"/";
    // SAFETY: remount / read-only so ext4 is clean; pointers are valid or NULL as mount(2)
    // allows for a remount. Failure is harmless after sync.
    unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        );
    }
    reboot()
}

/// Unmount volumes and host directories (everything ext4 or FUSE but the root), deepest first,
/// so a volume is left clean and needs no journal replay on its next mount. Nothing is running
/// any more, so nothing holds them; a failure leaves the volume to its journal.
fn unmount_data() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (point, fstype) = (*f.get(1)?, *f.get(2)?);
            (point != "/" && (fstype == "ext4" || fstype.starts_with("fuse"))).then_some(point)
        })
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        // /proc/mounts escapes spaces and the like as octal; such paths are simply skipped.
        if let Ok(path) = std::ffi::CString::new(point) {
            // SAFETY: a NUL-terminated path; umount only detaches a file system.
            unsafe { libc::umount(path.as_ptr()) };
        }
    }
}

/// Reboot at once (the accelerator probe and fatal errors). Never returns.
pub fn reboot() -> ! {
    // SAFETY: reboot takes a plain command number.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Only reached when reboot failed (not PID 1 / no CAP_SYS_BOOT): wait to be killed.
    eprintln!("moat-agent: reboot failed: {}; waiting to be stopped", std::io::Error::last_os_error());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Report a fatal error on the console and end the VM. Never returns.
pub fn fatal(message: &dyn std::fmt::Display) -> ! {
    eprintln!("moat-agent: fatal: {message}");
    eprintln!("moat-agent: powering off");
    power_off()
}
