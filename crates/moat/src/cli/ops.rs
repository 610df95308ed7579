//! Running moat as a service: `moat setup` and `moat daemon`.

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Only print what would be installed.
    #[arg(long)]
    pub dry_run: bool,
}

/// `moat daemon …`.
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Whether the daemon runs: pid, version, uptime, accelerator, sandboxes.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
