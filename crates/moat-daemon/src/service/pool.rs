//! Warm pools: per image and machine size, sandboxes restored from the image's template ahead of
//! time, with one command run (so TCG has translated the agent's paths) and their CPUs stopped.
//! A create of that image and size claims one: the member keeps its id (run directory, machine
//! id) and gets the create's name and hostname, and a new agent session sets its clock and
//! entropy; its network and mounts are attached as for any restore.
//!
//! Members are not recorded in the state database, only the pools' sizes are: a member lives and
//! dies with the daemon that made it (the next daemon's gc reclaims what a crash left, and the
//! refiller makes new ones). Members hold memory, which admission counts; a create refused for
//! memory takes it back from them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_api::{CreateSandbox, ErrorCode, PoolInfo, SandboxInfo, SetPool, MAX_POOL_SIZE};
use moat_proto::ExecRequest;
use moat_sandbox::{SandboxSpec, Shape};
use tokio::sync::Notify;

use super::{admission, Launch, Service};
use crate::error::{image_error, ServiceError};
use crate::launcher::Machine;
use crate::state::PoolKey;

/// How long a claimed member's agent gets to answer its new session.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the warm-up command in a new member may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause before a pool whose refill failed is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often the refiller looks at the pools when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);
/// How long after a claim the refiller waits: the claimant's first commands come right after it,
/// and a restore beside them would take half of a 2-core host's CPU.
const AFTER_CLAIM: Duration = Duration::from_secs(1);

/// The daemon's warm pools (their members and counters; sizes are in the state database).
#[derive(Default)]
pub(crate) struct Pools {
    state: Mutex<HashMap<PoolKey, PoolState>>,
    /// Wakes the refiller: a size changed.
    wake: Notify,
    /// Creates in flight: the refiller waits for them, so that a member's restore never slows
    /// down a create that someone waits for.
    creating: AtomicUsize,
    last_claim: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Member>,
    /// Ids of members being restored now.
    starting: HashSet<String>,
    claimed: u64,
    last_error: Option<String>,
    retry_at: Option<Instant>,
}

/// One restored, paused sandbox without a record.
pub(crate) struct Member {
    pub id: String,
    /// The image it is of: a name repointed since then makes it stale.
    pub digest: String,
    /// The template it was restored from.
    pub template: String,
    pub machine: Arc<dyn Machine>,
}

/// Counts a create in flight while it lives.
pub(crate) struct Creating<'a>(&'a AtomicUsize);

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, PoolState>> {
        self.state.lock().expect("no panics while held")
    }

    /// Take a ready member of `key` made from image `digest`.
    pub(crate) fn take(&self, key: &PoolKey, digest: &str) -> Option<Member> {
        let mut all = self.lock();
        let pool = all.get_mut(key)?;
        let at = pool.ready.iter().position(|m| m.digest == digest)?;
        let member = pool.ready.remove(at);
        if member.is_some() {
            pool.claimed += 1;
            *self.last_claim.lock().expect("no panics while held") = Some(Instant::now());
        }
        member
    }

    /// Give back a member taken for a create that failed before it used it.
    pub(crate) fn put_back(&self, key: &PoolKey, member: Member) {
        let mut all = self.lock();
        let pool = all.entry(key.clone()).or_default();
        pool.claimed = pool.claimed.saturating_sub(1);
        pool.ready.push_front(member);
    }

    /// Whether the run directory `id` is a member's (gc leaves it alone).
    pub(crate) fn owns(&self, id: &str) -> bool {
        self.lock().values().any(|p| p.starting.contains(id) || p.ready.iter().any(|m| m.id == id))
    }

    /// Guest memory (MiB) and count of every member, ready or starting, for admission.
    pub(crate) fn held(&self) -> Vec<u32> {
        self.lock()
            .iter()
            .flat_map(|(k, p)| std::iter::repeat_n(k.memory_mib, p.ready.len() + p.starting.len()))
            .collect()
    }

    pub(crate) fn creating(&self) -> Creating<'_> {
        self.creating.fetch_add(1, Ordering::SeqCst);
        Creating(&self.creating)
    }
}

