//! A host mount served to a stand-in agent on a unix socket: the link, the channel and the
//! server are the real ones; only the guest's end of the socket is played by the test.

use std::path::Path;
use std::time::Duration;

use moat_hostfs::{Options, Server};
use moat_proto::hostfs::{Answer, Call, Decoder, Op, Reply};
use moat_proto::{
    read_frame, write_frame, AgentError, AgentHello, ErrorCode, ExitStatus, Frame, Message, Request, Started, Stream,
    MAX_CHUNK, PROTOCOL_VERSION, SYNC_MARKER,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;

use super::*;

/// How long the stand-in waits for the host before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// The guest's end of the link.
struct Agent {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Agent {
    async fn recv(&mut self) -> Frame {
        tokio::time::timeout(PATIENCE, read_frame(&mut self.r)).await.expect("the host sends in time").unwrap()
    }

    async fn send(&mut self, channel: u32, message: Message) {
        write_frame(&mut self.w, &Frame::new(channel, message)).await.unwrap();
        self.w.flush().await.unwrap();
    }

    /// The next host-mount request: (channel, path, readonly).
    async fn mount_request(&mut self) -> (u32, String, bool) {
        loop {
            let frame = self.recv().await;
            if let Message::Request(Request::HostMount { path, readonly }) = frame.message {
                return (frame.channel, path, readonly);
            }
        }
    }

    async fn send_calls(&mut self, channel: u32, calls: &[Call]) {
        let mut bytes = Vec::new();
        for call in calls {
            moat_proto::hostfs::encode(call, &mut bytes);
        }
        self.send_stdout(channel, &bytes).await;
    }

    async fn send_stdout(&mut self, channel: u32, bytes: &[u8]) {
        for chunk in bytes.chunks(MAX_CHUNK) {
            self.send(channel, Message::Data { stream: Stream::Stdout, data: chunk.to_vec() }).await;
        }
    }

    /// `n` answers from the host, crediting its stdin as they come.
    async fn answers(&mut self, channel: u32, n: usize) -> Vec<Answer> {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        while out.len() < n {
            let frame = self.recv().await;
            match frame.message {
                Message::Data { stream: Stream::Stdin, data } if frame.channel == channel => {
                    decoder.push(&data);
                    while let Some(answer) = decoder.next::<Answer>().unwrap() {
                        out.push(answer);
                    }
                    let bytes = data.len() as u32;
                    self.send(channel, Message::Credit { stream: Stream::Stdin, bytes }).await;
                }
                Message::Credit { .. } => {}
                other => panic!("unexpected {other:?} on channel {}", frame.channel),
            }
        }
        out
    }

    /// Waits for the host to close `channel`.
    async fn closed(&mut self, channel: u32) {
        loop {
            let frame = self.recv().await;
            if frame.channel == channel && frame.message == Message::Close {
                return;
            }
        }
    }
}

/// A link to a stand-in agent, and that agent.
async fn link(dir: &Path) -> (Arc<AgentLink>, Agent) {
    let socket = dir.join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let agent = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, w) = stream.into_split();
        let mut agent = Agent { r: BufReader::new(r), w };
        let Message::Hello(hello) = agent.recv().await.message else { panic!("no hello") };
        agent.w.write_all(SYNC_MARKER).await.unwrap();
        let ack = AgentHello {
            version: PROTOCOL_VERSION,
            nonce: hello.nonce,
            agent_version: "test".into(),
            kernel: "test".into(),
        };
        agent.send(0, Message::HelloAck(ack)).await;
        agent
    });
    let link = AgentLink::connect(&socket, None).await.unwrap();
    (Arc::new(link), agent.await.unwrap())
}

fn server(dir: &Path, readonly: bool) -> Arc<Server> {
    Arc::new(Server::open(dir, Options { readonly, guest_uid: 1000, guest_gid: 1000 }).unwrap())
}

/// A served mount: the stand-in agent accepted it on the returned channel.
async fn opened(readonly: bool) -> (tempfile::TempDir, Arc<AgentLink>, Agent, HostMount, Arc<Server>, u32) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shared")).unwrap();
    std::fs::write(dir.path().join("shared/f"), "hello").unwrap();
    let (link, mut agent) = link(dir.path()).await;
    let server = server(&dir.path().join("shared"), readonly);
    let open = tokio::spawn({
        let link = link.clone();
        async move { HostMount::open_on(&link, "/src", readonly).await }
    });
    let (channel, path, ro) = agent.mount_request().await;
    assert_eq!((path.as_str(), ro), ("/src", readonly));
    agent.send(channel, Message::Started(Started::Stream)).await;
    let mount = open.await.unwrap().unwrap();
    (dir, link, agent, mount, server, channel)
}

