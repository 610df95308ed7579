//! Command-line arguments.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod diagnose;
mod host;
mod ops;
mod pool;
mod serve;
mod state;
mod store;

pub use diagnose::{DfArgs, DoctorArgs};
pub use host::HostArgs;
pub use ops::{DaemonCommand, SetupArgs};
pub use pool::{PoolArgs, PoolCommand};
pub use serve::{E2bCommand, McpArgs, ServeArgs};
pub use state::StateCommand;
pub use store::{ImageCommand, VolumeCommand};

/// Run untrusted code in lightweight virtual machines.
#[derive(Debug, Parser)]
#[command(name = "moat", version, about, propagate_version = true)]
pub struct Cli {
    /// Log verbosity for moat's own diagnostics (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "MOAT_LOG", default_value = "warn")]
    pub log: String,
    /// Show every line the tools of long work print (an image build's debootstrap), not only a
    /// spinner with the current step.
    #[arg(long, global = true)]
    pub verbose: bool,
    #[command(flatten)]
    pub host: HostArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a fresh sandbox and remove the sandbox afterwards (or, with -d, create a
    /// sandbox that keeps running).
    Run(Box<RunArgs>),
    /// Run a command in a running sandbox.
    Exec(ExecArgs),
    /// An interactive login shell in a sandbox (the user's shell from the image's /etc/passwd).
    Shell(ShellArgs),
    /// Copy files and directories between the host and a sandbox (`docker cp` rules).
    ///
    /// One side is BOX:PATH (PATH absolute in the sandbox). Into an existing directory SRC goes
    /// under its own name; `SRC/.` copies what is inside SRC. Mtimes and symlinks are kept and
    /// symlinks are never followed. Copied out of a sandbox, modes are masked to 0755 (no setuid,
    /// setgid or group/other write), existing directories keep their modes, and the archive may
    /// hold only SRC and what is under it.
    Cp(CpArgs),
    /// List sandboxes that are not over (`-a`: all of them), or with a sandbox, its background
    /// processes.
    Ps(PsArgs),
    /// The background processes of a sandbox (same as `moat ps BOX`).
    Top {
        sandbox: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a background process's output (what it printed so far, then live) until it ends;
    /// exits with its code. Ctrl-C detaches and leaves it running.
    Attach {
        #[command(flatten)]
        process: ProcessRef,
        /// Only output from now on.
        #[arg(long)]
        no_replay: bool,
    },
    /// Send a signal to a background process's whole process group.
    Kill {
        #[command(flatten)]
        process: ProcessRef,
        /// Signal name or number (TERM, KILL, INT, HUP, 9, …).
        #[arg(short = 's', long, default_value = "TERM")]
        signal: String,
    },
    /// Wait until a background process ends; exits with its code.
    Wait {
        #[command(flatten)]
        process: ProcessRef,
    },
    /// Show everything about a sandbox.
    Inspect(InspectArgs),
    /// Stop sandboxes (their disks are kept).
    Stop(RefsArgs),
    /// Start stopped sandboxes again.
    Start(RefsArgs),
    /// Remove sandboxes.
    Rm(RmArgs),
    /// Manage a sandbox's lease.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Show a sandbox's guest console (kernel and agent messages) or QEMU's log.
    Logs(LogsArgs),
    /// Show what happened: sandbox phase changes, leases, gc.
    Events(EventsArgs),
    /// Save a running sandbox's whole machine (memory, processes, disk) as a snapshot; it runs on
    /// after a short pause. `moat snapshot ls` and `moat snapshot rm` manage snapshots.
    Snapshot(SnapshotArgs),
    /// Put a sandbox back to one of its snapshots: processes, memory and files as they were.
    Revert {
        sandbox: String,
        /// The snapshot's name (or SANDBOX:NAME, or its id).
        snapshot: String,
    },
    /// New sandboxes that continue from a snapshot of a running sandbox, each with its own
    /// hostname, machine id, entropy and clock, sharing the snapshot's memory copy-on-write.
    Fork(ForkArgs),
    /// Save sandboxes' whole machines to disk and release their memory; `moat resume` continues.
    Pause(RefsArgs),
    /// Continue paused sandboxes where they were.
    Resume(RefsArgs),
    /// Remove every stopped, failed, expired or paused sandbox.
    Prune,
    /// Reclaim what crashes leaked: QEMU processes, sockets and directories no sandbox owns.
    Gc,
    /// Show a sandbox's network, or change its allowlist while it runs.
    #[command(subcommand)]
    Net(NetCommand),
    /// Forward a host port to a running sandbox (`moat port-forward BOX 8080:80`); with no
    /// forward given, list them. The host side listens on 127.0.0.1 unless an address is given.
    PortForward(PortForwardArgs),
    /// Manage images: list, import, build, inspect, remove.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage named volumes: disks of their own that outlive sandboxes (`moat run -v NAME:/path`).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Warm pools: sandboxes of an image and size restored ahead of time, so that creates of
    /// that image and size start in milliseconds.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Run the daemon (the CLI starts one on its own when none is running).
    Serve(Box<ServeArgs>),
    /// Serve MCP (Model Context Protocol) on stdin and stdout: sandboxes as tools for AI agents
    /// (Claude Desktop, Claude Code, MCP SDKs). The sandboxes a session creates are its own and
    /// are removed when it ends. See docs/mcp.md.
    Mcp(McpArgs),
    /// The E2B-compatible API (`moat serve --e2b ADDR`): the unmodified `e2b` SDKs drive moat
    /// sandboxes. See docs/e2b.md.
    #[command(subcommand)]
    E2b(E2bCommand),
    /// Check that this host can run sandboxes, and say how to fix what is missing.
    Doctor(DoctorArgs),
    /// The configuration: `moat config show` prints every setting, its value and where it came
    /// from (environment, config file, default).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Install missing host packages (with apt) and prepare the kernel, initramfs and default image.
    Setup(SetupArgs),
    /// The daemon: its status; stop, restart, logs.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Disk use by images, snapshots, templates, sandboxes and volumes, and what `moat gc` and
    /// `moat prune` would free.
    Df(DfArgs),
    /// The daemon's state database: backups and restores.
    #[command(subcommand)]
    State(StateCommand),
}

/// How a process runs in a sandbox.
#[derive(Debug, Args)]
pub struct ProcessArgs {
    /// Set an environment variable in the command's environment (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: a name, a uid or uid:gid.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Forward standard input even when it is a terminal (it is always forwarded when it is not).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the command on a terminal: your terminal goes raw, keys (Ctrl-C, Ctrl-Z, Ctrl-D) reach
    /// the sandbox's terminal, and window size changes follow. Needs a terminal; use with -i.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Kill the command after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Show at most this many bytes of output (e.g. 64K, 10M); the rest is dropped and marked.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_output: Option<u64>,
}

/// `4096`, `64K`, `10M`, `1G`, `2T` (powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(s.trim().len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size; write e.g. 4096, 64K or 10M"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?} has an unknown unit; use K, M, G or T")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// An overcommit ratio: a number above 0 and at most 100.
pub(crate) fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 100.0 => Ok(r),
        _ => Err(format!("{s:?} is not a ratio; use a number above 0 and at most 100, e.g. 1.5")),
    }
}

