//! Volumes through the service, on real files and the host's mkfs.ext4, without a VM.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use moat_api::{CreateVolume, ErrorCode, VolumeInfo};

use super::LEFTOVER_AGE;
use crate::launcher::fake::TestService;
use crate::service::tests::limits;

const MIB: u64 = 1 << 20;

fn create(name: &str, size: Option<u64>) -> CreateVolume {
    CreateVolume { name: name.into(), size_bytes: size }
}

/// A volume recorded with its file, as a create leaves it, but `created_at` as given.
fn recorded(t: &TestService, name: &str, created_at: i64) -> VolumeInfo {
    let v = VolumeInfo {
        id: moat_sandbox::new_id(),
        name: name.into(),
        size_bytes: 16 * MIB,
        used_bytes: None,
        allocated_bytes: 0,
        created_at,
        users: Vec::new(),
    };
    assert!(t.svc.db(|db| db.insert_volume(&v)).unwrap());
    v
}

#[tokio::test]
async fn a_volume_is_an_ext4_file_found_by_name_or_id_and_removed_with_its_data() {
    let t = TestService::new(limits());
    let v = t.svc.create_volume(create("data", Some(64 * MIB))).await.expect("the create succeeds");
    assert_eq!((v.name.as_str(), v.size_bytes), ("data", 64 * MIB));
    let used = v.used_bytes.expect("a fresh file system reads");
    assert!(used > 0 && used < 16 * MIB, "metadata and journal only: {used}");
    assert!(v.allocated_bytes > 0 && v.allocated_bytes < 32 * MIB, "sparse: {}", v.allocated_bytes);
    assert!(v.users.is_empty());

    let path = t.svc.volume_path(&v.id);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (64 * MIB, 0o600));
    let fsck = std::process::Command::new("e2fsck").arg("-fn").arg(&path).output().expect("e2fsck runs");
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));

    assert_eq!(t.svc.volume("data").unwrap(), v);
    assert_eq!(t.svc.volume(&v.id[..6]).unwrap(), v);
    assert_eq!(t.svc.volumes().unwrap(), std::slice::from_ref(&v));

    let removed = t.svc.remove_volume("data", false).await.expect("nothing mounts it");
    assert_eq!(removed, v);
    assert!(!path.exists(), "the file goes with it");
    let e = t.svc.volume("data").unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.hint.contains("moat volume ls"), "{}", e.hint);
    assert_eq!(t.svc.remove_volume("data", true).await.unwrap_err().code, ErrorCode::NotFound);
    let said: Vec<String> = t
        .svc
        .db(|db| db.events_after(0, 10))
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "volume")
        .map(|e| e.message)
        .collect();
    assert_eq!(
        said,
        [format!("volume data created ({}, {} bytes)", v.id, 64 * MIB), format!("volume data ({}) removed", v.id)]
    );
}

#[tokio::test]
async fn bad_names_sizes_and_taken_names_are_refused_with_what_to_do() {
    let t = TestService::new(limits());
    for (req, says) in [
        (create("bad name", None), "volume name \"bad name\" is not valid"),
        (create("cafe", None), "could be mistaken for an id"),
        (create("tiny", Some(0)), "0 bytes is out of range"),
        (create("tiny", Some(1024)), "1024 bytes is out of range"),
        (create("huge", Some(100 << 40)), "out of range"),
    ] {
        let e = t.svc.create_volume(req).await.expect_err(says);
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{says}");
        assert!(e.message.contains(says), "{}", e.message);
        assert!(!e.hint.is_empty(), "{says}");
    }
    assert!(gives_the_bounds(&t.svc.create_volume(create("tiny", Some(1))).await.unwrap_err().hint));
    assert!(t.svc.volumes().unwrap().is_empty());
    assert!(std::fs::read_dir(t.svc.volumes_root()).map(|d| d.count()).unwrap_or(0) == 0, "no file was made");

    let first = t.svc.create_volume(create("data", Some(16 * MIB))).await.unwrap();
    let e = t.svc.create_volume(create("data", Some(32 * MIB))).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NameTaken);
    assert!(e.hint.contains("moat volume rm data"), "{}", e.hint);
    assert_eq!(t.svc.volumes().unwrap(), [first], "the first is untouched");
    assert_eq!(std::fs::read_dir(t.svc.volumes_root()).unwrap().count(), 1);
}

