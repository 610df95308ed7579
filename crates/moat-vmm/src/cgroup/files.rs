//! The cgroupfs files: which file each limit goes to on v1 and v2, and what the usage files say.

use std::io::{self, Read, Write};
use std::path::Path;

use super::{CgroupError, CgroupVersion, Kind};

/// The CFS period; the quota is `cpus` periods, so `cpus` CPUs' worth of time.
pub(super) const CPU_PERIOD_US: u64 = 100_000;
/// A control file's size cap (the largest moat reads, `memory.events` or `cpu.stat`, is < 1 KiB).
pub(super) const SMALL_CAP: u64 = 64 * 1024;
/// `/proc/self/mountinfo` on a host with many mounts.
pub(super) const MOUNTINFO_CAP: u64 = 4 << 20;
/// `cgroup.procs`: a sandbox's cgroup holds one QEMU, but a reused one may hold anything.
const PROCS_CAP: u64 = 1 << 20;
/// v1 reports "no limit" as a page-rounded `i64::MAX`; anything this large means no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// The limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory (guest RAM plus [`QEMU_OVERHEAD_MIB`](super::QEMU_OVERHEAD_MIB)); no swap beyond it.
    pub memory_bytes: u64,
    /// The CPU quota, in CPUs: `cpus` × the 100 ms period per period.
    pub cpus: u32,
    /// The CPU weight against other cgroups, 1..=10000, 100 is the default (v1: `cpu.shares`
    /// scaled so that 100 is 1024).
    pub cpu_weight: u32,
    /// Processes and threads (QEMU runs one thread per vCPU plus its worker pool of up to 64).
    pub pids: u32,
    /// The I/O weight, 1..=1000, 100 is the default (bfq's scale).
    pub io_weight: u16,
}

impl CgroupLimits {
    pub const DEFAULT_CPU_WEIGHT: u32 = 100;
    pub const DEFAULT_IO_WEIGHT: u16 = 100;
    /// Room for QEMU's threads (main, RCU, vCPUs, up to 64 pool workers, I/O threads) and its helpers.
    pub const DEFAULT_PIDS: u32 = 256;

    /// The limits of a VM with `guest_memory_mib` of RAM and `vcpus` CPUs, default weights.
    pub fn for_vm(guest_memory_mib: u32, vcpus: u32) -> CgroupLimits {
        CgroupLimits {
            memory_bytes: (u64::from(guest_memory_mib) + u64::from(super::QEMU_OVERHEAD_MIB)) << 20,
            cpus: vcpus,
            cpu_weight: Self::DEFAULT_CPU_WEIGHT,
            pids: Self::DEFAULT_PIDS,
            io_weight: Self::DEFAULT_IO_WEIGHT,
        }
    }

    pub(super) fn check(&self) -> Result<(), CgroupError> {
        let bad = |what: String| Err(CgroupError::InvalidLimits(what));
        if self.memory_bytes == 0 || self.cpus == 0 || self.pids == 0 {
            return bad(format!(
                "memory {} bytes, {} CPUs and {} pids must each be at least 1",
                self.memory_bytes, self.cpus, self.pids
            ));
        }
        if !(1..=10_000).contains(&self.cpu_weight) {
            return bad(format!("the CPU weight {} is not within 1 to 10000", self.cpu_weight));
        }
        if !(1..=1_000).contains(&self.io_weight) {
            return bad(format!("the I/O weight {} is not within 1 to 1000", self.io_weight));
        }
        Ok(())
    }

    /// v1 `cpu.shares`: 1024 is the default weight 100.
    pub(super) fn cpu_shares(&self) -> u64 {
        (u64::from(self.cpu_weight) * 1024 / 100).clamp(2, 262_144)
    }
}

/// What is readable of a sandbox cgroup's use and limits; `None` where a file is missing or
/// unreadable. A limit of `u64::MAX` means none.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupStats {
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub memory_max: Option<u64>,
    /// Processes the kernel's OOM killer killed in this cgroup.
    pub oom_kills: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpu_usage_usec: Option<u64>,
    /// Time the CPU quota held the cgroup back.
    pub cpu_throttled_usec: Option<u64>,
}

