//! `moat df`: where the disk went.

use crate::cli::{DfArgs, HostArgs};

pub async fn df(_args: DfArgs, _host: &HostArgs) -> anyhow::Result<i32> {
    anyhow::bail!("moat df is not built yet")
}
