//! The image store: list, pull, import, build, inspect, remove and gc.

#![allow(dead_code)] // The stubs exist for their `#[utoipa::path]`s.

use super::params::ImageRef;
use super::schemas::Binary;
use crate::{ApiError, BuildImage, ImageInfo, ImageProgress, ImportQuery, PullImage, Reclaimed};

#[utoipa::path(get, path = "/v1/images", tag = "images", operation_id = "listImages",
    summary = "List images",
    responses(
        (status = 200, description = "All named images", body = Vec<ImageInfo>),
        (status = 500, description = "The image store could not be read", body = ApiError),
    ))]
pub fn list_images() {}

#[utoipa::path(post, path = "/v1/images/build", tag = "images", operation_id = "buildImage",
    summary = "Build an image from Debian packages (debootstrap), streaming its progress",
    description = "The answer is a stream of `ImageProgress` lines, the last one `done` or `error`. The \
        build goes on if the client leaves.",
    request_body(content = BuildImage, content_type = "application/json"),
    responses(
        (status = 200, description = "A stream of ImageProgress lines", content_type = "application/x-ndjson",
            body = ImageProgress),
        (status = 400, description = "A bad name, suite or package", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The image store could not be prepared", body = ApiError),
    ))]
pub fn build_image() {}

#[utoipa::path(post, path = "/v1/images/pull", tag = "images", operation_id = "pullImage",
    summary = "Pull an image from a registry speaking the OCI distribution API, streaming its progress",
    description = "The answer is a stream of `ImageProgress` lines (with bytes per layer), the last one \
        `done` or `error`. The pull goes on if the client leaves.",
    request_body(content = PullImage, content_type = "application/json"),
    responses(
        (status = 200, description = "A stream of ImageProgress lines", content_type = "application/x-ndjson",
            body = ImageProgress),
        (status = 400, description = "A bad reference, name or login", body = ApiError),
        (status = 413, description = "The body is over 64 KiB", body = ApiError),
        (status = 500, description = "The image store could not be prepared", body = ApiError),
    ))]
pub fn pull_image() {}

#[utoipa::path(post, path = "/v1/images/gc", tag = "images", operation_id = "imageGc",
    summary = "Remove cached layers, interrupted pulls and builds, and image files no name or sandbox needs",
    responses(
        (status = 200, description = "The paths removed", body = Reclaimed),
        (status = 500, description = "The image store could not be read", body = ApiError),
    ))]
pub fn image_gc() {}

#[utoipa::path(post, path = "/v1/images/import", tag = "images", operation_id = "importImage",
    summary = "Import a docker-save tarball or OCI image-layout archive (the body, of any size), streaming \
        its progress",
    params(ImportQuery),
    request_body(content = inline(Binary), content_type = "application/x-tar"),
    responses(
        (status = 200, description = "A stream of ImageProgress lines", content_type = "application/x-ndjson",
            body = ImageProgress),
        (status = 400, description = "A bad name or query, or the upload broke off", body = ApiError),
        (status = 500, description = "The upload could not be stored", body = ApiError),
    ))]
pub fn import_image() {}

#[utoipa::path(get, path = "/v1/images/{name}", tag = "images", operation_id = "inspectImage",
    summary = "Inspect an image",
    params(ImageRef),
    responses(
        (status = 200, description = "The image", body = ImageInfo),
        (status = 404, description = "No such image", body = ApiError),
        (status = 500, description = "The image store could not be read", body = ApiError),
    ))]
pub fn inspect_image() {}

#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images", operation_id = "removeImage",
    summary = "Remove an image's name; its files go too when no other name and no sandbox uses them",
    description = "Its templates are removed with it.",
    params(ImageRef),
    responses(
        (status = 200, description = "The removed image", body = ImageInfo),
        (status = 404, description = "No such image", body = ApiError),
        (status = 409, description = "Sandboxes use it, or snapshots build on it (the message names them)",
            body = ApiError),
        (status = 500, description = "The image store could not be changed", body = ApiError),
    ))]
pub fn remove_image() {}
