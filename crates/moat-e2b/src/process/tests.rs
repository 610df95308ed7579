//! The process service without a VM: processes are test doubles whose output the tests send
//! and whose input they read back (`session::double`).

use std::path::Path;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use moat_client::{Client, ExecOutput};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::messages::Input;
use super::session::double::{FakeFeed, FakeOutput, Fed};
use super::session::end_event;
use super::*;
use crate::connect::{decode_frame, encode_frame};

const SB: &str = "sb";

/// A started test double: send its output, read its input, read its `Start` stream.
struct Fake {
    output: mpsc::Sender<ExecOutput>,
    fed: mpsc::UnboundedReceiver<Fed>,
    stream: mpsc::Receiver<Item>,
}

struct Options {
    terminal: bool,
    stdin: bool,
    tag: Option<&'static str>,
    early: Vec<ExecOutput>,
}

const PIPES: Options = Options { terminal: false, stdin: true, tag: None, early: Vec::new() };

fn launch(processes: &Processes, sandbox: &str, pid: u32, options: Options) -> Fake {
    let slot = processes.reserve(sandbox).unwrap();
    let (output, output_rx) = mpsc::channel(64);
    for o in options.early {
        output.try_send(o).unwrap();
    }
    let (fed_tx, fed) = mpsc::unbounded_channel();
    let config = ProcessConfig { cmd: "/bin/bash".into(), args: vec!["-l".into()], ..Default::default() };
    let info = ProcessInfo { config, pid, tag: options.tag.map(Into::into) };
    let stream = processes.launch(
        slot,
        info,
        options.terminal,
        options.stdin,
        Box::new(FakeFeed(fed_tx)),
        FakeOutput(output_rx),
    );
    Fake { output, fed, stream }
}

fn stdout(data: &'static [u8]) -> ExecOutput {
    ExecOutput::Stdout(Bytes::from_static(data))
}

fn exit(code: i32) -> ExecOutput {
    ExecOutput::Exit { code: Some(code), signal: None, timed_out: false }
}

/// Wait for a condition the tasks under test bring about.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    });
    waited.await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Everything a stream gets until it ends.
async fn drain(stream: &mut mpsc::Receiver<Item>) -> Vec<Result<Value, Code>> {
    let mut all = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.expect("the stream ends");
        match next {
            Some(item) => all.push(item.map_err(|f| f.code)),
            None => return all,
        }
    }
}

fn data(kind: &str, b64: &str) -> Result<Value, Code> {
    Ok(json!({"event": {"data": {kind: b64}}}))
}

fn ok_end() -> Result<Value, Code> {
    Ok(json!({"event": {"end": {"exited": true, "status": "exit status 0"}}}))
}

#[tokio::test]
async fn output_printed_before_anyone_reads_reaches_the_start_stream() {
    let processes = Processes::default();
    let early = vec![stdout(b"a"), ExecOutput::Stderr(Bytes::from_static(b"b")), exit(0)];
    let mut p = launch(&processes, SB, 7, Options { early, ..PIPES });
    assert_eq!(drain(&mut p.stream).await, vec![data("stdout", "YQ=="), data("stderr", "Yg=="), ok_end()]);
    assert!(processes.list(SB).is_empty());
    assert_eq!(processes.get(SB, &Selector::Pid(7)).unwrap_err().code, Code::NotFound);
    assert!(processes.registry.lock().is_empty(), "an ended sandbox's entry goes too");
}

#[tokio::test]
async fn a_slow_stream_holds_the_process_back_and_loses_nothing() {
    let processes = Processes::default();
    let mut p = launch(&processes, SB, 7, PIPES);
    for _ in 0..40 {
        p.output.try_send(stdout(b"x")).unwrap();
    }
    until("the stream's queue to fill", || p.stream.len() == session::STREAM_QUEUE).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let unread = p.output.max_capacity() - p.output.capacity();
    assert!(unread >= 40 - session::STREAM_QUEUE - 1, "the pump read on while the stream was full: {unread} left");
    p.output.send(exit(0)).await.unwrap();
    let got = drain(&mut p.stream).await;
    assert_eq!(got.len(), 41);
    assert!(got[..40].iter().all(|m| *m == data("stdout", "eA==")));
    assert_eq!(got[40], ok_end());
}

