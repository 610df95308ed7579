//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use moat_vmm::AccelChoice;

/// Run untrusted code in lightweight virtual machines.
#[derive(Debug, Parser)]
#[command(name = "moat", version, about, propagate_version = true)]
pub struct Cli {
    /// Log verbosity for moat's own diagnostics (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "MOAT_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a fresh sandbox and remove the sandbox afterwards.
    Run(RunArgs),
    /// Check that this host can run sandboxes, and say how to fix what is missing.
    Doctor(DoctorArgs),
    /// Install missing host packages (with apt) and prepare the kernel, initramfs and default image.
    Setup(SetupArgs),
}

/// Settings shared by every command that boots VMs.
#[derive(Debug, Args, Clone)]
pub struct HostArgs {
    /// Accelerator: auto (KVM if a probe guest really boots under it, else TCG), kvm or tcg.
    #[arg(long, env = "MOAT_ACCEL", default_value = "auto")]
    pub accel: AccelChoice,
    /// State directory [default: /var/lib/moat as root, else ~/.local/share/moat].
    #[arg(long, env = "MOAT_HOME")]
    pub home: Option<PathBuf>,
    /// Guest kernel [default: the newest /boot/vmlinuz-*-cloud-amd64].
    #[arg(long, env = "MOAT_KERNEL")]
    pub kernel: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Image to boot.
    #[arg(long, default_value = "minimal")]
    pub image: String,
    /// Set an environment variable in the command's environment (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: a name, a uid or uid:gid.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Forward standard input even when it is a terminal (it is always forwarded when it is not).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Kill the command after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// Hostname of the sandbox [default: moat-<id>].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Give up if the guest has not come up after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub boot_timeout: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Only print what would be installed.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let valid = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(format!("{k:?} is not a valid variable name (letters, digits and _, not starting with a digit)"));
    }
    if v.contains('\0') {
        return Err("values cannot contain NUL bytes".into());
    }
    Ok((k.to_string(), v.to_string()))
}

/// Parse `90`, `90s`, `500ms`, `5m`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration; use e.g. 30s, 500ms, 5m, 2h"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err("a duration must be more than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn env_pairs_parse() {
        assert_eq!(parse_env("K=V=W").unwrap(), ("K".into(), "V=W".into()));
        assert_eq!(parse_env("EMPTY=").unwrap(), ("EMPTY".into(), "".into()));
        assert!(parse_env("NOEQUALS").is_err());
        assert!(parse_env("1X=y").is_err());
        assert!(parse_env("A-B=y").is_err());
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from(["moat", "run", "-e", "K=V", "-w", "/tmp", "--", "env", "-0"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        assert_eq!(run.command, ["env", "-0"]);
        assert_eq!(run.workdir.as_deref(), Some("/tmp"));
        assert!(Cli::try_parse_from(["moat", "run"]).is_err());
    }
}
