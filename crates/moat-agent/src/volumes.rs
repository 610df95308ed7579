//! Volumes: disks the host plugs in (virtio-scsi) and the agent mounts and unmounts.
//!
//! The host plugs a volume's disk with the SCSI serial `moat-vol-<slot>` and asks for it to be
//! mounted; the agent loads the SCSI modules on first use, finds the disk by its serial and
//! mounts its ext4 file system. Before the host unplugs it, the agent unmounts it, refusing
//! (naming the processes) while anything in the guest still uses it: the disk goes away at once
//! when unplugged, so whatever was not written back would be lost.

mod disk;
mod holders;

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use moat_proto::{AgentError, ErrorCode};
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::modules::{self, group};
use disk::{find_disk, is_volume, remove, Mount};

/// Longest path accepted (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Longest serial accepted (SCSI's unit serial number page holds at most 251 bytes).
const MAX_SERIAL: usize = 251;
/// How long a just-plugged disk may take to appear.
const DISK_WAIT: Duration = Duration::from_secs(10);
/// Top-level directories a volume must never cover: the kernel's own file systems.
const FORBIDDEN: &[&str] = &["proc", "sys", "dev"];

fn err(code: ErrorCode, message: impl Into<String>) -> AgentError {
    AgentError { code, message: message.into() }
}

/// Mount the disk with SCSI serial `serial` at `path`, creating the directory. Read-only mounts
/// never write to the disk, not even to replay its journal. A fresh file system (its root owned
/// by root, holding at most `lost+found`) is given to `owner` first. Mounting the same volume
/// at the same place again is fine.
pub async fn mount(serial: &str, path: &str, readonly: bool, owner: Option<&str>) -> Result<(), AgentError> {
    let target = checked_path(path)?;
    if serial.is_empty() || serial.len() > MAX_SERIAL || !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(ErrorCode::BadRequest, format!("The disk serial {serial:?} is not valid.")));
    }
    let (serial, owner) = (serial.to_string(), owner.map(str::to_string));
    blocking(move || mount_blocking(&serial, &target, readonly, owner.as_deref())).await
}

/// Unmount the volume at `path`, after writing back what the guest has cached. Refused with
/// [`ErrorCode::Busy`], naming the processes, while anything still uses it. Nothing mounted
/// there is fine.
pub async fn unmount(path: &str) -> Result<(), AgentError> {
    let target = checked_path(path)?;
    blocking(move || unmount_blocking(&target)).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(err(ErrorCode::Internal, "The volume operation panicked.")))
}

/// A mount point from the host: absolute, without NUL or `..`, at most PATH_MAX bytes, and
/// neither `/` nor under /proc, /sys or /dev.
fn checked_path(path: &str) -> Result<PathBuf, AgentError> {
    let bad = |why: String| Err(err(ErrorCode::BadRequest, why));
    if !path.starts_with('/') {
        return bad(format!("The path {path:?} is not absolute; guest paths start with /."));
    }
    if path.contains('\0') {
        return bad("The path contains a NUL byte.".into());
    }
    if path.len() > MAX_PATH {
        return bad(format!("The path is {} bytes long; at most {MAX_PATH} are allowed.", path.len()));
    }
    let path = PathBuf::from(path);
    if path.components().any(|c| c == Component::ParentDir) {
        return bad(format!("The path {} contains `..`; give the directory itself.", path.display()));
    }
    allowed_mount_point(&path)?;
    Ok(path)
}

/// Refuse `/` and the kernel's file systems (checked again once symlinks are resolved).
fn allowed_mount_point(path: &Path) -> Result<(), AgentError> {
    let first = path.components().find_map(|c| match c {
        Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
        _ => None,
    });
    match first {
        None => Err(err(ErrorCode::BadRequest, "A volume cannot be mounted on /; choose a directory.")),
        Some(top) if FORBIDDEN.contains(&top.as_str()) => Err(err(
            ErrorCode::BadRequest,
            format!("A volume cannot be mounted at {} (/{top} belongs to the kernel).", path.display()),
        )),
        Some(_) => Ok(()),
    }
}

