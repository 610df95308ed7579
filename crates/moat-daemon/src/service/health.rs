//! The daemon's own state: what it runs on and how full it is.

use moat_api::Health;

use super::Service;

impl Service {
    /// The daemon's version, host runtime (accelerator, QEMU, kernel) and live sandbox count.
    pub fn health(&self) -> Health {
        Health {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            accel: self.rt.accel.accel.to_string(),
            accel_reason: self.rt.accel.reason.clone(),
            qemu_version: self.rt.qemu_version.clone(),
            kernel: self.rt.kernel.release.clone(),
            kernel_path: self.rt.kernel.path.display().to_string(),
            sandboxes: self.live_count(),
            max_sandboxes: self.limits.max_sandboxes,
        }
    }
}
