//! Which daemon a command talks to: this home's (started on demand), or one named by `--host`
//! (MOAT_HOST), which the CLI never starts and whose machine's files it never reads.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use moat_client::{Client, Endpoint};

use crate::cli::HostArgs;
use crate::cmd::runtime_config;
use crate::error::Hinted;

/// How long a command waits for the daemon to accept and answer its first request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest token file read: a token is 32 hex digits.
const MAX_TOKEN_FILE: u64 = 4096;

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// This home's daemon, started in the background when none answers.
    Home(PathBuf),
    /// A daemon named by `--host`: on this machine (`unix://`) or across the network.
    Host(Endpoint),
}

impl Reach {
    /// The daemon `host` names.
    pub fn of(host: &HostArgs) -> anyhow::Result<Reach> {
        match host.remote.as_deref().filter(|s| !s.is_empty()) {
            Some(url) => Ok(Reach::Host(url.parse::<Endpoint>().context("reading --host (MOAT_HOST)")?)),
            None => Ok(Reach::Home(runtime_config(host)?.home)),
        }
    }

    /// The home on this machine whose daemon this is: its lock, pid and log are there. A unix
    /// socket's home is the directory it is in.
    pub fn local_home(&self) -> Option<PathBuf> {
        match self {
            Reach::Home(home) => Some(home.clone()),
            Reach::Host(Endpoint::Unix(sock)) => sock.parent().map(Path::to_path_buf),
            Reach::Host(_) => None,
        }
    }

    /// Whether the daemon runs on another machine.
    pub fn is_remote(&self) -> bool {
        self.local_home().is_none()
    }
}

/// `--timeout`, else MOAT_TIMEOUT, else 30 seconds.
pub fn deadline(host: &HostArgs) -> anyhow::Result<Duration> {
    if let Some(limit) = host.timeout {
        return Ok(limit);
    }
    match std::env::var("MOAT_TIMEOUT") {
        Ok(v) if !v.is_empty() => crate::cli::parse_duration(&v)
            .map_err(|e| Hinted::new(format!("MOAT_TIMEOUT={v:?}: {e}"), "write e.g. 30s, 2m or 500ms").into()),
        _ => Ok(DEFAULT_TIMEOUT),
    }
}

/// The token of a remote daemon: `--token-file`, else MOAT_TOKEN, else MOAT_TOKEN_FILE.
fn token(host: &HostArgs) -> anyhow::Result<Option<String>> {
    let file = match &host.token_file {
        Some(file) => Some(file.clone()),
        None => match std::env::var("MOAT_TOKEN") {
            Ok(t) if !t.trim().is_empty() => return Ok(Some(t.trim().to_string())),
            _ => std::env::var_os("MOAT_TOKEN_FILE").filter(|f| !f.is_empty()).map(PathBuf::from),
        },
    };
    let Some(file) = file else { return Ok(None) };
    let unreadable = || {
        Hinted::new(
            format!("cannot read the token file {}", file.display()),
            "give the file that holds the daemon's token (its $MOAT_HOME/token)",
        )
    };
    let mut text = String::new();
    std::fs::File::open(&file)
        .and_then(|f| f.take(MAX_TOKEN_FILE).read_to_string(&mut text))
        .map_err(|e| anyhow::Error::new(e).context(unreadable()))?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(Hinted::new(
            format!("the token file {} holds no token", file.display()),
            "copy the daemon's $MOAT_HOME/token into it",
        )
        .into());
    }
    Ok(Some(token.to_string()))
}

/// A client of a daemon named by `--host`; remote ones need a token.
pub fn host_client(host: &HostArgs, endpoint: &Endpoint) -> anyhow::Result<Client> {
    let token = match endpoint {
        Endpoint::Unix(_) => None,
        _ => Some(token(host)?.ok_or_else(|| {
            Hinted::new(
                format!("the daemon at {endpoint} needs its token, and none was given"),
                "set MOAT_TOKEN to the content of $MOAT_HOME/token on the daemon's host, or give that file with \
                 --token-file FILE (MOAT_TOKEN_FILE)",
            )
        })?),
    };
    if matches!(endpoint, Endpoint::Tcp(_)) && host.tls_ca.is_some() {
        return Err(Hinted::new(
            format!("--tls-ca is for https:// daemons, and {endpoint} is plain HTTP"),
            "write the address as https://HOST:PORT if the daemon serves TLS",
        )
        .into());
    }
    Ok(Client::remote(endpoint, token, host.tls_ca.as_deref())?)
}

