//! Where state lives, how VMs boot, and which daemon the CLI talks to.

use std::path::PathBuf;

use clap::Args;
use moat_vmm::AccelChoice;

/// Where state lives and how VMs boot. The accelerator and kernel are the daemon's: they apply
/// when this command starts the daemon.
#[derive(Debug, Args, Clone)]
pub struct HostArgs {
    /// Accelerator: auto (KVM if a probe guest really boots under it, else TCG), kvm or tcg.
    #[arg(long, global = true, env = "MOAT_ACCEL", default_value = "auto")]
    pub accel: AccelChoice,
    /// State directory [default: /var/lib/moat as root, else ~/.local/share/moat].
    #[arg(long, global = true, env = "MOAT_HOME")]
    pub home: Option<PathBuf>,
    /// Guest kernel [default: the newest /boot/vmlinuz-*-cloud-amd64].
    #[arg(long, global = true, env = "MOAT_KERNEL")]
    pub kernel: Option<PathBuf>,
}
