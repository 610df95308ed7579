//! Admission control: a sandbox goes live only if the host can hold it. Before anything is built,
//! pulled or booted, a create, start, resume, revert or fork is refused when it would pass the cap
//! on live sandboxes, commit more memory than the host's RAM times `memory_overcommit`, let disks
//! grow past the home's free space times `disk_overcommit`, or (with `--require-kvm`) run without
//! KVM.
//!
//! The check runs under the database lock and the records are the reservations: a create inserts
//! its record (live from then on) in the same critical section as its check, and a start marks its
//! sandbox as starting (`Starting`) there, so two requests can never both pass on the same free
//! memory.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use moat_api::{ErrorCode, SandboxInfo};
use moat_vmm::{Accel, AccelDecision, QEMU_OVERHEAD_MIB};

use super::{Limits, Service};
use crate::error::ServiceError;
use crate::state::Db;

/// Memory that may be committed to live sandboxes, as a multiple of the host's RAM.
pub const DEFAULT_MEMORY_OVERCOMMIT: f64 = 1.5;
/// Growth that sandbox disks may still claim, as a multiple of the free space under the home:
/// disks are thin, and few fill up.
pub const DEFAULT_DISK_OVERCOMMIT: f64 = 4.0;

const MIB: u64 = 1 << 20;

/// What the host has, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    /// The host's RAM (`MemTotal`).
    pub memory_bytes: u64,
    /// RAM the host could still hand out now (`MemAvailable`), for the error message.
    pub available_memory_bytes: u64,
    /// Free space for unprivileged users on the home's filesystem (`f_bavail × f_frsize`).
    pub disk_free_bytes: u64,
}

/// Where admission takes the host's numbers from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HostProbe {
    /// `/proc/meminfo` and `statvfs` of the home, read at each check.
    #[default]
    Measured,
    /// Fixed numbers (tests).
    Fixed(HostResources),
}

impl HostProbe {
    pub(crate) fn read(self, home: &Path) -> Result<HostResources, ServiceError> {
        if let HostProbe::Fixed(host) = self {
            return Ok(host);
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| ServiceError::internal(format!("reading /proc/meminfo for admission control failed: {e}")))?;
        let (total, available) = parse_meminfo(&meminfo).ok_or_else(|| {
            ServiceError::internal("/proc/meminfo has no MemTotal or MemAvailable line for admission control")
        })?;
        let fs = rustix::fs::statvfs(home)
            .map_err(|e| ServiceError::internal(format!("reading the free space of {} failed: {e}", home.display())))?;
        Ok(HostResources {
            memory_bytes: total,
            available_memory_bytes: available,
            disk_free_bytes: fs.f_bavail.saturating_mul(fs.f_frsize),
        })
    }
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes. By hand: two `key: N kB` lines do
/// not warrant a procfs crate.
fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?.trim();
            let kib: u64 = rest.strip_suffix("kB")?.trim().parse().ok()?;
            kib.checked_mul(1024)
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// Sandboxes whose start was admitted while their records are still at rest: counted as live
/// until their phase says so.
#[derive(Default)]
pub(crate) struct Starting(Mutex<HashSet<String>>);

impl Starting {
    fn hold(&self, id: &str) -> StartingGuard<'_> {
        self.0.lock().expect("no panics while held").insert(id.to_string());
        StartingGuard(self, id.to_string())
    }

    fn contains(&self, id: &str) -> bool {
        self.0.lock().expect("no panics while held").contains(id)
    }
}

/// Keeps a sandbox counted as starting while it lives.
pub(crate) struct StartingGuard<'a>(&'a Starting, String);

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().expect("no panics while held").remove(&self.1);
    }
}

/// What the request could ask for less of, for the hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Less {
    /// A new sandbox's own sizes (`--memory`, `--disk`).
    Sizes,
    /// The number of forks (`-n`).
    Forks,
    /// Nothing: the machine is given (a start, or a restore of a snapshot).
    Nothing,
}

/// What a request would put live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask<'a> {
    count: u32,
    memory_mib: u32,
    disk_mib: u64,
    /// The sandbox when it exists already: its own record is left out of what is committed.
    existing: Option<&'a SandboxInfo>,
    less: Less,
}

