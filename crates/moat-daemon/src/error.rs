//! The service's error, and the mappers from lower errors to it. Domain modules and the HTTP
//! handlers ([`crate::http`]) share them from here, so neither imports the other to build one.

use std::borrow::Cow;

use moat_api::{ApiError, ErrorCode, SandboxInfo};
use moat_hint::Hint;
use moat_image::ImageError;
use moat_sandbox::{LinkError, SandboxError};
use moat_vmm::VmmError;

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

impl Hint for ServiceError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        (!self.hint.is_empty()).then(|| self.hint.clone().into())
    }
}

/// A lower error as a service error: its message with its causes on one line, and its hint, else
/// the usual advice for `code`.
fn lower<E: std::error::Error + Hint + 'static>(code: ErrorCode, e: &E) -> ServiceError {
    let hint = e.hint().unwrap_or_else(|| fallback_hint(code).into());
    ServiceError::new(code, moat_hint::one_line(e), hint)
}

/// What to do about a failure whose error has no hint of its own.
fn fallback_hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidRequest | ErrorCode::BodyTooLarge => "fix the request and send it again",
        ErrorCode::BootFailed => "see `moat logs` for the guest console; `moat doctor` checks the host",
        ErrorCode::ExecFailed => "the sandbox may have stopped; see `moat inspect`",
        ErrorCode::InvalidPhase => "see the sandbox's phase with `moat inspect`",
        ErrorCode::Incompatible => "take a new snapshot on this host",
        _ => "see the daemon log; `moat doctor` checks the host",
    }
}

impl From<StateError> for ServiceError {
    fn from(e: StateError) -> ServiceError {
        let code = match e {
            StateError::NameTaken(_) | StateError::SnapshotNameTaken(_) => ErrorCode::NameTaken,
            StateError::NotFound(r) => return not_found(&r),
            StateError::Transition { .. } => ErrorCode::InvalidPhase,
            StateError::Missing { .. }
            | StateError::Corrupt { .. }
            | StateError::TooNew { .. }
            | StateError::Sql(_)
            | StateError::Io { .. } => ErrorCode::Internal,
        };
        lower(code, &e)
    }
}

/// Each sandbox failure under its own code: a boot that failed or timed out, a saved machine that
/// cannot be restored, a guest link that is gone, a request the guest or the VMM refused.
impl From<SandboxError> for ServiceError {
    fn from(e: SandboxError) -> ServiceError {
        lower(sandbox_code(&e), &e)
    }
}

fn sandbox_code(e: &SandboxError) -> ErrorCode {
    match e {
        SandboxError::InvalidSpec(_) => ErrorCode::InvalidRequest,
        SandboxError::Vmm(e) => vmm_code(e),
        SandboxError::Image(e) => image_code(e),
        SandboxError::Link(e) => link_code(e),
        SandboxError::BootTimeout { .. } | SandboxError::Boot { .. } | SandboxError::AdoptTimeout { .. } => {
            ErrorCode::BootFailed
        }
        SandboxError::Restore { .. } => ErrorCode::Incompatible,
        SandboxError::Config(_) | SandboxError::Io { .. } | SandboxError::AgentTimeout { .. } => ErrorCode::Internal,
    }
}

fn vmm_code(e: &VmmError) -> ErrorCode {
    match e {
        VmmError::QemuMissing(_)
        | VmmError::QemuBroken { .. }
        | VmmError::QemuExited { .. }
        | VmmError::Spawn(_)
        | VmmError::PathTooLong(_)
        | VmmError::QmpTimeout(_)
        | VmmError::AdoptQmp { .. }
        | VmmError::KvmUnusable { .. }
        | VmmError::Jail(_)
        | VmmError::Cgroup(_) => ErrorCode::BootFailed,
        // The VM is gone: the request does not fit the sandbox as it really is.
        VmmError::NotRunning | VmmError::NotOurProcess { .. } => ErrorCode::InvalidPhase,
        VmmError::Volume(moat_vmm::VolumeError::SlotBusy(_)) => ErrorCode::InUse,
        VmmError::Qmp(_) | VmmError::Migration(_) | VmmError::Volume(_) | VmmError::Io { .. } => ErrorCode::Internal,
    }
}

