//! What the operator allows an MCP session: whose sandboxes it sees, how many it may own and how
//! large, how fast it may start commands, how much output it gets, which host files it may copy,
//! and whether its port forwards may listen beyond loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Operator settings of an MCP server, the same for every session it serves.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Sessions see and use every sandbox of the daemon, not only the ones they created.
    pub all_sandboxes: bool,
    /// Most sandboxes one session may own at once.
    pub max_sandboxes: usize,
    /// Most commands (exec and background starts) one session may start per minute.
    pub exec_per_minute: u32,
    /// Default limit of each output stream a tool returns (exec, background output); a call may
    /// ask for less or up to [`Policy::max_output_cap`].
    pub max_output: usize,
    /// The image `sandbox_create` uses when the call names none.
    pub default_image: String,
    /// Idle lease of sandboxes a session creates: removed after this long without a tool call
    /// that uses them, unless the call sets its own.
    pub idle_ttl: Duration,
    /// Which host paths upload and download may touch.
    pub host_files: HostFiles,
    /// Port forwards may listen on any host address; otherwise only on loopback, so a model
    /// cannot open a sandbox to the network (an inbound path no egress allowlist covers).
    pub allow_public_ports: bool,
    /// Most virtual CPUs of one sandbox.
    pub max_cpus: u32,
    /// Most memory of one sandbox, in MiB.
    pub max_memory_mib: u32,
    /// Largest root disk of one sandbox, in MiB.
    pub max_disk_mib: u64,
    /// How the operator changes these settings, for error hints: `moat mcp` or `moat serve`.
    pub flags: Flags,
}

/// Which host files the upload and download tools may read and write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostFiles {
    /// No host file access (the tools answer with an error naming the flag that allows it).
    Off,
    /// Only paths under this directory (relative paths are taken from it); symlinks that lead
    /// out of it are refused.
    Under(PathBuf),
}

/// The command-line spelling of the settings, per transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flags {
    /// `moat mcp --all-sandboxes`, …
    Stdio,
    /// `moat serve --mcp-all-sandboxes`, …
    Daemon,
}

impl Flags {
    /// The flag that sets `setting` (`all-sandboxes`, `max-sandboxes`, `exec-rate`, `host-dir`,
    /// `allow-public-ports`, `max-cpus`, `max-memory`, `max-disk`), as a command the operator can
    /// run.
    pub fn flag(self, setting: &str) -> String {
        match self {
            Flags::Stdio => format!("`moat mcp --{setting}`"),
            Flags::Daemon => {
                let env = format!("MOAT_MCP_{}", setting.replace('-', "_").to_ascii_uppercase());
                format!("`moat serve --mcp-{setting}` (or {env})")
            }
        }
    }
}

/// The largest output limit a call may ask for.
pub const MAX_OUTPUT_CAP: usize = 1 << 20;

impl Policy {
    /// The largest output limit a call may ask for.
    pub fn max_output_cap(&self) -> usize {
        MAX_OUTPUT_CAP.max(self.max_output)
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            all_sandboxes: false,
            max_sandboxes: 8,
            exec_per_minute: 120,
            max_output: 32 << 10,
            default_image: moat_api::DEFAULT_IMAGE.to_string(),
            idle_ttl: Duration::from_secs(3600),
            host_files: HostFiles::Off,
            allow_public_ports: false,
            max_cpus: DEFAULT_MAX_CPUS,
            max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
            max_disk_mib: DEFAULT_MAX_DISK_MIB,
            flags: Flags::Stdio,
        }
    }
}

/// Default per-sandbox caps of an MCP session: room for real work, not for the whole host.
pub const DEFAULT_MAX_CPUS: u32 = 4;
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 4096;
pub const DEFAULT_MAX_DISK_MIB: u64 = 20480;

/// A sandbox request the operator's MCP policy does not allow.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{what} {asked} is over this MCP server's limit of {limit} per sandbox")]
    OverLimit { what: &'static str, asked: u64, limit: u64, flag: String },
    #[error("the port forward {forward} would listen on {addr}, but this MCP server forwards ports on loopback only (127.0.0.1 or ::1)")]
    PublicPort { forward: String, addr: String, flag: String },
}

