//! Named volumes: create, list, inspect, remove.

use moat_api::{CreateVolume, VolumeInfo};

use crate::cli::{HostArgs, VolumeCommand};
use crate::cmd::daemon::connect;
use crate::cmd::sandbox::{ago_or_in, each};

pub async fn volume(cmd: VolumeCommand, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    match cmd {
        VolumeCommand::Create { name, size } => {
            let v = client.create_volume(&CreateVolume { name, size_bytes: size }).await?;
            println!("{}", v.name);
        }
        VolumeCommand::Ls { json } => {
            let list = client.volumes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
        }
        VolumeCommand::Inspect { volume, json } => {
            let v = client.volume(&volume).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_info(&v);
            }
        }
        VolumeCommand::Rm { force, volumes } => {
            return each(&volumes, |r| {
                let client = client.clone();
                async move { client.remove_volume(&r, force).await.map(|v| v.name) }
            })
            .await
        }
    }
    Ok(0)
}

/// `10.0G`, `37.2M`, `512K`, `0B`: powers of 1024, as `--size` takes them.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn used(v: &VolumeInfo) -> String {
    v.used_bytes.map(size).unwrap_or_else(|| "?".into())
}

fn print_table(list: &[VolumeInfo]) {
    println!(
        "{:<12}  {:<20}  {:>7}  {:>7}  {:>9}  {:<10}  USED BY",
        "ID", "NAME", "SIZE", "USED", "ALLOCATED", "CREATED"
    );
    for v in list {
        let users: Vec<&str> = v.users.iter().map(|u| u.sandbox_name.as_str()).collect();
        println!(
            "{:<12}  {:<20}  {:>7}  {:>7}  {:>9}  {:<10}  {}",
            v.id,
            v.name,
            size(v.size_bytes),
            used(v),
            size(v.allocated_bytes),
            ago_or_in(v.created_at),
            if users.is_empty() { "-".to_string() } else { users.join(",") }
        );
    }
}

fn print_info(v: &VolumeInfo) {
    println!("id:          {}", v.id);
    println!("name:        {}", v.name);
    println!("size:        {} ({} bytes)", size(v.size_bytes), v.size_bytes);
    match v.used_bytes {
        Some(u) => println!("used:        {} ({} bytes)", size(u), u),
        None => println!("used:        unknown (no ext4 file system moat can read)"),
    }
    println!("allocated:   {} on the host's disk", size(v.allocated_bytes));
    println!("created:     {}", ago_or_in(v.created_at));
    if v.users.is_empty() {
        println!("users:       none");
        return;
    }
    println!("users:");
    for u in &v.users {
        println!(
            "  {:<20}  {:<24}  {}  {}",
            u.sandbox_name,
            u.path,
            if u.readonly { "ro" } else { "rw" },
            if u.running { "running" } else { "not running" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_the_size_flag_writes_them() {
        assert_eq!(size(0), "0B");
        assert_eq!(size(1023), "1023B");
        assert_eq!(size(16 << 20), "16.0M");
        assert_eq!(size(10 << 30), "10.0G");
        assert_eq!(size((3 << 29) + 1), "1.5G");
        assert_eq!(size(16 << 40), "16.0T");
        assert_eq!(size(u64::MAX), "16777216.0T");
    }
}
