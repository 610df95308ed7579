//! Whatever a guest sends: bytes that may or may not decode, and calls with any paths (`..`,
//! `/`, NUL, symlinks to outside), never panic and never change anything outside the shared
//! directory.

mod support;

use moat_proto::hostfs::{Answer, Call, Decoder, Op, SetTime, Timestamp, MAX_IO};
use proptest::prelude::*;
use support::World;

/// A world with something in `shared/` to aim at: files, a directory, symlinks out (relative
/// and absolute) and a fifo.
fn seeded() -> World {
    let world = World::new();
    let shared = world.shared();
    std::fs::write(shared.join("a"), "a").unwrap();
    std::fs::create_dir(shared.join("d")).unwrap();
    std::fs::write(shared.join("d/b"), "b").unwrap();
    std::os::unix::fs::symlink("../outside", shared.join("out")).unwrap();
    std::os::unix::fs::symlink(world.outside(), shared.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", shared.join("d/sec")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        shared.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_bits_truncate(0o666),
        0,
    )
    .unwrap();
    world
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("d".to_string()),
        Just("b".to_string()),
        Just("out".to_string()),
        Just("abs".to_string()),
        Just("sec".to_string()),
        Just("fifo".to_string()),
        Just("outside".to_string()),
        Just("secret".to_string()),
        Just("new".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        Just("x\0y".to_string()),
        Just("/".to_string()),
        "[a-z./\\x00]{1,6}",
        Just("n".repeat(256)),
    ]
}

/// Paths that reach something (or would, through a symlink) most of the time, and anything
/// made of names otherwise.
fn path() -> impl Strategy<Value = String> {
    let aimed = prop::sample::select(vec![
        "",
        "a",
        "d",
        "d/b",
        "d/sec",
        "d/sec/x",
        "fifo",
        "new",
        "d/new",
        "out",
        "out/secret",
        "out/dir",
        "out/dir/f",
        "out/new",
        "abs",
        "abs/secret",
        "abs/dir/f",
        "abs/new",
        "../outside/secret",
        "/etc/passwd",
    ])
    .prop_map(str::to_string);
    let made = (prop::bool::weighted(0.1), prop::collection::vec(name(), 0..5)).prop_map(|(absolute, names)| {
        let joined = names.join("/");
        if absolute {
            format!("/{joined}")
        } else {
            joined
        }
    });
    prop_oneof![3 => aimed, 2 => made]
}

fn time() -> impl Strategy<Value = Option<SetTime>> {
    prop_oneof![
        Just(None),
        Just(Some(SetTime::Now)),
        (any::<i64>(), any::<u32>()).prop_map(|(secs, nanos)| Some(SetTime::At(Timestamp { secs, nanos }))),
    ]
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..10_000, Just(u64::MAX), Just(i64::MAX as u64), Just(1 << 40)]
}

fn op() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![Just(0o644u32), Just(0o7777), Just(0), any::<u32>()];
    prop_oneof![
        path().prop_map(|path| Op::Getattr { path }),
        (
            path(),
            prop::option::of(mode.clone()),
            prop::option::of(prop_oneof![0u64..10_000, any::<u64>()]),
            time(),
            time()
        )
            .prop_map(|(path, mode, size, atime, mtime)| Op::Setattr { path, mode, size, atime, mtime }),
        path().prop_map(|path| Op::Readlink { path }),
        (path(), any::<u64>()).prop_map(|(path, offset)| Op::Readdir { path, offset }),
        (path(), mode.clone(), any::<bool>()).prop_map(|(path, mode, exclusive)| Op::Create { path, mode, exclusive }),
        (path(), mode).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        (path(), path()).prop_map(|(path, target)| Op::Symlink { path, target }),
        (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        path().prop_map(|path| Op::Unlink { path }),
        path().prop_map(|path| Op::Rmdir { path }),
        (path(), path(), prop_oneof![Just(0u32), Just(1), Just(2), any::<u32>()])
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        (path(), offset(), prop_oneof![0u32..100, Just(MAX_IO), any::<u32>()])
            .prop_map(|(path, offset, size)| Op::Read { path, offset, size }),
        (path(), offset(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(path, offset, append, data)| Op::Write { path, offset, append, data }),
        path().prop_map(|path| Op::Fsync { path }),
        Just(Op::Statfs),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_calls_leave_the_outside_alone(ops in prop::collection::vec(op(), 1..24), readonly in any::<bool>()) {
        let world = seeded();
        let server = world.server(readonly);
        let before = world.snapshot();
        for op in ops {
            let _ = server.call(op);
        }
        prop_assert_eq!(world.snapshot(), before);
    }

    #[test]
    fn any_bytes_decode_or_fail_and_what_decodes_is_harmless(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        cut in any::<prop::sample::Index>(),
    ) {
        let world = seeded();
        let server = world.server(false);
        let before = world.snapshot();
        let cut = cut.index(bytes.len() + 1);
        let mut decoder = Decoder::default();
        for part in [&bytes[..cut], &bytes[cut..]] {
            decoder.push(part);
            while let Ok(Some(call)) = decoder.next::<Call>() {
                let _ = server.call(call.op);
            }
        }
        let mut answers = Decoder::default();
        answers.push(&bytes);
        while let Ok(Some(_)) = answers.next::<Answer>() {}
        prop_assert_eq!(world.snapshot(), before);
    }

    /// Calls that decode from their own encoding, with the length prefix intact, so the decoder
    /// reaches the server with every kind of op.
    #[test]
    fn encoded_calls_round_trip_to_the_server(ops in prop::collection::vec(op(), 1..8)) {
        let world = seeded();
        let server = world.server(false);
        let before = world.snapshot();
        let mut bytes = Vec::new();
        for (id, op) in ops.iter().enumerate() {
            moat_proto::hostfs::encode(&Call { id: id as u64, op: op.clone() }, &mut bytes);
        }
        let mut decoder = Decoder::default();
        decoder.push(&bytes);
        let mut seen = 0;
        while let Some(call) = decoder.next::<Call>().unwrap() {
            prop_assert_eq!(&call.op, &ops[seen]);
            let result = server.call(call.op);
            let mut answer = Vec::new();
            moat_proto::hostfs::encode(&Answer { id: call.id, result }, &mut answer);
            prop_assert!(answer.len() <= moat_proto::hostfs::MAX_MESSAGE);
            seen += 1;
        }
        prop_assert_eq!(seen, ops.len());
        prop_assert_eq!(world.snapshot(), before);
    }
}
