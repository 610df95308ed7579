//! Per-sandbox cgroups: each QEMU runs in `<parent>/moat/<name>` with limits on memory, CPU, pids
//! and I/O weight, where `<parent>` is the daemon's own cgroup (per controller on v1).
//!
//! Written by hand over the cgroupfs files rather than with the `cgroups-rs` crate (kata-containers,
//! 0.5): that crate always pulls in `zbus` (a D-Bus stack of about a hundred crates) and `nix` 0.25,
//! ignores the errors of the limits it applies, reads control files without a size cap, and does
//! not know cgroup v2's no-internal-processes rule. What moat needs is a few dozen file writes.
//!
//! v1: one directory per hierarchy (memory, cpu, pids, blkio, and cpuacct for CPU usage when it is
//! mounted apart from cpu). v2: one directory, with the controllers enabled in the
//! `cgroup.subtree_control` of its parents.

mod files;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_hint::Hint;

use files::{read_capped, MOUNTINFO_CAP, SMALL_CAP};
pub use files::{CgroupLimits, CgroupStats};

/// Memory QEMU needs beside guest RAM, in MiB; the cgroup memory limit is guest RAM plus this, and
/// the daemon's admission control counts it per sandbox. Measured: QEMU's own private anonymous
/// memory is about 38 MiB; under TCG the translation cache adds up to 64 MiB (capped with
/// `tb-size`); the rest is slack for the page tables, socket buffers and virtio queues QEMU
/// allocates as the guest works, so a busy guest is not OOM-killed for QEMU's own growth.
pub const QEMU_OVERHEAD_MIB: u32 = 160;

/// The directory under each parent cgroup that holds the sandboxes' cgroups.
const MOAT_DIR: &str = "moat";
/// How long [`SandboxCgroup::remove`] retries while the kernel still reports the cgroup busy.
const REMOVE_WAIT: Duration = Duration::from_secs(2);
const REMOVE_POLL: Duration = Duration::from_millis(20);
/// The fix for a v2 daemon cgroup that holds processes.
const DELEGATE_FIX: &str = "run the daemon in a delegated cgroup with its processes in a leaf: a systemd service with \
     Delegate=yes and DelegateSubgroup=daemon (systemd 254+), or run it in the root cgroup";

/// Which cgroup hierarchy the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// One hierarchy per controller (`/sys/fs/cgroup/memory`, …).
    V1,
    /// The unified hierarchy (`cgroup.controllers` at its root).
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// A controller moat uses. `CpuAcct` is v1 only, for CPU usage, when mounted apart from `cpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Cpu,
    Pids,
    Io,
    CpuAcct,
}

impl Kind {
    /// The controllers that limit, in the order doctor lists them.
    const LIMITING: [Kind; 4] = [Kind::Memory, Kind::Cpu, Kind::Pids, Kind::Io];

    fn name(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Cpu => "cpu",
            Kind::Pids => "pids",
            Kind::Io => "io",
            Kind::CpuAcct => "cpuacct",
        }
    }

    fn v1_name(self) -> &'static str {
        match self {
            Kind::Io => "blkio",
            k => k.name(),
        }
    }
}

/// Why a controller cannot be used, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    pub reason: String,
    pub fix: String,
}

impl Unusable {
    fn new(reason: impl Into<String>, fix: impl Into<String>) -> Unusable {
        Unusable { reason: reason.into(), fix: fix.into() }
    }
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Errors of the cgroup layer. Messages are sentences; [`Hint`] says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("this host has no cgroup hierarchy mounted (neither cgroup v2 nor a v1 hierarchy)")]
    NotMounted,
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{name:?} is not a sandbox cgroup name: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("the cgroup limits are out of range: {0}")]
    InvalidLimits(String),
    #[error("no cgroup controller is usable on this host: {}", first.reason)]
    NothingUsable { first: Unusable },
    #[error("cannot create the cgroup {}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot enable the {controllers} controllers in {}", path.display())]
    Enable { path: PathBuf, controllers: String, source: io::Error },
    #[error("cannot write {value:?} to {}", path.display())]
    Write { path: PathBuf, value: String, source: io::Error },
    #[error("cannot remove the cgroup {}: it still holds processes {pids:?}", path.display())]
    Busy { path: PathBuf, pids: Vec<u32> },
    #[error("cannot remove the cgroup {}", path.display())]
    Remove { path: PathBuf, source: io::Error },
}

