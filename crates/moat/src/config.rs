//! The configuration file, `$MOAT_HOME/config.toml`, else `/etc/moat/config.toml`.
//!
//! Every setting is a `MOAT_*` variable ([`SETTINGS`]); in the file its key is the variable's name
//! without `MOAT_`, lowercase (`MOAT_MAX_SANDBOXES` is `max_sandboxes`). The file is read once,
//! before the command line: each setting the environment does not already hold is put into the
//! environment, where clap's `env = …` (and the runtime's `MOAT_QEMU`, `MOAT_AGENT`) take it. So
//! a flag wins over the environment, the environment over the file, the file over the default,
//! and a daemon the CLI starts inherits it all.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One setting: its environment variable and what it sets.
pub struct Setting {
    pub env: &'static str,
    pub about: &'static str,
}

/// Every setting moat reads, in the order `moat config show` prints them. `MOAT_HOME` is not
/// among them: it says where the file is.
pub const SETTINGS: &[Setting] = &[
    Setting { env: "MOAT_LOG", about: "log verbosity" },
    Setting { env: "MOAT_KERNEL", about: "the guest kernel" },
    Setting { env: "MOAT_ACCEL", about: "accelerator: auto, kvm or tcg" },
    Setting { env: "MOAT_QEMU", about: "the QEMU binary" },
    Setting { env: "MOAT_AGENT", about: "the static guest agent" },
    Setting { env: "MOAT_IMAGE", about: "the image of new sandboxes" },
    Setting { env: "MOAT_MAX_SANDBOXES", about: "sandboxes live at once" },
    Setting { env: "MOAT_MEMORY_OVERCOMMIT", about: "memory of live sandboxes, times the host's RAM" },
    Setting { env: "MOAT_DISK_OVERCOMMIT", about: "what sandbox disks may grow by, times the free disk" },
    Setting { env: "MOAT_REQUIRE_KVM", about: "refuse to run sandboxes without KVM" },
    Setting { env: "MOAT_NO_TEMPLATES", about: "boot every sandbox instead of restoring a template" },
    Setting { env: "MOAT_TEMPLATE_STORE", about: "registry repository templates are shared through" },
    Setting { env: "MOAT_HOST_ADDRESSES", about: "addresses of this host no interface has" },
    Setting { env: "MOAT_IDLE_EXIT", about: "an auto-started daemon exits after this long idle" },
    Setting { env: "MOAT_EVENTS_MAX_AGE", about: "events older than this are deleted" },
    Setting { env: "MOAT_EVENTS_MAX", about: "events kept in all" },
    Setting { env: "MOAT_BACKUP_EVERY", about: "how often the daemon backs up its state (0: never)" },
    Setting { env: "MOAT_BACKUP_KEEP", about: "how many of those backups are kept" },
    Setting { env: "MOAT_PRUNE_AFTER", about: "ended sandboxes are removed this long after they ended" },
    Setting { env: "MOAT_HOST", about: "the daemon to use: tcp://, https:// or unix:// address" },
    Setting { env: "MOAT_TOKEN_FILE", about: "file holding a remote daemon's token (MOAT_TOKEN: the token)" },
    Setting { env: "MOAT_TLS_CA", about: "PEM certificate an https:// daemon is checked against" },
    Setting { env: "MOAT_TIMEOUT", about: "how long to wait for the daemon's first answer" },
    Setting { env: "MOAT_LOG_MAX_SIZE", about: "size of the daemon's log file before it is moved aside" },
    Setting { env: "MOAT_MCP_ALL_SANDBOXES", about: "MCP sessions see every sandbox" },
    Setting { env: "MOAT_MCP_MAX_SANDBOXES", about: "sandboxes one MCP session may own" },
    Setting { env: "MOAT_MCP_EXEC_RATE", about: "commands one MCP session may start per minute" },
    Setting { env: "MOAT_MCP_HOST_DIR", about: "host directory of the MCP upload and download tools" },
    Setting { env: "MOAT_MCP_IMAGE", about: "image of sandboxes MCP sessions create" },
    Setting { env: "MOAT_MCP_ALLOW_PUBLIC_PORTS", about: "MCP port forwards may listen on any address" },
    Setting { env: "MOAT_MCP_MAX_CPUS", about: "most vCPUs of an MCP session's sandbox" },
    Setting { env: "MOAT_MCP_MAX_MEMORY", about: "most memory (MiB) of an MCP session's sandbox" },
    Setting { env: "MOAT_MCP_MAX_DISK", about: "largest disk (MiB) of an MCP session's sandbox" },
    Setting { env: "MOAT_E2B_LISTEN", about: "address of the E2B-compatible API" },
    Setting { env: "MOAT_E2B_DOMAIN", about: "domain the E2B API gives the SDKs for get_host" },
    Setting { env: "MOAT_E2B_IMAGE", about: "image behind the E2B template `base`" },
];

