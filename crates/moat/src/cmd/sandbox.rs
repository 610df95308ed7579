//! Managing sandboxes through the daemon: ps, inspect, stop, start, rm, lease, logs, events,
//! prune, gc.

use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use moat_api::{escape_controls, ControlEscaper, LogSource, Reclaimed, SandboxInfo};
use tokio::io::AsyncWriteExt;

use crate::cli::{EventsArgs, HostArgs, InspectArgs, LeaseCommand, LogSourceArg, LogsArgs, RefsArgs, RmArgs};
use crate::cmd::daemon::connect;

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `42s`, `5m`, `3h`, `2d`: how far `t` is from now, for tables.
pub(crate) fn ago_or_in(t: i64) -> String {
    let d = (t - now()).unsigned_abs();
    let s = match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        7200..=172_799 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    };
    if t <= now() {
        format!("{s} ago")
    } else {
        format!("in {s}")
    }
}

pub async fn inspect(args: InspectArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    let s = client.inspect(&args.sandbox).await?;
    let lifecycle = client.lifecycle(&s.id).await?;
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        v["lifecycle"] = serde_json::to_value(&lifecycle)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    print_info(&s);
    println!("lifecycle:");
    for e in lifecycle {
        let err = e.error.map(|e| format!("  ({})", escape_controls(e.lines().next().unwrap_or_default())));
        let err = err.unwrap_or_default();
        println!("  v{:<3} {:<9} {}{err}", e.version, e.phase, ago_or_in(e.at_ms / 1000));
    }
    Ok(0)
}

fn describe_isolation(iso: &moat_api::Isolation) -> String {
    let uid =
        if iso.own_uid { format!("uid {} (its own)", iso.uid) } else { format!("uid {} (the daemon's)", iso.uid) };
    if iso.namespaces.is_empty() {
        return format!("{uid}, not jailed (MOAT_JAIL=off)");
    }
    format!("{uid}, jailed; namespaces of its own: {}", iso.namespaces.join(", "))
}

fn describe_cgroup(cg: &moat_api::CgroupUsage) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    let of = |used: Option<u64>, limit: Option<u64>, show: &dyn Fn(u64) -> String| match (used, limit) {
        (Some(u), Some(l)) if l != u64::MAX => format!("{} of {}", show(u), show(l)),
        (Some(u), _) => format!("{} (no limit)", show(u)),
        _ => "unknown".to_string(),
    };
    format!(
        "cgroup {}: memory {}, tasks {}",
        cg.version,
        of(cg.memory_bytes, cg.memory_limit_bytes, &mib),
        of(cg.pids, cg.pids_limit, &|n| n.to_string())
    )
}

fn print_info(s: &SandboxInfo) {
    println!("id:          {}", s.id);
    println!("name:        {}", s.name);
    println!("phase:       {}", s.phase);
    println!("image:       {} ({})", s.image, s.image_digest);
    match s.accel.as_str() {
        "tcg" => println!("accel:       tcg (software emulation: QEMU is the only boundary, not a hardware one)"),
        accel => println!("accel:       {accel}"),
    }
    println!("vcpus:       {}", s.vcpus);
    println!("memory:      {} MiB", s.memory_mib);
    println!("disk:        {} MiB", s.disk_mib);
    println!("hostname:    {}", s.hostname);
    println!("created:     {}", ago_or_in(s.created_at));
    match s.expires_at {
        Some(t) => println!("expires:     {} (then {:?})", ago_or_in(t), s.on_expire),
        None => println!("expires:     never"),
    }
    if let Some(idle) = s.idle {
        println!("idle:        {} after {}s unused", idle.action.as_str(), idle.secs);
    }
    if let Some(pid) = s.pid {
        println!("qemu pid:    {pid}");
    }
    if let Some(iso) = &s.isolation {
        println!("isolation:   {}", describe_isolation(iso));
        match &iso.cgroup {
            Some(cg) => println!("limits:      {}", describe_cgroup(cg)),
            None => println!("limits:      none (no usable cgroup on this host; see moat doctor)"),
        }
    }
    if let Some(id) = &s.snapshot_id {
        println!("from:        snapshot {id}");
    }
    if !s.labels.is_empty() {
        println!("labels:");
        for (k, v) in &s.labels {
            println!("  {}={}", escape_controls(k), escape_controls(v));
        }
    }
    if !s.env.is_empty() {
        println!("environment:");
        for (k, v) in &s.env {
            println!("  {}={}", escape_controls(k), escape_controls(v));
        }
    }
    if !s.mounts.is_empty() {
        println!("mounts:");
        for m in &s.mounts {
            let kind = match m.kind {
                moat_api::MountType::Volume => "volume",
                moat_api::MountType::Host => "host",
            };
            let ro = if m.readonly { " (read-only)" } else { "" };
            println!("  {} {kind} {}{ro}", escape_controls(&m.target), escape_controls(&m.source));
        }
    }
    println!("network:");
    for line in crate::cmd::net::describe(&s.net).lines() {
        println!("  {line}");
    }
    if let Some(e) = &s.last_error {
        // It can quote the guest's console.
        println!("last error:  {}", escape_controls(e));
    }
}