fn link_code(e: &LinkError) -> ErrorCode {
    match e {
        LinkError::Agent(a) => agent_code(a.code),
        LinkError::TooLarge { .. } => ErrorCode::InvalidRequest,
        LinkError::VersionMismatch { .. } => ErrorCode::BootFailed,
        LinkError::Connect { .. }
        | LinkError::Frame(_)
        | LinkError::Closed
        | LinkError::BadHandshake(_)
        | LinkError::Protocol { .. } => ErrorCode::ExecFailed,
    }
}

fn agent_code(code: moat_proto::ErrorCode) -> ErrorCode {
    use moat_proto::ErrorCode as Agent;
    match code {
        Agent::NotFound => ErrorCode::NotFound,
        Agent::PermissionDenied => ErrorCode::PermissionDenied,
        Agent::BadRequest | Agent::Unsupported => ErrorCode::InvalidRequest,
        Agent::SpawnFailed | Agent::Internal => ErrorCode::ExecFailed,
        Agent::Busy => ErrorCode::InUse,
    }
}

pub(crate) fn not_found(reference: &str) -> ServiceError {
    ServiceError::new(
        ErrorCode::NotFound,
        format!("no sandbox {reference:?}"),
        "list sandboxes with `moat ps`; names, ids and unique id prefixes work",
    )
}

fn image_code(e: &ImageError) -> ErrorCode {
    use ImageError as E;
    match e {
        E::NotFound { .. } | E::DigestGone { .. } => ErrorCode::NotFound,
        E::BadArchive { .. }
        | E::DigestMismatch { .. }
        | E::BadImageName { .. }
        | E::BadReference { .. }
        | E::BadManifest { .. }
        | E::WrongPlatform { .. }
        | E::InvalidRecipe { .. }
        | E::LayerUnreadable { .. }
        | E::LayerEntryRefused { .. } => ErrorCode::InvalidRequest,
        E::Registry { .. } | E::RemoteMissing { .. } => ErrorCode::RegistryFailed,
        E::KernelNotFound { .. }
        | E::KernelUnreadable { .. }
        | E::ModulesUnreadable { .. }
        | E::UnknownModule { .. }
        | E::ModulesInvalid { .. }
        | E::ModuleUnpack { .. }
        | E::AgentNotFound { .. }
        | E::AgentNotStatic { .. }
        | E::BusyboxUnusable { .. }
        | E::StoreCorrupt { .. }
        | E::ToolMissing { .. }
        | E::CommandFailed { .. }
        | E::BuildNeedsRoot { .. }
        | E::KeyringMissing { .. }
        | E::DebootstrapFailed { .. }
        | E::LayerEntryIo { .. }
        | E::Io { .. } => ErrorCode::Internal,
    }
}

pub(crate) fn image_error(e: ImageError) -> ServiceError {
    lower(image_code(&e), &e)
}

