//! envd's `/files`: file contents over plain HTTP. `GET` streams a file out of the sandbox;
//! `POST` streams one (`application/octet-stream`, optionally gzip) or several
//! (`multipart/form-data`) into it, making their directories first. Nothing is held whole in
//! memory: bytes go from the request to the daemon as they arrive, gzip is inflated a bounded
//! step at a time. Files are written in place, as envd does, and belong to the request's user.

use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use moat_client::ClientError;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use crate::error::{Code, Failure};
use crate::filesystem::{base_name, make_parents, user_path};
use crate::users::GuestUser;
use crate::{Front, Sandbox, Shared};

/// Chunks queued between the request and the daemon for one file.
const QUEUED_CHUNKS: usize = 4;
/// Compressed bytes inflated at a time: each step yields at most a few dozen KiB, whatever the
/// compression ratio.
const GZIP_STEP: usize = 8 << 10;
/// Files one multipart request may write.
const MAX_PARTS: usize = 10_000;

pub(crate) fn routes() -> Router<Shared> {
    // Bodies stream to the daemon, which bounds them by the guest's disk.
    Router::new().route("/files", get(download).post(upload).layer(DefaultBodyLimit::disable()))
}

/// `?path=…&username=…` (signature parameters are the dispatcher's business).
#[derive(Debug, Default, Deserialize)]
struct FilesQuery {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    username: Option<String>,
}

impl FilesQuery {
    fn from(q: Result<Query<FilesQuery>, QueryRejection>) -> Result<FilesQuery, Failure> {
        let Query(mut q) = q.map_err(|e| Failure::invalid(format!("the query is not valid: {e}")))?;
        q.path = q.path.filter(|p| !p.is_empty());
        q.username = q.username.filter(|u| !u.is_empty());
        Ok(q)
    }
}

/// One written file as the SDK reads it (`WriteInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Written {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
}

async fn file_user(front: &Front, sandbox: &Sandbox, name: Option<&str>) -> Result<GuestUser, Failure> {
    front.users.resolve(&front.client, &sandbox.id, name).await
}

