//! The agent link served over a socket pair on the host, driven the way the host side drives it.

use std::time::Duration;

use moat_agent::{Agent, LinkEnd, Mode, Reaper, Scope};
use moat_proto::{
    read_frame, read_until_sync, write_frame, AgentError, ErrorCode, ExecRequest, ExitStatus, Frame, HostHello,
    Message, Request, Started, Stream, TtySize, CONTROL_CHANNEL, INITIAL_WINDOW, MAX_CHUNK, PROTOCOL_VERSION,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// The host end of a link to an agent served in this process.
struct Host {
    frames: mpsc::UnboundedReceiver<Frame>,
    w: OwnedWriteHalf,
    served: JoinHandle<LinkEnd>,
}

impl Host {
    /// Start an agent on one end of a socket pair and complete the handshake from the other.
    async fn connect() -> Host {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = Agent::new(Reaper::start(Scope::Registered).unwrap(), Mode::Host);
        let served = tokio::spawn(async move { agent.serve(guest).await });
        let (r, mut w) = host.into_split();
        let hello = HostHello {
            version: PROTOCOL_VERSION,
            nonce: 0xfeed,
            time_unix_ns: 1,
            entropy: vec![7; 32],
            identity: None,
        };
        write_frame(&mut w, &Frame::new(CONTROL_CHANNEL, Message::Hello(hello))).await.unwrap();
        let mut r = BufReader::new(r);
        read_until_sync(&mut r, 1 << 20).await.unwrap();
        let ack = read_frame(&mut r).await.unwrap();
        match ack.message {
            Message::HelloAck(a) => {
                assert_eq!((ack.channel, a.version, a.nonce), (CONTROL_CHANNEL, PROTOCOL_VERSION, 0xfeed));
                assert_eq!(a.agent_version, env!("CARGO_PKG_VERSION"));
                assert!(!a.kernel.is_empty());
            }
            other => panic!("expected HelloAck, got {other:?}"),
        }
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(f) = read_frame(&mut r).await {
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        Host { frames, w, served }
    }

    async fn send(&mut self, channel: u32, message: Message) {
        write_frame(&mut self.w, &Frame::new(channel, message)).await.unwrap();
        self.w.flush().await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        tokio::time::timeout(WAIT, self.frames.recv()).await.expect("the agent answers in time").expect("link open")
    }

    /// The next frame within `d`, if any.
    async fn next_within(&mut self, d: Duration) -> Option<Frame> {
        tokio::time::timeout(d, self.frames.recv()).await.ok().flatten()
    }

    async fn exec(&mut self, channel: u32, req: ExecRequest) -> u32 {
        self.send(channel, Message::Request(Request::Exec(req))).await;
        let f = self.next().await;
        assert_eq!(f.channel, channel);
        match f.message {
            Message::Started(Started::Exec { pid }) => pid,
            other => panic!("expected Started, got {other:?}"),
        }
    }

    /// Read a channel to its Close, granting output credit as a consumer would.
    async fn run_to_end(&mut self, channel: u32) -> Run {
        let mut run = Run::default();
        loop {
            let f = self.next().await;
            assert_eq!(f.channel, channel, "only one channel is in use");
            run.order.push(kind(&f.message));
            match f.message {
                Message::Data { stream, data } => {
                    assert!(run.status.is_none(), "data after exit");
                    let n = data.len() as u32;
                    match stream {
                        Stream::Stdout => run.stdout.extend(data),
                        Stream::Stderr => run.stderr.extend(data),
                        Stream::Stdin => panic!("stdin data from the agent"),
                    }
                    self.send(channel, Message::Credit { stream, bytes: n }).await;
                }
                Message::Credit { stream: Stream::Stdin, bytes } => run.stdin_credit += u64::from(bytes),
                Message::Eof { .. } => {}
                Message::Exit(s) => run.status = Some(s),
                Message::Close => return run,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[derive(Default, Debug)]
struct Run {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<ExitStatus>,
    stdin_credit: u64,
    order: Vec<&'static str>,
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Data { .. } => "data",
        Message::Eof { stream: Stream::Stdout } => "eof-out",
        Message::Eof { stream: Stream::Stderr } => "eof-err",
        Message::Exit(_) => "exit",
        Message::Close => "close",
        _ => "other",
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

async fn wait_until_gone(pid: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while alive(pid) {
        assert!(tokio::time::Instant::now() < deadline, "process {pid} is still alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn handshake_answers_with_the_hosts_nonce() {
    let mut host = Host::connect().await;
    host.send(5, Message::Request(Request::Ping)).await;
    assert_eq!(host.next().await, Frame::new(5, Message::Started(Started::Pong)));
    assert_eq!(host.next().await, Frame::new(5, Message::Close));
}

#[tokio::test]
async fn exec_reports_output_and_exit_code() {
    let mut host = Host::connect().await;
    host.exec(1, sh("echo out; echo err >&2; exit 3")).await;
    let run = host.run_to_end(1).await;
    assert_eq!(run.stdout, b"out\n");
    assert_eq!(run.stderr, b"err\n");
    assert_eq!(run.status, Some(ExitStatus { code: Some(3), signal: None, timed_out: false }));
    let tail: Vec<_> = run.order.iter().filter(|k| **k != "data").copied().collect();
    assert!(tail.ends_with(&["exit", "close"]), "{tail:?}");
    assert!(tail.contains(&"eof-out") && tail.contains(&"eof-err"), "{tail:?}");
}

#[tokio::test]
async fn exec_gets_the_default_environment_and_request_overrides() {
    let mut host = Host::connect().await;
    let mut req = sh("echo \"$PATH|$HOME|$GREETING\"; pwd");
    req.env = vec![("GREETING".into(), "hi".into())];
    req.cwd = Some("/tmp".into());
    host.exec(1, req).await;
    let run = host.run_to_end(1).await;
    assert_eq!(String::from_utf8(run.stdout).unwrap(), format!("{}|/root|hi\n/tmp\n", moat_agent::exec::DEFAULT_PATH));
}

#[tokio::test]
async fn stdin_round_trips_through_cat_under_credit() {
    let mut host = Host::connect().await;
    host.exec(1, ExecRequest { argv: vec!["cat".into()], stdin: true, ..Default::default() }).await;
    let input: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let mut credit = u64::from(INITIAL_WINDOW);
    let mut sent = 0usize;
    let mut run = Run::default();
    let mut eof_sent = false;
    loop {
        while sent < input.len() && credit > 0 {
            let n = (input.len() - sent).min(MAX_CHUNK).min(credit as usize);
            host.send(1, Message::Data { stream: Stream::Stdin, data: input[sent..sent + n].to_vec() }).await;
            sent += n;
            credit -= n as u64;
        }
        if sent == input.len() && !eof_sent {
            host.send(1, Message::Eof { stream: Stream::Stdin }).await;
            eof_sent = true;
        }
        let f = host.next().await;
        match f.message {
            Message::Credit { stream: Stream::Stdin, bytes } => {
                credit += u64::from(bytes);
                run.stdin_credit += u64::from(bytes);
            }
            Message::Data { stream: Stream::Stdout, data } => {
                let n = data.len() as u32;
                run.stdout.extend(data);
                host.send(1, Message::Credit { stream: Stream::Stdout, bytes: n }).await;
            }
            Message::Exit(s) => run.status = Some(s),
            Message::Close => break,
            _ => {}
        }
    }
    assert_eq!(run.stdout.len(), input.len());
    assert!(run.stdout == input, "cat echoed different bytes");
    assert_eq!(run.status.unwrap().code, Some(0));
    assert_eq!(run.stdin_credit, input.len() as u64, "every byte written is credited back");
}

#[tokio::test]
async fn large_output_stops_at_the_window_until_credit_arrives() {
    let mut host = Host::connect().await;
    let total = 3 * INITIAL_WINDOW as usize + 12_345;
    host.exec(1, sh(&format!("head -c {total} /dev/zero"))).await;
    let mut got = 0usize;
    // Without credit the agent sends exactly one window and then waits.
    while let Some(f) = host.next_within(Duration::from_millis(700)).await {
        match f.message {
            Message::Data { stream: Stream::Stdout, data } => got += data.len(),
            other => panic!("nothing but output may come before credit, got {other:?}"),
        }
    }
    assert_eq!(got, INITIAL_WINDOW as usize, "the agent must stop after exactly the initial window");
    host.send(1, Message::Credit { stream: Stream::Stdout, bytes: got as u32 }).await;
    let run = host.run_to_end(1).await;
    assert_eq!(got + run.stdout.len(), total);
    assert_eq!(run.status.unwrap().code, Some(0));
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let mut host = Host::connect().await;
    let mut req = sh("sleep 100 & sleep 100");
    req.timeout_ms = Some(300);
    let started = std::time::Instant::now();
    host.exec(1, req).await;
    let run = host.run_to_end(1).await;
    assert_eq!(run.status, Some(ExitStatus { code: None, signal: Some(libc::SIGKILL), timed_out: true }));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn signal_reaches_the_process() {
    let mut host = Host::connect().await;
    let pid = host.exec(1, ExecRequest { argv: vec!["sleep".into(), "100".into()], ..Default::default() }).await;
    assert!(alive(pid));
    host.send(1, Message::Signal(libc::SIGTERM)).await;
    let run = host.run_to_end(1).await;
    assert_eq!(run.status, Some(ExitStatus { code: None, signal: Some(libc::SIGTERM), timed_out: false }));
}

#[tokio::test]
async fn unknown_program_is_an_error_naming_it() {
    let mut host = Host::connect().await;
    host.send(
        1,
        Message::Request(Request::Exec(ExecRequest { argv: vec!["no-such-program-xyz".into()], ..Default::default() })),
    )
    .await;
    match host.next().await.message {
        Message::Error(AgentError { code: ErrorCode::NotFound, message }) => {
            assert!(message.contains("no-such-program-xyz"), "{message}")
        }
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(host.next().await, Frame::new(1, Message::Close));
}

#[tokio::test]
async fn unknown_user_and_missing_cwd_are_errors() {
    let mut host = Host::connect().await;
    let mut req = sh("true");
    req.user = Some("no-such-user-xyz".into());
    host.send(1, Message::Request(Request::Exec(req))).await;
    assert!(matches!(host.next().await.message, Message::Error(AgentError { code: ErrorCode::NotFound, .. })));
    assert_eq!(host.next().await, Frame::new(1, Message::Close));
    let mut req = sh("true");
    req.cwd = Some("/no/such/dir".into());
    host.send(2, Message::Request(Request::Exec(req))).await;
    match host.next().await.message {
        Message::Error(e) => assert!(e.message.contains("/no/such/dir"), "{}", e.message),
        other => panic!("expected Error, got {other:?}"),
    }
}

#[tokio::test]
async fn background_child_holding_the_pipe_does_not_delay_the_exit() {
    let mut host = Host::connect().await;
    let started = std::time::Instant::now();
    host.exec(1, sh("sleep 3 & echo done")).await;
    let run = host.run_to_end(1).await;
    assert_eq!(run.stdout, b"done\n");
    assert_eq!(run.status.unwrap().code, Some(0));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn execs_on_different_channels_run_concurrently() {
    let mut host = Host::connect().await;
    host.exec(1, ExecRequest { argv: vec!["cat".into()], stdin: true, ..Default::default() }).await;
    host.exec(2, sh("echo second")).await;
    // Channel 2 finishes while channel 1 still waits for stdin.
    let mut out2 = Vec::new();
    loop {
        let f = host.next().await;
        assert_eq!(f.channel, 2, "cat must not produce anything yet");
        match f.message {
            Message::Data { data, .. } => out2.extend(data),
            Message::Close => break,
            _ => {}
        }
    }
    assert_eq!(out2, b"second\n");
    host.send(1, Message::Data { stream: Stream::Stdin, data: b"first\n".to_vec() }).await;
    host.send(1, Message::Eof { stream: Stream::Stdin }).await;
    let run = host.run_to_end(1).await;
    assert_eq!(run.stdout, b"first\n");
}

#[tokio::test]
async fn host_close_kills_the_process() {
    let mut host = Host::connect().await;
    let pid = host.exec(1, ExecRequest { argv: vec!["sleep".into(), "100".into()], ..Default::default() }).await;
    host.send(1, Message::Close).await;
    wait_until_gone(pid).await;
    // The channel is forgotten: later frames for it are ignored, the link lives on.
    host.send(1, Message::Signal(libc::SIGTERM)).await;
    host.send(2, Message::Request(Request::Ping)).await;
    assert_eq!(host.next().await, Frame::new(2, Message::Started(Started::Pong)));
}

#[tokio::test]
async fn host_disconnect_kills_its_processes() {
    let mut host = Host::connect().await;
    let pid = host.exec(1, ExecRequest { argv: vec!["sleep".into(), "100".into()], ..Default::default() }).await;
    let Host { frames, w, served } = host;
    drop((frames, w));
    let end = tokio::time::timeout(WAIT, served).await.unwrap().unwrap();
    assert!(matches!(end, LinkEnd::HostGone), "{end:?}");
    wait_until_gone(pid).await;
}

/// A host that reconnects so fast that the guest never sees the port hang up just sends a new
/// hello: the old session's processes die, and channel numbers can be used again from 1.
#[tokio::test]
async fn a_second_hello_starts_a_fresh_session() {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = Agent::new(Reaper::start(Scope::Registered).unwrap(), Mode::Host);
    tokio::spawn(async move { agent.serve(guest).await });
    let (r, mut w) = host.into_split();
    let mut r = BufReader::new(r);
    let mut pid = 0;
    for nonce in [1u64, 2] {
        let hello = HostHello { version: PROTOCOL_VERSION, nonce, time_unix_ns: 1, entropy: vec![], identity: None };
        write_frame(&mut w, &Frame::new(CONTROL_CHANNEL, Message::Hello(hello))).await.unwrap();
        w.flush().await.unwrap();
        // Whatever the old session still had queued comes before the marker and is skipped.
        read_until_sync(&mut r, 1 << 20).await.unwrap();
        match read_frame(&mut r).await.unwrap().message {
            Message::HelloAck(a) => assert_eq!(a.nonce, nonce),
            other => panic!("expected HelloAck, got {other:?}"),
        }
        if nonce == 2 {
            wait_until_gone(pid).await;
        }
        let req = ExecRequest { argv: vec!["sleep".into(), "100".into()], ..Default::default() };
        write_frame(&mut w, &Frame::new(1, Message::Request(Request::Exec(req)))).await.unwrap();
        w.flush().await.unwrap();
        let started = tokio::time::timeout(WAIT, read_frame(&mut r)).await.unwrap().unwrap();
        match started.message {
            Message::Started(Started::Exec { pid: p }) => pid = p,
            other => panic!("expected Started on the reused channel 1, got {other:?}"),
        }
    }
    write_frame(&mut w, &Frame::new(1, Message::Close)).await.unwrap();
    w.flush().await.unwrap();
    wait_until_gone(pid).await;
}

#[tokio::test]
async fn stdin_beyond_credit_closes_the_channel() {
    let mut host = Host::connect().await;
    // A process that never reads: beyond what the pipe buffer absorbs (and is credited back), no
    // credit comes back, so this is more than the host may send.
    let pid =
        host.exec(1, ExecRequest { argv: vec!["sleep".into(), "100".into()], stdin: true, ..Default::default() }).await;
    let chunk = vec![0u8; MAX_CHUNK];
    for _ in 0..(INITIAL_WINDOW as usize / MAX_CHUNK) + 3 {
        host.send(1, Message::Data { stream: Stream::Stdin, data: chunk.clone() }).await;
    }
    loop {
        match host.next().await.message {
            Message::Close => break,
            Message::Credit { .. } => {}
            other => panic!("expected Close, got {other:?}"),
        }
    }
    wait_until_gone(pid).await;
}

#[tokio::test]
async fn malformed_frames_end_the_connection_without_panicking() {
    let mut host = Host::connect().await;
    // A frame of an unknown kind.
    host.w.write_all(&[5, 0, 0, 0, 1, 0, 0, 0, 200]).await.unwrap();
    host.w.flush().await.unwrap();
    let end = tokio::time::timeout(WAIT, &mut host.served).await.unwrap().unwrap();
    assert!(matches!(end, LinkEnd::Broken(_)), "{end:?}");
}

#[tokio::test]
async fn shutdown_is_acknowledged() {
    let mut host = Host::connect().await;
    host.send(3, Message::Request(Request::Shutdown)).await;
    assert_eq!(host.next().await, Frame::new(3, Message::Started(Started::Shutdown)));
    let end = tokio::time::timeout(WAIT, &mut host.served).await.unwrap().unwrap();
    assert!(matches!(end, LinkEnd::Shutdown), "{end:?}");
}

#[tokio::test]
async fn a_tty_exec_gets_a_controlling_terminal_that_resizes_and_turns_ctrl_c_into_sigint() {
    let mut host = Host::connect().await;
    let mut req = sh("stty size; test -t 0 && test -t 1 && test -t 2 && echo all-tty; read line; stty size; sleep 30");
    req.tty = Some(TtySize { rows: 30, cols: 100 });
    host.exec(1, req).await;
    let mut seen = Vec::new();
    // Wait for the first answer, then resize and let `read` return.
    while !String::from_utf8_lossy(&seen).contains("all-tty") {
        let f = host.next().await;
        if let Message::Data { data, .. } = f.message {
            host.send(1, Message::Credit { stream: Stream::Stdout, bytes: data.len() as u32 }).await;
            seen.extend(data);
        }
    }
    host.send(1, Message::Resize(TtySize { rows: 40, cols: 120 })).await;
    host.send(1, Message::Data { stream: Stream::Stdin, data: b"go\r".to_vec() }).await;
    // Once `sleep` runs, Ctrl-C typed at the terminal interrupts it (the line discipline sends
    // SIGINT to the foreground group).
    while !String::from_utf8_lossy(&seen).contains("40 120") {
        let f = host.next().await;
        if let Message::Data { data, .. } = f.message {
            host.send(1, Message::Credit { stream: Stream::Stdout, bytes: data.len() as u32 }).await;
            seen.extend(data);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    host.send(1, Message::Data { stream: Stream::Stdin, data: vec![0x03] }).await;
    let run = host.run_to_end(1).await;
    seen.extend(run.stdout);
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("30 100\r\n"), "{text:?}");
    assert!(text.contains("go\r\n"), "the terminal echoes input: {text:?}");
    let status = run.status.expect("an exit status");
    assert_eq!(status.signal, Some(libc::SIGINT), "{status:?} {text:?}");
    assert!(run.stderr.is_empty(), "a terminal has one output stream");
}

#[tokio::test]
async fn background_processes_outlive_their_channel_and_replay_their_output() {
    let mut host = Host::connect().await;
    let mut req = sh("echo first; echo oops >&2; trap '' TERM; while true; do sleep 0.1; done");
    req.detach = true;
    let pid = host.exec(1, req).await;
    assert_eq!(host.next().await, Frame::new(1, Message::Close), "a detached exec closes its channel at once");
    assert!(alive(pid));

    host.send(2, Message::Request(Request::Jobs)).await;
    let Message::Started(Started::Jobs { jobs }) = host.next().await.message else { panic!("a job list") };
    assert_eq!(jobs.iter().map(|j| (j.pid, j.exit)).collect::<Vec<_>>(), [(pid, None)]);
    assert_eq!(host.next().await, Frame::new(2, Message::Close));

    // It ignores SIGTERM; SIGKILL ends it, and an attach replays its output, then its end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.send(3, Message::Request(Request::Kill { pid, signal: libc::SIGTERM })).await;
    assert_eq!(host.next().await.message, Message::Started(Started::Done));
    assert_eq!(host.next().await, Frame::new(3, Message::Close));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid), "SIGTERM is ignored");
    host.send(4, Message::Request(Request::Attach { pid, replay: true })).await;
    assert_eq!(host.next().await.message, Message::Started(Started::Stream));
    host.send(5, Message::Request(Request::Kill { pid, signal: libc::SIGKILL })).await;
    let mut attached = Run::default();
    let mut other = Vec::new();
    loop {
        let f = host.next().await;
        match (f.channel, f.message) {
            (4, Message::Data { stream: Stream::Stdout, data }) => attached.stdout.extend(data),
            (4, Message::Data { stream: Stream::Stderr, data }) => attached.stderr.extend(data),
            (4, Message::Exit(s)) => attached.status = Some(s),
            (4, Message::Close) => break,
            (_, m) => other.push(m),
        }
    }
    assert_eq!((attached.stdout.as_slice(), attached.stderr.as_slice()), (&b"first\n"[..], &b"oops\n"[..]));
    assert_eq!(attached.status.and_then(|s| s.signal), Some(libc::SIGKILL));
    wait_until_gone(pid).await;
    let e = {
        host.send(6, Message::Request(Request::Kill { pid, signal: libc::SIGKILL })).await;
        host.next().await.message
    };
    assert!(matches!(e, Message::Error(AgentError { code: ErrorCode::BadRequest, .. })), "{e:?}");
}
