//! One module per command (or family of commands).

pub mod config;
pub mod cp;
pub mod daemon;
pub mod df;
pub mod doctor;
pub mod e2b;
pub mod image;
pub mod mcp;
pub mod net;
pub mod pool;
pub mod process;
pub mod ps;
pub mod run;
pub mod sandbox;
pub mod setup;
pub mod snapshot;
pub mod state;
pub mod volume;

use moat_sandbox::{Runtime, RuntimeConfig};

use crate::cli::HostArgs;

/// The runtime config from the environment, with the command-line flags on top.
pub fn runtime_config(host: &HostArgs) -> anyhow::Result<RuntimeConfig> {
    let mut config = RuntimeConfig::from_env()?;
    config.accel = host.accel;
    if let Some(home) = &host.home {
        config.home = home.clone();
    }
    if let Some(kernel) = &host.kernel {
        config.kernel = Some(kernel.clone());
    }
    Ok(config)
}

/// One line saying that VMs run degraded (TCG instead of KVM), or nothing.
pub fn tcg_notice(accel: &str, reason: &str) -> Option<String> {
    (accel == "tcg" && reason.starts_with("kvm unusable")).then(|| {
        // One line: the full probe output is in `moat doctor`.
        let why = reason.lines().next().unwrap_or_default().trim_end_matches("; using TCG (slow)");
        format!("moat: using TCG software emulation, slower than KVM ({why}; details: moat doctor)")
    })
}

/// Prepare the runtime in this process (setup, doctor) and say so when it runs degraded.
pub async fn prepare_runtime(host: &HostArgs) -> anyhow::Result<Runtime> {
    let rt = Runtime::prepare(runtime_config(host)?).await?;
    if let Some(notice) = tcg_notice(&rt.accel.accel.to_string(), &rt.accel.reason) {
        eprintln!("{notice}");
    }
    Ok(rt)
}
