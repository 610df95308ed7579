//! The sandbox service: every lifecycle operation, recorded in the state database before it is
//! acted on, plus leases, QEMU exit watching, adoption after a restart and garbage collection.
//!
//! This is the daemon's one door: every front (the REST handlers in [`crate::http`], and any
//! in-process front) calls these operations and only translates their values and streams. The
//! submodules hold the operations on a running sandbox, each an `impl Service` block.

pub mod admission;
pub mod backups;
mod bundle;
mod df;
mod events;
pub mod exec;
pub mod files;
mod first_use;
mod health;
mod idle;
pub(crate) use health::Listening;
mod images;
mod isolation;
pub mod labels;
mod lease;
mod live;
mod locks;
mod logs;
mod mounts;
mod pool;
mod processes;
mod remote;
mod snapshots;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_api::{CreateSandbox, ErrorCode, NetMode, NetSpec, Phase, Reclaimed, SandboxInfo};
use moat_hint::Hint;
use moat_sandbox::{Runtime, Sandbox, SandboxSpec, Shape, ShapeError};
use tokio::sync::Notify;

use crate::error::{image_error, not_found, ServiceError};
use crate::launcher::{Launcher, Machine};
use crate::state::{now_secs, Db, StateError};
pub(crate) use locks::KeyedLocks;

/// Daemon settings that are not the host runtime's.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sandboxes that may be live (creating, booting, running, stopping) at once.
    pub max_sandboxes: usize,
    pub boot_timeout: Duration,
    /// Keep a template (a saved, booted VM) per image and start sandboxes from it.
    pub templates: bool,
    /// A registry repository (`REGISTRY/REPOSITORY`) templates are pulled from when this host has
    /// none, and pushed to when it makes one.
    pub template_store: Option<String>,
    /// Addresses that reach this host from outside although no interface has them (a cloud's
    /// 1:1 NAT public address): guests are refused them like the host's own.
    pub host_addresses: Vec<std::net::Ipv4Addr>,
    /// Memory live sandboxes may commit (guest RAM plus QEMU's overhead), times the host's RAM.
    pub memory_overcommit: f64,
    /// Growth sandbox disks may still claim, times the free space under the home.
    pub disk_overcommit: f64,
    /// Refuse to start sandboxes unless they run under KVM.
    pub require_kvm: bool,
    /// Where admission control reads the host's memory and free disk.
    pub host: admission::HostProbe,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_sandboxes: 32,
            boot_timeout: Duration::from_secs(90),
            templates: true,
            template_store: None,
            host_addresses: Vec::new(),
            memory_overcommit: admission::DEFAULT_MEMORY_OVERCOMMIT,
            disk_overcommit: admission::DEFAULT_DISK_OVERCOMMIT,
            require_kvm: false,
            host: admission::HostProbe::Measured,
        }
    }
}

