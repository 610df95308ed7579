//! One sandbox: a disk overlay, a QEMU process and the agent link into it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_image::Image;
use moat_proto::{ExecRequest, Identity};
use moat_vmm::{Accel, ExitWatcher, Memory, Vm, VmConfig};

use crate::agent_link::{AgentLink, Exec};
use crate::runtime::{create_private_dir, Runtime};
use crate::snapshot::{
    discard_saved, remove_if_exists, SavedMachine, DISK_FILE, FULL_STATE_FILE, MEM_FILE, STATE_FILE,
};
use crate::{SandboxError, Shape};

/// What a sandbox should look like.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub image: String,
    /// Boot this exact image, shown as `image`: a sandbox keeps the image it was made from when
    /// the name is later pointed elsewhere. `None`: whatever `image` names now.
    pub image_digest: Option<String>,
    /// vCPUs, memory and root disk, checked when the shape was made.
    pub shape: Shape,
    pub hostname: Option<String>,
    /// How long the guest may take from QEMU start until the agent answers.
    pub boot_timeout: Duration,
    /// Kill QEMU when this process dies (one-shot runs); daemons leave it running.
    pub die_with_parent: bool,
    /// A NIC (virtio-net) whose other end is `net.sock` in the run directory, for moat's
    /// network stack to connect to. Snapshots keep it: a restore must ask for the same.
    pub nic: bool,
}

/// The image `spec` boots: its pinned digest, else what its name points to now.
fn image_of(rt: &Runtime, spec: &SandboxSpec) -> Result<moat_image::Image, SandboxError> {
    Ok(match &spec.image_digest {
        Some(digest) => rt.images.by_digest(&spec.image, digest)?,
        None => rt.images.resolve(&spec.image)?,
    })
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            image: "minimal".into(),
            image_digest: None,
            shape: Shape::default(),
            hostname: None,
            boot_timeout: Duration::from_secs(60),
            die_with_parent: true,
            nic: false,
        }
    }
}

/// How long a restored guest's agent gets to answer one connection before moat connects again.
const RESTORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between connections to an agent that refused or dropped one.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// The sandbox's disk overlay inside its run directory.
pub const OVERLAY_FILE: &str = "root.qcow2";

/// A booted sandbox with a live agent link. Shared by reference: every method takes `&self`.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub image: Image,
    pub accel: Accel,
    /// Time from QEMU start until the agent answered the handshake (zero when adopted).
    pub boot_time: Duration,
    /// Where the start went, step by step (zero when adopted).
    pub timeline: StartTimeline,
    pid: u32,
    /// How QEMU was started: a restore of a snapshot of this sandbox starts the same machine.
    pub(crate) cfg: VmConfig,
    /// Hostname and machine id, sent in every handshake; a claimed pool member gets new ones.
    pub(crate) identity: std::sync::RwLock<Identity>,
    pub(crate) vm: tokio::sync::Mutex<Vm>,
    link: std::sync::RwLock<Arc<AgentLink>>,
}

/// How long the steps of [`Sandbox::start`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimeline {
    /// The run directory and disk overlay made.
    pub prepare: Duration,
    /// QEMU spawned (in its jail) until it answered on QMP.
    pub qemu_start: Duration,
    /// A saved state loaded and the guest running again (zero for a boot).
    pub state_load: Duration,
    /// The guest running until its agent answered the handshake.
    pub agent: Duration,
}

/// Where a sandbox's VM comes from when it starts.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// Boot the image's kernel. With `fresh`, on a new disk overlay (replacing any old one);
    /// otherwise on the existing overlay (a stopped sandbox's disk).
    Boot { fresh: bool },
    /// Continue the VM saved in a snapshot directory (see [`Sandbox::snapshot`]): a new overlay on
    /// its disk, its memory file mapped copy-on-write, its device state loaded.
    Snapshot(&'a Path),
    /// Continue this sandbox's own VM, saved by [`Sandbox::suspend`].
    Suspended,
}

