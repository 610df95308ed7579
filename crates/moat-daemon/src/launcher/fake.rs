//! A recording stand-in for QEMU (youki's `TestHelperSyscall` is the model), and a service on a
//! temporary home that uses it. Every call is recorded; a started VM is a pid and a run directory
//! that "runs" until it is shut down, killed or crashed by the test; a test scripts what the next
//! starts and adoptions do, and can hold starts to have many in flight at once.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use moat_api::{CreateSandbox, NetMode, NetSpec, Phase, SandboxInfo};
use moat_sandbox::{Origin, Runtime, RuntimeConfig, Sandbox, SandboxError, SandboxSpec, Shape};
use tokio::sync::watch;

use super::{Launcher, Machine};
use crate::service::{Limits, Service};
use crate::state::Db;

/// What the fake was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Start { id: String, from: Source, shape: Shape, image_digest: Option<String> },
    Adopt { id: String, pid: u32 },
    Kill { pid: u32 },
    Shutdown { id: String },
    Release { id: String },
    Snapshot { id: String, dest: PathBuf },
    Detach { id: String },
}

/// Where a start's VM came from ([`Origin`] with the path owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Boot { fresh: bool },
    Snapshot(PathBuf),
    Suspended,
}

/// What a scripted start or adoption does instead of coming up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// QEMU or the guest fails to come up.
    Fails,
    /// The guest never answers: the boot (or adoption) times out.
    Silent,
    /// QEMU dies on a signal while loading a saved machine.
    CrashesRestoring,
}

impl Outcome {
    fn error(self, spec: &SandboxSpec, adopting: bool) -> SandboxError {
        let console = "the fake console".to_string();
        match self {
            Outcome::Fails => SandboxError::Boot { reason: "the fake guest panicked".into(), console },
            Outcome::Silent if adopting => SandboxError::AdoptTimeout { timeout: spec.boot_timeout, console },
            Outcome::Silent => SandboxError::BootTimeout { timeout: spec.boot_timeout, console },
            Outcome::CrashesRestoring => {
                SandboxError::Restore { reason: "QEMU was killed by signal 11 (SIGSEGV)".into(), console }
            }
        }
    }
}

/// A QEMU that runs: its run directory, and what its machines wait on (dropped when it ends).
struct Running {
    dir: PathBuf,
    alive: watch::Sender<()>,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    starts: VecDeque<Outcome>,
    adopts: VecDeque<Outcome>,
    qemus: BTreeMap<u32, Running>,
    last_pid: u32,
}

impl State {
    /// A new running QEMU in `dir`; its pid and what resolves once it has ended.
    fn spawn(&mut self, dir: &Path) -> (u32, watch::Receiver<()>) {
        self.last_pid += 1;
        let (alive, ended) = watch::channel(());
        self.qemus.insert(self.last_pid, Running { dir: dir.to_path_buf(), alive });
        (self.last_pid, ended)
    }
}

/// The recording [`Launcher`].
pub(crate) struct FakeLauncher {
    state: Arc<Mutex<State>>,
    /// Starts wait while this is false (see [`FakeLauncher::hold_starts`]).
    open: watch::Sender<bool>,
}

impl FakeLauncher {
    pub(crate) fn new() -> Arc<FakeLauncher> {
        Arc::new(FakeLauncher { state: Arc::default(), open: watch::channel(true).0 })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("no panics while held")
    }

    /// Everything asked so far.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The starts asked so far.
    pub(crate) fn starts(&self) -> Vec<Call> {
        self.calls().into_iter().filter(|c| matches!(c, Call::Start { .. })).collect()
    }

    /// The next start not yet scripted does `outcome`.
    pub(crate) fn script_start(&self, outcome: Outcome) {
        self.state().starts.push_back(outcome);
    }

    /// The next adoption not yet scripted does `outcome`.
    pub(crate) fn script_adopt(&self, outcome: Outcome) {
        self.state().adopts.push_back(outcome);
    }

    /// Starts wait (after they are recorded) until [`FakeLauncher::release_starts`].
    pub(crate) fn hold_starts(&self) {
        self.open.send_replace(false);
    }

    pub(crate) fn release_starts(&self) {
        self.open.send_replace(true);
    }

    /// A QEMU that an earlier daemon left running in `dir`: its pid.
    pub(crate) fn leave_qemu(&self, dir: &Path) -> u32 {
        let (pid, _) = self.state().spawn(dir);
        pid
    }

    /// QEMU `pid` ends on its own, as a crash would.
    pub(crate) fn crash(&self, pid: u32) {
        self.state().qemus.remove(&pid);
    }

    /// The QEMUs that run: (pid, run directory).
    pub(crate) fn qemus(&self) -> Vec<(u32, PathBuf)> {
        self.state().qemus.iter().map(|(pid, q)| (*pid, q.dir.clone())).collect()
    }

