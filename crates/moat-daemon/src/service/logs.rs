//! What a sandbox has to tell about itself: its console and QEMU logs, optionally followed while
//! it is live, and the history of its phases.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use moat_api::{ErrorCode, LifecycleEntry, LogSource, LogsQuery};

use super::files::ByteStream;
use super::Service;
use crate::error::ServiceError;

/// How much of a log is read at a time.
const READ_CHUNK: usize = 64 * 1024;
/// How often a followed log is checked for more.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

impl Service {
    /// A sandbox's log, from its start (or its last `tail` lines, or what was written since
    /// `since_ms`); with `follow`, then what is appended while the sandbox is live. A sandbox
    /// that never ran has an empty log.
    pub fn logs(self: &Arc<Self>, reference: &str, q: &LogsQuery) -> Result<ByteStream, ServiceError> {
        let info = self.resolve(reference)?;
        let file = self.run_dir(&info.id).join(match q.source {
            LogSource::Console => moat_vmm::run_files::CONSOLE_LOG,
            LogSource::Qemu => moat_vmm::run_files::QEMU_LOG,
        });
        // The console's previous part (moved aside when it reached its cap) comes first.
        let rotated = match q.source {
            LogSource::Console => Some(moat_vmm::rotated_console_log(&file)),
            LogSource::Qemu => None,
        };
        let (mut earlier_from, mut from) = (Some(0), 0);
        if let Some(since) = q.since_ms {
            if q.source == LogSource::Qemu {
                return Err(ServiceError::new(
                    ErrorCode::InvalidRequest,
                    "the QEMU log has no times to start at",
                    "use tail instead of since for it",
                ));
            }
            (earlier_from, from) = moat_vmm::console_since(&file, since);
        }
        if let Some(lines) = q.tail {
            let (offset, found) = tail_start(&file, lines);
            from = from.max(offset);
            earlier_from = match (&rotated, earlier_from) {
                (Some(r), Some(at)) if found < lines => Some(at.max(tail_start(r, lines - found).0)),
                _ => None,
            };
        }
        let earlier = rotated.zip(earlier_from);
        let earlier = futures_util::stream::iter(earlier).flat_map(|(f, at)| read_log(f, at, false, || false));
        let svc = self.clone();
        let alive = move || svc.db(|db| db.get(&info.id)).ok().flatten().is_some_and(|s| s.phase.is_live());
        Ok(Box::pin(earlier.chain(read_log(file, from, q.follow, alive))))
    }

    /// The phases a sandbox went through, oldest first.
    pub fn lifecycle(&self, reference: &str) -> Result<Vec<LifecycleEntry>, ServiceError> {
        let info = self.resolve(reference)?;
        self.db(|db| db.lifecycle(&info.id))
    }
}

/// Where the last `lines` lines of a file start, and how many lines it has there (fewer than
/// asked when the file is shorter). Reads backwards from the end, a chunk at a time.
fn tail_start(path: &std::path::Path, lines: u64) -> (u64, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return (0, 0) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if lines == 0 {
        return (len, 0);
    }
    let (mut end, mut found) = (len, 0u64);
    // A last line without its newline counts as a line.
    let mut last = [0u8; 1];
    let ends_open =
        len > 0 && f.seek(SeekFrom::Start(len - 1)).is_ok() && f.read_exact(&mut last).is_ok() && last[0] != b'\n';
    let mut skip_final_newline = !ends_open && len > 0;
    if ends_open {
        found = 1;
    }
    let mut buf = vec![0u8; READ_CHUNK];
    while end > 0 {
        let start = end.saturating_sub(READ_CHUNK as u64);
        let chunk = &mut buf[..(end - start) as usize];
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(chunk).is_err() {
            return (0, found);
        }
        for i in (0..chunk.len()).rev() {
            if chunk[i] != b'\n' {
                continue;
            }
            if skip_final_newline {
                skip_final_newline = false;
                found += 1;
                continue;
            }
            if found == lines {
                return (start + i as u64 + 1, found);
            }
            found += 1;
        }
        end = start;
    }
    (0, found.min(lines))
}

/// The file's bytes from `from`; with `follow`, keep sending what is appended while `alive()`
/// (from the start again when the file is emptied, as a console log is at its cap). A file that
/// does not exist reads as empty.
fn read_log(
    path: PathBuf,
    from: u64,
    follow: bool,
    alive: impl Fn() -> bool + Send + 'static,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    futures_util::stream::unfold((None::<tokio::fs::File>, false), move |(file, done)| {
        let path = path.clone();
        let alive_now = if done { false } else { alive() };
        async move {
            if done {
                return None;
            }
            let mut file = match file {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(mut f) => {
                        if f.seek(std::io::SeekFrom::Start(from)).await.is_err() {
                            return None;
                        }
                        f
                    }
                    Err(_) => return None,
                },
            };
            let mut buf = vec![0u8; READ_CHUNK];
            match file.read(&mut buf).await {
                Ok(0) if follow && alive_now => {
                    tokio::time::sleep(FOLLOW_POLL).await;
                    let read_to = file.stream_position().await.unwrap_or(0);
                    if file.metadata().await.is_ok_and(|m| m.len() < read_to) {
                        let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                    }
                    // Yield an empty chunk so the caller re-checks `alive`.
                    Some((Ok(Vec::new()), (Some(file), false)))
                }
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf), (Some(file), false)))
                }
                Err(e) => Some((Err(e), (None, true))),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log reads whole, a missing one reads empty, and a followed log of a sandbox that is no
    /// longer live ends at its end.
    #[tokio::test]
    async fn logs_read_to_their_end() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("console.log");
        let text = vec![b'x'; 3 * READ_CHUNK + 5];
        std::fs::write(&path, &text).expect("written");
        for follow in [false, true] {
            let chunks: Vec<std::io::Result<Vec<u8>>> = read_log(path.clone(), 0, follow, || false).collect().await;
            let read: Vec<Vec<u8>> = chunks.into_iter().map(|c| c.expect("readable")).collect();
            assert_eq!(read.concat(), text);
        }
        let missing: Vec<_> = read_log(dir.path().join("none"), 0, true, || true).collect().await;
        assert!(missing.is_empty());
    }

    #[test]
    fn tails_start_at_their_lines() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("log");
        let cases: [(&str, u64, (u64, u64)); 7] = [
            ("a\nb\nc\n", 2, (2, 2)),
            ("a\nb\nc", 2, (2, 2)),
            ("a\nb\nc\n", 5, (0, 3)),
            ("a\nb\nc\n", 3, (0, 3)),
            ("a\nb\nc\n", 0, (6, 0)),
            ("", 3, (0, 0)),
            ("\n\n", 1, (1, 1)),
        ];
        for (text, lines, want) in cases {
            std::fs::write(&path, text).expect("written");
            assert_eq!(tail_start(&path, lines), want, "{text:?} {lines}");
        }
        let long: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &long).expect("written");
        let (at, found) = tail_start(&path, 3);
        assert_eq!((&long[at as usize..], found), ("line 99997\nline 99998\nline 99999\n", 3));
    }
}
