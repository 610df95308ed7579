//! The service's error, and the mappers from lower errors to it. Domain modules and the HTTP
//! handlers ([`crate::http`]) share them from here, so neither imports the other to build one.

use moat_api::{ApiError, ErrorCode, SandboxInfo};
use moat_image::ImageError;
use moat_sandbox::{LinkError, SandboxError};

use crate::state::StateError;

/// A failed service call: a stable code, a message and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
    pub hint: String,
}

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>, hint: impl Into<String>) -> ServiceError {
        ServiceError { code, message: message.into(), hint: hint.into() }
    }

    pub(crate) fn internal(message: impl Into<String>) -> ServiceError {
        ServiceError::new(ErrorCode::Internal, message, "see the daemon log; `moat doctor` checks the host")
    }

    pub(crate) fn invalid(message: impl Into<String>) -> ServiceError {
        ServiceError::new(ErrorCode::InvalidRequest, message, "fix the request and send it again")
    }

    pub(crate) fn phase(s: &SandboxInfo, wanted: &str, hint: &str) -> ServiceError {
        ServiceError::new(
            ErrorCode::InvalidPhase,
            format!("sandbox {} is {}; it must be {wanted}", s.name, s.phase),
            hint,
        )
    }
}

/// The error as the API's wire type, for a front that reports it inside a stream.
impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        ApiError { code: e.code, message: e.message, hint: e.hint }
    }
}

impl From<StateError> for ServiceError {
    fn from(e: StateError) -> ServiceError {
        match e {
            StateError::NameTaken(name) => ServiceError::new(
                ErrorCode::NameTaken,
                format!("a sandbox named {name:?} already exists"),
                "choose another name, or remove the old sandbox with `moat rm`",
            ),
            StateError::NotFound(r) => not_found(&r),
            e => ServiceError::new(
                ErrorCode::Internal,
                e.to_string(),
                "see the daemon log; `moat doctor` checks the state",
            ),
        }
    }
}

impl From<SandboxError> for ServiceError {
    fn from(e: SandboxError) -> ServiceError {
        ServiceError::new(
            ErrorCode::BootFailed,
            e.to_string(),
            "see `moat logs` for the guest console; `moat doctor` checks the host",
        )
    }
}

pub(crate) fn not_found(reference: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::NotFound,
        format!("no sandbox {reference:?}"),
        "list sandboxes with `moat ps`; names, ids and unique id prefixes work",
    )
}

pub(crate) fn image_error(e: ImageError) -> ServiceError {
    let code = match e {
        ImageError::NotFound { .. } | ImageError::DigestGone { .. } => ErrorCode::NotFound,
        ImageError::BadArchive { .. }
        | ImageError::DigestMismatch { .. }
        | ImageError::BadImageName { .. }
        | ImageError::BadReference { .. }
        | ImageError::BadManifest { .. }
        | ImageError::WrongPlatform { .. }
        | ImageError::InvalidRecipe { .. } => ErrorCode::InvalidRequest,
        ImageError::Registry { .. } => ErrorCode::RegistryFailed,
        _ => ErrorCode::Internal,
    };
    let text = e.to_string();
    let (message, hint) = match text.split_once("\nhint: ") {
        Some((m, h)) => (m.to_string(), h.to_string()),
        None => (text, "see the daemon log".to_string()),
    };
    ServiceError::new(code, message, hint)
}

/// What the agent said about a file operation.
pub(crate) fn file_error(e: SandboxError) -> ServiceError {
    use moat_proto::ErrorCode as Agent;
    match e {
        SandboxError::Link(LinkError::Agent(a)) => {
            let code = match a.code {
                Agent::NotFound => ErrorCode::NotFound,
                Agent::PermissionDenied => ErrorCode::PermissionDenied,
                _ => ErrorCode::InvalidRequest,
            };
            ServiceError::new(code, a.message, "check the path in the sandbox (`moat exec BOX -- ls -la DIR`)")
        }
        e => {
            ServiceError::new(ErrorCode::ExecFailed, e.to_string(), "the sandbox may have stopped; see `moat inspect`")
        }
    }
}

/// What the agent said about a background process.
pub(crate) fn process_error(e: SandboxError) -> ServiceError {
    match e {
        SandboxError::Link(LinkError::Agent(a)) => {
            let code =
                if a.code == moat_proto::ErrorCode::NotFound { ErrorCode::NotFound } else { ErrorCode::InvalidRequest };
            ServiceError::new(code, a.message, "list the sandbox's processes with `moat ps BOX`")
        }
        e => {
            ServiceError::new(ErrorCode::ExecFailed, e.to_string(), "the sandbox may have stopped; see `moat inspect`")
        }
    }
}
