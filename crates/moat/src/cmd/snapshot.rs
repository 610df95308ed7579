//! Snapshots, reverts, forks, pause and resume.

use moat_api::{Fork, SnapshotInfo};

use crate::cli::{ForkArgs, ForkVolumesArg, HostArgs, RefsArgs, SnapshotArgs, SnapshotCommand};
use crate::cmd::daemon::connect;
use crate::cmd::sandbox::{ago_or_in, each};

pub async fn snapshot(args: SnapshotArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    match (args.command, args.sandbox) {
        (Some(SnapshotCommand::Ls { sandbox, json }), _) => {
            let list = client.snapshots(sandbox.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
            Ok(0)
        }
        (Some(SnapshotCommand::Rm { snapshots }), _) => {
            each(&snapshots, |r| {
                let client = client.clone();
                async move { client.remove_snapshot(&r).await.map(|s| s.reference()) }
            })
            .await
        }
        (None, Some(sandbox)) => {
            let s = client.snapshot(&sandbox, args.name).await?;
            println!("{}", s.reference());
            Ok(0)
        }
        (None, None) => Err(crate::error::Hinted::new(
            "say which sandbox to snapshot",
            "`moat snapshot BOX [--name NAME]`, `moat snapshot ls [BOX]`, `moat snapshot rm SNAPSHOT`",
        )
        .into()),
    }
}

fn print_table(list: &[SnapshotInfo]) {
    println!(
        "{:<12}  {:<32}  {:<8}  {:<10}  {:>7}  {:>9}  {:<10}  USED BY",
        "ID", "SNAPSHOT", "KIND", "IMAGE", "MEMORY", "SIZE", "CREATED"
    );
    for s in list {
        println!(
            "{:<12}  {:<32}  {:<8}  {:<10}  {:>6}M  {:>8}M  {:<10}  {}",
            s.id,
            s.reference(),
            s.kind.as_str(),
            s.image,
            s.memory_mib,
            s.size_bytes.div_ceil(1 << 20),
            ago_or_in(s.created_at),
            if s.dependents.is_empty() { "-".to_string() } else { s.dependents.join(",") }
        );
    }
}

pub async fn revert(sandbox: &str, snapshot: &str, host: &HostArgs) -> anyhow::Result<i32> {
    let s = connect(host).await?.revert(sandbox, snapshot).await?;
    println!("{}", s.name);
    Ok(0)
}

pub async fn fork(args: ForkArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let volumes = match args.volumes {
        ForkVolumesArg::Refuse => moat_api::ForkVolumes::Refuse,
        ForkVolumesArg::Copy => moat_api::ForkVolumes::Copy,
    };
    let req = Fork {
        count: Some(args.count),
        name_prefix: args.name_prefix,
        snapshot: args.snapshot,
        volumes: Some(volumes),
    };
    let forked = connect(host).await?.fork(&args.sandbox, &req).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&forked)?);
    } else {
        for s in &forked.sandboxes {
            println!("{}", s.name);
        }
        if args.timeline {
            // On stderr, so scripts reading the names on stdout are not disturbed.
            eprintln!(
                "{:<24} {:>8} {:>11} {:>10} {:>7} {:>7}",
                "SANDBOX", "PREPARE", "QEMU START", "STATE LOAD", "AGENT", "TOTAL"
            );
            for t in &forked.timeline {
                eprintln!(
                    "{:<24} {:>6}ms {:>9}ms {:>8}ms {:>5}ms {:>5}ms",
                    t.name, t.prepare_ms, t.qemu_start_ms, t.state_load_ms, t.agent_ms, t.total_ms
                );
            }
        }
    }
    Ok(0)
}

pub async fn pause(args: RefsArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    each(&args.sandboxes, |r| {
        let client = client.clone();
        async move { client.pause(&r).await.map(|s| s.name) }
    })
    .await
}

pub async fn resume(args: RefsArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    each(&args.sandboxes, |r| {
        let client = client.clone();
        async move { client.resume(&r).await.map(|s| s.name) }
    })
    .await
}
