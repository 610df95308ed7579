//! One process started through the front. The front, not an RPC, holds its exec session: a
//! process outlives the stream that started it. A pump reads its output and hands every message
//! to the streams attached at the time, waiting for each (output is lossless while someone
//! listens, and that wait back-pressures the process through moat's flow-controlled exec); with
//! nobody attached the output is read and dropped.

use std::sync::{Arc, Mutex, OnceLock};

use futures_util::future::{join_all, BoxFuture};
use moat_client::{ClientError, ExecInput, ExecOutput, ExecOutputs};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::messages::{DataEvent, EndEvent, EventMessage, Input, ProcessEvent, ProcessInfo, B64};
use crate::connect::json;
use crate::error::{Code, Failure};

/// What an attached stream receives: event messages, or the failure that ends it.
pub(crate) type Item = Result<serde_json::Value, Failure>;

/// Messages queued for one attached stream before the pump waits for it.
pub(crate) const STREAM_QUEUE: usize = 16;
/// The largest stdin write sent at once (the daemon takes exec messages of up to 1 MiB).
const STDIN_CHUNK: usize = 64 << 10;

/// How the front feeds a running process: moat's exec session, or a test double.
pub(crate) trait Feed: Send + 'static {
    fn stdin<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), ClientError>>;
    fn close_stdin(&mut self) -> BoxFuture<'_, Result<(), ClientError>>;
    fn signal(&mut self, signal: i32) -> BoxFuture<'_, Result<(), ClientError>>;
    fn resize(&mut self, rows: u16, cols: u16) -> BoxFuture<'_, Result<(), ClientError>>;
}

/// Where the pump reads a process's output: moat's exec session, or a test double.
pub(crate) trait Output: Send + 'static {
    fn next(&mut self) -> BoxFuture<'_, Result<ExecOutput, ClientError>>;
}

impl Feed for ExecInput {
    fn stdin<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), ClientError>> {
        Box::pin(ExecInput::stdin(self, data))
    }

    fn close_stdin(&mut self) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(ExecInput::close_stdin(self))
    }

    fn signal(&mut self, signal: i32) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(ExecInput::signal(self, signal))
    }

    fn resize(&mut self, rows: u16, cols: u16) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(ExecInput::resize(self, rows, cols))
    }
}

impl Output for ExecOutputs {
    fn next(&mut self) -> BoxFuture<'_, Result<ExecOutput, ClientError>> {
        Box::pin(ExecOutputs::next(self))
    }
}

/// A process started through the front, while it runs.
pub(crate) struct Process {
    /// Tells this process from a later one that got the same pid.
    pub serial: u64,
    pub pid: u32,
    /// Its config and tag, for `List`.
    pub info: ProcessInfo,
    /// Whether it runs on a terminal (its output is `pty` data, its input goes to the terminal).
    pub terminal: bool,
    input: tokio::sync::Mutex<Feeder>,
    attached: Mutex<Attached>,
    pump: OnceLock<AbortHandle>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process").field("pid", &self.pid).field("serial", &self.serial).finish_non_exhaustive()
    }
}

struct Feeder {
    feed: Box<dyn Feed>,
    /// Whether stdin takes data: opened at the start and not closed since.
    stdin_open: bool,
}

#[derive(Default)]
struct Attached {
    streams: Vec<mpsc::Sender<Item>>,
    ended: bool,
}

impl Process {
    pub(crate) fn new(serial: u64, info: ProcessInfo, terminal: bool, stdin: bool, feed: Box<dyn Feed>) -> Process {
        Process {
            serial,
            pid: info.pid,
            info,
            terminal,
            input: tokio::sync::Mutex::new(Feeder { feed, stdin_open: stdin || terminal }),
            attached: Mutex::default(),
            pump: OnceLock::new(),
        }
    }

    fn attached(&self) -> std::sync::MutexGuard<'_, Attached> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream of everything the process prints from now on, then its end; `None` once it
    /// has ended.
    pub(crate) fn attach(&self) -> Option<mpsc::Receiver<Item>> {
        let mut attached = self.attached();
        if attached.ended {
            return None;
        }
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        attached.streams.push(tx);
        Some(rx)
    }

    /// How many streams are attached, for tests waiting for one to be.
    #[cfg(test)]
    pub(crate) fn attached_streams(&self) -> usize {
        self.attached().streams.len()
    }