/// What `GET /v1/pools` says of the pool `key` of `size`.
fn info_of(all: &HashMap<PoolKey, PoolState>, key: PoolKey, size: u32) -> PoolInfo {
    let state = all.get(&key);
    PoolInfo {
        size,
        ready: state.map_or(0, |s| s.ready.len() as u32),
        starting: state.map_or(0, |s| s.starting.len() as u32),
        claimed: state.map_or(0, |s| s.claimed),
        last_error: state.and_then(|s| s.last_error.clone()),
        image: key.image,
        vcpus: key.vcpus,
        memory_mib: key.memory_mib,
        disk_mib: key.disk_mib,
    }
}

/// The pool key of a create: its image (by name) and sizes.
pub(crate) fn key_of(spec: &SandboxSpec) -> PoolKey {
    PoolKey {
        image: spec.image.clone(),
        vcpus: spec.shape.vcpus(),
        memory_mib: spec.shape.memory_mib(),
        disk_mib: spec.shape.disk_mib(),
    }
}

impl Service {
    /// Every pool with its size and how full it is.
    pub fn pools(&self) -> Result<Vec<PoolInfo>, ServiceError> {
        let sizes = self.db(|db| db.pools())?;
        let all = self.pools.lock();
        Ok(sizes.into_iter().map(|(key, size)| info_of(&all, key, size)).collect())
    }

    /// Set a pool's size (0 removes it); the refiller makes or ends members in the background.
    pub fn set_pool(&self, req: &SetPool) -> Result<PoolInfo, ServiceError> {
        if req.image.is_empty() || req.image.len() > 255 {
            return Err(ServiceError::invalid("an image name has 1 to 255 characters; see `moat image ls`"));
        }
        if req.size > MAX_POOL_SIZE {
            return Err(ServiceError::invalid(format!(
                "a pool of {} is too large; keep at most {MAX_POOL_SIZE} sandboxes ready",
                req.size
            )));
        }
        let shape = Shape::new(
            req.vcpus.unwrap_or(moat_api::DEFAULT_VCPUS),
            req.memory_mib.unwrap_or(moat_api::DEFAULT_MEMORY_MIB),
            req.disk_mib.unwrap_or(moat_api::DEFAULT_DISK_MIB),
        )
        .map_err(super::shape_error)?;
        let key = PoolKey {
            image: req.image.clone(),
            vcpus: shape.vcpus(),
            memory_mib: shape.memory_mib(),
            disk_mib: shape.disk_mib(),
        };
        if req.size > 0 {
            self.rt.images.resolve(&req.image).map_err(|e| match e {
                moat_image::ImageError::NotFound { .. } => ServiceError::new(
                    ErrorCode::NotFound,
                    format!("there is no image {:?} to keep a pool of", req.image),
                    "pull, build or import it first (`moat image pull`, `moat image build`), or run a sandbox of it \
                     once",
                ),
                e => image_error(e),
            })?;
        }
        self.db(|db| db.set_pool(&key, req.size))?;
        let mut all = self.pools.lock();
        let pool = all.entry(key.clone()).or_default();
        // A new setting deserves a new try at once.
        pool.retry_at = None;
        pool.last_error = None;
        let info = info_of(&all, key, req.size);
        drop(all);
        self.pools.wake.notify_one();
        Ok(info)
    }

    /// Whether any pool is set: a daemon keeping sandboxes warm does not exit as idle.
    pub fn has_pools(&self) -> bool {
        self.db(|db| db.pools()).is_ok_and(|p| !p.is_empty())
    }