    fn machine(&self, id: &str, (pid, ended): (u32, watch::Receiver<()>)) -> Arc<dyn Machine> {
        Arc::new(FakeMachine { id: id.to_string(), pid, ended, state: self.state.clone() })
    }
}

#[async_trait]
impl Launcher for FakeLauncher {
    async fn start(
        &self,
        _rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        origin: Origin<'_>,
    ) -> Result<Arc<dyn Machine>, SandboxError> {
        let from = match origin {
            Origin::Boot { fresh } => Source::Boot { fresh },
            Origin::Snapshot(path) => Source::Snapshot(path.to_path_buf()),
            Origin::Suspended => Source::Suspended,
        };
        let scripted = {
            let mut state = self.state();
            let image_digest = spec.image_digest.clone();
            state.calls.push(Call::Start { id: id.to_string(), from, shape: spec.shape, image_digest });
            state.starts.pop_front()
        };
        let _ = self.open.subscribe().wait_for(|open| *open).await;
        if let Some(outcome) = scripted {
            return Err(outcome.error(spec, false));
        }
        // What a real start leaves: the run directory, with the disk overlay unless the VM
        // continues a saved one.
        let made = std::fs::create_dir_all(dir).and_then(|()| match origin {
            Origin::Suspended => Ok(()),
            _ => std::fs::write(dir.join(moat_sandbox::OVERLAY_FILE), b"a disk"),
        });
        made.map_err(|e| SandboxError::Io { what: format!("making {}", dir.display()), source: e })?;
        let qemu = self.state().spawn(dir);
        Ok(self.machine(id, qemu))
    }

    async fn adopt(
        &self,
        _rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        pid: u32,
    ) -> Result<Arc<dyn Machine>, SandboxError> {
        let mut state = self.state();
        state.calls.push(Call::Adopt { id: id.to_string(), pid });
        if let Some(outcome) = state.adopts.pop_front() {
            return Err(outcome.error(spec, true));
        }
        let Some(qemu) = state.qemus.get(&pid).filter(|q| q.dir == dir) else {
            return Err(SandboxError::Vmm(moat_vmm::VmmError::NotRunning));
        };
        let ended = qemu.alive.subscribe();
        drop(state);
        Ok(self.machine(id, (pid, ended)))
    }

    fn find_qemus(&self, run_root: &Path) -> Vec<(u32, PathBuf)> {
        self.qemus().into_iter().filter(|(_, dir)| dir.starts_with(run_root)).collect()
    }

    fn kill(&self, pid: u32, dir: &Path, _run_root: &Path) -> bool {
        let mut state = self.state();
        state.calls.push(Call::Kill { pid });
        let ours = state.qemus.get(&pid).is_some_and(|q| q.dir == dir);
        if ours {
            state.qemus.remove(&pid);
        }
        ours
    }

    async fn end(&self, pid: u32, dir: &Path, run_root: &Path) {
        self.kill(pid, dir, run_root);
    }
}

/// A running VM of the fake: a pid whose QEMU runs while the launcher lists it.
struct FakeMachine {
    id: String,
    pid: u32,
    ended: watch::Receiver<()>,
    state: Arc<Mutex<State>>,
}

impl FakeMachine {
    fn record(&self, call: Call) {
        self.state.lock().expect("no panics while held").calls.push(call);
    }
}

#[async_trait]
impl Machine for FakeMachine {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn guest(self: Arc<Self>) -> Option<Arc<Sandbox>> {
        None
    }

    async fn exited(&self) -> Result<(), SandboxError> {
        let mut ended = self.ended.clone();
        // Resolves with an error once the sender is gone: QEMU has ended.
        while ended.changed().await.is_ok() {}
        Ok(())
    }

    async fn exit_description(&self) -> String {
        "killed by signal 9".into()
    }

    async fn console_tail(&self, _lines: usize) -> String {
        "the fake console".into()
    }

    async fn shutdown(&self) {
        self.record(Call::Shutdown { id: self.id.clone() });
        self.state.lock().expect("no panics while held").qemus.remove(&self.pid);
    }

    async fn release(&self) {
        self.record(Call::Release { id: self.id.clone() });
    }

    async fn snapshot(&self, _rt: &Runtime, dest: &Path) -> Result<(), SandboxError> {
        self.record(Call::Snapshot { id: self.id.clone(), dest: dest.to_path_buf() });
        Ok(())
    }

    fn detach(self: Arc<Self>) {
        self.record(Call::Detach { id: self.id.clone() });
    }
}

/// The image every test sandbox boots, in the fake home's store.
pub(crate) const IMAGE: &str = "test";
pub(crate) const IMAGE_DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A service on a temporary home whose VMs are the fake's.
pub(crate) struct TestService {
    pub(crate) svc: Arc<Service>,
    pub(crate) vms: Arc<FakeLauncher>,
    _home: tempfile::TempDir,
}