impl Hint for CgroupError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        Some(match self {
            CgroupError::NotMounted => {
                "mount cgroup2 at /sys/fs/cgroup (or the v1 memory, cpu and pids hierarchies); `moat doctor` shows \
                 what is usable"
                    .into()
            }
            CgroupError::Read { .. } | CgroupError::Remove { .. } => return None,
            CgroupError::InvalidName { .. } => {
                "a sandbox cgroup is named after the sandbox id: 1 to 64 letters, digits, '-' or '_'".into()
            }
            CgroupError::InvalidLimits(_) => {
                "memory, CPUs and pids must be at least 1, the CPU weight 1 to 10000, the I/O weight 1 to 1000".into()
            }
            CgroupError::NothingUsable { first } => first.fix.clone().into(),
            CgroupError::Create { .. } | CgroupError::Write { .. } => {
                "the daemon needs write access to its cgroup tree: run it as root or in a delegated cgroup \
                 (systemd Delegate=yes); `moat doctor` checks the cgroups"
                    .into()
            }
            CgroupError::Enable { .. } => DELEGATE_FIX.into(),
            CgroupError::Busy { .. } => "stop the sandbox's processes first; gc removes the cgroup later".into(),
        })
    }
}

/// One controller's place: the directory under which `moat/<name>` goes, or why it is unusable.
#[derive(Debug, Clone)]
struct Place {
    kind: Kind,
    parent: Result<PathBuf, Unusable>,
}

/// What this host offers, detected once: the version, and per controller where the parent of
/// moat's cgroups is.
#[derive(Debug, Clone)]
pub struct CgroupHost {
    version: CgroupVersion,
    places: Vec<Place>,
    /// Put before every sandbox's name (with a `-`), so daemons with different homes on one host
    /// never touch each other's cgroups; empty for none.
    scope: String,
}

impl CgroupHost {
    /// The same host, with the sandboxes' cgroups named `<scope>-<name>`: only those are this
    /// daemon's ([`sandbox_cgroups`] lists no other).
    pub fn scoped(mut self, scope: &str) -> CgroupHost {
        self.scope = format!("{scope}-");
        self
    }

    /// Reads `/proc/self/mountinfo` and `/proc/self/cgroup` and looks at the hierarchies.
    pub fn detect() -> Result<CgroupHost, CgroupError> {
        let read = |p: &str| {
            read_capped(Path::new(p), MOUNTINFO_CAP).map_err(|source| CgroupError::Read { path: p.into(), source })
        };
        CgroupHost::from_tables(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)
    }