#[tokio::test]
async fn output_with_nobody_attached_is_read_and_dropped() {
    let processes = Processes::default();
    let p = launch(&processes, SB, 7, PIPES);
    drop(p.stream);
    for _ in 0..200 {
        p.output.send(stdout(b"x")).await.unwrap();
    }
    p.output.send(exit(0)).await.unwrap();
    until("the process to end", || processes.list(SB).is_empty()).await;
}

#[tokio::test]
async fn connect_gets_what_comes_after_it_then_the_end() {
    let processes = Processes::default();
    let mut p = launch(&processes, SB, 7, PIPES);
    p.output.send(stdout(b"1")).await.unwrap();
    assert_eq!(p.stream.recv().await.unwrap().map_err(|f| f.code), data("stdout", "MQ=="));
    let mut connected = processes.get(SB, &Selector::Pid(7)).unwrap().attach().unwrap();
    p.output.send(stdout(b"2")).await.unwrap();
    p.output.send(exit(3)).await.unwrap();
    let end = Ok(
        json!({"event": {"end": {"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"}}}),
    );
    let expected = vec![data("stdout", "Mg=="), end];
    assert_eq!(drain(&mut p.stream).await, expected);
    assert_eq!(drain(&mut connected).await, expected);
    assert_eq!(processes.get(SB, &Selector::Pid(7)).unwrap_err().code, Code::NotFound);
}

#[tokio::test]
async fn a_stream_that_leaves_does_not_stop_the_others() {
    let processes = Processes::default();
    let p = launch(&processes, SB, 7, PIPES);
    let mut connected = processes.get(SB, &Selector::Pid(7)).unwrap().attach().unwrap();
    drop(p.stream);
    for _ in 0..3 {
        p.output.send(stdout(b"x")).await.unwrap();
    }
    p.output.send(exit(0)).await.unwrap();
    assert_eq!(drain(&mut connected).await.len(), 4);
}

#[tokio::test]
async fn processes_are_found_by_pid_or_tag_and_listed() {
    let processes = Processes::default();
    let _a = launch(&processes, SB, 9, Options { tag: Some("server"), ..PIPES });
    let _b = launch(&processes, SB, 8, PIPES);
    let _c = launch(&processes, "other", 9, PIPES);
    assert_eq!(processes.get(SB, &Selector::Tag("server".into())).unwrap().pid, 9);
    assert_eq!(processes.get(SB, &Selector::Tag("nope".into())).unwrap_err().code, Code::NotFound);
    assert_eq!(processes.get("third", &Selector::Pid(9)).unwrap_err().code, Code::NotFound);
    let listed: Vec<_> = processes.list(SB).into_iter().map(|i| (i.pid, i.tag)).collect();
    assert_eq!(listed, vec![(8, None), (9, Some("server".to_string()))]);
}

#[tokio::test]
async fn an_old_process_does_not_take_a_reused_pid_off_the_registry() {
    let processes = Processes::default();
    let _p = launch(&processes, SB, 7, PIPES);
    let serial = processes.get(SB, &Selector::Pid(7)).unwrap().serial;
    processes.registry.remove(SB, 7, serial + 1);
    assert!(processes.get(SB, &Selector::Pid(7)).is_ok());
}

