//! `moat state …`: the daemon's state database.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Copy the state database, consistently, while the daemon runs.
    Backup {
        /// Where to write the copy.
        file: PathBuf,
    },
}