/// What a new sandbox looks like.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image to boot: a name from `moat image ls`, or a registry reference (pulled on first use).
    /// The default image (Debian with Python) is built on first use; `minimal` is busybox only.
    #[arg(long, env = "MOAT_IMAGE", default_value = moat_api::DEFAULT_IMAGE)]
    pub image: String,
    /// Name of the sandbox [default: sb-<id>].
    #[arg(long)]
    pub name: Option<String>,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = moat_api::DEFAULT_VCPUS)]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = moat_api::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Root disk size in MiB.
    #[arg(long, default_value_t = moat_api::DEFAULT_DISK_MIB)]
    pub disk: u64,
    /// Hostname of the sandbox [default: moat-<id>].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Lease: stop (and by default remove) the sandbox after this long (e.g. 30m, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// What happens when the lease runs out.
    #[arg(long, value_enum, default_value = "remove")]
    pub on_expire: OnExpireArg,
    /// Stop (or pause, or remove) the sandbox once nothing used it this long: no command
    /// running, no session or API call, no network traffic. E.g. 30m, 2h:pause, 1d:remove.
    #[arg(long, value_name = "DURATION[:ACTION]")]
    pub idle: Option<moat_api::IdlePolicy>,
    /// Give up if the guest has not come up after this long.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub boot_timeout: Duration,
    /// Continue from a snapshot instead of booting: `SANDBOX:NAME`, a snapshot id, or a registry
    /// reference `REGISTRY/REPOSITORY:TAG` (pulled unless it is here already). The image, CPUs,
    /// memory and disk are the snapshot's.
    #[arg(long, value_name = "SNAPSHOT")]
    pub from: Option<String>,
    /// Boot the image's kernel even when a template (a saved, booted VM of the image) could
    /// start the sandbox in a fraction of the time.
    #[arg(long, conflicts_with = "from")]
    pub cold: bool,
    /// Network: `none` (no network device), `default` (public addresses; loopback, private,
    /// link-local, metadata and the host's own addresses refused), or `allow=HOST[,HOST…]` (only
    /// those hostnames, checked on DNS, TLS SNI and HTTP Host; `*.example.org` for subdomains)
    /// [default: default, or the snapshot's with --from].
    #[arg(long, value_name = "MODE")]
    pub net: Option<String>,
    /// Also allow these addresses, even private or loopback ones (repeatable): `10.1.0.0/16`,
    /// `127.0.0.1/32` (the guest reaches the host's loopback at 10.0.2.2 / host.moat.internal).
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Make moat's DNS answer NAME with IP (repeatable).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// Upstream DNS servers for moat's resolver (repeatable) [default: the host's].
    #[arg(long, value_name = "IP[:PORT]")]
    pub dns: Vec<String>,
    /// Bind a secret to hosts (repeatable): the value comes from moat's own environment variable
    /// NAME; the guest's NAME holds a placeholder that moat replaces, on the host, in the header
    /// values and query of HTTPS requests to those hosts only (`+body`: in request bodies too),
    /// and puts back wherever the value comes back in responses. The real value never enters
    /// the sandbox.
    #[arg(long, value_name = "NAME@HOST[,HOST…][+body]")]
    pub secret: Vec<String>,
    /// Forward a host port to a guest port (repeatable); the address defaults to 127.0.0.1 and
    /// host port 0 picks a free one.
    #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOSTPORT:GUESTPORT")]
    pub publish: Vec<String>,
    /// Label the sandbox (repeatable), to find it by with `moat ps --label`.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = moat_api::parse_label)]
    pub labels: Vec<(String, String)>,
    /// Mount a volume (`NAME:/path`, see `moat volume`) or a host directory (`./dir:/path`,
    /// `/abs/dir:/path`; live both ways) in the sandbox (repeatable); `:ro` at the end makes it
    /// read-only. A read-write volume is in one running sandbox at a time.
    #[arg(short = 'v', long = "volume", value_name = "SOURCE:PATH[:ro]")]
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnExpireArg {
    /// Stop it and keep its disk; `moat start` boots it again.
    Stop,
    Remove,
    /// Pause it (memory saved to disk); `moat resume` continues it.
    Pause,
}

#[derive(Debug, Args)]
#[command(mut_arg("env", |a| a.help("Set an environment variable in the command's environment (repeatable); \
    with -d, in the sandbox's default environment, which every later command starts with")))]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Create the sandbox and leave it running; print its name.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// The command and its arguments.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Run in the background and print its pid; see `moat ps BOX`, `attach`, `kill`, `wait`.
    #[arg(short = 'd', long, conflicts_with_all = ["tty", "interactive", "timeout", "max_output"])]
    pub detach: bool,
    /// Sandbox name, id or unique id prefix.
    pub sandbox: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a host path, or BOX:PATH.
    pub src: String,
    /// Where to: BOX:PATH, or a host path.
    pub dest: String,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox name, id or unique id prefix.
    pub sandbox: String,
    /// User to log in as: a name, a uid or uid:gid.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Set an environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// List the background processes of this sandbox instead of the sandboxes.
    pub sandbox: Option<String>,
    /// Only sandboxes with this label, with this value or any (repeatable; all must match).
    #[arg(long = "label", value_name = "KEY[=VALUE]", conflicts_with = "sandbox")]
    pub labels: Vec<moat_api::LabelSelector>,
    /// Show every sandbox, also stopped, failed and expired ones.
    #[arg(short, long, conflicts_with = "sandbox")]
    pub all: bool,
    /// Print only the ids (`moat rm $(moat ps -q -f phase=stopped)`).
    #[arg(short, long, conflicts_with = "sandbox")]
    pub quiet: bool,
    /// Only sandboxes that match (repeatable): phase=PHASE (shows ended ones too), name=PART,
    /// id=PREFIX, image=NAME, label=KEY[=VALUE]. Values of one key are alternatives; different
    /// keys must all match.
    #[arg(short, long = "filter", value_name = "KEY=VALUE", conflicts_with = "sandbox")]
    pub filters: Vec<String>,
    /// Print each sandbox this way: `json` (a line each), a template (`{{.Name}}\t{{.Phase}}`,
    /// `{{.Labels.KEY}}`), or fields as a table (`name,phase,image`).
    #[arg(long, value_name = "FORMAT", conflicts_with = "sandbox")]
    pub format: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ProcessRef {
    /// Sandbox name, id or unique id prefix.
    pub sandbox: String,
    /// The process id `moat exec -d` printed.
    pub pid: u32,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Sandbox name, id or unique id prefix.
    pub sandbox: String,
    /// Print JSON (with the lifecycle).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RefsArgs {
    /// Sandbox names, ids or unique id prefixes.
    #[arg(required = true)]
    pub sandboxes: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: Option<SnapshotCommand>,
    /// The running sandbox to snapshot.
    pub sandbox: Option<String>,
    /// Name of the snapshot, unique among the sandbox's [default: snap-N].
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots: of one sandbox, or all of them and the image templates.
    Ls {
        sandbox: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots (SANDBOX:NAME or id). Refused while sandboxes restored from one exist.
    Rm {
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Send a snapshot (memory, device state, disk and its image's base disk) to a registry, as
    /// an artifact any moat host with the same QEMU, kernel and agent can pull and restore.
    /// Blobs the registry has already (the base of an image pushed before) are not sent again.
    /// Credentials come from the Docker config (`docker login`).
    Push {
        /// SANDBOX:NAME or a snapshot id.
        snapshot: String,
        /// REGISTRY/REPOSITORY:TAG, e.g. registry.example.com/team/env:clean.
        reference: String,
        /// Allow plain http to a registry that is not on loopback.
        #[arg(long)]
        insecure: bool,
    },
    /// Fetch a snapshot from a registry (again, if its tag moved): `moat run --from REFERENCE`
    /// and `moat fork --snapshot REFERENCE` then start from it. They pull by themselves too.
    Pull {
        /// REGISTRY/REPOSITORY:TAG.
        reference: String,
        /// Allow plain http to a registry that is not on loopback.
        #[arg(long)]
        insecure: bool,
    },
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The sandbox to fork (running, unless --snapshot names one of its snapshots). Without it,
    /// --snapshot names any snapshot: an id, SANDBOX:NAME, or a registry reference (pulled
    /// unless it is here already).
    #[arg(required_unless_present = "snapshot")]
    pub sandbox: Option<String>,
    /// How many sandboxes.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: u32,
    /// Names are PREFIX1, PREFIX2, … [default: SANDBOX-fork-].
    #[arg(long)]
    pub name_prefix: Option<String>,
    /// Fork from this snapshot of the sandbox instead of a new one of its current state.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Read-write volumes: `refuse` the fork, or `copy` them, one new volume `FORK-VOLUME` per
    /// fork, as they are now (read-only volumes and host directories are shared as they are).
    #[arg(long, value_name = "refuse|copy", default_value = "refuse")]
    pub volumes: ForkVolumesArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// After the names, how long each fork's start took: QEMU start, state load, agent answer.
    #[arg(long)]
    pub timeline: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ForkVolumesArg {
    Refuse,
    Copy,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop running sandboxes first instead of refusing.
    #[arg(short, long)]
    pub force: bool,
    /// Sandbox names, ids or unique id prefixes.
    #[arg(required = true)]
    pub sandboxes: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Extend a running sandbox's lease: it now ends TTL from now.
    Renew {
        /// Sandbox name, id or unique id prefix.
        sandbox: String,
        /// New lease, from now (e.g. 30m, 1h).
        #[arg(long, value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// The network of a sandbox: mode, allowlist, CIDRs, hosts, DNS, secrets (names and hosts,
    /// never values) and port forwards.
    Show {
        sandbox: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add hostnames to, or remove them from, the allowlist of a sandbox in mode `allow`. New
    /// connections and DNS queries follow the new list at once.
    Allow {
        sandbox: String,
        action: AllowAction,
        /// Hostnames: `pypi.org`, `*.pythonhosted.org`.
        #[arg(required = true)]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AllowAction {
    Add,
    Rm,
}

#[derive(Debug, Args)]
pub struct PortForwardArgs {
    pub sandbox: String,
    /// `[ADDR:]HOSTPORT:GUESTPORT`; host port 0 picks a free one.
    #[arg(value_name = "FORWARD")]
    pub forward: Option<String>,
    /// Stop forwarding this host port.
    #[arg(long, value_name = "HOSTPORT", conflicts_with = "forward")]
    pub rm: Option<u16>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Sandbox name, id or unique id prefix.
    pub sandbox: String,
    /// Keep printing what is appended while the sandbox runs.
    #[arg(short, long)]
    pub follow: bool,
    /// Which log: the guest console, or QEMU's own messages.
    #[arg(long, value_enum, default_value = "console")]
    pub source: LogSourceArg,
    /// Only the last N lines.
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<u64>,
    /// Only what was written since then: a time ago (10m, 2h) or an RFC 3339 time
    /// (2026-12-03T08:00:00Z). Console times are known to about a second.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<i64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogSourceArg {
    Console,
    Qemu,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the events of this sandbox (a removed one's by its id).
    #[arg(long, value_name = "BOX")]
    pub sandbox: Option<String>,
    /// Only events of this kind (phase, net.refused, idle), or under a prefix (net.*).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only events since then: a time ago (10m, 2h) or an RFC 3339 time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<i64>,
    /// Only events until then (a time ago or an RFC 3339 time); a followed stream ends then.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<i64>,
    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every setting's effective value and its source. Settings come from flags, then
    /// `MOAT_*` variables, then `$MOAT_HOME/config.toml` (else `/etc/moat/config.toml`), whose
    /// keys are the variables' names without `MOAT_`, lowercase.
    Show {
        #[arg(long)]
        json: bool,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let valid = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(format!("{k:?} is not a valid variable name (letters, digits and _, not starting with a digit)"));
    }
    if v.contains('\0') {
        return Err("values cannot contain NUL bytes".into());
    }
    Ok((k.to_string(), v.to_string()))
}

pub use moat_api::parse_duration;

/// A point in time as Unix milliseconds: a time ago (`10m`, `2h`, `1d`) or an RFC 3339 time.
pub(crate) fn parse_time(s: &str) -> Result<i64, String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    if let Ok(ago) = parse_duration(s) {
        return Ok(now.saturating_sub(ago.as_millis().min(i64::MAX as u128) as i64));
    }
    let at = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339).map_err(|_| {
        format!("{s:?} is not a time; write a time ago (10m, 2h) or an RFC 3339 time (2026-12-03T08:00:00Z)")
    })?;
    Ok((at.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn times_parse_as_ago_or_rfc3339() {
        assert_eq!(parse_time("2026-12-03T08:00:00Z").unwrap(), 1_796_284_800_000);
        assert_eq!(parse_time("2026-12-03T09:00:00+01:00").unwrap(), 1_796_284_800_000);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let ago = now - parse_time("10m").unwrap();
        assert!((600_000..605_000).contains(&ago), "{ago}");
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn env_pairs_parse() {
        assert_eq!(parse_env("K=V=W").unwrap(), ("K".into(), "V=W".into()));
        assert_eq!(parse_env("EMPTY=").unwrap(), ("EMPTY".into(), "".into()));
        assert!(parse_env("NOEQUALS").is_err());
        assert!(parse_env("1X=y").is_err());
        assert!(parse_env("A-B=y").is_err());
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from(["moat", "run", "-e", "K=V", "-w", "/tmp", "--", "env", "-0"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        assert_eq!(run.command, ["env", "-0"]);
        assert_eq!(run.process.workdir.as_deref(), Some("/tmp"));
    }

    #[test]
    fn exec_and_lease_parse() {
        let cli = Cli::try_parse_from(["moat", "exec", "box", "--", "ls"]).unwrap();
        let Command::Exec(e) = cli.command else { panic!("expected exec") };
        assert_eq!((e.sandbox.as_str(), e.command.as_slice()), ("box", &["ls".to_string()][..]));
        let cli = Cli::try_parse_from(["moat", "lease", "renew", "box", "--ttl", "1h"]).unwrap();
        let Command::Lease(LeaseCommand::Renew { ttl, .. }) = cli.command else { panic!("expected lease") };
        assert_eq!(ttl, Duration::from_secs(3600));
        assert!(Cli::try_parse_from(["moat", "lease", "renew", "box", "--ttl", "soon"]).is_err());
    }
}