/// The service shared by every API request and background task.
pub struct Service {
    pub rt: Runtime,
    pub limits: Limits,
    /// Where VMs come from: QEMU, or a test double.
    pub(crate) launcher: Arc<dyn Launcher>,
    db: Mutex<Db>,
    /// Booted sandboxes with a QEMU and an agent link, by id.
    live: Mutex<HashMap<String, Arc<dyn Machine>>>,
    /// One lifecycle operation at a time per sandbox.
    ops: KeyedLocks,
    /// Starts admitted whose records are still at rest (see [`admission`]).
    starting: admission::Starting,
    /// Woken whenever an event is recorded (for followers of `/v1/events`).
    pub events: Notify,
    /// Long operations in flight that outlive their request (image builds and imports).
    busy: Arc<std::sync::atomic::AtomicUsize>,
    /// Snapshots being written: gc leaves unfinished snapshots and helper VMs alone meanwhile.
    pub(crate) saving: Arc<std::sync::atomic::AtomicUsize>,
    /// One template being made per template key; other creates boot meanwhile.
    pub(crate) template_locks: KeyedLocks,
    /// One maker per missing image name (see [`Service::ensure_image`]).
    image_locks: KeyedLocks,
    /// The network stacks of running sandboxes with a NIC, by id.
    pub(crate) nets: Mutex<HashMap<String, Arc<crate::net::LiveNet>>>,
    /// Sandboxes an earlier daemon left live that are not settled yet (see [`crate::adoption`]).
    pub(crate) adopting: Mutex<HashSet<String>>,
    /// Held while a volume is checked and plugged in, so two starts never both take it.
    volume_claims: tokio::sync::Mutex<()>,
    /// One lock per volume id: held by a create from before its row is written until its file
    /// is made, and by a remove from its users check until its file is gone; gc skips a volume
    /// whose lock is held.
    volume_locks: KeyedLocks,
    /// The tasks serving running sandboxes' host directories.
    pub(crate) host_servers: mounts::HostServers,
    /// Where the daemon listens and since when, once it does (see [`health`]).
    pub(crate) listening: std::sync::OnceLock<health::Listening>,
    /// What `GET /metrics` reports (see [`crate::metrics`]).
    pub(crate) metrics: crate::metrics::Metrics,
    /// When each running sandbox was last used (for idle policies).
    pub(crate) activity: Arc<idle::Activity>,
    /// Warm pools' members (see [`pool`]).
    pub(crate) pools: pool::Pools,
}

/// Marks the daemon busy (not idle) while it lives.
pub struct BusyGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Service {
    /// The service of the host `rt`, its state `db`, starting VMs with `launcher` (the daemon's is
    /// [`crate::launcher::Qemu`]).
    pub fn new(rt: Runtime, db: Db, limits: Limits, launcher: Arc<dyn Launcher>) -> Arc<Service> {
        Arc::new(Service {
            rt,
            limits,
            launcher,
            db: Mutex::new(db),
            live: Mutex::new(HashMap::new()),
            ops: KeyedLocks::default(),
            starting: admission::Starting::default(),
            events: Notify::new(),
            busy: Arc::default(),
            saving: Arc::default(),
            template_locks: KeyedLocks::default(),
            image_locks: KeyedLocks::default(),
            nets: Mutex::default(),
            adopting: Mutex::default(),
            volume_claims: tokio::sync::Mutex::default(),
            volume_locks: KeyedLocks::default(),
            host_servers: mounts::HostServers::default(),
            listening: std::sync::OnceLock::new(),
            metrics: crate::metrics::Metrics::default(),
            activity: Arc::default(),
            pools: pool::Pools::default(),
        })
    }

    /// Run a closure on the database. SQLite calls are short; a std mutex is enough.
    pub fn db<T>(&self, f: impl FnOnce(&mut Db) -> Result<T, StateError>) -> Result<T, ServiceError> {
        let mut db = self.db.lock().expect("the db lock is never poisoned: no panics while held");
        let last_event = db.last_event_seq();
        let r = f(&mut db);
        let new_events = db.last_event_seq() != last_event;
        drop(db);
        if new_events {
            self.events.notify_waiters();
        }
        Ok(r?)
    }

    pub(crate) fn live(&self, id: &str) -> Option<Arc<dyn Machine>> {
        self.live.lock().expect("no panics while held").get(id).cloned()
    }

    /// Take a sandbox out of the live set (its QEMU is about to end on purpose).
    pub(crate) fn forget_live(&self, id: &str) -> Option<Arc<dyn Machine>> {
        self.live.lock().expect("no panics while held").remove(id)
    }

    /// Put back a sandbox taken out with [`Service::forget_live`] whose QEMU runs on; the exit
    /// watcher started when it launched still watches it.
    pub(crate) fn put_live(&self, machine: Arc<dyn Machine>) {
        self.live.lock().expect("no panics while held").insert(machine.id().to_string(), machine);
    }

