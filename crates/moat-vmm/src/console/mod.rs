//! The guest's serial console on the host: `console.log` in the run directory, kept under a cap.
//!
//! A guest can write its console as fast as the serial port goes, for as long as it runs; kept
//! whole, that fills the host's disk. QEMU appends the console to the file (`append=on`, so
//! the file may be emptied under it and the next write lands at its start), and a light task per
//! VM checks the size a few times a second: past [`CONSOLE_LOG_CAP`] the file's content moves to
//! `console.log.1` (replacing the one before) and the file starts again empty. QEMU only ever
//! writes a file, never waits for moat: the VM does not block while no daemon runs (the file
//! then grows until the next daemon adopts the VM and cuts it at once).
//!
//! Bytes the guest writes during the microseconds between the copy and the cut are lost, which
//! a console log can afford.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod times;
pub use times::since;
use times::Marker;

/// `console.log` moves to `console.log.1` when it grows past this, so the two files hold at
/// most about twice this (plus what the guest writes in one check interval).
pub const CONSOLE_LOG_CAP: u64 = 4 << 20;

/// How often the size is checked: a `stat` per VM, a few times a second.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Where the previous part of a console log goes: `console.log.1`.
pub fn rotated_path(console_log: &Path) -> PathBuf {
    let mut name = console_log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The task that keeps a running VM's console log under [`CONSOLE_LOG_CAP`].
#[derive(Debug)]
pub(crate) struct ConsoleCap {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl ConsoleCap {
    /// Stop the task and wait until it has: it writes `console.times` and `console.log.1` in the
    /// run directory, which must be left alone once the VM is gone (the directory may be being
    /// removed). A rotation under way finishes first.
    pub(crate) async fn stop(self) {
        drop(self.stop);
        let _ = self.task.await;
    }

    /// Stop it without waiting (from a `Drop`).
    pub(crate) fn abort(&self) {
        self.task.abort();
    }
}

/// Keep the console log of a running VM under [`CONSOLE_LOG_CAP`] until [`ConsoleCap::stop`].
pub(crate) fn keep_under_cap(console_log: PathBuf) -> ConsoleCap {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut marker = Marker::open(&console_log);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = &mut stopped => return,
            }
            let len = std::fs::metadata(&console_log).map(|m| m.len()).unwrap_or(0);
            marker.observe(len, now_ms());
            if len <= CONSOLE_LOG_CAP {
                continue;
            }
            let path = console_log.clone();
            match tokio::task::spawn_blocking(move || rotate_if_over(&path, CONSOLE_LOG_CAP)).await {
                Ok(Ok(Some(end))) => marker.rotated(end, now_ms()),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(path = %console_log.display(), error = %e, "cannot rotate the console log")
                }
                Err(_) => return, // The runtime is shutting down.
            }
        }
    });
    ConsoleCap { stop, task }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// When `path` is over `cap`: its last `cap` bytes (and whatever is appended meanwhile) go to
/// [`rotated_path`], and the file is emptied. Whether it was: how many bytes it had then.
pub(crate) fn rotate_if_over(path: &Path, cap: u64) -> std::io::Result<Option<u64>> {
    let mut log = OpenOptions::new().read(true).write(true).open(path)?;
    let len = log.metadata()?.len();
    if len <= cap {
        return Ok(None);
    }
    let rotated = rotated_path(path);
    let mut partial = rotated.clone().into_os_string();
    partial.push(".tmp");
    let partial = PathBuf::from(partial);
    let mut out = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
    log.seek(SeekFrom::Start(len - cap))?;
    // To the end as it is now, not as it was: the cut right after loses as little as can be.
    let copied = std::io::copy(&mut log, &mut out)?;
    log.set_len(0)?;
    drop(out);
    std::fs::rename(&partial, &rotated)?;
    Ok(Some(len - cap + copied))
}

/// The last `max_lines` lines of the console, from `console.log.1` too when the current file
/// has fewer (it was just rotated).
pub(crate) fn console_tail(console_log: &Path, max_lines: usize) -> String {
    let current = tail(console_log, max_lines);
    let have = current.lines().count();
    if have >= max_lines {
        return current;
    }
    let before = tail(&rotated_path(console_log), max_lines - have);
    match (before.is_empty(), current.is_empty()) {
        (true, _) => current,
        (false, true) => before,
        (false, false) => format!("{before}\n{current}"),
    }
}

/// The last `max_lines` lines of a file, reading at most its last 64 KiB.
pub(crate) fn tail(path: &Path, max_lines: usize) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        std::fs::write(&f, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&f, 2), "c\nd");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn a_console_log_past_the_cap_moves_aside_and_writing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // QEMU's side: the file opened for appending, written on and on.
        let mut qemu = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        for i in 0..100 {
            writeln!(qemu, "line {i:04} {}", "x".repeat(90)).unwrap();
        }
        assert_eq!(rotate_if_over(&path, 1 << 20).unwrap(), None, "under the cap nothing moves");
        assert_eq!(rotate_if_over(&path, 1000).unwrap(), Some(100 * 101));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let rotated = std::fs::read_to_string(rotated_path(&path)).unwrap();
        assert_eq!(rotated.len(), 1000, "the last `cap` bytes are kept");
        assert!(rotated.ends_with(&format!("line 0099 {}\n", "x".repeat(90))));
        // The writer's next line lands at the start of the emptied file, not at its old offset.
        writeln!(qemu, "after").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
        assert_eq!(console_tail(&path, 2), format!("line 0099 {}\nafter", "x".repeat(90)));
        assert_eq!(console_tail(&path, 1), "after");
    }

    #[tokio::test]
    async fn a_stopped_console_task_writes_nothing_more_in_the_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "boot\n").unwrap();
        let cap = keep_under_cap(path.clone());
        tokio::time::sleep(CHECK_EVERY * 2).await;
        assert!(times::times_path(&path).exists(), "a running task marks the console's growth");
        cap.stop().await;
        // A sandbox's directory is removed right after its VM stopped: nothing may come back.
        std::fs::write(&path, "boot\nmore\n").unwrap();
        std::fs::remove_file(times::times_path(&path)).unwrap();
        tokio::time::sleep(CHECK_EVERY * 8).await;
        assert!(!times::times_path(&path).exists(), "the stopped task wrote a mark");
    }
}
