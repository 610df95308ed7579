//! Volumes: host files holding an ext4 file system, hot-plugged into a running VM as SCSI disks
//! on the `virtio-scsi` bus every VM has (crate::command). A volume is plugged only while the
//! guest has it mounted, so a snapshot (taken with volumes unplugged) never holds the device.
//!
//! The daemon opens the file and hands QEMU the descriptor (`add-fd`): a jailed QEMU sees neither
//! the path nor has the rights to open it, and a volume opened read-only stays read-only
//! whatever QEMU or the guest try.
//!
//! Per slot `N` QEMU has the fd set `FDSET_BASE + N`, the block nodes `volfN` (file) and `volN`
//! (raw), and the device `voldevN` (scsi-hd, SCSI target `N`). Its serial, `moat-vol-N-XXXXXXXX`,
//! names this one plug: a guest still removing the disk an earlier plug of the slot left can
//! never mistake it for the new one.

use std::borrow::Cow;
use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::command::VOLUME_CONTROLLER;
use crate::{Vm, VmmError};

/// Volumes a VM can hold at once: slots `0..MAX_VOLUMES`.
pub const MAX_VOLUMES: u8 = 16;
/// How long QEMU may take to report a disk gone after `device_del` (a SCSI disk goes at once;
/// the guest is told afterwards).
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one QMP command may take before the operation gives up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a block node may stay busy after its device went (QEMU drops its last reference
/// when the device is finalised).
const NODE_BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// Volume fd sets are numbered from here, clear of any set QEMU numbers itself (from 0).
const FDSET_BASE: u64 = 1000;

/// Why a volume could not be plugged or unplugged.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume slot {0} does not exist (a VM has slots 0 to {max})", max = MAX_VOLUMES - 1)]
    NoSuchSlot(u8),
    #[error("volume slot {0} already holds a volume")]
    SlotBusy(u8),
    /// QEMU takes a descriptor only for the access it asks for: read-only for a read-only
    /// volume, read-write otherwise.
    #[error("the file for volume slot {slot} must be open {}", if *readonly { "read-only" } else { "read-write" })]
    OpenMode { slot: u8, readonly: bool },
    #[error("cannot read the open mode of the file for volume slot {slot}")]
    FileStatus { slot: u8, source: std::io::Error },
    #[error("QEMU did not report the disk of volume slot {slot} removed within {}s", UNPLUG_TIMEOUT.as_secs())]
    UnplugTimeout { slot: u8 },
    #[error("QEMU did not answer `{command}` within {}s", COMMAND_TIMEOUT.as_secs())]
    CommandTimeout { command: String },
}

impl moat_hint::Hint for VolumeError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        match self {
            VolumeError::SlotBusy(_) => Some("unplug the volume in that slot first".into()),
            VolumeError::UnplugTimeout { .. } => {
                Some("the VM may be hung; the disk stays plugged until the sandbox stops".into())
            }
            VolumeError::CommandTimeout { .. } => {
                Some("the host may be overloaded, see qemu.log in the run directory".into())
            }
            VolumeError::NoSuchSlot(_) | VolumeError::OpenMode { .. } | VolumeError::FileStatus { .. } => None,
        }
    }
}

/// What every volume disk's SCSI serial starts with.
pub const VOLUME_SERIAL_PREFIX: &str = "moat-vol-";

/// A fresh SCSI serial for a disk plugged into `slot`: how the guest finds it. At most 20
/// bytes (QEMU keeps 36).
fn volume_serial(slot: u8) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PLUGS: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let nonce = (nanos as u32).wrapping_add(PLUGS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9));
    format!("{VOLUME_SERIAL_PREFIX}{slot}-{nonce:08x}")
}

/// QEMU's names for what a slot holds.
#[derive(Debug, PartialEq, Eq)]
struct SlotNames {
    fdset: u64,
    file_node: String,
    format_node: String,
    device: String,
}

fn slot_names(slot: u8) -> Result<SlotNames, VolumeError> {
    if slot >= MAX_VOLUMES {
        return Err(VolumeError::NoSuchSlot(slot));
    }
    Ok(SlotNames {
        fdset: FDSET_BASE + u64::from(slot),
        file_node: format!("volf{slot}"),
        format_node: format!("vol{slot}"),
        device: format!("voldev{slot}"),
    })
}

