use super::*;
use crate::{Accel, VmConfig};

#[test]
fn slots_name_their_fd_set_nodes_and_device() {
    let n = slot_names(15).unwrap();
    assert_eq!(
        n,
        SlotNames { fdset: 1015, file_node: "volf15".into(), format_node: "vol15".into(), device: "voldev15".into() }
    );
    assert!(matches!(slot_names(MAX_VOLUMES), Err(VolumeError::NoSuchSlot(16))));
}

#[test]
fn every_plug_gets_its_own_serial() {
    let (a, b) = (volume_serial(15), volume_serial(15));
    assert_ne!(a, b);
    for s in [&a, &b] {
        assert!(s.starts_with("moat-vol-15-") && s.len() == 20, "{s}");
        assert!(s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'), "{s}");
    }
}

#[test]
fn read_only_volumes_are_read_only_at_every_layer_and_writable_ones_discard() {
    let n = slot_names(2).unwrap();
    let (file, raw, device) = plug_arguments(2, &n, "moat-vol-2-abc", true);
    assert_eq!(
        file,
        json!({"driver": "file", "node-name": "volf2", "filename": "/dev/fdset/1002", "read-only": true,
               "cache": {"direct": false}, "locking": "off"})
    );
    assert_eq!(raw, json!({"driver": "raw", "node-name": "vol2", "file": "volf2", "read-only": true}));
    assert_eq!(
        device,
        json!({"driver": "scsi-hd", "id": "voldev2", "drive": "vol2", "bus": "vols.0", "channel": 0,
               "scsi-id": 2, "lun": 0, "serial": "moat-vol-2-abc"})
    );
    let (file, raw, _) = plug_arguments(2, &n, "moat-vol-2-abc", false);
    assert_eq!((&file["read-only"], &file["discard"]), (&json!(false), &json!("unmap")));
    assert_eq!((&raw["read-only"], &raw["discard"]), (&json!(false), &json!("unmap")));
}

#[test]
fn qmp_answers_are_read_defensively() {
    let nodes = json!([{"node-name": "vol1"}, {"node-name": 7}, {}, {"node-name": "volf1"}]);
    assert_eq!(node_names(&nodes), ["vol1", "volf1"]);
    assert!(node_names(&json!({"not": "a list"})).is_empty());
    assert_eq!(fdset_ids(&json!([{"fdset-id": 1001, "fds": []}, {"fdset-id": -1}])), [1001]);
    let list = json!([{"name": "vols", "type": "child<virtio-scsi-device>"}, {"name": "voldev1"}]);
    assert!(has_child(&list, "voldev1") && !has_child(&list, "voldev10"));
}

#[test]
fn errors_keep_hints_out_of_messages() {
    let cases = [
        (VolumeError::NoSuchSlot(16), false),
        (VolumeError::SlotBusy(1), true),
        (VolumeError::OpenMode { slot: 1, readonly: true }, false),
        (VolumeError::FileStatus { slot: 1, source: std::io::Error::other("x") }, false),
        (VolumeError::UnplugTimeout { slot: 1 }, true),
        (VolumeError::CommandTimeout { command: "x".into() }, true),
    ];
    for (e, hinted) in &cases {
        moat_hint::check(e, *hinted).unwrap();
    }
    assert_eq!(VolumeError::NoSuchSlot(16).to_string(), "volume slot 16 does not exist (a VM has slots 0 to 15)");
}

/// A VM whose guest never gets anywhere (no initrd: the kernel panics and waits): the SCSI bus
/// takes and drops disks without a guest driver, which is all QEMU's side needs.
async fn idle_vm(dir: &std::path::Path) -> Vm {
    let empty = dir.join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let cfg = VmConfig {
        qemu: crate::find_qemu(None).expect("qemu-system-x86_64 installed (apt-get install qemu-system-x86)"),
        accel: Accel::Tcg,
        vcpus: 1,
        memory_mib: 128,
        kernel: crate::vm::tests::host_kernel(),
        initrd: empty,
        cmdline: "panic=0".into(),
        root_disk: None,
        run_dir: dir.to_path_buf(),
        seccomp: true,
        name: format!("volumes-{}", std::process::id()),
        memory: None,
        incoming: false,
        nic: false,
        jail: None,
        cgroups: None,
    };
    Vm::spawn(&cfg, true).await.expect("QEMU starts")
}

async fn node_read_only(vm: &mut Vm, node: &str) -> Option<bool> {
    let nodes = vm.command("query-named-block-nodes", json!({ "flat": true })).await.unwrap();
    nodes.as_array()?.iter().find(|n| n["node-name"] == node)?.get("ro")?.as_bool()
}

#[tokio::test]
async fn volumes_plug_by_fd_unplug_idempotently_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.img");
    File::create(&image).unwrap().set_len(64 << 20).unwrap();
    let mut vm = idle_vm(dir.path()).await;

    let rw = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    let serial = vm.plug_volume(0, rw, false).await.expect("plugs");
    assert!(serial.starts_with("moat-vol-0-"), "{serial}");
    let got = vm.command("qom-get", json!({"path": "/machine/peripheral/voldev0", "property": "serial"})).await;
    assert_eq!(got.unwrap(), serial.as_str());
    assert_eq!(node_read_only(&mut vm, "vol0").await, Some(false));
    let ro = File::open(&image).unwrap();
    assert!(vm.plug_volume(15, ro, true).await.expect("plugs read-only").starts_with("moat-vol-15-"));
    assert_eq!(node_read_only(&mut vm, "vol15").await, Some(true));
    assert_eq!(vm.plugged_volumes().await.unwrap(), [0, 15]);

    let again = vm.plug_volume(0, File::open(&image).unwrap(), true).await.unwrap_err();
    assert!(matches!(again, VmmError::Volume(VolumeError::SlotBusy(0))), "{again}");
    let ro_file = vm.plug_volume(1, File::open(&image).unwrap(), false).await.unwrap_err();
    assert!(matches!(ro_file, VmmError::Volume(VolumeError::OpenMode { slot: 1, readonly: false })), "{ro_file}");
    assert_eq!(ro_file.to_string(), "the file for volume slot 1 must be open read-write");
    let rw_file = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    let rw_file = vm.plug_volume(1, rw_file, true).await.unwrap_err();
    assert!(matches!(rw_file, VmmError::Volume(VolumeError::OpenMode { slot: 1, readonly: true })), "{rw_file}");
    let slot = vm.plug_volume(MAX_VOLUMES, File::open(&image).unwrap(), true).await.unwrap_err();
    assert!(matches!(slot, VmmError::Volume(VolumeError::NoSuchSlot(16))), "{slot}");

    for s in [0, 15] {
        vm.unplug_volume(s).await.expect("unplugs");
        vm.unplug_volume(s).await.expect("unplugging an empty slot is fine");
    }
    assert_eq!(vm.plugged_volumes().await.unwrap(), Vec::<u8>::new());
    let nodes = vm.command("query-named-block-nodes", json!({ "flat": true })).await.unwrap();
    assert!(node_names(&nodes).iter().all(|n| !n.starts_with("vol")), "{nodes}");
    let sets = vm.command("query-fdsets", json!({})).await.unwrap();
    assert_eq!(fdset_ids(&sets), Vec::<u64>::new(), "{sets}");

    // A slot is usable again, and a failed plug (a node name taken) cleans up after itself.
    vm.plug_volume(0, File::open(&image).unwrap(), true).await.expect("plugs again");
    vm.unplug_volume(0).await.unwrap();
    vm.command("blockdev-add", json!({"driver": "null-co", "node-name": "vol3"})).await.unwrap();
    vm.plug_volume(3, File::open(&image).unwrap(), true).await.expect("stale nodes of the slot are cleared");
    vm.unplug_volume(3).await.unwrap();
    vm.command("blockdev-add", json!({"driver": "null-co", "node-name": "squatter"})).await.unwrap();
    let squat = json!({"driver": "scsi-hd", "id": "squat", "drive": "squatter", "bus": "vols.0", "scsi-id": 4});
    vm.command("device_add", squat).await.unwrap();
    let taken = vm.plug_volume(4, File::open(&image).unwrap(), true).await.unwrap_err();
    assert!(matches!(taken, VmmError::Qmp(_)), "{taken}");
    let nodes = vm.command("query-named-block-nodes", json!({ "flat": true })).await.unwrap();
    assert!(!node_names(&nodes).iter().any(|n| *n == "vol4" || *n == "volf4"), "a failed plug cleans up: {nodes}");
    assert_eq!(fdset_ids(&vm.command("query-fdsets", json!({})).await.unwrap()), Vec::<u64>::new());
    vm.kill().await;
}
