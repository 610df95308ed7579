//! `moat doctor --smoke`: prove that sandboxes work here by using one, through the daemon as
//! every command does: create, exec, a file written and read back, a fetch from the host over
//! the sandbox's network, snapshot, restore, remove. Each step is timed; the first failure ends
//! the run, and the sandbox is removed (or kept with `--keep`).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use moat_api::{CreateSandbox, ErrorCode, ExecStart, NetMode, NetSpec};
use moat_client::Client;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::{DoctorArgs, HostArgs};
use crate::cmd::daemon::connect;

/// Every step, in order.
const STEPS: &[&str] = &["daemon", "create", "exec", "files", "network", "snapshot", "restore", "remove"];
/// A create may build the default image first.
const CREATE_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Any other step.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// The guest's fetch from the host.
const FETCH_TIMEOUT_MS: u64 = 30_000;
/// The smoke sandbox is small: the steps need little, and a snapshot writes its memory.
const MEMORY_MIB: u32 = 256;
/// A run killed half-way leaves its sandbox for at most this long (not with `--keep`).
const LEASE_SECS: u64 = 30 * 60;
/// The file the files and restore steps use.
const FILE: &str = "/tmp/moat-doctor-smoke";
/// Most output read from a guest command or file.
const MAX_OUTPUT: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Fail,
    Skipped,
}

#[derive(Debug, Serialize)]
struct Step {
    name: &'static str,
    status: Status,
    secs: f64,
    detail: String,
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    ok: bool,
    /// The smoke sandbox's name (chosen before it is created).
    sandbox: String,
    /// It is still there (a failure with `--keep`, or a removal that failed).
    kept: bool,
    steps: Vec<Step>,
}

/// The steps run so far, printed as they end unless the report is JSON.
struct Run {
    json: bool,
    report: Report,
}

impl Run {
    /// Run one step under `limit`; its detail on success, `None` when it failed.
    async fn step<T>(
        &mut self,
        name: &'static str,
        limit: Duration,
        work: impl Future<Output = anyhow::Result<(T, String)>>,
    ) -> Option<T> {
        let started = Instant::now();
        let result = match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("did not finish within {}s", limit.as_secs())),
        };
        let secs = started.elapsed().as_secs_f64();
        let (value, status, detail) = match result {
            Ok((value, detail)) => (Some(value), Status::Ok, detail),
            Err(e) => (None, Status::Fail, crate::error::render(&e).replace('\n', "\n                        ")),
        };
        self.push(Step { name, status, secs, detail });
        value
    }

    fn push(&mut self, step: Step) {
        if !self.json {
            let tag = match step.status {
                Status::Ok => "ok  ",
                Status::Fail => "FAIL",
                Status::Skipped => "skip",
            };
            let time = if step.status == Status::Skipped { String::new() } else { format!("{:.2}s", step.secs) };
            println!("{tag}  {:<9} {time:>8}  {}", step.name, step.detail);
        }
        self.report.steps.push(step);
    }

    fn failed(&self) -> bool {
        self.report.steps.iter().any(|s| s.status == Status::Fail)
    }

    /// Mark the steps not reached as skipped.
    fn skip_rest(&mut self) {
        let done = self.report.steps.len();
        for name in &STEPS[done.min(STEPS.len())..] {
            self.push(Step { name, status: Status::Skipped, secs: 0.0, detail: "an earlier step failed".into() });
        }
    }

    /// Print the report, and give the exit code.
    fn finish(mut self) -> anyhow::Result<i32> {
        self.skip_rest();
        self.report.ok = !self.failed();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&self.report)?);
        }
        Ok(if self.report.ok { 0 } else { 1 })
    }
}

