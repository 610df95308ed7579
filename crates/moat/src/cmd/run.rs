//! `moat run`: boot a fresh sandbox, run one command in it with live output, remove the sandbox.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use moat_proto::ExecRequest;
use moat_sandbox::{ExecControl, ExecEvent, Sandbox, SandboxSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RunArgs;
use crate::cmd::prepare_runtime;

/// After the first Ctrl-C the command gets this long to exit on SIGINT before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// Returns the exit code `moat` should exit with: the command's.
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let rt = prepare_runtime(&args.host).await?;
    let spec = SandboxSpec {
        image: args.image.clone(),
        vcpus: args.cpus,
        memory_mib: args.memory,
        hostname: args.hostname.clone(),
        boot_timeout: args.boot_timeout,
        die_with_parent: true,
        ..SandboxSpec::default()
    };
    let sandbox = Sandbox::boot(&rt, &spec).await?;
    let result = run_in(&sandbox, &args).await;
    let destroyed = sandbox.destroy().await;
    let code = result?;
    destroyed.context("removing the sandbox")?;
    Ok(code)
}

async fn run_in(sandbox: &Sandbox, args: &RunArgs) -> anyhow::Result<i32> {
    let forward_stdin = args.interactive || !std::io::stdin().is_terminal();
    let request = ExecRequest {
        argv: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        user: args.user.clone(),
        timeout_ms: args.timeout.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
        stdin: forward_stdin,
    };
    let mut exec = sandbox.exec(request).await?;
    if forward_stdin {
        tokio::spawn(pump_stdin(exec.control()));
    }
    let control = exec.control();
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        let deadline = kill_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
        tokio::select! {
            event = exec.next_event() => match event? {
                ExecEvent::Stdout(data) => {
                    stdout.write_all(&data).await.context("writing to stdout")?;
                    stdout.flush().await.context("writing to stdout")?;
                }
                ExecEvent::Stderr(data) => {
                    stderr.write_all(&data).await.context("writing to stderr")?;
                    stderr.flush().await.context("writing to stderr")?;
                }
                ExecEvent::Exit(status) => {
                    if status.timed_out {
                        eprintln!("moat: the command timed out and was killed");
                    }
                    return Ok(status.shell_code());
                }
            },
            _ = sigint.recv() => {
                if kill_at.is_some() {
                    control.signal(libc::SIGKILL).await?;
                } else {
                    control.signal(libc::SIGINT).await?;
                    kill_at = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
                }
            }
            _ = sigterm.recv() => control.signal(libc::SIGKILL).await?,
            _ = sighup.recv() => control.signal(libc::SIGKILL).await?,
            _ = tokio::time::sleep_until(deadline), if kill_at.is_some() => {
                control.signal(libc::SIGKILL).await?;
                kill_at = None;
            }
        }
    }
}

async fn pump_stdin(control: ExecControl) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if control.write_stdin(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = control.close_stdin().await;
}
