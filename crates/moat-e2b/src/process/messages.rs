//! The messages of envd's `process.Process` service in proto3's JSON form (see `docs/e2b.md`
//! and the `.proto` text it quotes): lowerCamelCase names out, either spelling in, unset optional
//! fields left out, `bytes` as standard base64 (URL-safe and unpadded taken too), enums by name
//! or number, `null` read as unset.

use std::collections::BTreeMap;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use bytes::Bytes;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::Failure;

/// What a process was started with, as the client gave it (`List` answers it back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct ProcessConfig {
    #[serde(deserialize_with = "or_default")]
    pub cmd: String,
    #[serde(deserialize_with = "or_default", skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(deserialize_with = "or_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// A pseudo-terminal request: `{"size": {"cols": …, "rows": …}}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct Pty {
    pub size: Option<PtySize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct PtySize {
    #[serde(deserialize_with = "uint32")]
    pub cols: u32,
    #[serde(deserialize_with = "uint32")]
    pub rows: u32,
}

/// Which process a call is about: oneof `pid` | `tag`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct ProcessSelector {
    #[serde(deserialize_with = "optional_uint32")]
    pub pid: Option<u32>,
    pub tag: Option<String>,
}

/// A selector with its oneof decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    Pid(u32),
    Tag(String),
}

impl ProcessSelector {
    pub(crate) fn selector(&self) -> Result<Selector, Failure> {
        match (self.pid, &self.tag) {
            (Some(pid), None) => Ok(Selector::Pid(pid)),
            (None, Some(tag)) => Ok(Selector::Tag(tag.clone())),
            (None, None) => Err(Failure::invalid("name the process: `process` needs a `pid` or a `tag`")),
            (Some(_), Some(_)) => Err(Failure::invalid("name the process by `pid` or by `tag`, not both")),
        }
    }
}

/// A call's `process` field, which every call on one process needs.
pub(crate) fn selector(process: &Option<ProcessSelector>) -> Result<Selector, Failure> {
    process.as_ref().ok_or_else(|| Failure::invalid("the request names no process: send `process`"))?.selector()
}

/// Input for a process: oneof `stdin` | `pty`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct ProcessInput {
    pub stdin: Option<B64>,
    pub pty: Option<B64>,
}

/// Input with its oneof decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    Stdin(Bytes),
    Pty(Bytes),
}

