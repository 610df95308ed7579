//! Running commands: the exec WebSocket's messages, background processes and signals.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// `POST /v1/sandboxes/{ref}/processes`: a background process (`exec -d`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    #[schema(schema_with = crate::openapi::schemas::command)]
    pub argv: Vec<String>,
    #[serde(default)]
    #[schema(schema_with = crate::openapi::schemas::environment)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// The answer to [`StartProcess`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProcessStarted {
    pub pid: u32,
}

/// `POST /v1/sandboxes/{ref}/processes/{pid}/kill`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KillProcess {
    /// Signal number, 1 to 64 [default: 15, SIGTERM]; it goes to the whole process group.
    #[serde(default = "default_signal")]
    #[schema(minimum = 1, maximum = 64)]
    pub signal: i32,
}

fn default_signal() -> i32 {
    15
}

/// The first message a client sends on an exec WebSocket (`GET /v1/sandboxes/{ref}/exec`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    /// The command; empty means the image's Entrypoint and Cmd.
    #[serde(default)]
    #[schema(schema_with = crate::openapi::schemas::command_or_image_default)]
    pub argv: Vec<String>,
    #[serde(default)]
    #[schema(schema_with = crate::openapi::schemas::environment)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Whether the client will send stdin; without it the process reads /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Stop sending output after this many bytes (stdout and stderr together); the process runs
    /// on, and a `[moat: output truncated after N bytes]` line on stderr marks the cut.
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// Run on a terminal of this size (`exec -t`): one output stream (stdout), the terminal's line
    /// discipline turns Ctrl-C into SIGINT, and `resize` messages follow the client's window.
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Remove the sandbox when this exec ends or the client goes away (one-shot `moat run`).
    #[serde(default)]
    pub remove_sandbox_after: bool,
}

/// Text messages from the client on an exec WebSocket. Binary messages are stdin bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecClientMessage {
    /// Send a signal (1 to 64) to the process group.
    Signal {
        #[schema(minimum = 1, maximum = 64)]
        signal: i32,
    },
    /// No more stdin.
    StdinEof,
    /// The client's terminal changed size (only for an exec started with `tty`).
    Resize {
        #[schema(minimum = 1, maximum = 65535)]
        rows: u16,
        #[schema(minimum = 1, maximum = 65535)]
        cols: u16,
    },
}

/// A terminal's size in character cells; both at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    #[schema(minimum = 1, maximum = 65535)]
    pub rows: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub cols: u16,
}

/// Text messages from the daemon on an exec WebSocket. Binary messages are output: the first byte
/// is the stream (1 stdout, 2 stderr), the rest its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecServerMessage {
    Started { pid: u32 },
    Exit { code: Option<i32>, signal: Option<i32>, timed_out: bool },
    Error { error: ApiError },
}

/// Stream tags of binary exec output messages.
pub const STDOUT_TAG: u8 = 1;
pub const STDERR_TAG: u8 = 2;

/// A signal by name (`TERM`, `SIGKILL`, case-insensitive) or number (1 to 64), for Linux guests.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.trim().parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let name = s.trim().to_ascii_uppercase();
    Ok(match name.strip_prefix("SIG").unwrap_or(&name) {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        _ => return Err(format!("{s:?} is not a signal; use a name (TERM, KILL, INT, HUP, USR1, …) or a number 1-64")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("sigkill"), Ok(9));
        assert_eq!(parse_signal("2"), Ok(2));
        assert!(parse_signal("0").is_err() && parse_signal("BOGUS").is_err());
    }

    #[test]
    fn exec_messages_are_tagged() {
        let m = ExecClientMessage::Signal { signal: 2 };
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"type":"signal","signal":2}"#);
        let e: ExecServerMessage = serde_json::from_str(r#"{"type":"started","pid":7}"#).unwrap();
        assert_eq!(e, ExecServerMessage::Started { pid: 7 });
    }
}
