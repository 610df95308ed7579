//! Drives QEMU's `microvm` machine: the command line, QMP, the accelerator probe and the
//! supervised QEMU process.

mod accel;
mod cgroup;
mod command;
mod console;
mod exit;
mod identity;
mod jail;
mod qmp;
mod vm;
mod volume;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use moat_hint::Hint;

pub use accel::{
    choose_accel, Accel, AccelChoice, AccelChoiceError, AccelDecision, DEFAULT_PROBE_TIMEOUT, PROBE_MARKER,
};
pub use cgroup::{
    sandbox_cgroups, CgroupError, CgroupHost, CgroupLimits, CgroupStats, CgroupVersion, SandboxCgroup, Unusable,
    QEMU_OVERHEAD_MIB,
};
pub use command::{
    command_line, command_line_for, run_files, HostFacts, Memory, VmConfig, BASE_CMDLINE, SECCOMP_POLICY,
};
pub use console::{rotated_path as rotated_console_log, since as console_since, CONSOLE_LOG_CAP};
pub use exit::{Exit, ExitWatcher};
pub use identity::{find_qemus_under, is_our_qemu};
pub use jail::{
    check_disk, connect_vm_socket, note_backing, seal_snapshot_ram, Jail, JailError, JailIds, DEFAULT_UID_BASE,
    DEFAULT_UID_COUNT, JAIL_ARG,
};
pub use jail::{main as jail_main, probe as probe_jail};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use vm::Vm;
pub use volume::{VolumeError, MAX_VOLUMES, VOLUME_SERIAL_PREFIX};

/// Errors of the VMM layer. Messages are sentences; [`Hint`] says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("QEMU was not found: {0}")]
    QemuMissing(String),
    #[error("cannot run {qemu}: {reason}")]
    QemuBroken { qemu: String, reason: String },
    #[error("QEMU exited before the VM started ({status}): {stderr}")]
    QemuExited { status: String, stderr: String },
    #[error("cannot start QEMU")]
    Spawn(#[source] std::io::Error),
    #[error("socket path {0} is too long for a unix socket (limit 107 bytes)")]
    PathTooLong(String),
    #[error("QEMU did not answer on its QMP socket within {0}s; it is killed")]
    QmpTimeout(u64),
    #[error("the VM is not running (QEMU has exited or was stopped)")]
    NotRunning,
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("process {pid} is not this sandbox's QEMU: {reason}; it was left alone")]
    NotOurProcess { pid: u32, reason: String },
    #[error("QEMU {pid} is running but did not answer on its QMP socket {}: {reason}", socket.display())]
    AdoptQmp { pid: u32, socket: PathBuf, reason: String },
    #[error("{0}")]
    Migration(String),
    #[error("KVM is not usable on this host: {reason}")]
    KvmUnusable { reason: String, hint: String },
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
}

impl Hint for VmmError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        Some(match self {
            VmmError::QemuMissing(_) => {
                "install it with `apt-get install qemu-system-x86`, or point MOAT_QEMU at qemu-system-x86_64".into()
            }
            VmmError::QemuBroken { qemu, .. } => {
                format!("check that it is qemu-system-x86_64 and runs (`{qemu} --version`)").into()
            }
            VmmError::QemuExited { .. } | VmmError::Spawn(_) => "`moat doctor` checks the host".into(),
            VmmError::PathTooLong(_) => "set MOAT_HOME to a shorter directory".into(),
            VmmError::QmpTimeout(_) => "the host may be overloaded, see qemu.log in the run directory".into(),
            VmmError::NotRunning => "start the sandbox again (`moat start`)".into(),
            VmmError::Qmp(e) => return e.hint(),
            VmmError::NotOurProcess { .. } => {
                "the VM has probably exited and its pid was reused; treat the sandbox as stopped".into()
            }
            VmmError::AdoptQmp { .. } => "the VM may be hung, or another process holds its QMP connection".into(),
            VmmError::Migration(_) => "see qemu.log in the run directory; `moat doctor` checks the host".into(),
            VmmError::KvmUnusable { hint, .. } => hint.clone().into(),
            VmmError::Jail(e) => return e.hint(),
            VmmError::Cgroup(e) => return e.hint(),
            VmmError::Volume(e) => return e.hint(),
            VmmError::Io { .. } => return None,
        })
    }
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
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
        let hint = moat_hint::Hint::hint(&err).unwrap_or_default();
        assert!(hint.contains("apt-get install qemu-system-x86"), "{hint}");
    }

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        use super::{QmpError, VmmError};
        let io = || std::io::Error::other("the io cause");
        let s = || "x".to_string();
        let cases = [
            (VmmError::QemuMissing(s()), true),
            (VmmError::QemuBroken { qemu: s(), reason: s() }, true),
            (VmmError::QemuExited { status: s(), stderr: s() }, true),
            (VmmError::Spawn(io()), true),
            (VmmError::PathTooLong(s()), true),
            (VmmError::QmpTimeout(5), true),
            (VmmError::NotRunning, true),
            (VmmError::Qmp(QmpError::Io(io())), true),
            (VmmError::Qmp(QmpError::Closed), true),
            (VmmError::Qmp(QmpError::Command { command: s(), class: s(), desc: s() }), false),
            (VmmError::NotOurProcess { pid: 1, reason: s() }, true),
            (VmmError::AdoptQmp { pid: 1, socket: "/q".into(), reason: s() }, true),
            (VmmError::Migration(s()), true),
            (VmmError::KvmUnusable { reason: s(), hint: "load kvm".into() }, true),
            (VmmError::Io { what: s(), source: io() }, false),
        ];
        for (e, hinted) in &cases {
            moat_hint::check(e, *hinted).unwrap();
        }
        let json = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let qmp = [
            (QmpError::Io(io()), true),
            (QmpError::Closed, true),
            (QmpError::LineTooLong, false),
            (QmpError::Json(json), false),
            (QmpError::Unexpected(s()), false),
            (QmpError::Command { command: s(), class: s(), desc: s() }, false),
        ];
        for (e, hinted) in &qmp {
            moat_hint::check(e, *hinted).unwrap();
        }
    }
}
