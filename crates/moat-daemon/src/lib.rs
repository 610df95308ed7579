//! The moat daemon (`moat serve`): owns the sandboxes of one `$MOAT_HOME`, keeps their state in
//! SQLite ([`state`]) under an explicit state machine ([`phase`]), runs every lifecycle operation
//! ([`service`]) and serves the REST API ([`http`]) on a unix socket, optionally on TCP too.
//!
//! Sandboxes outlive the daemon: QEMU runs in its own session and is never tied to the daemon's
//! life, so a restarted (even SIGKILLed) daemon adopts them.

pub mod adoption;
mod descriptors;
mod door;
mod error;
mod guest_stream;
pub mod http;
pub mod launcher;
pub mod listen;
pub mod metrics;
pub mod net;
pub mod phase;
mod secrets_store;
pub mod service;
pub mod state;

use std::future::IntoFuture;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moat_sandbox::{Runtime, RuntimeConfig};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

pub use door::Door;
pub use error::ServiceError;
pub use service::{Limits, Service};
pub use state::{Db, StateError};

/// How long the API waits at start for sandboxes left live by an earlier daemon to be taken over.
const ADOPTION_GRACE: Duration = Duration::from_secs(3);

/// Where the daemon of a home listens.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join("moat.sock")
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub runtime: RuntimeConfig,
    pub limits: Limits,
    /// Also listen on TCP (bearer token from `$MOAT_HOME/token`).
    pub tcp: Option<listen::TcpConfig>,
    /// The group whose members may use the unix socket (`--group`); the owner alone without one.
    pub group: Option<String>,
    /// Exit after this long with no sandboxes and no requests (daemons the CLI starts itself).
    pub idle_exit: Option<Duration>,
    /// Move a damaged or missing state database aside and start with an empty one.
    pub reset_state: bool,
    /// How long events, state backups and ended sandboxes are kept.
    pub retention: service::backups::Retention,
}

/// Errors that keep the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Runtime(#[from] moat_sandbox::SandboxError),
    #[error("another moat daemon already serves {home}")]
    AlreadyRunning { home: String },
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    #[error(transparent)]
    Home(#[from] moat_sandbox::HomeAccessError),
}

impl moat_hint::Hint for ServeError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            ServeError::State(e) => e.hint(),
            ServeError::Runtime(e) => e.hint(),
            ServeError::AlreadyRunning { .. } => Some("use it (the CLI finds it on its own), or stop it first".into()),
            ServeError::Io { .. } => None,
            ServeError::Service(e) => e.hint(),
            ServeError::Listen(e) => e.hint(),
            ServeError::Home(e) => e.hint(),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// Hold the home's daemon lock for the life of the process: one daemon per home.
fn lock_home(home: &Path) -> Result<OwnedFd, ServeError> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let path = home.join("daemon.lock");
    let fd = rustix::fs::open(&path, OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
        .map_err(|e| ServeError::Io { what: format!("opening {}", path.display()), source: e.into() })?;
    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| ServeError::AlreadyRunning { home: home.display().to_string() })?;
    // The pid, for `moat` to tell a daemon that is still starting from one that died.
    let pid = std::process::id().to_string();
    let _ = rustix::fs::ftruncate(&fd, 0);
    let _ = rustix::io::pwrite(&fd, pid.as_bytes(), 0);
    Ok(fd)
}

/// The bearer token for TCP clients: `$MOAT_HOME/token`, created (0600) on first use.
pub fn token(home: &Path) -> Result<String, std::io::Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = home.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let t = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(t.as_bytes())?;
    Ok(t)
}

