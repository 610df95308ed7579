//! What `moat inspect` shows of how a running sandbox's QEMU is confined, read from the host as
//! it is (the process's credentials and namespaces, its cgroup's files), not from settings.

use std::path::Path;

use moat_api::{CgroupUsage, Isolation, SandboxInfo};

use super::Service;
use crate::error::ServiceError;

/// The namespaces a jail gives QEMU, as `/proc/<pid>/ns` names them.
const NAMESPACES: [&str; 6] = ["mnt", "pid", "net", "ipc", "uts", "user"];

impl Service {
    /// One sandbox, with how its QEMU is confined while it runs.
    pub fn inspect(&self, reference: &str) -> Result<SandboxInfo, ServiceError> {
        let mut info = self.resolve(reference)?;
        if let Some(pid) = info.pid {
            info.isolation = isolation_of(pid, &info.id, self.rt.cgroups.as_ref());
        }
        Ok(info)
    }
}

fn isolation_of(pid: u32, id: &str, cgroups: Option<&moat_vmm::CgroupHost>) -> Option<Isolation> {
    let proc = Path::new("/proc").join(pid.to_string());
    let status = std::fs::read_to_string(proc.join("status")).ok()?;
    let uid: u32 = status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()?;
    let own = rustix::process::geteuid().as_raw();
    let namespaces = NAMESPACES
        .iter()
        .filter(|ns| {
            let theirs = std::fs::read_link(proc.join("ns").join(ns));
            theirs.is_ok_and(|t| std::fs::read_link(format!("/proc/self/ns/{ns}")).is_ok_and(|o| o != t))
        })
        .map(|ns| ns.to_string())
        .collect();
    let cgroup = cgroups.and_then(|host| moat_vmm::SandboxCgroup::open(host, id)).map(|cg| {
        let stats = cg.stats();
        CgroupUsage {
            version: cg.version().to_string(),
            memory_bytes: stats.memory_current,
            memory_limit_bytes: stats.memory_max,
            pids: stats.pids_current,
            pids_limit: stats.pids_max,
            cpu_usage_us: stats.cpu_usage_usec,
        }
    });
    Some(Isolation { uid, own_uid: uid != 0 && uid != own, namespaces, cgroup })
}
