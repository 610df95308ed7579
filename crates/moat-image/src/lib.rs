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
mod artifact;
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

use std::borrow::Cow;
use std::path::PathBuf;

use moat_hint::Hint;

pub use agent::find_agent;
pub use artifact::{
    inspect_snapshot, push_snapshot, ArtifactImage, ArtifactMachine, FetchedSnapshot, Pushed, RemoteSnapshot,
    SnapshotArtifact, SnapshotFiles, ARTIFACT_TYPE, BASE_TYPE, CONFIG_TYPE, DISK_TYPE, FORMAT as ARTIFACT_FORMAT,
    MEM_TYPE, STATE_TYPE,
};
pub use build::{build_debian, DebianRecipe, DEFAULT_DEBIAN_MIRROR, TOOL_OUTPUT};
pub use import::import_archive;
pub use initramfs::build_initramfs;
pub use kernel::{find_kernel, find_kernel_in, Kernel};
pub use layer::{apply_layer, LayerStats};
pub use modules::{resolve_agent_modules, resolve_modules, AgentModules, AGENT_MODULES, LATER_MODULES};
pub use pull::{docker_credentials, pull, registry_of, PullOptions, PullProgress};
pub use store::{Image, ImageConfig, ImageStore, MINIMAL};

/// Errors of the image layer. Each message says what failed; [`Hint`] says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no kernel found under {} (looked for vmlinuz-*-cloud-amd64, then any vmlinuz-*)", boot.display())]
    KernelNotFound { boot: PathBuf },

    #[error("cannot read the kernel {}", path.display())]
    KernelUnreadable { path: PathBuf, source: std::io::Error },

    #[error("cannot read the module list of kernel {release} ({})", path.display())]
    ModulesUnreadable { release: String, path: PathBuf, source: std::io::Error },

    #[error("kernel {release} has no module {name} (it is neither in modules.dep nor built in)")]
    UnknownModule { release: String, name: String },

    #[error("the modules of kernel {release} are unusable: {reason}")]
    ModulesInvalid { release: String, reason: String },

    #[error("cannot unpack the kernel module {}: {reason}", path.display())]
    ModuleUnpack { path: PathBuf, reason: String },

    #[error("no moat-agent found (looked in {looked})")]
    AgentNotFound { looked: String },

    #[error("{} cannot run as the guest's PID 1: {why}", path.display())]
    AgentNotStatic { path: PathBuf, why: String },

    #[error("{} is not a usable static busybox: {why}", path.display())]
    BusyboxUnusable { path: PathBuf, why: String },

    #[error("image {name:?} is not in the image store")]
    NotFound { name: String },

    #[error("the image {name} ({digest}) this sandbox was made from is no longer in the image store")]
    DigestGone { name: String, digest: String },

    #[error("the image store at {} is damaged: {reason}", path.display())]
    StoreCorrupt { path: PathBuf, reason: String },

    #[error("`{tool}` could not be started")]
    ToolMissing { tool: String, package: String, source: std::io::Error },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed { command: String, status: String, stderr: String },

    #[error("the image archive is not usable: {reason}")]
    BadArchive { reason: String },

    #[error("{what} does not have the digest {expected}: it is damaged or was tampered with")]
    DigestMismatch { what: String, expected: String },

    #[error("{reference:?} is not an image reference: {reason}")]
    BadReference { reference: String, reason: String },

    #[error("{reference}: {reason}")]
    Registry { reference: String, reason: String, hint: String },

    #[error("{reference} was not found: {reason}")]
    RemoteMissing { reference: String, reason: String },

    #[error("the manifest of {reference} is refused: {reason}")]
    BadManifest { reference: String, reason: String },

    #[error("{reference} is a {platform} image; moat runs linux/amd64")]
    WrongPlatform { reference: String, platform: String },

    #[error("image name {name:?} is not valid: {why}")]
    BadImageName { name: String, why: String },

    #[error("the Debian recipe is invalid: {reason}")]
    InvalidRecipe { reason: String },

    #[error("building a Debian image needs root (debootstrap creates device nodes, sets file owners and chroots), and this process runs as uid {uid}")]
    BuildNeedsRoot { uid: u32 },

    #[error("the Debian archive keyring {} is missing, so downloaded packages cannot be verified", path.display())]
    KeyringMissing { path: PathBuf },

    #[error("debootstrap of Debian {suite} failed ({status}); its last lines:\n{log}")]
    DebootstrapFailed { suite: String, status: String, log: String },

    #[error("an image layer is not a readable tar stream: {reason}")]
    LayerUnreadable { reason: String },

    #[error("layer entry {entry:?} is refused: {reason}")]
    LayerEntryRefused { entry: String, reason: String },

    #[error("cannot apply layer entry {entry:?}: {what}")]
    LayerEntryIo { entry: String, what: String, source: std::io::Error },

    #[error("{what}")]
    Io { what: String, source: std::io::Error },
}

