//! One sandbox: a disk overlay, a QEMU process and the agent link into it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_image::Image;
use moat_proto::ExecRequest;
use moat_vmm::{Accel, Vm, VmConfig};

use crate::agent_link::{AgentLink, Exec};
use crate::runtime::{create_private_dir, Runtime};
use crate::SandboxError;

/// What a sandbox should look like.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Virtual size of the root disk; the image's size when absent.
    pub disk_bytes: Option<u64>,
    pub hostname: Option<String>,
    /// How long the guest may take from QEMU start until the agent answers.
    pub boot_timeout: Duration,
    /// Kill QEMU when this process dies (one-shot runs); daemons leave it running.
    pub die_with_parent: bool,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            image: "minimal".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_bytes: None,
            hostname: None,
            boot_timeout: Duration::from_secs(60),
            die_with_parent: true,
        }
    }
}

/// A booted sandbox with a live agent link.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub image: Image,
    pub accel: Accel,
    /// Time from QEMU start until the agent answered the handshake.
    pub boot_time: Duration,
    vm: Vm,
    link: Arc<AgentLink>,
}

/// A fresh random sandbox id: 12 hex digits, short enough for socket paths.
pub fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl Sandbox {
    /// Create the overlay, start QEMU and wait for the agent. On any failure everything created so
    /// far is removed again and no QEMU is left running.
    pub async fn boot(rt: &Runtime, spec: &SandboxSpec) -> Result<Sandbox, SandboxError> {
        validate(spec)?;
        let image = rt.images.resolve(&spec.image)?;
        let id = new_id();
        let dir = rt.config.run_dir().join(&id);
        create_private_dir(&dir)?;
        let result = Self::boot_in(rt, spec, image, id, dir.clone()).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    async fn boot_in(
        rt: &Runtime,
        spec: &SandboxSpec,
        image: Image,
        id: String,
        dir: PathBuf,
    ) -> Result<Sandbox, SandboxError> {
        let overlay = dir.join("root.qcow2");
        rt.images.create_overlay(&image, &overlay, spec.disk_bytes)?;
        let hostname = spec.hostname.clone().unwrap_or_else(|| format!("moat-{id}"));
        let cfg = VmConfig {
            qemu: rt.qemu.clone(),
            accel: rt.accel.accel,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: rt.kernel.path.clone(),
            initrd: rt.initrd.clone(),
            cmdline: format!("moat.root=/dev/vda moat.port=moat.agent moat.hostname={hostname}"),
            root_disk: Some(overlay),
            run_dir: dir.clone(),
            seccomp: true,
            name: id.clone(),
        };
        let started = Instant::now();
        let mut vm = Vm::spawn(&cfg, spec.die_with_parent).await?;
        let socket = vm.agent_socket();
        let outcome = tokio::select! {
            r = tokio::time::timeout(spec.boot_timeout, AgentLink::connect(&socket)) => Ok(r),
            status = vm.wait(spec.boot_timeout + Duration::from_secs(1)) => Err(status),
        };
        let link = match outcome {
            Ok(Ok(Ok(link))) => link,
            failed => {
                let console = vm.console_tail(20);
                vm.kill().await;
                return Err(match failed {
                    Ok(Ok(Err(e))) => SandboxError::Boot { reason: e.to_string(), console },
                    Ok(Err(_)) => SandboxError::BootTimeout { timeout: spec.boot_timeout, console },
                    Err(Ok(Some(status))) => SandboxError::Boot {
                        reason: format!("QEMU exited ({status}) before the agent answered"),
                        console,
                    },
                    Err(Ok(None)) => SandboxError::BootTimeout { timeout: spec.boot_timeout, console },
                    Err(Err(e)) => SandboxError::Boot { reason: e.to_string(), console },
                    Ok(Ok(Ok(_))) => unreachable!("handled above"),
                });
            }
        };
        let boot_time = started.elapsed();
        tracing::info!(sandbox = %id, ?boot_time, agent = %link.agent().agent_version, "sandbox running");
        Ok(Sandbox { id, dir, image, accel: rt.accel.accel, boot_time, vm, link: Arc::new(link) })
    }

    /// The agent link, for operations beyond exec.
    pub fn link(&self) -> &Arc<AgentLink> {
        &self.link
    }

    /// Drop the agent link and connect again, as a restarted daemon would. Processes started over
    /// the old link are killed by the agent when it notices the disconnect.
    pub async fn reconnect(&mut self, timeout: Duration) -> Result<(), SandboxError> {
        self.link.close();
        let link =
            tokio::time::timeout(timeout, AgentLink::connect(&self.vm.agent_socket())).await.map_err(|_| {
                SandboxError::Boot {
                    reason: "the agent did not answer after a reconnect".into(),
                    console: self.vm.console_tail(20),
                }
            })??;
        self.link = Arc::new(link);
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
        Ok(self.link.exec(request).await?)
    }

    /// Power the guest off (asking the agent first, then QEMU, then SIGKILL) and remove its files.
    pub async fn destroy(mut self) -> Result<(), SandboxError> {
        let asked = tokio::time::timeout(Duration::from_secs(2), self.link.shutdown()).await;
        let grace = if matches!(asked, Ok(Ok(()))) { Duration::from_secs(5) } else { Duration::ZERO };
        let stopped = self.vm.stop(grace).await;
        let removed = std::fs::remove_dir_all(&self.dir);
        stopped?;
        removed.map_err(|e| SandboxError::Io { what: format!("removing {}", self.dir.display()), source: e })
    }
}

fn validate(spec: &SandboxSpec) -> Result<(), SandboxError> {
    if spec.vcpus == 0 || spec.vcpus > 64 {
        return Err(SandboxError::InvalidSpec(format!("{} vCPUs is out of range; use 1 to 64", spec.vcpus)));
    }
    if spec.memory_mib < 64 || spec.memory_mib > 256 * 1024 {
        return Err(SandboxError::InvalidSpec(format!(
            "{} MiB of memory is out of range; use 64 MiB to 256 GiB",
            spec.memory_mib
        )));
    }
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
    fn spec_limits_are_enforced() {
        let ok = SandboxSpec::default();
        assert!(validate(&ok).is_ok());
        assert!(validate(&SandboxSpec { vcpus: 0, ..ok.clone() }).is_err());
        assert!(validate(&SandboxSpec { memory_mib: 1, ..ok.clone() }).is_err());
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
