//! moat's images: the guest kernel and its modules, the initramfs moat builds, and the store of
//! read-only base disks with thin per-sandbox overlays.
//!
//! - [`find_kernel`] and [`resolve_modules`] pick the distribution kernel and the module files the
//!   agent needs (through `modules.dep`).
//! - [`find_agent`] locates the static `moat-agent` binary; [`build_initramfs`] packs it as `/init`
//!   with those modules into a cached newc archive.
//! - [`ImageStore`] holds content-addressed base disks (qcow2) and hands out thin overlays; the
//!   built-in `minimal` image (busybox) is built on first use without any network.

mod agent;
mod build;
mod disk;
mod elf;
mod import;
mod initramfs;
mod kernel;
mod layer;
mod minimal;
mod modules;
mod pull;
mod store;

use std::path::PathBuf;

pub use agent::find_agent;
pub use build::{build_debian, DebianRecipe, DEFAULT_DEBIAN_MIRROR};
pub use import::import_archive;
pub use initramfs::build_initramfs;
pub use kernel::{find_kernel, find_kernel_in, Kernel};
pub use layer::{apply_layer, LayerStats};
pub use modules::{resolve_modules, AGENT_MODULES};
pub use pull::{pull, registry_of, PullOptions, PullProgress};
pub use store::{Image, ImageConfig, ImageStore, MINIMAL};

