//! What the operator allows an MCP session: whose sandboxes it sees, how many it may own, how
//! fast it may start commands, how much output it gets, and which host files it may copy.

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
    /// The flag that sets `setting` (one of `all-sandboxes`, `max-sandboxes`, `exec-rate`,
    /// `host-dir`), as a command the operator can run.
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
            flags: Flags::Stdio,
        }
    }
}

/// A refused host path.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    #[error(
        "copying host files is off for this MCP server\nhint: the operator allows it under one directory with {0}"
    )]
    Off(String),
    #[error("{path} is outside {root}, the only host directory this MCP server may copy from and to\nhint: use a path under {root}, or ask the operator to choose another directory with {flag}")]
    Outside { path: String, root: String, flag: String },
    #[error("cannot resolve the host path {path}: {source}\nhint: check that its directory exists")]
    Resolve { path: String, source: std::io::Error },
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
            let e = files.resolve(bad, Flags::Stdio).unwrap_err().to_string();
            assert!(e.contains("outside") && e.contains("--host-dir"), "{bad}: {e}");
        }
        let e = HostFiles::Off.resolve("a", Flags::Daemon).unwrap_err().to_string();
        assert!(e.contains("moat serve --mcp-host-dir") && e.contains("MOAT_MCP_HOST_DIR"), "{e}");
    }
}