/// Refuse what needs the daemon's machine to be this one: host directories for a remote daemon
/// would be looked up on its machine, not here.
pub fn check_host_mounts(host: &HostArgs, mounts: &[moat_api::Mount]) -> anyhow::Result<()> {
    let Some(dir) = mounts.iter().find(|m| m.kind == moat_api::MountType::Host) else { return Ok(()) };
    if let reach @ Reach::Host(endpoint) = &Reach::of(host)? {
        if reach.is_remote() {
            return Err(Hinted::new(
                format!(
                    "-v {}:{}: host directories cannot be mounted from a daemon on another machine ({endpoint})",
                    dir.source, dir.target
                ),
                "copy files in and out with `moat cp`, or use a volume (`moat volume create NAME`, `-v NAME:/path`)",
            )
            .into());
        }
    }
    Ok(())
}

/// Refuse a command that reads or changes the daemon's machine when that is another one.
pub fn require_local(host: &HostArgs, what: &str) -> anyhow::Result<PathBuf> {
    let reach = Reach::of(host)?;
    if let Some(home) = reach.local_home() {
        return Ok(home);
    }
    Err(Hinted::new(
        format!(
            "`{what}` works on this machine's daemon only, and --host (MOAT_HOST) names {}",
            host.remote.as_deref().unwrap_or_default()
        ),
        format!("run `{what}` on the daemon's host, or unset MOAT_HOST"),
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn host(args: &[&str]) -> HostArgs {
        let mut argv = vec!["moat"];
        argv.extend_from_slice(args);
        argv.push("ps");
        crate::cli::Cli::try_parse_from(argv).unwrap().host
    }

    #[test]
    fn a_host_url_names_a_daemon_elsewhere() {
        let h = host(&["--host", "tcp://127.0.0.1:7070"]);
        assert_eq!(Reach::of(&h).unwrap(), Reach::Host(Endpoint::Tcp("127.0.0.1:7070".into())));
        assert!(Reach::of(&h).unwrap().is_remote());
        let h = host(&["--host", "unix:///var/lib/moat/moat.sock"]);
        let reach = Reach::of(&h).unwrap();
        assert_eq!(reach.local_home(), Some(PathBuf::from("/var/lib/moat")));
        let h = host(&["--host", "127.0.0.1:7070"]);
        let e = crate::error::render(&Reach::of(&h).unwrap_err());
        assert!(e.contains("no scheme") && e.contains("hint: write tcp://"), "{e}");
    }

    #[test]
    fn the_deadline_flag_is_global_but_leaves_exec_its_own_timeout() {
        let cli = crate::cli::Cli::try_parse_from(["moat", "ps", "--timeout", "2s"]).unwrap();
        assert_eq!(cli.host.timeout, Some(Duration::from_secs(2)));
        let cli = crate::cli::Cli::try_parse_from(["moat", "exec", "box", "--", "ls"]).unwrap();
        let crate::cli::Command::Exec(exec) = cli.command else { panic!("expected exec") };
        assert_eq!(exec.process.timeout, None, "the deadline's absence must not become the command's limit");
        assert_eq!(cli.host.timeout, None);
    }

    #[test]
    fn a_remote_daemon_without_a_token_is_refused_before_connecting() {
        let h = host(&["--host", "tcp://127.0.0.1:1", "--token-file", "/nonexistent/token"]);
        let Reach::Host(endpoint) = Reach::of(&h).unwrap() else { panic!("expected a host") };
        let e = crate::error::render(&host_client(&h, &endpoint).unwrap_err());
        assert!(e.contains("cannot read the token file"), "{e}");
    }
}
