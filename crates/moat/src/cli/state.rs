//! `moat state …`: the daemon's state database; and the daemon's retention settings.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::parse_duration;

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Copy the state database, consistently, while the daemon runs (a remote one too).
    Backup {
        /// Where to write the copy.
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Put a backup in place of the state database, with the daemon stopped.
    ///
    /// Stop the daemon first (`moat daemon stop`; sandboxes keep running). The file must pass
    /// SQLite's integrity check and be a moat state no newer than this moat. The current
    /// database is kept as state.db.before-restore-<time>; the next daemon reconciles the
    /// sandboxes with the VMs and disks that really exist (see docs/state.md).
    Restore {
        /// A file written by `moat state backup`, or one of $MOAT_HOME/backups/state-*.db.
        file: PathBuf,
    },
}

/// `moat serve`'s retention settings: events, state backups, ended sandboxes.
#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Delete events older than this (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION", env = "MOAT_EVENTS_MAX_AGE", value_parser = parse_duration,
          default_value = "30d")]
    pub events_max_age: Duration,
    /// Keep at most this many events in all (each sandbox keeps at most its newest 1000 besides).
    #[arg(long, value_name = "N", env = "MOAT_EVENTS_MAX", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub events_max: u64,
    /// Copy the state database to $MOAT_HOME/backups/state-<UTC time>.db this often (`0` or
    /// `off`: never).
    #[arg(long, value_name = "DURATION", env = "MOAT_BACKUP_EVERY", value_parser = parse_every,
          default_value = "24h")]
    pub backup_every: Every,
    /// Keep this many of those backups (the newest).
    #[arg(long, value_name = "N", env = "MOAT_BACKUP_KEEP", default_value_t = 7,
          value_parser = clap::value_parser!(u64).range(1..10_000))]
    pub backup_keep: u64,
    /// Remove stopped, failed and expired sandboxes this long after they ended (paused ones stay).
    #[arg(long, value_name = "DURATION", env = "MOAT_PRUNE_AFTER", value_parser = parse_duration)]
    pub prune_after: Option<Duration>,
}

/// A period, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every(pub Option<Duration>);

fn parse_every(s: &str) -> Result<Every, String> {
    match s.trim() {
        "0" | "off" | "never" => Ok(Every(None)),
        s => parse_duration(s).map(|d| Every(Some(d))),
    }
}

impl RetentionArgs {
    /// The daemon's setting.
    pub fn retention(&self) -> moat_daemon::service::backups::Retention {
        use moat_daemon::service::backups::{BackupSchedule, Retention};
        Retention {
            events: moat_daemon::state::EventRetention { max_age: self.events_max_age, max_events: self.events_max },
            backups: BackupSchedule { every: self.backup_every.0, keep: self.backup_keep as usize },
            prune_after: self.prune_after,
        }
    }
}