pub async fn stop(args: RefsArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    each(&args.sandboxes, |r| {
        let client = client.clone();
        async move { client.stop(&r).await.map(|s| s.name) }
    })
    .await
}

pub async fn start(args: RefsArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    each(&args.sandboxes, |r| {
        let client = client.clone();
        async move { client.start(&r).await.map(|s| s.name) }
    })
    .await
}

pub async fn rm(args: RmArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    let force = args.force;
    each(&args.sandboxes, |r| {
        let client = client.clone();
        async move { client.remove(&r, force).await.map(|s| s.name) }
    })
    .await
}

/// Apply an operation to each reference; print the names that worked and the errors of the rest.
pub(crate) async fn each<F, Fut>(refs: &[String], op: F) -> anyhow::Result<i32>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<String, moat_client::ClientError>>,
{
    let mut failed = 0;
    for r in refs {
        match op(r.clone()).await {
            Ok(name) => println!("{name}"),
            Err(e) => {
                eprintln!("moat: error: {r}: {}", crate::error::render_error(&e));
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

pub async fn lease(cmd: LeaseCommand, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    match cmd {
        LeaseCommand::Renew { sandbox, ttl } => {
            let s = client.renew(&sandbox, ttl.as_secs().max(1)).await?;
            println!("{} expires {}", s.name, s.expires_at.map(ago_or_in).unwrap_or_else(|| "never".into()));
        }
    }
    Ok(0)
}

pub async fn logs(args: LogsArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    let source = match args.source {
        LogSourceArg::Console => LogSource::Console,
        LogSourceArg::Qemu => LogSource::Qemu,
    };
    let q = moat_api::LogsQuery { source, follow: args.follow, tail: args.tail, since_ms: args.since };
    let mut stream = Box::pin(client.logs_query(&args.sandbox, &q).await?);
    let mut out = tokio::io::stdout();
    // The guest wrote the console: on a terminal its control sequences are shown, not obeyed
    // (like journalctl); a pipe or file gets the bytes as they are.
    let mut escaper = std::io::stdout().is_terminal().then(ControlEscaper::default);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        match &mut escaper {
            Some(e) => out.write_all(e.push(&chunk).as_bytes()).await?,
            None => out.write_all(&chunk).await?,
        }
        out.flush().await?;
    }
    if let Some(e) = &mut escaper {
        out.write_all(e.finish().as_bytes()).await?;
        out.flush().await?;
    }
    Ok(0)
}

pub async fn events(args: EventsArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    let q = moat_api::EventsQuery {
        since: 0,
        follow: args.follow,
        sandbox: args.sandbox,
        kind: args.kind,
        from_ms: args.since,
        until_ms: args.until,
    };
    let mut stream = Box::pin(client.events_query(&q).await?);
    while let Some(e) = stream.next().await {
        let e = e?;
        if args.json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            let message = escape_controls(&e.message);
            println!("{:>6}  {:<10}  {:<12}  {message}", e.seq, ago_or_in(e.at_ms / 1000), e.kind);
        }
    }
    Ok(0)
}

fn print_reclaimed(r: &Reclaimed) {
    for s in &r.sandboxes {
        println!("removed sandbox {s}");
    }
    for p in &r.processes {
        println!("killed QEMU pid {p}");
    }
    for p in &r.paths {
        println!("removed {p}");
    }
    if r == &Reclaimed::default() {
        println!("nothing to reclaim");
    }
}

pub async fn prune(host: &HostArgs) -> anyhow::Result<i32> {
    print_reclaimed(&connect(host).await?.prune().await?);
    Ok(0)
}

pub async fn gc(host: &HostArgs) -> anyhow::Result<i32> {
    print_reclaimed(&connect(host).await?.gc().await?);
    Ok(0)
}
