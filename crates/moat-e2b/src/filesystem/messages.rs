//! The messages of `filesystem.Filesystem` in proto3 JSON. Requests accept both JSON names
//! (`watcherId`) and proto names (`watcher_id`), `null` for a default, and numbers as strings,
//! as a proto3 JSON parser does; unknown fields are ignored.

use serde::{Deserialize, Deserializer, Serialize};

use super::entry::EntryInfo;
use super::watch::FilesystemEvent;

/// `StatRequest`, `MakeDirRequest`, `RemoveRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct PathRequest {
    #[serde(deserialize_with = "nullable")]
    pub path: String,
}

/// `MoveRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct MoveRequest {
    #[serde(deserialize_with = "nullable")]
    pub source: String,
    #[serde(deserialize_with = "nullable")]
    pub destination: String,
}

/// `ListDirRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ListDirRequest {
    #[serde(deserialize_with = "nullable")]
    pub path: String,
    #[serde(deserialize_with = "uint32")]
    pub depth: u32,
}

/// `WatchDirRequest` and `CreateWatcherRequest`. `includeEntry` is not served (the advertised
/// envd version keeps the SDK from asking); `allowNetworkMounts` means nothing to moat.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WatchRequest {
    #[serde(deserialize_with = "nullable")]
    pub path: String,
    #[serde(deserialize_with = "nullable")]
    pub recursive: bool,
}

/// `GetWatcherEventsRequest`, `RemoveWatcherRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WatcherRequest {
    #[serde(rename = "watcherId", alias = "watcher_id", deserialize_with = "nullable")]
    pub watcher_id: String,
}

/// `StatResponse`, `MakeDirResponse`, `MoveResponse`.
#[derive(Debug, Serialize)]
pub(crate) struct EntryResponse {
    pub entry: EntryInfo,
}

/// `ListDirResponse`.
#[derive(Debug, Serialize)]
pub(crate) struct ListDirResponse {
    pub entries: Vec<EntryInfo>,
}

/// The empty responses (`RemoveResponse`, `RemoveWatcherResponse`).
#[derive(Debug, Serialize)]
pub(crate) struct Empty {}

/// `CreateWatcherResponse`.
#[derive(Debug, Serialize)]
pub(crate) struct CreateWatcherResponse {
    #[serde(rename = "watcherId")]
    pub watcher_id: String,
}

/// `GetWatcherEventsResponse`.
#[derive(Debug, Serialize)]
pub(crate) struct GetWatcherEventsResponse {
    pub events: Vec<FilesystemEvent>,
}

/// A field whose `null` means its default.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A `uint32`: a number, a string holding one, or `null`.
fn uint32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(0),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| D::Error::custom(format!("{n} is not a uint32"))),
        Some(serde_json::Value::String(s)) => {
            s.trim().parse().map_err(|_| D::Error::custom(format!("{s:?} is not a uint32")))
        }
        Some(other) => Err(D::Error::custom(format!("{other} is not a uint32"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_as_proto3_json_allows() {
        let r: ListDirRequest = serde_json::from_str(r#"{"path":"/a","depth":"2","extra":1}"#).unwrap();
        assert_eq!((r.path.as_str(), r.depth), ("/a", 2));
        let r: ListDirRequest = serde_json::from_str(r#"{"path":null,"depth":null}"#).unwrap();
        assert_eq!((r.path.as_str(), r.depth), ("", 0));
        assert!(serde_json::from_str::<ListDirRequest>(r#"{"depth":-1}"#).is_err());
        assert!(serde_json::from_str::<ListDirRequest>(r#"{"depth":4294967296}"#).is_err());
        let w: WatcherRequest = serde_json::from_str(r#"{"watcher_id":"w1"}"#).unwrap();
        assert_eq!(w.watcher_id, "w1");
        let w: WatcherRequest = serde_json::from_str(r#"{"watcherId":"w2"}"#).unwrap();
        assert_eq!(w.watcher_id, "w2");
        let w: WatchRequest = serde_json::from_str(r#"{"path":"~","recursive":true,"includeEntry":false}"#).unwrap();
        assert!(w.recursive);
        let e: PathRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(e.path, "");
    }

    #[test]
    fn responses_use_json_names() {
        let r = CreateWatcherResponse { watcher_id: "wab".into() };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"watcherId":"wab"}"#);
        assert_eq!(serde_json::to_string(&Empty {}).unwrap(), "{}");
    }
}
