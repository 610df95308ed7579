//! Tools that run commands: one to completion (`sandbox_exec`), or in the background (start,
//! poll for new output, kill).

use std::collections::BTreeMap;
use std::time::Duration;

use moat_api::{ExecStart, StartProcess};
use moat_client::{ExecOutput, ExecOutputs};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::error::{Checked, ToolError, ToolResult};
use crate::output::{sections, HeadTail};
use crate::server::MoatMcp;

/// Default and longest time a command may run in `sandbox_exec`.
const DEFAULT_TIMEOUT_SECS: u64 = 120;
const MAX_TIMEOUT_SECS: u64 = 3600;
/// Longest a poll may wait for a background process.
const MAX_POLL_WAIT_SECS: u64 = 60;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Shell command, run with `/bin/sh -c` (pipes, `&&`, redirections work), e.g.
    /// "cd /work && python3 main.py 2>&1 | tail -n 50".
    pub command: String,
    /// Working directory (absolute). Default: the image's, usually "/".
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables, e.g. {"DEBUG": "1"}.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// User to run as (name or uid). Default: the image's user, usually root.
    #[serde(default)]
    pub user: Option<String>,
    /// Text to feed to the command's standard input (then closed). Default: no input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the command after this many seconds, 1 to 3600. Default 120. For longer work use
    /// sandbox_process_start.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Most bytes of stdout and of stderr to return; past it the middle is left out and marked.
    /// Default: the server's limit (32 KiB).
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Shell command, run with `/bin/sh -c`, e.g. "python3 -m http.server 8000".
    pub command: String,
    /// Working directory (absolute).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// User to run as (name or uid).
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PollParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// The process id sandbox_process_start returned. Leave it out to list all background processes.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Wait up to this many seconds (0 to 60) for the process to end, collecting its output
    /// meanwhile; returns as soon as it ends. Default 0: return what is there now.
    #[serde(default)]
    pub wait_seconds: Option<u64>,
    /// Most bytes of stdout and of stderr to return. Default: the server's limit (32 KiB).
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KillParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// The process id sandbox_process_start returned.
    pub pid: u32,
    /// Signal: TERM (default), KILL, INT, HUP, QUIT, USR1, USR2, or a number. It goes to the
    /// process and everything it started.
    #[serde(default)]
    pub signal: Option<String>,
}

/// How a process ended, in words.
fn ended(code: Option<i32>, signal: Option<i32>, timed_out: bool, timeout: Duration) -> String {
    match (code, signal) {
        _ if timed_out => format!("timed out after {} s and was killed", timeout.as_secs()),
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "ended".into(),
    }
}

impl MoatMcp {
    fn output_limit(&self, asked: Option<usize>) -> Result<usize, ToolError> {
        match asked {
            None => Ok(self.policy.max_output),
            Some(n) if (1..=self.policy.max_output_cap()).contains(&n) => Ok(n),
            Some(n) => {
                Err(ToolError::invalid(format!("max_output_bytes is {n}; use 1 to {}", self.policy.max_output_cap())))
            }
        }
    }
}

/// Read an exec session's output to its end.
async fn collect(
    outputs: &mut ExecOutputs,
    out: &mut HeadTail,
    err: &mut HeadTail,
) -> Result<(Option<i32>, Option<i32>, bool), ToolError> {
    loop {
        match outputs.next().await? {
            ExecOutput::Stdout(d) => out.push(&d),
            ExecOutput::Stderr(d) => err.push(&d),
            ExecOutput::Exit { code, signal, timed_out } => return Ok((code, signal, timed_out)),
            ExecOutput::Failed(e) => return Err(moat_client::ClientError::Api(e).into()),
            ExecOutput::Started(_) => {}
        }
    }
}

