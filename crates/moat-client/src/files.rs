//! Files in a sandbox through the daemon: metadata calls, and contents and tar archives streamed
//! both ways without holding them in memory.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use moat_api::{ApiError, ChangeMode, FileInfo, FsEvent, Listing, MakeDir, RemovePath, RenamePath};

use crate::{segment, transport, Client, ClientError};

/// A response body being downloaded; read it as a byte stream or an `AsyncRead`.
pub struct Download(hyper::body::Incoming);

impl Download {
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, ClientError>> + Send {
        http_body_util::BodyStream::new(self.0)
            .filter_map(|f| async move { f.map(|f| f.into_data().ok()).map_err(transport).transpose() })
    }

    pub fn into_async_read(self) -> impl tokio::io::AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(Box::pin(
            self.into_stream().map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))),
        ))
    }
}

/// The API error in a failed response's body.
async fn failure(status: StatusCode, incoming: hyper::body::Incoming) -> ClientError {
    let bytes = incoming.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    match serde_json::from_slice::<ApiError>(&bytes) {
        Ok(e) => ClientError::Api(e),
        Err(_) => transport(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
    }
}

fn files(reference: &str, op: &str, path: &str) -> String {
    format!("/v1/sandboxes/{}/files/{op}?path={}", segment(reference), segment(path))
}

impl Client {
    pub async fn stat(&self, reference: &str, path: &str) -> Result<FileInfo, ClientError> {
        self.call(Method::GET, &files(reference, "stat", path), None::<&()>).await
    }

    pub async fn list_dir(&self, reference: &str, path: &str, recursive: bool) -> Result<Listing, ClientError> {
        let url = format!("{}&recursive={recursive}", files(reference, "list", path));
        self.call(Method::GET, &url, None::<&()>).await
    }

    pub async fn mkdir(&self, reference: &str, req: &MakeDir) -> Result<(), ClientError> {
        self.file_call(reference, "mkdir", req).await
    }

    pub async fn remove_path(&self, reference: &str, req: &RemovePath) -> Result<(), ClientError> {
        self.file_call(reference, "remove", req).await
    }

    pub async fn rename(&self, reference: &str, req: &RenamePath) -> Result<(), ClientError> {
        self.file_call(reference, "rename", req).await
    }

    pub async fn chmod(&self, reference: &str, req: &ChangeMode) -> Result<(), ClientError> {
        self.file_call(reference, "chmod", req).await
    }

    async fn file_call(&self, reference: &str, op: &str, body: &impl serde::Serialize) -> Result<(), ClientError> {
        let url = format!("/v1/sandboxes/{}/files/{op}", segment(reference));
        let _: serde_json::Value = self.call(Method::POST, &url, Some(body)).await?;
        Ok(())
    }

    async fn download(&self, url: &str) -> Result<Download, ClientError> {
        let (status, incoming) = self.send(Method::GET, url, None).await?;
        if !status.is_success() {
            return Err(failure(status, incoming).await);
        }
        Ok(Download(incoming))
    }

    /// The contents of a regular file.
    pub async fn read_file(&self, reference: &str, path: &str) -> Result<Download, ClientError> {
        self.download(&files(reference, "content", path)).await
    }

    /// Write `body` to a file (atomically unless `atomic` is false); returns its new metadata.
    pub async fn write_file(
        &self,
        reference: &str,
        path: &str,
        mode: Option<u32>,
        atomic: bool,
        body: impl tokio::io::AsyncRead + Send + Sync + 'static,
    ) -> Result<FileInfo, ClientError> {
        self.write_file_as(reference, path, mode, atomic, None, body).await
    }

    /// Write `body` to a file as [`Client::write_file`] does, owned by the guest user `owner`
    /// (its uid and primary group) when given; the directories the write creates are too.
    pub async fn write_file_as(
        &self,
        reference: &str,
        path: &str,
        mode: Option<u32>,
        atomic: bool,
        owner: Option<&str>,
        body: impl tokio::io::AsyncRead + Send + Sync + 'static,
    ) -> Result<FileInfo, ClientError> {
        let mut url = format!("{}&atomic={atomic}", files(reference, "content", path));
        if let Some(m) = mode {
            url += &format!("&mode={m:o}");
        }
        if let Some(o) = owner {
            url += &format!("&owner={}", segment(o));
        }
        self.json_upload(&url, "application/octet-stream", body).await
    }

    /// A tar archive of a file or tree in the sandbox, its top entry named `name`.
    pub async fn read_archive(&self, reference: &str, path: &str, name: Option<&str>) -> Result<Download, ClientError> {
        let mut url = format!("/v1/sandboxes/{}/archive?path={}", segment(reference), segment(path));
        if let Some(n) = name {
            url += &format!("&name={}", segment(n));
        }
        self.download(&url).await
    }

    /// Unpack the tar archive read from `tar` into the existing directory `dir` in the sandbox.
    pub async fn write_archive(
        &self,
        reference: &str,
        dir: &str,
        tar: impl tokio::io::AsyncRead + Send + Sync + 'static,
    ) -> Result<(), ClientError> {
        let url = format!("/v1/sandboxes/{}/archive?path={}", segment(reference), segment(dir));
        let _: serde_json::Value = self.json_upload(&url, "application/x-tar", tar).await?;
        Ok(())
    }

    async fn json_upload<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        content_type: &str,
        body: impl tokio::io::AsyncRead + Send + Sync + 'static,
    ) -> Result<T, ClientError> {
        let (status, incoming) = self.upload(Method::PUT, url, content_type, body).await?;
        if !status.is_success() {
            return Err(failure(status, incoming).await);
        }
        let bytes = incoming.collect().await.map_err(transport)?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| transport(format!("unexpected response: {e}")))
    }

    /// Changes under a directory, as they happen, until the stream is dropped.
    pub async fn watch(
        &self,
        reference: &str,
        path: &str,
        recursive: bool,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<FsEvent, ClientError>>, ClientError> {
        let url = format!("{}&recursive={recursive}", files(reference, "watch", path));
        let body = self.download(&url).await?.into_stream();
        let lines = futures_util::stream::unfold((Box::pin(body), Vec::new()), |(mut body, mut buf)| async move {
            loop {
                if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    let event = serde_json::from_slice::<FsEvent>(&line).map_err(transport);
                    return Some((event, (body, buf)));
                }
                match body.next().await? {
                    Ok(chunk) => buf.extend_from_slice(&chunk),
                    Err(e) => return Some((Err(e), (body, buf))),
                }
            }
        });
        Ok(lines.boxed())
    }
}
