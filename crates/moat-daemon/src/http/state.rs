//! The state database: `GET /v1/state/backup` streams a fresh, consistent copy.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use futures_util::stream;
use tokio::io::AsyncReadExt;

use super::extract::Svc;
use crate::error::ServiceError;

/// Bytes read from the copy per chunk of the body.
const CHUNK: usize = 64 * 1024;

pub async fn backup(State(svc): Svc) -> Result<Response, ServiceError> {
    let file = svc.backup_state().await?;
    let len = file.metadata().map_err(|e| ServiceError::internal(format!("reading the backup: {e}")))?.len();
    let file = tokio::fs::File::from_std(file);
    // The file is already unlinked: its space goes back when the body is done or dropped.
    let body = stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(body))
        .expect("static headers are valid"))
}
