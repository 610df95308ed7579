//! The lifecycle without QEMU: creates, failures, the cap, templates, stop/start and gc, against
//! the recording launcher of [`crate::launcher::fake`].

use std::time::Duration;

use moat_api::{CreateSandbox, ErrorCode, NetMode, NetSpec, Phase, SecretSpec, SnapshotKind};
use moat_sandbox::Shape;

use crate::launcher::fake::{Call, Outcome, Source, TestService, IMAGE_DIGEST};
use crate::service::admission::{HostProbe, HostResources};
use crate::service::Limits;

const MIB: u64 = 1 << 20;

/// A host of `memory_mib` RAM and `disk_mib` free under the home, whatever machine runs the test.
fn host(memory_mib: u64, disk_mib: u64) -> HostProbe {
    HostProbe::Fixed(HostResources {
        memory_bytes: memory_mib * MIB,
        available_memory_bytes: memory_mib * MIB / 2,
        disk_free_bytes: disk_mib * MIB,
    })
}

/// A host with room for any test's sandboxes, and templates off.
pub(crate) fn limits() -> Limits {
    Limits { templates: false, host: host(64 << 10, 1 << 20), ..Limits::default() }
}

/// Room for exactly `n` sandboxes of the default size (512 MiB + 160 MiB of QEMU) at a ratio of 1.
fn room_for(n: u64) -> Limits {
    let memory = n * (u64::from(moat_api::DEFAULT_MEMORY_MIB) + 160) + 100;
    Limits { memory_overcommit: 1.0, host: host(memory, 1 << 20), ..limits() }
}

#[tokio::test]
async fn a_create_is_recorded_booted_from_its_pinned_image_and_left_running() {
    let t = TestService::new(limits());
    let req = CreateSandbox { vcpus: Some(2), memory_mib: Some(256), ..TestService::request("one") };
    let info = t.svc.create(req).await.expect("the create succeeds");

    assert_eq!(info.phase, Phase::Running);
    assert_eq!((info.vcpus, info.memory_mib, info.disk_mib), (2, 256, moat_api::DEFAULT_DISK_MIB));
    assert_eq!(info.image_digest, IMAGE_DIGEST);
    let pid = info.pid.expect("a running sandbox records its QEMU");
    assert_eq!(t.vms.qemus(), [(pid, t.run_dir(&info.id))]);
    assert_eq!(
        t.vms.calls(),
        [Call::Start {
            id: info.id.clone(),
            from: Source::Boot { fresh: true },
            shape: Shape::new(2, 256, moat_api::DEFAULT_DISK_MIB).unwrap(),
            image_digest: Some(IMAGE_DIGEST.into()),
        }]
    );
    let phases: Vec<Phase> = t.svc.db(|db| db.lifecycle(&info.id)).unwrap().into_iter().map(|e| e.phase).collect();
    assert_eq!(phases, [Phase::Creating, Phase::Booting, Phase::Running]);
    let events = t.svc.db(|db| db.events_after(0, 100)).unwrap();
    let said: Vec<&str> = events.iter().filter(|e| e.kind == "phase").map(|e| e.message.as_str()).collect();
    assert_eq!(said, ["one created (creating)", "one creating -> booting", "one booting -> running"]);
    assert_eq!(t.svc.live_count(), 1);
}

#[tokio::test]
async fn a_boot_that_fails_leaves_a_failed_sandbox_that_says_why() {
    for (outcome, why) in [(Outcome::Fails, "the fake guest panicked"), (Outcome::Silent, "did not come up within")] {
        let t = TestService::new(limits());
        t.vms.script_start(outcome);
        let e = t.svc.create(TestService::request("broken")).await.expect_err("the boot fails");
        assert_eq!(e.code, ErrorCode::BootFailed, "{outcome:?}: {}", e.message);
        assert!(e.message.contains(why), "{outcome:?}: {}", e.message);

        let info = t.svc.resolve("broken").expect("the record stays");
        assert_eq!(info.phase, Phase::Failed, "{outcome:?}");
        assert!(info.last_error.as_deref().is_some_and(|l| l.contains(why)), "{outcome:?}: {:?}", info.last_error);
        assert_eq!(info.pid, None);
        assert_eq!(t.svc.live_count(), 0);
        assert_eq!(t.vms.qemus(), []);
    }
}