fn mount_blocking(serial: &str, target: &Path, readonly: bool, owner: Option<&str>) -> Result<(), AgentError> {
    // Before anything changes: a wrong owner fails the request without a mount left behind.
    let owner = crate::files::owner_ids(owner, Path::new("/etc"))?;
    modules::load_group(group::VOLUMES).map_err(|e| err(ErrorCode::Unsupported, format!("{e}.")))?;
    let sys = Path::new("/sys");
    let deadline = Instant::now() + DISK_WAIT;
    let mut disk = find_disk(sys, serial, DISK_WAIT)?;
    std::fs::create_dir_all(target)
        .map_err(|e| err(ErrorCode::BadRequest, format!("Cannot create the mount point {}: {e}.", target.display())))?;
    // The directory may be reached through symlinks: mount where they lead, and check that.
    let target = std::fs::canonicalize(target)
        .map_err(|e| err(ErrorCode::Internal, format!("Cannot resolve {}: {e}.", target.display())))?;
    allowed_mount_point(&target)?;
    let mounts = Mount::all()?;
    if let Some(top) = mounts.iter().rev().find(|m| m.point == target) {
        if top.dev == disk.dev {
            return if top.readonly == readonly {
                Ok(())
            } else {
                let how = if top.readonly { "read-only" } else { "read-write" };
                Err(err(ErrorCode::BadRequest, format!("The volume is already mounted {how} at {}.", target.display())))
            };
        }
    }
    if let Some(other) = mounts.iter().find(|m| m.dev == disk.dev) {
        return Err(err(
            ErrorCode::BadRequest,
            format!("The volume is already mounted at {}; unmount it there first.", other.point.display()),
        ));
    }
    // `noload`: a read-only disk cannot take the replay of a journal left dirty.
    let (flags, data) = if readonly { (MountFlags::RDONLY, "noload") } else { (MountFlags::empty(), "") };
    loop {
        let node = disk.node(Path::new("/dev"))?;
        match rustix::mount::mount(&node, &target, "ext4", flags, data) {
            Ok(()) => break,
            // A disk that has just appeared may not open for a moment.
            Err(Errno::NXIO | Errno::NODEV) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
                disk = find_disk(sys, serial, deadline.saturating_duration_since(Instant::now()))?;
            }
            Err(e) => {
                // The host unplugs a disk that did not mount; out of the guest first, in order.
                remove(sys, disk.dev);
                return Err(err(
                    ErrorCode::Internal,
                    format!(
                        "Mounting the volume ({}) at {} failed: {e}; it may not hold an ext4 file system, or it is \
                         damaged.",
                        node.display(),
                        target.display()
                    ),
                ));
            }
        }
    }
    if let (Some((uid, gid)), false) = (owner, readonly) {
        if let Err(e) = give_fresh_root(&target, uid, gid) {
            // The host unplugs the disk of a failed mount: it must not be mounted then.
            if rustix::mount::unmount(&target, UnmountFlags::empty()).is_ok() {
                remove(sys, disk.dev);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Hand the root of a just-made file system (root's, holding nothing but `lost+found`) to the
/// sandbox's user, so it can write there without sudo. A volume with content keeps its owners.
fn give_fresh_root(root: &Path, uid: u32, gid: u32) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let failed = |e: std::io::Error| err(ErrorCode::Internal, format!("Cannot read {}: {e}.", root.display()));
    let meta = std::fs::metadata(root).map_err(failed)?;
    if (meta.uid(), meta.gid()) != (0, 0) || (uid, gid) == (0, 0) {
        return Ok(());
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(failed)?.take(2) {
        names.push(entry.map_err(failed)?.file_name());
    }
    if !is_fresh(&names) {
        return Ok(());
    }
    std::os::unix::fs::chown(root, Some(uid), Some(gid)).map_err(|e| {
        err(ErrorCode::Internal, format!("Cannot give the volume at {} to uid {uid}: {e}.", root.display()))
    })
}

/// The entries of a fresh file system's root: none, or `lost+found` alone.
fn is_fresh(names: &[std::ffi::OsString]) -> bool {
    names.iter().all(|n| n == "lost+found") && names.len() <= 1
}

fn unmount_blocking(target: &Path) -> Result<(), AgentError> {
    let target = match std::fs::canonicalize(target) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(ErrorCode::Internal, format!("Cannot resolve {}: {e}.", target.display()))),
    };
    allowed_mount_point(&target)?;
    let mounts = Mount::all()?;
    let Some(top) = mounts.iter().rev().find(|m| m.point == target) else { return Ok(()) };
    let sys = Path::new("/sys");
    if !is_volume(sys, top.dev) {
        return Err(err(
            ErrorCode::BadRequest,
            format!("What is mounted at {} is not a volume; it is left alone.", target.display()),
        ));
    }
    rustix::fs::sync();
    match rustix::mount::unmount(&target, UnmountFlags::empty()) {
        Ok(()) => {
            // Unless it is mounted elsewhere too (only the agent mounts volumes, once each).
            if !Mount::all()?.iter().any(|m| m.dev == top.dev) {
                remove(sys, top.dev);
            }
            Ok(())
        }
        // Unmounted meanwhile.
        Err(Errno::INVAL | Errno::NOENT) => Ok(()),
        Err(Errno::BUSY) => Err(busy(&target, &mounts)),
        Err(e) => Err(err(ErrorCode::Internal, format!("Unmounting the volume at {} failed: {e}.", target.display()))),
    }
}

/// What keeps the volume at `target` busy, as the host shows it.
fn busy(target: &Path, mounts: &[Mount]) -> AgentError {
    let (holders, total) = holders::holders(Path::new("/proc"), target, holders::SHOWN);
    let under: Vec<String> = mounts
        .iter()
        .filter(|m| m.point != target && m.point.starts_with(target))
        .map(|m| m.point.display().to_string())
        .collect();
    err(ErrorCode::Busy, busy_message(target, &holders, total, &under))
}

fn busy_message(target: &Path, holders: &[holders::Holder], total: usize, under: &[String]) -> String {
    let at = target.display();
    let mut reasons = Vec::new();
    if total > 0 {
        let mut list = holders.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        if total > holders.len() {
            list.push_str(&format!(" and {} more", total - holders.len()));
        }
        let noun = if total == 1 { "process" } else { "processes" };
        reasons.push(format!("used by {noun} {list}"));
    }
    if !under.is_empty() {
        reasons.push(format!("has file systems mounted under it ({})", under.join(", ")));
    }
    if reasons.is_empty() {
        return format!(
            "The volume at {at} is still in use, though no process has anything open in it (a loop device or a \
             swap file on it may hold it). Release it, or stop the sandbox."
        );
    }
    format!(
        "The volume at {at} is {}. Stop them, or have them leave {at} (close their files, change directory), and \
         unmount again.",
        reasons.join(", and ")
    )
}

#[cfg(test)]
mod tests;