/// `GET /files?path=P`: the file's bytes; 404 when missing, 400 for a directory.
async fn download(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> Result<Response, Failure> {
    let q = FilesQuery::from(q)?;
    let path = q.path.ok_or_else(|| Failure::invalid("the path query parameter is required: GET /files?path=…"))?;
    let user = file_user(&front, &sandbox, q.username.as_deref()).await?;
    let content = front.client.read_file(&sandbox.id, &user_path(&user, &path)).await?;
    let mut r = Body::from_stream(content.into_stream()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(r)
}

/// `POST /files`: write the body to `path`, or each `file` part of a multipart body to its
/// filename (the `path` query, when given, wins). The written files, in order.
async fn upload(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    q: Result<Query<FilesQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<Vec<Written>>, Failure> {
    let q = FilesQuery::from(q)?;
    let gzip = gzipped(req.headers())?;
    let media = media_type(req.headers());
    let user = file_user(&front, &sandbox, q.username.as_deref()).await?;
    let body = req_body(req, gzip);
    if media == "application/octet-stream" {
        let (_, body) = body;
        let path = q.path.ok_or_else(|| {
            Failure::invalid("the path query parameter is required for an application/octet-stream upload")
        })?;
        let path = user_path(&user, &path);
        return Ok(Json(vec![write(&front, &sandbox.id, &user, &path, body).await?]));
    }
    if !media.starts_with("multipart/") {
        return Err(Failure::invalid(format!(
            "content type {media:?} is not an upload: send multipart/form-data or application/octet-stream"
        )));
    }
    let (parts, body) = body;
    let req = Request::from_parts(parts, Body::from_stream(body));
    let mut multipart = Multipart::from_request(req, &())
        .await
        .map_err(|e| Failure::invalid(format!("the multipart body cannot be read: {e}")))?;
    let mut written: Vec<Written> = Vec::new();
    while let Some(field) = next_part(&mut multipart).await? {
        let Some(target) = file_target(&field, q.path.as_deref())? else { continue };
        let path = user_path(&user, &target);
        if written.iter().any(|w| w.path == path) {
            return Err(Failure::invalid(format!(
                "several parts go to {path}: one request writes each path once (the first part was written)"
            )));
        }
        if written.len() >= MAX_PARTS {
            return Err(Failure::invalid(format!("a request writes at most {MAX_PARTS} files; split the upload")));
        }
        let data = field.map_err(|e| io::Error::other(e.to_string())).boxed();
        written.push(write(&front, &sandbox.id, &user, &path, data).await?);
    }
    Ok(Json(written))
}

type ByteStream<'a> = BoxStream<'a, io::Result<Bytes>>;

/// The request's head, and its body inflated when it came gzipped.
fn req_body(req: Request, gzip: bool) -> (axum::http::request::Parts, ByteStream<'static>) {
    let (parts, body) = req.into_parts();
    let data = body.into_data_stream().map_err(io::Error::other);
    let data = if gzip { gunzip(data).boxed() } else { data.boxed() };
    (parts, data)
}

/// The next part of a multipart body.
async fn next_part(multipart: &mut Multipart) -> Result<Option<axum::extract::multipart::Field<'_>>, Failure> {
    multipart.next_field().await.map_err(|e| {
        let code =
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE { Code::ResourceExhausted } else { Code::InvalidArgument };
        Failure::new(code, format!("the multipart body cannot be read: {e}"))
    })
}

/// Where a part goes: the `path` query, else its filename; `None` for parts not named `file`,
/// which envd skips too.
fn file_target(
    field: &axum::extract::multipart::Field<'_>,
    query_path: Option<&str>,
) -> Result<Option<String>, Failure> {
    if field.name() != Some("file") {
        return Ok(None);
    }
    match (query_path, field.file_name()) {
        (Some(p), _) => Ok(Some(p.to_string())),
        (None, Some(f)) if !f.is_empty() => Ok(Some(f.to_string())),
        _ => Err(Failure::invalid(
            "a file part names no path: give it a filename (the target path) or set the path query parameter",
        )),
    }
}

/// Write `data` to `path` as `user`, its directories made first; what the SDK is told.
async fn write(
    front: &Front,
    sandbox: &str,
    user: &GuestUser,
    path: &str,
    data: ByteStream<'_>,
) -> Result<Written, Failure> {
    make_parents(front, sandbox, user, path).await?;
    let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
    let broke = Mutex::new(None);
    let upload = front.client.write_file_as(sandbox, path, None, false, Some(&user.name), ChunkReader::new(rx));
    let pump = feed(data, tx, &broke);
    tokio::pin!(upload, pump);
    let mut fed = false;
    // The daemon's answer ends the upload; it may come before the body is all sent (a refusal).
    let result = loop {
        tokio::select! {
            r = &mut upload => break r,
            () = &mut pump, if !fed => fed = true,
        }
    };
    if let Some(e) = broke.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(Failure::invalid(format!("the upload of {path} broke off: {e}")));
    }
    result.map_err(write_failure)?;
    Ok(Written { name: base_name(path).to_string(), kind: "file", path: path.to_string() })
}

/// Move the request's chunks to the daemon's upload. A broken request (or bad gzip) fails the
/// upload rather than ending it, so the daemon never takes a cut-off body for a whole file.
async fn feed(mut data: ByteStream<'_>, tx: mpsc::Sender<io::Result<Bytes>>, broke: &Mutex<Option<io::Error>>) {
    while let Some(chunk) = data.next().await {
        match chunk {
            Ok(b) if b.is_empty() => {}
            Ok(b) => {
                if tx.send(Ok(b)).await.is_err() {
                    return; // The upload ended early; its answer says why.
                }
            }
            Err(e) => {
                let told = io::Error::new(e.kind(), e.to_string());
                *broke.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                let _ = tx.send(Err(told)).await;
                return;
            }
        }
    }
}

/// A write's failure for the SDK; a full disk is E2B's 507 (`NotEnoughSpaceException`).
fn write_failure(e: ClientError) -> Failure {
    let full = matches!(&e, ClientError::Api(api)
        if ["No space left on device", "os error 28", "Disk quota exceeded", "os error 122"]
            .iter()
            .any(|s| api.message.contains(s)));
    let mut f = Failure::from(e);
    if full {
        f.code = Code::ResourceExhausted;
        f.message =
            format!("the sandbox's disk is full: {}; free space in the sandbox, or give it a bigger disk", f.message);
        f.status = Some(StatusCode::INSUFFICIENT_STORAGE);
    }
    f
}

/// Whether the body is gzipped (`Content-Encoding: gzip`); other encodings are refused.
fn gzipped(headers: &HeaderMap) -> Result<bool, Failure> {
    let Some(v) = headers.get(header::CONTENT_ENCODING) else { return Ok(false) };
    match v.to_str().map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Ok("") | Ok("identity") => Ok(false),
        Ok("gzip") | Ok("x-gzip") => Ok(true),
        _ => Err(Failure::invalid(format!(
            "Content-Encoding {v:?} is not supported: send the body as is or gzipped (Content-Encoding: gzip)"
        ))),
    }
}