impl Hint for ImageError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        use ImageError as E;
        Some(match self {
            E::KernelNotFound { .. } => {
                "install one with `apt-get install linux-image-cloud-amd64` or set MOAT_KERNEL".into()
            }
            E::KernelUnreadable { path, .. } => format!(
                "check the path given in MOAT_KERNEL / --kernel; a root-only kernel (mode 0600) can be made readable \
                 with `sudo chmod 0644 {}`",
                path.display()
            )
            .into(),
            E::ModulesUnreadable { release, .. } => format!(
                "install the modules of that kernel (`apt-get install linux-image-{release}`) or regenerate the list \
                 with `depmod {release}`"
            )
            .into(),
            E::UnknownModule { .. } => {
                "use a kernel that provides it, such as Debian's linux-image-cloud-amd64 (set MOAT_KERNEL)".into()
            }
            E::ModulesInvalid { release, .. } => {
                format!("reinstall the kernel's package or run `depmod {release}`").into()
            }
            E::ModuleUnpack { .. } => "moat reads uncompressed, .ko.xz and .ko.zst modules; reinstall the kernel \
                 package or use linux-image-cloud-amd64"
                .into(),
            E::AgentNotFound { .. } => "build it with scripts/build-agent, or set MOAT_AGENT to the binary".into(),
            E::AgentNotStatic { .. } => {
                "build it with scripts/build-agent (it must be a static x86-64 binary), or set MOAT_AGENT".into()
            }
            E::BusyboxUnusable { .. } => "install it with `apt-get install busybox-static`".into(),
            E::NotFound { .. } => "list images with `moat image ls`; make one with `moat image build NAME --from \
                 debian:bookworm --packages ...` or `moat image import FILE`; `minimal` is built in"
                .into(),
            E::DigestGone { .. } => "remove the sandbox (`moat rm`) and make it again from the image as it is now; \
                 moat never deletes an image a sandbox uses, so the store was changed by hand"
                .into(),
            E::StoreCorrupt { path, .. } => {
                format!("remove {} and run the command again; the built-in images are rebuilt on use", path.display())
                    .into()
            }
            E::ToolMissing { package, .. } => format!("install it with `apt-get install {package}`").into(),
            E::CommandFailed { .. } | E::BadImageName { .. } | E::Io { .. } => return None,
            E::BadArchive { .. } => "import a `docker save` tarball or an OCI image-layout archive (`skopeo copy \
                 ... oci-archive:x.tar`)"
                .into(),
            E::DigestMismatch { .. } => "fetch the image again; nothing was registered".into(),
            E::BadReference { .. } => "write it as [REGISTRY/]REPOSITORY[:TAG][@DIGEST] in lowercase, e.g. \
                 `debian:bookworm-slim` or `ghcr.io/org/app:1.2`"
                .into(),
            E::Registry { hint, .. } => hint.clone().into(),
            E::RemoteMissing { .. } => "check the repository name and the tag".into(),
            E::BadManifest { .. } => "the image is malformed or not a container image; check the reference, \
                 nothing was registered"
                .into(),
            E::WrongPlatform { .. } => {
                "pull a tag built for linux/amd64 (multi-platform tags resolve to it by themselves)".into()
            }
            E::InvalidRecipe { .. } => "write the base as `debian:<suite>` (`debian:bookworm`, `debian:12`) and \
                 packages by their Debian names (lowercase letters, digits, `+`, `-`, `.`)"
                .into(),
            E::BuildNeedsRoot { .. } => "run the build as root, e.g. with `sudo`".into(),
            E::KeyringMissing { .. } => "install it with `apt-get install debian-archive-keyring`".into(),
            E::DebootstrapFailed { suite, .. } => format!(
                "check that the suite and every package exist (https://packages.debian.org/{suite}/) and that the \
                 mirror is reachable; nothing was registered"
            )
            .into(),
            E::LayerUnreadable { .. } => "layers must be tar archives, plain or compressed with gzip or zstd; fetch \
                 the image again, and if it still fails the image is damaged"
                .into(),
            E::LayerEntryRefused { .. } => {
                "the image is malformed or hostile; rebuild it, or use an image from a source you trust".into()
            }
            E::LayerEntryIo { .. } => "check the free space and permissions of the image store".into(),
        })
    }
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

