//! Making volumes: new and empty (`create_volume`), or a copy of another (`copy_volume`, for
//! forks). Either way the row comes first and a [`Making`] guard undoes it, and the file, unless
//! the volume is finished, whether the step failed or the caller went away.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use moat_api::{CreateVolume, ErrorCode, VolumeInfo};
use rustix::fs::{Mode, OFlags};

use super::{ext4, file_gone, io_failed, open_file, volume_not_found};
use crate::error::ServiceError;
use crate::service::{BusyGuard, Service};
use crate::state::now_secs;

/// A volume whose row is written and whose file is not finished.
struct Making<'a> {
    svc: &'a Service,
    id: String,
    path: PathBuf,
    /// The file at `path` is this volume's (an existing one is never removed).
    file_ours: bool,
    finished: bool,
    /// What the event of an unfinished volume says.
    why: String,
    _busy: BusyGuard,
}

impl Making<'_> {
    fn finished(mut self) {
        self.finished = true;
    }

    fn failed(&mut self, e: ServiceError) -> ServiceError {
        self.why = format!("could not be made: {}", e.message);
        e
    }

    /// The new file, empty, only the daemon's.
    fn create_file(&mut self) -> Result<std::fs::File, ServiceError> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::open(&self.path, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => {
                self.file_ours = true;
                Ok(std::fs::File::from(fd))
            }
            Err(rustix::io::Errno::EXIST) => Err(self.failed(ServiceError::new(
                ErrorCode::Internal,
                format!("{} exists already", self.path.display()),
                "try again: the new volume gets another id",
            ))),
            Err(e) => Err(self.failed(io_failed(format!("creating {}", self.path.display()), e))),
        }
    }
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.file_ours {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Err(e) = self.svc.db(|db| db.delete_volume(&self.id, &self.why)) {
            // The file is gone: gc drops the row later.
            tracing::warn!(volume = %self.id, error = %e.message, "removing the row of an unfinished volume failed");
        }
    }
}

fn name_taken(name: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::NameTaken,
        format!("a volume named {name:?} already exists"),
        format!("choose another name, or remove the old volume and its data with `moat volume rm {name}`"),
    )
}

fn invalid_name(e: String) -> ServiceError {
    ServiceError::new(ErrorCode::InvalidRequest, e, "name it like a sandbox, e.g. `moat volume create data`")
}

