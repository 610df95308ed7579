//! The jail helper: the moat binary started as `moat __jail SPEC QEMU ARGS…`. Single-threaded
//! and short: it enters the namespaces, forks QEMU as PID 1 of the new PID namespace, builds its
//! root, drops privileges and execs QEMU; then it waits and exits as QEMU did.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::{Bind, Spec};

/// The helper's entry point: `moat __jail SPEC QEMU ARGS…` (without the program and
/// [`super::JAIL_ARG`]). Never returns. Errors go to stderr, which is QEMU's log.
pub fn main(args: Vec<OsString>) -> ! {
    let code = match helper(args) {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            125
        }
    };
    std::process::exit(code)
}

/// Say why the jail failed on stderr, which is QEMU's log: the daemon shows its tail.
fn report(e: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "moat jail: {e}");
}

fn helper(args: Vec<OsString>) -> Result<i32, String> {
    let mut args = args.into_iter();
    let spec = args.next().ok_or("no jail spec given")?;
    let spec: Spec = serde_json::from_slice(spec.as_bytes()).map_err(|e| format!("bad jail spec: {e}"))?;
    let qemu = args.next().ok_or("no program given")?;
    let argv: Vec<CString> = std::iter::once(qemu.clone())
        .chain(args)
        .map(|a| CString::new(a.into_vec()).map_err(|_| "an argument has a NUL byte".to_string()))
        .collect::<Result<_, _>>()?;
    let qemu = CString::new(qemu.into_vec()).map_err(|_| "the program has a NUL byte")?;
    let devnull = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| e.to_string())?;

    use rustix::thread::UnshareFlags as F;
    let mut flags = F::NEWNS | F::NEWPID | F::NEWIPC | F::NEWUTS | F::NEWNET;
    if spec.ids.is_none() {
        let (uid, gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
        rustix::thread::unshare(F::NEWUSER).map_err(|e| format!("cannot create a user namespace: {e}"))?;
        std::fs::write("/proc/self/setgroups", "deny").map_err(|e| format!("cannot deny setgroups: {e}"))?;
        std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))
            .map_err(|e| format!("cannot map the uid: {e}"))?;
        std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
            .map_err(|e| format!("cannot map the gid: {e}"))?;
        flags -= F::NEWUSER;
    }
    rustix::thread::unshare(flags).map_err(|e| format!("cannot create the namespaces: {e}"))?;
    // SAFETY: this process is single-threaded (the helper starts no threads), so the child may
    // do anything the parent could.
    match unsafe { libc::fork() } {
        -1 => Err(format!("cannot fork: {}", std::io::Error::last_os_error())),
        0 => {
            report(&child(&spec, &qemu, &argv, &devnull));
            // SAFETY: _exit is always safe; nothing of the parent's must be flushed here.
            unsafe { libc::_exit(125) }
        }
        pid => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{pid}").and_then(|_| out.flush()).map_err(|e| format!("cannot report the pid: {e}"))?;
            drop(out);
            // The daemon reads one line; nothing else of ours goes there.
            let _ = rustix::stdio::dup2_stdout(&devnull);
            Ok(wait_for(pid))
        }
    }
}

/// Wait for QEMU and exit as it did: with its code, or by the signal that ended it.
fn wait_for(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 125;
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: resetting a disposition and raising a signal at ourselves.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return 128 + sig;
    }
    libc::WEXITSTATUS(status)
}

