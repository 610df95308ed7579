//! Command-line arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use moat_vmm::AccelChoice;

/// Run untrusted code in lightweight virtual machines.
#[derive(Debug, Parser)]
#[command(name = "moat", version, about, propagate_version = true)]
pub struct Cli {
    /// Log verbosity for moat's own diagnostics (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "MOAT_LOG", default_value = "warn")]
    pub log: String,
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
    /// List sandboxes, or with a sandbox, its background processes.
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
    /// Run the daemon (the CLI starts one on its own when none is running).
    Serve(ServeArgs),
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
}

/// Where state lives and how VMs boot. The accelerator and kernel are the daemon's: they apply
/// when this command starts the daemon.
#[derive(Debug, Args, Clone)]
pub struct HostArgs {
    /// Accelerator: auto (KVM if a probe guest really boots under it, else TCG), kvm or tcg.
    #[arg(long, global = true, env = "MOAT_ACCEL", default_value = "auto")]
    pub accel: AccelChoice,
    /// State directory [default: /var/lib/moat as root, else ~/.local/share/moat].
    #[arg(long, global = true, env = "MOAT_HOME")]
    pub home: Option<PathBuf>,
    /// Guest kernel [default: the newest /boot/vmlinuz-*-cloud-amd64].
    #[arg(long, global = true, env = "MOAT_KERNEL")]
    pub kernel: Option<PathBuf>,
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
fn parse_size(s: &str) -> Result<u64, String> {
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
fn parse_ratio(s: &str) -> Result<f64, String> {
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
    /// Give up if the guest has not come up after this long.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub boot_timeout: Duration,
    /// Continue from a snapshot instead of booting: `SANDBOX:NAME` or a snapshot id. The image,
    /// CPUs, memory and disk are the snapshot's.
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
}

#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The sandbox to fork (running, unless --snapshot names one of its snapshots).
    pub sandbox: String,
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

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from a registry (Docker Hub, GHCR, a private registry).
    ///
    /// Credentials come from the Docker config (`docker login`, credential helpers) unless given
    /// here. Plain http is used only for registries on localhost, or with --insecure.
    Pull {
        /// [REGISTRY/]REPOSITORY[:TAG][@DIGEST], e.g. debian:bookworm-slim or ghcr.io/org/app:1.2.
        reference: String,
        /// Name of the image in the store [default: the reference as written].
        #[arg(long)]
        name: Option<String>,
        /// Allow plain http to a registry that is not on localhost.
        #[arg(long)]
        insecure: bool,
        /// Registry user; the password is read from standard input (see --password-stdin).
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password (or token) from standard input.
        #[arg(long, requires = "username")]
        password_stdin: bool,
    },
    /// Import a `docker save` tarball or an OCI image-layout archive (`-` reads standard input).
    Import {
        /// The archive, or `-` for standard input.
        file: PathBuf,
        /// Name of the image [default: the archive's first tag].
        #[arg(long)]
        name: Option<String>,
    },
    /// Build an image from Debian packages with debootstrap (no registry needed).
    Build {
        /// Name of the new image.
        name: String,
        /// Base: debian:bookworm (or debian:12, bookworm).
        #[arg(long, default_value = "debian:bookworm")]
        from: String,
        /// Packages to install, comma-separated (e.g. python3,git).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
    },
    /// Show an image's digest, size and config.
    Inspect { name: String },
    /// Remove cached layers, interrupted pulls and builds, and image files that no image name
    /// and no sandbox needs.
    Gc,
    /// Remove images (refused while a sandbox uses one).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: an empty ext4 file system in a sparse file, which takes only what is
    /// written to it.
    Create {
        /// Name of the volume (the rules of sandbox names).
        name: String,
        /// Size of its file system, 16M to 16T (e.g. 512M, 10G, 1T) [default: 10G].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
    },
    /// List volumes.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's sizes and the sandboxes that mount it.
    Inspect {
        /// Volume name, id or unique id prefix.
        volume: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove volumes and their data. Refused while sandboxes mount one; with --force, only while
    /// a running sandbox does.
    Rm {
        /// Remove a volume that stopped sandboxes still mount (they do not start again until
        /// their mount of it is gone).
        #[arg(short, long)]
        force: bool,
        /// Volume names, ids or unique id prefixes.
        #[arg(required = true)]
        volumes: Vec<String>,
    },
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
    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Also serve the API on this TCP address (bearer token from $MOAT_HOME/token). Anything but
    /// a loopback address needs --tls-cert and --tls-key, or --insecure-tcp.
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<std::net::SocketAddr>,
    /// Serve --tcp over TLS with this certificate chain (PEM, the server's certificate first).
    #[arg(long, value_name = "PEM", requires_all = ["tcp", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tcp", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Serve --tcp in clear text even on a non-loopback address: anyone on the network path can
    /// read the token and every secret sent to the API.
    #[arg(long, requires = "tcp")]
    pub insecure_tcp: bool,
    /// Let the members of this group use the daemon's socket, and so every sandbox and secret it
    /// holds [default: the daemon's user alone].
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Most sandboxes that may be live at once.
    #[arg(long, env = "MOAT_MAX_SANDBOXES", default_value_t = 32)]
    pub max_sandboxes: usize,
    /// Refuse a sandbox when the memory of live sandboxes (guest RAM plus QEMU's overhead) would
    /// pass the host's RAM times R.
    #[arg(long, value_name = "R", env = "MOAT_MEMORY_OVERCOMMIT", value_parser = parse_ratio,
          default_value_t = moat_daemon::service::admission::DEFAULT_MEMORY_OVERCOMMIT)]
    pub memory_overcommit: f64,
    /// Refuse a sandbox when what sandbox disks may still grow by would pass the free space
    /// under the home times R (disks are thin: they take space only as the guest writes).
    #[arg(long, value_name = "R", env = "MOAT_DISK_OVERCOMMIT", value_parser = parse_ratio,
          default_value_t = moat_daemon::service::admission::DEFAULT_DISK_OVERCOMMIT)]
    pub disk_overcommit: f64,
    /// Refuse to start unless sandboxes run under KVM: without it (TCG) QEMU is the only
    /// boundary between a guest and the host.
    #[arg(long, env = "MOAT_REQUIRE_KVM")]
    pub require_kvm: bool,
    /// Exit after this long without sandboxes or requests.
    #[arg(long, value_parser = parse_duration)]
    pub idle_exit: Option<Duration>,
    /// An address that reaches this host although none of its interfaces has it, such as a
    /// cloud's public address behind 1:1 NAT: sandboxes are refused it like the host's own
    /// addresses (repeat, or comma-separate in the variable).
    #[arg(long, value_name = "IP", env = "MOAT_HOST_ADDRESSES", value_delimiter = ',')]
    pub host_address: Vec<std::net::Ipv4Addr>,
    /// Move a damaged or missing state database aside and start with an empty one.
    #[arg(long)]
    pub reset_state: bool,
    /// Always boot new sandboxes instead of keeping a template (a saved, booted VM) per image
    /// and restoring it.
    #[arg(long, env = "MOAT_NO_TEMPLATES")]
    pub no_templates: bool,
    /// MCP endpoint (`/mcp`): let every session see and use every sandbox, not only its own.
    #[arg(long, env = "MOAT_MCP_ALL_SANDBOXES")]
    pub mcp_all_sandboxes: bool,
    /// MCP endpoint: most sandboxes one session may own at once.
    #[arg(long, value_name = "N", env = "MOAT_MCP_MAX_SANDBOXES", default_value_t = 8)]
    pub mcp_max_sandboxes: usize,
    /// MCP endpoint: most commands one session may start per minute.
    #[arg(long, value_name = "N", env = "MOAT_MCP_EXEC_RATE", default_value_t = 120)]
    pub mcp_exec_rate: u32,
    /// MCP endpoint: the host directory that the upload and download tools may read and write
    /// [default: none, the tools are off].
    #[arg(long, value_name = "DIR", env = "MOAT_MCP_HOST_DIR")]
    pub mcp_host_dir: Option<PathBuf>,
    /// MCP endpoint: image of new sandboxes when the agent names none.
    #[arg(long, env = "MOAT_MCP_IMAGE", default_value = moat_api::DEFAULT_IMAGE)]
    pub mcp_image: String,
    /// MCP endpoint: let port forwards listen on any host address, not only on loopback.
    #[arg(long, env = "MOAT_MCP_ALLOW_PUBLIC_PORTS")]
    pub mcp_allow_public_ports: bool,
    /// MCP endpoint: most virtual CPUs of one sandbox.
    #[arg(long, value_name = "N", env = "MOAT_MCP_MAX_CPUS", default_value_t = moat_mcp::DEFAULT_MAX_CPUS)]
    pub mcp_max_cpus: u32,
    /// MCP endpoint: most memory of one sandbox, in MiB.
    #[arg(long, value_name = "MIB", env = "MOAT_MCP_MAX_MEMORY", default_value_t = moat_mcp::DEFAULT_MAX_MEMORY_MIB)]
    pub mcp_max_memory: u32,
    /// MCP endpoint: largest root disk of one sandbox, in MiB.
    #[arg(long, value_name = "MIB", env = "MOAT_MCP_MAX_DISK", default_value_t = moat_mcp::DEFAULT_MAX_DISK_MIB)]
    pub mcp_max_disk: u64,
    /// Also serve the E2B-compatible API on this address: both of E2B's planes on one listener,
    /// for the unmodified `e2b` SDKs (`moat e2b env` prints their settings). See docs/e2b.md.
    #[arg(long, value_name = "ADDR", env = "MOAT_E2B_LISTEN")]
    pub e2b: Option<std::net::SocketAddr>,
    /// E2B API: the domain told to the SDKs; `Sandbox.get_host(port)` is `<port>-<id>.<domain>`,
    /// which the E2B listener routes to that guest port [default: `localhost:<port of --e2b>`].
    #[arg(long, value_name = "DOMAIN", env = "MOAT_E2B_DOMAIN")]
    pub e2b_domain: Option<String>,
    /// E2B API: the image behind E2B's default template `base` (other templates are image names).
    #[arg(long, value_name = "IMAGE", env = "MOAT_E2B_IMAGE", default_value = moat_api::DEFAULT_IMAGE)]
    pub e2b_image: String,
    /// E2B API: serve --e2b on a non-loopback address although it is plain HTTP: anyone on the
    /// network path can read the API key and every command and file.
    #[arg(long)]
    pub e2b_insecure: bool,
}

