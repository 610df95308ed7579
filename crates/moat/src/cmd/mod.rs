//! One module per command.

pub mod doctor;
pub mod run;
pub mod setup;

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

/// Prepare the runtime and say so when it runs degraded (TCG instead of KVM).
pub async fn prepare_runtime(host: &HostArgs) -> anyhow::Result<Runtime> {
    let rt = Runtime::prepare(runtime_config(host)?).await?;
    if rt.accel.accel == moat_vmm::Accel::Tcg && host.accel == moat_vmm::AccelChoice::Auto {
        // One line: the full probe output is in `moat doctor`.
        let why = rt.accel.reason.lines().next().unwrap_or_default().trim_end_matches("; using TCG (slow)");
        eprintln!("moat: using TCG software emulation, slower than KVM ({why}; details: moat doctor)");
    }
    Ok(rt)
}