    /// Turn the member `member` into the recorded sandbox `info` (whose id is the member's):
    /// run its CPUs again under a new agent session with `info`'s hostname, then attach its
    /// network and mounts. A member that does not run again (its QEMU died while it waited) is
    /// ended, and the sandbox starts from the template in its place.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        info: &SandboxInfo,
        spec: &SandboxSpec,
        member: Member,
    ) -> Result<SandboxInfo, ServiceError> {
        // A template removed since the member was made is no base to record.
        let template =
            self.db(|db| db.snapshot_candidates(&member.template))?.into_iter().find(|s| s.id == member.template);
        let from = match &template {
            Some(t) => Launch::Snapshot(&t.id),
            None => Launch::Boot { fresh: false },
        };
        let started = Instant::now();
        let thawed = match member.machine.clone().guest() {
            Some(sandbox) => sandbox.thaw(&info.hostname, THAW_TIMEOUT).await.map(|()| member.machine.clone()),
            None => Ok(member.machine.clone()),
        };
        let machine = match thawed {
            Ok(machine) => machine,
            Err(e) => {
                let e = moat_hint::one_line(&e);
                tracing::warn!(sandbox = %info.id, error = %e, "a pool member did not run again; restoring the template");
                self.end_member(&member).await;
                return self.create_from_template(info, spec).await;
            }
        };
        let thaw = started.elapsed();
        self.db(|db| db.set_phase(&info.id, moat_api::Phase::Booting, None))?;
        let launch = self.go_live(info, from, Ok(machine));
        let live = self.metrics.launch(crate::metrics::LaunchKind::Pool, launch).await;
        tracing::info!(sandbox = %info.id, ?thaw, total = ?started.elapsed(), "claimed from a warm pool");
        live
    }

    /// Kill a member's QEMU and remove its run directory.
    async fn end_member(&self, member: &Member) {
        let run_root = self.rt.config.run_dir();
        let dir = self.run_dir(&member.id);
        self.launcher.end(member.machine.pid(), &dir, &run_root).await;
        member.machine.release().await;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a pool member's directory failed");
            }
        }
    }

    /// End every member (the daemon exits, or a create needs their memory). Whether there were any.
    pub async fn drain_pools(&self) -> bool {
        let members: Vec<Member> =
            self.pools.lock().values_mut().flat_map(|p| p.ready.drain(..).collect::<Vec<_>>()).collect();
        for m in &members {
            self.end_member(m).await;
        }
        !members.is_empty()
    }

    /// The refiller: keeps every pool at its size, one member at a time, while no create is in
    /// flight. Runs until the daemon exits.
    pub async fn keep_pools(self: Arc<Self>) {
        loop {
            if !self.refill_once().await {
                tokio::select! {
                    _ = self.pools.wake.notified() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
            }
        }
    }

    /// End members no pool wants any more (size lowered, pool removed, image repointed), then
    /// make one member for the first pool that is short. Whether it made or ended one.
    async fn refill_once(self: &Arc<Self>) -> bool {
        let Ok(sizes) = self.db(|db| db.pools()) else { return false };
        let sizes: HashMap<PoolKey, u32> = sizes.into_iter().collect();
        let mut surplus = Vec::new();
        {
            let mut all = self.pools.lock();
            for (key, pool) in all.iter_mut() {
                let current = self.rt.images.resolve(&key.image).ok().map(|i| i.digest);
                let (keep, stale): (VecDeque<Member>, VecDeque<Member>) =
                    pool.ready.drain(..).partition(|m| current.as_deref() == Some(m.digest.as_str()));
                pool.ready = keep;
                surplus.extend(stale);
                let want = sizes.get(key).copied().unwrap_or(0) as usize;
                while pool.ready.len() > want {
                    surplus.extend(pool.ready.pop_back());
                }
            }
            all.retain(|k, p| sizes.contains_key(k) || !p.starting.is_empty() || !p.ready.is_empty());
        }
        let ended = !surplus.is_empty();
        for m in &surplus {
            self.end_member(m).await;
        }
        let claimed_lately =
            self.pools.last_claim.lock().expect("no panics while held").is_some_and(|t| t.elapsed() < AFTER_CLAIM);
        if self.pools.creating.load(Ordering::SeqCst) > 0 || claimed_lately {
            return ended;
        }
        let short = {
            let all = self.pools.lock();
            let now = Instant::now();
            sizes.iter().find_map(|(key, &size)| {
                let pool = all.get(key);
                let have = pool.map_or(0, |p| p.ready.len() + p.starting.len());
                let waiting = pool.and_then(|p| p.retry_at).is_some_and(|t| t > now);
                (have < size as usize && !waiting).then(|| key.clone())
            })
        };
        let Some(key) = short else { return ended };
        if let Err(e) = self.make_member(&key).await {
            tracing::warn!(pool = ?key, error = %e.message, "refilling a warm pool failed");
            let mut all = self.pools.lock();
            let pool = all.entry(key).or_default();
            pool.last_error = Some(e.message);
            pool.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
        true
    }

    /// Restore one member of `key` from its template (booting a sandbox once to save the template
    /// when there is none), run one command in it and stop its CPUs.
    async fn make_member(self: &Arc<Self>, key: &PoolKey) -> Result<(), ServiceError> {
        let image = self.rt.images.resolve(&key.image).map_err(image_error)?;
        let shape = Shape::new(key.vcpus, key.memory_mib, key.disk_mib).map_err(super::shape_error)?;
        let spec = SandboxSpec {
            image: key.image.clone(),
            image_digest: Some(image.digest.clone()),
            shape,
            hostname: None,
            boot_timeout: self.limits.boot_timeout,
            die_with_parent: false,
            nic: true,
        };
        let template_key = self.template_key(&spec, &image.digest, key.disk_mib);
        if self.db(|db| db.template(&template_key))?.is_none() {
            self.save_pool_template(key).await?;
        }
        let template = self.db(|db| db.template(&template_key))?.ok_or_else(|| {
            ServiceError::new(
                ErrorCode::Internal,
                format!("no template of {} could be saved for its pool", key.image),
                "see the daemon log (`moat daemon logs`) for why saving it failed",
            )
        })?;
        let ask = admission::Ask::new_sandbox(key.memory_mib, key.disk_mib, true);
        self.db(|db| Ok(self.admit(db, &ask)))??;
        let id = moat_sandbox::new_id();
        self.pools.lock().entry(key.clone()).or_default().starting.insert(id.clone());
        let dir = self.run_dir(&id);
        let snapshot_dir = self.snapshot_dir(&template.id);
        let started =
            self.launcher.start(&self.rt, &spec, &id, &dir, moat_sandbox::Origin::Snapshot(&snapshot_dir)).await;
        let made = match started {
            Ok(machine) => {
                let member =
                    Member { id: id.clone(), digest: image.digest.clone(), template: template.id.clone(), machine };
                match warm_up(&member).await {
                    Ok(()) => Ok(member),
                    Err(e) => {
                        self.end_member(&member).await;
                        Err(e)
                    }
                }
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(ServiceError::from(e))
            }
        };
        let mut all = self.pools.lock();
        let pool = all.entry(key.clone()).or_default();
        pool.starting.remove(&id);
        let member = made?;
        pool.ready.push_back(member);
        pool.last_error = None;
        Ok(())
    }

    /// Boot a sandbox of the pool's image and size once, which saves the template, then remove it.
    async fn save_pool_template(self: &Arc<Self>, key: &PoolKey) -> Result<(), ServiceError> {
        let req = CreateSandbox {
            image: Some(key.image.clone()),
            vcpus: Some(key.vcpus),
            memory_mib: Some(key.memory_mib),
            disk_mib: Some(key.disk_mib),
            name: Some(format!("pool-template-{}", &moat_sandbox::new_id()[..6])),
            ..Default::default()
        };
        tracing::info!(image = %key.image, "booting once to save the template a warm pool restores");
        let booted = self.create(req).await?;
        self.remove(&booted.id, true).await.map(drop)
    }
}

/// Run a command in a new member, start a new agent session (as a claim does) and run one more,
/// so that TCG has translated what a claim and an exec go through, then stop its CPUs.
async fn warm_up(member: &Member) -> Result<(), ServiceError> {
    let Some(sandbox) = member.machine.clone().guest() else { return Ok(()) };
    let run_true = || async {
        let exec = sandbox.exec(ExecRequest { argv: vec!["true".into()], ..Default::default() }).await?;
        exec.collect().await.map_err(moat_sandbox::SandboxError::from).map(drop)
    };
    let run = async {
        run_true().await?;
        sandbox.reconnect(WARM_UP_TIMEOUT).await?;
        run_true().await?;
        sandbox.freeze().await
    };
    match tokio::time::timeout(WARM_UP_TIMEOUT, run).await {
        Ok(r) => r.map_err(ServiceError::from),
        Err(_) => Err(ServiceError::new(
            ErrorCode::BootFailed,
            format!("a new pool member did not run `true` within {}s", WARM_UP_TIMEOUT.as_secs()),
            "the host may be overloaded; see the daemon log",
        )),
    }
}
