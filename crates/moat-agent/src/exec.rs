//! One exec channel: spawn the process, stream its output under the host's credit, feed stdin,
//! deliver signals, enforce the timeout, report the exit.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::{AgentError, ErrorCode, ExecRequest, ExitStatus, Frame, Message, Stream, INITIAL_WINDOW, MAX_CHUNK};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, Notify};

use crate::link::Out;
use crate::reaper::{Ended, Reaper};
use crate::users::{self, Identity};

/// After the process exits, output is still forwarded while it flows; a pipe that stays open
/// (a background child holds it) but silent for this long is treated as ended.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the link forwards to a running exec.
#[derive(Debug)]
pub enum Ctl {
    Stdin(Vec<u8>),
    StdinEof,
    Credit(Stream, u32),
    Signal(i32),
    /// The host abandoned the channel, or the link went away: kill and forget.
    Close,
}

/// Bytes the host allows us to send on one stream.
struct Credit {
    avail: Mutex<u32>,
    notify: Notify,
}

impl Credit {
    fn new() -> Arc<Credit> {
        Arc::new(Credit { avail: Mutex::new(INITIAL_WINDOW), notify: Notify::new() })
    }

    async fn take(&self, max: u32) -> u32 {
        loop {
            let notified = self.notify.notified();
            {
                let mut a = self.avail.lock().expect("credit lock is never poisoned");
                if *a > 0 {
                    let n = (*a).min(max);
                    *a -= n;
                    return n;
                }
            }
            notified.await;
        }
    }

    fn give(&self, n: u32) {
        let mut a = self.avail.lock().expect("credit lock is never poisoned");
        *a = a.saturating_add(n);
        self.notify.notify_waiters();
    }
}

fn refuse(code: ErrorCode, message: String) -> AgentError {
    AgentError { code, message }
}

/// Find `program` the way a shell would: as given when it has a slash, else along PATH.
fn find_program(program: &str, path: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    path.split(':').filter(|d| !d.is_empty()).map(|d| Path::new(d).join(program)).find(|p| executable(p))
}

/// Check the request and build the command; errors are what the host shows the user.
fn prepare(req: &ExecRequest) -> Result<(Command, Identity), AgentError> {
    let bad = |m: String| refuse(ErrorCode::BadRequest, m);
    let program = req.argv.first().ok_or_else(|| bad("no command given".into()))?;
    let has_nul = req.argv.iter().any(|a| a.contains('\0'))
        || req.env.iter().any(|(k, v)| k.contains('\0') || k.contains('=') || k.is_empty() || v.contains('\0'));
    if has_nul {
        return Err(bad("arguments and environment must not contain NUL (and names no '=')".into()));
    }
    let identity = match &req.user {
        Some(u) => users::resolve(u, Path::new("/etc")).map_err(|m| refuse(ErrorCode::NotFound, m))?,
        None => Identity::root(),
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), identity.home.clone()),
        ("TERM".into(), "xterm".into()),
    ];
    for (k, v) in &req.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone()).unwrap_or_default();
    let resolved = find_program(program, &path)
        .ok_or_else(|| refuse(ErrorCode::NotFound, format!("{program}: command not found in the sandbox (PATH={path})")))?;
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).is_dir() {
        return Err(refuse(ErrorCode::NotFound, format!("working directory {cwd} does not exist in the sandbox")));
    }
    let mut cmd = Command::new(resolved);
    cmd.arg0(program).args(&req.argv[1..]).env_clear().envs(env).current_dir(&cwd);
    cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let id = identity.clone();
    // SAFETY: the closure runs in the child between fork and exec and only makes async-signal-safe
    // system calls on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if id.uid != 0 || id.gid != 0 || !id.groups.is_empty() {
                if libc::setgroups(id.groups.len(), id.groups.as_ptr()) < 0
                    || libc::setgid(id.gid) < 0
                    || libc::setuid(id.uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok((cmd, identity))
}