/// Writes `kind`'s limits into the cgroup directory `dir`.
pub(super) fn apply(version: CgroupVersion, kind: Kind, dir: &Path, l: &CgroupLimits) -> Result<(), CgroupError> {
    let quota = u64::from(l.cpus) * CPU_PERIOD_US;
    let set = |file: &str, value: String| write(&dir.join(file), &value);
    // Files that exist only with some kernels or schedulers; the others are written or fail.
    let set_if_there = |file: &str, value: String| {
        let path = dir.join(file);
        if path.exists() {
            write(&path, &value)
        } else {
            tracing::debug!(file = %path.display(), "not there, not set");
            Ok(())
        }
    };
    match (version, kind) {
        (CgroupVersion::V1, Kind::Memory) => {
            let memory = l.memory_bytes.to_string();
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if !memsw.exists() {
                return set("memory.limit_in_bytes", memory);
            }
            // The kernel keeps memory+swap >= memory at every step: raise memsw first, lower it last.
            let raising = read_u64(&memsw).is_some_and(|now| l.memory_bytes > now);
            if raising {
                write(&memsw, &memory)?;
                set("memory.limit_in_bytes", memory)
            } else {
                set("memory.limit_in_bytes", memory.clone())?;
                write(&memsw, &memory)
            }
        }
        (CgroupVersion::V2, Kind::Memory) => {
            set("memory.max", l.memory_bytes.to_string())?;
            set_if_there("memory.swap.max", "0".into())
        }
        (CgroupVersion::V1, Kind::Cpu) => {
            set("cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            set("cpu.cfs_quota_us", quota.to_string())?;
            set("cpu.shares", l.cpu_shares().to_string())
        }
        (CgroupVersion::V2, Kind::Cpu) => {
            set("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
            set("cpu.weight", l.cpu_weight.to_string())
        }
        (_, Kind::Pids) => set("pids.max", l.pids.to_string()),
        (CgroupVersion::V1, Kind::Io) => {
            set_if_there("blkio.bfq.weight", l.io_weight.to_string())?;
            // CFQ's weight (kernels before 5.0) runs from 10 to 1000.
            set_if_there("blkio.weight", l.io_weight.clamp(10, 1000).to_string())
        }
        (CgroupVersion::V2, Kind::Io) => {
            set_if_there("io.bfq.weight", l.io_weight.to_string())?;
            set_if_there("io.weight", l.io_weight.to_string())
        }
        (_, Kind::CpuAcct) => Ok(()),
    }
}

/// v2: enables `kinds` for the children of `dir` in its `cgroup.subtree_control`.
pub(super) fn enable(dir: &Path, kinds: &[Kind]) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let on = read_capped(&path, SMALL_CAP).map_err(|source| CgroupError::Read { path: path.clone(), source })?;
    let missing: Vec<&str> = kinds
        .iter()
        .filter(|k| **k != Kind::CpuAcct)
        .map(|k| k.name())
        .filter(|name| !on.split_whitespace().any(|c| c == *name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
    write(&path, &value.join(" ")).map_err(|e| match e {
        CgroupError::Write { path, source, .. } => {
            CgroupError::Enable { path, controllers: missing.join(", "), source }
        }
        other => other,
    })
}

/// Reads what is readable of the usage and limits.
pub(super) fn stats(
    version: CgroupVersion,
    memory: Option<&Path>,
    pids: Option<&Path>,
    cpu: Option<&Path>,
    cpu_usage: Option<&Path>,
) -> CgroupStats {
    let at = |dir: Option<&Path>, file: &str| dir.and_then(|d| read_u64(&d.join(file)));
    let key = |dir: Option<&Path>, file: &str, key: &str| dir.and_then(|d| read_key(&d.join(file), key));
    let pids_stats = (at(pids, "pids.current"), at(pids, "pids.max"));
    match version {
        CgroupVersion::V1 => CgroupStats {
            memory_current: at(memory, "memory.usage_in_bytes"),
            memory_peak: at(memory, "memory.max_usage_in_bytes"),
            memory_max: at(memory, "memory.limit_in_bytes"),
            oom_kills: key(memory, "memory.oom_control", "oom_kill"),
            pids_current: pids_stats.0,
            pids_max: pids_stats.1,
            cpu_usage_usec: at(cpu_usage, "cpuacct.usage").map(|ns| ns / 1000),
            cpu_throttled_usec: key(cpu, "cpu.stat", "throttled_time").map(|ns| ns / 1000),
        },
        CgroupVersion::V2 => CgroupStats {
            memory_current: at(memory, "memory.current"),
            memory_peak: at(memory, "memory.peak"),
            memory_max: at(memory, "memory.max"),
            oom_kills: key(memory, "memory.events", "oom_kill"),
            pids_current: pids_stats.0,
            pids_max: pids_stats.1,
            cpu_usage_usec: key(cpu_usage, "cpu.stat", "usage_usec"),
            cpu_throttled_usec: key(cpu_usage, "cpu.stat", "throttled_usec"),
        },
    }
}

/// The pids in `dir`'s `cgroup.procs`.
pub(super) fn procs(dir: &Path) -> io::Result<Vec<u32>> {
    let text = read_capped(&dir.join("cgroup.procs"), PROCS_CAP)?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Whether systemd delegated the cgroup `dir` (it marks it with a `delegate` extended attribute).
pub(super) fn is_delegated(dir: &Path) -> bool {
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut value = [0u8; 8];
        rustix::fs::getxattr(dir, *name, &mut value).is_ok_and(|n| value.get(..n) == Some(b"1".as_slice()))
    })
}

/// Whether `dir` has an entry whose name starts with one of `prefixes`.
pub(super) fn has_entry_starting(dir: &Path, prefixes: &[&str]) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            prefixes.iter().any(|p| name.starts_with(p))
        })
    })
}

/// A kernel file, refused when longer than `cap` bytes.
pub(super) fn read_capped(path: &Path, cap: u64) -> io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("it is longer than {cap} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it is not UTF-8"))
}

/// A one-value file: a number, or `max` (no limit, `u64::MAX`).
fn read_u64(path: &Path) -> Option<u64> {
    number(read_capped(path, SMALL_CAP).ok()?.trim())
}

/// The value of `key` in a file of `key value` lines.
fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = read_capped(path, SMALL_CAP).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').and_then(|v| number(v.trim())))
}

fn number(text: &str) -> Option<u64> {
    match text {
        "max" => Some(u64::MAX),
        t => t.parse().ok().map(|n: u64| if n >= V1_UNLIMITED { u64::MAX } else { n }),
    }
}

/// One `write(2)` of `value` (cgroupfs takes a value per write); the file must exist.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError::Write { path: path.to_path_buf(), value: value.to_string(), source })
}
