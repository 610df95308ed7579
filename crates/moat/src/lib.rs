//! The `moat` command: CLI parsing and one module per command.
// The doc comments of the CLI's types are clap's help text, written for a terminal
// (`[default: sb-<id>]`, `[REGISTRY/]NAME`), not rustdoc markup.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

pub mod cli;
pub mod cmd;
pub mod config;
pub mod error;

use cli::{Cli, Command};

/// Run the parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    let host = &cli.host;
    cmd::image::VERBOSE.store(cli.verbose, std::sync::atomic::Ordering::Relaxed);
    match cli.command {
        Command::Run(args) => cmd::run::run(*args, host).await,
        Command::Exec(args) => cmd::run::exec(args, host).await,
        Command::Shell(args) => cmd::run::shell(args, host).await,
        Command::Cp(args) => cmd::cp::cp(args, host).await,
        Command::Ps(args) => match args.sandbox {
            Some(sandbox) => cmd::process::list(&sandbox, args.json, host).await,
            None => cmd::ps::ps(args, host).await,
        },
        Command::Top { sandbox, json } => cmd::process::list(&sandbox, json, host).await,
        Command::Attach { process, no_replay } => cmd::process::attach(process, !no_replay, host).await,
        Command::Kill { process, signal } => cmd::process::kill(process, &signal, host).await,
        Command::Wait { process } => cmd::process::wait(process, host).await,
        Command::Inspect(args) => cmd::sandbox::inspect(args, host).await,
        Command::Stop(args) => cmd::sandbox::stop(args, host).await,
        Command::Start(args) => cmd::sandbox::start(args, host).await,
        Command::Rm(args) => cmd::sandbox::rm(args, host).await,
        Command::Lease(args) => cmd::sandbox::lease(args, host).await,
        Command::Logs(args) => cmd::sandbox::logs(args, host).await,
        Command::Events(args) => cmd::sandbox::events(args, host).await,
        Command::Snapshot(args) => cmd::snapshot::snapshot(args, host).await,
        Command::Revert { sandbox, snapshot } => cmd::snapshot::revert(&sandbox, &snapshot, host).await,
        Command::Fork(args) => cmd::snapshot::fork(args, host).await,
        Command::Pause(args) => cmd::snapshot::pause(args, host).await,
        Command::Resume(args) => cmd::snapshot::resume(args, host).await,
        Command::Net(command) => cmd::net::net(command, host).await,
        Command::PortForward(args) => cmd::net::port_forward(args, host).await,
        Command::Prune => cmd::sandbox::prune(host).await,
        Command::Gc => cmd::sandbox::gc(host).await,
        Command::Image(cmd) => cmd::image::image(cmd, host).await,
        Command::Volume(cmd) => cmd::volume::volume(cmd, host).await,
        Command::Pool(cmd) => cmd::pool::pool(cmd, host).await,
        Command::Serve(args) => cmd::daemon::serve(*args, host).await,
        Command::Mcp(args) => cmd::mcp::mcp(args, host).await,
        Command::E2b(crate::cli::E2bCommand::Env) => cmd::e2b::env(host).await,
        Command::Doctor(args) => cmd::doctor::doctor(args, host).await,
        Command::Config(crate::cli::ConfigCommand::Show { json }) => cmd::config::show(json),
        Command::Setup(args) => cmd::setup::setup(args, host).await,
        Command::Daemon(command) => cmd::daemon::daemon(command, host).await,
        Command::Df(args) => cmd::df::df(args, host).await,
        Command::State(command) => cmd::state::state(command, host).await,
    }
}
