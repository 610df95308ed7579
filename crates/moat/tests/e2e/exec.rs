//! Processes in one running sandbox, driven through the library over a real agent link.

use crate::common;

use std::time::{Duration, Instant};

use moat_proto::ExecRequest;
use moat_sandbox::{ExecEvent, LinkError, SandboxError};

fn sh(script: &str) -> ExecRequest {
    ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }
}

#[tokio::test]
async fn concurrent_execs_share_one_link() {
    let rt = common::runtime().await;
    let sb = common::boot(&rt).await;
    let start = Instant::now();
    let runs = (0..8).map(|i| {
        let sb = &sb;
        async move {
            let exec = sb.exec(sh(&format!("sleep 1; echo out-{i}; echo err-{i} >&2; exit {i}"))).await?;
            exec.collect().await.map_err(SandboxError::from)
        }
    });
    let results = futures::future::join_all(runs).await;
    for (i, r) in results.into_iter().enumerate() {
        let (out, err, status) = r.expect("exec succeeds");
        assert_eq!(String::from_utf8_lossy(&out), format!("out-{i}\n"));
        assert_eq!(String::from_utf8_lossy(&err), format!("err-{i}\n"));
        assert_eq!(status.code, Some(i as i32));
    }
    // Eight one-second sleeps ran side by side, not one after another.
    assert!(start.elapsed() < Duration::from_secs(7), "took {:?}", start.elapsed());
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn timeout_and_signals_end_the_whole_process_group() {
    let rt = common::runtime().await;
    let sb = common::boot(&rt).await;

    let mut req = sh("sleep 100");
    req.timeout_ms = Some(500);
    let (_, _, status) = sb.exec(req).await.expect("starts").collect().await.expect("ends");
    assert!(status.timed_out, "{status:?}");
    assert_eq!(status.signal, Some(libc::SIGKILL));

    // A shell with a background child: SIGTERM to the group ends both.
    let mut exec = sb.exec(sh("sleep 200 & echo ready; wait")).await.expect("starts");
    assert_eq!(exec.next_event().await.expect("output"), ExecEvent::Stdout(b"ready\n".to_vec()));
    exec.control().signal(libc::SIGTERM).await.expect("signal sent");
    let (_, _, status) = exec.collect().await.expect("ends");
    assert_eq!(status.signal, Some(libc::SIGTERM));
    let (out, _, _) = sb.exec(sh("ps -o comm= | grep -c '^sleep' || true")).await.unwrap().collect().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out).trim(), "0", "no sleep survived the group kill");
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn stdin_streams_through_a_process() {
    let rt = common::runtime().await;
    let sb = common::boot(&rt).await;
    let mut exec =
        sb.exec(ExecRequest { argv: vec!["wc".into(), "-c".into()], stdin: true, ..Default::default() }).await.unwrap();
    let control = exec.control();
    let feeder = tokio::spawn(async move {
        let chunk = vec![b'x'; 100_000];
        for _ in 0..40 {
            control.write_stdin(&chunk).await.expect("stdin accepted");
        }
        control.close_stdin().await.expect("stdin closed");
    });
    let mut out = Vec::new();
    loop {
        match exec.next_event().await.expect("event") {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(s) => {
                assert_eq!(s.code, Some(0));
                break;
            }
        }
    }
    feeder.await.expect("feeder finished");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "4000000");
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn errors_name_what_is_wrong() {
    let rt = common::runtime().await;
    let sb = common::boot(&rt).await;
    let err = sb
        .exec(ExecRequest { argv: vec!["/no/such/binary".into()], ..Default::default() })
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    let err = sb
        .exec(ExecRequest { argv: vec!["true".into()], cwd: Some("/missing-dir".into()), ..Default::default() })
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("/missing-dir"), "{err}");
    let err = sb
        .exec(ExecRequest { argv: vec!["true".into()], user: Some("nobody-here".into()), ..Default::default() })
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("nobody-here"), "{err}");
    // The link is still good after refusals.
    let (out, _, _) = sb
        .exec(ExecRequest { argv: vec!["id".into(), "-u".into()], user: Some("nobody".into()), ..Default::default() })
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out).trim(), "65534");
    sb.destroy().await.expect("destroy");
}

/// The host drops the link (as a restarting daemon does) and connects again: the agent keeps
/// serving, and the process that was running over the old link has been killed.
#[tokio::test]
async fn agent_survives_a_host_reconnect() {
    let rt = common::runtime().await;
    let sb = common::boot(&rt).await;
    let mut exec = sb.exec(sh("echo up; exec sleep 300")).await.unwrap();
    assert_eq!(exec.next_event().await.unwrap(), ExecEvent::Stdout(b"up\n".to_vec()));
    sb.reconnect(Duration::from_secs(30)).await.expect("reconnects");
    assert!(
        matches!(exec.next_event().await, Err(LinkError::Protocol { .. } | LinkError::Closed)),
        "old exec sees the link gone"
    );
    drop(exec);
    for _ in 0..2 {
        let (out, _, status) = sb.exec(sh("echo again")).await.unwrap().collect().await.unwrap();
        assert_eq!(out, b"again\n");
        assert_eq!(status.code, Some(0));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, _, _) = sb.exec(sh("ps -o comm= | grep -c '^sleep' || true")).await.unwrap().collect().await.unwrap();
        if String::from_utf8_lossy(&out).trim() == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the old connection's sleep was killed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sb.destroy().await.expect("destroy");
}