impl moat_hint::Hint for PolicyError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        Some(match self {
            PolicyError::OverLimit { limit, flag, .. } => {
                format!("ask for at most {limit}, or ask the operator to raise the limit with {flag}").into()
            }
            PolicyError::PublicPort { flag, .. } => format!(
                "leave the address out (it defaults to 127.0.0.1), or ask the operator to allow other addresses \
                 with {flag}"
            )
            .into(),
        })
    }
}

impl Policy {
    /// Refuse sizes over the per-sandbox caps (`None` is the daemon's default size).
    pub fn check_size(
        &self,
        cpus: Option<u32>,
        memory_mib: Option<u32>,
        disk_mib: Option<u64>,
    ) -> Result<(), PolicyError> {
        let over = |what, asked: u64, limit: u64, setting: &str| {
            (asked > limit).then(|| PolicyError::OverLimit { what, asked, limit, flag: self.flags.flag(setting) })
        };
        let cpus = cpus.unwrap_or(moat_api::DEFAULT_VCPUS);
        let memory = memory_mib.unwrap_or(moat_api::DEFAULT_MEMORY_MIB);
        let disk = disk_mib.unwrap_or(moat_api::DEFAULT_DISK_MIB);
        let refused = over("cpus", cpus.into(), self.max_cpus.into(), "max-cpus")
            .or_else(|| over("memory_mib", memory.into(), self.max_memory_mib.into(), "max-memory"))
            .or_else(|| over("disk_mib", disk, self.max_disk_mib, "max-disk"));
        refused.map_or(Ok(()), Err)
    }

    /// Refuse a port forward on a non-loopback host address unless the operator allows it.
    pub fn check_forward(&self, forward: &moat_api::PortForward) -> Result<(), PolicyError> {
        let loopback = forward.host_addr.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
        if loopback || self.allow_public_ports {
            return Ok(());
        }
        Err(PolicyError::PublicPort {
            forward: format!("{}:{}:{}", forward.host_addr, forward.host_port, forward.guest_port),
            addr: forward.host_addr.clone(),
            flag: self.flags.flag("allow-public-ports"),
        })
    }
}

/// A refused host path.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    #[error("copying host files is off for this MCP server")]
    Off(String),
    #[error("{path} is outside {root}, the only host directory this MCP server may copy from and to")]
    Outside { path: String, root: String, flag: String },
    #[error("cannot resolve the host path {path}")]
    Resolve { path: String, source: std::io::Error },
}

impl moat_hint::Hint for HostPathError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        Some(match self {
            HostPathError::Off(flag) => format!("the operator allows it under one directory with {flag}").into(),
            HostPathError::Outside { root, flag, .. } => {
                format!("use a path under {root}, or ask the operator to choose another directory with {flag}").into()
            }
            HostPathError::Resolve { .. } => "check that its directory exists".into(),
        })
    }
}

