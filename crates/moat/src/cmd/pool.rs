//! `moat pool`: warm pools of restored, paused sandboxes that creates claim.

use moat_api::PoolInfo;

use crate::cli::{HostArgs, PoolCommand};
use crate::cmd::daemon::connect;

pub async fn pool(cmd: PoolCommand, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    match cmd {
        PoolCommand::Ls { json } => {
            let list = client.pools().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
        }
        PoolCommand::Set { pool, size, json } => {
            let p = client.set_pool(&pool.to_request(size)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else if size == 0 {
                println!("pool of {} removed", p.image);
            } else {
                print_table(&[p]);
            }
        }
        PoolCommand::Rm { pool } => {
            let p = client.set_pool(&pool.to_request(0)).await?;
            println!("pool of {} removed", p.image);
        }
    }
    Ok(0)
}

fn print_table(list: &[PoolInfo]) {
    println!(
        "{:<20}  {:>4}  {:>7}  {:>7}  {:>4}  {:>5}  {:>8}  {:>7}  ERROR",
        "IMAGE", "CPUS", "MEMORY", "DISK", "SIZE", "READY", "STARTING", "CLAIMED"
    );
    for p in list {
        println!(
            "{:<20}  {:>4}  {:>6}M  {:>6}M  {:>4}  {:>5}  {:>8}  {:>7}  {}",
            p.image,
            p.vcpus,
            p.memory_mib,
            p.disk_mib,
            p.size,
            p.ready,
            p.starting,
            p.claimed,
            p.last_error.as_deref().unwrap_or("-")
        );
    }
}
