//! Recognising a sandbox's QEMU among the host's processes, from its command line alone.
//!
//! A restarted daemon knows a sandbox's QEMU only by the pid an earlier daemon recorded, and pids
//! are reused. Before moat signals or adopts a pid it checks that the process is QEMU started
//! for that very sandbox: its `-pidfile` is the sandbox's pidfile and its `-name` carries the
//! sandbox's name, both exactly as [`command_line_for`](crate::command_line_for) writes them.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::command::{name_option, VmConfig};

/// The file QEMU writes its pid to, inside a sandbox's run directory.
const PID_FILE_NAME: &str = "qemu.pid";

/// `Ok` when process `pid` is the QEMU that [`Vm::spawn`](crate::Vm::spawn) starts for `cfg`;
/// otherwise why not (it has exited, it is another program, another sandbox's QEMU...).
/// Reads `/proc/<pid>/cmdline` and nothing else; never signals the process.
pub fn is_our_qemu(pid: u32, cfg: &VmConfig) -> Result<(), String> {
    let cmdline = read_cmdline(pid)?;
    check_cmdline(&cmdline, cfg)
}

/// QEMUs whose `-pidfile` is `<run_root>/<dir>/qemu.pid`, as `(pid, <run_root>/<dir>)`. This is
/// how gc finds QEMUs that no daemon owns any more; verify each with [`is_our_qemu`] before
/// signalling it, as the process may exit and its pid be reused in between.
pub fn find_qemus_under(run_root: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, run_dir_under(&cmdline, run_root)?))
        })
        .collect();
    found.sort();
    found
}

fn read_cmdline(pid: u32) -> Result<Vec<u8>, String> {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) if c.is_empty() => Err(format!(
            "process {pid} has an empty command line (it has exited, is a kernel thread, or is in the middle of exec)"
        )),
        Ok(c) => Ok(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("process {pid} does not exist")),
        Err(e) => Err(format!("cannot read /proc/{pid}/cmdline: {e}")),
    }
}

/// The arguments of a NUL-separated `/proc/<pid>/cmdline`.
fn argv(cmdline: &[u8]) -> Vec<&[u8]> {
    let body = cmdline.strip_suffix(b"\0").unwrap_or(cmdline);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|b| *b == 0).collect()
}

fn is_qemu_system(argv0: &[u8]) -> bool {
    Path::new(OsStr::from_bytes(argv0)).file_name().is_some_and(|n| n.as_bytes().starts_with(b"qemu-system"))
}

/// The values following each occurrence of `flag`.
fn values_of<'a>(args: &[&'a [u8]], flag: &str) -> Vec<&'a [u8]> {
    args.windows(2).filter(|w| w[0] == flag.as_bytes()).map(|w| w[1]).collect()
}

/// The one value of `flag`, which our command line passes exactly once.
fn single_value<'a>(args: &[&'a [u8]], flag: &str) -> Result<&'a [u8], String> {
    match values_of(args, flag).as_slice() {
        [v] => Ok(v),
        [] => Err(format!("it has no {flag} argument")),
        more => Err(format!("it has {} {flag} arguments, moat passes one", more.len())),
    }
}

/// [`is_our_qemu`] on the raw contents of `/proc/<pid>/cmdline`.
pub(crate) fn check_cmdline(cmdline: &[u8], cfg: &VmConfig) -> Result<(), String> {
    let args = argv(cmdline);
    let Some(argv0) = args.first() else { return Err("its command line is empty".into()) };
    if !is_qemu_system(argv0) {
        return Err(format!("it runs {:?}, not qemu-system-*", String::from_utf8_lossy(argv0)));
    }
    let pid_file = cfg.pid_file();
    let want_pid_file = pid_file.to_string_lossy();
    let pid_file_arg = single_value(&args, "-pidfile")?;
    if pid_file_arg != want_pid_file.as_bytes() {
        return Err(format!(
            "its -pidfile is {:?}, not {want_pid_file:?} (it belongs to another sandbox or moat home)",
            String::from_utf8_lossy(pid_file_arg)
        ));
    }
    let want_name = name_option(cfg);
    let name_arg = single_value(&args, "-name")?;
    if name_arg != want_name.as_bytes() {
        return Err(format!("its -name is {:?}, not {want_name:?}", String::from_utf8_lossy(name_arg)));
    }
    Ok(())
}

