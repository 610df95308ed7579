//! Snapshots, reverts, forks, pause and resume, and templates: the service operations on saved
//! machines. A snapshot's files live in `$MOAT_HOME/snapshots/<id>/` and its row in the state
//! database is written before them and marked ready after them, so a crash leaves either a
//! complete snapshot or something gc removes.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use moat_api::{CloneTimeline, CreateSandbox, ErrorCode, Fork, Forked, Phase, SandboxInfo, SnapshotInfo, SnapshotKind};
use moat_sandbox::{Fingerprint, SandboxSpec};
use sha2::Digest;

use super::{Launch, Service};
use crate::error::{not_found, ServiceError};
use crate::state::now_secs;

/// At most this many sandboxes per fork request.
const MAX_FORKS: u32 = 64;
/// Forks restored at the same time.
const FORK_PARALLELISM: usize = 4;

/// Counts a snapshot being written while it lives (gc leaves such work alone).
pub(super) struct Saving(Arc<std::sync::atomic::AtomicUsize>);

impl Saving {
    pub(super) fn new(svc: &Service) -> Saving {
        svc.saving.fetch_add(1, Ordering::SeqCst);
        Saving(svc.saving.clone())
    }
}

impl Drop for Saving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn in_use(what: &str, dependents: &[String]) -> ServiceError {
    ServiceError::new(
        ErrorCode::InUse,
        format!("{what} is in use: the disks of {} build on it", dependents.join(", ")),
        format!("remove those sandboxes first (`moat rm -f {}`)", dependents.join(" ")),
    )
}

fn snapshot_not_found(reference: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::NotFound,
        format!("no snapshot {reference:?}"),
        "list snapshots with `moat snapshot ls`; refer to one as SANDBOX:NAME or by its id",
    )
}

/// `SANDBOX:NAME` of a snapshot, or its id for templates.
fn label(s: &SnapshotInfo) -> String {
    match s.kind {
        SnapshotKind::Snapshot => s.reference(),
        SnapshotKind::Template => format!("template {} of image {}", s.id, s.image),
    }
}

/// What a snapshot was saved with.
fn fingerprint(s: &SnapshotInfo) -> Fingerprint {
    Fingerprint {
        qemu: s.qemu.clone(),
        accel: s.accel.clone(),
        kernel: s.kernel.clone(),
        initramfs: s.initramfs.clone(),
    }
}

/// Bytes a directory's files take on disk (sparse files count what they hold).
pub(super) fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

impl Service {
    pub(crate) fn snapshots_root(&self) -> PathBuf {
        self.rt.config.snapshots_dir()
    }