fn gives_the_bounds(hint: &str) -> bool {
    hint.contains("16 MiB to 16 TiB") && hint.contains("--size 10G")
}

#[tokio::test]
async fn parallel_creates_of_one_name_make_one_volume() {
    let t = TestService::new(limits());
    let mut creates = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let svc = t.svc.clone();
        creates.spawn(async move { svc.create_volume(create("shared", Some(16 * MIB))).await });
    }
    let results: Vec<_> = creates.join_all().await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| e.code == ErrorCode::NameTaken));
    assert_eq!(std::fs::read_dir(t.svc.volumes_root()).unwrap().count(), 1);
}

#[tokio::test]
async fn a_volume_opens_as_asked_and_never_through_a_link() {
    let t = TestService::new(limits());
    let v = t.svc.create_volume(create("data", Some(16 * MIB))).await.unwrap();
    for (readonly, mode) in [(true, rustix::fs::OFlags::RDONLY), (false, rustix::fs::OFlags::RDWR)] {
        let (info, file) = t.svc.open_volume("data", readonly).expect("it opens");
        assert_eq!(info, v);
        let flags = rustix::fs::fcntl_getfl(&file).unwrap();
        assert_eq!(flags & (rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::WRONLY), mode);
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK), "reads block as usual");
        let fd_flags = rustix::io::fcntl_getfd(&file).unwrap();
        assert!(fd_flags.contains(rustix::io::FdFlags::CLOEXEC), "only a child it is handed to gets it");
    }

    // A link in place of the file is refused, not followed.
    let path = t.svc.volume_path(&v.id);
    let elsewhere = path.with_extension("elsewhere");
    std::fs::rename(&path, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
    let e = t.svc.open_volume("data", false).unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal, "{}", e.message);
    std::fs::remove_file(&path).unwrap();

    let e = t.svc.open_volume("data", true).unwrap_err();
    assert!(e.message.contains("is gone") && e.hint.contains("moat volume rm data"), "{}: {}", e.message, e.hint);
    let info = t.svc.volume("data").expect("still listed until removed");
    assert_eq!((info.used_bytes, info.allocated_bytes), (None, 0));
    t.svc.remove_volume("data", false).await.expect("a volume whose file is gone can be removed");
}

#[tokio::test]
async fn gc_never_removes_a_volume_and_reconciles_what_a_crash_left() {
    let t = TestService::new(limits());
    let kept = t.svc.create_volume(create("kept", Some(16 * MIB))).await.unwrap();
    let root = t.svc.volumes_root();
    // A remove cut short between its row and its file; a create cut short between its row and
    // its file; a file that is not one of ours.
    let orphan_file = root.join("0123456789ab.img");
    std::fs::write(&orphan_file, b"left by a crash").unwrap();
    let orphan_row = recorded(&t, "lost", crate::state::now_secs() - 3600);
    let young_row = recorded(&t, "making", crate::state::now_secs());
    let foreign = root.join("notes.txt");
    std::fs::write(&foreign, b"mine").unwrap();

    // Everything is younger than the real age, but the row made an hour ago.
    let reconciled = t.svc.volume_gc();
    assert_eq!(reconciled, [t.svc.volume_path(&orphan_row.id).display().to_string()]);
    assert!(orphan_file.exists(), "a young file may be a create in flight");

    // Once old enough, the file without a row goes too; a locked one (in use) stays.
    let locked = root.join("ba9876543210.img");
    std::fs::write(&locked, b"being made").unwrap();
    let lock = t.svc.volume_lock("ba9876543210");
    let guard = lock.try_lock().unwrap();
    let mut reconciled = t.svc.reconcile_volumes(Duration::ZERO).unwrap();
    reconciled.sort();
    let mut expected =
        [orphan_file.display().to_string(), t.svc.volume_path(&young_row.id).display().to_string()].to_vec();
    expected.sort();
    assert_eq!(reconciled, expected);
    assert!(locked.exists());
    drop(guard);

    // The volume with a row stays whatever its age, and so does what is not ours.
    let names: Vec<String> = t.svc.volumes().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["kept"]);
    assert!(t.svc.volume_path(&kept.id).exists() && foreign.exists());
    assert!(LEFTOVER_AGE >= Duration::from_secs(120), "a create is never judged a leftover");

    // The sandbox gc runs it too, and prune leaves volumes alone.
    t.svc.gc().await.unwrap();
    t.svc.prune().await.unwrap();
    assert_eq!(t.svc.volume("kept").unwrap().id, kept.id);
    assert!(t.svc.volume_path(&kept.id).metadata().unwrap().size() == 16 * MIB);
}