/// A setting's key in the file.
pub fn key(env: &str) -> String {
    env.trim_start_matches("MOAT_").to_ascii_lowercase()
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Environment,
    File,
    Default,
}

/// What [`load`] found: the file it read, and each setting's source.
#[derive(Debug, Default)]
pub struct Loaded {
    pub file: Option<PathBuf>,
    pub from_file: Vec<&'static str>,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// What [`load`] found in this process.
pub fn loaded() -> &'static Loaded {
    LOADED.get_or_init(Loaded::default)
}

/// Where a setting's current value came from.
pub fn source(env: &str) -> Source {
    if loaded().from_file.contains(&env) {
        Source::File
    } else if std::env::var_os(env).is_some_and(|v| !v.is_empty()) {
        Source::Environment
    } else {
        Source::Default
    }
}

/// A configuration file moat cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {key:?} is not a setting")]
    Unknown { path: String, key: String, known: String },
    #[error("{path}: {key} must be a string, a number, a boolean or a list of those")]
    Type { path: String, key: String },
}

impl moat_hint::Hint for ConfigError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        Some(match self {
            ConfigError::Read { .. } => "fix its permissions, or remove it".into(),
            ConfigError::Syntax { .. } => "write one `key = value` per line; see docs/configuration.md".into(),
            ConfigError::Unknown { known, .. } => format!("the settings are {known}; see docs/configuration.md").into(),
            ConfigError::Type { key, .. } => format!("e.g. {key} = \"value\"").into(),
        })
    }
}

/// Read the configuration file and put its settings into the environment where it has none.
/// Call it first in `main`, before any thread starts: it sets environment variables.
pub fn load(args: &[String]) -> Result<(), ConfigError> {
    let home = home_from_args(args)
        .or_else(|| std::env::var_os("MOAT_HOME").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(moat_sandbox::RuntimeConfig::default_home);
    let mut loaded = Loaded::default();
    let candidates = [home.join("config.toml"), PathBuf::from("/etc/moat/config.toml")];
    if let Some(path) = candidates.into_iter().find(|p| p.is_file()) {
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        for (env, value) in parse(&path, &text)? {
            if std::env::var_os(env).is_none_or(|v| v.is_empty()) {
                std::env::set_var(env, value);
                loaded.from_file.push(env);
            }
        }
        loaded.file = Some(path);
    }
    let _ = LOADED.set(loaded);
    Ok(())
}

/// The settings in a file's text, as environment values: lists joined with commas.
pub fn parse(path: &Path, text: &str) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let display = path.display().to_string();
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax { path: display.clone(), message: e.to_string() })?;
    let mut out = Vec::new();
    // A table groups settings: `[e2b] listen = …` (or `e2b.listen = …`) is `e2b_listen`.
    let entries = table.into_iter().flat_map(|(k, v)| match v {
        toml::Value::Table(t) => t.into_iter().map(|(sub, v)| (format!("{k}_{sub}"), v)).collect::<Vec<_>>(),
        v => vec![(k, v)],
    });
    for (k, v) in entries {
        let Some(setting) = SETTINGS.iter().find(|s| key(s.env) == k) else {
            let known = SETTINGS.iter().map(|s| key(s.env)).collect::<Vec<_>>().join(", ");
            return Err(ConfigError::Unknown { path: display, key: k, known });
        };
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        };
        let value = match &v {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>().map(|v| v.join(",")),
            v => scalar(v),
        };
        let value = value.ok_or_else(|| ConfigError::Type { path: display.clone(), key: k.clone() })?;
        out.push((setting.env, value));
    }
    Ok(out)
}