/// A fresh random sandbox id: 12 hex digits, short enough for socket paths.
pub fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// The sandbox's hostname and a machine id derived from its id (stable across daemon restarts).
fn identity(spec: &SandboxSpec, id: &str) -> Identity {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(format!("moat machine-id {id}").as_bytes());
    let machine_id = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    Identity { hostname: spec.hostname.clone().unwrap_or_else(|| format!("moat-{id}")), machine_id }
}

fn vm_config(rt: &Runtime, spec: &SandboxSpec, id: &str, dir: &Path) -> VmConfig {
    let hostname = identity(spec, id).hostname;
    VmConfig {
        qemu: rt.qemu.clone(),
        accel: rt.accel.accel,
        vcpus: spec.shape.vcpus(),
        memory_mib: spec.shape.memory_mib(),
        kernel: rt.kernel.path.clone(),
        initrd: rt.initrd.clone(),
        cmdline: format!("moat.root=/dev/vda moat.port=moat.agent moat.hostname={hostname}"),
        root_disk: Some(dir.join(OVERLAY_FILE)),
        run_dir: dir.to_path_buf(),
        seccomp: true,
        name: id.to_string(),
        memory: Some(Memory::Own(dir.join(MEM_FILE))),
        incoming: false,
        nic: spec.nic,
        jail: rt.jail.clone(),
        cgroups: rt.cgroups.clone(),
    }
}