#[tokio::test]
async fn input_goes_only_where_the_process_takes_it() {
    let processes = Processes::default();
    let mut pipes = launch(&processes, SB, 1, PIPES);
    let process = processes.get(SB, &Selector::Pid(1)).unwrap();
    process.write(Input::Stdin(Bytes::from_static(b"hi"))).await.unwrap();
    assert_eq!(pipes.fed.recv().await, Some(Fed::Stdin(b"hi".to_vec())));
    let big = Bytes::from(vec![b'x'; 150 << 10]);
    process.write(Input::Stdin(big)).await.unwrap();
    let sizes: Vec<usize> = (0..3)
        .map(|_| match pipes.fed.try_recv() {
            Ok(Fed::Stdin(d)) => d.len(),
            other => panic!("expected stdin, got {other:?}"),
        })
        .collect();
    assert_eq!(sizes, vec![64 << 10, 64 << 10, 22 << 10], "stdin goes in chunks the daemon takes");
    let code = |r: Result<(), Failure>| r.unwrap_err().code;
    assert_eq!(code(process.write(Input::Pty(Bytes::from_static(b"x"))).await), Code::FailedPrecondition);
    assert_eq!(code(process.resize(24, 80).await), Code::FailedPrecondition);
    process.signal(15).await.unwrap();
    process.close_stdin().await.unwrap();
    process.close_stdin().await.unwrap();
    assert_eq!(pipes.fed.try_recv().ok(), Some(Fed::Signal(15)));
    assert_eq!(pipes.fed.try_recv().ok(), Some(Fed::CloseStdin));
    assert!(pipes.fed.try_recv().is_err(), "a second close sends nothing");
    assert_eq!(code(process.write(Input::Stdin(Bytes::from_static(b"late"))).await), Code::FailedPrecondition);

    let _closed = launch(&processes, SB, 2, Options { stdin: false, ..PIPES });
    let closed = processes.get(SB, &Selector::Pid(2)).unwrap();
    assert_eq!(code(closed.write(Input::Stdin(Bytes::from_static(b"x"))).await), Code::FailedPrecondition);

    let mut tty = launch(&processes, SB, 3, Options { terminal: true, stdin: false, ..PIPES });
    let terminal = processes.get(SB, &Selector::Pid(3)).unwrap();
    terminal.write(Input::Pty(Bytes::from_static(b"ls\r"))).await.unwrap();
    terminal.resize(30, 100).await.unwrap();
    assert_eq!(tty.fed.try_recv().ok(), Some(Fed::Stdin(b"ls\r".to_vec())));
    assert_eq!(tty.fed.try_recv().ok(), Some(Fed::Resize(30, 100)));
    assert_eq!(code(terminal.resize(0, 80).await), Code::InvalidArgument);
    assert_eq!(code(terminal.resize(24, 70000).await), Code::InvalidArgument);
    assert_eq!(code(terminal.close_stdin().await), Code::FailedPrecondition);
    tty.output.send(stdout(b"$ ")).await.unwrap();
    assert_eq!(tty.stream.recv().await.unwrap().map_err(|f| f.code), data("pty", "JCA="));
}

#[tokio::test]
async fn a_sandbox_runs_at_most_256_processes() {
    let processes = Processes::default();
    let mut slots: Vec<Slot> = (0..MAX_PER_SANDBOX).map(|_| processes.reserve(SB).unwrap()).collect();
    assert_eq!(processes.reserve(SB).err().map(|f| f.code), Some(Code::ResourceExhausted));
    assert!(processes.reserve("other").is_ok(), "the bound is per sandbox");
    slots.pop();
    let _p = launch(&processes, SB, 1, PIPES);
    assert_eq!(processes.reserve(SB).err().map(|f| f.code), Some(Code::ResourceExhausted));
    drop(slots);
    assert_eq!(processes.registry.lock()[SB].starting, 0);
}

#[tokio::test]
async fn forgetting_a_sandbox_ends_its_streams() {
    let processes = Processes::default();
    let mut a = launch(&processes, SB, 1, PIPES);
    let mut b = launch(&processes, SB, 2, PIPES);
    let _other = launch(&processes, "other", 1, PIPES);
    processes.forget(SB);
    assert_eq!(drain(&mut a.stream).await, vec![Err(Code::Unavailable)]);
    assert_eq!(drain(&mut b.stream).await, vec![Err(Code::Unavailable)]);
    assert!(processes.list(SB).is_empty());
    assert_eq!(processes.list("other").len(), 1);
    until("the pump to stop reading", || a.output.is_closed()).await;
}

