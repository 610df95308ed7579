//! The prepared host: where state lives, which QEMU, kernel, initramfs and accelerator to use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_image::{ImageStore, Kernel};
use moat_vmm::{AccelChoice, AccelDecision};

use crate::SandboxError;

/// Settings that decide how sandboxes are built on this host. Every path can be overridden so tests
/// and unusual hosts need no special casing.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `$MOAT_HOME`: images, caches, per-sandbox run directories.
    pub home: PathBuf,
    pub qemu: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    pub accel: AccelChoice,
    /// How long a KVM probe guest may take to boot before KVM is judged unusable.
    pub probe_timeout: Duration,
}

impl RuntimeConfig {
    /// The default home: `/var/lib/moat` for root, else `$XDG_DATA_HOME/moat` or `~/.local/share/moat`.
    pub fn default_home() -> PathBuf {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/moat");
        }
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("moat");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".local/share/moat")
    }

    /// Defaults overridden by the `MOAT_*` environment variables.
    pub fn from_env() -> Result<RuntimeConfig, SandboxError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let accel = match std::env::var("MOAT_ACCEL") {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e| SandboxError::Config(format!("MOAT_ACCEL: {e}")))?,
            _ => AccelChoice::Auto,
        };
        Ok(RuntimeConfig {
            home: var("MOAT_HOME").unwrap_or_else(Self::default_home),
            qemu: var("MOAT_QEMU"),
            kernel: var("MOAT_KERNEL"),
            agent: var("MOAT_AGENT"),
            accel,
            probe_timeout: Duration::from_secs(8),
        })
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.home.join("cache")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.home.join("run")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.home.join("images")
    }
}

/// Everything needed to boot sandboxes, resolved once.
pub struct Runtime {
    pub config: RuntimeConfig,
    pub qemu: PathBuf,
    pub qemu_version: String,
    pub kernel: Kernel,
    pub initrd: PathBuf,
    pub accel: AccelDecision,
    pub images: ImageStore,
}

impl Runtime {
    /// Find QEMU, the kernel and the agent, build (or reuse) the initramfs and decide the accelerator.
    pub async fn prepare(config: RuntimeConfig) -> Result<Runtime, SandboxError> {
        for dir in [&config.home, &config.cache_dir(), &config.run_dir()] {
            create_private_dir(dir)?;
        }
        let qemu = moat_vmm::find_qemu(config.qemu.as_deref())?;
        let qemu_version = moat_vmm::qemu_version(&qemu)?;
        let kernel = moat_image::find_kernel(config.kernel.as_deref())?;
        let agent = moat_image::find_agent(config.agent.as_deref())?;
        let modules = moat_image::resolve_modules(&kernel, moat_image::AGENT_MODULES)?;
        let initrd = moat_image::build_initramfs(&config.cache_dir(), &kernel, &agent, &modules)?;
        let accel = moat_vmm::choose_accel(
            config.accel,
            &qemu,
            &kernel.path,
            &initrd,
            &config.cache_dir().join("accel.json"),
            config.probe_timeout,
        )
        .await?;
        let images = ImageStore::open(&config.images_dir())?;
        Ok(Runtime { config, qemu, qemu_version, kernel, initrd, accel, images })
    }
}

/// Create a directory (and parents) readable only by its owner.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| SandboxError::Io { what: format!("creating {}", dir.display()), source: e })
}