/// An error as the CLI shows it (message, causes, hint), for tests that read its advice.
#[cfg(test)]
pub(crate) fn report(e: &ImageError) -> String {
    moat_hint::Report::new(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let io = || std::io::Error::other("the io cause");
        let (s, p) = (|| "x".to_string(), || PathBuf::from("/p"));
        let cases = [
            (ImageError::KernelNotFound { boot: p() }, true),
            (ImageError::KernelUnreadable { path: p(), source: io() }, true),
            (ImageError::ModulesUnreadable { release: s(), path: p(), source: io() }, true),
            (ImageError::UnknownModule { release: s(), name: s() }, true),
            (ImageError::ModulesInvalid { release: s(), reason: s() }, true),
            (ImageError::ModuleUnpack { path: p(), reason: s() }, true),
            (ImageError::AgentNotFound { looked: s() }, true),
            (ImageError::AgentNotStatic { path: p(), why: s() }, true),
            (ImageError::BusyboxUnusable { path: p(), why: s() }, true),
            (ImageError::NotFound { name: s() }, true),
            (ImageError::DigestGone { name: s(), digest: s() }, true),
            (ImageError::StoreCorrupt { path: p(), reason: s() }, true),
            (ImageError::ToolMissing { tool: s(), package: s(), source: io() }, true),
            (ImageError::CommandFailed { command: s(), status: s(), stderr: s() }, false),
            (ImageError::BadArchive { reason: s() }, true),
            (ImageError::DigestMismatch { what: s(), expected: s() }, true),
            (ImageError::BadReference { reference: s(), reason: s() }, true),
            (ImageError::Registry { reference: s(), reason: s(), hint: "log in".into() }, true),
            (ImageError::BadManifest { reference: s(), reason: s() }, true),
            (ImageError::WrongPlatform { reference: s(), platform: s() }, true),
            (ImageError::BadImageName { name: s(), why: s() }, false),
            (ImageError::InvalidRecipe { reason: s() }, true),
            (ImageError::BuildNeedsRoot { uid: 1000 }, true),
            (ImageError::KeyringMissing { path: p() }, true),
            (ImageError::DebootstrapFailed { suite: s(), status: s(), log: s() }, true),
            (ImageError::LayerUnreadable { reason: s() }, true),
            (ImageError::LayerEntryRefused { entry: s(), reason: s() }, true),
            (ImageError::LayerEntryIo { entry: s(), what: s(), source: io() }, true),
            (ImageError::Io { what: s(), source: io() }, false),
        ];
        for (e, hinted) in &cases {
            moat_hint::check(e, *hinted).unwrap();
        }
    }
}