/// `--home DIR` or `--home=DIR` on the command line, which clap has not parsed yet.
fn home_from_args(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--home" {
            return it.next().map(PathBuf::from);
        }
        if let Some(dir) = a.strip_prefix("--home=") {
            return Some(PathBuf::from(dir));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_environment_values() {
        let text = "accel = \"tcg\"\nmax_sandboxes = 4\nno_templates = true\nhost_addresses = [\"203.0.113.5\", \"203.0.113.6\"]\n";
        let parsed = parse(Path::new("c.toml"), text).unwrap();
        assert_eq!(
            parsed,
            [
                ("MOAT_ACCEL", "tcg".to_string()),
                ("MOAT_HOST_ADDRESSES", "203.0.113.5,203.0.113.6".to_string()),
                ("MOAT_MAX_SANDBOXES", "4".to_string()),
                ("MOAT_NO_TEMPLATES", "true".to_string()),
            ]
        );
    }

    #[test]
    fn a_table_groups_settings() {
        let parsed = parse(Path::new("c.toml"), "[e2b]\nlisten = \"127.0.0.1:3000\"\n").unwrap();
        assert_eq!(parsed, [("MOAT_E2B_LISTEN", "127.0.0.1:3000".to_string())]);
        let dotted = parse(Path::new("c.toml"), "e2b.image = \"base\"\n").unwrap();
        assert_eq!(dotted, [("MOAT_E2B_IMAGE", "base".to_string())]);
    }

    #[test]
    fn unknown_keys_and_tables_are_refused_with_the_remedy() {
        let unknown = parse(Path::new("c.toml"), "acel = \"tcg\"").unwrap_err();
        let unknown = moat_hint::Report::new(&unknown).to_string();
        assert!(unknown.contains("\"acel\" is not a setting") && unknown.contains("accel"), "{unknown}");
        let table = parse(Path::new("c.toml"), "[accel]\nx = 1").unwrap_err().to_string();
        assert!(table.contains("\"accel_x\" is not a setting"), "{table}");
        let nested = parse(Path::new("c.toml"), "[e2b.listen]\nx = 1").unwrap_err().to_string();
        assert!(nested.contains("e2b_listen must be"), "{nested}");
        assert!(parse(Path::new("c.toml"), "accel = ").unwrap_err().to_string().contains("not valid TOML"));
        assert!(parse(Path::new("c.toml"), "home = \"/x\"").is_err(), "the file cannot move the home it is in");
    }

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let s = || "x".to_string();
        let cases = [
            ConfigError::Read { path: s(), source: std::io::Error::other("the io cause") },
            ConfigError::Syntax { path: s(), message: s() },
            ConfigError::Unknown { path: s(), key: s(), known: s() },
            ConfigError::Type { path: s(), key: s() },
        ];
        for e in &cases {
            moat_hint::check(e, true).unwrap();
        }
    }

    #[test]
    fn home_is_found_before_clap_parses() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(home_from_args(&args(&["moat", "--home", "/h", "ps"])), Some("/h".into()));
        assert_eq!(home_from_args(&args(&["moat", "ps", "--home=/h"])), Some("/h".into()));
        assert_eq!(home_from_args(&args(&["moat", "run", "--", "x", "--home", "/h"])), None);
    }
}