    /// Detection from the text of `/proc/self/mountinfo` and `/proc/self/cgroup`; the directories
    /// they name are looked at on disk.
    fn from_tables(mountinfo: &str, self_cgroup: &str) -> Result<CgroupHost, CgroupError> {
        let mounts = parse_mountinfo(mountinfo);
        let has_v1 =
            mounts.iter().any(|m| Kind::LIMITING.iter().any(|k| m.controllers.iter().any(|c| c == k.v1_name())));
        if has_v1 {
            let mut places: Vec<Place> = Kind::LIMITING
                .iter()
                .map(|&kind| Place { kind, parent: v1_parent(&mounts, self_cgroup, kind) })
                .collect();
            // CPU usage lives in cpuacct; a separate hierarchy is joined too, for stats only.
            let cpu_dir = places.iter().find(|p| p.kind == Kind::Cpu).and_then(|p| p.parent.as_ref().ok());
            if let Ok(acct) = v1_parent(&mounts, self_cgroup, Kind::CpuAcct) {
                if cpu_dir != Some(&acct) {
                    places.push(Place { kind: Kind::CpuAcct, parent: Ok(acct) });
                }
            }
            return Ok(CgroupHost { version: CgroupVersion::V1, places, scope: String::new() });
        }
        let mount = mounts.iter().find(|m| m.fstype == "cgroup2").ok_or(CgroupError::NotMounted)?;
        let base = v2_base(mount, self_cgroup);
        let places =
            Kind::LIMITING.iter().map(|&kind| Place { kind, parent: base.clone().and_then(|b| v2_usable(&b, kind)) });
        Ok(CgroupHost { version: CgroupVersion::V2, places: places.collect(), scope: String::new() })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// For doctor: memory, cpu, pids and io, each usable or why not (with the fix).
    pub fn controllers(&self) -> Vec<(&'static str, Result<(), Unusable>)> {
        self.places
            .iter()
            .filter(|p| Kind::LIMITING.contains(&p.kind))
            .map(|p| (p.kind.name(), p.parent.as_ref().map(|_| ()).map_err(Clone::clone)))
            .collect()
    }

    /// The usable controllers with their parent directories.
    fn usable(&self) -> impl Iterator<Item = (Kind, &Path)> {
        self.places.iter().filter_map(|p| p.parent.as_ref().ok().map(|d| (p.kind, d.as_path())))
    }
}

/// One sandbox's cgroup: a directory per v1 hierarchy, one directory on v2.
#[derive(Debug)]
pub struct SandboxCgroup {
    name: String,
    version: CgroupVersion,
    /// Each directory with the controllers it holds.
    dirs: Vec<(Vec<Kind>, PathBuf)>,
}

impl SandboxCgroup {
    /// Creates (or reuses, applying the limits again) `<parent>/moat/<name>` for every usable
    /// controller.
    pub fn create(host: &CgroupHost, name: &str, limits: &CgroupLimits) -> Result<SandboxCgroup, CgroupError> {
        check_name(name)?;
        limits.check()?;
        let cg = SandboxCgroup::layout(host, name);
        if cg.dirs.is_empty() {
            let first = host.places.iter().find_map(|p| p.parent.as_ref().err()).cloned();
            return Err(CgroupError::NothingUsable {
                first: first.unwrap_or_else(|| Unusable::new("no controller was found", DELEGATE_FIX)),
            });
        }
        let mut made = Vec::new();
        let result = cg.dirs.iter().try_for_each(|(kinds, dir)| {
            let moat = dir.parent().expect("a sandbox cgroup directory is <parent>/moat/<name>");
            if host.version == CgroupVersion::V2 {
                let base = moat.parent().expect("a sandbox cgroup directory is <parent>/moat/<name>");
                files::enable(base, kinds)?;
                mkdir(moat)?;
                files::enable(moat, kinds)?;
            } else {
                mkdir(moat)?;
            }
            if mkdir(dir)? {
                made.push(dir.clone());
            }
            kinds.iter().try_for_each(|&k| files::apply(host.version, k, dir, limits))
        });
        if let Err(e) = result {
            // Leave no half-made cgroup behind; a reused one keeps its processes and old limits.
            for dir in made {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e);
        }
        tracing::debug!(name, version = %host.version, dirs = ?cg.dirs, "sandbox cgroup ready");
        Ok(cg)
    }

    /// The sandbox cgroup `name` when it exists (after a daemon restart, for stats and gc).
    pub fn open(host: &CgroupHost, name: &str) -> Option<SandboxCgroup> {
        check_name(name).ok()?;
        let mut cg = SandboxCgroup::layout(host, name);
        cg.dirs.retain(|(_, d)| d.is_dir());
        (!cg.dirs.is_empty()).then_some(cg)
    }

    /// Where `name`'s directories are (or would be), grouped by directory: co-mounted v1
    /// controllers and all of v2 share one.
    fn layout(host: &CgroupHost, name: &str) -> SandboxCgroup {
        let mut dirs: Vec<(Vec<Kind>, PathBuf)> = Vec::new();
        for (kind, parent) in host.usable() {
            let dir = parent.join(MOAT_DIR).join(format!("{}{name}", host.scope));
            match dirs.iter_mut().find(|(_, d)| *d == dir) {
                Some((kinds, _)) => kinds.push(kind),
                None => dirs.push((vec![kind], dir)),
            }
        }
        SandboxCgroup { name: name.to_string(), version: host.version, dirs }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The cgroup's directories.
    pub fn dirs(&self) -> Vec<&Path> {
        self.dirs.iter().map(|(_, d)| d.as_path()).collect()
    }

    /// The `cgroup.procs` files a process writes "0" into to join, each of them (from a `pre_exec`
    /// hook, so turn them into `CString`s before the fork).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.join("cgroup.procs")).collect()
    }

