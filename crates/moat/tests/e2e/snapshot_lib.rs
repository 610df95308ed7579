//! Snapshots through the library: save a running sandbox, restore it twice, and save a restored
//! one again (the path through the helper QEMU).

use crate::common;

use std::time::Instant;

use moat_proto::ExecRequest;
use moat_sandbox::{Origin, Sandbox, SandboxSpec, Shape};

async fn sh(sb: &Sandbox, script: &str) -> String {
    let exec = sb
        .exec(ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() })
        .await
        .expect("exec starts");
    let (out, err, status) = exec.collect().await.expect("exec ends");
    assert_eq!(status.code, Some(0), "{script}: {}", String::from_utf8_lossy(&err));
    String::from_utf8_lossy(&out).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_restores_memory_and_disk_and_a_restored_vm_saves_again() {
    let rt = common::runtime().await;
    let shape = Shape::new(1, 256, Shape::default().disk_mib()).expect("a small shape is valid");
    let spec = SandboxSpec { shape, ..SandboxSpec::default() };
    let sb = Sandbox::boot(&rt, &spec).await.expect("boots");
    sh(&sb, "echo before > /root/file; mkdir -p /dev/shm; echo inmem > /dev/shm/x").await;
    // In the home's snapshot store: a jailed QEMU is given backing files from there only.
    std::fs::create_dir_all(rt.config.snapshots_dir()).unwrap();
    let snaps = tempfile::tempdir_in(rt.config.snapshots_dir()).unwrap();
    let one = snaps.path().join("one");
    std::fs::create_dir(&one).unwrap();
    let t = Instant::now();
    sb.snapshot(&rt, &one).await.expect("snapshot");
    eprintln!("snapshot of a booted VM: {:?}", t.elapsed());
    sh(&sb, "echo after > /root/file").await;

    let id = moat_sandbox::new_id();
    let dir = rt.config.run_dir().join(&id);
    let t = Instant::now();
    let spec2 = SandboxSpec { hostname: Some("fork-a".into()), ..spec.clone() };
    let fork = Sandbox::start(&rt, &spec2, &id, &dir, Origin::Snapshot(&one)).await.expect("restores");
    eprintln!("restore: {:?}", t.elapsed());
    assert_eq!(sh(&fork, "cat /root/file /dev/shm/x; hostname").await, "before\ninmem\nfork-a");
    assert_eq!(sh(&sb, "cat /root/file").await, "after");

    let two = snaps.path().join("two");
    std::fs::create_dir(&two).unwrap();
    sh(&fork, "echo forked > /root/file").await;
    let t = Instant::now();
    fork.snapshot(&rt, &two).await.expect("snapshot of a restored VM");
    eprintln!("snapshot of a restored VM: {:?}", t.elapsed());
    let id3 = moat_sandbox::new_id();
    let dir3 = rt.config.run_dir().join(&id3);
    let third = Sandbox::start(&rt, &spec, &id3, &dir3, Origin::Snapshot(&two)).await.expect("restores again");
    assert_eq!(sh(&third, "cat /root/file /dev/shm/x").await, "forked\ninmem");

    third.suspend(&rt).await.expect("suspends");
    let third = Sandbox::start(&rt, &spec, &id3, &dir3, Origin::Suspended).await.expect("resumes");
    assert_eq!(sh(&third, "cat /root/file /dev/shm/x").await, "forked\ninmem");
    for s in [sb, fork, third] {
        s.destroy().await.unwrap();
    }
}