#[tokio::test]
async fn calls_are_answered_by_id_until_the_agent_closes_the_channel() {
    let (dir, _link, mut agent, mount, server, channel) = opened(false).await;
    let run = tokio::spawn(mount.run(server));
    let calls: Vec<Call> = (0..60)
        .map(|id| Call {
            id,
            op: match id % 3 {
                0 => Op::Read { path: "f".into(), offset: 0, size: 100 },
                1 => Op::Getattr { path: "../etc".into() },
                _ => Op::Create { path: format!("new{id}"), mode: 0o644, exclusive: true },
            },
        })
        .collect();
    agent.send_calls(channel, &calls).await;
    let mut answers = agent.answers(channel, calls.len()).await;
    answers.sort_by_key(|a| a.id);
    for (id, answer) in answers.iter().enumerate() {
        assert_eq!(answer.id, id as u64);
        match id % 3 {
            0 => assert_eq!(answer.result, Ok(Reply::Data(b"hello".to_vec()))),
            1 => assert_eq!(answer.result, Err(libc::EINVAL)),
            _ => assert!(matches!(answer.result, Ok(Reply::Attr(_))), "{answer:?}"),
        }
    }
    assert!(dir.path().join("shared/new2").exists());
    agent.send(channel, Message::Close).await;
    tokio::time::timeout(PATIENCE, run).await.expect("the mount ends").unwrap().unwrap();
}

#[tokio::test]
async fn a_flood_of_calls_is_answered_in_full() {
    let (_dir, _link, mut agent, mount, server, channel) = opened(true).await;
    let run = tokio::spawn(mount.run(server));
    let calls: Vec<Call> = (0..5000).map(|id| Call { id, op: Op::Getattr { path: "f".into() } }).collect();
    agent.send_calls(channel, &calls).await;
    let answers = agent.answers(channel, calls.len()).await;
    let mut ids: Vec<_> = answers.iter().map(|a| a.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..5000).collect::<Vec<_>>());
    assert!(answers.iter().all(|a| matches!(a.result, Ok(Reply::Attr(_)))));
    // A read-only mount refuses writes here, whatever the guest mounted.
    let write = Call { id: 9, op: Op::Unlink { path: "f".into() } };
    agent.send_calls(channel, &[write]).await;
    assert_eq!(agent.answers(channel, 1).await[0].result, Err(libc::EROFS));
    run.abort();
}

#[tokio::test]
async fn a_mount_the_guest_cannot_make_fails_with_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (link, mut agent) = link(dir.path()).await;
    let open = tokio::spawn({
        let link = link.clone();
        async move { HostMount::open_on(&link, "/proc", false).await }
    });
    let (channel, _, _) = agent.mount_request().await;
    let refusal = AgentError { code: ErrorCode::BadRequest, message: "not there".into() };
    agent.send(channel, Message::Error(refusal.clone())).await;
    agent.send(channel, Message::Close).await;
    match open.await.unwrap() {
        Err(SandboxError::Link(LinkError::Agent(e))) => assert_eq!(e, refusal),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened"),
    }
}

#[tokio::test]
async fn a_bad_call_ends_the_mount_and_closes_its_channel() {
    let (_dir, _link, mut agent, mount, server, channel) = opened(false).await;
    let run = tokio::spawn(mount.run(server));
    agent.send_stdout(channel, &[0xff, 0xff, 0xff, 0xff]).await;
    let end = tokio::time::timeout(PATIENCE, run).await.expect("the mount ends").unwrap();
    assert!(matches!(end, Err(SandboxError::Link(LinkError::Protocol { channel: c, .. })) if c == channel), "{end:?}");
    agent.closed(channel).await;
}

#[tokio::test]
async fn stopping_the_task_closes_the_channel() {
    let (_dir, _link, mut agent, mount, server, channel) = opened(false).await;
    let run = tokio::spawn(mount.run(server));
    let calls: Vec<Call> = (0..100).map(|id| Call { id, op: Op::Statfs }).collect();
    agent.send_calls(channel, &calls).await;
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    agent.closed(channel).await;
}

#[tokio::test]
async fn an_exit_with_a_reason_is_the_agents_error() {
    let (_dir, _link, mut agent, mount, server, channel) = opened(false).await;
    let run = tokio::spawn(mount.run(server));
    agent.send(channel, Message::Data { stream: Stream::Stderr, data: b"the FUSE session died".to_vec() }).await;
    agent.send(channel, Message::Exit(ExitStatus { code: Some(1), signal: None, timed_out: false })).await;
    agent.send(channel, Message::Close).await;
    match tokio::time::timeout(PATIENCE, run).await.expect("the mount ends").unwrap() {
        Err(SandboxError::Link(LinkError::Agent(e))) => assert!(e.message.contains("the FUSE session died"), "{e:?}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_link_going_away_is_an_error() {
    let (_dir, _link, agent, mount, server, _channel) = opened(false).await;
    let run = tokio::spawn(mount.run(server));
    drop(agent);
    let end = tokio::time::timeout(PATIENCE, run).await.expect("the mount ends").unwrap();
    assert!(matches!(end, Err(SandboxError::Link(_))), "{end:?}");
}
