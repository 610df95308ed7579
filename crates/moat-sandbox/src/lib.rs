//! The host side of a sandbox: prepare the host ([`Runtime`]), boot a VM from an image
//! ([`Sandbox`]), and run processes in it over the agent link ([`AgentLink`], [`Exec`]).

pub mod agent_link;
mod runtime;
mod sandbox;
mod snapshot;

use std::time::Duration;

pub use agent_link::{AgentLink, Exec, ExecControl, ExecEvent, LinkError};
pub use runtime::{create_private_dir, make_home_private, HomeAccessError, Loosened, Runtime, RuntimeConfig};
pub use sandbox::{new_id, validate, Origin, Sandbox, SandboxSpec, OVERLAY_FILE};
pub use snapshot::{discard_saved, Fingerprint, SavedMachine, HELPER_PREFIX, MEM_FILE, STATE_FILE};

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
    #[error("{what} failed: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the guest did not come up within {}s; last console lines:\n{console}\nhint: check the kernel (MOAT_KERNEL) and `moat doctor`; raise --boot-timeout on a very slow host", timeout.as_secs())]
    BootTimeout { timeout: Duration, console: String },
    #[error("the guest failed to boot: {reason}; last console lines:\n{console}\nhint: run `moat doctor`")]
    Boot { reason: String, console: String },
    #[error("its agent did not answer within {}s; last console lines:\n{console}", timeout.as_secs())]
    AdoptTimeout { timeout: Duration, console: String },
    #[error("restoring the saved VM failed: {reason}\n{console}\nhint: the saved state may be damaged; remove it (`moat snapshot rm`) and take a new one")]
    Restore { reason: String, console: String },
}
