//! The ext4 side of a volume: making the file system (the distribution's `mkfs.ext4`), and
//! reading how full it is from its superblock. A guest with the volume mounted read-write owns
//! every byte of the file, so the superblock is read as hostile input: bounds-checked, and a
//! count that does not add up is reported as such, never trusted.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the superblock starts, and how much of it is read.
const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_LEN: usize = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
/// `s_feature_incompat`'s bit for block counts of 64 bits (the `_hi` halves are valid).
const INCOMPAT_64BIT: u32 = 0x80;
/// ext4's block sizes are 1 KiB to 64 KiB: `s_log_block_size` 0 to 6.
const MAX_LOG_BLOCK_SIZE: u32 = 6;
/// Longest label ext4 keeps.
const MAX_LABEL: usize = 16;
/// mkfs of the largest volume takes about a second; this is for a host that hangs.
pub(crate) const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

/// What the superblock says about space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
}

impl Superblock {
    /// Bytes in use; `None` when the counts do not add up (more free blocks than blocks).
    pub(crate) fn used_bytes(&self) -> Option<u64> {
        self.blocks.checked_sub(self.free_blocks)?.checked_mul(self.block_size)
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SuperblockError {
    #[error("reading the superblock failed")]
    Read(#[source] std::io::Error),
    #[error("the file ends {0} bytes into the superblock")]
    Truncated(usize),
    #[error("there is no ext4 file system (magic {0:#06x})")]
    NoMagic(u16),
    #[error("the superblock's block size (2^{0} KiB) is not one of ext4's")]
    BlockSize(u32),
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse the 1024 bytes of a superblock (offsets from the kernel's `struct ext4_super_block`).
pub(crate) fn parse_superblock(b: &[u8]) -> Result<Superblock, SuperblockError> {
    if b.len() < SUPERBLOCK_LEN {
        return Err(SuperblockError::Truncated(b.len()));
    }
    let magic = le16(b, 0x38);
    if magic != EXT4_MAGIC {
        return Err(SuperblockError::NoMagic(magic));
    }
    let log = le32(b, 0x18);
    if log > MAX_LOG_BLOCK_SIZE {
        return Err(SuperblockError::BlockSize(log));
    }
    let wide = le32(b, 0x60) & INCOMPAT_64BIT != 0;
    let count = |lo: usize, hi: usize| u64::from(le32(b, lo)) | if wide { u64::from(le32(b, hi)) << 32 } else { 0 };
    Ok(Superblock { block_size: 1024 << log, blocks: count(0x04, 0x150), free_blocks: count(0x0C, 0x158) })
}

/// Read and parse the superblock of the file system in `file`.
pub(crate) fn read_superblock(file: &std::fs::File) -> Result<Superblock, SuperblockError> {
    let mut buf = [0u8; SUPERBLOCK_LEN];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], SUPERBLOCK_OFFSET + got as u64) {
            Ok(0) => return Err(SuperblockError::Truncated(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SuperblockError::Read(e)),
        }
    }
    parse_superblock(&buf)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MkfsError {
    #[error("mkfs.ext4 is not installed (looked in PATH, /usr/sbin and /sbin)")]
    Missing,
    #[error("starting {} failed", tool.display())]
    Spawn { tool: PathBuf, source: std::io::Error },
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("mkfs.ext4 did not finish within {} s", MKFS_TIMEOUT.as_secs())]
    Timeout,
}

/// `mkfs.ext4` is in /usr/sbin, which a non-root daemon's PATH often lacks.
fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

/// The label of a volume's file system: its name, cut to what ext4 keeps (names are ASCII).
pub(crate) fn label(name: &str) -> &str {
    let end = name.char_indices().map(|(i, c)| i + c.len_utf8()).take_while(|end| *end <= MAX_LABEL).last();
    &name[..end.unwrap_or(0)]
}

/// Make an empty ext4 file system filling `file` (a sparse file of the volume's size). Lazy
/// initialisation keeps it sparse: the guest's kernel zeroes inode tables as it goes. Root owns
/// the top directory whoever runs the daemon; no blocks are reserved for root, since the whole
/// volume is the user's.
pub(crate) async fn make_file_system(file: &Path, label: &str) -> Result<(), MkfsError> {
    let tool = find_mkfs().ok_or(MkfsError::Missing)?;
    let mut cmd = tokio::process::Command::new(&tool);
    cmd.args(["-F", "-q", "-t", "ext4", "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0,nodiscard"])
        .args(["-m", "0", "-L", label])
        .arg(file)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let run = cmd.output();
    let out = match tokio::time::timeout(MKFS_TIMEOUT, run).await {
        Err(_) => return Err(MkfsError::Timeout),
        Ok(Err(source)) => return Err(MkfsError::Spawn { tool, source }),
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        stderr.truncate(stderr.floor_char_boundary(2048));
        return Err(MkfsError::Failed { status: out.status.to_string(), stderr });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A superblock with these fields set, the rest zero.
    fn superblock(log: u32, blocks: u64, free: u64, wide: bool) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_LEN];
        let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(0x04, blocks as u32);
        put(0x0C, free as u32);
        put(0x18, log);
        if wide {
            put(0x60, INCOMPAT_64BIT);
            put(0x150, (blocks >> 32) as u32);
            put(0x158, (free >> 32) as u32);
        }
        b[0x38..0x3A].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        b
    }

    #[tokio::test]
    async fn a_fresh_file_system_reads_as_its_size_with_its_metadata_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let size = 64u64 << 20;
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        make_file_system(&path, label("a-volume-name-longer-than-sixteen")).await.expect("mkfs.ext4 runs");

        let sb = read_superblock(&std::fs::File::open(&path).unwrap()).expect("an ext4 superblock");
        assert_eq!(sb.blocks * sb.block_size, size, "the file system fills its file: {sb:?}");
        let used = sb.used_bytes().expect("the counts add up");
        assert!(used > 0 && used < size / 4, "only metadata and the journal are in use: {used}");
        // e2fsck agrees, block for block.
        let fsck = std::process::Command::new("e2fsck").arg("-fn").arg(&path).output().expect("e2fsck runs");
        let report = String::from_utf8_lossy(&fsck.stdout);
        assert!(fsck.status.success(), "{report}");
        let in_use = format!("{}/{} blocks", used / sb.block_size, sb.blocks);
        assert!(report.contains(&in_use), "{in_use} in {report}");
        assert!(report.contains("\na-volume-name-lo: "), "the label is the name cut to 16 bytes: {report}");
    }

    #[test]
    fn counts_of_64_bits_use_their_high_halves_only_when_the_feature_says_so() {
        let sb = parse_superblock(&superblock(2, 5 << 32 | 7, 3 << 32 | 1, true)).unwrap();
        assert_eq!(sb, Superblock { block_size: 4096, blocks: 5 << 32 | 7, free_blocks: 3 << 32 | 1 });
        assert_eq!(sb.used_bytes(), Some(((2u64 << 32) + 6) * 4096));
        let mut narrow = superblock(0, 100, 40, false);
        narrow[0x150] = 0xff; // Not a 64-bit file system: the high half is ignored.
        assert_eq!(parse_superblock(&narrow).unwrap().used_bytes(), Some(60 * 1024));
    }

    #[test]
    fn a_hostile_superblock_is_refused_or_reported_as_not_adding_up() {
        assert!(matches!(parse_superblock(&[0u8; 100]), Err(SuperblockError::Truncated(100))));
        assert!(matches!(parse_superblock(&[]), Err(SuperblockError::Truncated(0))));
        assert!(matches!(parse_superblock(&[0u8; SUPERBLOCK_LEN]), Err(SuperblockError::NoMagic(0))));
        for log in [7, 31, 32, u32::MAX] {
            assert!(matches!(parse_superblock(&superblock(log, 1, 0, false)), Err(SuperblockError::BlockSize(_))));
        }
        let more_free_than_all = parse_superblock(&superblock(0, 10, 11, false)).unwrap();
        assert_eq!(more_free_than_all.used_bytes(), None);
        let overflowing = parse_superblock(&superblock(6, u64::MAX, 0, true)).unwrap();
        assert_eq!(overflowing.used_bytes(), None);
    }

    #[test]
    fn a_file_shorter_than_a_superblock_is_truncated_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0u64, 1024, 1500] {
            let path = dir.path().join(format!("short-{len}"));
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            let got = read_superblock(&std::fs::File::open(&path).unwrap());
            assert!(matches!(got, Err(SuperblockError::Truncated(n)) if n as u64 == len.saturating_sub(1024)), "{len}");
        }
    }

    #[test]
    fn labels_are_names_cut_to_sixteen_bytes() {
        assert_eq!(label("data"), "data");
        assert_eq!(label("exactly-16-bytes"), "exactly-16-bytes");
        assert_eq!(label("seventeen-bytes-x"), "seventeen-bytes-");
    }
}
