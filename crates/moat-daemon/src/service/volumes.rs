//! Named volumes: sparse files `$MOAT_HOME/volumes/<id>.img` holding an ext4 file system, which
//! outlive the sandboxes that mount them. A volume's row is written before its file and deleted
//! before it, so a crash leaves either a row without a file (a create cut short: gc drops the
//! row) or a file without a row (a remove cut short: gc deletes the file once it is old enough
//! that no create can be making it). gc never deletes the file of a volume that has a row.

mod ext4;
mod making;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moat_api::{ErrorCode, VolumeInfo, VolumeUser};
use rustix::fs::{Mode, OFlags};

use super::Service;
use crate::error::ServiceError;
use crate::state::now_secs;

/// A file without a row, or a row without a file, younger than this may be a create or remove
/// in flight; gc leaves it alone.
const LEFTOVER_AGE: Duration = Duration::from_secs(600);
/// Length of a volume id (`moat_sandbox::new_id`).
const ID_LEN: usize = 12;

fn volume_not_found(reference: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::NotFound,
        format!("no volume {reference:?}"),
        "list volumes with `moat volume ls`; names, ids and unique id prefixes work",
    )
}

fn file_gone(v: &VolumeInfo, path: &Path) -> ServiceError {
    ServiceError::new(
        ErrorCode::Internal,
        format!("the file of volume {} ({}) is gone", v.name, path.display()),
        format!("its data is lost: remove it (`moat volume rm {}`) and create it again", v.name),
    )
}

fn io_failed(what: String, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(
        ErrorCode::Internal,
        format!("{what} failed: {e}"),
        "check the free space and permissions of the moat home; see the daemon log",
    )
}

/// The id in a file name of ours (`<id>.img`), or `None` for anything else.
fn file_id(name: &OsStr) -> Option<&str> {
    let id = name.to_str()?.strip_suffix(".img")?;
    (id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(id)
}

/// Whether `age` has passed since `secs` (Unix seconds).
fn older_than(secs: i64, age: Duration) -> bool {
    now_secs().saturating_sub(secs) >= age.as_secs() as i64
}

/// Open a volume's file, never following a link and never blocking on a FIFO put in its place;
/// it must be a regular file. `Ok(None)`: there is no file.
fn open_file(path: &Path, access: OFlags) -> Result<Option<std::fs::File>, ServiceError> {
    let flags = access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => std::fs::File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(io_failed(format!("opening {}", path.display()), e)),
    };
    let meta = file.metadata().map_err(|e| io_failed(format!("inspecting {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(ServiceError::new(
            ErrorCode::Internal,
            format!("{} is not a regular file", path.display()),
            "something other than moat replaced it; move it away and remove the volume",
        ));
    }
    // Blocking again: whoever reads the file (QEMU) expects ordinary reads.
    rustix::fs::fcntl_getfl(&file)
        .and_then(|flags| rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK))
        .map_err(|e| io_failed(format!("opening {}", path.display()), e))?;
    Ok(Some(file))
}

impl Service {
    pub(crate) fn volumes_root(&self) -> PathBuf {
        self.rt.config.volumes_dir()
    }

    pub(crate) fn volume_path(&self, id: &str) -> PathBuf {
        self.volumes_root().join(format!("{id}.img"))
    }