impl TestService {
    pub(crate) fn new(limits: Limits) -> TestService {
        let home = tempfile::tempdir().expect("a temporary directory");
        let config = RuntimeConfig {
            home: home.path().to_path_buf(),
            qemu: None,
            kernel: None,
            agent: None,
            accel: moat_vmm::AccelChoice::Tcg,
            probe_timeout: std::time::Duration::from_secs(1),
            jail: false,
        };
        for dir in [config.run_dir(), config.cache_dir()] {
            std::fs::create_dir_all(dir).expect("the home's directories");
        }
        let images = moat_image::ImageStore::open(&config.images_dir()).expect("an image store");
        add_image(images.root());
        let rt = Runtime {
            qemu: "/nonexistent/qemu-system-x86_64".into(),
            qemu_version: "QEMU 0.0 (fake)".into(),
            kernel: moat_image::Kernel {
                path: "/nonexistent/vmlinuz".into(),
                release: "0.0-fake".into(),
                modules_dir: "/nonexistent/modules".into(),
            },
            initrd: config.cache_dir().join("initrd-fake.img"),
            accel: moat_vmm::AccelDecision { accel: moat_vmm::Accel::Tcg, reason: "fake".into(), from_cache: true },
            images,
            jail: None,
            cgroups: None,
            config,
        };
        let db = Db::open(home.path()).expect("a state database");
        let vms = FakeLauncher::new();
        TestService { svc: Service::new(rt, db, limits, vms.clone()), vms, _home: home }
    }

    /// A create of the test image, without a network or a template.
    pub(crate) fn request(name: &str) -> CreateSandbox {
        CreateSandbox {
            name: Some(name.into()),
            image: Some(IMAGE.into()),
            net: Some(NetSpec { mode: NetMode::None, ..NetSpec::default() }),
            template: Some(false),
            ..CreateSandbox::default()
        }
    }

    pub(crate) fn run_dir(&self, id: &str) -> PathBuf {
        self.svc.run_dir(id)
    }

    /// A sandbox recorded in `phase` (reached the way the service reaches it), without a network.
    pub(crate) fn record(&self, name: &str, phase: Phase) -> SandboxInfo {
        let mut info = crate::state::tests::sample(&moat_sandbox::new_id(), name);
        info.net = NetSpec { mode: NetMode::None, ..NetSpec::default() };
        let path = [Phase::Booting, Phase::Running, Phase::Stopping];
        let steps: &[Phase] = match phase {
            Phase::Creating => &[],
            Phase::Booting => &path[..1],
            Phase::Running => &path[..2],
            Phase::Stopping => &path,
            Phase::Failed => &[Phase::Failed],
            at_rest => &[Phase::Booting, Phase::Running, Phase::Stopping, at_rest],
        };
        self.svc
            .db(|db| {
                db.insert(&info)?;
                for p in steps {
                    db.set_phase(&info.id, *p, None)?;
                }
                db.get(&info.id)
            })
            .expect("the record is written")
            .expect("the record exists")
    }

    /// The sandbox's record as it is now.
    pub(crate) fn get(&self, id: &str) -> SandboxInfo {
        self.svc.db(|db| db.get(id)).expect("the database answers").expect("the sandbox exists")
    }

    /// Wait (a few seconds at most) until sandbox `id` is in `phase`; its record then.
    pub(crate) async fn wait_for(&self, id: &str, phase: Phase) -> SandboxInfo {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // Armed before the look, so that a change in between is not missed.
            let changed = self.svc.events.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let info = self.get(id);
            if info.phase == phase {
                return info;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("sandbox {id} is {} after 10 s, not {phase}", info.phase);
            }
        }
    }
}

/// Register image [`IMAGE`] in the store at `root` as a build would leave it (any file will do
/// for a base disk no VM reads).
fn add_image(root: &Path) {
    let hex = IMAGE_DIGEST.trim_start_matches("sha256:");
    let dir = root.join("sha256").join(hex);
    std::fs::create_dir_all(&dir).expect("the image's directory");
    std::fs::write(dir.join("base.qcow2"), b"not a disk").expect("a base disk");
    let image = moat_image::Image {
        name: IMAGE.into(),
        digest: IMAGE_DIGEST.into(),
        base: dir.join("base.qcow2"),
        config: Default::default(),
        size_bytes: 1 << 30,
        source: "built-in".into(),
        created: 0,
        layers: Vec::new(),
    };
    std::fs::write(dir.join("image.json"), serde_json::to_vec(&image).expect("an image serializes"))
        .expect("its record");
    let index = serde_json::json!({ "names": { IMAGE: IMAGE_DIGEST } });
    std::fs::write(root.join("index.json"), index.to_string()).expect("the index");
}
