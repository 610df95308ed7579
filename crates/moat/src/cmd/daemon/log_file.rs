//! The background daemon's log, `$MOAT_HOME/daemon.log`: written by the daemon itself through a
//! size cap, moved to `daemon.log.1` when full (one old file kept), so that a daemon that runs
//! for months never fills the disk; and read back by `moat daemon logs`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The default cap of the daemon's log (`--log-max-size`).
pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;
/// The smallest cap: one long line must fit.
pub const MIN_MAX_SIZE: u64 = 4096;

/// The old log beside `path`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file that never grows past its cap: a write that would pass it first moves the file to
/// `<path>.1` (replacing the older one) and starts a new one. A record longer than the cap is cut.
pub struct CappedLog {
    path: PathBuf,
    max: u64,
    file: File,
    size: u64,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

impl CappedLog {
    pub fn open(path: &Path, max: u64) -> io::Result<CappedLog> {
        let file = open(path)?;
        let size = file.metadata()?.len();
        Ok(CappedLog { path: path.to_path_buf(), max: max.max(MIN_MAX_SIZE), file, size })
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, rotated(&self.path))?;
        self.file = open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    /// A writer for `tracing_subscriber::fmt().with_writer(…)`, which writes each record whole.
    pub fn shared(self) -> SharedLog {
        SharedLog(Arc::new(Mutex::new(self)))
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len() as u64;
        if self.size > 0 && self.size + len > self.max {
            // Keep logging into the full file rather than lose the record if the rename fails.
            let _ = self.rotate();
        }
        let take = len.min(self.max.saturating_sub(self.size)) as usize;
        if take == 0 {
            // Full and not rotated: drop the record rather than pass the cap.
            return Ok(buf.len());
        }
        self.file.write_all(&buf[..take])?;
        self.size += take as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A [`CappedLog`] shared by the threads that log.
#[derive(Clone)]
pub struct SharedLog(Arc<Mutex<CappedLog>>);

/// One record being written.
pub struct LogGuard<'a>(std::sync::MutexGuard<'a, CappedLog>);

impl Write for LogGuard<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SharedLog {
    type Writer = LogGuard<'a>;

    fn make_writer(&'a self) -> LogGuard<'a> {
        // A thread that panicked mid-write left a whole file behind; keep logging.
        LogGuard(self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The capped log of `moat serve --log-file FILE`; `None` for any other command, which logs to
/// stderr.
pub fn of_command(command: &crate::cli::Command) -> io::Result<Option<SharedLog>> {
    let crate::cli::Command::Serve(args) = command else { return Ok(None) };
    let Some(path) = &args.log_file else { return Ok(None) };
    Ok(Some(CappedLog::open(path, args.log_max_size)?.shared()))
}

/// The last `n` lines of the log (the old file's too when the new one has fewer), or all of it.
pub fn tail(path: &Path, n: Option<usize>) -> io::Result<Vec<u8>> {
    let current = std::fs::read(path)?;
    let Some(n) = n else { return Ok(current) };
    let mut lines: Vec<&[u8]> = current.split_inclusive(|b| *b == b'\n').collect();
    let old;
    if lines.len() < n {
        old = std::fs::read(rotated(path)).unwrap_or_default();
        let mut before: Vec<&[u8]> = old.split_inclusive(|b| *b == b'\n').collect();
        before.append(&mut lines);
        lines = before;
    }
    Ok(lines[lines.len().saturating_sub(n)..].concat())
}

/// Print what is appended to the log from `from` on, following it into a new file when the
/// daemon rotates it, until the process is interrupted.
pub fn follow(path: &Path, from: u64, out: &mut impl Write) -> io::Result<()> {
    let mut file = File::open(path)?;
    let mut at = file.seek(SeekFrom::Start(from))?;
    let mut ino = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            at += n as u64;
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
        // Rotated (a new file under the name) or truncated: start the new one from its beginning.
        let now = std::fs::metadata(path).ok();
        let moved = now.as_ref().is_some_and(|m| std::os::unix::fs::MetadataExt::ino(m) != ino);
        if moved || now.is_some_and(|m| m.len() < at) {
            // What the old file got after the last read comes first.
            let mut rest = Vec::new();
            file.read_to_end(&mut rest)?;
            out.write_all(&rest)?;
            file = File::open(path)?;
            ino = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
            at = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stays_under_its_cap_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        let mut log = CappedLog::open(&path, MIN_MAX_SIZE).unwrap();
        let line = [b'x'; 99];
        for i in 0..1000 {
            log.write_all(&[&line[..], format!("{i:05}\n").as_bytes()].concat()).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= MIN_MAX_SIZE);
        }
        let old = std::fs::metadata(rotated(&path)).unwrap().len();
        assert!(old > 0 && old <= MIN_MAX_SIZE, "{old}");
        let last = tail(&path, Some(1)).unwrap();
        assert!(last.ends_with(b"00999\n"), "{}", String::from_utf8_lossy(&last));
        // A record longer than the cap is cut, never written past it.
        log.write_all(&vec![b'y'; 10_000]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIN_MAX_SIZE);
    }

    #[test]
    fn tail_reaches_into_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        std::fs::write(rotated(&path), "a\nb\n").unwrap();
        std::fs::write(&path, "c\n").unwrap();
        assert_eq!(tail(&path, Some(2)).unwrap(), b"b\nc\n");
        assert_eq!(tail(&path, Some(1)).unwrap(), b"c\n");
        assert_eq!(tail(&path, None).unwrap(), b"c\n");
    }
}
