//! Images: what the store holds, pulling and building one, and the progress stream of either.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// An image in the store (`GET /v1/images`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageInfo {
    pub name: String,
    /// `sha256:…`: the config digest of imported images, the recipe digest of built ones.
    pub digest: String,
    /// Virtual size of the base disk.
    pub size_bytes: u64,
    #[schema(schema_with = crate::openapi::schemas::env_pairs)]
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Where it came from: `pull REF@DIGEST`, `import`, `build debian:SUITE +PACKAGES`, `built-in`.
    pub source: String,
    /// When it was made, in seconds since the Unix epoch.
    pub created_at: i64,
}

/// `POST /v1/images/pull`: an image from a registry speaking the OCI distribution API.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`, as for `docker pull`.
    pub reference: String,
    /// The name to give it in the store: lowercase letters, digits and `._-:/@` (default: the
    /// reference as written).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255, pattern = r"^(?!(.*/)?\.{1,2}(/|$))[a-z0-9][a-z0-9._:/@-]*$")]
    pub name: Option<String>,
    /// Allow plain http to a registry that is not on loopback (loopback may always use http).
    #[serde(default)]
    pub insecure: bool,
    /// Credentials for the registry; anonymous without.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /v1/images/build`: an image from Debian packages, made with debootstrap.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildImage {
    /// The name to give it in the store: lowercase letters, digits and `._-:/@`.
    #[schema(min_length = 1, max_length = 255, pattern = r"^(?!(.*/)?\.{1,2}(/|$))[a-z0-9][a-z0-9._:/@-]*$")]
    pub name: String,
    /// `debian:bookworm` (or `debian:12`, `bookworm`).
    pub from: String,
    #[serde(default)]
    pub packages: Vec<String>,
}

/// One line of the NDJSON stream of a long image operation (pull, build, import).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageProgress {
    Progress {
        message: String,
    },
    /// Bytes of one layer downloaded so far (pulls); `done == total` once it is verified.
    Layer {
        digest: String,
        done: u64,
        total: u64,
    },
    Done {
        image: ImageInfo,
    },
    Error {
        error: ApiError,
    },
}