/// Errors of the image layer. Each message says what failed and ends with what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no kernel found under {} (looked for vmlinuz-*-cloud-amd64, then any vmlinuz-*)\nhint: install one with `apt-get install linux-image-cloud-amd64` or set MOAT_KERNEL", boot.display())]
    KernelNotFound { boot: PathBuf },

    #[error("cannot read the kernel {}: {source}\nhint: check the path given in MOAT_KERNEL / --kernel; a root-only kernel (mode 0600) can be made readable with `sudo chmod 0644 {}`", path.display(), path.display())]
    KernelUnreadable { path: PathBuf, source: std::io::Error },

    #[error("cannot read the module list of kernel {release} ({}): {source}\nhint: install the modules of that kernel (`apt-get install linux-image-{release}`) or regenerate the list with `depmod {release}`", path.display())]
    ModulesUnreadable { release: String, path: PathBuf, source: std::io::Error },

    #[error("kernel {release} has no module {name} (it is neither in modules.dep nor built in)\nhint: use a kernel that provides it, such as Debian's linux-image-cloud-amd64 (set MOAT_KERNEL)")]
    UnknownModule { release: String, name: String },

    #[error("the modules of kernel {release} are unusable: {reason}\nhint: reinstall the kernel's package or run `depmod {release}`")]
    ModulesInvalid { release: String, reason: String },

    #[error("cannot unpack the kernel module {}: {reason}\nhint: moat reads uncompressed, .ko.xz and .ko.zst modules; reinstall the kernel package or use linux-image-cloud-amd64", path.display())]
    ModuleUnpack { path: PathBuf, reason: String },

    #[error("no moat-agent found (looked in {looked})\nhint: build it with scripts/build-agent, or set MOAT_AGENT to the binary")]
    AgentNotFound { looked: String },

    #[error("{} cannot run as the guest's PID 1: {why}\nhint: build it with scripts/build-agent (it must be a static x86-64 binary), or set MOAT_AGENT", path.display())]
    AgentNotStatic { path: PathBuf, why: String },

    #[error("{} is not a usable static busybox: {why}\nhint: install it with `apt-get install busybox-static`", path.display())]
    BusyboxUnusable { path: PathBuf, why: String },

    #[error("image {name:?} is not in the image store\nhint: list images with `moat image ls`; make one with `moat image build NAME --from debian:bookworm --packages ...` or `moat image import FILE`; `minimal` is built in")]
    NotFound { name: String },

    #[error("the image {name} ({digest}) this sandbox was made from is no longer in the image store\nhint: remove the sandbox (`moat rm`) and make it again from the image as it is now; moat never deletes an image a sandbox uses, so the store was changed by hand")]
    DigestGone { name: String, digest: String },

    #[error("the image store at {} is damaged: {reason}\nhint: remove {} and run the command again; the built-in images are rebuilt on use", path.display(), path.display())]
    StoreCorrupt { path: PathBuf, reason: String },

    #[error("`{tool}` could not be started: {source}\nhint: install it with `apt-get install {package}`")]
    ToolMissing { tool: String, package: String, source: std::io::Error },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed { command: String, status: String, stderr: String },

    #[error("the image archive is not usable: {reason}\nhint: import a `docker save` tarball or an OCI image-layout archive (`skopeo copy ... oci-archive:x.tar`)")]
    BadArchive { reason: String },

    #[error("{what} does not have the digest {expected}: it is damaged or was tampered with\nhint: fetch the image again; nothing was registered")]
    DigestMismatch { what: String, expected: String },

    #[error("{reference:?} is not an image reference: {reason}\nhint: write it as [REGISTRY/]REPOSITORY[:TAG][@DIGEST] in lowercase, e.g. `debian:bookworm-slim` or `ghcr.io/org/app:1.2`")]
    BadReference { reference: String, reason: String },

    #[error("pulling {reference}: {reason}\nhint: {hint}")]
    Registry { reference: String, reason: String, hint: String },

    #[error("the manifest of {reference} is refused: {reason}\nhint: the image is malformed or not a container image; check the reference, nothing was registered")]
    BadManifest { reference: String, reason: String },

    #[error("{reference} is a {platform} image; moat runs linux/amd64\nhint: pull a tag built for linux/amd64 (multi-platform tags resolve to it by themselves)")]
    WrongPlatform { reference: String, platform: String },

    #[error("image name {name:?} is not valid: {why}")]
    BadImageName { name: String, why: String },

    #[error("the Debian recipe is invalid: {reason}\nhint: write the base as `debian:<suite>` (`debian:bookworm`, `debian:12`) and packages by their Debian names (lowercase letters, digits, `+`, `-`, `.`)")]
    InvalidRecipe { reason: String },

    #[error("building a Debian image needs root (debootstrap creates device nodes, sets file owners and chroots), and this process runs as uid {uid}\nhint: run the build as root, e.g. with `sudo`")]
    BuildNeedsRoot { uid: u32 },

    #[error("the Debian archive keyring {} is missing, so downloaded packages cannot be verified\nhint: install it with `apt-get install debian-archive-keyring`", path.display())]
    KeyringMissing { path: PathBuf },

    #[error("debootstrap of Debian {suite} failed ({status}); its last lines:\n{log}\nhint: check that the suite and every package exist (https://packages.debian.org/{suite}/) and that the mirror is reachable; nothing was registered")]
    DebootstrapFailed { suite: String, status: String, log: String },

    #[error("an image layer is not a readable tar stream: {reason}\nhint: layers must be tar archives, plain or compressed with gzip or zstd; fetch the image again, and if it still fails the image is damaged")]
    LayerUnreadable { reason: String },

    #[error("layer entry {entry:?} is refused: {reason}\nhint: the image is malformed or hostile; rebuild it, or use an image from a source you trust")]
    LayerEntryRefused { entry: String, reason: String },

    #[error("cannot apply layer entry {entry:?}: {what}: {source}\nhint: check the free space and permissions of the image store")]
    LayerEntryIo { entry: String, what: String, source: std::io::Error },

    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// Image names as users write them: `python`, `debian:bookworm`, `ghcr.io/org/app:1.2`. Lowercase
/// letters, digits and `._-:/@`, starting with a letter or digit, at most 255 bytes.
pub fn validate_image_name(name: &str) -> Result<(), ImageError> {
    let why = if name.is_empty() || name.len() > 255 {
        Some("use 1 to 255 characters")
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        Some("start with a letter or digit")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-:/@".contains(&b)) {
        Some("use lowercase letters, digits and . _ - : / @")
    } else if name.split('/').any(|part| part == ".." || part == ".") {
        Some("no `.` or `..` path parts")
    } else {
        None
    };
    match why {
        Some(why) => Err(ImageError::BadImageName { name: name.to_string(), why: why.to_string() }),
        None => Ok(()),
    }
}

impl ImageError {
    /// An I/O error with a sentence saying what was being done (`"writing /x"`).
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let what = what.into();
        move |source| ImageError::Io { what, source }
    }
}
