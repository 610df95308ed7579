//! Drives QEMU's `microvm` machine: the command line, QMP, the accelerator probe and the
//! supervised QEMU process.

mod accel;
mod command;
mod qmp;
mod vm;

use std::path::{Path, PathBuf};

pub use accel::{choose_accel, Accel, AccelChoice, AccelDecision};
pub use command::{command_line, VmConfig};
pub use qmp::{Qmp, QmpError};
pub use vm::Vm;

/// Errors of the VMM layer. Messages are sentences that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("QEMU was not found ({0}); install it with `apt-get install qemu-system-x86` or set MOAT_QEMU")]
    QemuMissing(String),
    #[error("cannot run {qemu}: {reason}")]
    QemuBroken { qemu: String, reason: String },
    #[error("QEMU exited before the VM started ({status}): {stderr}")]
    QemuExited { status: String, stderr: String },
    #[error("cannot start QEMU: {0}")]
    Spawn(std::io::Error),
    #[error("socket path {0} is too long for a unix socket (limit 107 bytes); set MOAT_HOME to a shorter directory")]
    PathTooLong(String),
    #[error("QEMU did not open its QMP socket within {0}s")]
    QmpTimeout(u64),
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("KVM is not usable on this host: {reason}\nhint: {hint}")]
    KvmUnusable { reason: String, hint: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// `explicit` (from config or MOAT_QEMU), else `qemu-system-x86_64` on PATH.
pub fn find_qemu(explicit: Option<&Path>) -> Result<PathBuf, VmmError> {
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(VmmError::QemuMissing(format!("{} does not exist", p.display()))) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or_else(|| VmmError::QemuMissing("qemu-system-x86_64 is not on PATH".into()))
}

/// The version QEMU reports, e.g. `7.2.22`.
pub fn qemu_version(qemu: &Path) -> Result<String, VmmError> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| VmmError::QemuBroken { qemu: qemu.display().to_string(), reason: e.to_string() })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| VmmError::QemuBroken {
        qemu: qemu.display().to_string(),
        reason: format!("unexpected --version output {:?}", text.lines().next().unwrap_or("")),
    })
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
            super::parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright").as_deref(),
            Some("7.2.22")
        );
        assert_eq!(super::parse_version("nonsense"), None);
    }
}
