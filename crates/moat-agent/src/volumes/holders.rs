//! Which processes keep a mount busy: those with their working directory, root, executable,
//! an open file or a mapping under it, found through /proc.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Processes named in a busy error; the rest are counted.
pub(super) const SHOWN: usize = 5;
/// Open files looked at per process.
const MAX_FDS: usize = 65_536;
/// Lines of a process's memory map looked at.
const MAX_MAP_LINES: usize = 65_536;
/// Longest line of a memory map read (a path is at most PATH_MAX plus the fields before it).
const MAX_MAP_LINE: u64 = 8192;

/// A process that uses something under the mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Holder {
    pub pid: u32,
    pub comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.pid, self.comm)
    }
}

/// The first `shown` processes (by pid) under `proc_root` that use something under
/// `mount_point`, and how many there are in all.
pub(super) fn holders(proc_root: &Path, mount_point: &Path, shown: usize) -> (Vec<Holder>, usize) {
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut found = Vec::new();
    let mut total = 0;
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        if !uses(&dir, mount_point) {
            continue;
        }
        total += 1;
        if found.len() < shown {
            let mut comm = String::new();
            if let Ok(f) = std::fs::File::open(dir.join("comm")) {
                let _ = f.take(64).read_to_string(&mut comm);
            }
            let comm = comm.trim();
            found.push(Holder { pid, comm: if comm.is_empty() { "?".into() } else { comm.into() } });
        }
    }
    (found, total)
}

/// Whether the process in `dir` (a /proc/<pid>) uses something under `mount_point`.
fn uses(dir: &Path, mount_point: &Path) -> bool {
    let link_under = |p: &Path| std::fs::read_link(p).is_ok_and(|t| under(t.as_os_str().as_bytes(), mount_point));
    if ["cwd", "root", "exe"].iter().any(|l| link_under(&dir.join(l))) {
        return true;
    }
    if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
        if fds.flatten().take(MAX_FDS).any(|fd| link_under(&fd.path())) {
            return true;
        }
    }
    let Ok(maps) = std::fs::File::open(dir.join("maps")) else { return false };
    let mut maps = BufReader::new(maps);
    let mut line = Vec::new();
    for _ in 0..MAX_MAP_LINES {
        line.clear();
        match maps.by_ref().take(MAX_MAP_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if map_path(&line).is_some_and(|p| under(p, mount_point)) {
            return true;
        }
    }
    false
}

/// The path of a memory map line (`start-end perms offset dev inode   path`), if it has one.
pub(super) fn map_path(line: &[u8]) -> Option<&[u8]> {
    let mut rest = line.strip_suffix(b"\n").unwrap_or(line);
    for _ in 0..5 {
        let start = rest.iter().position(|&b| b != b' ')?;
        rest = &rest[start..];
        let end = rest.iter().position(|&b| b == b' ')?;
        rest = &rest[end..];
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..]).filter(|p| p.starts_with(b"/"))
}

/// Whether `path` (as /proc shows it, perhaps ending in ` (deleted)`) is `mount_point` or
/// inside it.
pub(super) fn under(path: &[u8], mount_point: &Path) -> bool {
    let path = path.strip_suffix(b" (deleted)").unwrap_or(path);
    Path::new(std::ffi::OsStr::from_bytes(path)).starts_with(mount_point)
}