/// The media type of the body, lower case, without parameters.
fn media_type(headers: &HeaderMap) -> String {
    let v = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// The gzip stream `input` inflated: each item is at most a few dozen KiB, so a small body
/// that inflates hugely is never held whole. Bad or cut-off gzip ends it with an error.
fn gunzip<'a>(
    input: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'a,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'a {
    let bad = |e: io::Error| io::Error::new(io::ErrorKind::InvalidData, format!("the body is not valid gzip: {e}"));
    let decoder = Some(flate2::write::MultiGzDecoder::new(Vec::new()));
    futures_util::stream::unfold(
        (input, decoder, Bytes::new()),
        move |(mut input, mut decoder, mut pending)| async move {
            loop {
                let d = decoder.as_mut()?;
                let out = std::mem::take(d.get_mut());
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), (input, decoder, pending)));
                }
                if pending.is_empty() {
                    match input.next().await {
                        Some(Ok(b)) => pending = b,
                        Some(Err(e)) => return Some((Err(e), (input, None, pending))),
                        None => {
                            let mut d = decoder.take()?;
                            return match d.try_finish() {
                                Ok(()) => {
                                    let out = std::mem::take(d.get_mut());
                                    (!out.is_empty()).then(|| (Ok(Bytes::from(out)), (input, None, pending)))
                                }
                                Err(e) => Some((Err(bad(e)), (input, None, pending))),
                            };
                        }
                    }
                    continue;
                }
                let step = pending.len().min(GZIP_STEP);
                match d.write(&pending[..step]) {
                    Ok(0) => return Some((Err(bad(io::Error::other("no progress"))), (input, None, pending))),
                    Ok(n) => drop(pending.split_to(n)),
                    Err(e) => return Some((Err(bad(e)), (input, None, pending))),
                }
            }
        },
    )
}

/// The read end of a file's queue of chunks, for the daemon client's upload: an error in the
/// queue is a read error, the queue's end is the end of the file.
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl ChunkReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> ChunkReader {
        ChunkReader { rx, chunk: Bytes::new() }
    }
}

impl AsyncRead for ChunkReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.chunk.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(self.chunk.len());
        buf.put_slice(&self.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// `bytes` as a request body would bring them, in chunks of `size`.
    fn chunks(bytes: &[u8], size: usize) -> ByteStream<'static> {
        let parts: Vec<io::Result<Bytes>> = bytes.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures_util::stream::iter(parts).boxed()
    }

    async fn inflate(body: ByteStream<'static>) -> (Vec<u8>, usize, Option<io::Error>) {
        let mut s = Box::pin(gunzip(body));
        let (mut out, mut largest) = (Vec::new(), 0);
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => {
                    largest = largest.max(b.len());
                    out.extend_from_slice(&b);
                }
                Err(e) => return (out, largest, Some(e)),
            }
        }
        (out, largest, None)
    }

    #[tokio::test]
    async fn gzip_bodies_inflate_in_any_chunking() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let packed = gzip(&data);
        for size in [1, 7, 4096, packed.len()] {
            let (out, _, err) = inflate(chunks(&packed, size)).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(out, data, "chunks of {size}");
        }
        // Concatenated members are one gzip file.
        let two = [gzip(b"hello "), gzip(b"world")].concat();
        assert_eq!(inflate(chunks(&two, 3)).await.0, b"hello world");
        // An empty file compresses to a valid body of nothing.
        let (out, _, err) = inflate(chunks(&gzip(b""), 5)).await;
        assert!(out.is_empty() && err.is_none());
    }

    #[tokio::test]
    async fn bad_or_cut_gzip_is_an_error_not_a_short_file() {
        let packed = gzip(&vec![7u8; 100_000]);
        let (_, _, err) = inflate(chunks(&packed[..packed.len() - 4], 100)).await;
        assert_eq!(err.unwrap().kind(), io::ErrorKind::InvalidData);
        let (_, _, err) = inflate(chunks(b"not gzip at all", 4)).await;
        assert_eq!(err.unwrap().kind(), io::ErrorKind::InvalidData);
        let (_, _, err) = inflate(chunks(b"", 4)).await;
        assert!(err.is_some());
        let trailing = [gzip(b"ok"), b"garbage".to_vec()].concat();
        assert!(inflate(chunks(&trailing, 64)).await.2.is_some());
    }

    #[tokio::test]
    async fn a_gzip_bomb_inflates_a_bounded_step_at_a_time() {
        let packed = gzip(&vec![0u8; 64 << 20]);
        assert!(packed.len() < 128 << 10);
        let (out, largest, err) = inflate(chunks(&packed, packed.len())).await;
        assert!(err.is_none());
        assert_eq!(out.len(), 64 << 20);
        assert!(largest <= 128 << 10, "an item of {largest} bytes");
    }

    #[tokio::test]
    async fn chunks_reach_the_reader_and_a_broken_body_fails_it() {
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let broke = Mutex::new(None);
        let data = chunks(&vec![5u8; 100_000], 999);
        let mut got = Vec::new();
        let mut reader = ChunkReader::new(rx);
        let (_, read) = tokio::join!(feed(data, tx, &broke), reader.read_to_end(&mut got));
        assert_eq!(read.unwrap(), 100_000);
        assert!(got.iter().all(|&b| b == 5) && broke.lock().unwrap().is_none());

        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let broken: ByteStream<'static> =
            futures_util::stream::iter(vec![Ok(Bytes::from_static(b"part")), Err(io::Error::other("reset"))]).boxed();
        let mut got = Vec::new();
        let mut reader = ChunkReader::new(rx);
        let (_, read) = tokio::join!(feed(broken, tx, &broke), reader.read_to_end(&mut got));
        assert!(read.is_err());
        assert!(broke.lock().unwrap().is_some());
    }

    fn multipart_request(body: &str) -> Request {
        Request::builder()
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(Body::from(body.replace('\n', "\r\n")))
            .unwrap()
    }

    const FORM: &str = "--XyZ