impl Sandbox {
    /// A one-shot sandbox: a new id and run directory, a fresh overlay, QEMU, the agent. On any
    /// failure everything created so far is removed again and no QEMU is left running.
    pub async fn boot(rt: &Runtime, spec: &SandboxSpec) -> Result<Sandbox, SandboxError> {
        let id = new_id();
        let dir = rt.config.run_dir().join(&id);
        let result = Self::start(rt, spec, &id, &dir, Origin::Boot { fresh: true }).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    /// Start sandbox `id` in `dir` from `origin`. Returns once the agent has answered, with the
    /// sandbox's identity applied and (after a restore) its clock and RNG fresh. On failure no
    /// QEMU is left running; the directory stays for the caller to keep or remove.
    pub async fn start(
        rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        origin: Origin<'_>,
    ) -> Result<Sandbox, SandboxError> {
        let begun = Instant::now();
        validate(spec)?;
        let image = image_of(rt, spec)?;
        create_private_dir(dir)?;
        let mut cfg = vm_config(rt, spec, id, dir);
        let overlay = dir.join(OVERLAY_FILE);
        let mem = dir.join(MEM_FILE);
        let state = match origin {
            Origin::Boot { fresh } => {
                if fresh || !overlay.exists() {
                    remove_if_exists(&overlay)?;
                    rt.images.create_overlay(&image, &overlay, Some(spec.shape.disk_bytes()))?;
                    moat_vmm::note_backing(&overlay).map_err(moat_vmm::VmmError::from)?;
                }
                // Whatever an earlier run left in guest RAM is of no use to a boot.
                remove_if_exists(&mem)?;
                None
            }
            Origin::Snapshot(snapshot) => {
                remove_if_exists(&overlay)?;
                rt.images.overlay_on_layer(&snapshot.join(DISK_FILE), &overlay)?;
                moat_vmm::note_backing(&overlay).map_err(moat_vmm::VmmError::from)?;
                remove_if_exists(&mem)?;
                cfg.memory = Some(Memory::Snapshot(snapshot.join(MEM_FILE)));
                Some((snapshot.join(STATE_FILE), true))
            }
            Origin::Suspended => {
                if SavedMachine::of(dir) != SavedMachine::Complete {
                    return Err(SandboxError::Restore {
                        reason: format!("the saved state in {} is missing", dir.display()),
                        console: String::new(),
                    });
                }
                discard_saved(dir, true);
                let state = dir.join(STATE_FILE);
                if state.exists() {
                    Some((state, true))
                } else {
                    // Only the stream with RAM in it (a pause whose RAM was not split off into
                    // its own file): it loads into a fresh RAM file of the sandbox's own.
                    remove_if_exists(&mem)?;
                    Some((dir.join(FULL_STATE_FILE), false))
                }
            }
        };
        cfg.incoming = state.is_some();
        let identity = identity(spec, id);
        let started = Instant::now();
        let mut timeline = StartTimeline { prepare: started - begun, ..StartTimeline::default() };
        let mut vm = Vm::spawn(&cfg, spec.die_with_parent).await?;
        timeline.qemu_start = started.elapsed();
        tracing::debug!(sandbox = %id, elapsed = ?started.elapsed(), "QEMU answers on QMP");
        if let Some((state, ram_in_file)) = &state {
            // `load` runs the guest once the state is in.
            if let Err(e) = vm.load(state, *ram_in_file).await {
                let console = vm.console_tail(20);
                vm.kill().await;
                return Err(SandboxError::Restore { reason: moat_hint::one_line(&e), console });
            }
            timeline.state_load = started.elapsed() - timeline.qemu_start;
            tracing::debug!(sandbox = %id, elapsed = ?started.elapsed(), "saved state loaded, guest running");
        }
        let running = Instant::now();
        let socket = vm.agent_socket();
        // A restored agent is already up and answers within a second. Rarely (about one restore
        // in fifty under TCG) it never sees the first connection's hello; a new connection, which
        // the guest sees as a hang-up and a reconnect, gets it going again.
        let restored = state.is_some();
        let per_attempt = if restored { RESTORE_CONNECT_TIMEOUT } else { spec.boot_timeout };
        let deadline = Instant::now() + spec.boot_timeout;
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            let limit =
                per_attempt.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
            let outcome = tokio::select! {
                r = tokio::time::timeout(limit, AgentLink::connect(&socket, Some(identity.clone()))) => Ok(r),
                status = vm.wait(limit + Duration::from_secs(1)) => Err(status),
            };
            if restored && matches!(outcome, Ok(Err(_))) && Instant::now() < deadline {
                tracing::warn!(sandbox = %id, attempt, "the restored agent did not answer; connecting again");
                continue;
            }
            break outcome;
        };
        let link = match outcome {
            Ok(Ok(Ok(link))) => link,
            failed => {
                let console = vm.console_tail(20);
                vm.kill().await;
                return Err(match failed {
                    Ok(Ok(Err(e))) => SandboxError::Boot { reason: moat_hint::one_line(&e), console },
                    Ok(Err(_)) => SandboxError::BootTimeout { timeout: spec.boot_timeout, console },
                    Err(Ok(Some(status))) => SandboxError::Boot {
                        reason: format!("QEMU exited ({status}) before the agent answered"),
                        console,
                    },
                    Err(Ok(None)) => SandboxError::BootTimeout { timeout: spec.boot_timeout, console },
                    Err(Err(e)) => SandboxError::Boot { reason: moat_hint::one_line(&e), console },
                    Ok(Ok(Ok(_))) => unreachable!("handled above"),
                });
            }
        };
        if matches!(origin, Origin::Suspended) {
            // Running again: the saved device state is stale now.
            discard_saved(dir, false);
        }
        let boot_time = started.elapsed();
        timeline.agent = running.elapsed();
        tracing::info!(sandbox = %id, ?boot_time, ?timeline, restored = state.is_some(), agent = %link.agent().agent_version, "sandbox running");
        Ok(Sandbox {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            image,
            accel: rt.accel.accel,
            boot_time,
            timeline,
            pid: vm.pid(),
            cfg,
            identity: std::sync::RwLock::new(identity),
            vm: tokio::sync::Mutex::new(vm),
            link: std::sync::RwLock::new(Arc::new(link)),
        })
    }

