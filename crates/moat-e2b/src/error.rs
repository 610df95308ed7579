//! Failures, and how each plane says them: the control plane and `/files` answer E2B's
//! `{"code": <HTTP status>, "message": …}`, Connect RPCs answer `{"code": "<connect code>",
//! "message": …}` with the code's HTTP status (or in a stream's end message).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use moat_api::ErrorCode;
use moat_client::ClientError;

/// The Connect error codes the front uses (<https://connectrpc.com/docs/protocol#error-codes>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    Canceled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary Connect error with this code.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Why a request failed, in terms both planes can say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Failure {
    pub code: Code,
    pub message: String,
    /// The HTTP status on the plain-HTTP planes, when it is not the code's (502 for a sandbox
    /// that is gone: the SDK reads it as "not running").
    pub status: Option<StatusCode>,
}

impl Failure {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into(), status: None }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(Code::InvalidArgument, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Failure {
        Failure::new(Code::NotFound, message)
    }

    pub(crate) fn unauthenticated(message: impl Into<String>) -> Failure {
        Failure::new(Code::Unauthenticated, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Failure {
        Failure::new(Code::Internal, message)
    }

    /// The sandbox plane's answer for a sandbox that does not exist or does not run: the SDK
    /// raises `SandboxNotRunningException` on a 502 whose message says "was not found".
    pub(crate) fn sandbox_gone(id: &str) -> Failure {
        Failure {
            code: Code::Unavailable,
            message: format!("the sandbox {id} was not found or is not running; create or connect to it again"),
            status: Some(StatusCode::BAD_GATEWAY),
        }
    }

    /// The failure as a plain HTTP answer: `{"code": <status>, "message": …}`.
    pub(crate) fn http_response(&self) -> Response {
        let status = self.status.unwrap_or(self.code.status());
        json_error(status, &self.message)
    }

    /// The failure as a unary Connect answer: `{"code": "<code>", "message": …}`.
    pub(crate) fn connect_response(&self) -> Response {
        if let Some(status) = self.status {
            // A plain HTTP error: the SDK maps it from the status, as it does a proxy's.
            return json_error(status, &self.message);
        }
        let body = serde_json::json!({ "code": self.code.name(), "message": self.message });
        (self.code.status(), axum::Json(body)).into_response()
    }

    /// The `error` member of a Connect stream's end message.
    pub(crate) fn connect_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.name(), "message": self.message })
    }
}

/// Plain HTTP is the default (control plane, `/files`, routing); Connect handlers call
/// [`Failure::connect_response`].
impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        self.http_response()
    }
}

/// E2B's error body. Errors the SDK would retry (429, 5xx) carry `Should-Retry: false`: moat's
/// answers to them do not change by asking again at once.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message });
    let mut r = (status, axum::Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        r.headers_mut().insert("should-retry", HeaderValue::from_static("false"));
    }
    r
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = match e.code() {
            Some(c) => match c {
                ErrorCode::NotFound => Code::NotFound,
                ErrorCode::AmbiguousRef | ErrorCode::InvalidRequest | ErrorCode::BodyTooLarge => Code::InvalidArgument,
                ErrorCode::NameTaken => Code::AlreadyExists,
                ErrorCode::PermissionDenied => Code::PermissionDenied,
                ErrorCode::InvalidPhase | ErrorCode::LeaseExpired | ErrorCode::InUse | ErrorCode::Incompatible => {
                    Code::FailedPrecondition
                }
                ErrorCode::LimitReached | ErrorCode::InsufficientResources => Code::ResourceExhausted,
                ErrorCode::BootFailed | ErrorCode::ExecFailed | ErrorCode::RegistryFailed | ErrorCode::Internal => {
                    Code::Internal
                }
            },
            None => Code::Unavailable,
        };
        let message = match &e {
            ClientError::Api(api) if !api.hint.is_empty() => format!("{} ({})", api.message, api.hint),
            _ => e.to_string(),
        };
        Failure::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_connect_protocol() {
        assert_eq!(Code::NotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(Code::Canceled.status().as_u16(), 499);
        assert_eq!(Code::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Code::DeadlineExceeded.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn a_gone_sandbox_reads_as_not_running() {
        let f = Failure::sandbox_gone("abc");
        let r = f.http_response();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert!(f.message.contains("was not found"));
        assert_eq!(r.headers()["should-retry"], "false");
    }
}
