//! One exec channel: spawn the process, stream its output under the host's credit, feed stdin,
//! deliver signals, enforce the timeout, report the exit.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::{AgentError, ErrorCode, ExecRequest, ExitStatus, Message, Started, Stream, INITIAL_WINDOW, MAX_CHUNK};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, Notify};

use crate::link::Outbox;
use crate::reaper::{Ended, Reaper};
use crate::users::{self, Identity};

/// After the process exits, output is still forwarded while it flows; a pipe that stays open
/// (a background child holds it) but silent for this long is treated as ended.
pub const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// PATH of every process unless the request sets its own.
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

/// Bytes the host allows us to send on one output stream.
struct Credit {
    avail: Mutex<u32>,
    notify: Notify,
}

impl Credit {
    fn new() -> Arc<Credit> {
        Arc::new(Credit { avail: Mutex::new(INITIAL_WINDOW), notify: Notify::new() })
    }

    /// Wait for credit and take up to `max` bytes of it.
    async fn take(&self, max: u32) -> u32 {
        loop {
            let notified = self.notify.notified();
            {
                let mut a = self.avail.lock().expect("the credit lock is never held across a panic");
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
        let mut a = self.avail.lock().expect("the credit lock is never held across a panic");
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

/// The environment of a process: the agent's defaults, then the request's variables on top.
pub fn environment(identity: &Identity, requested: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        vec![("PATH".into(), DEFAULT_PATH.into()), ("HOME".into(), identity.home.clone())];
    if let Some(name) = &identity.name {
        env.push(("USER".into(), name.clone()));
        env.push(("LOGNAME".into(), name.clone()));
    }
    for (k, v) in requested {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// Check the request and build the command; errors are what the host shows the user.
fn prepare(req: &ExecRequest, etc: &Path) -> Result<Command, AgentError> {
    let bad = |m: &str| refuse(ErrorCode::BadRequest, m.into());
    let program = req.argv.first().ok_or_else(|| bad("The request names no program to run (argv is empty)."))?;
    if program.is_empty() {
        return Err(bad("The program name is empty."));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(bad("An argument contains a NUL byte, which a process cannot receive."));
    }
    if req.env.iter().any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0')) {
        return Err(bad("An environment variable has an empty name, a '=' in its name or a NUL byte."));
    }
    let identity = match &req.user {
        Some(u) => users::resolve(u, etc).map_err(|e| {
            let code = match e {
                users::UserError::Invalid(_) => ErrorCode::BadRequest,
                _ => ErrorCode::NotFound,
            };
            refuse(code, format!("Cannot run {program} as {u}: {e}."))
        })?,
        None => Identity::root(),
    };
    let env = environment(&identity, &req.env);
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or_default();
    let resolved = find_program(program, path).ok_or_else(|| {
        let message = if program.contains('/') {
            format!("The program {program} does not exist in the sandbox or is not executable.")
        } else {
            format!("The program {program} was not found in the sandbox (searched PATH={path}).")
        };
        refuse(ErrorCode::NotFound, message)
    })?;
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".into());
    if !Path::new(&cwd).is_dir() {
        return Err(refuse(ErrorCode::NotFound, format!("The working directory {cwd} does not exist in the sandbox.")));
    }
    let mut cmd = Command::new(resolved);
    cmd.arg0(program).args(&req.argv[1..]).env_clear().envs(env).current_dir(&cwd);
    cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let switch_user = !identity.is_plain_root();
    let (uid, gid, groups) = (identity.uid, identity.gid, identity.groups);
    // SAFETY: the closure runs in the child between fork and exec and only makes async-signal-safe
    // system calls on values prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if switch_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

fn kill_group(pid: i32, sig: i32) {
    // SAFETY: kill with a negative pid signals a process group; an error (already gone) is fine.
    unsafe { libc::kill(-pid, sig) };
}

/// Decode what the reaper reported into the protocol's exit status.
fn exit_status(ended: Ended, timed_out: bool) -> ExitStatus {
    match ended {
        Ended::Exited(code) => ExitStatus { code: Some(code), signal: None, timed_out },
        Ended::Signaled(sig) => ExitStatus { code: None, signal: Some(sig), timed_out },
    }
}

/// Run one exec channel to its end: answer the request, stream, report the exit, close.
pub async fn run(id: u32, req: ExecRequest, reaper: Arc<Reaper>, out: Outbox, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
    let spawned = prepare(&req, Path::new("/etc")).and_then(|mut cmd| {
        reaper.spawn(&mut cmd).map_err(|e| {
            let program = &req.argv[0];
            let code = match e.kind() {
                std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
                std::io::ErrorKind::NotFound => ErrorCode::NotFound,
                _ => ErrorCode::SpawnFailed,
            };
            refuse(code, format!("Starting {program} failed: {e}."))
        })
    });
    let (mut child, mut exited) = match spawned {
        Ok(s) => s,
        Err(e) => {
            out.send(id, Message::Error(e)).await;
            out.send(id, Message::Close).await;
            return;
        }
    };
    let pid = i32::try_from(child.id()).expect("pids fit in pid_t");
    out.send(id, Message::Started(Started::Exec { pid: child.id() })).await;

    let (exit_tx, exit_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let credits = [Credit::new(), Credit::new()];
    let mut pumps = Vec::new();
    let outputs = [
        (Stream::Stdout, child.stdout.take().map(OwnedFd::from)),
        (Stream::Stderr, child.stderr.take().map(OwnedFd::from)),
    ];
    for (i, (stream, fd)) in outputs.into_iter().enumerate() {
        let fd = fd.expect("stdout and stderr are always piped");
        let task = pump(id, stream, fd, credits[i].clone(), out.clone(), exit_rx.clone(), done_tx.clone());
        pumps.push(tokio::spawn(task));
    }
    drop(done_tx);
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let stdin_in_flight = Arc::new(Mutex::new(0u32));
    let stdin_task = child
        .stdin
        .take()
        .map(|s| tokio::spawn(feed_stdin(id, OwnedFd::from(s), stdin_rx, out.clone(), stdin_in_flight.clone())));

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
                        let mut in_flight = stdin_in_flight.lock().expect("the stdin lock is never held across a panic");
                        let total = *in_flight as usize + data.len();
                        if total <= INITIAL_WINDOW as usize {
                            *in_flight = total as u32;
                        }
                        total > INITIAL_WINDOW as usize
                    };
                    if over {
                        eprintln!("moat-agent: channel {id}: the host sent more stdin than its credit allows; closing the channel");
                        out.send(id, Message::Close).await;
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
                    // Once the leader is reaped its pid (and group id) may be reused.
                    if (1..=64).contains(&sig) && ended.is_none() {
                        kill_group(pid, sig);
                    }
                }
                Some(Ctl::Close) | None => { abandoned = true; break; }
            },
            status = &mut exited, if ended.is_none() => {
                // A dropped sender means someone else reaped it; report it as killed.
                ended = Some(status.unwrap_or(Ended::Signaled(libc::SIGKILL)));
                let _ = exit_tx.send(true);
            }
            Some(()) = done_rx.recv() => pumps_done += 1,
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
        if ended.is_none() {
            kill_group(pid, libc::SIGKILL);
        }
        for p in pumps {
            p.abort();
        }
        return;
    }
    let status = exit_status(ended.expect("the loop only ends normally with an exit status"), timed_out);
    out.send(id, Message::Exit(status)).await;
    out.send(id, Message::Close).await;
}

/// Forward one output pipe under credit, then send its Eof.
async fn pump(
    id: u32,
    stream: Stream,
    fd: OwnedFd,
    credit: Arc<Credit>,
    out: Outbox,
    mut exited: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<()>,
) {
    if let Ok(pipe) = pipe::Receiver::from_owned_fd(fd) {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let ready = loop {
                if *exited.borrow() {
                    // The process is gone: a silent pipe is held open by a background child.
                    break matches!(tokio::time::timeout(DRAIN_GRACE, pipe.readable()).await, Ok(Ok(())));
                }
                tokio::select! {
                    r = pipe.readable() => break r.is_ok(),
                    r = exited.changed() => if r.is_err() { break false },
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
                    if !out.send(id, Message::Data { stream, data: buf[..r].to_vec() }).await {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => credit.give(n),
                Err(_) => break,
            }
        }
    }
    out.send(id, Message::Eof { stream }).await;
    let _ = done.send(());
}

/// Write stdin chunks to the process; each written chunk goes back to the host as credit.
async fn feed_stdin(
    id: u32,
    fd: OwnedFd,
    mut rx: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    out: Outbox,
    in_flight: Arc<Mutex<u32>>,
) {
    let Ok(mut pipe) = pipe::Sender::from_owned_fd(fd) else { return };
    let mut open = true;
    while let Some(Some(data)) = rx.recv().await {
        let n = data.len() as u32;
        // Once the process closed its stdin the bytes are dropped, but still credited so a host
        // writing to a process that stopped reading is never stuck.
        if open && pipe.write_all(&data).await.is_err() {
            open = false;
        }
        {
            let mut f = in_flight.lock().expect("the stdin lock is never held across a panic");
            *f = f.saturating_sub(n);
        }
        if n > 0 {
            out.send(id, Message::Credit { stream: Stream::Stdin, bytes: n }).await;
        }
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
    fn bad_requests_are_refused_with_sentences() {
        let err = |r: ExecRequest| prepare(&r, Path::new("/etc")).expect_err("refused");
        let e = err(ExecRequest::default());
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("no program"), "{}", e.message);
        assert!(err(ExecRequest { argv: vec!["a\0b".into()], ..Default::default() }).message.contains("NUL"));
        let e = err(ExecRequest { argv: vec!["nope-xyz".into()], ..Default::default() });
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("nope-xyz") && e.message.ends_with('.'), "{}", e.message);
        let e = err(ExecRequest { argv: vec!["sh".into()], cwd: Some("/no/dir".into()), ..Default::default() });
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("/no/dir"));
        let e =
            err(ExecRequest { argv: vec!["sh".into()], user: Some("no-such-user-xyz".into()), ..Default::default() });
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("no-such-user-xyz"), "{}", e.message);
    }

    #[test]
    fn request_environment_overrides_the_defaults() {
        let env = environment(&Identity::root(), &[("PATH".into(), "/x".into()), ("A".into(), "1".into())]);
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        assert!(env.contains(&("PATH".into(), "/x".into())));
        assert!(env.contains(&("HOME".into(), "/root".into())));
        assert!(env.contains(&("A".into(), "1".into())));
    }
}