/// What the agent said about a file operation.
pub(crate) fn file_error(e: SandboxError) -> ServiceError {
    match e {
        SandboxError::Link(LinkError::Agent(a)) => {
            let code = match agent_code(a.code) {
                code @ (ErrorCode::NotFound | ErrorCode::PermissionDenied) => code,
                _ => ErrorCode::InvalidRequest,
            };
            ServiceError::new(code, a.message, "check the path in the sandbox (`moat exec BOX -- ls -la DIR`)")
        }
        e => e.into(),
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
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sandbox_failure_has_its_own_code_and_a_hint_apart_from_its_message() {
        let io = || std::io::Error::other("the io cause");
        let s = || "x".to_string();
        let t = std::time::Duration::from_secs(5);
        let agent = |code| LinkError::Agent(moat_proto::AgentError { code, message: s() });
        let cases = [
            (SandboxError::Config(s()), ErrorCode::Internal),
            (SandboxError::InvalidSpec(s()), ErrorCode::InvalidRequest),
            (SandboxError::Vmm(VmmError::QemuMissing(s())), ErrorCode::BootFailed),
            (SandboxError::Vmm(VmmError::NotRunning), ErrorCode::InvalidPhase),
            (SandboxError::Vmm(VmmError::Migration(s())), ErrorCode::Internal),
            (SandboxError::Vmm(VmmError::Io { what: s(), source: io() }), ErrorCode::Internal),
            (SandboxError::Image(ImageError::NotFound { name: s() }), ErrorCode::NotFound),
            (SandboxError::Image(ImageError::BusyboxUnusable { path: "/b".into(), why: s() }), ErrorCode::Internal),
            (SandboxError::Link(LinkError::Closed), ErrorCode::ExecFailed),
            (SandboxError::Link(LinkError::Connect { path: s(), source: io() }), ErrorCode::ExecFailed),
            (SandboxError::Link(LinkError::VersionMismatch { agent: 1, host: 2 }), ErrorCode::BootFailed),
            (SandboxError::Link(LinkError::TooLarge { size: 1 }), ErrorCode::InvalidRequest),
            (SandboxError::Link(agent(moat_proto::ErrorCode::NotFound)), ErrorCode::NotFound),
            (SandboxError::Link(agent(moat_proto::ErrorCode::SpawnFailed)), ErrorCode::ExecFailed),
            (SandboxError::Io { what: s(), source: io() }, ErrorCode::Internal),
            (SandboxError::BootTimeout { timeout: t, console: s() }, ErrorCode::BootFailed),
            (SandboxError::Boot { reason: s(), console: s() }, ErrorCode::BootFailed),
            (SandboxError::AdoptTimeout { timeout: t, console: s() }, ErrorCode::BootFailed),
            (SandboxError::Restore { reason: s(), console: s() }, ErrorCode::Incompatible),
        ];
        for (e, code) in cases {
            let shown = format!("{e:?}");
            let own_hint = e.hint();
            let e = ServiceError::from(e);
            assert_eq!(e.code, code, "{shown}");
            assert!(!e.hint.is_empty() && !e.message.contains("hint:"), "{e:?}");
            if let Some(h) = own_hint {
                assert_eq!(e.hint, h, "the error's own hint is kept: {shown}");
            }
        }
        // The cause travels in the message, once.
        let e = ServiceError::from(SandboxError::Io { what: "removing /run/x".into(), source: io() });
        assert_eq!(e.message, "removing /run/x failed: the io cause");
    }

    #[test]
    fn image_errors_keep_their_hint_and_get_their_code() {
        let e = image_error(ImageError::NotFound { name: "py".into() });
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.hint.contains("moat image ls") && !e.message.contains("hint"), "{e:?}");
        let e =
            image_error(ImageError::Registry { reference: "r".into(), reason: "401".into(), hint: "log in".into() });
        assert_eq!((e.code, e.hint.as_str()), (ErrorCode::RegistryFailed, "log in"));
        let e = image_error(ImageError::Io { what: "writing /x".into(), source: std::io::Error::other("disk full") });
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::Internal, "writing /x: disk full"));
        assert!(!e.hint.is_empty());
        let e = image_error(ImageError::LayerEntryRefused { entry: "../x".into(), reason: "escapes".into() });
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn state_errors_get_their_code() {
        let e = ServiceError::from(StateError::SnapshotNameTaken("s".into()));
        assert_eq!(e.code, ErrorCode::NameTaken);
        assert!(e.hint.contains("moat snapshot rm"), "{e:?}");
        assert_eq!(ServiceError::from(StateError::NotFound("b".into())).code, ErrorCode::NotFound);
        let e = ServiceError::from(StateError::Sql(rusqlite::Error::InvalidQuery));
        assert!(e.code == ErrorCode::Internal && e.message.starts_with("the state database failed: "), "{e:?}");
    }

    #[test]
    fn a_serve_error_keeps_its_cause_and_hint_out_of_its_message() {
        use crate::ServeError;
        let io = || std::io::Error::other("the io cause");
        let cases = [
            (ServeError::State(StateError::Corrupt { db: "/d".into(), reason: "x".into() }), true),
            (ServeError::Runtime(SandboxError::Vmm(VmmError::QemuMissing("x".into()))), true),
            (ServeError::AlreadyRunning { home: "/h".into() }, true),
            (ServeError::Io { what: "binding /s".into(), source: io() }, false),
            (ServeError::Service(ServiceError::internal("x")), true),
            (ServeError::Listen(crate::listen::ListenError::TlsHalf), true),
        ];
        for (e, hinted) in &cases {
            moat_hint::check(e, *hinted).unwrap();
        }
        moat_hint::check(&ServiceError::invalid("x"), true).unwrap();
    }
}
