//! What a sandbox has to tell about itself: its console and QEMU logs, optionally followed while
//! it is live, and the history of its phases.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use moat_api::{LifecycleEntry, LogSource};

use super::files::ByteStream;
use super::Service;
use crate::error::ServiceError;

/// How much of a log is read at a time.
const READ_CHUNK: usize = 64 * 1024;
/// How often a followed log is checked for more.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

impl Service {
    /// A sandbox's log, from its start; with `follow`, then what is appended while the sandbox is
    /// live. A sandbox that never ran has an empty log.
    pub fn logs(
        self: &Arc<Self>,
        reference: &str,
        source: LogSource,
        follow: bool,
    ) -> Result<ByteStream, ServiceError> {
        let info = self.resolve(reference)?;
        let file = self.run_dir(&info.id).join(match source {
            LogSource::Console => moat_vmm::run_files::CONSOLE_LOG,
            LogSource::Qemu => moat_vmm::run_files::QEMU_LOG,
        });
        // The console's previous part (moved aside when it reached its cap) comes first.
        let earlier = match source {
            LogSource::Console => Some(moat_vmm::rotated_console_log(&file)),
            LogSource::Qemu => None,
        };
        let earlier = futures_util::stream::iter(earlier).flat_map(|f| read_log(f, false, || false));
        let svc = self.clone();
        let alive = move || svc.db(|db| db.get(&info.id)).ok().flatten().is_some_and(|s| s.phase.is_live());
        Ok(Box::pin(earlier.chain(read_log(file, follow, alive))))
    }

    /// The phases a sandbox went through, oldest first.
    pub fn lifecycle(&self, reference: &str) -> Result<Vec<LifecycleEntry>, ServiceError> {
        let info = self.resolve(reference)?;
        self.db(|db| db.lifecycle(&info.id))
    }
}

/// The file's bytes from the start; with `follow`, keep sending what is appended while `alive()`
/// (from the start again when the file is emptied, as a console log is at its cap). A file that
/// does not exist reads as empty.
fn read_log(
    path: PathBuf,
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
                    Ok(f) => f,
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
            let chunks: Vec<std::io::Result<Vec<u8>>> = read_log(path.clone(), follow, || false).collect().await;
            let read: Vec<Vec<u8>> = chunks.into_iter().map(|c| c.expect("readable")).collect();
            assert_eq!(read.concat(), text);
        }
        let missing: Vec<_> = read_log(dir.path().join("none"), true, || true).collect().await;
        assert!(missing.is_empty());
    }
}
