//! The host side of a sandbox: prepare the host ([`Runtime`]), boot a VM from an image
//! ([`Sandbox`]), and run processes in it over the agent link ([`AgentLink`], [`Exec`]).

pub mod agent_link;
pub mod host_mount;
mod runtime;
mod sandbox;
mod shape;
mod snapshot;
mod volumes;
mod warm;

use std::borrow::Cow;
use std::time::Duration;

use moat_hint::Hint;

pub use agent_link::{AgentLink, Exec, ExecControl, ExecEvent, LinkError};
pub use runtime::{
    create_private_dir, initrd_and_accel, jail_for, jail_ids, make_home_private, HomeAccessError, HostParts, Loosened,
    Runtime, RuntimeConfig,
};
pub use sandbox::{new_id, validate, Origin, Sandbox, SandboxSpec, StartTimeline, OVERLAY_FILE};
pub use shape::{Shape, ShapeError};
pub use snapshot::{discard_saved, Fingerprint, SavedMachine, DISK_FILE, HELPER_PREFIX, MEM_FILE, STATE_FILE};

/// Why a sandbox could not be prepared, booted or used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Config(String),
    #[error("invalid sandbox settings: {0}")]
    InvalidSpec(String),
    #[error(transparent)]
    Vmm(#[from] moat_vmm::VmmError),
    #[error(transparent)]
    Image(#[from] moat_image::ImageError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("{what} failed")]
    Io { what: String, source: std::io::Error },
    #[error("the guest did not come up within {}s; last console lines:\n{console}", timeout.as_secs())]
    BootTimeout { timeout: Duration, console: String },
    #[error("the guest failed to boot: {reason}; last console lines:\n{console}")]
    Boot { reason: String, console: String },
    #[error("its agent did not answer within {}s; last console lines:\n{console}", timeout.as_secs())]
    AdoptTimeout { timeout: Duration, console: String },
    #[error("restoring the saved VM failed: {reason}\n{console}")]
    Restore { reason: String, console: String },
    #[error("the agent did not finish {what} within {}s", timeout.as_secs())]
    AgentTimeout { what: String, timeout: Duration },
}

impl Hint for SandboxError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        match self {
            SandboxError::Config(_) | SandboxError::InvalidSpec(_) | SandboxError::Io { .. } => None,
            SandboxError::Vmm(e) => e.hint(),
            SandboxError::Image(e) => e.hint(),
            SandboxError::Link(e) => e.hint(),
            SandboxError::BootTimeout { .. } => Some(
                "check the kernel (MOAT_KERNEL) and `moat doctor`; raise --boot-timeout on a very slow host".into(),
            ),
            SandboxError::Boot { .. } => Some("run `moat doctor`".into()),
            SandboxError::AdoptTimeout { .. } => {
                Some("the guest may be hung or overloaded; stop the sandbox and start it again".into())
            }
            SandboxError::Restore { .. } => {
                Some("the saved state may be damaged; remove it (`moat snapshot rm`) and take a new one".into())
            }
            SandboxError::AgentTimeout { .. } => {
                Some("the guest may be hung or overloaded; see `moat logs`, or stop the sandbox".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let io = || std::io::Error::other("the io cause");
        let s = || "x".to_string();
        let t = Duration::from_secs(5);
        let agent = || moat_proto::AgentError { code: moat_proto::ErrorCode::NotFound, message: s() };
        let cases = [
            (SandboxError::Config(s()), false),
            (SandboxError::InvalidSpec(s()), false),
            (SandboxError::Vmm(moat_vmm::VmmError::PathTooLong(s())), true),
            (SandboxError::Vmm(moat_vmm::VmmError::Io { what: s(), source: io() }), false),
            (SandboxError::Image(moat_image::ImageError::NotFound { name: s() }), true),
            (SandboxError::Link(LinkError::Closed), true),
            (SandboxError::Io { what: s(), source: io() }, false),
            (SandboxError::BootTimeout { timeout: t, console: s() }, true),
            (SandboxError::Boot { reason: s(), console: s() }, true),
            (SandboxError::AdoptTimeout { timeout: t, console: s() }, true),
            (SandboxError::Restore { reason: s(), console: s() }, true),
            (SandboxError::AgentTimeout { what: s(), timeout: t }, true),
        ];
        for (e, hinted) in &cases {
            moat_hint::check(e, *hinted).unwrap();
        }
        let link = [
            (LinkError::Connect { path: s(), source: io() }, true),
            (LinkError::VersionMismatch { agent: 1, host: 2 }, true),
            (LinkError::Frame(moat_proto::FrameError::Truncated), true),
            (LinkError::Closed, true),
            (LinkError::BadHandshake(s()), false),
            (LinkError::Agent(agent()), false),
            (LinkError::Protocol { channel: 1, reason: s() }, false),
            (LinkError::TooLarge { size: 1 }, true),
        ];
        for (e, hinted) in &link {
            moat_hint::check(e, *hinted).unwrap();
        }
        let home = make_home_private(std::path::Path::new("/nonexistent/moat-home"), 0o700, None).unwrap_err();
        moat_hint::check(&home, true).unwrap();
    }
}
