//! `moat ps BOX` / `top`, `attach`, `kill`, `wait`: background processes started with
//! `moat exec -d`.

use moat_client::ExecOutput;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{HostArgs, ProcessRef};
use crate::cmd::daemon::connect;
use crate::error::Hinted;

pub async fn list(sandbox: &str, json: bool, host: &HostArgs) -> anyhow::Result<i32> {
    let jobs = connect(host).await?.processes(sandbox).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(0);
    }
    println!("{:>7}  {:<14}  {:<10}  {:>9}  COMMAND", "PID", "STATE", "STARTED", "OUTPUT");
    for j in jobs {
        let state = match j.exit {
            None => "running".to_string(),
            Some(s) if s.signal.is_some() => format!("killed ({})", s.signal.unwrap_or(0)),
            Some(s) => format!("exited ({})", s.code.unwrap_or(0)),
        };
        println!(
            "{:>7}  {:<14}  {:<10}  {:>8}K  {}",
            j.pid,
            state,
            crate::cmd::sandbox::ago_or_in(j.started_at),
            j.output_bytes.div_ceil(1024),
            j.argv.join(" ")
        );
    }
    Ok(0)
}

/// `TERM`, `SIGTERM`, `term` or `15`.
fn signal_number(s: &str) -> anyhow::Result<i32> {
    Ok(moat_api::parse_signal(s).map_err(|e| Hinted::new(e.to_string(), "e.g. `moat kill BOX PID -s KILL`"))?)
}

pub async fn kill(p: ProcessRef, signal: &str, host: &HostArgs) -> anyhow::Result<i32> {
    connect(host).await?.kill_process(&p.sandbox, p.pid, signal_number(signal)?).await?;
    Ok(0)
}

pub async fn attach(p: ProcessRef, replay: bool, host: &HostArgs) -> anyhow::Result<i32> {
    follow(p, replay, true, host).await
}

pub async fn wait(p: ProcessRef, host: &HostArgs) -> anyhow::Result<i32> {
    follow(p, false, false, host).await
}

/// Read a background process's session to its exit: its code. Ctrl-C detaches.
async fn follow(p: ProcessRef, replay: bool, print: bool, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    let mut session = client.attach(&p.sandbox, p.pid, replay).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    loop {
        tokio::select! {
            event = session.next() => match event? {
                ExecOutput::Stdout(d) if print => {
                    stdout.write_all(&d).await?;
                    stdout.flush().await?;
                }
                ExecOutput::Stderr(d) if print => {
                    stderr.write_all(&d).await?;
                    stderr.flush().await?;
                }
                ExecOutput::Exit { code, signal, .. } => return Ok(ExecOutput::shell_code(code, signal)),
                ExecOutput::Failed(e) => return Err(moat_client::ClientError::Api(e).into()),
                _ => {}
            },
            _ = sigint.recv() => {
                eprintln!("moat: detached; process {} keeps running (`moat kill {} {}` ends it)", p.pid, p.sandbox, p.pid);
                return Ok(130);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("TERM").unwrap(), 15);
        assert_eq!(signal_number("sigkill").unwrap(), 9);
        assert_eq!(signal_number("2").unwrap(), 2);
        assert!(signal_number("0").is_err());
        assert!(crate::error::render(&signal_number("BOGUS").unwrap_err()).contains("\nhint: e.g."));
    }
}
