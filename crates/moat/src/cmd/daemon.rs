//! `moat serve`, and finding (or starting) the daemon for every other command.

mod control;
pub mod log_file;
pub mod reach;

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moat_client::{Client, ClientError};

use crate::cli::{HostArgs, ServeArgs};
use crate::cmd::{runtime_config, tcg_notice};
use crate::error::Hinted;

/// How long an auto-started daemon waits without sandboxes or requests before it exits
/// (`MOAT_IDLE_EXIT` overrides it).
const AUTO_IDLE_EXIT: &str = "10m";
/// How long the first start may take: the initramfs and minimal image are built, KVM is probed.
const START_TIMEOUT: Duration = Duration::from_secs(180);

pub async fn serve(args: ServeArgs, host: &HostArgs) -> anyhow::Result<i32> {
    if args.require_kvm && host.accel == moat_vmm::AccelChoice::Tcg {
        return Err(Hinted::new(
            "--require-kvm and --accel tcg contradict each other",
            "drop one of them: --accel auto (or kvm) with --require-kvm runs sandboxes only under KVM",
        )
        .into());
    }
    let e2b = crate::cmd::e2b::Listener::bind(&args, &runtime_config(host)?.home)?;
    let mcp = moat_mcp::Policy {
        all_sandboxes: args.mcp_all_sandboxes,
        max_sandboxes: args.mcp_max_sandboxes,
        exec_per_minute: args.mcp_exec_rate,
        default_image: args.mcp_image,
        host_files: match args.mcp_host_dir {
            Some(dir) => moat_mcp::HostFiles::Under(
                dir.canonicalize().with_context(|| format!("the MCP host directory {}", dir.display()))?,
            ),
            None => moat_mcp::HostFiles::Off,
        },
        allow_public_ports: args.mcp_allow_public_ports,
        max_cpus: args.mcp_max_cpus,
        max_memory_mib: args.mcp_max_memory,
        max_disk_mib: args.mcp_max_disk,
        flags: moat_mcp::Flags::Daemon,
        ..Default::default()
    };
    let cfg = moat_daemon::ServeConfig {
        runtime: runtime_config(host)?,
        limits: moat_daemon::Limits {
            max_sandboxes: args.max_sandboxes,
            templates: !args.no_templates,
            template_store: match args.template_store {
                Some(store) => Some(template_store(&store)?),
                None => None,
            },
            host_addresses: args.host_address,
            memory_overcommit: args.memory_overcommit,
            disk_overcommit: args.disk_overcommit,
            require_kvm: args.require_kvm,
            ..Default::default()
        },
        tcp: match args.tcp {
            Some(addr) => Some(moat_daemon::listen::TcpConfig {
                addr,
                tls: moat_daemon::listen::TlsFiles::pair(args.tls_cert, args.tls_key)?,
                insecure: args.insecure_tcp,
            }),
            None => None,
        },
        group: args.group,
        idle_exit: args.idle_exit,
        reset_state: args.reset_state,
        retention: args.retention.retention(),
    };
    // The MCP endpoint and the E2B API call the daemon in this process through its door: the
    // same API a client outside gets, without a trip through the socket.
    let mut announced = None;
    let fronts = |door: moat_daemon::Door| {
        let client = Client::in_process(std::sync::Arc::new(move || Box::new(door.connect())));
        announced = e2b.map(|e2b| e2b.serve(client.clone()));
        axum::Router::new().route_service("/mcp", moat_mcp::http_service(client, mcp))
    };
    let served = moat_daemon::serve(cfg, fronts).await;
    if let Some(file) = announced {
        let _ = std::fs::remove_file(file);
    }
    served?;
    Ok(0)
}

/// A client of the daemon: this home's, started in the background when none answers, or the one
/// `--host` names. It must accept and answer a first request within the deadline (`--timeout`).
pub async fn connect(host: &HostArgs) -> anyhow::Result<Client> {
    let limit = reach::deadline(host)?;
    let home = match reach::Reach::of(host)? {
        reach::Reach::Host(endpoint) => {
            let client = reach::host_client(host, &endpoint)?.with_connect_timeout(limit);
            return match tokio::time::timeout(limit, client.health()).await {
                Ok(Ok(_)) => Ok(client),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(not_answering(None, &client.endpoint(), limit).into()),
            };
        }
        reach::Reach::Home(home) => home,
    };
    let client = Client::new(&moat_daemon::socket_path(&home)).with_connect_timeout(limit);
    match tokio::time::timeout(limit, client.health()).await {
        Ok(Ok(h)) => {
            check_settings(host, &h)?;
            return Ok(client);
        }
        Ok(Err(ClientError::Connect { .. })) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(not_answering(control::daemon_pid(&home), &client.endpoint(), limit).into()),
    }
    let mut daemon = start_daemon(host, &home, None)?;
    let h = wait_started(&client, &mut daemon, &home).await?;
    eprintln!("moat: started the daemon (pid {}, log {})", h.pid, home.join("daemon.log").display());
    if let Some(notice) = tcg_notice(&h.accel, &h.accel_reason) {
        eprintln!("{notice}");
    }
    Ok(client)
}

/// A daemon that accepted the connection but did not answer in time: hung or overloaded.
pub(crate) fn not_answering(pid: Option<i32>, endpoint: &str, limit: Duration) -> Hinted {
    match pid {
        Some(pid) => Hinted::new(
            format!("the daemon (pid {pid}) did not answer within {limit:?}"),
            "it may be stuck or overloaded: `moat daemon restart` restarts it (sandboxes keep running), `moat daemon \
             logs` shows what it did last; --timeout (MOAT_TIMEOUT) waits longer",
        ),
        None => Hinted::new(
            format!("the daemon at {endpoint} did not answer within {limit:?}"),
            "check it on its host (`moat daemon status`, `moat daemon restart` there); --timeout (MOAT_TIMEOUT) \
             waits longer",
        ),
    }
}

