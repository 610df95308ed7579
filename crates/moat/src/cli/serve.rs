//! `moat serve`, `moat mcp` and `moat e2b`: the daemon and its fronts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{parse_duration, parse_ratio, parse_size};

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
    #[command(flatten)]
    pub retention: Box<super::state::RetentionArgs>,
    /// Write the daemon's log to this file instead of stderr, moving it to FILE.1 when it
    /// reaches --log-max-size (the CLI starts background daemons with $MOAT_HOME/daemon.log).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Most bytes of --log-file before it is moved aside (one old file is kept).
    #[arg(long, value_name = "SIZE", env = "MOAT_LOG_MAX_SIZE", value_parser = parse_size, default_value = "10M")]
    pub log_max_size: u64,
    /// Always boot new sandboxes instead of keeping a template (a saved, booted VM) per image
    /// and restoring it.
    #[arg(long, env = "MOAT_NO_TEMPLATES")]
    pub no_templates: bool,
    /// A registry repository (REGISTRY/REPOSITORY) shared by hosts as a template store: a host
    /// without a template pulls it from there before booting, and pushes the templates it makes
    /// (tagged by template key). Credentials come from the daemon's Docker config. A failed pull
    /// or push never fails a create: it is an event and the sandbox's `last_error`.
    #[arg(long, value_name = "REPOSITORY", env = "MOAT_TEMPLATE_STORE", conflicts_with = "no_templates")]
    pub template_store: Option<String>,
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
