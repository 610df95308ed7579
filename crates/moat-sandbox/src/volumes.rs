//! Volumes in a running sandbox: the disk plugged into the VM (moat-vmm) and its file system
//! mounted by the agent, in that order, and taken away in the reverse order.

use std::time::Duration;

use moat_proto::{Request, Started};

use crate::{LinkError, Sandbox, SandboxError};

/// How long the agent may take to mount or unmount a volume: it waits up to 10 s for a disk to
/// appear, and mounting may replay a journal.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

impl Sandbox {
    /// Plug `file` (the volume's ext4 image, opened read-only for `readonly`, else read-write)
    /// into volume slot `slot` (below [`moat_vmm::MAX_VOLUMES`]) and have the agent mount it at
    /// `path`, giving a fresh file system to the guest user `owner`. If the mount fails the disk
    /// is unplugged again. Mounting the same volume at the same path again is fine.
    pub async fn plug_volume(
        &self,
        slot: u8,
        file: std::fs::File,
        path: &str,
        readonly: bool,
        owner: Option<&str>,
    ) -> Result<(), SandboxError> {
        let serial = self.vm.lock().await.plug_volume(slot, file, readonly).await?;
        let mount = Request::MountVolume { serial, path: path.into(), readonly, owner: owner.map(Into::into) };
        if let Err(e) = self.volume_request(mount, path).await {
            if let Err(unplug) = self.vm.lock().await.unplug_volume(slot).await {
                tracing::warn!(sandbox = %self.id, slot, error = %unplug, "unplugging a volume that did not mount failed");
            }
            return Err(e);
        }
        tracing::debug!(sandbox = %self.id, slot, path, readonly, "volume mounted");
        Ok(())
    }

    /// Have the agent unmount the volume at `path`, then unplug the disk in `slot`. While
    /// something in the guest uses the volume the agent refuses, with
    /// [`moat_proto::ErrorCode::Busy`] and the processes named, as
    /// `SandboxError::Link(LinkError::Agent(_))`, and the volume stays. Nothing mounted and
    /// nothing plugged is fine.
    pub async fn unplug_volume(&self, slot: u8, path: &str) -> Result<(), SandboxError> {
        self.volume_request(Request::UnmountVolume { path: path.into() }, path).await?;
        self.vm.lock().await.unplug_volume(slot).await?;
        tracing::debug!(sandbox = %self.id, slot, path, "volume unplugged");
        Ok(())
    }

    /// The volume slots that hold a disk now (asked of QEMU, so also right for an adopted VM).
    pub async fn plugged_volumes(&self) -> Result<Vec<u8>, SandboxError> {
        Ok(self.vm.lock().await.plugged_volumes().await?)
    }

    async fn volume_request(&self, request: Request, path: &str) -> Result<(), SandboxError> {
        let what = match request {
            Request::MountVolume { .. } => format!("mounting the volume at {path}"),
            _ => format!("unmounting the volume at {path}"),
        };
        match tokio::time::timeout(AGENT_TIMEOUT, self.request(request)).await {
            Ok(Ok(Started::Done)) => Ok(()),
            Ok(Ok(other)) => {
                Err(LinkError::Protocol { channel: 0, reason: format!("{what}: expected done, got {other:?}") }.into())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SandboxError::AgentTimeout { what, timeout: AGENT_TIMEOUT }),
        }
    }
}
