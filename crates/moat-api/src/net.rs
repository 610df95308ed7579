//! A sandbox's network: its mode, allowlist, secrets and port forwards.

use serde::{Deserialize, Serialize};

/// How a sandbox reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// No network device at all.
    None,
    /// Public addresses; loopback, private, link-local, multicast, metadata and the host's own
    /// addresses are refused.
    #[default]
    Default,
    /// Only the hostnames in `allow` (checked on DNS, TLS SNI and HTTP Host).
    Allow,
}

impl NetMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::Default => "default",
            NetMode::Allow => "allow",
        }
    }
}

/// A sandbox's network (`CreateSandbox.net`, `SandboxInfo.net`). The daemon checks every field
/// and says what is wrong.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    #[serde(default)]
    pub mode: NetMode,
    /// Hostnames reachable in mode `allow`: `pypi.org`, `*.pythonhosted.org`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::openapi::schemas::host_patterns)]
    pub allow: Vec<String>,
    /// Addresses reachable in any mode, even private ones: `10.1.0.0/16`, `127.0.0.1/32`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::openapi::schemas::cidrs)]
    pub allow_cidrs: Vec<String>,
    /// Names moat's DNS answers itself: `NAME:IP`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::openapi::schemas::host_entries)]
    pub hosts: Vec<String>,
    /// Upstream resolvers, `IP` or `IP:PORT` [default: the host's].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::openapi::schemas::resolvers)]
    pub dns: Vec<String>,
    /// Secrets the host puts into HTTPS requests to their hosts; the guest sees placeholders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 256)]
    pub secrets: Vec<SecretSpec>,
    /// Host ports forwarded to guest ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 256)]
    pub ports: Vec<PortForward>,
}

/// A secret bound to hosts (`--secret NAME@HOST`).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// The environment variable that holds the placeholder in the guest.
    #[schema(schema_with = crate::openapi::schemas::secret_name)]
    pub name: String,
    /// The real value: sent on create, never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::openapi::schemas::secret_value, required = true)]
    pub value: Option<String>,
    /// Hostnames (patterns as in `allow`) whose requests get the value.
    #[schema(schema_with = crate::openapi::schemas::secret_hosts)]
    pub hosts: Vec<String>,
    /// Also put the value into request bodies (`--secret NAME@HOST+body`). By default it goes
    /// only into header values and the query, since servers store and show bodies again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_body: bool,
}

impl SecretSpec {
    /// What the guest's environment holds instead of the value.
    pub fn placeholder(&self) -> String {
        format!("moat_placeholder_{}", self.name)
    }
}

impl std::fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSpec")
            .field("name", &self.name)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("hosts", &self.hosts)
            .field("in_body", &self.in_body)
            .finish()
    }
}

/// A host port forwarded to a guest port (`-p 8080:80`, `POST /v1/sandboxes/{ref}/ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// The host address to listen on [default: 127.0.0.1].
    #[serde(default = "default_host_addr")]
    #[schema(schema_with = crate::openapi::schemas::ip_address)]
    pub host_addr: String,
    /// The host port; 0 picks a free one (the answer says which).
    #[schema(minimum = 0, maximum = 65535)]
    pub host_port: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
}

fn default_host_addr() -> String {
    "127.0.0.1".into()
}

impl PortForward {
    /// `[ADDR:]HOSTPORT:GUESTPORT`, as `-p` and `moat port-forward` take it.
    pub fn parse(s: &str) -> Result<PortForward, String> {
        let bad =
            || format!("{s:?} is not a port forward: use [ADDR:]HOSTPORT:GUESTPORT, e.g. 8080:80 or 0.0.0.0:8080:80");
        let (rest, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        let (addr, host) = match rest.rsplit_once(':') {
            Some((a, h)) => (a.trim_start_matches('[').trim_end_matches(']').to_string(), h),
            None => (default_host_addr(), rest),
        };
        Ok(PortForward {
            host_addr: addr,
            host_port: host.parse().map_err(|_| bad())?,
            guest_port: guest.parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} -> {}", self.host_addr, self.host_port, self.guest_port)
    }
}

/// `POST /v1/sandboxes/{ref}/net/allow`: change the allowlist of a running sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeAllowlist {
    #[serde(default)]
    #[schema(schema_with = crate::openapi::schemas::host_patterns)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}