    /// Whether process `pid` is in this cgroup (in each of its directories).
    pub fn contains(&self, pid: u32) -> bool {
        !self.dirs.is_empty() && self.dirs.iter().all(|(_, d)| files::procs(d).is_ok_and(|p| p.contains(&pid)))
    }

    /// What is readable of memory, pids and CPU use and limits.
    pub fn stats(&self) -> CgroupStats {
        let dir = |kind: Kind| self.dirs.iter().find(|(ks, _)| ks.contains(&kind)).map(|(_, d)| d.as_path());
        let cpuacct = dir(Kind::CpuAcct).or(dir(Kind::Cpu));
        files::stats(self.version, dir(Kind::Memory), dir(Kind::Pids), dir(Kind::Cpu), cpuacct)
    }

    /// Removes the cgroup once its processes are gone. Blocks for up to 2 s while the kernel
    /// still reports it busy just after the last process exited: call it off the async runtime.
    pub fn remove(self) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            remove_dir(dir)?;
        }
        Ok(())
    }
}

/// Names of the moat sandbox cgroups that exist on this host (to gc leaked ones).
pub fn sandbox_cgroups(host: &CgroupHost) -> Vec<String> {
    let mut names: Vec<String> = host
        .usable()
        .filter_map(|(_, parent)| std::fs::read_dir(parent.join(MOAT_DIR)).ok())
        .flat_map(|entries| entries.filter_map(Result::ok))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix(host.scope.as_str()).map(str::to_string))
        .filter(|n| check_name(n).is_ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A sandbox cgroup's name becomes a directory name: letters, digits, '-' and '_' only (which also
/// keeps it from ever naming a control file such as `cgroup.procs`).
fn check_name(name: &str) -> Result<(), CgroupError> {
    let bad = |reason| Err(CgroupError::InvalidName { name: name.chars().take(80).collect(), reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 64 {
        return bad("it is longer than 64 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return bad("only letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}

/// `mkdir`; true when it made the directory, false when it was there.
fn mkdir(dir: &Path) -> Result<bool, CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(source) => Err(CgroupError::Create { path: dir.to_path_buf(), source }),
    }
}

fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + REMOVE_WAIT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if Instant::now() >= deadline {
                    let pids = files::procs(dir).unwrap_or_default();
                    return Err(CgroupError::Busy { path: dir.to_path_buf(), pids });
                }
                std::thread::sleep(REMOVE_POLL);
            }
            Err(source) => return Err(CgroupError::Remove { path: dir.to_path_buf(), source }),
        }
    }
}

/// A cgroup filesystem mount from `/proc/self/mountinfo`.
#[derive(Debug)]
struct Mount {
    /// The cgroup path mounted (the `root` field): `/` unless a sub-tree is mounted.
    root: String,
    point: PathBuf,
    fstype: String,
    /// v1: the controllers of the hierarchy (`memory`, `cpu`, …).
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let (fstype, options) = (*fields.get(sep + 1)?, *fields.get(sep + 3)?);
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: unescape(fields.get(3)?),
                point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: fstype.to_string(),
                controllers: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|o| bytes[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup path for a v1 controller, or the v2 path (`controller` `None`).
fn own_path<'a>(self_cgroup: &'a str, controller: Option<&str>) -> Option<&'a str> {
    self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            Some(c) => list.split(',').any(|l| l == c),
            None => list.is_empty(),
        };
        matches.then_some(path)
    })
}

/// The directory of cgroup `path` in `mount`, when the mount shows it.
fn dir_in(mount: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" { Some(path) } else { path.strip_prefix(mount.root.as_str()) }?;
    if !path.starts_with('/') || !(rel.is_empty() || rel.starts_with('/')) {
        return None;
    }
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|c| c == ".." || c == ".") {
        return None;
    }
    Some(if rel.is_empty() { mount.point.clone() } else { mount.point.join(rel) })
}

