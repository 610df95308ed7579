//! Files in a running sandbox: metadata, contents and tar archives both ways, change events.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::params::SandboxRef;
use super::schemas::Binary;
use crate::{ApiError, ChangeMode, FileInfo, FsEvent, Listing, MakeDir, RemovePath, RenamePath};
use crate::{ArchiveQuery, PathQuery, WriteFileQuery};

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/files/stat", tag = "files", operation_id = "statFile",
    summary = "A file's metadata (lstat: symlinks are not followed)",
    params(SandboxRef, PathQuery),
    responses(
        (status = 200, description = "The file", body = FileInfo),
        (status = 400, description = "A path that is not absolute, or a bad query or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn stat_file() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/files/list", tag = "files", operation_id = "listFiles",
    summary = "A directory's entries (recursive: the whole tree; symlinks not followed)",
    params(SandboxRef, PathQuery),
    responses(
        (status = 200, description = "The entries, by path", body = Listing),
        (status = 400, description = "Not a directory, too many entries, or a bad query or reference",
            body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn list_files() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/files/mkdir", tag = "files", operation_id = "makeDir",
    summary = "Make a directory",
    params(SandboxRef),
    request_body(content = MakeDir, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = Object),
        (status = 400, description = "It exists, or a bad path, body or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox, or no parent directory", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn make_dir() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/files/remove", tag = "files", operation_id = "removePath",
    summary = "Remove a file, symlink or directory",
    params(SandboxRef),
    request_body(content = RemovePath, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = Object),
        (status = 400, description = "A directory that is not empty without recursive, `/`, or a bad path, \
            body or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn remove_path() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/files/rename", tag = "files", operation_id = "renamePath",
    summary = "Rename (move) a path",
    params(SandboxRef),
    request_body(content = RenamePath, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = Object),
        (status = 400, description = "The rename is refused (e.g. across file systems), or a bad path, body \
            or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn rename_path() {}

#[utoipa::path(post, path = "/v1/sandboxes/{reference}/files/chmod", tag = "files", operation_id = "changeMode",
    summary = "Change permission bits",
    params(SandboxRef),
    request_body(content = ChangeMode, content_type = "application/json"),
    responses(
        (status = 200, description = "Done", body = Object),
        (status = 400, description = "A bad path, mode, body or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn change_mode() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/files/watch", tag = "files", operation_id = "watchFiles",
    summary = "Changes under a directory, as a stream of NDJSON lines",
    description = "One `FsEvent` per line. The response never ends by itself: it streams until the \
        client closes the connection or the sandbox stops.",
    params(SandboxRef, PathQuery),
    responses(
        (status = 200, description = "A stream of FsEvent lines", content_type = "application/x-ndjson",
            body = FsEvent),
        (status = 400, description = "Not a directory, or a bad query or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn watch_files() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/files/content", tag = "files", operation_id = "readFile",
    summary = "A regular file's bytes, streamed",
    params(SandboxRef, PathQuery),
    responses(
        (status = 200, description = "The file (Content-Length is its size)",
            content_type = "application/octet-stream", body = inline(Binary)),
        (status = 400, description = "Not a regular file, or a bad query or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn read_file() {}

#[utoipa::path(put, path = "/v1/sandboxes/{reference}/files/content", tag = "files", operation_id = "writeFile",
    summary = "Write the body to a file, of any size",
    description = "Atomic by default: written beside the file and renamed into place.",
    params(SandboxRef, WriteFileQuery),
    request_body(content = inline(Binary), content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "The written file", body = FileInfo),
        (status = 400, description = "A bad mode, the write failed, or a bad query or reference",
            body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox, or no such directory", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn write_file() {}

#[utoipa::path(get, path = "/v1/sandboxes/{reference}/archive", tag = "files", operation_id = "readArchive",
    summary = "A tar archive of a file or tree, streamed (symlinks stored, not followed)",
    params(SandboxRef, ArchiveQuery),
    responses(
        (status = 200, description = "The archive", content_type = "application/x-tar", body = inline(Binary)),
        (status = 400, description = "A bad entry name, or a bad query or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or path", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn read_archive() {}

#[utoipa::path(put, path = "/v1/sandboxes/{reference}/archive", tag = "files", operation_id = "writeArchive",
    summary = "Unpack a tar archive, of any size, into an existing directory",
    params(SandboxRef, PathQuery),
    request_body(content = inline(Binary), content_type = "application/x-tar"),
    responses(
        (status = 200, description = "Done", body = Object),
        (status = 400, description = "Not a tar archive, an entry that would land outside the directory, or a \
            bad query or reference", body = ApiError),
        (status = 403, description = "The sandbox refused access to the path", body = ApiError),
        (status = 404, description = "No such sandbox or directory", body = ApiError),
        (status = 409, description = "It is not running", body = ApiError),
        (status = 500, description = "The sandbox's agent failed", body = ApiError),
    ))]
pub fn write_archive() {}