impl ProcessInput {
    pub(crate) fn input(self) -> Result<Input, Failure> {
        match (self.stdin, self.pty) {
            (Some(d), None) => Ok(Input::Stdin(d.0)),
            (None, Some(d)) => Ok(Input::Pty(d.0)),
            (None, None) => Err(Failure::invalid("the input is empty: send `stdin` or `pty` bytes")),
            (Some(_), Some(_)) => Err(Failure::invalid("send `stdin` or `pty` bytes, not both")),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct StartRequest {
    pub process: Option<ProcessConfig>,
    pub pty: Option<Pty>,
    pub tag: Option<String>,
    pub stdin: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct ConnectRequest {
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct ListRequest {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct SendInputRequest {
    pub process: Option<ProcessSelector>,
    pub input: Option<ProcessInput>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct SendSignalRequest {
    pub process: Option<ProcessSelector>,
    pub signal: Signal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct CloseStdinRequest {
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct UpdateRequest {
    pub process: Option<ProcessSelector>,
    pub pty: Option<Pty>,
}

/// One message of `StreamInput`: oneof `start` | `data` | `keepalive`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct StreamInputRequest {
    pub start: Option<StreamInputStart>,
    pub data: Option<StreamInputData>,
    pub keepalive: Option<Empty>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct StreamInputStart {
    pub process: Option<ProcessSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct StreamInputData {
    pub input: Option<ProcessInput>,
}

/// The signals `SendSignal` takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Also what an unknown name or number reads as, as proto3 JSON parsers do.
    #[default]
    Unspecified,
    Sigterm,
    Sigkill,
}

impl Signal {
    /// The Linux signal number, when there is one.
    pub(crate) fn number(self) -> Option<i32> {
        match self {
            Signal::Unspecified => None,
            Signal::Sigterm => Some(15),
            Signal::Sigkill => Some(9),
        }
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Name(String),
        }
        Ok(match Option::<Raw>::deserialize(d)? {
            Some(Raw::Number(15)) => Signal::Sigterm,
            Some(Raw::Number(9)) => Signal::Sigkill,
            Some(Raw::Name(n)) if n == "SIGNAL_SIGTERM" => Signal::Sigterm,
            Some(Raw::Name(n)) if n == "SIGNAL_SIGKILL" => Signal::Sigkill,
            _ => Signal::Unspecified,
        })
    }
}

/// An empty message, in and out (`{}`); other fields are ignored on the way in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Empty {}

/// What `Start` and `Connect` stream: `{"event": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct EventMessage {
    pub event: ProcessEvent,
}

/// `ProcessEvent`'s oneof `event`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum ProcessEvent {
    Start { pid: u32 },
    Data(DataEvent),
    End(EndEvent),
    Keepalive {},
}

/// `DataEvent`'s oneof `output`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum DataEvent {
    Stdout(B64),
    Stderr(B64),
    Pty(B64),
}

/// How a process ended, as Go's `os.ProcessState` says it (envd's `end` event).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EndEvent {
    /// The exit code; -1 when a signal ended the process.
    #[serde(skip_serializing_if = "is_zero")]
    pub exit_code: i32,
    /// Whether the process exited (rather than being killed by a signal).
    #[serde(skip_serializing_if = "is_false")]
    pub exited: bool,
    /// `exit status N` or `signal: killed`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// The status again when the process failed (non-zero or signalled); absent on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EventMessage {
    pub(crate) fn start(pid: u32) -> EventMessage {
        EventMessage { event: ProcessEvent::Start { pid } }
    }

    pub(crate) fn keepalive() -> EventMessage {
        EventMessage { event: ProcessEvent::Keepalive {} }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListResponse {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProcessInfo {
    pub config: ProcessConfig,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// proto3 JSON `bytes`: standard base64 with padding out; standard or URL-safe, padded or not, in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct B64(pub Bytes);

const STANDARD_ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);
const URL_SAFE_ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

impl B64 {
    fn decode(text: &str) -> Option<B64> {
        let engine = if text.contains(['-', '_']) { &URL_SAFE_ANY_PADDING } else { &STANDARD_ANY_PADDING };
        engine.decode(text).ok().map(|v| B64(v.into()))
    }
}

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<B64, D::Error> {
        let text = String::deserialize(d)?;
        B64::decode(&text).ok_or_else(|| de::Error::custom("bytes must be base64"))
    }
}

/// A field whose `null` means its default (proto3 JSON).
fn or_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A `uint32` as proto3 JSON writes it: a number, or a decimal string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Uint32 {
    Number(u32),
    Text(String),
}

impl Uint32 {
    fn value<E: de::Error>(self) -> Result<u32, E> {
        match self {
            Uint32::Number(n) => Ok(n),
            Uint32::Text(t) => t.trim().parse().map_err(|_| E::custom(format!("{t:?} is not a uint32"))),
        }
    }
}

fn uint32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(optional_uint32(d)?.unwrap_or_default())
}

fn optional_uint32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Option::<Uint32>::deserialize(d)?.map(Uint32::value).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What the Python SDK 2.63 sends (`process_pb.*.to_json()`), byte for byte.
    #[test]
    fn requests_the_sdk_sends_decode() {
        let run: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"b"},"cwd":"/tmp"},"stdin":false}"#,
        )
        .unwrap();
        let config = run.process.unwrap();
        assert_eq!((config.cmd.as_str(), config.args.len(), config.cwd.as_deref()), ("/bin/bash", 3, Some("/tmp")));
        assert_eq!(config.envs["A"], "b");
        assert_eq!((run.stdin, run.pty, run.tag), (Some(false), None, None));

        let pty: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-i","-l"]},"pty":{"size":{"cols":80,"rows":24}},"tag":"t"}"#,
        )
        .unwrap();
        assert_eq!(pty.pty.and_then(|p| p.size), Some(PtySize { cols: 80, rows: 24 }));
        assert_eq!((pty.tag.as_deref(), pty.stdin), (Some("t"), None));

