//! The daemon's own state: what it runs on, how full it is, where it listens.

use std::time::Instant;

use moat_api::Health;

use super::Service;

/// Where the daemon listens and since when, set once it listens.
#[derive(Debug, Clone)]
pub(crate) struct Listening {
    pub started: Instant,
    pub socket: String,
    /// `tcp://ADDR` or `https://ADDR`.
    pub tcp: Option<String>,
}

impl Service {
    /// The daemon's version, host runtime (accelerator, QEMU, kernel), live sandbox count and
    /// listeners.
    pub fn health(&self) -> Health {
        let listening = self.listening.get();
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
            uptime_secs: listening.map_or(0, |l| l.started.elapsed().as_secs()),
            socket: listening.map(|l| l.socket.clone()).unwrap_or_default(),
            tcp: listening.and_then(|l| l.tcp.clone()),
            systemd_unit: std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|c| systemd_unit(&c)),
        }
    }
}

/// The system service whose cgroup this process is in (`/system.slice/NAME.service[/…]`), from
/// `/proc/self/cgroup`. A daemon in a user's session or a container is in none.
fn systemd_unit(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let unit = path.strip_prefix("/system.slice/")?.split('/').next()?;
        unit.ends_with(".service").then(|| unit.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_service_is_told_from_a_session() {
        assert_eq!(systemd_unit("0::/system.slice/moat.service\n").as_deref(), Some("moat.service"));
        assert_eq!(systemd_unit("0::/system.slice/moat.service/daemon\n").as_deref(), Some("moat.service"));
        assert_eq!(systemd_unit("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope\n"), None);
        assert_eq!(systemd_unit("0::/\n"), None);
        assert_eq!(
            systemd_unit("12:pids:/system.slice/moat.service\n1:name=systemd:/system.slice/moat.service\n").as_deref(),
            Some("moat.service")
        );
    }
}