    pub(crate) fn ended(&self) -> bool {
        self.attached().ended
    }

    /// Mark the process ended and hand over the streams still attached.
    fn end(&self) -> Vec<mpsc::Sender<Item>> {
        let mut attached = self.attached();
        attached.ended = true;
        std::mem::take(&mut attached.streams)
    }

    /// Hand one message to every attached stream, waiting for each; streams whose client has
    /// gone are detached.
    async fn fan_out(&self, item: Item) {
        let streams = self.attached().streams.clone();
        if streams.is_empty() {
            return;
        }
        let sent = join_all(streams.iter().map(|s| s.send(item.clone()))).await;
        let gone: Vec<_> = streams.iter().zip(sent).filter(|(_, r)| r.is_err()).map(|(s, _)| s).collect();
        if !gone.is_empty() {
            self.attached().streams.retain(|s| !gone.iter().any(|g| g.same_channel(s)));
        }
    }

    pub(crate) fn set_pump(&self, pump: AbortHandle) {
        let _ = self.pump.set(pump);
    }

    /// Stop following the process (its sandbox is gone): the pump stops, attached streams end
    /// with `why` (when their queue has room for it).
    pub(crate) fn abandon(&self, why: &Failure) {
        if let Some(pump) = self.pump.get() {
            pump.abort();
        }
        for stream in self.end() {
            let _ = stream.try_send(Err(why.clone()));
        }
    }

    /// Send input: stdin to a process started with it, or to the terminal of one on a terminal.
    pub(crate) async fn write(&self, input: Input) -> Result<(), Failure> {
        let data = match input {
            Input::Pty(_) if !self.terminal => {
                return Err(Failure::new(
                    Code::FailedPrecondition,
                    format!("process {} has no terminal: send its input as `stdin`", self.pid),
                ))
            }
            Input::Stdin(d) | Input::Pty(d) => d,
        };
        let mut input = self.input.lock().await;
        if !input.stdin_open {
            return Err(Failure::new(
                Code::FailedPrecondition,
                format!("process {} does not take stdin: start it with `stdin: true` and do not close it", self.pid),
            ));
        }
        for chunk in data.chunks(STDIN_CHUNK) {
            input.feed.stdin(chunk).await.map_err(|e| self.input_failed(e))?;
        }
        Ok(())
    }

    /// Close stdin (the process reads end-of-file).
    pub(crate) async fn close_stdin(&self) -> Result<(), Failure> {
        if self.terminal {
            return Err(Failure::new(
                Code::FailedPrecondition,
                format!("process {} runs on a terminal, which has no stdin to close: send Ctrl-D (\\x04)", self.pid),
            ));
        }
        let mut input = self.input.lock().await;
        if !input.stdin_open {
            return Ok(());
        }
        input.feed.close_stdin().await.map_err(|e| self.input_failed(e))?;
        input.stdin_open = false;
        Ok(())
    }

    /// Signal the process's group.
    pub(crate) async fn signal(&self, signal: i32) -> Result<(), Failure> {
        let mut input = self.input.lock().await;
        input.feed.signal(signal).await.map_err(|e| self.input_failed(e))
    }

    /// Resize the process's terminal.
    pub(crate) async fn resize(&self, rows: u32, cols: u32) -> Result<(), Failure> {
        if !self.terminal {
            return Err(Failure::new(
                Code::FailedPrecondition,
                format!("process {} has no terminal to resize: start it with `pty`", self.pid),
            ));
        }
        let (rows, cols) = terminal_size(rows, cols)?;
        let mut input = self.input.lock().await;
        input.feed.resize(rows, cols).await.map_err(|e| self.input_failed(e))
    }

    fn input_failed(&self, e: ClientError) -> Failure {
        if self.ended() {
            not_found_pid(self.pid)
        } else {
            Failure::new(Code::Unavailable, format!("process {} no longer takes input: {e}", self.pid))
        }
    }
}

/// envd's answer for a pid it does not know (the SDK's `kill()` reads it as "already gone").
pub(crate) fn not_found_pid(pid: u32) -> Failure {
    Failure::not_found(format!("process with pid {pid} not found"))
}

