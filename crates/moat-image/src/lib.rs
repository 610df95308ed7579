//! moat's images: the guest kernel and its modules, the initramfs moat builds, and the store of
//! read-only base disks with thin per-sandbox overlays.

mod agent;
mod initramfs;
mod kernel;
mod store;

pub use agent::find_agent;
pub use initramfs::build_initramfs;
pub use kernel::{find_kernel, resolve_modules, Kernel, AGENT_MODULES};
pub use store::{Image, ImageConfig, ImageStore};

/// Errors of the image layer; each message ends with what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no usable guest kernel: {0}\nhint: install one with `apt-get install linux-image-cloud-amd64` or point MOAT_KERNEL at a kernel")]
    KernelMissing(String),
    #[error("kernel modules of {release} are unusable: {reason}\nhint: install the linux-image package of that kernel")]
    ModulesMissing { release: String, reason: String },
    #[error("no moat-agent found (looked in {looked})\nhint: build it with scripts/build-agent, or set MOAT_AGENT")]
    AgentMissing { looked: String },
    #[error("{path} cannot be the guest agent: {why}\nhint: build it with scripts/build-agent (a static binary)")]
    AgentNotStatic { path: String, why: String },
    #[error("image {0:?} not found; the built-in image is `minimal` (pulling and building images is not available yet)")]
    NotFound(String),
    #[error("`{command}` failed: {output}")]
    Tool { command: String, output: String },
    #[error("{what} failed: {source}")]
    Io { what: String, source: std::io::Error },
}