    /// Take over a sandbox whose QEMU (pid `pid`) an earlier daemon started: verify the process
    /// is that sandbox's QEMU, run the guest again if that daemon died while it was paused (in
    /// the middle of a snapshot or a pause: the half-done save is cancelled), then connect to its
    /// agent again, which also sets the guest's clock. The agent gets `spec.boot_timeout` to
    /// answer. On failure QEMU is left as it is, for the caller to decide.
    pub async fn adopt(
        rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        pid: u32,
    ) -> Result<Sandbox, SandboxError> {
        let image = image_of(rt, spec)?;
        let mut cfg = vm_config(rt, spec, id, dir);
        if !dir.join(MEM_FILE).exists() {
            // Restored from a snapshot: its RAM is that snapshot's file, mapped private. Which
            // snapshot does not matter from here on, only that RAM is not this sandbox's file.
            cfg.memory = Some(Memory::Snapshot(dir.join(MEM_FILE)));
        }
        let identity = identity(spec, id);
        let mut vm = Vm::adopt(&cfg, pid).await?;
        let deadline = Instant::now() + spec.boot_timeout;
        match vm.resume_if_paused().await {
            Ok(true) => tracing::warn!(sandbox = %id, "the guest was left paused by a save cut short; it runs again"),
            Ok(false) => {}
            Err(e) => {
                vm.detach();
                return Err(e.into());
            }
        }
        let socket = vm.agent_socket();
        // As after a restore, an agent whose previous connection was cut may miss the first
        // hello of a new one; connecting again gets it going.
        let link = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = RESTORE_CONNECT_TIMEOUT.min(left).max(Duration::from_millis(1));
            match tokio::time::timeout(limit, AgentLink::connect(&socket, Some(identity.clone()))).await {
                Ok(Ok(link)) => break link,
                _ if Instant::now() < deadline => {
                    tracing::debug!(sandbox = %id, "the adopted agent did not answer; connecting again");
                    tokio::time::sleep(RECONNECT_PAUSE.min(left)).await;
                }
                failed => {
                    let console = vm.console_tail(20);
                    vm.detach();
                    return Err(match failed {
                        Ok(Err(e)) => e.into(),
                        _ => SandboxError::AdoptTimeout { timeout: spec.boot_timeout, console },
                    });
                }
            }
        };
        Ok(Sandbox {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            image,
            accel: rt.accel.accel,
            boot_time: Duration::ZERO,
            timeline: StartTimeline::default(),
            pid,
            cfg,
            identity: std::sync::RwLock::new(identity),
            vm: tokio::sync::Mutex::new(vm),
            link: std::sync::RwLock::new(Arc::new(link)),
        })
    }

    /// Whether QEMU still runs.
    pub async fn is_running(&self) -> bool {
        self.vm.lock().await.try_exited().is_none()
    }

    /// QEMU's pid on the host.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves when QEMU exits, for whatever reason.
    pub async fn exit_watcher(&self) -> Result<ExitWatcher, SandboxError> {
        Ok(self.vm.lock().await.exit_watcher()?)
    }

    /// How QEMU ended, in words (after it did).
    pub async fn exit_description(&self) -> String {
        match self.vm.lock().await.wait(Duration::from_millis(500)).await {
            Ok(Some(exit)) => exit.to_string(),
            Ok(None) => "still running".into(),
            Err(e) => moat_hint::one_line(&e),
        }
    }

    /// The last lines of the guest console.
    pub async fn console_tail(&self, lines: usize) -> String {
        self.vm.lock().await.console_tail(lines)
    }

    /// The agent link, for operations beyond exec.
    pub fn link(&self) -> Arc<AgentLink> {
        self.link.read().expect("no panics while held").clone()
    }

    /// Drop the agent link and connect again, as a restarted daemon would. Processes started over
    /// the old link are killed by the agent when it notices the new session.
    pub async fn reconnect(&self, timeout: Duration) -> Result<(), SandboxError> {
        self.link().close();
        let socket = self.dir.join(moat_vmm::run_files::AGENT_SOCKET);
        let identity = self.identity.read().expect("no panics while held").clone();
        let link = match tokio::time::timeout(timeout, AgentLink::connect(&socket, Some(identity))).await {
            Ok(link) => link?,
            Err(_) => {
                return Err(SandboxError::Boot {
                    reason: "the agent did not answer after a reconnect".into(),
                    console: self.console_tail(20).await,
                })
            }
        };
        *self.link.write().expect("no panics while held") = Arc::new(link);
        Ok(())
    }

    /// Start a process in the sandbox, with the image's environment and working directory as defaults.
    pub async fn exec(&self, mut request: ExecRequest) -> Result<Exec, SandboxError> {
        if request.argv.is_empty() {
            return Err(SandboxError::InvalidSpec("no command given".into()));
        }
        let mut env = self.image.config.env.clone();
        env.retain(|(k, _)| !request.env.iter().any(|(rk, _)| rk == k));
        env.append(&mut request.env);
        request.env = env;
        if request.cwd.is_none() {
            request.cwd = self.image.config.working_dir.clone();
        }
        if request.user.is_none() {
            request.user = self.image.config.user.clone();
        }
        Ok(self.link().exec(request).await?)
    }

    /// A request the agent answers at once (jobs, kill): its `Started`.
    pub async fn request(&self, request: moat_proto::Request) -> Result<moat_proto::Started, SandboxError> {
        Ok(self.link().request(request).await?)
    }

    /// A file operation that answers at once; see [`moat_proto::Request`].
    pub async fn file_op(&self, request: moat_proto::Request) -> Result<moat_proto::FsReply, SandboxError> {
        Ok(self.link().file_op(request).await?)
    }

    /// A streaming file operation; see [`AgentLink::file_stream`].
    pub async fn file_stream(&self, request: moat_proto::Request) -> Result<Exec, SandboxError> {
        Ok(self.link().file_stream(request).await?)
    }

    /// Power the guest off (asking the agent first, then QEMU, then SIGKILL). The run directory
    /// and the disk stay; sockets and the pidfile go.
    pub async fn shutdown(&self) {
        let link = self.link();
        let asked = tokio::time::timeout(Duration::from_secs(2), link.shutdown()).await;
        let grace = if matches!(asked, Ok(Ok(()))) { Duration::from_secs(5) } else { Duration::ZERO };
        link.close();
        if let Err(e) = self.vm.lock().await.stop(grace).await {
            tracing::warn!(sandbox = %self.id, error = %e, "stopping QEMU failed");
        }
        // Guest RAM is of no use once the guest is off; the next start boots afresh.
        let _ = std::fs::remove_file(self.dir.join(MEM_FILE));
    }

    /// After QEMU died on its own: reap it and remove its sockets.
    pub async fn release(&self) {
        self.link().close();
        let _ = self.vm.lock().await.stop(Duration::ZERO).await;
    }

    /// Shut down and remove the run directory with the disk.
    pub async fn destroy(self) -> Result<(), SandboxError> {
        self.shutdown().await;
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| SandboxError::Io { what: format!("removing {}", self.dir.display()), source: e })
    }

    /// Let go of the VM without stopping it (a daemon exiting; the next one adopts it).
    pub fn detach(self) {
        self.link().close();
        self.vm.into_inner().detach();
    }
}

/// Check a spec's hostname; its sizes were checked when its [`Shape`] was made.
pub fn validate(spec: &SandboxSpec) -> Result<(), SandboxError> {
    if let Some(h) = &spec.hostname {
        let ok = !h.is_empty()
            && h.len() <= 63
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !h.starts_with('-');
        if !ok {
            return Err(SandboxError::InvalidSpec(format!(
                "hostname {h:?} is not valid; use 1-63 letters, digits and '-', not starting with '-'"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_checked() {
        let ok = SandboxSpec::default();
        assert!(validate(&ok).is_ok());
        assert!(validate(&SandboxSpec { hostname: Some("a b".into()), ..ok.clone() }).is_err());
        assert!(validate(&SandboxSpec { hostname: Some("-x".into()), ..ok.clone() }).is_err());
        assert!(validate(&SandboxSpec { hostname: Some("box-1".into()), ..ok }).is_ok());
    }

    #[test]
    fn ids_are_short_hex() {
        let id = new_id();
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