/// A terminal size from the request, within what a terminal takes.
pub(crate) fn terminal_size(rows: u32, cols: u32) -> Result<(u16, u16), Failure> {
    let fit = |n: u32| u16::try_from(n).ok().filter(|&n| n > 0);
    match (fit(rows), fit(cols)) {
        (Some(r), Some(c)) => Ok((r, c)),
        _ => Err(Failure::invalid(format!(
            "a terminal of {cols}x{rows} cannot be: send `pty.size` with cols and rows from 1 to 65535"
        ))),
    }
}

/// Read a process's output to its end, fanning it out; then, once `ended` took it off the
/// registry, hand every attached stream the end (or the failure that cut the session).
pub(crate) async fn pump(process: Arc<Process>, mut output: impl Output, ended: impl FnOnce() + Send) {
    let last: Item = loop {
        let data = match output.next().await {
            Ok(ExecOutput::Stdout(d)) if process.terminal => DataEvent::Pty(B64(d)),
            Ok(ExecOutput::Stdout(d)) => DataEvent::Stdout(B64(d)),
            Ok(ExecOutput::Stderr(d)) => DataEvent::Stderr(B64(d)),
            Ok(ExecOutput::Started(_)) => continue,
            Ok(ExecOutput::Exit { code, signal, .. }) => {
                break Ok(json(&EventMessage { event: ProcessEvent::End(end_event(code, signal)) }))
            }
            Ok(ExecOutput::Failed(e)) => break Err(ClientError::Api(e).into()),
            Err(e) => {
                break Err(Failure::new(
                    Code::Unavailable,
                    format!("lost process {}: {e}; its sandbox may have stopped", process.pid),
                ))
            }
        };
        process.fan_out(Ok(json(&EventMessage { event: ProcessEvent::Data(data) }))).await;
    };
    if let Err(f) = &last {
        tracing::debug!(pid = process.pid, error = %f, "process session ended without an exit status");
    }
    let streams = process.end();
    ended();
    join_all(streams.iter().map(|s| s.send(last.clone()))).await;
}

/// The end event of a process that exited with `code` or was killed by `signal`, in the words
/// of Go's `os.ProcessState`, as envd reports it.
pub(crate) fn end_event(code: Option<i32>, signal: Option<i32>) -> EndEvent {
    let (exit_code, exited, status) = match (code, signal) {
        (Some(code), _) => (code, true, format!("exit status {code}")),
        (None, Some(signal)) => (-1, false, format!("signal: {}", signal_name(signal))),
        (None, None) => (-1, false, "signal: killed".to_string()),
    };
    let error = (exit_code != 0 || !exited).then(|| status.clone());
    EndEvent { exit_code, exited, status, error }
}

/// Go's description of a Linux signal (`syscall.Signal.String()`).
fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        n => return format!("signal {n}"),
    };
    name.to_string()
}

#[cfg(test)]
pub(crate) mod double {
    //! A process the tests drive by hand: output sent through a channel, input recorded.

    use super::*;

    /// What a test double was asked to do.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Fed {
        Stdin(Vec<u8>),
        CloseStdin,
        Signal(i32),
        Resize(u16, u16),
    }

    pub(crate) struct FakeFeed(pub mpsc::UnboundedSender<Fed>);

    impl Feed for FakeFeed {
        fn stdin<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), ClientError>> {
            let _ = self.0.send(Fed::Stdin(data.to_vec()));
            Box::pin(async { Ok(()) })
        }

        fn close_stdin(&mut self) -> BoxFuture<'_, Result<(), ClientError>> {
            let _ = self.0.send(Fed::CloseStdin);
            Box::pin(async { Ok(()) })
        }

        fn signal(&mut self, signal: i32) -> BoxFuture<'_, Result<(), ClientError>> {
            let _ = self.0.send(Fed::Signal(signal));
            Box::pin(async { Ok(()) })
        }

        fn resize(&mut self, rows: u16, cols: u16) -> BoxFuture<'_, Result<(), ClientError>> {
            let _ = self.0.send(Fed::Resize(rows, cols));
            Box::pin(async { Ok(()) })
        }
    }

    /// Output the test sends; a closed channel reads as a lost session.
    pub(crate) struct FakeOutput(pub mpsc::Receiver<ExecOutput>);

    impl Output for FakeOutput {
        fn next(&mut self) -> BoxFuture<'_, Result<ExecOutput, ClientError>> {
            Box::pin(async {
                self.0.recv().await.ok_or_else(|| ClientError::Transport("the exec session closed".into()))
            })
        }
    }
}
