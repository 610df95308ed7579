//! Warm pool members: a sandbox restored ahead of time, its CPUs stopped until a create claims it
//! and gives it an identity of its own.

use std::time::Duration;

use crate::{Sandbox, SandboxError};

impl Sandbox {
    /// Stop the guest's CPUs: it holds its memory but uses no CPU until [`Sandbox::thaw`].
    pub async fn freeze(&self) -> Result<(), SandboxError> {
        let mut vm = self.vm.lock().await;
        vm.qmp()?.execute("stop", None).await.map_err(moat_vmm::VmmError::from)?;
        Ok(())
    }

    /// Run a frozen guest again as a new sandbox named `hostname`: a new agent session carries
    /// the hostname, the host's clock and fresh entropy (the handshake applies all three); the
    /// machine id is this sandbox's own already.
    pub async fn thaw(&self, hostname: &str, timeout: Duration) -> Result<(), SandboxError> {
        self.identity.write().expect("no panics while held").hostname = hostname.to_string();
        self.vm.lock().await.cont().await?;
        self.reconnect(timeout).await
    }
}
