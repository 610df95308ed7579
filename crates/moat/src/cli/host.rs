//! Where state lives, how VMs boot, and which daemon the CLI talks to.

use std::path::PathBuf;
use std::time::Duration;

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
    /// The daemon to use instead of this home's: tcp://HOST:PORT, https://HOST:PORT or
    /// unix:///PATH/moat.sock. A remote daemon needs its token (MOAT_TOKEN or --token-file) and is
    /// never started by the CLI.
    #[arg(long = "host", value_name = "URL", global = true, env = "MOAT_HOST")]
    pub remote: Option<String>,
    /// A file holding the remote daemon's token (its $MOAT_HOME/token) [env: MOAT_TOKEN_FILE;
    /// MOAT_TOKEN holds the token itself].
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The PEM certificate (or CA) an https:// daemon's certificate is checked against, for a
    /// self-signed daemon [default: the system's roots].
    #[arg(long, value_name = "PEM", global = true, env = "MOAT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// How long to wait for the daemon to accept a connection and answer the first request
    /// [env: MOAT_TIMEOUT; default: 30s]. Not a limit on the command itself; for `run` and `exec`,
    /// --timeout is the command's own limit.
    // The id is `timeout` on purpose: `run` and `exec` have their own `--timeout`, which clap then
    // keeps instead of this one. The environment is read in code, not by clap, so that
    // MOAT_TIMEOUT never reaches those commands' limit.
    #[arg(long, value_name = "DURATION", global = true, value_parser = super::parse_duration)]
    pub timeout: Option<Duration>,
}
