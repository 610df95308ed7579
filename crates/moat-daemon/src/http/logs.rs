//! A sandbox's console and QEMU logs, as plain text, optionally followed.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::Response;
use futures_util::StreamExt;
use moat_api::LogSource;
use serde::Deserialize;

use super::extract::{query, ApiResult, Svc};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    #[serde(default)]
    source: LogSource,
    #[serde(default)]
    follow: bool,
}

pub async fn logs(
    State(svc): Svc,
    Path(reference): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let info = svc.resolve(&reference)?;
    let file = svc.rt.config.run_dir().join(&info.id).join(match q.source {
        LogSource::Console => moat_vmm::run_files::CONSOLE_LOG,
        LogSource::Qemu => moat_vmm::run_files::QEMU_LOG,
    });
    let svc2 = svc.clone();
    let id = info.id.clone();
    // The console's previous part (moved aside when it reached its cap) comes first.
    let earlier = match q.source {
        LogSource::Console => Some(moat_vmm::rotated_console_log(&file)),
        LogSource::Qemu => None,
    };
    let earlier = futures_util::stream::iter(earlier).flat_map(|f| async_stream_file(f, false, || false));
    let stream = earlier.chain(async_stream_file(file, q.follow, move || {
        svc2.db(|db| db.get(&id)).ok().flatten().is_some_and(|s| s.phase.is_live())
    }));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}

/// The file's bytes from the start; with `follow`, keep sending what is appended while `alive()`
/// (from the start again when the file is emptied, as a console log is at its cap).
fn async_stream_file(
    path: std::path::PathBuf,
    follow: bool,
    alive: impl Fn() -> bool + Send + 'static,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
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
            let mut buf = vec![0u8; 64 * 1024];
            match file.read(&mut buf).await {
                Ok(0) if follow && alive_now => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let read_to = file.stream_position().await.unwrap_or(0);
                    if file.metadata().await.is_ok_and(|m| m.len() < read_to) {
                        let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                    }
                    // Yield an empty chunk so the caller re-checks `alive`.
                    Some((Ok(Bytes::new()), (Some(file), false)))
                }
                Ok(0) => None,
                Ok(n) => Some((Ok(Bytes::copy_from_slice(&buf[..n])), (Some(file), false))),
                Err(e) => Some((Err(e), (None, true))),
            }
        }
    })
}