impl<'a> Ask<'a> {
    /// A new sandbox of `memory_mib` and `disk_mib`; `restore` when a snapshot brings its sizes.
    pub(crate) fn new_sandbox(memory_mib: u32, disk_mib: u64, restore: bool) -> Ask<'a> {
        let less = if restore { Less::Nothing } else { Less::Sizes };
        Ask { count: 1, memory_mib, disk_mib, existing: None, less }
    }

    /// `count` forks of a machine of `memory_mib` and `disk_mib`.
    pub(crate) fn forks(count: u32, memory_mib: u32, disk_mib: u64) -> Ask<'a> {
        Ask { count, memory_mib, disk_mib, existing: None, less: Less::Forks }
    }

    /// A recorded sandbox going live again.
    fn existing(info: &'a SandboxInfo) -> Ask<'a> {
        Ask {
            count: 1,
            memory_mib: info.memory_mib,
            disk_mib: info.disk_mib,
            existing: Some(info),
            less: Less::Nothing,
        }
    }

    /// Who asks, as the messages say it.
    fn who(&self) -> String {
        match (self.existing, self.count) {
            (Some(s), _) => format!("sandbox {}", s.name),
            (None, 1) => "this sandbox".into(),
            (None, n) => format!("these {n} sandboxes"),
        }
    }
}

/// `1.5 GiB`, or `300 MiB` below a GiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// `1 live sandbox`, `2 live sandboxes`.
fn sandboxes(n: usize, what: &str) -> String {
    format!("{n} {what}sandbox{}", if n == 1 { "" } else { "es" })
}

/// `bytes × ratio`, in bytes (saturating).
fn times(bytes: u64, ratio: f64) -> u64 {
    // `as` saturates: a ratio of 100 on a huge disk stays within u64.
    (bytes as f64 * ratio) as u64
}

/// Bytes a file takes on disk (what a sparse or thin file already holds); none when it is absent.
fn used_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks().saturating_mul(512)).unwrap_or(0)
}

/// The refusal when `limits` require KVM and `accel` is not it: for `moat serve` at start-up, and
/// for every request should one get that far.
pub fn kvm_refusal(limits: &Limits, accel: &AccelDecision) -> Option<ServiceError> {
    (limits.require_kvm && accel.accel != Accel::Kvm).then(|| {
        let why = accel.reason.trim_end_matches("; using TCG (slow)");
        ServiceError::new(
            ErrorCode::Incompatible,
            format!("KVM is required (--require-kvm), and sandboxes on this host would run under TCG: {why}"),
            "fix KVM on this host (`moat doctor` shows the probe) and start the daemon again, or drop \
             --require-kvm (config `require_kvm`) to run sandboxes under TCG, where QEMU is the only boundary",
        )
    })
}

