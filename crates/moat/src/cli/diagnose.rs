//! `moat doctor` and `moat df`: what is wrong, and where the disk went.

use clap::Args;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DfArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