pub async fn smoke(args: &DoctorArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let name = format!("doctor-smoke-{}", random_hex(6)?);
    let mut run =
        Run { json: args.json, report: Report { ok: false, sandbox: name.clone(), kept: false, steps: vec![] } };
    let Some(client) = run
        .step("daemon", STEP_TIMEOUT, async {
            let client = connect(host).await?;
            let h = client.health().await?;
            let detail = format!("pid {}, moat {}, {}, QEMU {}", h.pid, h.version, h.accel, h.qemu_version);
            Ok((client, detail))
        })
        .await
    else {
        return run.finish();
    };
    // The host end of the network step; the sandbox may reach the host's loopback and nothing else.
    let host_server = HostServer::start().await?;
    let created = run.step("create", CREATE_TIMEOUT, create(&client, &name, args)).await;
    if created.is_some() {
        steps(&mut run, &client, &name, &host_server).await;
    }
    drop(host_server);
    run.skip_rest();
    if run.failed() {
        leave(&mut run, &client, &name, args.keep).await;
    }
    run.finish()
}

/// The steps after the create; they stop at the first failure.
async fn steps(run: &mut Run, client: &Client, name: &str, server: &HostServer) {
    let step = run.step("exec", STEP_TIMEOUT, async {
        let (out, _) = guest(client, name, &["sh", "-c", "echo moat-smoke-$((6 * 7))"]).await?;
        if out.trim() != "moat-smoke-42" {
            bail!("`sh -c 'echo moat-smoke-$((6 * 7))'` printed {:?}, not \"moat-smoke-42\"", clip(&out));
        }
        Ok(((), "sh -c 'echo …' ran and printed what it should".to_string()))
    });
    if step.await.is_none() {
        return;
    }
    let content = format!("moat smoke {}\n", random_hex(16).unwrap_or_default());
    let step = run.step("files", STEP_TIMEOUT, async {
        write(client, name, content.as_bytes()).await?;
        let back = read(client, name).await?;
        if back != content.as_bytes() {
            bail!("{FILE} read back {} bytes that differ from the {} written", back.len(), content.len());
        }
        Ok(((), format!("{FILE}: {} bytes written and read back", content.len())))
    });
    if step.await.is_none() {
        return;
    }
    if client.is_remote() {
        let detail = "the daemon is on another machine, whose loopback its sandboxes reach, not this one's";
        run.push(Step { name: "network", status: Status::Skipped, secs: 0.0, detail: detail.into() });
    } else if run
        .step("network", STEP_TIMEOUT, async {
            let url = format!("http://10.0.2.2:{}/", server.port);
            let (out, _) = guest(client, name, &["wget", "-q", "-O", "-", &url])
                .await
                .with_context(|| format!("fetching {url} (the host's 127.0.0.1:{}) in the sandbox", server.port))?;
            if out.trim() != server.token {
                bail!("fetching {url} in the sandbox gave {:?}, not the host server's token", clip(&out));
            }
            Ok(((), format!("the guest fetched {url} from a server on the host's loopback")))
        })
        .await
        .is_none()
    {
        return;
    }
    let step = run.step("snapshot", STEP_TIMEOUT, async {
        let s = client.snapshot(name, Some("smoke".into())).await?;
        Ok(((), format!("{} ({} MiB)", s.reference(), s.size_bytes.div_ceil(1 << 20))))
    });
    if step.await.is_none() {
        return;
    }
    let step = run.step("restore", STEP_TIMEOUT, async {
        write(client, name, b"changed after the snapshot\n").await?;
        client.revert(name, "smoke").await.context("reverting to the snapshot")?;
        let back = read(client, name).await.context("after the revert")?;
        if back != content.as_bytes() {
            bail!(
                "after the revert {FILE} holds {:?}, not what it held at the snapshot",
                clip(&String::from_utf8_lossy(&back))
            );
        }
        Ok(((), format!("reverted to the snapshot; {FILE} is as it was then")))
    });
    if step.await.is_none() {
        return;
    }
    run.step("remove", STEP_TIMEOUT, async {
        client.remove(name, true).await?;
        Ok(((), "removed with its snapshot".to_string()))
    })
    .await;
}