impl Service {
    /// Refuse `ask` if it may not go live now. Call it under the database lock (`db`), in the same
    /// critical section as what makes the ask count (inserting the record, [`Service::admit_start`]).
    pub(crate) fn admit(&self, db: &Db, ask: &Ask) -> Result<(), ServiceError> {
        if let Some(e) = kvm_refusal(&self.limits, &self.rt.accel) {
            return Err(e);
        }
        let all = db.list()?;
        let others: Vec<&SandboxInfo> = all.iter().filter(|s| ask.existing.is_none_or(|e| e.id != s.id)).collect();
        let live: Vec<&&SandboxInfo> =
            others.iter().filter(|s| s.phase.is_live() || self.starting.contains(&s.id)).collect();
        let max = self.limits.max_sandboxes;
        if live.len() + ask.count as usize > max {
            let message = match ask.count {
                1 => format!("{} sandboxes are live, the limit is {max}", live.len()),
                n => format!("{} sandboxes are live and {n} more were asked for; the limit is {max}", live.len()),
            };
            return Err(ServiceError::new(
                ErrorCode::LimitReached,
                message,
                "stop or remove sandboxes (`moat ps`, `moat rm`), or raise `moat serve --max-sandboxes`",
            ));
        }
        let host = self.limits.host.read(&self.rt.config.home)?;
        let per_sandbox = |memory_mib: u32| (u64::from(memory_mib) + u64::from(QEMU_OVERHEAD_MIB)) * MIB;
        // Warm pools' members hold memory too (a claim takes its member out first).
        let pooled: u64 = self.pools.held().into_iter().map(per_sandbox).sum();
        let committed: u64 = live.iter().map(|s| per_sandbox(s.memory_mib)).sum::<u64>() + pooled;
        let asked = per_sandbox(ask.memory_mib) * u64::from(ask.count);
        let ratio = self.limits.memory_overcommit;
        let budget = times(host.memory_bytes, ratio);
        if committed.saturating_add(asked) > budget {
            let each = format!("{} MiB + {QEMU_OVERHEAD_MIB} MiB QEMU overhead", ask.memory_mib);
            let asks = match ask.count {
                1 => format!("{} asks for {each}", ask.who()),
                n => format!("{} ask for {n} × ({each}) = {}", ask.who(), size(asked)),
            };
            let less = match ask.less {
                Less::Sizes => "ask for less (--memory), ",
                Less::Forks => "fork fewer (-n), ",
                Less::Nothing => "",
            };
            return Err(ServiceError::new(
                ErrorCode::InsufficientResources,
                format!(
                    "not enough memory: {asks}; {} of the {} budget ({} RAM × {ratio}) is committed to {}; {} is \
                     free on the host",
                    size(committed),
                    size(budget),
                    size(host.memory_bytes),
                    sandboxes(live.len(), "live "),
                    size(host.available_memory_bytes),
                ),
                format!(
                    "stop or remove a sandbox, {less}or raise the ratio with `moat serve --memory-overcommit R` \
                     (config `memory_overcommit`)"
                ),
            ));
        }
        // What each disk may still grow by: its size less what its overlay already holds.
        let growth = |s: &SandboxInfo| {
            let overlay = self.run_dir(&s.id).join(moat_sandbox::OVERLAY_FILE);
            s.disk_mib.saturating_mul(MIB).saturating_sub(used_bytes(&overlay))
        };
        let outstanding = others.iter().fold(0u64, |sum, s| sum.saturating_add(growth(s)));
        let asked = match ask.existing {
            Some(s) => growth(s),
            None => ask.disk_mib.saturating_mul(MIB).saturating_mul(u64::from(ask.count)),
        };
        let ratio = self.limits.disk_overcommit;
        let allowed = times(host.disk_free_bytes, ratio);
        if outstanding.saturating_add(asked) > allowed {
            let asks = match (ask.existing, ask.count) {
                (Some(_), _) => format!("the disk of {} may still grow by {}", ask.who(), size(asked)),
                (None, 1) => format!("{} asks for a disk of {}", ask.who(), size(asked)),
                (None, n) => {
                    format!(
                        "{} ask for {n} disks of {} = {}",
                        ask.who(),
                        size(ask.disk_mib.saturating_mul(MIB)),
                        size(asked)
                    )
                }
            };
            let home = self.rt.config.home.display();
            let less = match ask.less {
                Less::Sizes => "ask for a smaller disk (--disk), ",
                Less::Forks => "fork fewer (-n), ",
                Less::Nothing => "",
            };
            return Err(ServiceError::new(
                ErrorCode::InsufficientResources,
                format!(
                    "not enough disk: {asks}; the disks of {} may still grow by {}; {} is free under {home}, and \
                     disks may claim {} ({} × {ratio})",
                    sandboxes(others.len(), ""),
                    size(outstanding),
                    size(host.disk_free_bytes),
                    size(allowed),
                    size(host.disk_free_bytes),
                ),
                format!(
                    "remove a sandbox (`moat rm`, `moat prune`) or free space under {home}, {less}or raise the ratio \
                     with `moat serve --disk-overcommit R` (config `disk_overcommit`)"
                ),
            ));
        }
        Ok(())
    }

    /// [`Service::admit`] for a new sandbox; refused for memory while warm pools hold some, their
    /// members are ended and it is asked once more.
    pub(crate) async fn admit_or_drain_pools(&self, ask: &Ask<'_>) -> Result<(), ServiceError> {
        match self.db(|db| Ok(self.admit(db, ask)))? {
            Err(e) if e.code == ErrorCode::InsufficientResources && self.drain_pools().await => {
                tracing::info!("warm pools gave their memory back to a create");
                self.db(|db| Ok(self.admit(db, ask)))?
            }
            r => r,
        }
    }

    /// Admit the recorded sandbox `info` going live again (a start, resume or revert of a sandbox
    /// at rest); it counts as live while the guard lives.
    pub(crate) fn admit_start<'a>(&'a self, info: &SandboxInfo) -> Result<StartingGuard<'a>, ServiceError> {
        self.db(|db| Ok(self.admit(db, &Ask::existing(info)).map(|()| self.starting.hold(&info.id))))?
    }

    /// Keep a running sandbox counted while it is stopped and started again at once (a revert).
    pub(crate) fn keep_counted(&self, id: &str) -> StartingGuard<'_> {
        self.starting.hold(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_gives_total_and_available_in_bytes() {
        let text = "MemTotal:       24683568 kB\nMemFree:        23828760 kB\nMemAvailable:   24203520 kB\n";
        assert_eq!(parse_meminfo(text), Some((24683568 * 1024, 24203520 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None, "no MemAvailable");
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
    }

    #[test]
    fn the_host_is_measured() {
        let host = HostProbe::Measured.read(Path::new("/")).expect("this host has /proc/meminfo and a root");
        assert!(host.memory_bytes > 0 && host.available_memory_bytes <= host.memory_bytes, "{host:?}");
    }

    #[test]
    fn sizes_read_as_mib_or_gib() {
        assert_eq!(size(672 * MIB), "672 MiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(size(35_500 * MIB), "34.7 GiB");
    }
}