#[tool_router(router = exec_tools, vis = "pub(crate)")]
impl MoatMcp {
    #[tool(
        description = "Run a shell command in a sandbox and wait for it to finish. Returns the exit code, stdout \
and stderr (long output keeps its beginning and end, with a marker where the middle was left out). The command \
is killed after timeout_seconds. Each call is a fresh shell: `cd` and variables do not carry over, so use cwd, \
env or `cd DIR && ...`. For servers and jobs longer than a few minutes use sandbox_process_start.",
        annotations(title = "Run command", read_only_hint = false, destructive_hint = true, open_world_hint = false)
    )]
    async fn sandbox_exec(&self, Parameters(Checked(p)): Parameters<Checked<ExecParams>>) -> ToolResult {
        let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECS));
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout.as_secs()) {
            return Err(ToolError::invalid(format!(
                "timeout_seconds is {}; use 1 to {MAX_TIMEOUT_SECS}, or sandbox_process_start for longer work",
                timeout.as_secs()
            )));
        }
        let limit = self.output_limit(p.max_output_bytes)?;
        let info = self.sandbox(&p.sandbox).await?;
        self.session().start_command(&self.policy)?;
        let start = ExecStart {
            argv: vec!["/bin/sh".into(), "-c".into(), p.command],
            env: p.env.unwrap_or_default().into_iter().collect(),
            cwd: p.cwd,
            user: p.user,
            timeout_ms: Some(timeout.as_millis() as u64),
            stdin: p.stdin.is_some(),
            ..ExecStart::default()
        };
        let (mut input, mut outputs) = self.client.exec(&info.id, &start).await?.split();
        let (mut out, mut err) = (HeadTail::new(limit), HeadTail::new(limit));
        // Feed stdin while reading output: a command may write before it reads all its input.
        let feed = async {
            if let Some(text) = &p.stdin {
                input.stdin(text.as_bytes()).await?;
                input.close_stdin().await?;
            }
            Ok::<_, moat_client::ClientError>(())
        };
        let read = collect(&mut outputs, &mut out, &mut err);
        // The daemon kills the command at its timeout; this only guards against a lost daemon.
        let guard = timeout + Duration::from_secs(30);
        let (fed, read) = match tokio::time::timeout(guard, async { tokio::join!(feed, read) }).await {
            Ok(r) => r,
            Err(_) => {
                return Err(ToolError::new(
                    format!("the command did not finish {} s after its timeout", guard.as_secs()),
                    "the sandbox may be overloaded; check it with sandbox_info and sandbox_logs",
                ))
            }
        };
        let (code, signal, timed_out) = read?;
        let mut text = format!("{}\n", ended(code, signal, timed_out, timeout));
        if let Err(e) = fed {
            text.push_str(&format!("(stdin could not be sent in full: {e})\n"));
        }
        text.push_str(&sections(&out, &err));
        Ok(text)
    }

    #[tool(
        description = "Start a shell command in the background in a sandbox and return its pid at once. It keeps \
running after this call; its output is kept (the last 1 MiB). Read new output and see whether it ended with \
sandbox_process_poll; stop it with sandbox_process_kill.",
        annotations(title = "Start background process", destructive_hint = true, open_world_hint = false)
    )]
    async fn sandbox_process_start(&self, Parameters(Checked(p)): Parameters<Checked<StartParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        self.session().start_command(&self.policy)?;
        let req = StartProcess {
            argv: vec!["/bin/sh".into(), "-c".into(), p.command],
            env: p.env.unwrap_or_default().into_iter().collect(),
            cwd: p.cwd,
            user: p.user,
        };
        let started = self.client.start_process(&info.id, &req).await?;
        Ok(format!(
            "started pid {} in {}; read its output with sandbox_process_poll (pid {})",
            started.pid, info.name, started.pid
        ))
    }

    #[tool(
        description = "A background process's new output since the last poll (stdout and stderr) and whether it \
is still running or how it ended. wait_seconds waits for it to end. Without pid: list the sandbox's background \
processes.",
        annotations(title = "Poll background process", read_only_hint = true, open_world_hint = false)
    )]
    async fn sandbox_process_poll(&self, Parameters(Checked(p)): Parameters<Checked<PollParams>>) -> ToolResult {
        let wait = Duration::from_secs(p.wait_seconds.unwrap_or(0));
        if wait.as_secs() > MAX_POLL_WAIT_SECS {
            return Err(ToolError::invalid(format!(
                "wait_seconds is {}; wait at most {MAX_POLL_WAIT_SECS} s per poll and poll again",
                wait.as_secs()
            )));
        }
        let limit = self.output_limit(p.max_output_bytes)?;
        let info = self.sandbox(&p.sandbox).await?;
        let jobs = self.client.processes(&info.id).await?;
        let Some(pid) = p.pid else {
            if jobs.is_empty() {
                return Ok(format!("{} has no background processes", info.name));
            }
            let list: Vec<_> = jobs
                .iter()
                .map(|j| {
                    serde_json::json!({
                        "pid": j.pid,
                        "command": j.argv.join(" "),
                        "state": match j.exit {
                            None => "running".to_string(),
                            Some(e) => ended(e.code, e.signal, false, Duration::ZERO),
                        },
                        "output_bytes": j.output_bytes,
                    })
                })
                .collect();
            return Ok(serde_json::to_string_pretty(&list).expect("JSON values always serialize"));
        };
        let Some(job) = jobs.iter().find(|j| j.pid == pid) else {
            return Err(ToolError::new(
                format!("{} has no background process {pid}", info.name),
                "list its background processes with sandbox_process_poll without pid",
            ));
        };
        let key = (info.id.clone(), pid);
        let seen = self.session().polled.lock().expect("the poll lock is never held across a panic").get(&key).copied();
        let seen = seen.unwrap_or(0);
        // A replay starts at the oldest output the agent still keeps. (Should more be dropped
        // between the listing and the attach, a little output is skipped.)
        let mut pos = job.dropped_bytes;
        let target = job.output_bytes;
        let (mut out, mut err) = (HeadTail::new(limit), HeadTail::new(limit));
        let mut session = self.client.attach(&info.id, pid, true).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut exit = None;
        loop {
            // Read the replay up to what the listing counted, then live output until the deadline.
            let next = if pos < target {
                tokio::time::timeout(Duration::from_secs(30), session.next()).await
            } else {
                tokio::time::timeout_at(deadline, session.next()).await
            };
            let Ok(next) = next else { break };
            let (data, stream) = match next? {
                ExecOutput::Stdout(d) => (d, &mut out),
                ExecOutput::Stderr(d) => (d, &mut err),
                ExecOutput::Exit { code, signal, .. } => {
                    exit = Some((code, signal));
                    break;
                }
                ExecOutput::Failed(e) => return Err(moat_client::ClientError::Api(e).into()),
                ExecOutput::Started(_) => continue,
            };
            let skip = seen.saturating_sub(pos).min(data.len() as u64) as usize;
            stream.push(&data[skip..]);
            pos += data.len() as u64;
        }
        drop(session);
        self.session().polled.lock().expect("the poll lock is never held across a panic").insert(key, pos.max(seen));
        let state = match exit {
            None => "still running".to_string(),
            Some((code, signal)) => ended(code, signal, false, Duration::ZERO),
        };
        let mut text = format!("process {pid}: {state}\n");
        if seen < job.dropped_bytes {
            text.push_str(&format!("[moat: {} bytes of older output were no longer kept]\n", job.dropped_bytes - seen));
        }
        if out.total() == 0 && err.total() == 0 {
            text.push_str("(no new output)\n");
        } else {
            text.push_str(&sections(&out, &err));
        }
        Ok(text)
    }

    #[tool(
        description = "Send a signal to a background process and everything it started (default TERM; KILL if it \
does not stop).",
        annotations(title = "Kill background process", destructive_hint = true, open_world_hint = false)
    )]
    async fn sandbox_process_kill(&self, Parameters(Checked(p)): Parameters<Checked<KillParams>>) -> ToolResult {
        let signal = moat_api::parse_signal(p.signal.as_deref().unwrap_or("TERM")).map_err(ToolError::invalid)?;
        let info = self.sandbox(&p.sandbox).await?;
        self.client.kill_process(&info.id, p.pid, signal).await?;
        Ok(format!("sent signal {signal} to process {}; sandbox_process_poll shows when it has ended", p.pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_read_as_words() {
        let t = Duration::from_secs(5);
        assert_eq!(ended(Some(0), None, false, t), "exit code 0");
        assert_eq!(ended(None, Some(9), false, t), "killed by signal 9");
        assert_eq!(ended(None, Some(9), true, t), "timed out after 5 s and was killed");
    }
}