/// Run the daemon until SIGTERM/SIGINT (or idle exit). Running sandboxes are left running.
///
/// `fronts` are routes the binary mounts beside the REST API (the MCP endpoint): this crate
/// depends on no front. They are served on the same listeners, behind the same socket
/// permissions and TCP token, and count as activity for the idle exit. A front calls the
/// service through the [`Door`] it is given, in this process.
pub async fn serve(cfg: ServeConfig, fronts: impl FnOnce(Door) -> axum::Router) -> Result<(), ServeError> {
    // Guest memory and disks go under the home: whatever the daemon, QEMU or qemu-img creates
    // there is the owner's alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let started = std::time::Instant::now();
    let home = cfg.runtime.home.clone();
    // Settings that cannot work fail before anything is touched.
    let access = listen::SocketAccess::decide(cfg.group.as_deref(), listen::group_id)?;
    let tls = match &cfg.tcp {
        Some(tcp) => tcp.prepare()?,
        None => None,
    };
    moat_sandbox::create_private_dir(&home)?;
    let _lock = lock_home(&home)?;
    let shared_gid = cfg.runtime.jail.then(|| moat_sandbox::jail_ids().shared_gid()).flatten();
    let opened = moat_sandbox::make_home_private(&home, access.home_mode(), shared_gid)?;
    if !opened.is_empty() {
        let opened = moat_sandbox::Loosened::list(&opened);
        tracing::warn!("other users could read or enter these paths; they are private now: {opened}");
    }
    descriptors::raise_limit(cfg.limits.max_sandboxes);
    if cfg.reset_state {
        if let Some(aside) = Db::reset(&home)? {
            tracing::warn!("the old state database was moved to {}", aside.display());
        }
    }
    // The state first: a damaged database must stop us before anything is touched.
    let mut db = Db::open(&home)?;
    db.set_event_retention(cfg.retention.events)?;
    let rt = Runtime::prepare(cfg.runtime.clone()).await?;
    // An operator who needs the hardware boundary learns at once that this host cannot give it.
    if let Some(refused) = service::admission::kvm_refusal(&cfg.limits, &rt.accel) {
        return Err(refused.into());
    }
    let svc = Service::new(rt, db, cfg.limits.clone(), Arc::new(launcher::Qemu));
    // What an earlier daemon left live is taken over in the background, every sandbox at once
    // under its own lock and deadline, then gc reconciles; a guest that does not answer delays
    // nothing but itself. The API waits a moment for it, so that the first request after a
    // restart finds its sandbox ready, but never longer.
    let mut settling = tokio::spawn(svc.claim_leftovers().await?.settle());
    let _ = tokio::time::timeout(ADOPTION_GRACE, &mut settling).await;

    let last_activity = Arc::new(AtomicI64::new(state::now_ms()));
    let activity = {
        let last = last_activity.clone();
        axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let last = last.clone();
            async move {
                last.store(state::now_ms(), Ordering::Relaxed);
                let r = next.run(req).await;
                last.store(state::now_ms(), Ordering::Relaxed);
                r
            }
        })
    };
    let api = http::router(svc.clone());
    // What fronts do through the door is activity too (the E2B API has a listener of its own).
    let app = api.clone().merge(fronts(Door::new(api.layer(activity.clone())))).layer(activity);

    let sock = socket_path(&home);
    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        return Err(ServeError::AlreadyRunning { home: home.display().to_string() });
    }
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(io(format!("listening on {}", sock.display())))?;
    access.apply(&home, &sock)?;
    tracing::info!(socket = %sock.display(), accel = %svc.rt.accel.accel, "moat daemon listening");
    let unix = tokio::spawn(axum::serve(listener, app.clone()).into_future());

    let tcp = match &cfg.tcp {
        Some(tcp) => {
            let token = Arc::new(token(&home).map_err(io("creating the API token"))?);
            let tcp_app =
                app.layer(axum::middleware::from_fn(move |req, next| http::require_token(token.clone(), req, next)));
            let listener = tcp.bind()?;
            let addr = listener.local_addr().map_err(io("reading the TCP address"))?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!(%addr, scheme, "moat daemon listening on TCP (bearer token in $MOAT_HOME/token)");
            let url = format!("{}://{addr}", if scheme == "https" { "https" } else { "tcp" });
            Some((url, tokio::spawn(listen::serve_tcp(listener, tls, tcp_app))))
        }
        None => None,
    };
    let _ = svc.listening.set(service::Listening {
        started,
        socket: sock.display().to_string(),
        tcp: tcp.as_ref().map(|(url, _)| url.clone()),
    });

    let reaper = {
        let svc = svc.clone();
        let prune_after = cfg.retention.prune_after;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                svc.reap_expired().await;
                svc.keep_tidy(prune_after).await;
            }
        })
    };

    let backups = tokio::spawn(svc.clone().back_up_periodically(cfg.retention.backups));
    let pools = tokio::spawn(svc.clone().keep_pools());
    let mut term = signal(SignalKind::terminate()).map_err(io("installing the SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("installing the SIGINT handler"))?;
    let idle = async {
        let Some(limit) = cfg.idle_exit else { return std::future::pending().await };
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let quiet = state::now_ms() - last_activity.load(Ordering::Relaxed);
            let busy = svc.is_busy()
                || svc.has_pools()
                || svc.list().map(|l| l.iter().any(|s| s.phase.is_live())).unwrap_or(true);
            if !busy && quiet >= limit.as_millis() as i64 {
                tracing::info!("no sandboxes and no requests for {limit:?}; exiting");
                return;
            }
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: exiting, sandboxes keep running"),
        _ = int.recv() => tracing::info!("SIGINT: exiting, sandboxes keep running"),
        _ = idle => {}
        r = unix => tracing::error!(?r, "the unix socket server stopped"),
    }
    reaper.abort();
    backups.abort();
    pools.abort();
    // Pool members have no record for the next daemon to adopt: they end with this one.
    svc.drain_pools().await;
    if let Some((_, t)) = tcp {
        t.abort();
    }
    svc.detach_all();
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