/// Wait until a daemon this command started answers (its first start builds the initramfs and
/// minimal image, so it may take minutes).
async fn wait_started(
    client: &Client,
    daemon: &mut std::process::Child,
    home: &Path,
) -> anyhow::Result<moat_api::Health> {
    let started = Instant::now();
    let log = home.join("daemon.log");
    loop {
        // Each try is bounded: a daemon that accepts and then hangs must not hang the CLI.
        let answer = tokio::time::timeout(Duration::from_secs(30), client.health()).await;
        match answer {
            Ok(Ok(h)) => return Ok(h),
            Ok(Err(ClientError::Connect { .. })) | Err(_) if started.elapsed() < START_TIMEOUT => {
                if let Ok(Some(status)) = daemon.try_wait() {
                    // Another CLI may have won the race to start it: then its daemon answers soon.
                    if control::daemon_pid(home).is_none() {
                        bail!("the daemon could not start ({status}):\n{}", log_tail(&log));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => return Err(e).context(format!("the daemon did not come up; see {}", log.display())),
            Err(_) => bail!("the daemon did not come up within {START_TIMEOUT:?}; see {}", log.display()),
        }
    }
}

/// Refuse to silently ignore a kernel or accelerator the running daemon does not use.
fn check_settings(host: &HostArgs, h: &moat_api::Health) -> anyhow::Result<()> {
    if let Some(k) = &host.kernel {
        let wanted = std::fs::canonicalize(k).unwrap_or_else(|_| k.clone());
        let used = std::fs::canonicalize(&h.kernel_path).unwrap_or_else(|_| h.kernel_path.clone().into());
        if wanted != used {
            return Err(Hinted::new(
                format!("the running daemon (pid {}) boots {}, not {}", h.pid, h.kernel_path, k.display()),
                format!(
                    "the kernel is the daemon's setting: stop the daemon (`kill {}`) and run again, or use another \
                     MOAT_HOME",
                    h.pid
                ),
            )
            .into());
        }
    }
    let want_kvm = host.accel == moat_vmm::AccelChoice::Kvm;
    let want_tcg = host.accel == moat_vmm::AccelChoice::Tcg;
    if (want_kvm && h.accel != "kvm") || (want_tcg && h.accel != "tcg") {
        return Err(Hinted::new(
            format!("the running daemon (pid {}) uses {}, not {}", h.pid, h.accel, host.accel),
            format!(
                "the accelerator is the daemon's setting: stop the daemon (`kill {}`) and run again, or use another \
                 MOAT_HOME",
                h.pid
            ),
        )
        .into());
    }
    Ok(())
}

/// Spawn `moat serve` detached from this terminal, logging to `$MOAT_HOME/daemon.log` (which the
/// daemon caps itself, see [`log_file`]). `args` are an earlier daemon's, for a restart.
fn start_daemon(host: &HostArgs, home: &Path, args: Option<Vec<OsString>>) -> anyhow::Result<std::process::Child> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    // Private from the start: the daemon keeps guest memory and disks in here.
    moat_sandbox::create_private_dir(home)?;
    let log_path = home.join("daemon.log");
    // Its stderr too, for what is written before logging starts (a refused start) and panics.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the moat binary")?;
    let mut cmd = std::process::Command::new(exe);
    match args {
        Some(args) => {
            let has = |flag: &str| {
                args.iter().any(|a| a == flag || a.to_str().is_some_and(|a| a.starts_with(&format!("{flag}="))))
            };
            let (home_given, log_given) = (has("--home"), has("--log-file"));
            cmd.args(&args);
            if !home_given {
                cmd.arg("--home").arg(home);
            }
            if !log_given {
                cmd.arg("--log-file").arg(&log_path);
            }
        }
        None => {
            let idle = std::env::var("MOAT_IDLE_EXIT").unwrap_or_else(|_| AUTO_IDLE_EXIT.into());
            cmd.arg("serve").arg("--idle-exit").arg(idle).arg("--home").arg(home);
            cmd.arg("--accel").arg(host.accel.to_string());
            if let Some(k) = &host.kernel {
                cmd.arg("--kernel").arg(k);
            }
            cmd.arg("--log-file").arg(&log_path);
        }
    }
    cmd.env("MOAT_LOG", std::env::var("MOAT_LOG").unwrap_or_else(|_| "info".into()));
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // Its own session: the daemon must outlive this terminal and never get its Ctrl-C.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("starting `moat serve`")
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `moat daemon …`.
pub async fn daemon(command: crate::cli::DaemonCommand, host: &HostArgs) -> anyhow::Result<i32> {
    control::daemon(command, host).await
}

/// `--template-store REGISTRY/REPOSITORY`, checked: templates are pushed to `REPOSITORY:KEY`.
fn template_store(store: &str) -> anyhow::Result<String> {
    let store = store.trim_end_matches('/');
    let tagged = format!("{store}:0");
    if !moat_api::is_remote_snapshot(store) || store.contains('@') || moat_image::registry_of(&tagged).is_err() {
        return Err(crate::error::Hinted::new(
            format!("--template-store {store:?} is not a registry repository"),
            "write REGISTRY/REPOSITORY without a tag, for example registry.example.com/moat/templates",
        )
        .into());
    }
    Ok(store.to_string())
}
