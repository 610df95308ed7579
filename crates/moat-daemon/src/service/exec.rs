//! Running a command in a sandbox: an exec session hands a front the command's output (capped if
//! asked) and takes its stdin, signals and terminal resizes. The service decides what runs: the
//! image's Entrypoint and Cmd when no command is given, and the sandbox's environment (secret
//! placeholders, where moat's CA is, its default environment) under the caller's.

use std::sync::Arc;

use moat_api::{ErrorCode, ExecStart, SandboxInfo};
use moat_image::ImageConfig;
use moat_proto::{ExecRequest, TtySize};
use moat_sandbox::{Exec, ExecControl, ExecEvent, LinkError, SandboxError};

use super::labels::process_env;
use super::Service;
use crate::error::ServiceError;

/// Signals a front may send to a session's process group.
const SIGNALS: std::ops::RangeInclusive<i32> = 1..=64;

/// What a session hands a front, in order: output as it comes, then one exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The process ended; a session yields nothing after this.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}

/// A command running in a sandbox, as the service hands it to a front. Dropping it ends the
/// process (an attach leaves a background process running); [`Session::finish`] also removes a
/// sandbox that was to go with its command.
pub struct Session {
    exec: Exec,
    budget: OutputBudget,
    /// The truncation marker, due after the chunk that reached the cap.
    marker: Option<Output>,
    /// The sandbox to remove once the session ends (`remove_sandbox_after`).
    one_shot: Option<(Arc<Service>, String)>,
    /// Times an exec (not an attach) until its exit is read.
    meter: Option<crate::metrics::ExecMeter>,
    /// Keeps the sandbox from counting as idle while the session is open.
    active: Option<super::idle::SessionGuard>,
}

impl Session {
    fn new(exec: Exec, max_output: Option<u64>) -> Session {
        Session { exec, budget: OutputBudget::new(max_output), marker: None, one_shot: None, meter: None, active: None }
    }

    /// The process's pid inside the guest.
    pub fn pid(&self) -> u32 {
        self.exec.pid()
    }

    /// The side that feeds the process, for another task than the one reading the output.
    pub fn input(&self) -> SessionInput {
        SessionInput(self.exec.control())
    }

    /// The next output, or the exit once all output is read. Output past the session's cap is
    /// read (the process runs on, and reading grants the guest more credit) but not handed on.
    pub async fn next(&mut self) -> Result<Output, ServiceError> {
        if let Some(marker) = self.marker.take() {
            return Ok(marker);
        }
        loop {
            let event = self.exec.next_event().await.map_err(|e| ServiceError {
                hint: "the sandbox may have stopped; see `moat inspect`".into(),
                ..ServiceError::from(SandboxError::Link(e))
            })?;
            let output = match event {
                ExecEvent::Stdout(d) => Output::Stdout(d),
                ExecEvent::Stderr(d) => Output::Stderr(d),
                ExecEvent::Exit(s) => {
                    if let Some(meter) = self.meter.take() {
                        meter.exited();
                    }
                    return Ok(Output::Exit { code: s.code, signal: s.signal, timed_out: s.timed_out });
                }
            };
            let (admitted, marker) = self.budget.admit(output);
            self.marker = marker;
            if let Some(output) = admitted {
                return Ok(output);
            }
        }
    }

    /// End the session: the process ends if it still runs, then a one-shot sandbox is removed.
    pub async fn finish(mut self) {
        if let Some((svc, id)) = self.one_shot.take() {
            drop(self);
            svc.remove_one_shot(&id).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A front that never called `finish`: the sandbox still goes, in the background.
        if let Some((svc, id)) = self.one_shot.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { svc.remove_one_shot(&id).await });
            }
        }
    }
}

/// Stdin, signals and resizes for a session's process. Cheap to clone. An error means the
/// process no longer takes them (it has ended or closed its stdin), or the request was not valid.
#[derive(Clone)]
pub struct SessionInput(ExecControl);

impl SessionInput {
    /// Send bytes to the process's stdin, waiting for the guest's credit as needed.
    pub async fn write(&self, data: &[u8]) -> Result<(), ServiceError> {
        self.0.write_stdin(data).await.map_err(gone)
    }

    /// Close the process's stdin.
    pub async fn close(&self) -> Result<(), ServiceError> {
        self.0.close_stdin().await.map_err(gone)
    }

    /// Send a signal (1-64) to the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ServiceError> {
        check_signal(signal)?;
        self.0.signal(signal).await.map_err(gone)
    }

    /// Tell a process on a terminal that the terminal changed size.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ServiceError> {
        check_terminal(rows, cols)?;
        self.0.resize(TtySize { rows, cols }).await.map_err(gone)
    }
}

fn gone(e: LinkError) -> ServiceError {
    ServiceError::new(ErrorCode::ExecFailed, moat_hint::one_line(&e), "the process has ended or closed its input")
}

fn check_signal(signal: i32) -> Result<(), ServiceError> {
    if !SIGNALS.contains(&signal) {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            format!("signal {signal} is out of range"),
            "send a signal number from 1 to 64, e.g. 15 for SIGTERM",
        ));
    }
    Ok(())
}