        let input: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":7},"input":{"stdin":"aGkK"}}"#).unwrap();
        assert_eq!(selector(&input.process), Ok(Selector::Pid(7)));
        assert_eq!(input.input.unwrap().input(), Ok(Input::Stdin(Bytes::from_static(b"hi\n"))));
        let input: SendInputRequest =
            serde_json::from_str(r#"{"process":{"tag":"x"},"input":{"pty":"Aw=="}}"#).unwrap();
        assert_eq!(selector(&input.process), Ok(Selector::Tag("x".into())));
        assert_eq!(input.input.unwrap().input(), Ok(Input::Pty(Bytes::from_static(b"\x03"))));

        let kill: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":7},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(kill.signal.number(), Some(9));
        let update: UpdateRequest =
            serde_json::from_str(r#"{"process":{"pid":7},"pty":{"size":{"cols":100,"rows":30}}}"#).unwrap();
        assert_eq!(update.pty.and_then(|p| p.size), Some(PtySize { cols: 100, rows: 30 }));
        let close: CloseStdinRequest = serde_json::from_str(r#"{"process":{"pid":7}}"#).unwrap();
        assert_eq!(selector(&close.process), Ok(Selector::Pid(7)));
        let connect: ConnectRequest = serde_json::from_str(r#"{"process":{"pid":7}}"#).unwrap();
        assert_eq!(selector(&connect.process), Ok(Selector::Pid(7)));
        let _: ListRequest = serde_json::from_str("{}").unwrap();

        let start: StreamInputRequest = serde_json::from_str(r#"{"start":{"process":{"pid":7}}}"#).unwrap();
        assert_eq!(selector(&start.start.unwrap().process), Ok(Selector::Pid(7)));
        let data: StreamInputRequest = serde_json::from_str(r#"{"data":{"input":{"stdin":"YWJj"}}}"#).unwrap();
        assert_eq!(data.data.unwrap().input.unwrap().input(), Ok(Input::Stdin(Bytes::from_static(b"abc"))));
        let keepalive: StreamInputRequest = serde_json::from_str(r#"{"keepalive":{}}"#).unwrap();
        assert_eq!(keepalive.keepalive, Some(Empty {}));
    }

    #[test]
    fn proto3_json_variants_decode() {
        // Python's json_format (SDK ≤2.34) indents; numbers may come as strings; null is unset.
        let r: StartRequest = serde_json::from_str(
            "{\n  \"process\": {\n    \"cmd\": \"ls\",\n    \"args\": null,\n    \"envs\": null\n  },\n  \"stdin\": null\n}",
        )
        .unwrap();
        assert_eq!(r.process.unwrap().args, Vec::<String>::new());
        assert_eq!(r.stdin, None);
        let s: ProcessSelector = serde_json::from_str(r#"{"pid":"42"}"#).unwrap();
        assert_eq!(s.selector(), Ok(Selector::Pid(42)));
        assert!(serde_json::from_str::<ProcessSelector>(r#"{"pid":"-1"}"#).is_err());
        assert!(serde_json::from_str::<ProcessSelector>(r#"{"pid":4294967296}"#).is_err());
        let size: PtySize = serde_json::from_str(r#"{"cols":"80"}"#).unwrap();
        assert_eq!(size, PtySize { cols: 80, rows: 0 });
        // Unknown fields are ignored, as the SDK's own parser does.
        let _: ConnectRequest = serde_json::from_str(r#"{"process":{"pid":1},"future":true}"#).unwrap();
    }

    #[test]
    fn selectors_and_inputs_need_exactly_one_member() {
        assert!(selector(&None).is_err());
        assert!(ProcessSelector::default().selector().is_err());
        assert!(ProcessSelector { pid: Some(1), tag: Some("t".into()) }.selector().is_err());
        assert!(ProcessInput::default().input().is_err());
        let both = ProcessInput { stdin: Some(B64::default()), pty: Some(B64::default()) };
        assert!(both.input().is_err());
    }

    #[test]
    fn signals_by_name_or_number() {
        let sig = |v: serde_json::Value| serde_json::from_value::<SendSignalRequest>(json!({ "signal": v })).unwrap();
        assert_eq!(sig(json!("SIGNAL_SIGTERM")).signal, Signal::Sigterm);
        assert_eq!(sig(json!(15)).signal, Signal::Sigterm);
        assert_eq!(sig(json!(9)).signal, Signal::Sigkill);
        assert_eq!(sig(json!("SIGNAL_UNSPECIFIED")).signal, Signal::Unspecified);
        assert_eq!(sig(json!("SIGHUP")).signal, Signal::Unspecified);
        assert_eq!(sig(json!(2)).signal, Signal::Unspecified);
        assert_eq!(sig(json!(null)).signal, Signal::Unspecified);
        assert_eq!(Signal::Unspecified.number(), None);
    }

    #[test]
    fn bytes_take_every_base64_spelling() {
        let b = |s: &str| serde_json::from_value::<B64>(json!(s)).map(|b| b.0.to_vec());
        assert_eq!(b("aGkK").unwrap(), b"hi\n");
        assert_eq!(b("aGk=").unwrap(), b"hi");
        assert_eq!(b("aGk").unwrap(), b"hi");
        assert_eq!(b("-_8=").unwrap(), [0xfb, 0xff]);
        assert_eq!(b("+/8").unwrap(), [0xfb, 0xff]);
        assert_eq!(b("").unwrap(), b"");
        assert!(b("not base64!").is_err());
        assert!(serde_json::from_value::<B64>(json!(12)).is_err());
    }

    /// The exact frames of `docs/e2b.md` §6.2, which the SDK's parser was checked to read.
    #[test]
    fn events_encode_as_envd_sends_them() {
        let enc = |m: &EventMessage| serde_json::to_string(m).unwrap();
        assert_eq!(enc(&EventMessage::start(412)), r#"{"event":{"start":{"pid":412}}}"#);
        let data = EventMessage { event: ProcessEvent::Data(DataEvent::Stdout(B64(Bytes::from_static(b"hi\n")))) };
        assert_eq!(enc(&data), r#"{"event":{"data":{"stdout":"aGkK"}}}"#);
        let pty = EventMessage { event: ProcessEvent::Data(DataEvent::Pty(B64(Bytes::from_static(b"hi")))) };
        assert_eq!(enc(&pty), r#"{"event":{"data":{"pty":"aGk="}}}"#);
        let ok = EndEvent { exit_code: 0, exited: true, status: "exit status 0".into(), error: None };
        assert_eq!(
            enc(&EventMessage { event: ProcessEvent::End(ok) }),
            r#"{"event":{"end":{"exited":true,"status":"exit status 0"}}}"#
        );
        let killed = EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: Some("signal: killed".into()),
        };
        assert_eq!(
            enc(&EventMessage { event: ProcessEvent::End(killed) }),
            r#"{"event":{"end":{"exitCode":-1,"status":"signal: killed","error":"signal: killed"}}}"#
        );
        assert_eq!(enc(&EventMessage::keepalive()), r#"{"event":{"keepalive":{}}}"#);
    }

    #[test]
    fn lists_leave_out_what_is_unset() {
        assert_eq!(serde_json::to_string(&ListResponse::default()).unwrap(), "{}");
        let info = ProcessInfo {
            config: ProcessConfig { cmd: "/bin/bash".into(), args: vec!["-l".into()], ..Default::default() },
            pid: 5,
            tag: None,
        };
        assert_eq!(
            serde_json::to_value(ListResponse { processes: vec![info.clone()] }).unwrap(),
            json!({"processes":[{"config":{"cmd":"/bin/bash","args":["-l"]},"pid":5}]})
        );
        let full = ProcessInfo {
            config: ProcessConfig {
                envs: [("A".to_string(), "b".to_string())].into(),
                cwd: Some("/tmp".into()),
                ..info.config
            },
            tag: Some("t".into()),
            ..info
        };
        assert_eq!(
            serde_json::to_value(&full).unwrap(),
            json!({"config":{"cmd":"/bin/bash","args":["-l"],"envs":{"A":"b"},"cwd":"/tmp"},"pid":5,"tag":"t"})
        );
        assert_eq!(serde_json::to_string(&Empty {}).unwrap(), "{}");
    }
}
