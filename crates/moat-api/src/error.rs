//! The body of every error response and its stable codes.

use serde::{Deserialize, Serialize};

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    /// Stable, machine-readable: see [`ErrorCode`].
    pub code: ErrorCode,
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

/// Stable error codes; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    AmbiguousRef,
    NameTaken,
    InvalidRequest,
    BodyTooLarge,
    InvalidPhase,
    LeaseExpired,
    LimitReached,
    BootFailed,
    ExecFailed,
    /// A registry refused or failed a pull (the message says how).
    RegistryFailed,
    /// The sandbox refused access to a path.
    PermissionDenied,
    /// Something still depends on what was to be removed (the message says what).
    InUse,
    /// A snapshot cannot be restored, or a sandbox started, on this host as it is now (the
    /// message says why).
    Incompatible,
    /// The host has not the memory or disk left for what was asked, within the daemon's
    /// overcommit ratios (the message gives the numbers).
    InsufficientResources,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::AmbiguousRef | ErrorCode::InvalidRequest => 400,
            ErrorCode::NameTaken
            | ErrorCode::InvalidPhase
            | ErrorCode::LeaseExpired
            | ErrorCode::InUse
            | ErrorCode::Incompatible => 409,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::LimitReached | ErrorCode::InsufficientResources => 429,
            ErrorCode::BootFailed | ErrorCode::ExecFailed | ErrorCode::Internal => 500,
            ErrorCode::RegistryFailed => 502,
        }
    }
}