#[tokio::test]
async fn a_copy_holds_the_same_bytes_and_stays_sparse() {
    let t = TestService::new(limits());
    let source = t.svc.create_volume(create("src", Some(256 * MIB))).await.unwrap();
    // Data past the file system's metadata, as a guest would leave it.
    let marker = b"written by the guest";
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(t.svc.volume_path(&source.id)).unwrap();
        file.write_all_at(marker, 200 * MIB).unwrap();
    }
    let copy = t.svc.copy_volume("src", "src-copy").await.expect("the copy succeeds");
    assert_ne!(copy.id, source.id);
    assert_eq!((copy.name.as_str(), copy.size_bytes), ("src-copy", source.size_bytes));
    assert_eq!(copy.used_bytes, t.svc.volume("src").unwrap().used_bytes);
    let (a, b) = (t.svc.volume_path(&source.id), t.svc.volume_path(&copy.id));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "byte for byte");
    assert!(copy.allocated_bytes < 64 * MIB, "holes stay holes: {}", copy.allocated_bytes);
    assert_eq!(std::fs::metadata(&b).unwrap().permissions().mode() & 0o777, 0o600);

    let e = t.svc.copy_volume("src", "src-copy").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NameTaken);
    assert_eq!(t.svc.copy_volume("ghost", "other").await.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(t.svc.copy_volume("src", "bad name").await.unwrap_err().code, ErrorCode::InvalidRequest);
    std::fs::remove_file(&a).unwrap();
    let e = t.svc.copy_volume("src", "other").await.unwrap_err();
    assert!(e.message.contains("is gone"), "{}", e.message);
    let names: Vec<String> = t.svc.volumes().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["src", "src-copy"], "failed copies leave nothing");
    assert_eq!(std::fs::read_dir(t.svc.volumes_root()).unwrap().count(), 1);
}

/// A caller that goes away at any point of a create (a client hanging up) leaves either the
/// whole volume or nothing: never a row without its file system, never a file without a row.
#[tokio::test]
async fn a_create_cut_short_anywhere_leaves_a_volume_or_nothing() {
    let t = TestService::new(limits());
    for (i, micros) in [0u64, 50, 200, 1000, 3000, 10_000, 30_000, 100_000].into_iter().enumerate() {
        let req = create(&format!("cut-{i}"), Some(32 * MIB));
        let _ = tokio::time::timeout(Duration::from_micros(micros), t.svc.create_volume(req)).await;
        let rows = t.svc.volumes().unwrap();
        let mut files: Vec<String> = std::fs::read_dir(t.svc.volumes_root())
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        files.sort();
        let mut expected: Vec<String> = rows.iter().map(|v| format!("{}.img", v.id)).collect();
        expected.sort();
        assert_eq!(files, expected, "after {micros} us");
        for v in &rows {
            assert!(v.used_bytes.is_some(), "{} is whole after {micros} us", v.name);
        }
    }
    // Cut at once, the first create is gone while mkfs runs: its row was written and undone.
    let events = t.svc.db(|db| db.events_after(0, 100)).unwrap();
    assert!(events.iter().any(|e| e.message.starts_with("volume cut-0 (") && e.message.ends_with("was cut short")));
}