impl Service {
    /// Record volume `v` (its lock held by the caller): the guard that finishes or undoes it.
    fn begin_volume(&self, v: &VolumeInfo) -> Result<Making<'_>, ServiceError> {
        let busy = self.hold();
        moat_sandbox::create_private_dir(&self.volumes_root())?;
        if !self.db(|db| db.insert_volume(v))? {
            return Err(name_taken(&v.name));
        }
        Ok(Making {
            svc: self,
            id: v.id.clone(),
            path: self.volume_path(&v.id),
            file_ours: false,
            finished: false,
            why: "was cut short".into(),
            _busy: busy,
        })
    }

    /// `moat volume create NAME [--size S]`: a sparse file of the size with an empty ext4 file
    /// system, its top directory root's.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeInfo, ServiceError> {
        moat_api::validate_volume_name(&req.name).map_err(invalid_name)?;
        let size = req.checked_size().map_err(|e| {
            ServiceError::new(
                ErrorCode::InvalidRequest,
                e,
                "give a size from 16 MiB to 16 TiB, e.g. `--size 10G` (`size_bytes` in the API); the file is sparse \
                 and takes only what is written",
            )
        })?;
        let v = new_volume(req.name, size);
        let lock = self.volume_lock(&v.id);
        let _guard = lock.lock().await;
        let mut making = self.begin_volume(&v)?;
        let file = making.create_file()?;
        match file.set_len(v.size_bytes) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error()) => {
                return Err(making.failed(ServiceError::new(
                    ErrorCode::InvalidRequest,
                    format!("the file system of the moat home cannot hold a file of {} bytes", v.size_bytes),
                    "give a smaller size (ext4 holds files up to 16 TiB less 4 KiB)",
                )))
            }
            Err(e) => return Err(making.failed(io_failed(format!("sizing {}", making.path.display()), e))),
            Ok(()) => {}
        }
        drop(file);
        if let Err(e) = ext4::make_file_system(&making.path, ext4::label(&v.name)).await {
            let hint = match e {
                ext4::MkfsError::Missing => {
                    "install e2fsprogs (`sudo apt-get install e2fsprogs`, or `sudo moat setup`)"
                }
                _ => "check the free space of the moat home; see the daemon log",
            };
            let message = format!("making the volume's file system failed: {e}");
            return Err(making.failed(ServiceError::new(ErrorCode::Internal, message, hint)));
        }
        making.finished();
        tracing::info!(volume = %v.id, name = %v.name, size = v.size_bytes, "volume created");
        self.described(v, None)
    }

    /// A new volume `to` holding what volume `from` holds now (a fork's own copy). The caller
    /// keeps `from` still meanwhile (no sandbox has it plugged in). Copied by reflink where the
    /// home's file system can, else range by range, keeping holes; the file system keeps its
    /// label and UUID.
    pub(crate) async fn copy_volume(&self, from: &str, to: &str) -> Result<VolumeInfo, ServiceError> {
        moat_api::validate_volume_name(to).map_err(invalid_name)?;
        let source = self.resolve_volume(from)?;
        let source_lock = self.volume_lock(&source.id);
        let _source_guard = source_lock.lock().await;
        // A remove may have finished while the lock was awaited.
        let source = self.db(|db| db.volume(&source.id))?.ok_or_else(|| volume_not_found(from))?;
        let v = new_volume(to.to_string(), source.size_bytes);
        let lock = self.volume_lock(&v.id);
        let _guard = lock.lock().await;
        let source_path = self.volume_path(&source.id);
        let src = open_file(&source_path, OFlags::RDONLY)?.ok_or_else(|| file_gone(&source, &source_path))?;
        let mut making = self.begin_volume(&v)?;
        let dst = making.create_file()?;
        let path = making.path.clone();
        let copied = tokio::task::spawn_blocking(move || copy_sparse(&src, &dst, &path))
            .await
            .map_err(|e| ServiceError::internal(format!("copying volume {} failed: {e}", source.name)))
            .and_then(|r| r.map_err(|e| io_failed(format!("copying volume {} to {to}", source.name), e)));
        if let Err(e) = copied {
            return Err(making.failed(e));
        }
        making.finished();
        self.db(|db| db.event(None, "volume", &format!("volume {to} ({}) copied from {}", v.id, source.name)))?;
        self.described(v, None)
    }
}

fn new_volume(name: String, size_bytes: u64) -> VolumeInfo {
    VolumeInfo {
        id: moat_sandbox::new_id(),
        name,
        size_bytes,
        used_bytes: None,
        allocated_bytes: 0,
        created_at: now_secs(),
        users: Vec::new(),
    }
}

/// Copy `src` into the empty `dst` (at `path`), sparse: a reflink if the file system shares
/// blocks, else each range of data, with the holes between left holes; then to the disk.
fn copy_sparse(src: &std::fs::File, dst: &std::fs::File, path: &Path) -> std::io::Result<()> {
    let len = src.metadata()?.len();
    if rustix::fs::ioctl_ficlone(dst, src).is_err() {
        dst.set_len(len)?;
        let mut at = 0u64;
        while at < len {
            let start = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(at as i64)) {
                Ok(start) => start,
                // Only a hole is left.
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let end = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(start as i64))?.min(len);
            copy_range(src.as_fd(), dst.as_fd(), start, end)?;
            at = end;
        }
    }
    dst.sync_all().map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// Copy bytes `start..end` of `src` to the same place in `dst`, in the kernel.
fn copy_range(src: std::os::fd::BorrowedFd, dst: std::os::fd::BorrowedFd, start: u64, end: u64) -> std::io::Result<()> {
    let (mut from, mut to) = (start, start);
    while from < end {
        let chunk = (end - from).min(1 << 30) as usize;
        if rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), chunk)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the volume shrank while copied"));
        }
    }
    Ok(())
}
