//! Snapshots, reverts, forks, pause and resume.

use futures_util::StreamExt;
use moat_api::{Fork, SnapshotInfo, SnapshotTransfer};
use moat_client::Client;

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
        (Some(SnapshotCommand::Push { snapshot, reference, insecure }), _) => {
            let (username, password) = login(&reference)?;
            let req = SnapshotTransfer { reference: reference.clone(), insecure, username, password };
            let pushed =
                showing_progress(&client, &format!("push {reference}: "), client.push_snapshot(&snapshot, &req))
                    .await?;
            eprintln!(
                "moat: sent {} MiB; the registry had {} MiB already",
                pushed.uploaded_bytes.div_ceil(1 << 20),
                pushed.reused_bytes >> 20
            );
            println!("{}@{}", pushed.reference, pushed.digest);
            Ok(0)
        }
        (Some(SnapshotCommand::Pull { reference, insecure }), _) => {
            let (username, password) = login(&reference)?;
            let req = SnapshotTransfer { reference: reference.clone(), insecure, username, password };
            let s = showing_progress(&client, &format!("pull {reference}: "), client.pull_snapshot(&req)).await?;
            println!("{}", s.id);
            Ok(0)
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

/// The Docker config's user and password for the registry of `reference`, if it has some.
fn login(reference: &str) -> anyhow::Result<(Option<String>, Option<String>)> {
    Ok(crate::cmd::image::docker_credentials(reference)?.map_or((None, None), |(u, p)| (Some(u), Some(p))))
}

/// Run `call`, printing the daemon's events that start with `prefix` on stderr meanwhile.
async fn showing_progress<T>(
    client: &Client,
    prefix: &str,
    call: impl std::future::Future<Output = Result<T, moat_client::ClientError>>,
) -> anyhow::Result<T> {
    let events = client.events(-1, true).await?;
    let show = events.for_each(|e| {
        if let Some(m) = e
            .ok()
            .filter(|e| e.kind == moat_api::SNAPSHOT_EVENT)
            .and_then(|e| e.message.strip_prefix(prefix).map(str::to_owned))
        {
            eprintln!("moat: {m}");
        }
        std::future::ready(())
    });
    tokio::pin!(call);
    let result = tokio::select! {
        r = &mut call => r,
        _ = show => call.await,
    };
    Ok(result?)
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
    let client = connect(host).await?;
    let forked = match &args.sandbox {
        Some(sandbox) => client.fork(sandbox, &req).await?,
        None => {
            let snapshot = req.snapshot.clone().unwrap_or_default();
            let req = Fork { snapshot: None, volumes: None, ..req };
            let snapshot = if moat_api::is_remote_snapshot(&snapshot) {
                let (username, password) = login(&snapshot)?;
                let pull = SnapshotTransfer { reference: snapshot.clone(), insecure: false, username, password };
                showing_progress(&client, &format!("pull {snapshot}: "), client.pull_snapshot(&pull)).await?.id
            } else {
                snapshot
            };
            client.fork_snapshot(&snapshot, &req).await?
        }
    };
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
