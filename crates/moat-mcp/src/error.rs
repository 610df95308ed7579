//! Tool errors: what failed and what to do next, returned to the model as a tool result with
//! `isError` set (never as a protocol error), so it can correct itself and carry on.

use moat_client::{ClientError, CopyError};
use moat_hint::Hint;
use rmcp::model::{ContentBlock, IntoContents};

/// A failed tool call: what failed and what to do, shown to the model together
/// ([`IntoContents`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    pub message: String,
    pub hint: String,
}

impl ToolError {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> ToolError {
        ToolError { message: message.into(), hint: hint.into() }
    }

    /// A tool argument that does not make sense.
    pub fn invalid(message: impl Into<String>) -> ToolError {
        ToolError::new(message, "fix the argument and call the tool again; the tool's input schema lists the fields")
    }

    /// A lower error: its message with its causes, and its hint or else `otherwise`.
    fn of<E: std::error::Error + Hint + 'static>(e: &E, otherwise: &str) -> ToolError {
        ToolError::new(moat_hint::one_line(e), e.hint().map_or_else(|| otherwise.to_string(), String::from))
    }
}

impl Hint for ToolError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        (!self.hint.is_empty()).then(|| self.hint.clone().into())
    }
}

impl From<ClientError> for ToolError {
    fn from(e: ClientError) -> ToolError {
        match e {
            // The daemon's messages can quote the guest's console (a failed boot).
            ClientError::Api(e) => ToolError::new(
                format!("{} ({})", moat_api::escape_controls(&e.message), code(e.code)),
                moat_api::escape_controls(&e.hint),
            ),
            e => ToolError::of(&e, "try again; if it keeps failing, ask the operator to check the moat daemon"),
        }
    }
}

impl From<CopyError> for ToolError {
    fn from(e: CopyError) -> ToolError {
        match e {
            CopyError::Client(e) => e.into(),
            e => ToolError::of(&e, "check the host path and that its directory exists"),
        }
    }
}

impl From<crate::policy::HostPathError> for ToolError {
    fn from(e: crate::policy::HostPathError) -> ToolError {
        ToolError::of(&e, "")
    }
}

impl From<crate::policy::PolicyError> for ToolError {
    fn from(e: crate::policy::PolicyError) -> ToolError {
        ToolError::of(&e, "")
    }
}

/// The API's stable error code as the daemon spells it.
fn code(c: moat_api::ErrorCode) -> String {
    serde_json::to_value(c).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

impl IntoContents for ToolError {
    fn into_contents(self) -> Vec<ContentBlock> {
        vec![ContentBlock::text(moat_hint::Report::new(&self).to_string())]
    }
}

/// What every tool returns: text for the model, or an error with a hint.
pub type ToolResult = Result<String, ToolError>;

/// Tool arguments whose deserialization errors name the field at fault ("sandbox: invalid type:
/// integer `5`, expected a string"), so a model sees what to fix. Its schema is `T`'s.
#[derive(Debug)]
pub struct Checked<T>(pub T);

impl<'de, T: serde::de::DeserializeOwned> serde::Deserialize<'de> for Checked<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        serde_path_to_error::deserialize(value).map(Checked).map_err(|e| {
            let at = e.path().to_string();
            let at = if at == "." { String::new() } else { format!("{at}: ") };
            D::Error::custom(format!("{at}{} (the tool's input schema lists the fields and their types)", e.inner()))
        })
    }
}

impl<T: schemars::JsonSchema> schemars::JsonSchema for Checked<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Only deserialized.
    struct Args {
        sandbox: String,
        count: Option<u32>,
    }

    #[test]
    fn lower_errors_become_a_message_with_their_causes_and_a_hint() {
        let io = || std::io::Error::other("connection refused");
        let e = ToolError::from(ClientError::Connect { path: "/run/moat.sock".into(), source: io() });
        assert_eq!(e.message, "cannot reach the moat daemon at /run/moat.sock: connection refused");
        assert!(e.hint.contains("moat serve"), "{e:?}");
        moat_hint::check(&e, true).unwrap();
        let api = moat_api::ApiError {
            code: moat_api::ErrorCode::NotFound,
            message: "no sandbox \"x\"".into(),
            hint: "list sandboxes with `moat ps`".into(),
        };
        let e = ToolError::from(CopyError::Client(ClientError::Api(api)));
        assert_eq!(
            (e.message.as_str(), e.hint.as_str()),
            ("no sandbox \"x\" (not_found)", "list sandboxes with `moat ps`")
        );
        let e = ToolError::from(CopyError::Host { what: "reading /x".into(), source: io() });
        assert_eq!(
            (e.message.as_str(), e.hint.as_str()),
            ("reading /x: connection refused", "check the host path and that its directory exists")
        );
        let e = ToolError::from(crate::policy::HostPathError::Off("--host-dir".into()));
        assert!(e.hint.contains("--host-dir") && !e.message.contains("--host-dir"), "{e:?}");
        let shown = e.into_contents();
        let text = serde_json::to_string(&shown).unwrap();
        assert!(
            text.contains("copying host files is off for this MCP server\\nhint: the operator allows it"),
            "{text}"
        );
        moat_hint::check(&crate::McpError::Handshake("eof".into()), true).unwrap();
        moat_hint::check(&ToolError::new("m", ""), false).unwrap();
    }

    #[test]
    fn argument_errors_name_the_field() {
        let e = serde_json::from_str::<Checked<Args>>(r#"{"sandbox": 5}"#).unwrap_err().to_string();
        assert!(e.starts_with("sandbox: invalid type: integer `5`, expected a string"), "{e}");
        let e = serde_json::from_str::<Checked<Args>>(r#"{"sandbox": "a", "count": "two"}"#).unwrap_err().to_string();
        assert!(e.starts_with("count: invalid type: string"), "{e}");
        let e = serde_json::from_str::<Checked<Args>>(r#"{}"#).unwrap_err().to_string();
        assert!(e.starts_with("missing field `sandbox`"), "{e}");
        let e = serde_json::from_str::<Checked<Args>>(r#"{"sandbox": "a", "timeout": 1}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `timeout`, expected `sandbox` or `count`"), "{e}");
    }
}