    pub(crate) fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ops.of(id)
    }

    pub(crate) fn run_dir(&self, id: &str) -> PathBuf {
        self.rt.config.run_dir().join(id)
    }

    /// Resolve a name, id or unique id prefix.
    pub fn resolve(&self, reference: &str) -> Result<SandboxInfo, ServiceError> {
        if reference.is_empty() || reference.len() > 128 {
            return Err(ServiceError::invalid("a sandbox reference must be 1-128 characters"));
        }
        let mut found = self.db(|db| db.candidates(reference))?;
        match found.len() {
            0 => Err(not_found(reference)),
            1 => {
                // Every operation on a sandbox starts here: it is in use.
                self.activity.touch(&found[0].id);
                Ok(found.remove(0))
            }
            n => Err(ServiceError::new(
                ErrorCode::AmbiguousRef,
                format!("{reference:?} matches {n} sandboxes"),
                "use more characters of the id, or the name",
            )),
        }
    }

    pub fn list(&self) -> Result<Vec<SandboxInfo>, ServiceError> {
        self.db(|db| db.list())
    }

    /// Create a sandbox and boot it; returns once it is running (or has failed).
    pub async fn create(self: &Arc<Self>, req: CreateSandbox) -> Result<SandboxInfo, ServiceError> {
        let _creating = self.pools.creating();
        if let Some(ttl) = req.ttl_secs {
            lease::check_ttl(ttl)?;
        }
        let boot_timeout = match req.boot_timeout_secs {
            None => self.limits.boot_timeout,
            Some(t @ 1..=3600) => Duration::from_secs(t),
            Some(t) => {
                return Err(ServiceError::invalid(format!("a boot timeout of {t} s is out of range; use 1 s to 1 h")))
            }
        };
        if let Some(name) = &req.name {
            moat_api::validate_name(name).map_err(ServiceError::invalid)?;
        }
        labels::check_create(&req)?;
        let snapshot = match &req.from {
            Some(from) if moat_api::is_remote_snapshot(from) => {
                let pulled = self.remote_snapshot(from, req.registry_login.clone()).await?;
                Some(self.snapshot_for_create(&pulled.id, &req)?)
            }
            Some(from) => Some(self.snapshot_for_create(from, &req)?),
            None => None,
        };
        // A snapshot brings its machine; the request may only name the same sizes (checked above).
        let shape = match &snapshot {
            Some(s) => Shape::new(s.vcpus, s.memory_mib, s.disk_mib),
            None => Shape::new(
                req.vcpus.unwrap_or(moat_api::DEFAULT_VCPUS),
                req.memory_mib.unwrap_or(moat_api::DEFAULT_MEMORY_MIB),
                req.disk_mib.unwrap_or(moat_api::DEFAULT_DISK_MIB),
            ),
        }
        .map_err(shape_error)?;
        let net = match (&req.net, &snapshot) {
            (Some(net), _) => net.clone(),
            (None, Some(s)) if !s.nic => NetSpec { mode: NetMode::None, ..NetSpec::default() },
            (None, _) => NetSpec::default(),
        };
        crate::net::check(&net, true)?;
        if let Some(s) = snapshot.as_ref().filter(|s| s.nic != (net.mode != NetMode::None)) {
            return Err(ServiceError::new(
                ErrorCode::Incompatible,
                format!(
                    "--from {}: the snapshot's machine {} a network device, and network `{}` {}",
                    s.reference(),
                    if s.nic { "has" } else { "has no" },
                    net.mode.as_str(),
                    if s.nic { "has none" } else { "needs one" }
                ),
                "restore it with a network mode that matches (leave --net out to take the snapshot's)",
            ));
        }
        // A restored guest has the snapshot's host directories mounted: they are served again.
        let mut mounts = snapshot.as_ref().map(|s| s.host_mounts.clone()).unwrap_or_default();
        mounts.extend(req.mounts.iter().cloned());
        let mounts = self.resolve_mounts(&mounts)?;
        // Checked again when each is plugged in; here so a taken volume costs nothing.
        for m in &mounts {
            self.check_volume_free("", m)?;
        }
        let id = moat_sandbox::new_id();
        let name = req.name.clone().unwrap_or_else(|| format!("sb-{}", &id[..8]));
        let hostname = req.hostname.clone().unwrap_or_else(|| format!("moat-{}", &id[..8]));
        let mut spec = SandboxSpec {
            image: match &snapshot {
                Some(s) => s.image.clone(),
                None => req.image.clone().unwrap_or_else(|| moat_api::DEFAULT_IMAGE.to_string()),
            },
            // A snapshot's disk lies on the very image it was taken on, whatever its name says now.
            image_digest: snapshot.as_ref().map(|s| s.image_digest.clone()),
            shape,
            hostname: Some(hostname.clone()),
            boot_timeout,
            die_with_parent: false,
            nic: net.mode != NetMode::None,
        };
        moat_sandbox::validate(&spec).map_err(|e| ServiceError::invalid(e.to_string()))?;
        let ask = admission::Ask::new_sandbox(shape.memory_mib(), shape.disk_mib(), snapshot.is_some());
        let image = match &spec.image_digest {
            Some(digest) => self.rt.images.by_digest(&spec.image, digest),
            None => {
                // Refused before the image is made: a pull or build is the expensive step.
                // Admission is checked again, under the lock, when the record goes in.
                self.admit_or_drain_pools(&ask).await?;
                self.ensure_image(&spec.image, req.pull.unwrap_or_default(), req.registry_login.clone()).await?;
                self.rt.images.resolve(&spec.image)
            }
        };
        let image = image.map_err(|e| match e {
            moat_image::ImageError::NotFound { .. } if spec.image == moat_api::DEFAULT_IMAGE => ServiceError::new(
                ErrorCode::NotFound,
                "the default image has not been built yet",
                format!(
                    "a create without `pull: never` builds it on first use; or build it with `moat image build {} \
                     --from {} --packages {}` (POST /v1/images/build), or name another image (`minimal` is built in)",
                    moat_api::DEFAULT_IMAGE,
                    moat_api::DEFAULT_IMAGE_FROM,
                    moat_api::DEFAULT_IMAGE_PACKAGES.join(",")
                ),
            ),
            e => image_error(e),
        })?;
        // Resolved once: every later boot of this sandbox is of this image.
        spec.image_digest = Some(image.digest.clone());
        // A warm pool's member of this image and size becomes the sandbox: it keeps its id (run
        // directory, machine id) and takes this create's name and hostname. A sandbox with
        // secrets has moat's CA in its trust store, which no member has.
        let pool_key = pool::key_of(&spec);
        let poolable =
            snapshot.is_none() && req.template.unwrap_or(self.limits.templates) && spec.nic && net.secrets.is_empty();
        let member = if poolable { self.pools.take(&pool_key, &image.digest) } else { None };
        let (id, name, hostname) = match &member {
            Some(m) => (
                m.id.clone(),
                req.name.clone().unwrap_or_else(|| format!("sb-{}", &m.id[..8])),
                req.hostname.clone().unwrap_or_else(|| format!("moat-{}", &m.id[..8])),
            ),
            None => (id, name, hostname),
        };
        spec.hostname = Some(hostname.clone());
        let info = SandboxInfo {
            id: id.clone(),
            name,
            phase: Phase::Creating,
            image: spec.image.clone(),
            image_digest: image.digest.clone(),
            accel: self.rt.accel.accel.to_string(),
            vcpus: shape.vcpus(),
            memory_mib: shape.memory_mib(),
            disk_mib: shape.disk_mib(),
            hostname,
            created_at: now_secs(),
            expires_at: req.ttl_secs.map(|t| now_secs().saturating_add(t as i64)),
            on_expire: req.on_expire.unwrap_or_default(),
            pid: None,
            last_error: None,
            version: 1,
            snapshot_id: None,
            isolation: None,
            net,
            labels: req.labels.clone(),
            env: req.env.clone(),
            mounts,
            idle: req.idle,
        };
        // Held from before the record exists, so no other operation sees it half made.
        let lock = self.op_lock(&id);
        let _guard = lock.lock().await;
        // Admission and the insert happen under one lock, so parallel creates cannot overshoot.
        let inserted = self.db(|db| Ok(self.admit(db, &ask).and_then(|()| Ok(db.insert(&info)?))))?;
        if let Err(e) = inserted {
            if let Some(m) = member {
                self.pools.put_back(&pool_key, m);
            }
            return Err(e);
        }
        self.keep_secrets(&info)?;
        if let Some(member) = member {
            return self.claim(&info, &spec, member).await;
        }
        if let Some(snapshot) = snapshot {
            let launch = self.launch(&info, &spec, Launch::Snapshot(&snapshot.id));
            return self.metrics.launch(crate::metrics::LaunchKind::Snapshot, launch).await;
        }
        // A sandbox with secrets has moat's CA in its trust store: no template is made of it.
        if req.template.unwrap_or(self.limits.templates) && info.net.secrets.is_empty() {
            return self.create_from_template(&info, &spec).await;
        }
        let launch = self.launch(&info, &spec, Launch::Boot { fresh: true });
        self.metrics.launch(crate::metrics::LaunchKind::Cold, launch).await
    }

    /// Start a recorded sandbox (phase creating, stopped, expired, failed or paused) from
    /// `from` and watch its QEMU.
    pub(crate) async fn launch(
        self: &Arc<Self>,
        info: &SandboxInfo,
        spec: &SandboxSpec,
        from: Launch<'_>,
    ) -> Result<SandboxInfo, ServiceError> {
        let id = info.id.clone();
        self.db(|db| db.set_phase(&id, Phase::Booting, None))?;
        let dir = self.run_dir(&id);
        let snapshot_dir;
        let origin = match from {
            Launch::Boot { fresh } => moat_sandbox::Origin::Boot { fresh },
            Launch::Snapshot(snapshot) => {
                snapshot_dir = self.snapshot_dir(snapshot);
                moat_sandbox::Origin::Snapshot(&snapshot_dir)
            }
            Launch::Suspended => moat_sandbox::Origin::Suspended,
        };
        let mut booted = self.launcher.start(&self.rt, spec, &id, &dir, origin).await;
        // Under heavy load QEMU 7.2 has been seen to crash (SIGSEGV) while loading a saved state
        // that restores fine the next time (about one fork in ten while another VM boots). The
        // saved machine (a snapshot, or a paused sandbox's own) is unchanged by a restore that
        // never reached `cont`, so one more try is safe.
        if let Err(moat_sandbox::SandboxError::Restore { reason, .. }) = &booted {
            if matches!(from, Launch::Snapshot(_) | Launch::Suspended) && reason.contains("signal") {
                tracing::warn!(sandbox = %id, %reason, "QEMU crashed restoring a snapshot; trying once more");
                booted = self.launcher.start(&self.rt, spec, &id, &dir, origin).await;
            }
        }
        self.go_live(info, from, booted).await
    }

    /// A running sandbox's live handle, or why there is none.
    pub fn running(&self, reference: &str) -> Result<(SandboxInfo, Arc<Sandbox>), ServiceError> {
        let info = self.resolve(reference)?;
        if self.is_adopting(&info.id) {
            return Err(ServiceError::new(
                ErrorCode::InvalidPhase,
                format!("sandbox {} is being adopted by the daemon, which has just restarted", info.name),
                "try again in a few seconds; a guest that does not answer fails by itself, as `moat ps` then shows",
            ));
        }
        if info.phase != Phase::Running {
            return Err(ServiceError::phase(&info, "running", "start it with `moat start`"));
        }
        let sandbox = self.live(&info.id).and_then(|m| m.guest()).ok_or_else(|| {
            ServiceError::new(
                ErrorCode::InvalidPhase,
                format!("sandbox {} has no running VM", info.name),
                "restart it with `moat stop` and `moat start`",
            )
        })?;
        Ok((info, sandbox))
    }

    /// Stop a running sandbox, keeping its disk. `to` is `Stopped`, or `Expired` for the reaper.
    pub async fn stop(&self, reference: &str) -> Result<SandboxInfo, ServiceError> {
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        self.stop_locked(&info.id, Phase::Stopped).await
    }

    pub(crate) async fn stop_locked(&self, id: &str, to: Phase) -> Result<SandboxInfo, ServiceError> {
        let info = self.db(|db| db.get(id))?.ok_or_else(|| not_found(id))?;
        if info.phase == Phase::Paused {
            return Err(ServiceError::phase(
                &info,
                "running",
                "it is paused and holds no memory; `moat resume` continues it, `moat rm` removes it",
            ));
        }
        if !matches!(info.phase, Phase::Running | Phase::Booting) {
            return Err(ServiceError::phase(&info, "running", "nothing to stop"));
        }
        self.db(|db| db.set_phase(id, Phase::Stopping, None))?;
        let sandbox = self.live.lock().expect("no panics while held").remove(id);
        self.host_servers.stop(id);
        if let Some(sandbox) = sandbox {
            sandbox.shutdown().await;
        }
        self.db(|db| {
            db.set_pid(id, None)?;
            db.set_phase(id, to, None)
        })
    }

    /// Boot a stopped, expired or failed sandbox again from its disk.
    pub async fn start(self: &Arc<Self>, reference: &str) -> Result<SandboxInfo, ServiceError> {
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let info = self.db(|db| db.get(&info.id))?.ok_or_else(|| not_found(reference))?;
        if !info.phase.is_at_rest() {
            return Err(ServiceError::phase(
                &info,
                "stopped, expired or failed",
                "it is already up; see `moat inspect`",
            ));
        }
        // Counted as live from here until its phase says so.
        let _admitted = self.admit_start(&info)?;
        if info.expires_at.is_some_and(|t| t <= now_secs()) {
            self.db(|db| db.set_expiry(&info.id, None))?;
        }
        // A sandbox whose secret values are lost says so before anything boots.
        self.fill_secrets(&info, &mut info.net.clone())?;
        let spec = self.spec_of(&info)?;
        if info.phase == Phase::Paused {
            return self.launch(&info, &spec, Launch::Suspended).await;
        }
        let fresh = !self.run_dir(&info.id).join(moat_sandbox::OVERLAY_FILE).exists();
        self.launch(&info, &spec, Launch::Boot { fresh }).await
    }

    /// The spec a recorded sandbox boots with.
    pub(crate) fn spec_of(&self, info: &SandboxInfo) -> Result<SandboxSpec, ServiceError> {
        Ok(SandboxSpec {
            image: info.image.clone(),
            image_digest: Some(info.image_digest.clone()).filter(|d| !d.is_empty()),
            shape: Shape::new(info.vcpus, info.memory_mib, info.disk_mib).map_err(shape_error)?,
            hostname: Some(info.hostname.clone()),
            boot_timeout: self.limits.boot_timeout,
            die_with_parent: false,
            nic: info.net.mode != NetMode::None,
        })
    }

    /// Remove a sandbox: its VM (only with `force` while it runs), its files and its record.
    pub async fn remove(&self, reference: &str, force: bool) -> Result<SandboxInfo, ServiceError> {
        let info = self.resolve(reference)?;
        let lock = self.op_lock(&info.id);
        let _guard = lock.lock().await;
        let info = self.db(|db| db.get(&info.id))?.ok_or_else(|| not_found(reference))?;
        if info.phase.is_live() {
            if !force {
                return Err(ServiceError::phase(&info, "stopped", "stop it first (`moat stop`), or use `moat rm -f`"));
            }
            if matches!(info.phase, Phase::Running | Phase::Booting) {
                self.stop_locked(&info.id, Phase::Stopped).await?;
            } else {
                // Creating or stopping with no operation in flight (we hold the lock): a crash left
                // it. Kill whatever QEMU is left in its directory.
                self.live.lock().expect("no panics while held").remove(&info.id);
                self.db(|db| db.set_phase(&info.id, Phase::Failed, Some("removed with --force")))?;
                let run_root = self.rt.config.run_dir();
                let dir = self.run_dir(&info.id);
                for (pid, _) in self.launcher.find_qemus(&run_root).into_iter().filter(|(_, d)| *d == dir) {
                    self.launcher.kill(pid, &dir, &run_root);
                }
            }
        }
        self.remove_files(&info.id)?;
        self.release_snapshots(&info.id)?;
        self.db(|db| db.delete(&info.id))?;
        self.ops.forget(&info.id);
        self.metrics.forget(&info.id);
        Ok(info)
    }

    fn remove_files(&self, id: &str) -> Result<(), ServiceError> {
        let dir = self.run_dir(id);
        let mut removed = std::fs::remove_dir_all(&dir);
        // A task of the ended VM (its console's size marks, a last socket) may still write a file
        // into the directory while it is emptied; it is done a moment later.
        for _ in 0..3 {
            match &removed {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    std::thread::sleep(Duration::from_millis(50));
                    removed = std::fs::remove_dir_all(&dir);
                }
                _ => break,
            }
        }
        match removed {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ServiceError::new(
                ErrorCode::Internal,
                format!("removing {} failed: {e}", dir.display()),
                "remove the directory by hand, then run `moat gc`",
            )),
        }
    }

    /// Remove every stopped, failed or expired sandbox.
    pub async fn prune(&self) -> Result<Reclaimed, ServiceError> {
        let mut out = Reclaimed::default();
        for s in self.list()?.into_iter().filter(|s| s.phase.is_at_rest()) {
            if self.remove(&s.id, false).await.is_ok() {
                out.sandboxes.push(s.id);
            }
        }
        Ok(out)
    }

    /// Reclaim what crashes leaked: QEMU processes and run directories that no sandbox owns, and
    /// sockets left in the directories of sandboxes that are not running. Never touches a process
    /// it cannot verify as a moat QEMU under this home.
    pub async fn gc(&self) -> Result<Reclaimed, ServiceError> {
        let mut out = Reclaimed::default();
        let run_root = self.rt.config.run_dir();
        // Ownership is read fresh from the database for each finding: records are written before
        // their directory and their QEMU exist, so a sandbox being created right now is never
        // mistaken for a leftover.
        let owner = |id: &str| self.db(|db| db.get(id)).ok().flatten();
        // Helper VMs of snapshots being written live in `run/save-*`.
        let saving = self.saving.load(std::sync::atomic::Ordering::SeqCst) > 0;
        // So are warm pools' members, which have no record.
        let in_use = |id: &str| (saving && id.starts_with(moat_sandbox::HELPER_PREFIX)) || self.pools.owns(id);
        for (pid, dir) in self.launcher.find_qemus(&run_root) {
            let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if owner(&id).is_some_and(|s| s.phase.is_live()) || in_use(&id) {
                continue;
            }
            tracing::info!(pid, dir = %dir.display(), "gc: killing a QEMU no live sandbox owns");
            if self.launcher.kill(pid, &dir, &run_root) {
                out.processes.push(pid);
            }
        }
        if let Some(host) = &self.rt.cgroups {
            for name in moat_vmm::sandbox_cgroups(host) {
                if owner(&name).is_some_and(|s| s.phase.is_live()) || in_use(&name) {
                    continue;
                }
                let Some(cgroup) = moat_vmm::SandboxCgroup::open(host, &name) else { continue };
                let dirs: Vec<String> = cgroup.dirs().iter().map(|d| d.display().to_string()).collect();
                // A cgroup still holding processes is refused by the kernel: it stays.
                if let Ok(Ok(())) = tokio::task::spawn_blocking(move || cgroup.remove()).await {
                    out.paths.extend(dirs);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&run_root) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                match owner(&id) {
                    None if in_use(&id) => {}
                    None => {
                        if std::fs::remove_dir_all(&path).is_ok() {
                            out.paths.push(path.display().to_string());
                        }
                    }
                    Some(s) if s.phase.is_at_rest() => {
                        // Under the sandbox's lock, so that a start beginning now keeps its files.
                        let lock = self.op_lock(&id);
                        let Ok(_guard) = lock.try_lock() else { continue };
                        if let Some(s) = owner(&id).filter(|s| s.phase.is_at_rest()) {
                            out.paths.extend(remove_leftovers(&path, s.phase));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        out.paths.extend(self.snapshot_gc()?);
        out.paths.extend(self.volume_gc());
        match self.image_gc() {
            Ok(paths) => out.paths.extend(paths),
            Err(e) => tracing::warn!(error = %e.message, "gc: cleaning the image store failed"),
        }
        if out != Reclaimed::default() {
            let message = format!("gc reclaimed {} processes and {} paths", out.processes.len(), out.paths.len());
            self.db(|db| db.event(None, "gc", &message))?;
        }
        Ok(out)
    }

    /// Remove what no image or sandbox of the image store needs (see [`moat_image::ImageStore::gc`]).
    pub fn image_gc(&self) -> Result<Vec<String>, ServiceError> {
        // Snapshot disks are layers on their image's base: the base stays while they do.
        let mut in_use: Vec<String> = self.list()?.into_iter().map(|s| s.image_digest).collect();
        in_use.extend(self.db(|db| db.snapshots(None))?.into_iter().map(|s| s.image_digest));
        let bases = self.db(|db| db.snapshot_bases())?;
        let removed = self.rt.images.gc(&in_use, &bases, Duration::from_secs(3600)).map_err(image_error)?;
        Ok(removed.iter().map(|p| p.display().to_string()).collect())
    }

    /// Leave every running VM running (the next daemon adopts them) and drop the handles.
    pub fn detach_all(&self) {
        let all: Vec<Arc<dyn Machine>> =
            self.live.lock().expect("no panics while held").drain().map(|(_, s)| s).collect();
        for s in all {
            s.detach();
        }
    }

    /// Keep the daemon from exiting as idle until the guard is dropped.
    pub fn hold(&self) -> BusyGuard {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        BusyGuard(self.busy.clone())
    }

    /// Whether long operations are in flight.
    pub fn is_busy(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// How many sandboxes are live now.
    pub fn live_count(&self) -> usize {
        self.live.lock().expect("no panics while held").len()
    }
}

/// Where a recorded sandbox's VM comes from when it is launched.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Launch<'a> {
    Boot {
        fresh: bool,
    },
    /// A snapshot (or template), by id.
    Snapshot(&'a str),
    /// The sandbox's own saved VM (it is paused).
    Suspended,
}

/// Sizes out of bounds, as a bad request whose hint gives the bounds.
fn shape_error(e: ShapeError) -> ServiceError {
    let hint = e.hint().unwrap_or_default();
    ServiceError::new(ErrorCode::InvalidRequest, e.to_string(), hint)
}

/// What a sandbox at rest in `phase` no longer needs in its run directory: QEMU's sockets and
/// pidfile, a save cut short, and unless it is paused, its saved machine and guest RAM.
pub(crate) fn remove_leftovers(dir: &Path, phase: Phase) -> Vec<String> {
    let paused = phase == Phase::Paused;
    let mut removed: Vec<String> =
        moat_sandbox::discard_saved(dir, paused).iter().map(|p| p.display().to_string()).collect();
    let ram: &[&str] = if paused { &[] } else { &[moat_sandbox::MEM_FILE] };
    use moat_vmm::run_files::{AGENT_SOCKET, NET_SOCKET, PID_FILE, QMP_SOCKET};
    for name in [QMP_SOCKET, AGENT_SOCKET, NET_SOCKET, PID_FILE].iter().chain(ram) {
        let p = dir.join(name);
        if p.exists() && std::fs::remove_file(&p).is_ok() {
            removed.push(p.display().to_string());
        }
    }
    removed
}

#[cfg(test)]
mod tests;