impl HostFiles {
    /// The host path a tool may use for `given`: relative paths are under the allowed directory;
    /// the path's directory must resolve (symlinks followed) inside it. The last component is
    /// not followed: copies never follow a symlink they copy, and downloads replace it. A
    /// trailing `/` or `/.` is kept (they mean something to a copy).
    pub fn resolve(&self, given: &str, flags: Flags) -> Result<String, HostPathError> {
        let HostFiles::Under(root) = self else { return Err(HostPathError::Off(flags.flag("host-dir"))) };
        let root = root
            .canonicalize()
            .map_err(|source| HostPathError::Resolve { path: root.display().to_string(), source })?;
        let outside = || HostPathError::Outside {
            path: given.to_string(),
            root: root.display().to_string(),
            flag: flags.flag("host-dir"),
        };
        let resolve = |p: &Path| {
            let p = p.canonicalize().map_err(|source| HostPathError::Resolve { path: given.to_string(), source })?;
            if p.starts_with(&root) {
                Ok(p)
            } else {
                Err(outside())
            }
        };
        let joined = root.join(given);
        let trimmed = given.trim_end_matches('/');
        let contents = trimmed.ends_with("/.") || trimmed == ".";
        let path = match Path::new(trimmed).file_name() {
            Some(name) if !contents => {
                let dir = resolve(joined.parent().unwrap_or(&root))?;
                dir.join(name).display().to_string()
            }
            // `DIR/.`, `..`, `/`: the whole path is a directory that must resolve inside.
            _ => resolve(&joined)?.display().to_string(),
        };
        Ok(match () {
            _ if contents => format!("{path}/."),
            _ if given.ends_with('/') => format!("{path}/"),
            _ => path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error as the model reads it: message, then hint.
    fn shown<E: std::error::Error + moat_hint::Hint + 'static>(e: E) -> String {
        moat_hint::Report::new(&e).to_string()
    }

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let s = || "x".to_string();
        let policy = [
            PolicyError::OverLimit { what: "cpus", asked: 9, limit: 8, flag: s() },
            PolicyError::PublicPort { forward: s(), addr: s(), flag: s() },
        ];
        for e in &policy {
            moat_hint::check(e, true).unwrap();
        }
        let paths = [
            HostPathError::Off(s()),
            HostPathError::Outside { path: s(), root: s(), flag: s() },
            HostPathError::Resolve { path: s(), source: std::io::Error::other("the io cause") },
        ];
        for e in &paths {
            moat_hint::check(e, true).unwrap();
        }
    }

    #[test]
    fn host_paths_stay_under_the_allowed_directory() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().canonicalize().unwrap();
        std::fs::create_dir(r.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("link")).unwrap();
        let files = HostFiles::Under(r.clone());
        let ok = |p: &str| files.resolve(p, Flags::Stdio).unwrap();
        let at = |p: &str| format!("{}/{p}", r.display());
        assert_eq!(ok("a.txt"), at("a.txt"));
        assert_eq!(ok("sub/a.txt"), at("sub/a.txt"));
        assert_eq!(ok(&at("sub/b")), at("sub/b"));
        assert_eq!(ok("sub/."), at("sub/."));
        assert_eq!(ok("sub/"), at("sub/"));
        assert_eq!(ok("sub/../sub/x"), at("sub/x"));
        assert_eq!(ok("sub/.."), r.display().to_string());
        // A symlink as the last component is not followed: it is copied, or replaced.
        assert_eq!(ok("link"), at("link"));
        for bad in ["../x", "/etc/passwd", "escape/passwd", "escape/.", "sub/../..", ".."] {
            let e = shown(files.resolve(bad, Flags::Stdio).unwrap_err());
            assert!(e.contains("outside") && e.contains("--host-dir"), "{bad}: {e}");
        }
        let e = shown(HostFiles::Off.resolve("a", Flags::Daemon).unwrap_err());
        assert!(e.contains("moat serve --mcp-host-dir") && e.contains("MOAT_MCP_HOST_DIR"), "{e}");
    }

    #[test]
    fn sizes_and_port_addresses_are_held_to_the_policy() {
        let p = Policy::default();
        p.check_size(None, None, None).unwrap();
        p.check_size(Some(4), Some(4096), Some(20480)).unwrap();
        let e = shown(p.check_size(None, Some(262_144), None).unwrap_err());
        assert!(e.contains("memory_mib 262144 is over") && e.contains("`moat mcp --max-memory`"), "{e}");
        let e = shown(p.check_size(Some(64), None, None).unwrap_err());
        assert!(e.contains("cpus 64") && e.contains("--max-cpus"), "{e}");
        let daemon = Policy { flags: Flags::Daemon, ..Policy::default() };
        let e = shown(daemon.check_size(None, None, Some(16 << 20)).unwrap_err());
        assert!(e.contains("moat serve --mcp-max-disk") && e.contains("MOAT_MCP_MAX_DISK"), "{e}");

        let forward = |s| moat_api::PortForward::parse(s).unwrap();
        for ok in ["8080:80", "127.0.0.1:0:80", "127.9.9.9:0:80", "[::1]:0:80"] {
            p.check_forward(&forward(ok)).unwrap();
        }
        for public in ["0.0.0.0:0:80", "[::]:0:80", "192.168.1.5:8080:80", "localhost:0:80"] {
            let e = shown(p.check_forward(&forward(public)).unwrap_err());
            assert!(e.contains("loopback only") && e.contains("--allow-public-ports"), "{public}: {e}");
            Policy { allow_public_ports: true, ..Policy::default() }.check_forward(&forward(public)).unwrap();
        }
    }
}