    /// The lock of volume `id`: a create, copy, remove or gc of it at a time.
    fn volume_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.volume_locks.of(id)
    }

    /// A volume's row, by name, id or unique id prefix.
    fn resolve_volume(&self, reference: &str) -> Result<VolumeInfo, ServiceError> {
        if reference.is_empty() || reference.len() > 128 {
            return Err(ServiceError::invalid("a volume reference must be 1-128 characters"));
        }
        let mut found = self.db(|db| db.volume_candidates(reference))?;
        match found.len() {
            0 => Err(volume_not_found(reference)),
            1 => Ok(found.remove(0)),
            n => Err(ServiceError::new(
                ErrorCode::AmbiguousRef,
                format!("{reference:?} matches {n} volumes"),
                "use more characters of the id, or the name",
            )),
        }
    }

    /// A row with what its file holds and who mounts it; `file` if it is open already.
    fn described(&self, mut v: VolumeInfo, file: Option<&std::fs::File>) -> Result<VolumeInfo, ServiceError> {
        let opened;
        let file = match file {
            Some(f) => Some(f),
            None => {
                opened = open_file(&self.volume_path(&v.id), OFlags::RDONLY).unwrap_or_else(|e| {
                    tracing::warn!(volume = %v.id, error = %e.message, "cannot read the volume's file");
                    None
                });
                opened.as_ref()
            }
        };
        if let Some(file) = file {
            v.allocated_bytes = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
            v.used_bytes = match ext4::read_superblock(file) {
                Ok(sb) => sb.used_bytes().map(|used| used.min(v.size_bytes)),
                Err(e) => {
                    tracing::debug!(volume = %v.id, error = %moat_hint::one_line(&e), "no readable file system");
                    None
                }
            };
        }
        v.users = self.volume_users(&v.id)?;
        Ok(v)
    }

    /// The sandboxes that mount volume `volume_id`, with whether each is live.
    pub(crate) fn volume_users(&self, volume_id: &str) -> Result<Vec<VolumeUser>, ServiceError> {
        // Mounts name volumes by name (resolved when the sandbox was made).
        let Some(volume) = self.db(|db| db.volume(volume_id))? else { return Ok(Vec::new()) };
        let sandboxes = self.db(|db| db.list())?;
        Ok(sandboxes
            .iter()
            .flat_map(|s| {
                s.mounts.iter().filter(|m| m.kind == moat_api::MountType::Volume && m.source == volume.name).map(|m| {
                    VolumeUser {
                        sandbox_id: s.id.clone(),
                        sandbox_name: s.name.clone(),
                        path: m.target.clone(),
                        readonly: m.readonly,
                        running: s.phase.is_live(),
                    }
                })
            })
            .collect())
    }

    /// `GET /v1/volumes/{ref}`: a volume by name, id or unique id prefix.
    pub fn volume(&self, reference: &str) -> Result<VolumeInfo, ServiceError> {
        let v = self.resolve_volume(reference)?;
        self.described(v, None)
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, ServiceError> {
        self.db(|db| db.volumes())?.into_iter().map(|v| self.described(v, None)).collect()
    }

    /// `moat volume rm NAME [--force]`: remove a volume and its data. Refused while sandboxes
    /// mount it, and with `force` still while a running one does.
    pub async fn remove_volume(&self, reference: &str, force: bool) -> Result<VolumeInfo, ServiceError> {
        let v = self.resolve_volume(reference)?;
        let lock = self.volume_lock(&v.id);
        let _guard = lock.lock().await;
        // Starts check a volume's users and plug it in under the claims lock: none can take it
        // between the check below and its removal.
        let _claims = self.volume_claims.lock().await;
        let v = self.db(|db| db.volume(&v.id))?.ok_or_else(|| volume_not_found(reference))?;
        let v = self.described(v, None)?;
        let names = |running: bool| -> Vec<&str> {
            v.users.iter().filter(|u| u.running || !running).map(|u| u.sandbox_name.as_str()).collect()
        };
        let running = names(true);
        if !running.is_empty() {
            return Err(ServiceError::new(
                ErrorCode::InUse,
                format!("volume {} is mounted in running sandboxes: {}", v.name, running.join(", ")),
                format!("stop them (`moat stop {0}`) or remove them (`moat rm -f {0}`) first", running.join(" ")),
            ));
        }
        let users = names(false);
        if !users.is_empty() && !force {
            return Err(ServiceError::new(
                ErrorCode::InUse,
                format!("volume {} is mounted by sandboxes: {}", v.name, users.join(", ")),
                format!(
                    "remove them first (`moat rm {}`), or remove the volume anyway with `moat volume rm --force {}` \
                     (they then do not start until its mount is gone)",
                    users.join(" "),
                    v.name
                ),
            ));
        }
        // The row goes first: a crash in between leaves a file without a row, which gc removes,
        // never a listed volume without its file.
        self.db(|db| db.delete_volume(&v.id, "removed"))?;
        let path = self.volume_path(&v.id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ServiceError::new(
                    ErrorCode::Internal,
                    format!("removing {} failed: {e}", path.display()),
                    "the volume is gone from moat; remove the file by hand, or let `moat gc` do it later",
                ))
            }
            _ => {}
        }
        self.volume_locks.forget(&v.id);
        Ok(v)
    }

    /// A volume's file opened for a sandbox to use: read-write, or read-only. Never follows a
    /// link in place of the file. The caller holds `volume_claims` from its check of the
    /// volume's users until the file is handed over, as [`Service::remove_volume`] does.
    pub(crate) fn open_volume(
        &self,
        reference: &str,
        readonly: bool,
    ) -> Result<(VolumeInfo, std::fs::File), ServiceError> {
        let v = self.resolve_volume(reference)?;
        let path = self.volume_path(&v.id);
        let access = if readonly { OFlags::RDONLY } else { OFlags::RDWR };
        let file = open_file(&path, access)?.ok_or_else(|| file_gone(&v, &path))?;
        Ok((self.described(v, Some(&file))?, file))
    }

    /// Reconcile volume rows with their files after a crash: drop rows whose file is gone and
    /// remove files of ours without a row, each only when it is old enough and not locked by a
    /// create or remove in flight. Returns the paths reconciled; failures are logged.
    pub(crate) fn volume_gc(&self) -> Vec<String> {
        self.reconcile_volumes(LEFTOVER_AGE).unwrap_or_else(|e| {
            tracing::warn!(error = %e.message, "gc: reconciling volumes failed");
            Vec::new()
        })
    }

    /// [`Service::volume_gc`], judging leftovers younger than `age` to be in flight.
    fn reconcile_volumes(&self, age: Duration) -> Result<Vec<String>, ServiceError> {
        let mut reconciled = Vec::new();
        let root = self.volumes_root();
        // Without the directory nothing is judged: a home whose volumes are not there (yet)
        // must not lose its rows.
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(reconciled),
            Err(e) => return Err(io_failed(format!("listing {}", root.display()), e)),
        };
        let rows = self.db(|db| db.volumes())?;
        for v in &rows {
            let path = self.volume_path(&v.id);
            let gone = matches!(path.symlink_metadata(), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if !gone || !older_than(v.created_at, age) {
                continue;
            }
            let lock = self.volume_lock(&v.id);
            let Ok(_guard) = lock.try_lock() else { continue };
            if self.db(|db| db.delete_volume(&v.id, "dropped by gc: its file is gone"))? {
                tracing::warn!(volume = %v.id, name = %v.name, path = %path.display(), "gc: dropped a volume's record \
                    whose file is gone");
                reconciled.push(path.display().to_string());
            }
            self.volume_locks.forget(&v.id);
        }
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = file_id(&name) else { continue };
            if rows.iter().any(|v| v.id == id) {
                continue;
            }
            let path = entry.path();
            let Ok(meta) = path.symlink_metadata() else { continue };
            // Neither its contents nor its metadata changed for `age`.
            if !meta.file_type().is_file() || !older_than(meta.mtime().max(meta.ctime()), age) {
                continue;
            }
            let lock = self.volume_lock(id);
            let Ok(_guard) = lock.try_lock() else { continue };
            // Read again: a row written since the list was read makes it a volume.
            if self.db(|db| db.volume(id))?.is_some() {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(path = %path.display(), "gc: removed a volume file without a record");
                reconciled.push(path.display().to_string());
            }
            self.volume_locks.forget(id);
        }
        Ok(reconciled)
    }
}

#[cfg(test)]
mod tests;
