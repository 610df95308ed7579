//! Finding a volume's disk by its SCSI serial, its device node, and what is mounted where.

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_proto::{AgentError, ErrorCode};

use super::err;

/// The serials moat gives volume disks start with (moat-vmm's `VOLUME_SERIAL_PREFIX`).
const SERIAL_PREFIX: &str = "moat-vol-";
/// Most bytes read from one sysfs or procfs file.
const MAX_SMALL_FILE: u64 = 4096;
/// Most bytes of /proc/self/mountinfo read (thousands of mounts).
const MAX_MOUNTINFO: u64 = 4 << 20;
/// How long a disk may be missing before the SCSI hosts are scanned for it.
const RESCAN_AFTER: Duration = Duration::from_secs(1);

/// A block device: its name under /sys/block and its device number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Disk {
    pub name: String,
    pub dev: (u32, u32),
}

fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(max).read_to_end(&mut out)?;
    Ok(out)
}

/// The serial in a unit serial number VPD page (0x80) as sysfs shows it: a 4-byte header
/// (peripheral, page code, length) and the serial, padded with spaces or NULs.
pub(super) fn vpd_serial(page: &[u8]) -> Option<&[u8]> {
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
    let serial = &page[4..page.len().min(4 + len)];
    let start = serial.iter().position(|b| !matches!(b, b' ' | 0))?;
    let end = serial.iter().rposition(|b| !matches!(b, b' ' | 0))?;
    Some(&serial[start..=end])
}

/// `8:16\n` → (8, 16).
fn parse_dev(text: &[u8]) -> Option<(u32, u32)> {
    let (major, minor) = std::str::from_utf8(text).ok()?.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The disk under `sys` (sysfs) whose serial is `serial`, once the kernel has read its size
/// and while it is not being removed.
fn scan(sys: &Path, serial: &str) -> Option<Disk> {
    std::fs::read_dir(sys.join("block")).ok()?.flatten().find_map(|entry| ready_disk(&entry.path(), serial))
}

/// The disk in `dir` (a /sys/block entry) if it has `serial` and is ready.
fn ready_disk(dir: &Path, serial: &str) -> Option<Disk> {
    let page = read_bounded(&dir.join("device/vpd_pg80"), MAX_SMALL_FILE).ok()?;
    if vpd_serial(&page) != Some(serial.as_bytes()) {
        return None;
    }
    if read_bounded(&dir.join("device/state"), MAX_SMALL_FILE).is_ok_and(|s| s.trim_ascii() != b"running") {
        return None;
    }
    let dev = parse_dev(&read_bounded(&dir.join("dev"), MAX_SMALL_FILE).ok()?)?;
    let size = read_bounded(&dir.join("size"), MAX_SMALL_FILE).ok()?;
    if std::str::from_utf8(&size).ok()?.trim().parse::<u64>().ok()? == 0 {
        return None;
    }
    Some(Disk { name: dir.file_name()?.to_string_lossy().into_owned(), dev })
}

/// Wait up to `timeout` for the disk with `serial` under `sys` (sysfs): the host has just
/// plugged it and the kernel scans it in the background. A disk not seen within a second is
/// looked for by a scan of every SCSI host: the kernel takes in hot-plug events out of order,
/// and a disk plugged where another was just unplugged may be missed.
pub(super) fn find_disk(sys: &Path, serial: &str, timeout: Duration) -> Result<Disk, AgentError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut next_rescan = started + RESCAN_AFTER;
    loop {
        if let Some(disk) = scan(sys, serial) {
            return Ok(disk);
        }
        if Instant::now() > next_rescan {
            rescan(sys);
            next_rescan = Instant::now() + RESCAN_AFTER;
        }
        if Instant::now() > deadline {
            return Err(err(
                ErrorCode::NotFound,
                format!("The volume's disk (serial {serial}) did not appear within {}s.", timeout.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ask every SCSI host under `sys` to scan all its targets for disks it does not know yet.
fn rescan(sys: &Path) {
    for host in std::fs::read_dir(sys.join("class/scsi_host")).into_iter().flatten().flatten() {
        let _ = std::fs::write(host.path().join("scan"), "- - -");
    }
}

/// The sysfs directory of the SCSI device behind block device `dev`.
fn scsi_device(sys: &Path, dev: (u32, u32)) -> PathBuf {
    sys.join(format!("dev/block/{}:{}/device", dev.0, dev.1))
}

/// Whether the block device `dev` is a volume disk moat plugged.
pub(super) fn is_volume(sys: &Path, dev: (u32, u32)) -> bool {
    let page = read_bounded(&scsi_device(sys, dev).join("vpd_pg80"), MAX_SMALL_FILE);
    page.ok().as_deref().and_then(vpd_serial).is_some_and(|s| s.starts_with(SERIAL_PREFIX.as_bytes()))
}

/// Take the disk `dev` out of the guest the orderly way (the kernel flushes and stops it), so
/// the host's unplug finds nothing left to tear down. Best effort: the unplug removes it anyway.
pub(super) fn remove(sys: &Path, dev: (u32, u32)) {
    if let Err(e) = std::fs::write(scsi_device(sys, dev).join("delete"), "1") {
        eprintln!("moat-agent: removing the SCSI disk {}:{} failed: {e}", dev.0, dev.1);
    }
}

impl Disk {
    /// Its node in `dev_dir`, made when devtmpfs has not (an image with a static /dev).
    pub fn node(&self, dev_dir: &Path) -> Result<PathBuf, AgentError> {
        let path = dev_dir.join(&self.name);
        let want = rustix::fs::makedev(self.dev.0, self.dev.1);
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_block_device() && m.rdev() == want => Ok(path),
            Ok(_) => Err(err(
                ErrorCode::Internal,
                format!("{} is not the volume's disk ({}:{}).", path.display(), self.dev.0, self.dev.1),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mode = rustix::fs::Mode::from_raw_mode(0o600);
                rustix::fs::mknodat(rustix::fs::CWD, &path, rustix::fs::FileType::BlockDevice, mode, want).map_err(
                    |e| err(ErrorCode::Internal, format!("Cannot make the device node {}: {e}.", path.display())),
                )?;
                Ok(path)
            }
            Err(e) => Err(err(ErrorCode::Internal, format!("Cannot read {}: {e}.", path.display()))),
        }
    }
}

/// One line of /proc/self/mountinfo, as far as volumes care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    pub point: PathBuf,
    pub dev: (u32, u32),
    pub readonly: bool,
}

impl Mount {
    /// This process's mounts, in mount order (later ones cover earlier ones at the same point).
    pub fn all() -> Result<Vec<Mount>, AgentError> {
        let text = read_bounded(Path::new("/proc/self/mountinfo"), MAX_MOUNTINFO)
            .map_err(|e| err(ErrorCode::Internal, format!("Cannot read /proc/self/mountinfo: {e}.")))?;
        Ok(parse_mountinfo(&text))
    }
}

/// `36 35 98:0 /root /mnt/point rw,noatime master:1 - ext4 /dev/sda rw`: the device, the mount
/// point and the mount's own read-only flag. Malformed lines are skipped.
pub(super) fn parse_mountinfo(text: &[u8]) -> Vec<Mount> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let mut fields = line.split(|&b| b == b' ');
            let dev = parse_dev(fields.nth(2)?)?;
            let point = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(fields.nth(1)?)));
            let readonly = fields.next()?.split(|&b| b == b',').any(|o| o == b"ro");
            Some(Mount { point, dev, readonly })
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
pub(super) fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal =
            field.get(i + 1..i + 4).filter(|d| field[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}
