//! The seam between the service and its VMs. [`Launcher`] is everything the service asks of the
//! VM layer to start, restore, adopt, find and kill QEMUs; a [`Machine`] is one running VM. The
//! daemon uses [`Qemu`] (moat_sandbox and moat_vmm underneath); unit tests use the recording
//! double in `fake`, so creates, capacity, templates, gc and adoption are tested without QEMU.
//! youki's `Syscall` trait and its `TestHelperSyscall` are the model.
//!
//! Not behind the seam: what runs inside a guest (exec, files, processes, the network stack and
//! the CA of a sandbox with secrets) and pausing, which need a real [`Sandbox`] and its agent
//! link: [`Machine::guest`] hands it over, and a double has none. Files in run directories (disk
//! overlays aside, which a start makes) are the service's own and stay plain file operations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moat_sandbox::{Origin, Runtime, Sandbox, SandboxError, SandboxSpec};

#[cfg(test)]
pub(crate) mod fake;

/// How long a killed QEMU may take to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the service asks of the VM layer.
#[async_trait]
pub trait Launcher: Send + Sync {
    /// Start sandbox `id` in `dir` from `origin` (see [`Sandbox::start`]); returns once its agent
    /// has answered. On failure no QEMU is left running.
    async fn start(
        &self,
        rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        origin: Origin<'_>,
    ) -> Result<Arc<dyn Machine>, SandboxError>;

    /// Take over QEMU `pid`, which an earlier daemon started for sandbox `id` in `dir` (see
    /// [`Sandbox::adopt`]). On failure QEMU is left as it was.
    async fn adopt(
        &self,
        rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        pid: u32,
    ) -> Result<Arc<dyn Machine>, SandboxError>;

    /// The moat QEMUs that run with a run directory under `run_root`: (pid, run directory).
    fn find_qemus(&self, run_root: &Path) -> Vec<(u32, PathBuf)>;

    /// SIGKILL QEMU `pid`, but only if it is still a moat QEMU of `dir` (the pid may have been
    /// reused since it was found). Whether it was killed.
    fn kill(&self, pid: u32, dir: &Path, run_root: &Path) -> bool;

    /// [`Launcher::kill`], then wait a little until QEMU has exited.
    async fn end(&self, pid: u32, dir: &Path, run_root: &Path);
}

/// One running VM.
#[async_trait]
pub trait Machine: Send + Sync {
    /// The sandbox's id.
    fn id(&self) -> &str;

    /// QEMU's pid on the host.
    fn pid(&self) -> u32;

    /// The sandbox itself, for what runs inside the guest; `None` for a test double.
    fn guest(self: Arc<Self>) -> Option<Arc<Sandbox>>;

    /// Resolves when QEMU has exited, for whatever reason; fails when it cannot be watched.
    async fn exited(&self) -> Result<(), SandboxError>;

    /// How QEMU ended, in words (once it has).
    async fn exit_description(&self) -> String;

    /// The last lines of the guest console.
    async fn console_tail(&self, lines: usize) -> String;

    /// Power the guest off; its run directory and disk stay.
    async fn shutdown(&self);

    /// After QEMU ended on its own: reap it and remove its sockets.
    async fn release(&self);

    /// Save the whole machine into the empty directory `dest`; the guest runs on.
    async fn snapshot(&self, rt: &Runtime, dest: &Path) -> Result<(), SandboxError>;

    /// Let go of the VM without stopping it (the daemon exits; the next one adopts it).
    fn detach(self: Arc<Self>);
}

/// The real VMs: QEMU processes, through [`moat_sandbox`] and [`moat_vmm`].
pub struct Qemu;

#[async_trait]
impl Launcher for Qemu {
    async fn start(
        &self,
        rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        origin: Origin<'_>,
    ) -> Result<Arc<dyn Machine>, SandboxError> {
        Ok(Arc::new(Sandbox::start(rt, spec, id, dir, origin).await?))
    }

    async fn adopt(
        &self,
        rt: &Runtime,
        spec: &SandboxSpec,
        id: &str,
        dir: &Path,
        pid: u32,
    ) -> Result<Arc<dyn Machine>, SandboxError> {
        Ok(Arc::new(Sandbox::adopt(rt, spec, id, dir, pid).await?))
    }

    fn find_qemus(&self, run_root: &Path) -> Vec<(u32, PathBuf)> {
        moat_vmm::find_qemus_under(run_root)
    }

    fn kill(&self, pid: u32, dir: &Path, run_root: &Path) -> bool {
        kill_verified(pid, dir, run_root).is_some()
    }

    async fn end(&self, pid: u32, dir: &Path, run_root: &Path) {
        let Some(pidfd) = kill_verified(pid, dir, run_root) else { return };
        if tokio::time::timeout(KILL_TIMEOUT, moat_vmm::ExitWatcher::new(pidfd).wait()).await.is_err() {
            tracing::warn!(pid, "a killed QEMU has not exited yet");
        }
    }
}

/// SIGKILL a QEMU, but only after pinning it with a pidfd and checking again that the pinned
/// process is a moat QEMU of `dir`. Returns the pidfd of the killed process, which turns readable
/// once it has exited.
fn kill_verified(pid: u32, dir: &Path, run_root: &Path) -> Option<std::os::fd::OwnedFd> {
    use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
    let fd = pidfd_open(Pid::from_raw(pid as i32)?, PidfdFlags::empty()).ok()?;
    if !moat_vmm::find_qemus_under(run_root).iter().any(|(q, d)| *q == pid && d == dir) {
        return None;
    }
    pidfd_send_signal(&fd, Signal::Kill).ok()?;
    Some(fd)
}

#[async_trait]
impl Machine for Sandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> u32 {
        Sandbox::pid(self)
    }

    fn guest(self: Arc<Self>) -> Option<Arc<Sandbox>> {
        Some(self)
    }

    async fn exited(&self) -> Result<(), SandboxError> {
        Sandbox::exit_watcher(self).await?.wait().await;
        Ok(())
    }

    async fn exit_description(&self) -> String {
        Sandbox::exit_description(self).await
    }

    async fn console_tail(&self, lines: usize) -> String {
        Sandbox::console_tail(self, lines).await
    }

    async fn shutdown(&self) {
        Sandbox::shutdown(self).await
    }

    async fn release(&self) {
        Sandbox::release(self).await
    }

    async fn snapshot(&self, rt: &Runtime, dest: &Path) -> Result<(), SandboxError> {
        Sandbox::snapshot(self, rt, dest).await
    }

    fn detach(self: Arc<Self>) {
        match Arc::try_unwrap(self) {
            Ok(sandbox) => Sandbox::detach(sandbox),
            // Still held (by its exit watcher, or a request in flight): forgotten, so that no
            // drop kills the VM.
            Err(sandbox) => std::mem::forget(sandbox),
        }
    }
}