/// The `blockdev-add` arguments of the file node and the raw node on it, and the `device_add`
/// arguments of the disk.
fn plug_arguments(slot: u8, names: &SlotNames, serial: &str, readonly: bool) -> (Value, Value, Value) {
    let mut file = json!({
        "driver": "file",
        "node-name": names.file_node,
        "filename": format!("/dev/fdset/{}", names.fdset),
        "read-only": readonly,
        "cache": { "direct": false },
        // The daemon plugs a volume into one VM at a time; QEMU's own locks would take another
        // fd on the file through the fd set, for nothing.
        "locking": "off",
    });
    let mut raw = json!({
        "driver": "raw",
        "node-name": names.format_node,
        "file": names.file_node,
        "read-only": readonly,
    });
    if !readonly {
        // The guest's discards punch holes, so a volume's file stays as sparse as its data.
        file["discard"] = json!("unmap");
        raw["discard"] = json!("unmap");
    }
    let device = json!({
        "driver": "scsi-hd",
        "id": names.device,
        "drive": names.format_node,
        "bus": format!("{VOLUME_CONTROLLER}.0"),
        "channel": 0,
        "scsi-id": slot,
        "lun": 0,
        "serial": serial,
    });
    (file, raw, device)
}

/// The `node-name`s in a `query-named-block-nodes` answer.
fn node_names(nodes: &Value) -> Vec<&str> {
    nodes.as_array().into_iter().flatten().filter_map(|n| n.get("node-name")?.as_str()).collect()
}

/// The ids of the `fdset-id`s in a `query-fdsets` answer.
fn fdset_ids(sets: &Value) -> Vec<u64> {
    sets.as_array().into_iter().flatten().filter_map(|s| s.get("fdset-id")?.as_u64()).collect()
}

/// Whether a `qom-list` of `/machine/peripheral` has a device named `id`.
fn has_child(list: &Value, id: &str) -> bool {
    list.as_array().into_iter().flatten().any(|p| p.get("name").and_then(Value::as_str) == Some(id))
}

impl Vm {
    /// Plug `file` (an ext4 image the caller opened: read-only for `readonly`, else read-write)
    /// into volume slot `slot` as a SCSI disk; returns the serial the guest finds it by (new for
    /// every plug). A slot with a disk already is refused; remains of an earlier plug that failed
    /// half-way are cleared first. On failure nothing of this plug is left in QEMU.
    pub async fn plug_volume(&mut self, slot: u8, file: File, readonly: bool) -> Result<String, VmmError> {
        let names = slot_names(slot)?;
        let mode = rustix::fs::fcntl_getfl(&file).map_err(|e| VolumeError::FileStatus { slot, source: e.into() })?
            & rustix::fs::OFlags::RWMODE;
        let wanted = if readonly { rustix::fs::OFlags::RDONLY } else { rustix::fs::OFlags::RDWR };
        if mode != wanted {
            return Err(VolumeError::OpenMode { slot, readonly }.into());
        }
        if self.has_device(&names.device).await? {
            return Err(VolumeError::SlotBusy(slot).into());
        }
        self.release_slot(&names).await?;
        let serial = volume_serial(slot);
        let (file_node, raw_node, device) = plug_arguments(slot, &names, &serial, readonly);
        let plugged = async {
            let add = json!({ "fdset-id": names.fdset, "opaque": serial });
            let qmp = self.qmp()?;
            match tokio::time::timeout(COMMAND_TIMEOUT, qmp.execute_with_fd("add-fd", Some(add), Some(file.as_fd())))
                .await
            {
                Ok(answer) => answer?,
                Err(_) => return Err(VolumeError::CommandTimeout { command: "add-fd".into() }.into()),
            };
            self.command("blockdev-add", file_node).await?;
            self.command("blockdev-add", raw_node).await?;
            self.command("device_add", device).await?;
            Ok::<(), VmmError>(())
        }
        .await;
        if let Err(e) = plugged {
            if let Err(cleanup) = self.release_slot(&names).await {
                tracing::warn!(slot, error = %cleanup, "cleaning up after a failed volume plug failed");
            }
            return Err(e);
        }
        tracing::debug!(slot, readonly, %serial, "volume plugged");
        Ok(serial)
    }

