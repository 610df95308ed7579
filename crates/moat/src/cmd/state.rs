//! `moat state …`: backups of the daemon's state database.

use crate::cli::{HostArgs, StateCommand};

pub async fn state(_command: StateCommand, _host: &HostArgs) -> anyhow::Result<i32> {
    anyhow::bail!("moat state is not built yet")
}