fn kill_group(pid: i32, sig: i32) {
    // SAFETY: kill with a negative pid signals a process group; any error (already gone) is fine.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Run one exec channel to its end: answer the request, stream, report the exit, close.
pub async fn run(id: u32, req: ExecRequest, out: mpsc::Sender<Out>, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
    let send = |m: Message| {
        let out = out.clone();
        async move {
            let _ = out.send(Out::Frame(Frame::new(id, m))).await;
        }
    };
    let spawned = prepare(&req).and_then(|(mut cmd, _)| {
        Reaper::get().spawn(&mut cmd).map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::PermissionDenied { ErrorCode::PermissionDenied } else { ErrorCode::SpawnFailed };
            refuse(code, format!("cannot start {}: {e}", req.argv[0]))
        })
    });
    let (mut child, mut exited) = match spawned {
        Ok(s) => s,
        Err(e) => {
            send(Message::Error(e)).await;
            send(Message::Close).await;
            return;
        }
    };
    let pid = child.id() as i32;
    send(Message::Started(moat_proto::Started::Exec { pid: pid as u32 })).await;

    let (exit_tx, exit_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let credits = [Credit::new(), Credit::new()];
    let mut pumps = Vec::new();
    for (i, (stream, fd)) in [
        (Stream::Stdout, child.stdout.take().map(OwnedFd::from)),
        (Stream::Stderr, child.stderr.take().map(OwnedFd::from)),
    ]
    .into_iter()
    .enumerate()
    {
        let fd = fd.expect("stdout and stderr are piped");
        pumps.push(tokio::spawn(pump(id, stream, fd, credits[i].clone(), out.clone(), exit_rx.clone(), done_tx.clone())));
    }
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let stdin_inflight = Arc::new(Mutex::new(0u32));
    let stdin_task = child.stdin.take().map(|s| tokio::spawn(feed_stdin(id, OwnedFd::from(s), stdin_rx, out.clone(), stdin_inflight.clone())));

    let deadline = req.timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut ended: Option<Ended> = None;
    let mut pumps_done = 0;
    let mut abandoned = false;
    while ended.is_none() || pumps_done < 2 {
        tokio::select! {
            msg = ctl.recv() => match msg {
                Some(Ctl::Stdin(data)) => {
                    let over = {
                        let mut inflight = stdin_inflight.lock().expect("never poisoned");
                        let over = *inflight as usize + data.len() > INITIAL_WINDOW as usize;
                        if !over {
                            *inflight += data.len() as u32;
                        }
                        over
                    };
                    if over {
                        eprintln!("moat-agent: channel {id}: host overran stdin credit; closing");
                        abandoned = true;
                        break;
                    }
                    let _ = stdin_tx.send(Some(data));
                }
                Some(Ctl::StdinEof) => { let _ = stdin_tx.send(None); }
                Some(Ctl::Credit(Stream::Stdout, n)) => credits[0].give(n),
                Some(Ctl::Credit(Stream::Stderr, n)) => credits[1].give(n),
                Some(Ctl::Credit(Stream::Stdin, _)) => {}
                Some(Ctl::Signal(sig)) => {
                    if (1..=64).contains(&sig) {
                        kill_group(pid, sig);
                    }
                }
                Some(Ctl::Close) | None => { abandoned = true; break; }
            },
            status = &mut exited, if ended.is_none() => {
                ended = Some(status.unwrap_or(Ended::Signaled(libc::SIGKILL)));
                let _ = exit_tx.send(true);
            }
            _ = done_rx.recv() => pumps_done += 1,
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() && !timed_out && ended.is_none() => {
                timed_out = true;
                kill_group(pid, libc::SIGKILL);
            }
        }
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    if abandoned {
        kill_group(pid, libc::SIGKILL);
        for p in pumps {
            p.abort();
        }
        return;
    }
    let status = match ended.expect("loop ends with an exit status") {
        Ended::Exited(code) => ExitStatus { code: Some(code), signal: None, timed_out },
        Ended::Signaled(sig) => ExitStatus { code: None, signal: Some(sig), timed_out },
    };
    send(Message::Exit(status)).await;
    send(Message::Close).await;
}

/// Forward one output pipe under credit, then send its Eof.
async fn pump(
    id: u32,
    stream: Stream,
    fd: OwnedFd,
    credit: Arc<Credit>,
    out: mpsc::Sender<Out>,
    mut exited: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<()>,
) {
    if let Ok(pipe) = pipe::Receiver::from_owned_fd(fd) {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let ready = if *exited.borrow() {
                matches!(tokio::time::timeout(DRAIN_GRACE, pipe.readable()).await, Ok(Ok(())))
            } else {
                tokio::select! {
                    r = pipe.readable() => r.is_ok(),
                    _ = exited.changed() => continue,
                }
            };
            if !ready {
                break;
            }
            let n = credit.take(MAX_CHUNK as u32).await;
            match pipe.try_read(&mut buf[..n as usize]) {
                Ok(0) => break,
                Ok(r) => {
                    credit.give(n - r as u32);
                    if out.send(Out::Frame(Frame::new(id, Message::Data { stream, data: buf[..r].to_vec() }))).await.is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => credit.give(n),
                Err(_) => break,
            }
        }
    }
    let _ = out.send(Out::Frame(Frame::new(id, Message::Eof { stream }))).await;
    let _ = done.send(());
}

/// Write stdin chunks to the process; each written chunk goes back to the host as credit.
async fn feed_stdin(
    id: u32,
    fd: OwnedFd,
    mut rx: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    out: mpsc::Sender<Out>,
    inflight: Arc<Mutex<u32>>,
) {
    let Ok(mut pipe) = pipe::Sender::from_owned_fd(fd) else { return };
    while let Some(Some(data)) = rx.recv().await {
        let n = data.len() as u32;
        if pipe.write_all(&data).await.is_err() {
            // The process closed its stdin; keep granting credit so the host is not stuck.
        }
        *inflight.lock().expect("never poisoned") -= n;
        let _ = out.send(Out::Frame(Frame::new(id, Message::Credit { stream: Stream::Stdin, bytes: n }))).await;
    }
    // Dropping the pipe closes the process's stdin.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_like_a_shell_finds_them() {
        assert!(find_program("sh", DEFAULT_PATH).is_some());
        assert_eq!(find_program("/bin/sh", "").as_deref(), Some(Path::new("/bin/sh")));
        assert!(find_program("no-such-program-xyz", DEFAULT_PATH).is_none());
        assert!(find_program("/etc/passwd", "").is_none(), "not executable");
    }

    #[test]
    fn bad_requests_are_refused_with_reasons() {
        let err = |r: ExecRequest| prepare(&r).err().expect("refused").message;
        assert!(err(ExecRequest::default()).contains("no command"));
        assert!(err(ExecRequest { argv: vec!["a\0b".into()], ..Default::default() }).contains("NUL"));
        assert!(err(ExecRequest { argv: vec!["nope-xyz".into()], ..Default::default() }).contains("nope-xyz"));
        assert!(err(ExecRequest { argv: vec!["sh".into()], cwd: Some("/no/dir".into()), ..Default::default() }).contains("/no/dir"));
    }
}