/// `<run_root>/<dir>` when `cmdline` is a QEMU whose `-pidfile` is `<run_root>/<dir>/qemu.pid`.
fn run_dir_under(cmdline: &[u8], run_root: &Path) -> Option<PathBuf> {
    let args = argv(cmdline);
    if !is_qemu_system(args.first()?) {
        return None;
    }
    let pid_file = Path::new(OsStr::from_bytes(single_value(&args, "-pidfile").ok()?));
    if pid_file.file_name()? != PID_FILE_NAME {
        return None;
    }
    let run_dir = pid_file.parent()?;
    (run_dir.parent()? == run_root && run_dir.file_name().is_some()).then(|| run_dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{command_line_for, Accel, HostFacts};

    fn cfg(run_dir: &str, name: &str) -> VmConfig {
        VmConfig {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mib: 256,
            kernel: "/boot/vmlinuz".into(),
            initrd: "/cache/initrd.cpio".into(),
            cmdline: String::new(),
            root_disk: Some(format!("{run_dir}/root.qcow2").into()),
            run_dir: run_dir.into(),
            seccomp: true,
            name: name.into(),
            memory: None,
            incoming: false,
            nic: false,
            jail: None,
            cgroups: None,
        }
    }

    /// `/proc/<pid>/cmdline` of the QEMU moat starts for `c`.
    fn proc_cmdline(argv0: &str, c: &VmConfig) -> Vec<u8> {
        let mut out = argv0.as_bytes().to_vec();
        out.push(0);
        for a in command_line_for(c, HostFacts { tsc_khz: Some(2_500_000) }) {
            out.extend_from_slice(a.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn our_own_command_line_is_recognised() {
        let c = cfg("/home/u/.moat/run/sb-1", "sb-1");
        assert_eq!(check_cmdline(&proc_cmdline("/usr/bin/qemu-system-x86_64", &c), &c), Ok(()));
        assert_eq!(check_cmdline(&proc_cmdline("qemu-system-x86_64", &c), &c), Ok(()), "argv0 from PATH");
    }

    #[test]
    fn another_sandboxs_qemu_is_refused() {
        let ours = cfg("/home/u/.moat/run/sb-1", "sb-1");
        let other_dir = cfg("/home/u/.moat/run/sb-2", "sb-1");
        let err = check_cmdline(&proc_cmdline("/usr/bin/qemu-system-x86_64", &other_dir), &ours).unwrap_err();
        assert!(err.contains("-pidfile") && err.contains("sb-2/qemu.pid"), "{err}");
        let other_name = cfg("/home/u/.moat/run/sb-1", "sb-10");
        let err = check_cmdline(&proc_cmdline("/usr/bin/qemu-system-x86_64", &other_name), &ours).unwrap_err();
        assert!(err.contains("-name") && err.contains("moat-sb-10"), "{err}");
    }

    #[test]
    fn a_process_that_is_not_qemu_is_refused_even_with_our_arguments() {
        let c = cfg("/run/sb", "sb");
        let err = check_cmdline(&proc_cmdline("/usr/bin/python3", &c), &c).unwrap_err();
        assert!(err.contains("python3") && err.contains("not qemu-system"), "{err}");
        let err = check_cmdline(&proc_cmdline("/tmp/qemu-system-x86_64/evil", &c), &c).unwrap_err();
        assert!(err.contains("not qemu-system"), "the file name counts, not a directory: {err}");
        assert!(check_cmdline(b"sleep\x0030\x00", &c).unwrap_err().contains("not qemu-system"));
        assert!(check_cmdline(b"", &c).unwrap_err().contains("empty"));
    }

    #[test]
    fn a_qemu_with_missing_or_repeated_options_is_refused() {
        let c = cfg("/run/sb", "sb");
        let no_pidfile = b"/usr/bin/qemu-system-x86_64\0-name\0guest=moat-sb,process=moat-sb\0";
        assert!(check_cmdline(no_pidfile, &c).unwrap_err().contains("no -pidfile"));
        let no_name = b"/usr/bin/qemu-system-x86_64\0-pidfile\0/run/sb/qemu.pid\0";
        assert!(check_cmdline(no_name, &c).unwrap_err().contains("no -name"));
        let twice = b"qemu-system-x86_64\0-pidfile\0/run/sb/qemu.pid\0-pidfile\0/run/sb/qemu.pid\0-name\0x\0";
        assert!(check_cmdline(twice, &c).unwrap_err().contains("2 -pidfile"));
        // A dangling flag at the very end has no value.
        let dangling = b"qemu-system-x86_64\0-name\0guest=moat-sb,process=moat-sb\0-pidfile\0";
        assert!(check_cmdline(dangling, &c).unwrap_err().contains("no -pidfile"));
    }

    #[test]
    fn qemus_are_found_by_their_pidfile_under_the_run_root() {
        let root = Path::new("/home/u/.moat/run");
        let qemu = proc_cmdline("/usr/bin/qemu-system-x86_64", &cfg("/home/u/.moat/run/sb-1", "sb-1"));
        assert_eq!(run_dir_under(&qemu, root), Some(PathBuf::from("/home/u/.moat/run/sb-1")));
        assert_eq!(
            run_dir_under(&qemu, Path::new("/home/u/.moat/run/")),
            Some(PathBuf::from("/home/u/.moat/run/sb-1"))
        );
        assert_eq!(run_dir_under(&qemu, Path::new("/home/u/.moat")), None, "only direct children of the root");
        let elsewhere = proc_cmdline("/usr/bin/qemu-system-x86_64", &cfg("/srv/other/sb-1", "sb-1"));
        assert_eq!(run_dir_under(&elsewhere, root), None);
        let not_qemu = proc_cmdline("/bin/sleep", &cfg("/home/u/.moat/run/sb-1", "sb-1"));
        assert_eq!(run_dir_under(&not_qemu, root), None);
        let other_file = b"qemu-system-x86_64\0-pidfile\0/home/u/.moat/run/sb-1/other.pid\0";
        assert_eq!(run_dir_under(other_file, root), None);
    }

    #[test]
    fn a_pid_that_does_not_exist_is_not_ours() {
        let err = is_our_qemu(u32::MAX - 1, &cfg("/run/sb", "sb")).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        assert_eq!(find_qemus_under(Path::new("/nonexistent/moat/run")), Vec::new());
    }
}