/// `moat e2b …`.
#[derive(Debug, Subcommand)]
pub enum E2bCommand {
    /// Print the environment the `e2b` SDKs need to use this home's daemon (E2B_API_URL,
    /// E2B_SANDBOX_URL, E2B_API_KEY), as shell `export` lines: `eval "$(moat e2b env)"`.
    Env,
}

/// What an MCP session may do (`moat mcp`).
#[derive(Debug, Args)]
pub struct McpArgs {
    /// Let the session see and use every sandbox, not only the ones it creates.
    #[arg(long)]
    pub all_sandboxes: bool,
    /// Most sandboxes the session may own at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_sandboxes: usize,
    /// Most commands (exec and background processes) the session may start per minute.
    #[arg(long, value_name = "N", default_value_t = 120)]
    pub exec_rate: u32,
    /// Default limit of each output stream a tool returns (e.g. 32K); a call may ask for up to 1M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "32K")]
    pub max_output: u64,
    /// Image of new sandboxes when the agent names none.
    #[arg(long, env = "MOAT_IMAGE", default_value = moat_api::DEFAULT_IMAGE)]
    pub image: String,
    /// Remove a sandbox the agent created once it has been unused this long (every tool call on
    /// it starts the clock again); the agent may choose another when it creates one.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub idle_timeout: Duration,
    /// The host directory that the upload and download tools may read and write [default: the
    /// working directory].
    #[arg(long, value_name = "DIR", conflicts_with = "no_host_files")]
    pub host_dir: Option<PathBuf>,
    /// Turn the upload and download tools off.
    #[arg(long)]
    pub no_host_files: bool,
    /// Let port forwards listen on any host address, not only on loopback (127.0.0.1, ::1).
    #[arg(long)]
    pub allow_public_ports: bool,
    /// Most virtual CPUs of one sandbox.
    #[arg(long, value_name = "N", default_value_t = moat_mcp::DEFAULT_MAX_CPUS)]
    pub max_cpus: u32,
    /// Most memory of one sandbox, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = moat_mcp::DEFAULT_MAX_MEMORY_MIB)]
    pub max_memory: u32,
    /// Largest root disk of one sandbox, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = moat_mcp::DEFAULT_MAX_DISK_MIB)]
    pub max_disk: u64,
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

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Only print what would be installed.
    #[arg(long)]
    pub dry_run: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
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