#[tokio::test]
async fn a_lost_session_ends_the_streams_with_the_failure() {
    let processes = Processes::default();
    let mut p = launch(&processes, SB, 1, PIPES);
    drop(p.output);
    assert_eq!(drain(&mut p.stream).await, vec![Err(Code::Unavailable)]);
    assert!(processes.list(SB).is_empty());
}

#[test]
fn ends_read_as_go_writes_them() {
    let end = |code, signal| serde_json::to_value(end_event(code, signal)).unwrap();
    assert_eq!(end(Some(0), None), json!({"exited": true, "status": "exit status 0"}));
    assert_eq!(
        end(Some(3), None),
        json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
    );
    assert_eq!(end(None, Some(9)), json!({"exitCode": -1, "status": "signal: killed", "error": "signal: killed"}));
    assert_eq!(end(None, Some(15))["status"], "signal: terminated");
    assert_eq!(end(None, Some(64))["status"], "signal: signal 64");
}

// Over HTTP, as the SDK calls it.

fn front() -> Shared {
    Arc::new(crate::Front {
        client: Client::new(Path::new("/nonexistent/moat.sock")),
        cfg: crate::Config { token: "t".into(), domain: "localhost".into(), default_image: "default".into() },
        processes: Processes::default(),
        watchers: Default::default(),
        users: Default::default(),
    })
}

