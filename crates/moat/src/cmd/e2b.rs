//! `moat e2b env`, and the E2B listener `moat serve --e2b` opens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::{HostArgs, ServeArgs};
use crate::cmd::daemon::connect;
use crate::error::Hinted;

/// What the daemon tells `moat e2b env`: its pid (so a stale file from a daemon that died is
/// not believed) and the E2B API's URL.
#[derive(Debug, Serialize, Deserialize)]
struct Announced {
    pid: u32,
    url: String,
}

fn announcement(home: &Path) -> PathBuf {
    home.join("e2b.json")
}

/// The E2B listener of `moat serve --e2b`, bound before the daemon starts so that a taken
/// address fails the start.
pub struct Listener {
    listener: tokio::net::TcpListener,
    cfg: moat_e2b::Config,
    file: PathBuf,
    url: String,
}

impl Listener {
    pub fn bind(args: &ServeArgs, home: &Path) -> anyhow::Result<Option<Listener>> {
        let Some(addr) = args.e2b else { return Ok(None) };
        if !addr.ip().is_loopback() && !args.e2b_insecure {
            return Err(Hinted::new(
                format!("--e2b {addr} is not a loopback address and the E2B API is plain HTTP"),
                "bind it to 127.0.0.1 (and reach it through an SSH tunnel or a TLS proxy), or pass --e2b-insecure \
                 if everyone on the network path may read the API key",
            )
            .into());
        }
        let std = std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr} for the E2B API"))?;
        std.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std)?;
        let bound: SocketAddr = listener.local_addr()?;
        moat_sandbox::create_private_dir(home)?;
        let token = moat_daemon::token(home).context("creating the API token")?;
        let domain = args.e2b_domain.clone().unwrap_or_else(|| format!("localhost:{}", bound.port()));
        let cfg = moat_e2b::Config { token, domain, default_image: args.e2b_image.clone() };
        let url = format!("http://{bound}");
        Ok(Some(Listener { listener, cfg, file: announcement(home), url }))
    }

    /// Serve the E2B API through the daemon's door until the process ends, and tell `moat e2b
    /// env` where (the daemon holds the home's lock by now: the file is its own). Returns the
    /// file to remove when the daemon exits.
    pub fn serve(self, client: moat_client::Client) -> PathBuf {
        let announced = Announced { pid: std::process::id(), url: self.url };
        if let Err(e) =
            serde_json::to_vec(&announced).map_err(std::io::Error::from).and_then(|b| std::fs::write(&self.file, b))
        {
            eprintln!("moat: writing {}: {e}; `moat e2b env` will not find the E2B API", self.file.display());
        }
        let router = moat_e2b::router(client, self.cfg);
        tokio::spawn(moat_daemon::listen::serve_tcp(self.listener, None, router));
        self.file
    }
}

/// `moat e2b env`: the SDK's settings for this home's daemon, as `export` lines.
pub async fn env(host: &HostArgs) -> anyhow::Result<i32> {
    let home = crate::cmd::daemon::reach::require_local(host, "moat e2b env")?;
    let client = connect(host).await?;
    let health = client.health().await?;
    let not_served = || {
        Hinted::new(
            format!("the daemon (pid {}) does not serve the E2B API", health.pid),
            "start it with one: `moat serve --e2b 127.0.0.1:3000` (or e2b_listen = \"127.0.0.1:3000\" in the config \
             file, then restart the daemon)",
        )
    };
    let announced: Announced = match std::fs::read(announcement(&home)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|_| not_served())?,
        Err(_) => return Err(not_served().into()),
    };
    if announced.pid != health.pid {
        return Err(not_served().into());
    }
    let token = moat_daemon::token(&home).context("reading the API token")?;
    println!("export E2B_API_URL={}", announced.url);
    println!("export E2B_SANDBOX_URL={}", announced.url);
    println!("export E2B_API_KEY={}", moat_e2b::api_key(&token));
    Ok(0)
}