fn v1_parent(mounts: &[Mount], self_cgroup: &str, kind: Kind) -> Result<PathBuf, Unusable> {
    let c = kind.v1_name();
    let not_mounted = || {
        Unusable::new(
            format!("no cgroup v1 {c} hierarchy is mounted"),
            format!("mount it (`mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}`), or boot with cgroup v2"),
        )
    };
    let path = own_path(self_cgroup, Some(c)).ok_or_else(not_mounted)?;
    let mut with_c = mounts.iter().filter(|m| m.fstype == "cgroup" && m.controllers.iter().any(|x| x == c)).peekable();
    with_c.peek().ok_or_else(not_mounted)?;
    let parent = with_c.find_map(|m| dir_in(m, path)).ok_or_else(|| {
        Unusable::new(
            format!("this process's {c} cgroup {path} is outside the mounted part of the hierarchy"),
            "run the daemon where its own cgroup is visible under /sys/fs/cgroup",
        )
    })?;
    writable(&parent)?;
    if kind == Kind::Io && !files::has_entry_starting(&parent, &["blkio.weight", "blkio.bfq."]) {
        return Err(Unusable::new(
            format!("{} has no I/O weight file (blkio.weight or blkio.bfq.weight)", parent.display()),
            "load the bfq I/O scheduler (`modprobe bfq`); weights apply to disks whose scheduler is bfq",
        ));
    }
    Ok(parent)
}

/// The v2 directory under which `moat/` goes: the root when the daemon is in the root cgroup; the
/// parent of the daemon's cgroup when that parent is delegated (systemd's `DelegateSubgroup=`
/// layout, the daemon in a leaf beside `moat/`); else the daemon's own cgroup, usable only while it
/// holds no processes, which the no-internal-processes rule demands of a non-root cgroup that
/// enables controllers for its children.
fn v2_base(mount: &Mount, self_cgroup: &str) -> Result<PathBuf, Unusable> {
    let path = own_path(self_cgroup, None).ok_or_else(|| {
        Unusable::new("/proc/self/cgroup has no cgroup v2 line", "run the daemon on a host with cgroup v2 or v1")
    })?;
    let own = dir_in(mount, path).ok_or_else(|| {
        Unusable::new(
            format!("this process's cgroup {path} is outside the mounted cgroup2 tree"),
            "run the daemon where its own cgroup is visible under /sys/fs/cgroup",
        )
    })?;
    // The root cgroup has no cgroup.type and may hold processes.
    if !own.join("cgroup.type").exists() {
        writable(&own)?;
        return Ok(own);
    }
    if let Some(parent) = own.parent().filter(|p| p.starts_with(&mount.point) && files::is_delegated(p)) {
        writable(parent)?;
        return Ok(parent.to_path_buf());
    }
    if files::procs(&own).is_ok_and(|p| !p.is_empty()) {
        return Err(Unusable::new(
            format!(
                "the daemon's cgroup {} holds processes and is not the root cgroup, and cgroup v2 enables no \
                 controllers below such a cgroup",
                own.display()
            ),
            DELEGATE_FIX,
        ));
    }
    writable(&own)?;
    Ok(own)
}

fn v2_usable(base: &Path, kind: Kind) -> Result<PathBuf, Unusable> {
    let available = read_capped(&base.join("cgroup.controllers"), SMALL_CAP).unwrap_or_default();
    if !available.split_whitespace().any(|c| c == kind.name()) {
        return Err(Unusable::new(
            format!(
                "the {} controller is not available in {} (not in its cgroup.controllers)",
                kind.name(),
                base.display()
            ),
            format!(
                "enable {} in the cgroup.subtree_control of the cgroups above, or run the daemon in a delegated \
                 cgroup (systemd Delegate=yes) that has it",
                kind.name()
            ),
        ));
    }
    Ok(base.to_path_buf())
}

/// Whether this process may make cgroups under `parent` (or in its existing `moat/`).
fn writable(parent: &Path) -> Result<(), Unusable> {
    use rustix::fs::Access;
    let moat = parent.join(MOAT_DIR);
    let target = if moat.is_dir() { moat } else { parent.to_path_buf() };
    rustix::fs::access(&target, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
        Unusable::new(
            format!("cannot create cgroups under {}: {e}", target.display()),
            "run the daemon as root, or in a cgroup delegated to its user (systemd Delegate=yes)",
        )
    })
}