Content-Disposition: form-data; name=\"note\"

skip me
--XyZ
Content-Disposition: form-data; name=\"file\"; filename=\"/home/user/a.txt\"
Content-Type: application/octet-stream

alpha
--XyZ
Content-Disposition: form-data; name=\"file\"; filename=\"rel/b.txt\"

beta
--XyZ--
";

    async fn parts(req: Request, query_path: Option<&str>) -> Result<Vec<(String, String)>, Failure> {
        let mut m = Multipart::from_request(req, &()).await.unwrap();
        let mut out = Vec::new();
        while let Some(field) = next_part(&mut m).await? {
            if let Some(target) = file_target(&field, query_path)? {
                out.push((target, field.text().await.unwrap()));
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn multipart_file_parts_go_to_their_filenames_or_the_query_path() {
        let got = parts(multipart_request(FORM), None).await.unwrap();
        assert_eq!(got, [("/home/user/a.txt".into(), "alpha".into()), ("rel/b.txt".into(), "beta".into())]);
        let got = parts(multipart_request(FORM), Some("/q")).await.unwrap();
        assert_eq!(got.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["/q", "/q"]);
        let nameless = "--XyZ\nContent-Disposition: form-data; name=\"file\"\n\nx\n--XyZ--\n";
        assert_eq!(parts(multipart_request(nameless), None).await.unwrap_err().code, Code::InvalidArgument);
        let cut = "--XyZ\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\n\nx";
        let mut m = Multipart::from_request(multipart_request(cut), &()).await.unwrap();
        let field = next_part(&mut m).await.unwrap().unwrap();
        assert!(field.text().await.is_err());
    }

    #[test]
    fn encodings_and_media_types_are_read_from_the_headers() {
        let h = |k: &str, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            m
        };
        assert_eq!(gzipped(&HeaderMap::new()), Ok(false));
        assert_eq!(gzipped(&h("content-encoding", "GZIP")), Ok(true));
        assert_eq!(gzipped(&h("content-encoding", "identity")), Ok(false));
        assert_eq!(gzipped(&h("content-encoding", "br")).unwrap_err().code, Code::InvalidArgument);
        assert_eq!(media_type(&h("content-type", "Multipart/Form-Data; boundary=x")), "multipart/form-data");
        assert_eq!(media_type(&HeaderMap::new()), "");
    }

    #[test]
    fn a_full_disk_is_507() {
        let api = |message: &str| {
            ClientError::Api(moat_api::ApiError {
                code: moat_api::ErrorCode::InvalidRequest,
                message: message.into(),
                hint: String::new(),
            })
        };
        let full = write_failure(api("/home/user/a failed: No space left on device (os error 28)."));
        assert_eq!(full.http_response().status(), StatusCode::INSUFFICIENT_STORAGE);
        let other = write_failure(api("/home/user is a directory."));
        assert_eq!(other.http_response().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn written_files_answer_as_envd_does() {
        let w = Written { name: "a.txt".into(), kind: "file", path: "/home/user/a.txt".into() };
        assert_eq!(
            serde_json::to_string(&[w]).unwrap(),
            r#"[{"name":"a.txt","type":"file","path":"/home/user/a.txt"}]"#
        );
    }
}
