//! `moat mcp`: the MCP server on stdin and stdout, a client of this home's daemon. Stdout belongs
//! to the protocol; everything else goes to stderr.

use std::time::Duration;

use anyhow::Context;
use moat_client::ClientError;
use moat_mcp::{Flags, HostFiles, Policy};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{HostArgs, McpArgs};
use crate::cmd::daemon::connect;

/// How often the session tells the daemon it is still there (an auto-started daemon exits when
/// idle), and starts it again if it went away.
const KEEP_DAEMON_EVERY: Duration = Duration::from_secs(60);

pub async fn mcp(args: McpArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let host_files = if args.no_host_files {
        HostFiles::Off
    } else {
        let dir = match args.host_dir {
            Some(d) => d,
            None => std::env::current_dir().context("finding the working directory")?,
        };
        let dir = dir.canonicalize().with_context(|| format!("the host directory {}", dir.display()))?;
        HostFiles::Under(dir)
    };
    let policy = Policy {
        all_sandboxes: args.all_sandboxes,
        max_sandboxes: args.max_sandboxes,
        exec_per_minute: args.exec_rate,
        max_output: usize::try_from(args.max_output).unwrap_or(usize::MAX).max(1),
        default_image: args.image,
        idle_ttl: args.idle_timeout,
        host_files,
        allow_public_ports: args.allow_public_ports,
        max_cpus: args.max_cpus,
        max_memory_mib: args.max_memory,
        max_disk_mib: args.max_disk,
        flags: Flags::Stdio,
    };
    let client = connect(host).await?;
    let keeper = {
        let (client, host) = (client.clone(), host.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(KEEP_DAEMON_EVERY).await;
                if let Err(ClientError::Connect { .. }) = client.health().await {
                    if let Err(e) = connect(&host).await {
                        let e = crate::error::render(&e);
                        eprintln!("moat: the daemon is gone and could not be started again: {e}");
                    }
                }
            }
        })
    };
    // MCP clients stop servers with SIGTERM (after closing stdin): the session's sandboxes are
    // still removed.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let served = moat_mcp::serve_stdio(client, policy, shutdown).await;
    keeper.abort();
    served?;
    Ok(0)
}