    /// Unplug the disk in `slot` (the guest must have unmounted it) and drop QEMU's block nodes
    /// and file descriptor for it. A slot without a volume is fine: this is also cleanup.
    pub async fn unplug_volume(&mut self, slot: u8) -> Result<(), VmmError> {
        let names = slot_names(slot)?;
        if self.has_device(&names.device).await? {
            if let Err(e) = self.command("device_del", json!({ "id": names.device })).await {
                // Gone meanwhile (an earlier unplug that timed out finished): that is the goal.
                if self.has_device(&names.device).await? {
                    return Err(e);
                }
            }
            self.wait_device_deleted(slot, &names.device).await?;
        }
        self.release_slot(&names).await?;
        tracing::debug!(slot, "volume unplugged");
        Ok(())
    }

    /// The slots whose disks are plugged, for cleanup after a daemon restart.
    pub async fn plugged_volumes(&mut self) -> Result<Vec<u8>, VmmError> {
        let list = self.peripherals().await?;
        Ok((0..MAX_VOLUMES).filter(|&s| slot_names(s).is_ok_and(|n| has_child(&list, &n.device))).collect())
    }

    /// Wait for `DEVICE_DELETED` of `device`, then make sure it is gone (a buffered event may be
    /// a stale one from an earlier unplug of the same slot).
    async fn wait_device_deleted(&mut self, slot: u8, device: &str) -> Result<(), VmmError> {
        let deadline = Instant::now() + UNPLUG_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.qmp()?.wait_event("DEVICE_DELETED")).await {
                Ok(event) => {
                    let event = event?;
                    if event.data.get("device").and_then(Value::as_str) == Some(device)
                        && !self.has_device(device).await?
                    {
                        return Ok(());
                    }
                }
                // The event may have been dropped from a full buffer: look once more.
                Err(_) if !self.has_device(device).await? => return Ok(()),
                Err(_) => return Err(VolumeError::UnplugTimeout { slot }.into()),
            }
        }
    }

    /// Drop the block nodes and the fd set of a slot whose device is gone, whichever exist.
    async fn release_slot(&mut self, names: &SlotNames) -> Result<(), VmmError> {
        for node in [&names.format_node, &names.file_node] {
            let deadline = Instant::now() + NODE_BUSY_TIMEOUT;
            loop {
                let nodes = self.command("query-named-block-nodes", json!({ "flat": true })).await?;
                if !node_names(&nodes).contains(&node.as_str()) {
                    break;
                }
                match self.command("blockdev-del", json!({ "node-name": node })).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(e) => {
                        tracing::debug!(node = %node, error = %e, "block node still busy");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        let sets = self.command("query-fdsets", json!({})).await?;
        if fdset_ids(&sets).contains(&names.fdset) {
            self.command("remove-fd", json!({ "fdset-id": names.fdset })).await?;
        }
        Ok(())
    }

    async fn has_device(&mut self, id: &str) -> Result<bool, VmmError> {
        Ok(has_child(&self.peripherals().await?, id))
    }

    /// The devices with an id. QEMU makes their container with the first one: a VM without any
    /// has none at all.
    async fn peripherals(&mut self) -> Result<Value, VmmError> {
        match self.command("qom-list", json!({ "path": "/machine/peripheral" })).await {
            Err(VmmError::Qmp(crate::QmpError::Command { class, .. })) if class == "DeviceNotFound" => Ok(json!([])),
            other => other,
        }
    }

    /// One QMP command, bounded.
    async fn command(&mut self, command: &str, arguments: Value) -> Result<Value, VmmError> {
        let arguments = arguments.as_object().is_some_and(|a| !a.is_empty()).then_some(arguments);
        match tokio::time::timeout(COMMAND_TIMEOUT, self.qmp()?.execute(command, arguments)).await {
            Ok(answer) => Ok(answer?),
            Err(_) => Err(VolumeError::CommandTimeout { command: command.into() }.into()),
        }
    }
}

#[cfg(test)]
mod tests;
