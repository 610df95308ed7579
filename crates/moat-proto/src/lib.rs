//! The moat agent protocol: wire types and framing shared by the host and the guest agent.
//!
//! A link is one byte stream (a virtio-serial port) carrying frames. Each frame belongs to a
//! channel; channel 0 holds the handshake and every other channel is one operation, opened by the
//! host with a [`Message::Request`]. Data on a channel is flow-controlled per stream with credits
//! ([`INITIAL_WINDOW`]), so a slow consumer on one channel never stalls the others.

mod frame;
pub mod hostfs;
mod message;
pub mod net;

pub use frame::{
    data_header, read_frame, read_until_sync, write_frame, Decoder, Frame, FrameError, DATA_HEADER, MAX_PAYLOAD,
    SYNC_MARKER,
};
pub use message::*;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn identities_are_checked() {
        let ok = Identity { hostname: "box-1".into(), machine_id: "0123456789abcdef0123456789abcdef".into() };
        assert_eq!(ok.check(), Ok(()));
        for hostname in ["", "-x", "a b", "a/b", &"x".repeat(64)] {
            assert!(Identity { hostname: hostname.into(), ..ok.clone() }.check().is_err(), "{hostname:?}");
        }
        for machine_id in ["", "0123", "0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcdeg"] {
            assert!(Identity { machine_id: machine_id.into(), ..ok.clone() }.check().is_err(), "{machine_id:?}");
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(HostHello {
                version: 1,
                nonce: 7,
                time_unix_ns: 1_700_000_000_000_000_000,
                entropy: vec![1, 2, 3],
                identity: Some(Identity {
                    hostname: "fork-1".into(),
                    machine_id: "0123456789abcdef0123456789abcdef".into(),
                }),
            }),
            Message::Request(Request::Resync(Resync { time_unix_ns: 1_700_000_000_000_000_000, entropy: vec![9; 64] })),
            Message::HelloAck(AgentHello { version: 1, nonce: 7, agent_version: "0.1.0".into(), kernel: "6.1".into() }),
            Message::Request(Request::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo ü".into()],
                env: vec![("K".into(), "V".into())],
                cwd: Some("/tmp".into()),
                user: Some("1000:1000".into()),
                timeout_ms: Some(5000),
                stdin: true,
                tty: Some(TtySize { rows: 24, cols: 80 }),
                detach: false,
            })),
            Message::Request(Request::Shutdown),
            Message::Started(Started::Exec { pid: 42 }),
            Message::Error(AgentError { code: ErrorCode::NotFound, message: "no such file".into() }),
            Message::Exit(ExitStatus { code: None, signal: Some(9), timed_out: true }),
            Message::Data { stream: Stream::Stdout, data: (0..=255).collect() },
            Message::Data { stream: Stream::Stdin, data: vec![] },
            Message::Eof { stream: Stream::Stderr },
            Message::Credit { stream: Stream::Stdout, bytes: u32::MAX },
            Message::Signal(-15),
            Message::Close,
            Message::Resize(TtySize { rows: 50, cols: 132 }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, m) in samples().into_iter().enumerate() {
            let f = Frame::new(i as u32, m);
            let mut d = Decoder::new();
            d.push(&f.encode().unwrap());
            assert_eq!(d.next_frame().unwrap(), Some(f));
            assert_eq!(d.next_frame().unwrap(), None);
        }
    }

    #[test]
    fn frames_split_at_every_byte_boundary_decode() {
        let wire: Vec<u8> =
            samples().into_iter().enumerate().flat_map(|(i, m)| Frame::new(i as u32, m).encode().unwrap()).collect();
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), samples().len());
    }

    /// The agent writes a data frame as its header and then the data as it is.
    #[test]
    fn a_data_header_and_its_data_decode_as_the_frame() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut wire = data_header(3, Stream::Stdout, data.len()).unwrap().to_vec();
        wire.extend_from_slice(&data);
        let mut d = Decoder::new();
        d.push(&wire);
        assert_eq!(d.next_frame().unwrap(), Some(Frame::new(3, Message::Data { stream: Stream::Stdout, data })));
        assert!(matches!(data_header(3, Stream::Stdout, MAX_PAYLOAD), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut d = Decoder::new();
        d.push(&u32::MAX.to_le_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
    }

    /// A request the peer would refuse is an error for its sender, never a panic of the task
    /// writing the link (which would take every other channel down with it).
    #[test]
    fn oversized_requests_are_refused_when_encoding() {
        let huge = ExecRequest {
            argv: vec!["true".into()],
            env: vec![("BIG".into(), "x".repeat(2 * MAX_PAYLOAD))],
            ..Default::default()
        };
        let e = Frame::new(1, Message::Request(Request::Exec(huge))).encode().unwrap_err();
        assert!(matches!(e, FrameError::TooLarge(n) if n > 2 * MAX_PAYLOAD), "{e}");
        // Just under the limit still encodes and decodes.
        let fits = Message::Data { stream: Stream::Stdout, data: vec![7; MAX_PAYLOAD - 1] };
        let wire = Frame::new(1, fits.clone()).encode().unwrap();
        let mut d = Decoder::new();
        d.push(&wire);
        assert_eq!(d.next_frame().unwrap(), Some(Frame::new(1, fits)));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let cases: Vec<(u8, Vec<u8>)> = vec![
            (3, b"{not json".to_vec()),
            (3, br#"{"op":"format_disk"}"#.to_vec()),
            (7, vec![]),
            (7, vec![9, 1, 2]),
            (9, vec![1, 0, 0]),
            (10, vec![1]),
            (200, vec![]),
        ];
        for (k, p) in cases {
            let mut body = 1u32.to_le_bytes().to_vec();
            body.push(k);
            body.extend_from_slice(&p);
            assert!(Frame::decode_body(&body).is_err(), "kind {k} payload {p:?} must be refused");
        }
        assert!(matches!(Frame::decode_body(&[1, 2]), Err(FrameError::Truncated)));
    }

    /// Fuzz-style: random bytes, and valid frames with random corruption, never panic the decoder.
    #[test]
    fn random_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d6f6174);
        let valid: Vec<Vec<u8>> = samples().into_iter().map(|m| Frame::new(1, m).encode().unwrap()).collect();
        for _ in 0..20_000 {
            let mut bytes = if rng.gen_bool(0.5) {
                (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                valid[rng.gen_range(0..valid.len())].clone()
            };
            for _ in 0..rng.gen_range(0..4) {
                if !bytes.is_empty() {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] = rng.gen();
                }
            }
            let mut d = Decoder::new();
            d.push(&bytes);
            for _ in 0..4 {
                match d.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[tokio::test]
    async fn sync_marker_is_found_after_garbage() {
        let mut wire = vec![0u8, 0, 0, b'M', 0, 0, 0, 0, 0x42];
        wire.extend_from_slice(SYNC_MARKER);
        let f = Frame::new(0, Message::Close);
        wire.extend_from_slice(&f.encode().unwrap());
        let mut r = &wire[..];
        read_until_sync(&mut r, 1024).await.unwrap();
        assert_eq!(read_frame(&mut r).await.unwrap(), f);
    }

    #[tokio::test]
    async fn sync_search_is_bounded() {
        let wire = vec![0x55u8; 4096];
        let mut r = &wire[..];
        assert!(read_until_sync(&mut r, 1000).await.is_err());
    }

    #[test]
    fn shell_code_follows_shell_conventions() {
        assert_eq!(ExitStatus { code: Some(3), signal: None, timed_out: false }.shell_code(), 3);
        assert_eq!(ExitStatus { code: None, signal: Some(9), timed_out: false }.shell_code(), 137);
    }
}