fn check_terminal(rows: u16, cols: u16) -> Result<(), ServiceError> {
    if rows == 0 || cols == 0 {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            "a terminal needs at least one row and one column",
            "send the client terminal's size, e.g. {\"rows\": 24, \"cols\": 80}",
        ));
    }
    Ok(())
}

/// The output a session hands on when it is capped: whole chunks while they fit, the part of
/// the chunk that reaches the cap followed by one marker on stderr, then nothing.
struct OutputBudget {
    max: Option<u64>,
    left: u64,
    marked: bool,
}

impl OutputBudget {
    fn new(max: Option<u64>) -> OutputBudget {
        OutputBudget { max, left: max.unwrap_or(u64::MAX), marked: false }
    }

    /// What to hand on of one output chunk, and the marker to send after it if it was cut.
    fn admit(&mut self, output: Output) -> (Option<Output>, Option<Output>) {
        let (stdout, mut data) = match output {
            Output::Stdout(d) => (true, d),
            Output::Stderr(d) => (false, d),
            exit @ Output::Exit { .. } => return (Some(exit), None),
        };
        if self.marked {
            return (None, None);
        }
        let cut = data.len() as u64 > self.left;
        if cut {
            data.truncate(self.left as usize);
        }
        self.left -= data.len() as u64;
        let marker = cut.then(|| {
            self.marked = true;
            let max = self.max.unwrap_or(0);
            Output::Stderr(format!("\n[moat: output truncated after {max} bytes]\n").into_bytes())
        });
        match marker {
            Some(marker) if data.is_empty() => (Some(marker), None),
            marker => (Some(if stdout { Output::Stdout(data) } else { Output::Stderr(data) }), marker),
        }
    }
}

/// What the agent is asked to run for `start` in sandbox `info` whose image is configured so.
fn exec_request(info: &SandboxInfo, image: &ImageConfig, start: ExecStart) -> Result<ExecRequest, ServiceError> {
    let argv = if start.argv.is_empty() {
        // No command: the image's Entrypoint and Cmd, as `docker run IMAGE` does.
        image.entrypoint.iter().chain(&image.cmd).cloned().collect()
    } else {
        start.argv
    };
    if argv.is_empty() {
        return Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            "no command given, and the image has no Entrypoint or Cmd",
            "give the command after `--`",
        ));
    }
    if let Some(t) = start.tty {
        check_terminal(t.rows, t.cols)?;
    }
    Ok(ExecRequest {
        argv,
        env: process_env(info, start.env),
        cwd: start.cwd,
        user: start.user,
        timeout_ms: start.timeout_ms,
        stdin: start.stdin,
        tty: start.tty.map(|t| TtySize { rows: t.rows, cols: t.cols }),
        detach: false,
    })
}

/// Why the agent would not start a command.
pub(super) fn start_error(e: SandboxError) -> ServiceError {
    match e {
        // The arguments and the environment, the image's included, travel in one agent message.
        SandboxError::Link(LinkError::TooLarge { size }) => ServiceError::new(
            ErrorCode::InvalidRequest,
            format!(
                "the command's arguments and environment (with the image's) take {size} bytes; at most {} fit \
                 one message to the sandbox",
                moat_proto::MAX_PAYLOAD
            ),
            "pass large data on stdin or in a file (`moat cp`), not in arguments or the environment",
        ),
        // What the agent refused (a NUL in an argument, an empty program) is the request's fault.
        e => ServiceError { hint: "check the command, its working directory and user".into(), ..ServiceError::from(e) },
    }
}

impl Service {
    /// The record of a running sandbox, or why it cannot run anything now. A front asks before it
    /// commits to a session (e.g. before a WebSocket upgrade).
    pub fn running_sandbox(&self, reference: &str) -> Result<SandboxInfo, ServiceError> {
        Ok(self.running(reference)?.0)
    }

    /// Start a command in a running sandbox. With `remove_sandbox_after`, the command owns the
    /// sandbox's life: its lease is dropped now, and the sandbox is removed when the session
    /// finishes, or at once if the command does not start.
    pub async fn exec(self: &Arc<Self>, reference: &str, start: ExecStart) -> Result<Session, ServiceError> {
        let one_shot = start.remove_sandbox_after;
        let started = self.start_exec(reference, start).await;
        let id = match &started {
            Ok((id, _)) => Some(id.clone()),
            // Only a sandbox that exists can go; an unknown reference was never one-shot.
            Err(_) => self.resolve(reference).ok().map(|s| s.id),
        };
        match (started, id) {
            (Ok((id, mut session)), _) => {
                if one_shot {
                    session.one_shot = Some((self.clone(), id));
                }
                Ok(session)
            }
            (Err(e), Some(id)) if one_shot => {
                self.remove_one_shot(&id).await;
                Err(e)
            }
            (Err(e), _) => Err(e),
        }
    }