#[tokio::test]
async fn sizes_out_of_range_are_refused_before_anything_is_recorded_or_started() {
    let t = TestService::new(limits());
    let base = || TestService::request("big");
    for (req, what) in [
        (CreateSandbox { vcpus: Some(0), ..base() }, "0 vCPUs"),
        (CreateSandbox { vcpus: Some(65), ..base() }, "65 vCPUs"),
        (CreateSandbox { memory_mib: Some(32), ..base() }, "32 MiB of memory"),
        (CreateSandbox { disk_mib: Some(1 << 40), ..base() }, "disk"),
    ] {
        let e = t.svc.create(req).await.expect_err(what);
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{what}");
        assert!(e.message.contains(what) && e.message.contains("out of range"), "{}", e.message);
        assert!(e.hint.starts_with("use "), "the hint gives the bounds: {}", e.hint);
    }
    assert_eq!(t.svc.list().unwrap(), []);
    assert_eq!(t.vms.calls(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cap_counts_live_sandboxes_and_parallel_creates_do_not_overshoot() {
    let t = TestService::new(Limits { max_sandboxes: 3, ..limits() });
    // Every start waits, so the creates that pass the cap are all in flight (booting) at once.
    t.vms.hold_starts();
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..8 {
        let svc = t.svc.clone();
        creates.spawn(async move { svc.create(TestService::request(&format!("box-{i}"))).await });
    }
    let mut refused = 0;
    while refused < 5 {
        let done = tokio::time::timeout(Duration::from_secs(10), creates.join_next()).await;
        let r = done.expect("the creates over the cap are refused at once").expect("a create is left").unwrap();
        let e = r.expect_err("only creates over the cap end while starts are held");
        assert_eq!(e.code, ErrorCode::LimitReached, "{}", e.message);
        refused += 1;
    }
    // The three under the cap reach their (held) start in their own time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while t.vms.starts().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.vms.starts().len(), 3);
    let live = t.svc.list().unwrap().into_iter().filter(|s| s.phase.is_live()).count();
    assert_eq!(live, 3, "3 booting, none more");

    t.vms.release_starts();
    while let Some(r) = creates.join_next().await {
        assert_eq!(r.unwrap().expect("a create under the cap boots").phase, Phase::Running);
    }
    let e = t.svc.create(TestService::request("late")).await.expect_err("still full");
    assert_eq!(e.code, ErrorCode::LimitReached);
    // A stopped sandbox does not count.
    let running = t.svc.list().unwrap().into_iter().find(|s| s.phase == Phase::Running).unwrap();
    t.svc.stop(&running.id).await.unwrap();
    t.svc.create(TestService::request("late")).await.expect("room again after a stop");
}

#[tokio::test]
async fn a_stopped_sandbox_starts_again_on_its_own_disk() {
    let t = TestService::new(limits());
    let info = t.svc.create(TestService::request("box")).await.unwrap();
    let stopped = t.svc.stop("box").await.expect("it stops");
    assert_eq!((stopped.phase, stopped.pid), (Phase::Stopped, None));
    assert!(t.vms.calls().contains(&Call::Shutdown { id: info.id.clone() }));
    assert_eq!(t.vms.qemus(), []);

    let started = t.svc.start("box").await.expect("it starts");
    assert_eq!(started.phase, Phase::Running);
    let Some(Call::Start { from, .. }) = t.vms.starts().pop() else { panic!("a second start") };
    assert_eq!(from, Source::Boot { fresh: false }, "the disk it had");
}

#[tokio::test]
async fn a_qemu_that_dies_fails_its_sandbox_with_the_console() {
    let t = TestService::new(limits());
    let info = t.svc.create(TestService::request("box")).await.unwrap();
    t.vms.crash(info.pid.unwrap());
    let failed = t.wait_for(&info.id, Phase::Failed).await;
    let why = failed.last_error.unwrap();
    assert!(why.contains("QEMU exited unexpectedly") && why.contains("the fake console"), "{why}");
    assert_eq!(failed.pid, None);
    assert!(t.vms.calls().contains(&Call::Release { id: info.id.clone() }));
    assert_eq!(t.svc.live_count(), 0);
}

/// The template of image [`IMAGE_DIGEST`] with default sizes, once one was made.
fn templates(t: &TestService) -> Vec<moat_api::SnapshotInfo> {
    let all = t.svc.snapshots(None).unwrap();
    all.into_iter().filter(|s| s.kind == SnapshotKind::Template).collect()
}

#[tokio::test]
async fn the_first_create_makes_the_template_and_the_next_restore_it() {
    let t = TestService::new(Limits { templates: true, ..limits() });
    let with_template = || CreateSandbox { template: None, ..TestService::request("") };

    let first = t.svc.create(CreateSandbox { name: Some("first".into()), ..with_template() }).await.unwrap();
    assert_eq!(first.phase, Phase::Running);
    let [template] = &templates(&t)[..] else { panic!("one template: {:?}", templates(&t)) };
    let dir = t.svc.snapshot_dir(&template.id);
    assert!(t.vms.calls().contains(&Call::Snapshot { id: first.id.clone(), dest: dir.clone() }));
    assert_eq!(t.vms.starts().len(), 1, "the first boots");

    let second = t.svc.create(CreateSandbox { name: Some("second".into()), ..with_template() }).await.unwrap();
    assert_eq!(second.phase, Phase::Running);
    let Some(Call::Start { id, from, .. }) = t.vms.starts().pop() else { panic!("a second start") };
    assert_eq!((id, from), (second.id.clone(), Source::Snapshot(dir.clone())));
    assert_eq!(templates(&t).len(), 1, "no second template");

    // A restore that crashes on a signal (seen under load) is tried once more.
    t.vms.script_start(Outcome::CrashesRestoring);
    let third = t.svc.create(CreateSandbox { name: Some("third".into()), ..with_template() }).await.unwrap();
    assert_eq!(third.phase, Phase::Running);
    let tries: Vec<Source> = t
        .vms
        .starts()
        .into_iter()
        .filter_map(|c| match c {
            Call::Start { id, from, .. } if id == third.id => Some(from),
            _ => None,
        })
        .collect();
    assert_eq!(tries, [Source::Snapshot(dir.clone()), Source::Snapshot(dir)]);
}

#[tokio::test]
async fn a_template_that_does_not_restore_is_dropped_and_the_sandbox_boots() {
    let t = TestService::new(Limits { templates: true, ..limits() });
    let req = |name: &str| CreateSandbox { template: None, ..TestService::request(name) };
    t.svc.create(req("first")).await.unwrap();
    let [old] = &templates(&t)[..] else { panic!("one template") };

    t.vms.script_start(Outcome::Fails);
    let second = t.svc.create(req("second")).await.expect("it boots instead");
    assert_eq!(second.phase, Phase::Running);
    let froms: Vec<Source> = t
        .vms
        .starts()
        .into_iter()
        .filter_map(|c| match c {
            Call::Start { id, from, .. } if id == second.id => Some(from),
            _ => None,
        })
        .collect();
    assert_eq!(froms, [Source::Snapshot(t.svc.snapshot_dir(&old.id)), Source::Boot { fresh: true }]);
    let [new] = &templates(&t)[..] else { panic!("one template: {:?}", templates(&t)) };
    assert_ne!(new.id, old.id, "the broken one is gone, the boot made a new one");
}

#[tokio::test]
async fn no_template_is_used_or_made_when_turned_off_or_with_secrets() {
    let t = TestService::new(Limits { templates: true, ..limits() });
    // Machines with a network device: the double runs them without a network.
    let net = || NetSpec { mode: NetMode::Allow, allow: vec!["api.example.com".into()], ..NetSpec::default() };
    let req = |name: &str| CreateSandbox { template: None, net: Some(net()), ..TestService::request(name) };
    t.svc.create(req("maker")).await.unwrap();
    let [template] = &templates(&t)[..] else { panic!("one template") };
    let dir = t.svc.snapshot_dir(&template.id);
    t.svc.create(req("user")).await.unwrap();
    let Some(Call::Start { from, .. }) = t.vms.starts().pop() else { panic!("a start") };
    assert_eq!(from, Source::Snapshot(dir), "the same machine comes from the template");
    let made = || t.vms.calls().iter().filter(|c| matches!(c, Call::Snapshot { .. })).count();
    assert_eq!(made(), 1);

    let off = t.svc.create(CreateSandbox { template: Some(false), ..req("off") }).await.unwrap();
    let Some(Call::Start { id, from, .. }) = t.vms.starts().pop() else { panic!("a start") };
    assert_eq!((id, from), (off.id, Source::Boot { fresh: true }));

    // A sandbox with secrets trusts moat's CA: it never comes from, or becomes, a template.
    let secret = SecretSpec {
        name: "TOKEN".into(),
        value: Some("s3cret".into()),
        hosts: vec!["api.example.com".into()],
        in_body: false,
    };
    let with_secret = NetSpec { secrets: vec![secret], ..net() };
    let secret = t.svc.create(CreateSandbox { net: Some(with_secret), ..req("secret") }).await.unwrap();
    assert_eq!(secret.phase, Phase::Running);
    let Some(Call::Start { id, from, .. }) = t.vms.starts().pop() else { panic!("a start") };
    assert_eq!((id, from), (secret.id, Source::Boot { fresh: true }));

    assert_eq!(made(), 1, "no template made of either");
    assert_eq!(templates(&t).len(), 1);
}

#[tokio::test]
async fn gc_reclaims_what_no_record_owns_and_leaves_live_sandboxes_alone() {
    let t = TestService::new(limits());
    let running = t.svc.create(TestService::request("running")).await.unwrap();
    let stopped = t.svc.create(TestService::request("stopped")).await.unwrap();
    t.svc.stop("stopped").await.unwrap();
    // A crash left a QMP socket file in the stopped sandbox's directory, a directory nobody
    // owns, and a QEMU in it.
    let stopped_dir = t.run_dir(&stopped.id);
    let qmp = stopped_dir.join(moat_vmm::run_files::QMP_SOCKET);
    std::fs::create_dir_all(qmp.parent().unwrap()).unwrap();
    std::fs::write(&qmp, b"").unwrap();
    let orphan = t.run_dir("0123456789ab");
    std::fs::create_dir_all(&orphan).unwrap();
    let leaked = t.vms.leave_qemu(&orphan);

    let reclaimed = t.svc.gc().await.expect("gc runs");
    assert_eq!(reclaimed.processes, [leaked]);
    assert!(t.vms.calls().contains(&Call::Kill { pid: leaked }));
    assert!(!orphan.exists());
    assert!(reclaimed.paths.contains(&orphan.display().to_string()), "{:?}", reclaimed.paths);
    assert!(!stopped_dir.join(moat_vmm::run_files::QMP_SOCKET).exists());
    assert!(stopped_dir.join(moat_sandbox::OVERLAY_FILE).exists(), "a stopped sandbox keeps its disk");
    assert_eq!(t.vms.qemus(), [(running.pid.unwrap(), t.run_dir(&running.id))], "the running QEMU stays");
    assert_eq!(t.get(&running.id).phase, Phase::Running);
    assert!(t.run_dir(&running.id).join(moat_sandbox::OVERLAY_FILE).exists());

    assert_eq!(t.svc.gc().await.unwrap(), Default::default(), "nothing left to reclaim");
}

#[tokio::test]
async fn a_forced_remove_of_a_sandbox_a_crash_left_creating_kills_its_qemu() {
    let t = TestService::new(limits());
    let info = t.record("stuck", Phase::Creating);
    let pid = t.vms.leave_qemu(&t.run_dir(&info.id));
    let e = t.svc.remove("stuck", false).await.expect_err("it is live");
    assert_eq!(e.code, ErrorCode::InvalidPhase);

    t.svc.remove("stuck", true).await.expect("a forced remove");
    assert!(t.vms.calls().contains(&Call::Kill { pid }));
    assert_eq!(t.vms.qemus(), []);
    assert_eq!(t.svc.list().unwrap(), []);
    assert!(!t.run_dir(&info.id).exists());
}

/// The API document states the bounds the service enforces: those of [`Shape`].
#[test]
fn the_api_document_gives_the_bounds_of_the_shape() {
    let doc: serde_json::Value = serde_json::from_str(&moat_api::openapi::to_json()).expect("the document is JSON");
    let create = &doc["components"]["schemas"]["CreateSandbox"]["properties"];
    let bounds = |field: &str| (create[field]["minimum"].as_u64(), create[field]["maximum"].as_u64());
    let of = |r: std::ops::RangeInclusive<u64>| (Some(*r.start()), Some(*r.end()));
    let (v, m) = (Shape::VCPUS, Shape::MEMORY_MIB);
    assert_eq!(bounds("vcpus"), of(u64::from(*v.start())..=u64::from(*v.end())));
    assert_eq!(bounds("memory_mib"), of(u64::from(*m.start())..=u64::from(*m.end())));
    assert_eq!(bounds("disk_mib"), of(Shape::DISK_MIB));
    for (field, default) in [
        ("vcpus", u64::from(moat_api::DEFAULT_VCPUS)),
        ("memory_mib", u64::from(moat_api::DEFAULT_MEMORY_MIB)),
        ("disk_mib", moat_api::DEFAULT_DISK_MIB),
    ] {
        let (min, max) = bounds(field);
        assert!(min <= Some(default) && Some(default) <= max, "the default {field} is within the bounds");
    }
}

/// A create that cannot be admitted is refused before its missing image is pulled or built.
#[tokio::test]
async fn a_create_over_the_cap_is_refused_before_its_missing_image_is_made() {
    let t = TestService::new(Limits { max_sandboxes: 1, ..limits() });
    t.svc.create(TestService::request("one")).await.expect("the first fits");
    // On loopback, closed: were it pulled, the pull would fail here and never leave the host.
    let missing = CreateSandbox { image: Some("127.0.0.1:9/app:1".into()), ..TestService::request("two") };
    let e = t.svc.create(missing).await.expect_err("over the cap");
    assert_eq!(e.code, ErrorCode::LimitReached, "{}", e.message);
    let events = t.svc.db(|db| db.events_after(0, 100)).unwrap();
    assert!(events.iter().all(|e| e.kind != "image"), "nothing was made: {events:?}");
}

/// A create past the memory budget is refused with the numbers and the flag, before its missing
/// image is pulled and before any QEMU starts; a stop makes room again.
#[tokio::test]
async fn a_create_over_the_memory_budget_is_refused_with_the_numbers_before_anything_is_made() {
    let t = TestService::new(Limits { memory_overcommit: 1.5, host: host(4096, 1 << 20), ..limits() });
    let big = |name: &str| CreateSandbox { memory_mib: Some(2048), ..TestService::request(name) };
    t.svc.create(big("first")).await.expect("2208 MiB of a 6144 MiB budget fits");
    t.svc.create(big("second")).await.expect("4416 MiB fits");
    // On loopback, closed: were it pulled, the pull would fail here and never leave the host.
    let missing = CreateSandbox { image: Some("127.0.0.1:9/app:1".into()), ..big("third") };
    let e = t.svc.create(missing).await.expect_err("6624 MiB does not fit");
    assert_eq!(e.code, ErrorCode::InsufficientResources, "{}", e.message);
    assert_eq!(
        e.message,
        "not enough memory: this sandbox asks for 2048 MiB + 160 MiB QEMU overhead; 4.3 GiB of the 6.0 GiB \
         budget (4.0 GiB RAM × 1.5) is committed to 2 live sandboxes; 2.0 GiB is free on the host"
    );
    assert_eq!(
        e.hint,
        "stop or remove a sandbox, ask for less (--memory), or raise the ratio with `moat serve \
         --memory-overcommit R` (config `memory_overcommit`)"
    );
    assert_eq!(t.vms.starts().len(), 2, "no QEMU for the refused one");
    let events = t.svc.db(|db| db.events_after(0, 100)).unwrap();
    assert!(events.iter().all(|e| e.kind != "image"), "nothing was pulled: {events:?}");
    assert_eq!(t.svc.list().unwrap().len(), 2, "nothing was recorded");

    // A stopped sandbox holds no memory.
    t.svc.stop("first").await.unwrap();
    t.svc.create(big("third")).await.expect("room again after a stop");
    // Starting the stopped one again would pass the budget: refused, its record left at rest.
    let e = t.svc.start("first").await.expect_err("no room to start it");
    assert_eq!(e.code, ErrorCode::InsufficientResources);
    assert!(e.message.starts_with("not enough memory: sandbox first asks for 2048 MiB"), "{}", e.message);
    assert!(!e.hint.contains("--memory)"), "a start cannot ask for less: {}", e.hint);
    assert_eq!(t.svc.resolve("first").unwrap().phase, Phase::Stopped);
    assert_eq!(t.vms.starts().len(), 3);
}

/// A fork of n is refused when the n together do not fit, before the source is saved.
#[tokio::test]
async fn a_fork_whose_clones_together_pass_the_budget_is_refused_before_the_source_is_saved() {
    let t = TestService::new(room_for(3));
    t.svc.create(TestService::request("source")).await.unwrap();
    let fork = |n| moat_api::Fork { count: Some(n), ..Default::default() };
    let e = t.svc.fork("source", fork(3)).await.expect_err("4 sandboxes do not fit where 3 do");
    assert_eq!(e.code, ErrorCode::InsufficientResources, "{}", e.message);
    assert!(
        e.message.starts_with(
            "not enough memory: these 3 sandboxes ask for 3 × (512 MiB + 160 MiB QEMU overhead) = 2.0 GiB; \
             672 MiB of the"
        ),
        "{}",
        e.message
    );
    assert!(e.hint.contains("fork fewer (-n)") && e.hint.contains("--memory-overcommit"), "{}", e.hint);
    assert!(!t.vms.calls().iter().any(|c| matches!(c, Call::Snapshot { .. })), "the source was not saved");
    assert_eq!(t.vms.starts().len(), 1);
    assert_eq!(t.svc.snapshots(None).unwrap(), []);

    let forked = t.svc.fork("source", fork(2)).await.expect("3 sandboxes fit");
    assert_eq!(forked.sandboxes.len(), 2);
    assert!(forked.sandboxes.iter().all(|s| s.phase == Phase::Running));
}

/// Creates and starts in parallel: the check and what makes the ask count happen under one lock,
/// so no two pass on the same free memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_creates_and_starts_cannot_pass_on_the_same_memory() {
    let t = TestService::new(room_for(3));
    // Every start waits, so the creates that pass are all in flight (booting) at once.
    t.vms.hold_starts();
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..6 {
        let svc = t.svc.clone();
        creates.spawn(async move { svc.create(TestService::request(&format!("box-{i}"))).await });
    }
    for _ in 0..3 {
        let done = tokio::time::timeout(Duration::from_secs(10), creates.join_next()).await;
        let r = done.expect("the creates that do not fit are refused at once").expect("a create is left").unwrap();
        let e = r.expect_err("only refused creates end while starts are held");
        assert_eq!(e.code, ErrorCode::InsufficientResources, "{}", e.message);
    }
    t.vms.release_starts();
    let mut running = Vec::new();
    while let Some(r) = creates.join_next().await {
        running.push(r.unwrap().expect("a create that fits boots").name);
    }
    assert_eq!(running.len(), 3);
    assert_eq!(t.vms.starts().len(), 3);

    // Two stopped, one new in their room: the two cannot both start again. A start counts from
    // its admission on, before its record leaves the phase it rests in.
    for name in &running[..2] {
        t.svc.stop(name).await.unwrap();
    }
    t.svc.create(TestService::request("newcomer")).await.unwrap();
    let first = t.svc.resolve(&running[0]).unwrap();
    let admitted = t.svc.admit_start(&first).expect("one more fits");
    assert_eq!(t.get(&first.id).phase, Phase::Stopped);
    let e = t.svc.start(&running[1]).await.expect_err("the admitted start holds the room");
    assert_eq!(e.code, ErrorCode::InsufficientResources, "{}", e.message);
    drop(admitted);
    t.svc.start(&running[1]).await.expect("the room is free again");
    assert_eq!(t.vms.starts().len(), 5);
}

/// Disks are thin: their growth is admitted against the free space times the ratio.
#[tokio::test]
async fn a_create_whose_disk_would_pass_the_free_space_is_refused_with_the_numbers() {
    let t = TestService::new(Limits { disk_overcommit: 2.0, host: host(64 << 10, 3072), ..limits() });
    let disk = |name: &str, mib| CreateSandbox { disk_mib: Some(mib), ..TestService::request(name) };
    t.svc.create(disk("first", 4096)).await.expect("4 GiB of 6 GiB fits");
    let e = t.svc.create(disk("second", 4096)).await.expect_err("the first's disk may still grow to 4 GiB");
    assert_eq!(e.code, ErrorCode::InsufficientResources, "{}", e.message);
    let home = t.svc.rt.config.home.display().to_string();
    assert!(
        e.message.starts_with("not enough disk: this sandbox asks for a disk of 4.0 GiB; the disks of 1 sandbox may")
            && e.message.ends_with(&format!("3.0 GiB is free under {home}, and disks may claim 6.0 GiB (3.0 GiB × 2)")),
        "{}",
        e.message
    );
    assert!(e.hint.contains("--disk)") && e.hint.contains("`moat serve --disk-overcommit R`"), "{}", e.hint);
    assert_eq!(t.vms.starts().len(), 1);
    // A stopped sandbox's disk can grow again when it starts: it still counts.
    t.svc.stop("first").await.unwrap();
    t.svc.create(disk("second", 4096)).await.expect_err("the stopped disk counts");
    t.svc.create(disk("second", 2048)).await.expect("a smaller disk fits");
}

/// With `require_kvm`, a daemon whose sandboxes would run under TCG refuses them, saying why.
#[tokio::test]
async fn without_kvm_a_daemon_that_requires_it_starts_nothing() {
    let t = TestService::new(Limits { require_kvm: true, ..limits() });
    let e = t.svc.create(TestService::request("box")).await.expect_err("this host runs TCG");
    assert_eq!(e.code, ErrorCode::Incompatible);
    assert_eq!(e.message, "KVM is required (--require-kvm), and sandboxes on this host would run under TCG: fake");
    assert!(e.hint.contains("drop --require-kvm (config `require_kvm`)"), "{}", e.hint);
    assert_eq!(t.vms.calls(), []);
    assert_eq!(t.svc.list().unwrap(), []);
}
