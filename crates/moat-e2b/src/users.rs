//! The guest's users, as envd sees them: who a request runs as (`Authorization: Basic
//! base64("<user>:")` on RPCs, `username=` on `/files`), their home for relative and `~` paths,
//! and names for the owners of files.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures_util::StreamExt;
use moat_client::Client;

use crate::error::{Code, Failure};

/// E2B templates run everything as `user` (home `/home/user`) unless told otherwise; images
/// without that user run as root.
const DEFAULT_USER: &str = "user";
/// The most of `/etc/passwd` or `/etc/group` read.
const MAX_TABLE_BYTES: usize = 1 << 20;
/// The most sandboxes whose tables are kept; past it the cache starts over.
const MAX_CACHED: usize = 1024;

/// A user of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

impl GuestUser {
    /// A path as envd takes it: absolute, `~` or `~/…`, or relative to the user's home.
    pub(crate) fn resolve(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_string()
        } else if path == "~" {
            self.home.clone()
        } else if let Some(rest) = path.strip_prefix("~/") {
            format!("{}/{rest}", self.home.trim_end_matches('/'))
        } else {
            format!("{}/{path}", self.home.trim_end_matches('/'))
        }
    }
}

/// The guest's user and group tables, by name and by id.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    users: Vec<GuestUser>,
    groups: HashMap<u32, String>,
}

impl Tables {
    fn parse(passwd: &str, group: &str) -> Tables {
        let users = passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() < 7 {
                    return None;
                }
                Some(GuestUser {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: if f[5].is_empty() { "/".to_string() } else { f[5].to_string() },
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
            })
            .collect();
        Tables { users, groups }
    }

    fn user(&self, name: &str) -> Option<&GuestUser> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The name of a uid, or the number (as envd does).
    pub(crate) fn user_name(&self, uid: u32) -> String {
        self.users.iter().find(|u| u.uid == uid).map_or_else(|| uid.to_string(), |u| u.name.clone())
    }

    /// The name of a gid, or the number.
    pub(crate) fn group_name(&self, gid: u32) -> String {
        self.groups.get(&gid).cloned().unwrap_or_else(|| gid.to_string())
    }
}

/// The tables of each sandbox, read from the guest on first use.
#[derive(Default)]
pub(crate) struct Users {
    cache: Mutex<HashMap<String, Arc<Tables>>>,
}

impl Users {
    /// The guest's tables (cached; `fresh` reads them again, for a user added since).
    pub(crate) async fn tables(&self, client: &Client, sandbox: &str, fresh: bool) -> Result<Arc<Tables>, Failure> {
        if !fresh {
            if let Some(t) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(sandbox) {
                return Ok(t.clone());
            }
        }
        let (passwd, group) =
            tokio::join!(read_table(client, sandbox, "/etc/passwd"), read_table(client, sandbox, "/etc/group"));
        let (passwd, group) = (passwd?, group.unwrap_or_default());
        let tables = Arc::new(Tables::parse(&passwd, &group));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(sandbox.to_string(), tables.clone());
        Ok(tables)
    }

    /// Who a request runs as: the user it names, else `user` when the guest has one, else root.
    /// An unknown name is refused as envd refuses it (unauthenticated).
    pub(crate) async fn resolve(
        &self,
        client: &Client,
        sandbox: &str,
        name: Option<&str>,
    ) -> Result<GuestUser, Failure> {
        for fresh in [false, true] {
            let t = self.tables(client, sandbox, fresh).await?;
            let found = match name {
                Some(n) => t.user(n),
                None => t.user(DEFAULT_USER).or_else(|| t.user("root")),
            };
            if let Some(u) = found {
                return Ok(u.clone());
            }
        }
        Err(match name {
            Some(n) => Failure::new(Code::Unauthenticated, format!("the sandbox has no user {n:?}")),
            None => Failure::internal("the sandbox has neither a `user` nor a `root` in /etc/passwd"),
        })
    }
}

async fn read_table(client: &Client, sandbox: &str, path: &str) -> Result<String, Failure> {
    let mut body = Box::pin(client.read_file(sandbox, path).await?.into_stream());
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if bytes.len() + chunk.len() > MAX_TABLE_BYTES {
            return Err(Failure::internal(format!("the guest's {path} is over {MAX_TABLE_BYTES} bytes")));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The user named by an RPC's `Authorization: Basic base64("<user>:")`, if any.
pub(crate) fn from_authorization(headers: &axum::http::HeaderMap) -> Result<Option<String>, Failure> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else { return Ok(None) };
    let bad = || Failure::invalid("Authorization must be `Basic base64(<user>:)`");
    let encoded = value.to_str().ok().and_then(|v| v.strip_prefix("Basic ")).ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = decoded.split(':').next().unwrap_or_default();
    Ok((!user.is_empty()).then(|| user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\nbroken\n";

    #[test]
    fn tables_parse_and_name_ids() {
        let t = Tables::parse(PASSWD, "root:x:0:\nuser:x:1000:\n");
        assert_eq!(t.user("user").map(|u| (u.uid, u.home.as_str())), Some((1000, "/home/user")));
        assert_eq!(t.user_name(0), "root");
        assert_eq!(t.user_name(42), "42");
        assert_eq!(t.group_name(1000), "user");
        assert_eq!(t.group_name(7), "7");
    }

    #[test]
    fn paths_resolve_against_the_home() {
        let u = GuestUser { name: "user".into(), uid: 1000, gid: 1000, home: "/home/user".into() };
        assert_eq!(u.resolve("/etc/x"), "/etc/x");
        assert_eq!(u.resolve("~"), "/home/user");
        assert_eq!(u.resolve("~/a/b"), "/home/user/a/b");
        assert_eq!(u.resolve("a.txt"), "/home/user/a.txt");
    }

    #[test]
    fn basic_authorization_names_the_user() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(from_authorization(&h), Ok(None));
        h.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(from_authorization(&h), Ok(Some("user".into())));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert!(from_authorization(&h).is_err());
    }
}
