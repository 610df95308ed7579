//! Drives QEMU's `microvm` machine: the command line, QMP, the accelerator probe and the
//! supervised QEMU process.

mod accel;
mod command;
mod console;
mod exit;
mod identity;
mod qmp;
mod vm;

use std::path::{Path, PathBuf};

pub use accel::{
    choose_accel, Accel, AccelChoice, AccelChoiceError, AccelDecision, DEFAULT_PROBE_TIMEOUT, PROBE_MARKER,
};
pub use command::{
    command_line, command_line_for, run_files, HostFacts, Memory, VmConfig, BASE_CMDLINE, SECCOMP_POLICY,
};
pub use console::{rotated_path as rotated_console_log, CONSOLE_LOG_CAP};
pub use exit::{Exit, ExitWatcher};
pub use identity::{find_qemus_under, is_our_qemu};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use vm::Vm;

/// Errors of the VMM layer. Messages are sentences that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("QEMU was not found: {0}\nhint: install it with `apt-get install qemu-system-x86`, or point MOAT_QEMU at qemu-system-x86_64")]
    QemuMissing(String),
    #[error("cannot run {qemu}: {reason}\nhint: check that it is qemu-system-x86_64 and runs (`{qemu} --version`)")]
    QemuBroken { qemu: String, reason: String },
    #[error("QEMU exited before the VM started ({status}): {stderr}")]
    QemuExited { status: String, stderr: String },
    #[error("cannot start QEMU: {0}")]
    Spawn(std::io::Error),
    #[error(
        "socket path {0} is too long for a unix socket (limit 107 bytes)\nhint: set MOAT_HOME to a shorter directory"
    )]
    PathTooLong(String),
    #[error("QEMU did not answer on its QMP socket within {0}s; it is killed\nhint: the host may be overloaded, see qemu.log in the run directory")]
    QmpTimeout(u64),
    #[error("the VM is not running (QEMU has exited or was stopped)")]
    NotRunning,
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("process {pid} is not this sandbox's QEMU: {reason}; it was left alone\nhint: the VM has probably exited and its pid was reused; treat the sandbox as stopped")]
    NotOurProcess { pid: u32, reason: String },
    #[error("QEMU {pid} is running but did not answer on its QMP socket {}: {reason}\nhint: the VM may be hung, or another process holds its QMP connection", socket.display())]
    AdoptQmp { pid: u32, socket: PathBuf, reason: String },
    #[error("{0}\nhint: see qemu.log in the run directory; `moat doctor` checks the host")]
    Migration(String),
    #[error("KVM is not usable on this host: {reason}\nhint: {hint}")]
    KvmUnusable { reason: String, hint: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// `explicit` (from configuration), else `$MOAT_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn find_qemu(explicit: Option<&Path>) -> Result<PathBuf, VmmError> {
    let from_env = std::env::var_os("MOAT_QEMU").filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some((p, source)) = explicit.map(|p| (p.to_path_buf(), "configured")).or(from_env.map(|p| (p, "MOAT_QEMU")))
    {
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(VmmError::QemuMissing(format!("{source} QEMU {} does not exist or is not executable", p.display())))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| is_executable(p))
        .ok_or_else(|| VmmError::QemuMissing("qemu-system-x86_64 is not on PATH".into()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The version QEMU reports, e.g. `7.2.22`.
pub fn qemu_version(qemu: &Path) -> Result<String, VmmError> {
    let broken = |reason: String| VmmError::QemuBroken { qemu: qemu.display().to_string(), reason };
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| broken(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(broken(format!(
            "`--version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_version(&text)
        .ok_or_else(|| broken(format!("unexpected --version output {:?}", text.lines().next().unwrap_or(""))))
}

fn parse_version(text: &str) -> Option<String> {
    let rest = text.lines().next()?.split("version ").nth(1)?;
    let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_parsed() {
        assert_eq!(
            super::parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright")
                .as_deref(),
            Some("7.2.22")
        );
        assert_eq!(super::parse_version("nonsense"), None);
    }

    #[test]
    fn qemu_is_found_and_reports_its_version() {
        let q = super::find_qemu(None)
            .unwrap_or_else(|e| panic!("{e}\ninstall QEMU with: sudo apt-get install -y qemu-system-x86"));
        let v = super::qemu_version(&q).unwrap();
        assert!(v.chars().next().is_some_and(|c| c.is_ascii_digit()), "{v}");
    }

    #[test]
    fn a_configured_qemu_that_does_not_exist_says_how_to_install_one() {
        let err = super::find_qemu(Some(std::path::Path::new("/nonexistent/qemu"))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/qemu") && msg.contains("apt-get install qemu-system-x86"), "{msg}");
    }
}