async fn create(client: &Client, name: &str, args: &DoctorArgs) -> anyhow::Result<((), String)> {
    let req = CreateSandbox {
        name: Some(name.to_string()),
        image: Some(args.image.clone()),
        memory_mib: Some(MEMORY_MIB),
        ttl_secs: (!args.keep).then_some(LEASE_SECS),
        // Nothing leaves the host: the guest reaches only the host's loopback (at 10.0.2.2).
        net: Some(NetSpec { mode: NetMode::Allow, allow_cidrs: vec!["127.0.0.1/32".into()], ..NetSpec::default() }),
        labels: [("moat.doctor".to_string(), "smoke".to_string())].into(),
        ..CreateSandbox::default()
    };
    let info = crate::cmd::image::create_showing_image(client, &req).await?;
    Ok(((), format!("{} (image {}, {}, {} MiB)", info.name, info.image, info.accel, info.memory_mib)))
}

/// After a failure: keep the sandbox, or remove it; say which, and how to remove a kept one.
async fn leave(run: &mut Run, client: &Client, name: &str, keep: bool) {
    match client.inspect(name).await {
        Err(e) if e.code() == Some(ErrorCode::NotFound) => return,
        _ => {}
    }
    let removed = !keep && client.remove(name, true).await.is_ok();
    run.report.kept = !removed;
    if run.json {
        return;
    }
    if removed {
        println!("removed sandbox {name}; `moat doctor --smoke --keep` keeps it to look at");
    } else {
        println!(
            "kept sandbox {name}: see `moat logs {name}` and `moat inspect {name}`; remove it with `moat rm -f {name}`"
        );
    }
}

/// Run a command in the guest; its stdout and stderr when it exits 0.
async fn guest(client: &Client, name: &str, argv: &[&str]) -> anyhow::Result<(String, String)> {
    let start = ExecStart {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        timeout_ms: Some(FETCH_TIMEOUT_MS),
        max_output_bytes: Some(MAX_OUTPUT),
        ..ExecStart::default()
    };
    let (out, err, code) = client.exec(name, &start).await?.collect().await?;
    let (out, err) = (String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned());
    if code != 0 {
        bail!("`{}` exited with {code}: {}", argv.join(" "), clip(err.trim()));
    }
    Ok((out, err))
}

async fn write(client: &Client, name: &str, data: &[u8]) -> anyhow::Result<()> {
    let body = std::io::Cursor::new(data.to_vec());
    client.write_file(name, FILE, Some(0o600), true, body).await.with_context(|| format!("writing {FILE}"))?;
    Ok(())
}

async fn read(client: &Client, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream =
        Box::pin(client.read_file(name, FILE).await.with_context(|| format!("reading {FILE}"))?.into_stream());
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.with_context(|| format!("reading {FILE}"))?);
        if data.len() as u64 > MAX_OUTPUT {
            bail!("{FILE} grew past {MAX_OUTPUT} bytes");
        }
    }
    Ok(data)
}

/// At most a line's worth of guest output, for a message.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// `n` random bytes as hex.
fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes).context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A tiny HTTP server on the host's loopback that answers every request with a random token;
/// stops when dropped.
struct HostServer {
    port: u16,
    token: String,
    task: tokio::task::JoinHandle<()>,
}

/// How long one connection to the server may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(20);
/// The most of a request the server reads.
const MAX_REQUEST: usize = 8 << 10;

impl HostServer {
    async fn start() -> anyhow::Result<HostServer> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("listening on 127.0.0.1 for the network step")?;
        let port = listener.local_addr()?.port();
        let token = format!("moat-smoke-{}", random_hex(16)?);
        let answer = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{token}",
            token.len()
        );
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(tokio::time::timeout(CONNECTION_TIMEOUT, async move {
                    // The request head, bounded; its content does not matter.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                }));
            }
        });
        Ok(HostServer { port, token, task })
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