    pub(crate) fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_root().join(id)
    }

    /// Resolve a snapshot reference: `SANDBOX:NAME`, an id or a unique id prefix.
    pub fn resolve_snapshot(&self, reference: &str) -> Result<SnapshotInfo, ServiceError> {
        if reference.is_empty() || reference.len() > 255 {
            return Err(ServiceError::invalid("a snapshot reference must be 1-255 characters"));
        }
        let mut found = self.db(|db| db.snapshot_candidates(reference))?;
        match found.len() {
            0 => Err(snapshot_not_found(reference)),
            1 => Ok(found.remove(0)),
            n => Err(ServiceError::new(
                ErrorCode::AmbiguousRef,
                format!("{reference:?} matches {n} snapshots"),
                "use more characters of the id, or SANDBOX:NAME",
            )),
        }
    }

    /// A snapshot of sandbox `info`: by name among its snapshots, or any reference that names one
    /// of its snapshots.
    fn own_snapshot(&self, info: &SandboxInfo, reference: &str) -> Result<SnapshotInfo, ServiceError> {
        let qualified =
            if reference.contains(':') { reference.to_string() } else { format!("{}:{reference}", info.id) };
        let snapshot = self.resolve_snapshot(&qualified).or_else(|_| self.resolve_snapshot(reference))?;
        if snapshot.sandbox_id.as_deref() != Some(info.id.as_str()) {
            return Err(ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("{} is not a snapshot of sandbox {}", label(&snapshot), info.name),
                "a sandbox reverts to its own snapshots; start a new sandbox from another with `moat run --from`",
            ));
        }
        Ok(snapshot)
    }

    /// Refuse a snapshot this host cannot restore, saying why.
    fn check_restorable(&self, s: &SnapshotInfo) -> Result<(), ServiceError> {
        let saved = fingerprint(s);
        match saved.mismatch(&Fingerprint::of(&self.rt)) {
            None => Ok(()),
            Some(why) => Err(ServiceError::new(
                ErrorCode::Incompatible,
                format!("snapshot {} cannot be restored on this host: {why}", label(s)),
                "saved VMs do not carry across QEMU, accelerator, kernel or agent changes; boot a sandbox \
                 (`moat run --image IMAGE`) and take a new snapshot",
            )),
        }
    }

    /// The snapshot a create request continues from, checked against the request.
    pub(crate) fn snapshot_for_create(&self, from: &str, req: &CreateSandbox) -> Result<SnapshotInfo, ServiceError> {
        let s = self.resolve_snapshot(from)?;
        let clash = |what: &str, asked: String, has: String| {
            ServiceError::invalid(format!(
                "--from {from} brings its own machine ({what} {has}); it cannot be started with {what} {asked}"
            ))
        };
        if let Some(image) = req.image.as_ref().filter(|i| **i != s.image) {
            return Err(clash("image", image.clone(), s.image.clone()));
        }
        if let Some(v) = req.vcpus.filter(|v| *v != s.vcpus) {
            return Err(clash("vCPUs", v.to_string(), s.vcpus.to_string()));
        }
        if let Some(m) = req.memory_mib.filter(|m| *m != s.memory_mib) {
            return Err(clash("memory (MiB)", m.to_string(), s.memory_mib.to_string()));
        }
        if let Some(d) = req.disk_mib.filter(|d| *d != s.disk_mib) {
            return Err(clash("disk (MiB)", d.to_string(), s.disk_mib.to_string()));
        }
        self.check_restorable(&s)?;
        Ok(s)
    }

    /// A new snapshot row for `info`'s machine (not ready yet).
    fn new_snapshot(&self, info: &SandboxInfo, name: String, kind: SnapshotKind) -> SnapshotInfo {
        let f = Fingerprint::of(&self.rt);
        SnapshotInfo {
            id: moat_sandbox::new_id(),
            name,
            kind,
            sandbox_id: (kind == SnapshotKind::Snapshot).then(|| info.id.clone()),
            sandbox_name: if kind == SnapshotKind::Snapshot { info.name.clone() } else { info.image.clone() },
            image: info.image.clone(),
            image_digest: info.image_digest.clone(),
            vcpus: info.vcpus,
            memory_mib: info.memory_mib,
            disk_mib: info.disk_mib,
            size_bytes: 0,
            created_at: now_secs(),
            qemu: f.qemu,
            accel: f.accel,
            kernel: f.kernel,
            initramfs: f.initramfs,
            nic: info.net.mode != moat_api::NetMode::None,
            host_mounts: match kind {
                SnapshotKind::Snapshot => {
                    info.mounts.iter().filter(|m| m.kind == moat_api::MountType::Host).cloned().collect()
                }
                SnapshotKind::Template => Vec::new(),
            },
            dependents: Vec::new(),
            remote: None,
            remote_digest: None,
        }
    }

    /// Save the running sandbox `id` (its operation lock held) as `snapshot`. Its volumes are
    /// unplugged meanwhile; `copies` (volume, new volume) are made of them then, whole and still.
    async fn save(
        &self,
        id: &str,
        snapshot: SnapshotInfo,
        key: Option<&str>,
        copies: &[(String, String)],
    ) -> Result<SnapshotInfo, ServiceError> {
        let sandbox = self.live(id).ok_or_else(|| {
            ServiceError::new(
                ErrorCode::InvalidPhase,
                format!("sandbox {} has no running VM", snapshot.sandbox_name),
                "start it with `moat start`",
            )
        })?;
        let _saving = Saving::new(self);
        let info = self.db(|db| db.get(id))?.ok_or_else(|| not_found(id))?;
        let guest = sandbox.clone().guest();
        let unplugged = match &guest {
            Some(guest) => self.unplug_volumes(&info, guest).await?,
            None => Vec::new(),
        };
        let mut saved = self.save_unplugged(&sandbox, &snapshot, key).await;
        if saved.is_ok() {
            for (from, to) in copies {
                if let Err(e) = self.copy_volume(from, to).await {
                    saved = Err(e);
                    break;
                }
            }
        }
        if let Some(guest) = &guest {
            if let Err(e) = self.replug_volumes(&info, guest, &unplugged).await {
                tracing::warn!(sandbox = %id, error = %e.message, "plugging volumes in again after a save failed");
            }
        }
        saved
    }

    /// [`Service::save`] once the volumes are out.
    async fn save_unplugged(
        &self,
        sandbox: &Arc<dyn crate::launcher::Machine>,
        snapshot: &SnapshotInfo,
        key: Option<&str>,
    ) -> Result<SnapshotInfo, ServiceError> {
        let snapshot = snapshot.clone();
        self.db(|db| db.insert_snapshot(&snapshot, key))?;
        let dir = self.snapshot_dir(&snapshot.id);
        let saved = match std::fs::create_dir_all(&dir) {
            Ok(()) => sandbox.snapshot(&self.rt, &dir).await.map_err(ServiceError::from),
            Err(e) => Err(ServiceError::new(
                ErrorCode::Internal,
                format!("creating {} failed: {e}", dir.display()),
                "check the free space and permissions of the moat home",
            )),
        };
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&dir);
            self.db(|db| db.delete_snapshot(&snapshot.id))?;
            return Err(ServiceError::new(ErrorCode::Internal, format!("the snapshot failed: {}", e.message), e.hint));
        }
        let size = disk_usage(&dir);
        self.db(|db| db.snapshot_ready(&snapshot.id, size))?;
        Ok(SnapshotInfo { size_bytes: size, ..snapshot })
    }

    /// `moat snapshot BOX [--name N]`: save a running sandbox's memory, devices and disk; it runs
    /// on after a short pause.
    pub async fn snapshot(&self, reference: &str, name: Option<String>) -> Result<SnapshotInfo, ServiceError> {
        self.snapshot_copying(reference, name, &[]).await
    }

    /// [`Service::snapshot`], copying volumes (volume, new volume) while they are unplugged.
    async fn snapshot_copying(
        &self,
        reference: &str,
        name: Option<String>,
        copies: &[(String, String)],
    ) -> Result<SnapshotInfo, ServiceError> {
        if let Some(n) = &name {
            moat_api::validate_name(n)
                .map_err(|e| ServiceError::invalid(e.replacen("sandbox name", "snapshot name", 1)))?;
        }
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let info = self.db(|db| db.get(&info.id))?.ok_or_else(|| not_found(reference))?;
        if info.phase != Phase::Running {
            return Err(ServiceError::phase(&info, "running", "start it with `moat start`, then snapshot it"));
        }
        let existing: Vec<String> = self.db(|db| db.snapshots(Some(&info.id)))?.into_iter().map(|s| s.name).collect();
        let name = match name {
            Some(n) if existing.contains(&n) => {
                return Err(ServiceError::new(
                    ErrorCode::NameTaken,
                    format!("sandbox {} already has a snapshot named {n:?}", info.name),
                    "choose another name, or remove the old one with `moat snapshot rm`",
                ))
            }
            Some(n) => n,
            None => (1..).map(|i| format!("snap-{i}")).find(|n| !existing.contains(n)).expect("names run out never"),
        };
        let snapshot = self.new_snapshot(&info, name, SnapshotKind::Snapshot);
        self.save(&info.id, snapshot, None, copies).await
    }

    /// Ready snapshots: of one sandbox, or every snapshot and template.
    pub fn snapshots(&self, reference: Option<&str>) -> Result<Vec<SnapshotInfo>, ServiceError> {
        match reference {
            Some(r) => {
                let info = self.resolve(r)?;
                self.db(|db| db.snapshots(Some(&info.id)))
            }
            None => self.db(|db| db.snapshots(None)),
        }
    }

    /// Remove a snapshot (or template) nothing builds on.
    pub async fn remove_snapshot(&self, reference: &str) -> Result<SnapshotInfo, ServiceError> {
        let s = self.resolve_snapshot(reference)?;
        if !s.dependents.is_empty() {
            return Err(in_use(&format!("snapshot {}", label(&s)), &s.dependents));
        }
        // The row goes first: a crash in between leaves files without a row, which gc removes,
        // never a listed snapshot without its files.
        self.db(|db| {
            db.delete_snapshot(&s.id)?;
            db.event(s.sandbox_id.as_deref(), "snapshot", &format!("snapshot {} removed", label(&s)))
        })?;
        self.delete_snapshot_files(&s.id)?;
        Ok(s)
    }

    fn delete_snapshot_files(&self, id: &str) -> Result<(), ServiceError> {
        let dir = self.snapshot_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ServiceError::new(
                ErrorCode::Internal,
                format!("removing {} failed: {e}", dir.display()),
                "remove the directory by hand, then run `moat gc`",
            )),
            _ => Ok(()),
        }
    }

    /// A sandbox is being removed: its snapshots that nothing else builds on go with it, the
    /// others stay, known as `NAME:SNAPSHOT` under the removed sandbox's name.
    pub(crate) fn release_snapshots(&self, sandbox_id: &str) -> Result<(), ServiceError> {
        for s in self.db(|db| db.snapshots(Some(sandbox_id)))? {
            let others: Vec<&String> = s.dependents.iter().filter(|d| **d != s.sandbox_name).collect();
            if others.is_empty() {
                self.db(|db| db.delete_snapshot(&s.id))?;
                self.delete_snapshot_files(&s.id)?;
            }
        }
        self.db(|db| {
            db.set_snapshot(sandbox_id, None)?;
            db.orphan_snapshots(sandbox_id)
        })
    }

    /// `moat revert BOX SNAP`: throw away the sandbox's current VM and disk and continue from its
    /// snapshot.
    pub async fn revert(self: &Arc<Self>, reference: &str, snapshot: &str) -> Result<SandboxInfo, ServiceError> {
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let info = self.db(|db| db.get(&info.id))?.ok_or_else(|| not_found(reference))?;
        let s = self.own_snapshot(&info, snapshot)?;
        self.check_restorable(&s)?;
        // A sandbox at rest must fit the host again; a running one hands its own memory over.
        let _admitted = match info.phase {
            p if p.is_at_rest() => self.admit_start(&info)?,
            _ => self.keep_counted(&info.id),
        };
        match info.phase {
            Phase::Running | Phase::Booting => {
                self.stop_locked(&info.id, Phase::Stopped).await?;
            }
            p if p.is_at_rest() => {}
            _ => return Err(ServiceError::phase(&info, "running or at rest", "wait for the operation in flight")),
        }
        if info.expires_at.is_some_and(|t| t <= now_secs()) {
            // As for `start`: an expired lease does not stop the sandbox again at once.
            self.db(|db| db.set_expiry(&info.id, None))?;
        }
        // A paused sandbox's saved VM is replaced by the snapshot's.
        for f in [moat_sandbox::STATE_FILE, moat_sandbox::MEM_FILE] {
            let _ = std::fs::remove_file(self.run_dir(&info.id).join(f));
        }
        let info = self.db(|db| db.get(&info.id))?.ok_or_else(|| not_found(reference))?;
        let spec = self.spec_of(&info)?;
        let launch = self.launch(&info, &spec, Launch::Snapshot(&s.id));
        let reverted = self.metrics.launch(crate::metrics::LaunchKind::Revert, launch).await?;
        self.db(|db| db.event(Some(&info.id), "revert", &format!("{} reverted to {}", info.name, label(&s))))?;
        Ok(reverted)
    }

    /// `moat fork BOX -n N`: N new sandboxes that continue from a snapshot of BOX (a new one of
    /// its current state unless one is named), each with its own identity.
    pub async fn fork(self: &Arc<Self>, reference: &str, req: Fork) -> Result<Forked, ServiceError> {
        let count = req.count.unwrap_or(1);
        if count == 0 || count > MAX_FORKS {
            return Err(ServiceError::invalid(format!("{count} forks is out of range; use 1 to {MAX_FORKS}")));
        }
        let info = self.resolve(reference)?;
        let names = self.fork_names(req.name_prefix.as_deref().unwrap_or(&format!("{}-fork-", info.name)), count)?;
        // Forks keep the source's network, secrets included (each fork gets a file of its own),
        // but not its host ports. Read first: a source whose values are lost makes no snapshot.
        let mut net = self.db(|db| db.net_spec(&info.id))?;
        self.fill_secrets(&info, &mut net)?;
        net.ports.clear();
        // All of them must fit before the source is saved; each create checks itself again.
        self.db(|db| Ok(self.admit(db, &super::admission::Ask::forks(count, info.memory_mib, info.disk_mib))))??;
        let (fork_mounts, copies) = self.fork_volumes(&info, &names, req.volumes.unwrap_or_default())?;
        let snapshot = match &req.snapshot {
            Some(s) => {
                let s = self.own_snapshot(&info, s)?;
                self.check_restorable(&s)?;
                if !copies.is_empty() {
                    return Err(ServiceError::invalid(
                        "--volumes copy copies the volumes as they are now, so it forks from the current state;                          leave --snapshot out",
                    ));
                }
                s
            }
            None => {
                let saving = std::time::Instant::now();
                let s =
                    self.snapshot_copying(&info.id, Some(format!("fork-{}", crate::state::now_ms())), &copies).await?;
                tracing::info!(sandbox = %info.id, snapshot = %s.id, elapsed = ?saving.elapsed(), "fork: source saved");
                s
            }
        };
        let reqs = names
            .into_iter()
            .zip(fork_mounts)
            .map(|(name, mounts)| CreateSandbox {
                name: Some(name),
                from: Some(snapshot.id.clone()),
                net: Some(net.clone()),
                labels: info.labels.clone(),
                env: info.env.clone(),
                mounts,
                ..Default::default()
            })
            .collect();
        let forked = self.clones(&snapshot, reqs).await;
        if forked.is_err() {
            for (_, copy) in &copies {
                let _ = self.remove_volume(copy, true).await;
            }
        }
        forked
    }

    /// `moat fork --snapshot SNAPSHOT -n N`: N new sandboxes from a snapshot of no particular
    /// sandbox (a pulled one, say; a registry reference is pulled unless it is here already).
    pub async fn fork_snapshot(self: &Arc<Self>, reference: &str, req: Fork) -> Result<Forked, ServiceError> {
        let count = req.count.unwrap_or(1);
        if count == 0 || count > MAX_FORKS {
            return Err(ServiceError::invalid(format!("{count} forks is out of range; use 1 to {MAX_FORKS}")));
        }
        if req.snapshot.is_some() || req.volumes.is_some_and(|v| v != moat_api::ForkVolumes::Refuse) {
            return Err(ServiceError::invalid(
                "a fork of a snapshot takes the snapshot from the path and copies no volumes; leave `snapshot` and \
                 `volumes` out",
            ));
        }
        let snapshot = if moat_api::is_remote_snapshot(reference) {
            self.remote_snapshot(reference, None).await?
        } else {
            self.resolve_snapshot(reference)?
        };
        self.check_restorable(&snapshot)?;
        let names = self.fork_names(req.name_prefix.as_deref().unwrap_or(&format!("{}-", snapshot.name)), count)?;
        self.db(
            |db| Ok(self.admit(db, &super::admission::Ask::forks(count, snapshot.memory_mib, snapshot.disk_mib))),
        )??;
        let reqs = names
            .into_iter()
            .map(|name| CreateSandbox { name: Some(name), from: Some(snapshot.id.clone()), ..Default::default() })
            .collect();
        self.clones(&snapshot, reqs).await
    }

    /// `PREFIX1` … `PREFIXcount`, checked to be valid and free.
    fn fork_names(&self, prefix: &str, count: u32) -> Result<Vec<String>, ServiceError> {
        let names: Vec<String> = (1..=count).map(|i| format!("{prefix}{i}")).collect();
        for n in &names {
            moat_api::validate_name(n).map_err(|e| ServiceError::invalid(format!("--name-prefix {prefix:?}: {e}")))?;
        }
        let taken: Vec<&String> = names.iter().filter(|n| self.resolve(n).is_ok()).collect();
        if !taken.is_empty() {
            return Err(ServiceError::new(
                ErrorCode::NameTaken,
                format!(
                    "sandboxes named {} already exist",
                    taken.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
                "choose another --name-prefix, or remove them",
            ));
        }
        Ok(names)
    }

    /// Create the sandboxes of `reqs` from `snapshot`, a few at a time; all or nothing.
    async fn clones(
        self: &Arc<Self>,
        snapshot: &SnapshotInfo,
        reqs: Vec<CreateSandbox>,
    ) -> Result<Forked, ServiceError> {
        let results: Vec<Result<(SandboxInfo, std::time::Duration), ServiceError>> = futures_util::stream::iter(reqs)
            .map(|req| {
                let this = self.clone();
                async move {
                    let t = std::time::Instant::now();
                    this.create(req).await.map(|info| (info, t.elapsed()))
                }
            })
            .buffered(FORK_PARALLELISM)
            .collect()
            .await;
        let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        let (sandboxes, took): (Vec<SandboxInfo>, Vec<std::time::Duration>) = ok.into_iter().flatten().unzip();
        if let Some(Err(e)) = failed.into_iter().next() {
            // All or nothing: a partial fork is harder to use than none.
            for s in &sandboxes {
                let _ = self.remove(&s.id, true).await;
            }
            return Err(e);
        }
        let snapshot = self.resolve_snapshot(&snapshot.id)?;
        let timeline = sandboxes.iter().zip(took).map(|(s, total)| self.clone_timeline(s, total)).collect();
        Ok(Forked { snapshot, sandboxes, timeline })
    }

    /// The steps of a fork's start, as its sandbox recorded them (zeros for a test double).
    fn clone_timeline(&self, info: &SandboxInfo, total: std::time::Duration) -> CloneTimeline {
        let steps = self.live(&info.id).and_then(|m| m.guest()).map(|s| s.timeline).unwrap_or_default();
        let ms = |d: std::time::Duration| d.as_millis().try_into().unwrap_or(u64::MAX);
        CloneTimeline {
            name: info.name.clone(),
            prepare_ms: ms(steps.prepare),
            qemu_start_ms: ms(steps.qemu_start),
            state_load_ms: ms(steps.state_load),
            agent_ms: ms(steps.agent),
            total_ms: ms(total),
        }
    }

    /// `moat pause BOX`: save the whole VM to disk and end QEMU; `resume` continues it.
    pub async fn pause(&self, reference: &str) -> Result<SandboxInfo, ServiceError> {
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let (info, sandbox) = self.running(&info.id)?;
        let _saving = Saving::new(self);
        // A paused machine holds no volume: resume plugs them in again.
        let unplugged = self.unplug_volumes(&info, &sandbox).await?;
        self.db(|db| db.set_phase(&info.id, Phase::Stopping, None))?;
        // Out of the live set first, so the exit watcher does not take the end of QEMU for a crash.
        self.forget_live(&info.id);
        match sandbox.suspend(&self.rt).await {
            Ok(()) => {
                self.host_servers.stop(&info.id);
                self.db(|db| {
                    db.set_pid(&info.id, None)?;
                    db.set_phase(&info.id, Phase::Paused, None)
                })
            }
            Err(e) if sandbox.is_running().await => {
                let e = moat_hint::one_line(&e);
                if let Err(e) = self.replug_volumes(&info, &sandbox, &unplugged).await {
                    tracing::warn!(sandbox = %info.id, error = %e.message, "plugging volumes in again failed");
                }
                self.put_live(sandbox);
                self.db(|db| db.set_phase(&info.id, Phase::Running, Some(&format!("pausing failed: {e}"))))?;
                Err(ServiceError::new(
                    ErrorCode::Internal,
                    format!("pausing failed: {e}"),
                    "the sandbox runs on; see the daemon log",
                ))
            }
            Err(e) => {
                let err = ServiceError::from(e);
                self.db(|db| {
                    db.set_pid(&info.id, None)?;
                    db.set_phase(&info.id, Phase::Failed, Some(&err.message))
                })?;
                Err(err)
            }
        }
    }

    /// `moat resume BOX`: continue a paused sandbox.
    pub async fn resume(self: &Arc<Self>, reference: &str) -> Result<SandboxInfo, ServiceError> {
        let info = self.resolve(reference)?;
        if info.phase != Phase::Paused {
            return Err(ServiceError::phase(
                &info,
                "paused",
                "only a paused sandbox resumes; `moat start` boots a stopped one",
            ));
        }
        self.start(&info.id).await
    }

    /// The template key of a machine: the image, its size, and what a restore must match.
    pub(crate) fn template_key(&self, spec: &SandboxSpec, digest: &str, disk_mib: u64) -> String {
        let f = Fingerprint::of(&self.rt);
        let text = format!(
            "{digest}|{}|{}|{disk_mib}|{}|{}|{}|{}|nic={}",
            spec.shape.vcpus(),
            spec.shape.memory_mib(),
            f.qemu,
            f.accel,
            f.kernel,
            f.initramfs,
            spec.nic
        );
        sha2::Sha256::digest(text.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Start a new sandbox from its image's template; without one, boot it and save it as the
    /// template (one creator per template at a time; the others just boot).
    pub(crate) async fn create_from_template(
        self: &Arc<Self>,
        info: &SandboxInfo,
        spec: &SandboxSpec,
    ) -> Result<SandboxInfo, ServiceError> {
        let key = self.template_key(spec, &info.image_digest, info.disk_mib);
        let mut template = self.db(|db| db.template(&key))?;
        // The template store never fails a create: what went wrong is noted, and the sandbox boots.
        let mut note = None;
        if let (None, Some(store)) = (&template, &self.limits.template_store) {
            match self.template_from_store(store, &key, info).await {
                Ok(t) => template = t,
                Err(e) => note = Some(format!("template store: no template from {store}: {}", e.message)),
            }
        }
        if let Some(t) = template {
            let launch = self.launch(info, spec, Launch::Snapshot(&t.id));
            match self.metrics.launch(crate::metrics::LaunchKind::Template, launch).await {
                Ok(info) => return Ok(info),
                Err(e) => {
                    // A template that does not restore is dropped (when nothing builds on it) and
                    // the sandbox boots instead.
                    tracing::warn!(template = %t.id, error = %e.message, "restoring the template failed; booting");
                    if self.db(|db| db.dependents(&t.id))?.is_empty() {
                        self.db(|db| db.delete_snapshot(&t.id))?;
                        self.delete_snapshot_files(&t.id)?;
                    }
                }
            }
        }
        // The template is the image booted, without this sandbox's mounts: they come after.
        let bare = SandboxInfo { mounts: Vec::new(), ..info.clone() };
        let launch = self.launch(&bare, spec, Launch::Boot { fresh: true });
        let booted = self.metrics.launch(crate::metrics::LaunchKind::Cold, launch).await?;
        if let Some(t) = self.save_template(&booted, &key).await {
            if let Some(store) = &self.limits.template_store {
                self.push_template_later(store, t, &key, &booted.id);
            }
        }
        if let Some(note) = &note {
            tracing::warn!(sandbox = %booted.id, %note);
            self.db(|db| db.note(&booted.id, note))?;
        }
        if let Some(machine) = self.live(&booted.id) {
            if let Err(e) = self.connect_mounts(info, &machine).await {
                // As a failed launch: the VM goes, the sandbox stays failed with the reason.
                self.forget_live(&info.id);
                self.host_servers.stop(&info.id);
                machine.shutdown().await;
                self.db(|db| {
                    db.set_pid(&info.id, None)?;
                    db.set_phase(&info.id, Phase::Failed, Some(&e.message))
                })?;
                return Err(e);
            }
        }
        // Fetched again: it is running as before, and its version moved with the pause.
        Ok(self.db(|db| db.get(&booted.id))?.unwrap_or(booted))
    }

    /// Save a sandbox just booted as the template of `key`, unless another create is making it
    /// or it exists by now.
    /// Returns the template it saved.
    async fn save_template(&self, booted: &SandboxInfo, key: &str) -> Option<SnapshotInfo> {
        let lock = self.template_locks.of(key);
        let Ok(_making) = lock.try_lock() else { return None };
        if self.db(|db| db.template(key)).ok().flatten().is_some() {
            return None;
        }
        let template = self.new_snapshot(booted, "template".into(), SnapshotKind::Template);
        match self.save(&booted.id, template, Some(key), &[]).await {
            Ok(t) => {
                tracing::info!(template = %t.id, image = %t.image, "template saved");
                Some(t)
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "saving the template failed; sandboxes of this image boot");
                None
            }
        }
    }

    /// Remove what a crash or a change of host left of snapshots: directories without a row,
    /// rows never finished, and templates this host can no longer restore that nothing uses.
    pub(crate) fn snapshot_gc(&self) -> Result<Vec<String>, ServiceError> {
        let mut removed = Vec::new();
        if self.saving.load(Ordering::SeqCst) > 0 {
            return Ok(removed);
        }
        let rows = self.db(|db| db.all_snapshot_ids())?;
        for (id, ready) in &rows {
            if !ready {
                self.db(|db| db.delete_snapshot(id))?;
                self.delete_snapshot_files(id)?;
                removed.push(self.snapshot_dir(id).display().to_string());
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.snapshots_root()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !rows.iter().any(|(id, _)| *id == name) && std::fs::remove_dir_all(entry.path()).is_ok() {
                    removed.push(entry.path().display().to_string());
                }
            }
        }
        let current = Fingerprint::of(&self.rt);
        for t in self.db(|db| db.snapshots(None))?.into_iter().filter(|s| s.kind == SnapshotKind::Template) {
            let saved = fingerprint(&t);
            let image_gone = self.rt.images.resolve(&t.image).map(|i| i.digest != t.image_digest).unwrap_or(true);
            if t.dependents.is_empty() && (saved.mismatch(&current).is_some() || image_gone) {
                self.db(|db| db.delete_snapshot(&t.id))?;
                self.delete_snapshot_files(&t.id)?;
                removed.push(self.snapshot_dir(&t.id).display().to_string());
            }
        }
        Ok(removed)
    }
}