/// In the new namespaces, as PID 1: build the root, drop privileges, exec QEMU. Returns only on
/// failure.
fn child(spec: &Spec, qemu: &CString, argv: &[CString], devnull: &std::fs::File) -> String {
    match build_and_exec(spec, qemu, argv, devnull) {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

fn build_and_exec(
    spec: &Spec,
    qemu: &CString,
    argv: &[CString],
    devnull: &std::fs::File,
) -> Result<std::convert::Infallible, String> {
    use rustix::mount::{MountFlags as M, MountPropagationFlags as P};
    // SAFETY: prctl with these arguments only sets a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } < 0 {
        return Err(format!("cannot tie QEMU to its parent: {}", std::io::Error::last_os_error()));
    }
    let err = |what: &str, path: &Path| {
        let path = path.display().to_string();
        let what = what.to_string();
        move |e: rustix::io::Errno| format!("cannot {what} {path}: {e}")
    };
    // The jail's directories must be enterable by QEMU's uid (the daemon's umask is 077); what
    // QEMU itself creates is private again.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    rustix::mount::mount_change("/", P::REC | P::PRIVATE).map_err(err("make private", Path::new("/")))?;
    let root = &spec.root;
    rustix::mount::mount("tmpfs", root, "tmpfs", M::NOSUID | M::NODEV, "mode=0755,size=1m")
        .map_err(err("mount the jail's root on", root))?;
    for bind in &spec.binds {
        bind_into(root, bind)?;
    }
    for (link, target) in &spec.links {
        let at = inside(root, link);
        std::os::unix::fs::symlink(target, &at).map_err(|e| format!("cannot link {}: {e}", at.display()))?;
    }
    rustix::system::sethostname(spec.hostname.as_bytes()).map_err(err("set the hostname", Path::new("")))?;
    rustix::process::chdir(root).map_err(err("enter", root))?;
    // The old root ends up stacked under the new one, and is detached at once.
    rustix::process::pivot_root(".", ".").map_err(err("pivot into", root))?;
    rustix::mount::unmount(".", rustix::mount::UnmountFlags::DETACH).map_err(err("detach the old root", root))?;
    rustix::process::chdir("/").map_err(err("enter", Path::new("/")))?;
    rustix::mount::mount_remount("/", M::BIND | M::RDONLY | M::NOSUID | M::NODEV, "")
        .map_err(err("make read-only", Path::new("/")))?;
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if let Some((uid, gid, shared)) = spec.ids {
        drop_to(uid, gid, shared)?;
    }
    // SAFETY: prctl with these arguments only sets a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(format!("cannot set no_new_privs: {}", std::io::Error::last_os_error()));
    }
    rustix::stdio::dup2_stdin(devnull).map_err(|e| format!("cannot redirect stdin: {e}"))?;
    rustix::stdio::dup2_stdout(devnull).map_err(|e| format!("cannot redirect stdout: {e}"))?;
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // Nothing of the helper's but stdio goes to QEMU.
    // SAFETY: close_range only closes descriptors.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // SAFETY: `ptrs` is a NULL-terminated array of pointers into `argv`, which outlives the call.
    unsafe { libc::execv(qemu.as_ptr(), ptrs.as_ptr()) };
    Err(format!("cannot run {}: {}", qemu.to_string_lossy(), std::io::Error::last_os_error()))
}

/// `path` inside the jail's root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Bind the host's `bind.path` at the same path in the jail. The source is opened without
/// following a final symbolic link and bound through its descriptor, so what is checked is what
/// is bound.
fn bind_into(root: &Path, bind: &Bind) -> Result<(), String> {
    use rustix::fs::{FileType, Mode, OFlags};
    use rustix::mount::MountFlags as M;
    let path = &bind.path;
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("cannot {what} {}: {e}", path.display());
    let src: OwnedFd = rustix::fs::open(path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| fail("open", &e))?;
    let stat = rustix::fs::fstat(&src).map_err(|e| fail("inspect", &e))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    let target = inside(root, path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail("make the parent of", &e))?;
    }
    match kind {
        FileType::Directory => std::fs::create_dir(&target).map_err(|e| fail("make the mount point of", &e))?,
        FileType::RegularFile | FileType::CharacterDevice => {
            std::fs::File::create(&target).map_err(|e| fail("make the mount point of", &e))?;
        }
        other => return Err(fail("bind", &format!("it is a {other:?}"))),
    }
    let source = format!("/proc/self/fd/{}", src.as_raw_fd());
    rustix::mount::mount_recursive_bind(source.as_str(), &target).map_err(|e| fail("bind", &e))?;
    // Keep what the host's mount already enforces (a user namespace may not clear it), and add
    // read-only, nosuid and (but for device nodes) nodev.
    let host = rustix::fs::fstatvfs(&src).map_err(|e| fail("inspect the mount of", &e))?;
    let mut flags = M::BIND | M::NOSUID;
    use rustix::fs::StatVfsMountFlags as V;
    let keep = [(V::RDONLY, M::RDONLY), (V::NODEV, M::NODEV), (V::NOEXEC, M::NOEXEC), (V::NOATIME, M::NOATIME)];
    for (vfs, mount) in keep {
        if host.f_flag.contains(vfs) {
            flags |= mount;
        }
    }
    if !bind.writable {
        flags |= M::RDONLY;
    }
    if kind != FileType::CharacterDevice {
        flags |= M::NODEV;
    }
    rustix::mount::mount_remount(&target, flags, "").map_err(|e| fail("restrict the bind of", &e))?;
    Ok(())
}

/// Become `uid`/`gid` with only the `shared` group, keeping no capability.
fn drop_to(uid: u32, gid: u32, shared: u32) -> Result<(), String> {
    let os = || std::io::Error::last_os_error();
    // SAFETY: plain system calls on this (single-threaded) process's credentials.
    unsafe {
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        if libc::setgroups(1, &shared) < 0 {
            return Err(format!("cannot set the groups: {}", os()));
        }
        if libc::setresgid(gid, gid, gid) < 0 {
            return Err(format!("cannot become gid {gid}: {}", os()));
        }
        if libc::setresuid(uid, uid, uid) < 0 {
            return Err(format!("cannot become uid {uid}: {}", os()));
        }
        if libc::geteuid() != uid || libc::setuid(0) == 0 {
            return Err("the uid change did not hold".into());
        }
    }
    Ok(())
}
