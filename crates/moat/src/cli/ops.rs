//! Running moat as a service: `moat setup` and `moat daemon`.

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Only print what would be installed (with --service: the unit file).
    #[arg(long)]
    pub dry_run: bool,
    /// Install the daemon as a systemd service instead (`/etc/systemd/system/moat.service`,
    /// MOAT_HOME=/var/lib/moat), enable and start it. Needs root.
    #[arg(long)]
    pub service: bool,
    /// With --service: let the members of this group use the daemon (created when missing).
    #[arg(long, value_name = "NAME", requires = "service")]
    pub group: Option<String>,
}

/// `moat daemon …`.
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Whether the daemon runs: pid, version, uptime, accelerator, sandboxes, addresses, and
    /// whether systemd runs it. Exits 3 when no daemon runs.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon (SIGTERM) and wait until it is gone (--timeout). Sandboxes keep running;
    /// the next daemon adopts them. This machine's daemon only.
    Stop,
    /// Stop the daemon and start it again with the same arguments, in the background (under
    /// systemd: `systemctl restart`). Sandboxes keep running. This machine's daemon only.
    Restart,
    /// The daemon's log: $MOAT_HOME/daemon.log (and daemon.log.1), or its journal under systemd.
    Logs {
        /// Only the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
        /// Keep printing what the daemon logs.
        #[arg(short, long)]
        follow: bool,
    },
}
