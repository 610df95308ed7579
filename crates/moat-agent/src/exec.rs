//! One exec channel: spawn the process, stream its output under the host's credit, feed stdin,
//! deliver signals, enforce the timeout, report the exit.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::{AgentError, ErrorCode, ExecRequest, Message, Started, Stream, TtySize, INITIAL_WINDOW, MAX_CHUNK};
use tokio::sync::{mpsc, watch};

use crate::channel::{
    async_fd, exit_status, kill_group, read_off_thread, readable, write_off_thread, Credit, Ctl, Fd, Outbox,
};
use crate::reaper::{Ended, Reaper};
use crate::users::{self, Identity};

/// PATH of every process unless the request sets its own.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// A pseudo-terminal for an exec: the process gets the replica as its controlling terminal, the
/// agent reads and writes the controller.
struct Pty {
    controller: OwnedFd,
    replica: OwnedFd,
}

impl Pty {
    fn open(size: TtySize) -> std::io::Result<Pty> {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let controller = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        grantpt(&controller)?;
        unlockpt(&controller)?;
        let name = ptsname(&controller, Vec::new())?;
        let replica = rustix::fs::open(
            name.as_c_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        resize(&controller, size)?;
        Ok(Pty { controller, replica })
    }
}

fn resize(controller: &impl AsFd, size: TtySize) -> std::io::Result<()> {
    let ws = rustix::termios::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    Ok(rustix::termios::tcsetwinsize(controller, ws)?)
}

/// Check the request and build the command; errors are what the host shows the user. With a
/// `tty` replica, it becomes the process's stdio and controlling terminal.
fn prepare(req: &ExecRequest, etc: &Path, tty: Option<&OwnedFd>) -> Result<Command, AgentError> {
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
    match tty {
        Some(replica) => {
            let stdio = || replica.try_clone().map(Stdio::from);
            let internal = |e: std::io::Error| refuse(ErrorCode::Internal, format!("Cannot set up the terminal: {e}."));
            cmd.stdin(stdio().map_err(internal)?).stdout(stdio().map_err(internal)?).stderr(stdio().map_err(internal)?);
            if !req.env.iter().any(|(k, _)| k == "TERM") {
                cmd.env("TERM", "xterm-256color");
            }
        }
        None => {
            cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let controlling_tty = tty.is_some();
    let switch_user = !identity.is_plain_root();
    let (uid, gid, groups) = (identity.uid, identity.gid, identity.groups);
    // SAFETY: the closure runs in the child between fork and exec and only makes async-signal-safe
    // system calls on values prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // stdin is the terminal's replica by now; make it the session's controlling tty.
            if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
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

/// Run one exec channel to its end: answer the request, stream, report the exit, close.
pub async fn run(
    id: u32,
    mut req: ExecRequest,
    reaper: Arc<Reaper>,
    jobs: Arc<crate::jobs::Jobs>,
    out: Outbox,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
) {
    if req.detach {
        // A background process reads nothing and has no terminal; its output goes to the job.
        req.stdin = false;
        req.tty = None;
    }
    let pty = match req.tty.map(Pty::open).transpose() {
        Ok(pty) => pty,
        Err(e) => {
            out.send(id, Message::Error(refuse(ErrorCode::Internal, format!("Cannot open a terminal: {e}.")))).await;
            out.send(id, Message::Close).await;
            return;
        }
    };
    // Off the runtime's thread: the checks and the child's chdir and exec may touch a host mount
    // (a working directory or program in it), whose FUSE calls this thread must forward, and a
    // spawn waits for the child's exec.
    let (spawned, pty) = {
        let (req, reaper) = (req.clone(), reaper.clone());
        tokio::task::spawn_blocking(move || {
            let spawned = prepare(&req, Path::new("/etc"), pty.as_ref().map(|p| &p.replica)).and_then(|mut cmd| {
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
            (spawned, pty)
        })
        .await
        .unwrap_or_else(|e| (Err(refuse(ErrorCode::Internal, format!("Starting the process failed: {e}."))), None))
    };
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
    if req.detach {
        let outputs = [
            (Stream::Stdout, child.stdout.take().map(OwnedFd::from)),
            (Stream::Stderr, child.stderr.take().map(OwnedFd::from)),
        ]
        .into_iter()
        .filter_map(|(s, fd)| Some((s, fd?)))
        .collect();
        jobs.adopt(child.id(), req.argv, outputs, exited);
        out.send(id, Message::Close).await;
        return;
    }

    let (exit_tx, exit_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let credits = [Credit::new(), Credit::new()];
    // Output and input ends: the pipes, or the terminal's controller for all three.
    let (outputs, stdin_fd, controller) = match pty {
        Some(Pty { controller, replica }) => {
            drop(replica); // The process holds it now; EIO on the controller then means it is gone.
            match async_fd(controller) {
                Ok(c) => (vec![(Stream::Stdout, c.clone())], Some(c.clone()), Some(c)),
                Err(_) => (Vec::new(), None, None),
            }
        }
        None => {
            let pipes = [
                (Stream::Stdout, child.stdout.take().map(OwnedFd::from)),
                (Stream::Stderr, child.stderr.take().map(OwnedFd::from)),
            ];
            let outputs = pipes.into_iter().filter_map(|(stream, fd)| Some((stream, async_fd(fd?).ok()?))).collect();
            (outputs, child.stdin.take().and_then(|s| async_fd(OwnedFd::from(s)).ok()), None)
        }
    };
    let mut pumps = Vec::new();
    let pump_count = outputs.len();
    for (stream, fd) in outputs {
        let credit = credits[if stream == Stream::Stdout { 0 } else { 1 }].clone();
        pumps.push(tokio::spawn(pump(id, stream, fd, credit, out.clone(), exit_rx.clone(), done_tx.clone())));
    }
    drop(done_tx);
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let stdin_in_flight = Arc::new(Mutex::new(0u32));
    let stdin_task =
        stdin_fd.map(|fd| tokio::spawn(feed_stdin(id, fd, stdin_rx, out.clone(), stdin_in_flight.clone())));

    let deadline = req.timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut ended: Option<Ended> = None;
    let mut pumps_done = 0;
    let mut abandoned = false;
    while ended.is_none() || pumps_done < pump_count {
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
                Some(Ctl::Resize(size)) => {
                    if let Some(c) = &controller {
                        let _ = resize(c.get_ref(), size);
                    }
                }
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

/// Forward one output (pipe or terminal) under credit, then send its Eof.
async fn pump(
    id: u32,
    stream: Stream,
    fd: Fd,
    credit: Arc<Credit>,
    out: Outbox,
    mut exited: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<()>,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    while let Some(ready) = readable(&fd, &mut exited).await {
        let n = credit.take(MAX_CHUNK as u32).await;
        let (read, back) = read_off_thread(&fd, ready, buf, n as usize).await;
        buf = back;
        match read {
            Ok(0) => break,
            Ok(r) => {
                credit.give(n - r as u32);
                if !out.send(id, Message::Data { stream, data: buf[..r].to_vec() }).await {
                    break;
                }
            }
            // Not ready after all: readiness was cleared; wait again.
            Err(rustix::io::Errno::AGAIN) => credit.give(n),
            // EIO is how a terminal controller reports that every replica is closed.
            Err(_) => break,
        }
    }
    out.send(id, Message::Eof { stream }).await;
    let _ = done.send(());
}

/// Write all of `data` to a non-blocking descriptor.
async fn write_all(fd: &Fd, data: &[u8]) -> std::io::Result<()> {
    let mut rest = data.to_vec();
    while !rest.is_empty() {
        let ready = fd.writable().await?;
        let (written, back) = write_off_thread(fd, ready, rest).await;
        rest = back;
        match written {
            Ok(n) => {
                rest.drain(..n);
            }
            Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Write stdin chunks to the process; each written chunk goes back to the host as credit.
async fn feed_stdin(
    id: u32,
    fd: Fd,
    mut rx: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    out: Outbox,
    in_flight: Arc<Mutex<u32>>,
) {
    let mut open = true;
    while let Some(Some(data)) = rx.recv().await {
        let n = data.len() as u32;
        // Once the process closed its stdin the bytes are dropped, but still credited so a host
        // writing to a process that stopped reading is never stuck.
        if open && write_all(&fd, &data).await.is_err() {
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
    // Dropping the last reference closes the process's stdin (for a terminal, the pump's
    // reference keeps the controller open until the output ends).
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
        let err = |r: ExecRequest| prepare(&r, Path::new("/etc"), None).expect_err("refused");
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
