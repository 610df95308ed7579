//! `moat doctor` and `moat df`: what is wrong, and where the disk went.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks (or the smoke test's steps) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Instead of the checks, prove that sandboxes work: through the daemon, create one, exec in
    /// it, write and read a file, fetch from the host over its network, snapshot, restore and
    /// remove it, each step timed. Exits 0 only when every step worked.
    #[arg(long, conflicts_with = "bundle")]
    pub smoke: bool,
    /// With --smoke: when a step fails, keep the sandbox to look at (it is removed otherwise).
    #[arg(long, requires = "smoke")]
    pub keep: bool,
    /// With --smoke: the image to boot.
    #[arg(long, env = "MOAT_IMAGE", default_value = moat_api::DEFAULT_IMAGE)]
    pub image: String,
    /// Write a support bundle (a .tar.gz for a bug report) of these sandboxes (all when none is
    /// named): the checks, the daemon's log, each sandbox's record, lifecycle, events, console
    /// and QEMU logs, the versions and the configuration. The daemon replaces every secret,
    /// token and environment value it knows with [REDACTED].
    #[arg(long, value_name = "BOX", num_args = 0..)]
    pub bundle: Option<Vec<String>>,
    /// With --bundle: the file to write (mode 0600).
    #[arg(long, value_name = "FILE.tar.gz", requires = "bundle")]
    pub out: Option<PathBuf>,
    /// With --bundle: overwrite FILE if it exists.
    #[arg(long, requires = "bundle")]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DfArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}