    async fn start_exec(&self, reference: &str, start: ExecStart) -> Result<(String, Session), ServiceError> {
        let (info, sandbox) = self.running(reference)?;
        if start.remove_sandbox_after {
            // This session owns the sandbox's life now; it must not expire under the command.
            self.clear_lease(&info.id)?;
        }
        let max_output = start.max_output_bytes;
        let request = exec_request(&info, &sandbox.image.config, start)?;
        let exec = sandbox.exec(request).await.map_err(start_error)?;
        let mut session = Session::new(exec, max_output);
        session.meter = Some(self.metrics.exec_started());
        session.active = Some(self.activity.session(&info.id));
        Ok((info.id, session))
    }

    /// Remove a sandbox whose exec session owned it; one already gone is fine.
    async fn remove_one_shot(&self, id: &str) {
        match self.remove(id, true).await {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(e) => tracing::warn!(sandbox = %id, error = %e, "removing a one-shot sandbox failed"),
        }
    }

    /// Follow a background process's output: what it printed before (with `replay`), then live,
    /// then its exit. Finishing the session leaves the process running.
    pub async fn attach(&self, reference: &str, pid: u32, replay: bool) -> Result<Session, ServiceError> {
        let (info, sandbox) = self.running(reference)?;
        let exec = sandbox
            .file_stream(moat_proto::Request::Attach { pid, replay })
            .await
            .map_err(crate::error::process_error)?;
        let mut session = Session::new(exec, None);
        session.active = Some(self.activity.session(&info.id));
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SandboxInfo {
        crate::state::tests::sample("abc000000001", "a")
    }

    fn out(d: &str) -> Output {
        Output::Stdout(d.as_bytes().to_vec())
    }

    /// No command runs the image's Entrypoint then Cmd; with neither, the request is refused.
    #[test]
    fn exec_defaults_to_the_images_command() {
        let image = ImageConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
            ..ImageConfig::default()
        };
        let req = exec_request(&info(), &image, ExecStart::default()).expect("a default command");
        assert_eq!(req.argv, ["/bin/sh", "-c", "echo hi"]);
        let given = ExecStart { argv: vec!["true".into()], ..ExecStart::default() };
        assert_eq!(exec_request(&info(), &image, given).expect("a command").argv, ["true"]);
        let e = exec_request(&info(), &ImageConfig::default(), ExecStart::default()).expect_err("nothing to run");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("no command given"), "{}", e.message);
    }

    #[test]
    fn a_terminal_needs_rows_and_columns() {
        for (rows, cols) in [(0, 80), (24, 0)] {
            let start = ExecStart {
                argv: vec!["sh".into()],
                tty: Some(moat_api::TtySize { rows, cols }),
                ..ExecStart::default()
            };
            let e = exec_request(&info(), &ImageConfig::default(), start).expect_err("no terminal size");
            assert_eq!(e.code, ErrorCode::InvalidRequest);
        }
        let start = ExecStart {
            argv: vec!["sh".into()],
            tty: Some(moat_api::TtySize { rows: 24, cols: 80 }),
            ..ExecStart::default()
        };
        let req = exec_request(&info(), &ImageConfig::default(), start).expect("a terminal");
        assert_eq!(req.tty, Some(TtySize { rows: 24, cols: 80 }));
        assert!(check_signal(0).is_err() && check_signal(65).is_err() && check_signal(9).is_ok());
    }

    /// The caller's variables come after the sandbox's, so they win in the guest.
    #[test]
    fn the_callers_environment_wins_over_the_sandboxes() {
        let mut info = info();
        info.net.secrets = vec![moat_api::SecretSpec {
            name: "TOKEN".into(),
            hosts: vec!["api.example.com".into()],
            ..Default::default()
        }];
        let env = process_env(&info, vec![("TOKEN".into(), "mine".into())]);
        let tokens: Vec<&str> = env.iter().filter(|(k, _)| k == "TOKEN").map(|(_, v)| v.as_str()).collect();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[1], "mine");
        assert!(env.iter().any(|(k, _)| k == "SSL_CERT_FILE"));
    }

    /// Output up to the cap passes whole; the chunk that crosses it is cut and followed by one
    /// marker, even when an earlier chunk ended exactly at the cap; later output is dropped and
    /// the exit always passes.
    #[test]
    fn capped_output_is_cut_once_with_a_marker() {
        let marker = Output::Stderr(b"\n[moat: output truncated after 5 bytes]\n".to_vec());
        let mut b = OutputBudget::new(Some(5));
        assert_eq!(b.admit(out("abc")), (Some(out("abc")), None));
        assert_eq!(b.admit(out("defg")), (Some(out("de")), Some(marker.clone())));
        assert_eq!(b.admit(out("h")), (None, None));
        let exit = Output::Exit { code: Some(0), signal: None, timed_out: false };
        assert_eq!(b.admit(exit.clone()), (Some(exit), None));

        let mut b = OutputBudget::new(Some(5));
        assert_eq!(b.admit(out("abcde")), (Some(out("abcde")), None));
        assert_eq!(b.admit(Output::Stderr(b"x".to_vec())), (Some(marker), None));
        assert_eq!(b.admit(out("y")), (None, None));

        let mut unlimited = OutputBudget::new(None);
        let big = Output::Stdout(vec![0; 1 << 20]);
        assert_eq!(unlimited.admit(big.clone()), (Some(big), None));
    }
}
