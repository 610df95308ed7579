//! `moat run` and `moat exec`: a process in a sandbox, with live output, stdin and signals.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use moat_api::{CreateSandbox, ExecStart, OnExpire};
use moat_client::{Client, ExecInput, ExecOutput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{CreateArgs, ExecArgs, HostArgs, OnExpireArg, ProcessArgs, RunArgs};
use crate::cmd::daemon::connect;

/// After the first Ctrl-C the command gets this long to exit on SIGINT before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// A one-shot sandbox gets this lease until its command starts, so a `moat run` killed before
/// then does not leave it running for ever; once the command runs, the session owns its life.
const ONE_SHOT_LEASE_SECS: u64 = 600;

pub fn create_request(c: &CreateArgs) -> CreateSandbox {
    CreateSandbox {
        name: c.name.clone(),
        image: Some(c.image.clone()),
        vcpus: Some(c.cpus),
        memory_mib: Some(c.memory),
        disk_mib: Some(c.disk),
        ttl_secs: c.ttl.map(|d| d.as_secs().max(1)),
        on_expire: Some(match c.on_expire {
            OnExpireArg::Stop => OnExpire::Stop,
            OnExpireArg::Remove => OnExpire::Remove,
        }),
        hostname: c.hostname.clone(),
        boot_timeout_secs: Some(c.boot_timeout.as_secs().max(1)),
    }
}

/// Returns the exit code `moat` should exit with: the command's.
pub async fn run(args: RunArgs, host: &HostArgs) -> anyhow::Result<i32> {
    if args.detach && !args.command.is_empty() {
        bail!("`moat run -d` creates a sandbox and takes no command\nhint: run `moat run -d --name box`, then `moat exec box -- CMD`");
    }
    let client = connect(host).await?;
    crate::cmd::image::ensure_image(&client, &args.create.image).await?;
    let mut req = create_request(&args.create);
    if args.detach {
        let info = client.create(&req).await?;
        println!("{}", info.name);
        return Ok(0);
    }
    if req.ttl_secs.is_none() {
        req.ttl_secs = Some(ONE_SHOT_LEASE_SECS);
    }
    let info = client.create(&req).await?;
    let start = exec_start(&args.process, args.command, true);
    let result = run_process(&client, &info.id, start).await;
    // The daemon removes the sandbox when the session ends; asking too waits until it is gone
    // (and covers a failure before the session began).
    match client.remove(&info.id, true).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(moat_api::ErrorCode::NotFound) => {}
        Err(e) if result.is_ok() => return Err(e).context("removing the sandbox"),
        Err(_) => {}
    }
    result
}

pub async fn exec(args: ExecArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    run_process(&client, &args.sandbox, exec_start(&args.process, args.command, false)).await
}

fn forward_stdin(p: &ProcessArgs) -> bool {
    p.interactive || !std::io::stdin().is_terminal()
}

fn exec_start(p: &ProcessArgs, argv: Vec<String>, remove_sandbox_after: bool) -> ExecStart {
    ExecStart {
        argv,
        env: p.env.clone(),
        cwd: p.workdir.clone(),
        user: p.user.clone(),
        timeout_ms: p.timeout.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
        stdin: forward_stdin(p),
        remove_sandbox_after,
    }
}

async fn run_process(client: &Client, sandbox: &str, start: ExecStart) -> anyhow::Result<i32> {
    let stdin = start.stdin;
    let session = client.exec(sandbox, &start).await?;
    let (input, mut output) = session.split();
    let input = std::sync::Arc::new(tokio::sync::Mutex::new(input));
    if stdin {
        tokio::spawn(pump_stdin(input.clone()));
    }
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        let deadline = kill_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
        tokio::select! {
            event = output.next() => match event? {
                ExecOutput::Stdout(data) => {
                    stdout.write_all(&data).await.context("writing to stdout")?;
                    stdout.flush().await.context("writing to stdout")?;
                }
                ExecOutput::Stderr(data) => {
                    stderr.write_all(&data).await.context("writing to stderr")?;
                    stderr.flush().await.context("writing to stderr")?;
                }
                ExecOutput::Exit { code, signal, timed_out } => {
                    if timed_out {
                        eprintln!("moat: the command timed out and was killed");
                    }
                    return Ok(ExecOutput::shell_code(code, signal));
                }
                ExecOutput::Failed(e) => bail!("{}\nhint: {}", e.message, e.hint),
                ExecOutput::Started(_) => {}
            },
            _ = sigint.recv() => {
                if kill_at.is_some() {
                    input.lock().await.signal(libc::SIGKILL).await?;
                } else {
                    input.lock().await.signal(libc::SIGINT).await?;
                    kill_at = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
                }
            }
            _ = sigterm.recv() => input.lock().await.signal(libc::SIGKILL).await?,
            _ = sighup.recv() => input.lock().await.signal(libc::SIGKILL).await?,
            _ = tokio::time::sleep_until(deadline), if kill_at.is_some() => {
                input.lock().await.signal(libc::SIGKILL).await?;
                kill_at = None;
            }
        }
    }
}

async fn pump_stdin(input: std::sync::Arc<tokio::sync::Mutex<ExecInput>>) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if input.lock().await.stdin(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = input.lock().await.close_stdin().await;
}