async fn call(front: &Shared, method: &str, content_type: &str, body: Vec<u8>) -> (u16, String, Bytes) {
    let mut req = axum::http::Request::post(format!("/process.Process/{method}"))
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap();
    req.extensions_mut().insert(Sandbox { id: SB.into() });
    let resp = routes().with_state(front.clone()).oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, ct, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn unary(front: &Shared, method: &str, body: Value) -> (u16, Value) {
    let (status, ct, bytes) = call(front, method, "application/json", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(ct, "application/json");
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn frames(body: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(f) = decode_frame(rest, 1 << 20).unwrap() {
        out.push((f.flags, serde_json::from_slice(f.payload).unwrap()));
        rest = &rest[f.len..];
    }
    assert!(rest.is_empty(), "the body is whole envelopes");
    out
}

#[tokio::test]
async fn unary_calls_answer_as_envd() {
    let front = front();
    let mut p = launch(&front.processes, SB, 7, Options { tag: Some("t"), ..PIPES });

    let (status, body) = unary(&front, "List", json!({})).await;
    assert_eq!(
        (status, body),
        (200, json!({"processes": [{"config": {"cmd": "/bin/bash", "args": ["-l"]}, "pid": 7, "tag": "t"}]}))
    );

    let (status, body) = unary(&front, "SendInput", json!({"process": {"pid": 7}, "input": {"stdin": "aGkK"}})).await;
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(p.fed.recv().await, Some(Fed::Stdin(b"hi\n".to_vec())));
    let (status, body) = unary(&front, "SendInput", json!({"process": {"pid": 99}, "input": {"stdin": "aGkK"}})).await;
    assert_eq!((status, body), (404, json!({"code": "not_found", "message": "process with pid 99 not found"})));

    let (status, _) = unary(&front, "SendSignal", json!({"process": {"tag": "t"}, "signal": "SIGNAL_SIGKILL"})).await;
    assert_eq!(status, 200);
    assert_eq!(p.fed.recv().await, Some(Fed::Signal(9)));
    let (status, body) = unary(&front, "SendSignal", json!({"process": {"pid": 7}})).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_argument")));

    let (status, _) = unary(&front, "CloseStdin", json!({"process": {"pid": 7}})).await;
    assert_eq!(status, 200);
    assert_eq!(p.fed.recv().await, Some(Fed::CloseStdin));
    let (status, body) =
        unary(&front, "Update", json!({"process": {"pid": 7}, "pty": {"size": {"cols": 80, "rows": 24}}})).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("failed_precondition")));
    let (status, body) = unary(&front, "CloseStdin", json!({})).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_argument")));

    p.output.send(exit(0)).await.unwrap();
    drain(&mut p.stream).await;
    let (status, body) = unary(&front, "List", json!({})).await;
    assert_eq!((status, body), (200, json!({})));
    let (status, _) = unary(&front, "SendSignal", json!({"process": {"pid": 7}, "signal": 9})).await;
    assert_eq!(status, 404, "kill() of an ended process answers False");
}

#[tokio::test]
async fn connect_streams_start_output_end() {
    let front = front();
    let p = launch(&front.processes, SB, 7, PIPES);
    let request = encode_frame(0, br#"{"process":{"pid":7}}"#).to_vec();
    let connect = tokio::spawn({
        let front = front.clone();
        async move { call(&front, "Connect", "application/connect+json", request).await }
    });
    until("Connect to attach", || front.processes.get(SB, &Selector::Pid(7)).is_ok_and(|p| p.attached_streams() == 2))
        .await;
    p.output.send(stdout(b"hi\n")).await.unwrap();
    p.output.send(exit(0)).await.unwrap();
    let (status, ct, body) = connect.await.unwrap();
    assert_eq!((status, ct.as_str()), (200, "application/connect+json"));
    assert_eq!(
        frames(&body),
        vec![
            (0, json!({"event": {"start": {"pid": 7}}})),
            (0, json!({"event": {"data": {"stdout": "aGkK"}}})),
            (0, json!({"event": {"end": {"exited": true, "status": "exit status 0"}}})),
            (2, json!({})),
        ]
    );

    let request = encode_frame(0, br#"{"process":{"pid":7}}"#).to_vec();
    let (status, _, body) = call(&front, "Connect", "application/connect+json", request).await;
    assert_eq!(status, 404, "an ended process cannot be connected to: {body:?}");
}

#[tokio::test]
async fn stream_input_applies_input_as_it_comes() {
    let front = front();
    let mut p = launch(&front.processes, SB, 7, PIPES);
    let body = [
        encode_frame(0, br#"{"start":{"process":{"pid":7}}}"#),
        encode_frame(0, br#"{"data":{"input":{"stdin":"YWJj"}}}"#),
        encode_frame(0, br#"{"keepalive":{}}"#),
        encode_frame(0, br#"{"data":{"input":{"stdin":"ZA"}}}"#),
    ]
    .concat();
    let (status, ct, answer) = call(&front, "StreamInput", "application/connect+json", body).await;
    assert_eq!((status, ct.as_str()), (200, "application/connect+json"));
    assert_eq!(frames(&answer), vec![(0, json!({})), (2, json!({}))]);
    assert_eq!(p.fed.try_recv().ok(), Some(Fed::Stdin(b"abc".to_vec())));
    assert_eq!(p.fed.try_recv().ok(), Some(Fed::Stdin(b"d".to_vec())));

    let unknown = encode_frame(0, br#"{"start":{"process":{"pid":99}}}"#).to_vec();
    let (status, _, answer) = call(&front, "StreamInput", "application/connect+json", unknown).await;
    assert_eq!(status, 200);
    assert_eq!(
        frames(&answer),
        vec![(2, json!({"error": {"code": "not_found", "message": "process with pid 99 not found"}}))]
    );
    let no_start = encode_frame(0, br#"{"data":{"input":{"stdin":"YWJj"}}}"#).to_vec();
    let (_, _, answer) = call(&front, "StreamInput", "application/connect+json", no_start).await;
    assert_eq!(frames(&answer)[0].1["error"]["code"], "invalid_argument");
}
