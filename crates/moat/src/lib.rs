//! The `moat` command: CLI parsing and one module per command.

pub mod cli;
pub mod cmd;

use cli::{Cli, Command};

/// Run the parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(args) => cmd::run::run(args).await,
        Command::Doctor(args) => cmd::doctor::doctor(args).await,
        Command::Setup(args) => cmd::setup::setup(args).await,
    }
}
