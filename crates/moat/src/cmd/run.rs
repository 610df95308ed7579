//! `moat run` and `moat exec`: a process in a sandbox, with live output, stdin and signals.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use moat_api::{CreateSandbox, ExecStart, NetMode, NetSpec, OnExpire, PortForward, SecretSpec, TtySize};
use moat_client::{Client, ExecInput, ExecOutput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{CreateArgs, ExecArgs, HostArgs, OnExpireArg, ProcessArgs, RunArgs, ShellArgs};
use crate::cmd::daemon::connect;

/// After the first Ctrl-C the command gets this long to exit on SIGINT before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// A one-shot sandbox gets this lease until its command starts, so a `moat run` killed before
/// then does not leave it running for ever; once the command runs, the session owns its life.
const ONE_SHOT_LEASE_SECS: u64 = 600;

pub fn create_request(c: &CreateArgs) -> anyhow::Result<CreateSandbox> {
    // A snapshot brings its own machine.
    let machine = c.from.is_none();
    Ok(CreateSandbox {
        name: c.name.clone(),
        image: machine.then(|| c.image.clone()),
        vcpus: machine.then_some(c.cpus),
        memory_mib: machine.then_some(c.memory),
        disk_mib: machine.then_some(c.disk),
        ttl_secs: c.ttl.map(|d| d.as_secs().max(1)),
        on_expire: Some(match c.on_expire {
            OnExpireArg::Stop => OnExpire::Stop,
            OnExpireArg::Remove => OnExpire::Remove,
            OnExpireArg::Pause => OnExpire::Pause,
        }),
        hostname: c.hostname.clone(),
        boot_timeout_secs: Some(c.boot_timeout.as_secs().max(1)),
        from: c.from.clone(),
        template: c.cold.then_some(false),
        net: net_spec(c)?,
        labels: c.labels.iter().cloned().collect(),
        mounts: mounts(&c.volumes)?,
        idle: c.idle,
        // A snapshot from a registry may need the Docker config's credentials.
        registry_login: match c.from.as_deref() {
            Some(from) if moat_api::is_remote_snapshot(from) => crate::cmd::image::docker_credentials(from)?
                .map(|(username, password)| moat_api::RegistryLogin { username, password }),
            _ => None,
        },
        ..CreateSandbox::default()
    })
}

/// `-v SOURCE:PATH[:ro]` flags; host directories are made absolute against this directory.
fn mounts(specs: &[String]) -> anyhow::Result<Vec<moat_api::Mount>> {
    let cwd = std::env::current_dir()?;
    specs.iter().map(|s| moat_api::Mount::parse(s, &cwd).map_err(anyhow::Error::msg)).collect()
}

/// The network flags as a [`NetSpec`]; `None` when none is given (the daemon's default, or the
/// snapshot's). Secret values are read from this process's environment.
fn net_spec(c: &CreateArgs) -> anyhow::Result<Option<NetSpec>> {
    let given = c.net.is_some()
        || !(c.allow_cidr.is_empty()
            && c.add_host.is_empty()
            && c.dns.is_empty()
            && c.secret.is_empty()
            && c.publish.is_empty());
    if !given {
        return Ok(None);
    }
    let (mode, allow) = match c.net.as_deref() {
        None | Some("default") => (NetMode::Default, Vec::new()),
        Some("none") => (NetMode::None, Vec::new()),
        Some(m) if m.starts_with("allow=") => {
            (NetMode::Allow, m["allow=".len()..].split(',').filter(|h| !h.is_empty()).map(String::from).collect())
        }
        Some(m) => {
            let hint = "use none, default or allow=HOST[,HOST…]";
            return Err(crate::error::Hinted::new(format!("--net {m:?} is not a network mode"), hint).into());
        }
    };
    let mut secrets = Vec::new();
    for s in &c.secret {
        let Some((name, hosts)) = s.split_once('@') else {
            let hint = "write NAME@HOST[,HOST…], e.g. OPENAI_API_KEY@api.openai.com";
            return Err(crate::error::Hinted::new(format!("--secret {s:?} names no host"), hint).into());
        };
        // `+body`: no hostname has a `+`, so the suffix cannot be read as part of one.
        let (hosts, in_body) = match hosts.split_once('+') {
            None => (hosts, false),
            Some((hosts, "body")) => (hosts, true),
            Some((_, other)) => {
                let hint = "write NAME@HOST[,HOST…] (header values and the query) or NAME@HOST[,HOST…]+body \
                            (request bodies too)";
                let message = format!("--secret {s:?}: {other:?} is not a place for a secret");
                return Err(crate::error::Hinted::new(message, hint).into());
            }
        };
        let value = std::env::var(name).map_err(|_| {
            crate::error::Hinted::new(
                format!("--secret {s}: {name} is not set in moat's environment"),
                format!(
                    "export {name}=… first; moat reads the value from there so it never appears in the command line"
                ),
            )
        })?;
        let hosts: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(String::from).collect();
        if let Some(wild) = hosts.iter().find(|h| h.starts_with("*.")) {
            eprintln!(
                "warning: --secret {name}@{wild} sends {name} to every name under {}, including names other \
                 people may control there (customer subdomains, user pages); list exact hosts where you can",
                &wild[2..]
            );
        }
        secrets.push(SecretSpec { name: name.to_string(), value: Some(value), hosts, in_body });
    }
    let ports = c
        .publish
        .iter()
        .map(|p| PortForward::parse(p).map_err(|e| anyhow::anyhow!("-p: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(NetSpec {
        mode,
        allow,
        allow_cidrs: c.allow_cidr.clone(),
        hosts: c.add_host.clone(),
        dns: c.dns.clone(),
        secrets,
        ports,
    }))
}

/// Returns the exit code `moat` should exit with: the command's.
pub async fn run(args: RunArgs, host: &HostArgs) -> anyhow::Result<i32> {
    if args.detach && !args.command.is_empty() {
        let hint = "run `moat run -d --name box`, then `moat exec box -- CMD`";
        return Err(crate::error::Hinted::new("`moat run -d` creates a sandbox and takes no command", hint).into());
    }
    let mut req = create_request(&args.create)?;
    crate::cmd::daemon::reach::check_host_mounts(host, &req.mounts)?;
    let client = connect(host).await?;
    if args.detach {
        // No command to give them to: they are every later command's.
        req.env = args.process.env.clone();
        let info = crate::cmd::image::create_showing_image(&client, &req).await?;
        println!("{}", info.name);
        return Ok(0);
    }
    if req.ttl_secs.is_none() {
        req.ttl_secs = Some(ONE_SHOT_LEASE_SECS);
    }
    // Checked before the sandbox exists, so a bad option (-t without a terminal) leaves nothing.
    let start = exec_start(&args.process, args.command, true)?;
    let info = crate::cmd::image::create_showing_image(&client, &req).await?;
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
    if args.detach {
        let p = &args.process;
        let req = moat_api::StartProcess {
            argv: args.command,
            env: p.env.clone(),
            cwd: p.workdir.clone(),
            user: p.user.clone(),
        };
        println!("{}", client.start_process(&args.sandbox, &req).await?.pid);
        return Ok(0);
    }
    run_process(&client, &args.sandbox, exec_start(&args.process, args.command, false)?).await
}

/// The login shell of the user in the image (from its /etc/passwd), falling back to /bin/sh.
const LOGIN_SHELL: &str = r#"s=$(grep "^$(id -un):" /etc/passwd 2>/dev/null | cut -d: -f7); exec "${s:-/bin/sh}" -l"#;

pub async fn shell(args: ShellArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    let process = ProcessArgs {
        env: args.env,
        workdir: None,
        user: args.user,
        interactive: true,
        tty: true,
        timeout: None,
        max_output: None,
    };
    let argv = vec!["/bin/sh".to_string(), "-c".to_string(), LOGIN_SHELL.to_string()];
    run_process(&client, &args.sandbox, exec_start(&process, argv, false)?).await
}

fn forward_stdin(p: &ProcessArgs) -> bool {
    p.interactive || !std::io::stdin().is_terminal()
}

fn exec_start(p: &ProcessArgs, argv: Vec<String>, remove_sandbox_after: bool) -> anyhow::Result<ExecStart> {
    let tty = if p.tty {
        if !std::io::stdin().is_terminal() {
            let hint = "drop -t to pipe input, or run moat from a terminal";
            return Err(crate::error::Hinted::new("-t needs standard input to be a terminal", hint).into());
        }
        let ws = rustix::termios::tcgetwinsize(std::io::stdin()).context("reading the terminal's size")?;
        Some(TtySize { rows: ws.ws_row.max(1), cols: ws.ws_col.max(1) })
    } else {
        None
    };
    let mut env = p.env.clone();
    if let (true, Ok(term)) = (p.tty, std::env::var("TERM")) {
        if !env.iter().any(|(k, _)| k == "TERM") {
            env.push(("TERM".into(), term));
        }
    }
    Ok(ExecStart {
        argv,
        env,
        cwd: p.workdir.clone(),
        user: p.user.clone(),
        timeout_ms: p.timeout.map(|d| d.as_millis().min(u64::MAX as u128) as u64),
        stdin: forward_stdin(p) || p.tty,
        max_output_bytes: p.max_output,
        tty,
        remove_sandbox_after,
    })
}

/// The local terminal in raw mode (keys go to the sandbox's terminal as typed) until dropped.
struct RawTerminal(rustix::termios::Termios);

impl RawTerminal {
    fn enter() -> anyhow::Result<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Drain, &raw)
            .context("switching the terminal to raw mode")?;
        Ok(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Drain, &self.0);
    }
}

async fn run_process(client: &Client, sandbox: &str, start: ExecStart) -> anyhow::Result<i32> {
    let stdin = start.stdin;
    let tty = start.tty.is_some();
    let session = client.exec(sandbox, &start).await?;
    let (input, mut output) = session.split();
    let input = std::sync::Arc::new(tokio::sync::Mutex::new(input));
    // Raw only once the exec started, so errors before it print on a sane terminal.
    let _raw = if tty { Some(RawTerminal::enter()?) } else { None };
    if stdin {
        tokio::spawn(pump_stdin(input.clone()));
    }
    if tty {
        tokio::spawn(follow_window_size(input.clone()));
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
                ExecOutput::Failed(e) => return Err(moat_client::ClientError::Api(e).into()),
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

/// Send the terminal's size whenever it changes (SIGWINCH).
async fn follow_window_size(input: std::sync::Arc<tokio::sync::Mutex<ExecInput>>) {
    let Ok(mut winch) = signal(SignalKind::window_change()) else { return };
    while winch.recv().await.is_some() {
        if let Ok(ws) = rustix::termios::tcgetwinsize(std::io::stdin()) {
            if input.lock().await.resize(ws.ws_row.max(1), ws.ws_col.max(1)).await.is_err() {
                return;
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
