//! The moat daemon's REST API (v1): the JSON bodies of requests, responses, errors and streams.
//! The daemon serves them, `moat-client` speaks them; docs/openapi.json describes them.

use serde::{Deserialize, Serialize};

mod terminal;
pub use terminal::{escape_controls, ControlEscaper};

/// Path prefix of every versioned endpoint.
pub const PREFIX: &str = "/v1";

/// Largest request body the daemon accepts.
pub const MAX_BODY: usize = 64 * 1024;

/// Defaults of a new sandbox.
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const DEFAULT_DISK_MIB: u64 = 4096;
/// The image sandboxes get when none is named: Debian with Python, built from
/// [`DEFAULT_IMAGE_FROM`] and [`DEFAULT_IMAGE_PACKAGES`] by the first client that needs it.
pub const DEFAULT_IMAGE: &str = "default";
pub const DEFAULT_IMAGE_FROM: &str = "debian:bookworm";
pub const DEFAULT_IMAGE_PACKAGES: &[&str] = &["python3", "python3-pip", "python3-venv", "ca-certificates", "curl"];

/// The phases of a sandbox's life. `creating → booting → running → stopping → stopped`, and from
/// any live phase to `failed`; a lease running out ends in `expired` (or removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Creating,
    Booting,
    Running,
    Stopping,
    Stopped,
    Failed,
    Expired,
    /// The whole machine is saved in the run directory; no QEMU runs. `resume` continues it.
    Paused,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Creating,
        Phase::Booting,
        Phase::Running,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Failed,
        Phase::Expired,
        Phase::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
            Phase::Expired => "expired",
            Phase::Paused => "paused",
        }
    }

    /// Whether a QEMU process may exist in this phase.
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Creating | Phase::Booting | Phase::Running | Phase::Stopping)
    }

    /// Whether the sandbox is at rest: `prune` removes these (stopped, failed, expired, paused).
    pub fn is_at_rest(self) -> bool {
        !self.is_live()
    }
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Phase, String> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| format!("unknown phase {s:?}"))
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What happens when a sandbox's lease runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpire {
    /// Stop the VM and keep its disk (phase `expired`); `moat start` brings it back.
    Stop,
    /// Stop the VM and remove the sandbox.
    #[default]
    Remove,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Unique name; letters, digits, `-`, `_` and `.`, starting with a letter or digit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    /// Lease length; without it the sandbox lives until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_expire: Option<OnExpire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Give up when the guest has not come up after this long [default: 90].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_timeout_secs: Option<u64>,
    /// Continue from this snapshot (`SANDBOX:NAME` or a snapshot id) instead of booting the
    /// image; image, vCPUs, memory and disk come from the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Start from the image's template (a saved, booted VM) when there is one, and make it when
    /// there is none [default: true, unless the daemon runs with templates off]. `false` boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<bool>,
    /// The network: mode, allowlist, secrets, port forwards [default: mode `default`, or what
    /// the snapshot of `from` had].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetSpec>,
}

/// How a sandbox reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    #[serde(default)]
    pub mode: NetMode,
    /// Hostnames reachable in mode `allow`: `pypi.org`, `*.pythonhosted.org`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Addresses reachable in any mode, even private ones: `10.1.0.0/16`, `127.0.0.1/32`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    /// Names moat's DNS answers itself: `NAME:IP`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Upstream resolvers, `IP` or `IP:PORT` [default: the host's].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// Secrets the host puts into HTTPS requests to their hosts; the guest sees placeholders.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretSpec>,
    /// Host ports forwarded to guest ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForward>,
}

/// A secret bound to hosts (`--secret NAME@HOST`).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// The environment variable that holds the placeholder in the guest.
    pub name: String,
    /// The real value: sent on create, never returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Hostnames (patterns as in `allow`) whose requests get the value.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// The host address to listen on [default: 127.0.0.1].
    #[serde(default = "default_host_addr")]
    pub host_addr: String,
    /// The host port; 0 picks a free one (the answer says which).
    pub host_port: u16,
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeAllowlist {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Everything known about one sandbox (`GET /v1/sandboxes/{ref}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub name: String,
    pub phase: Phase,
    pub image: String,
    pub image_digest: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    pub hostname: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; absent without a lease.
    pub expires_at: Option<i64>,
    pub on_expire: OnExpire,
    /// QEMU's pid while the VM runs.
    pub pid: Option<u32>,
    /// Why the sandbox last failed, if it did.
    pub last_error: Option<String>,
    /// Bumped on every phase change.
    pub version: i64,
    /// The snapshot (or template) this sandbox was restored from; its disk builds on it.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// The network, without secret values.
    #[serde(default)]
    pub net: NetSpec,
}

/// `POST /v1/sandboxes/{ref}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Unique among the sandbox's snapshots [default: `snap-<N>`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Taken by a user (`moat snapshot`, or implicitly by `moat fork`).
    Snapshot,
    /// The booted-and-ready VM moat keeps per image so sandboxes start without booting.
    Template,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Snapshot => "snapshot",
            SnapshotKind::Template => "template",
        }
    }
}

/// A saved machine: memory, device state and disk (`GET /v1/snapshots`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub kind: SnapshotKind,
    /// The sandbox it was taken of, while that sandbox exists.
    pub sandbox_id: Option<String>,
    /// That sandbox's name (kept after it is removed); `SANDBOX:NAME` refers to the snapshot.
    pub sandbox_name: String,
    pub image: String,
    pub image_digest: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    /// Bytes the snapshot's files take on disk.
    pub size_bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// What a restore must match: QEMU version, accelerator, guest kernel, agent build.
    pub qemu: String,
    pub accel: String,
    pub kernel: String,
    pub initramfs: String,
    /// Whether the machine has a NIC: a restore must ask for a network (or `none`) to match.
    #[serde(default)]
    pub nic: bool,
    /// Sandboxes restored from it (their disks build on it): it cannot be removed before them.
    pub dependents: Vec<String>,
}

impl SnapshotInfo {
    /// How users refer to it: `SANDBOX:NAME`, or the id of a template.
    pub fn reference(&self) -> String {
        match self.kind {
            SnapshotKind::Snapshot => format!("{}:{}", self.sandbox_name, self.name),
            SnapshotKind::Template => self.id.clone(),
        }
    }
}

/// `POST /v1/sandboxes/{ref}/revert`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revert {
    /// One of the sandbox's snapshots, by name or id.
    pub snapshot: String,
}

/// `POST /v1/sandboxes/{ref}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fork {
    /// How many sandboxes [default: 1, at most 64].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Names are `<prefix><N>` [default: `<sandbox>-fork-`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_prefix: Option<String>,
    /// Fork from this snapshot of the sandbox; without it a snapshot of its current state is
    /// taken first (named `fork-<unix time>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// The answer to a fork.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forked {
    pub snapshot: SnapshotInfo,
    pub sandboxes: Vec<SandboxInfo>,
}

/// `POST /v1/sandboxes/{ref}/lease`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewLease {
    /// The new lease, counted from now.
    pub ttl_secs: u64,
}

/// One entry of a sandbox's lifecycle (`GET /v1/sandboxes/{ref}/lifecycle`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEntry {
    pub version: i64,
    pub phase: Phase,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub error: Option<String>,
}

/// Something that happened (`GET /v1/events`, NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub sandbox: Option<String>,
    /// e.g. `phase`, `lease.renewed`, `gc`.
    pub kind: String,
    pub message: String,
}

/// `POST /v1/prune` and `POST /v1/gc`: what was removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reclaimed {
    /// Sandboxes removed (ids).
    pub sandboxes: Vec<String>,
    /// QEMU processes killed that no sandbox owned.
    pub processes: Vec<u32>,
    /// Files and directories removed that no sandbox owned.
    pub paths: Vec<String>,
}

/// An image in the store (`GET /v1/images`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    /// `sha256:…`: the config digest of imported images, the recipe digest of built ones.
    pub digest: String,
    /// Virtual size of the base disk.
    pub size_bytes: u64,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Where it came from: `pull REF@DIGEST`, `import`, `build debian:SUITE +PACKAGES`, `built-in`.
    pub source: String,
    /// When it was made, in seconds since the Unix epoch.
    pub created_at: i64,
}

/// `POST /v1/images/pull`: an image from a registry speaking the OCI distribution API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`, as for `docker pull`.
    pub reference: String,
    /// The name to give it in the store; the reference as written without one.
    #[serde(default)]
    pub name: Option<String>,
    /// Allow plain http to a registry that is not on loopback (loopback may always use http).
    #[serde(default)]
    pub insecure: bool,
    /// Credentials for the registry; anonymous without.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /v1/images/build`: an image from Debian packages, made with debootstrap.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildImage {
    pub name: String,
    /// `debian:bookworm` (or `debian:12`, `bookworm`).
    pub from: String,
    #[serde(default)]
    pub packages: Vec<String>,
}

/// One line of the NDJSON stream of a long image operation (pull, build, import).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageProgress {
    Progress {
        message: String,
    },
    /// Bytes of one layer downloaded so far (pulls); `done == total` once it is verified.
    Layer {
        digest: String,
        done: u64,
        total: u64,
    },
    Done {
        image: ImageInfo,
    },
    Error {
        error: ApiError,
    },
}

pub use moat_proto::{FileInfo, FileKind, FsEvent, JobInfo};

/// `POST /v1/sandboxes/{ref}/processes`: a background process (`exec -d`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// The answer to [`StartProcess`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStarted {
    pub pid: u32,
}

/// `POST /v1/sandboxes/{ref}/processes/{pid}/kill`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillProcess {
    /// Signal number [default: 15, SIGTERM]; it goes to the whole process group.
    #[serde(default = "default_signal")]
    pub signal: i32,
}

fn default_signal() -> i32 {
    15
}

/// `POST /v1/sandboxes/{ref}/files/mkdir`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MakeDir {
    pub path: String,
    /// Create missing parents too, and succeed if it exists (`mkdir -p`).
    #[serde(default)]
    pub parents: bool,
    /// Permission bits [default: 0o755].
    #[serde(default)]
    pub mode: Option<u32>,
}

/// `POST /v1/sandboxes/{ref}/files/remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovePath {
    pub path: String,
    /// Remove a directory with everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST /v1/sandboxes/{ref}/files/rename`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenamePath {
    pub from: String,
    pub to: String,
}

/// `POST /v1/sandboxes/{ref}/files/chmod`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeMode {
    pub path: String,
    /// Permission bits, e.g. 0o644 (420).
    pub mode: u32,
}

/// `GET /v1/sandboxes/{ref}/files/list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<FileInfo>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub version: String,
    pub pid: u32,
    pub accel: String,
    pub accel_reason: String,
    pub qemu_version: String,
    /// The guest kernel's release and file.
    pub kernel: String,
    pub kernel_path: String,
    pub sandboxes: usize,
    pub max_sandboxes: usize,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable, machine-readable: see [`ErrorCode`].
    pub code: ErrorCode,
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

/// Stable error codes; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    AmbiguousRef,
    NameTaken,
    InvalidRequest,
    BodyTooLarge,
    InvalidPhase,
    LeaseExpired,
    LimitReached,
    BootFailed,
    ExecFailed,
    /// A registry refused or failed a pull (the message says how).
    RegistryFailed,
    /// The sandbox refused access to a path.
    PermissionDenied,
    /// Something still depends on what was to be removed (the message says what).
    InUse,
    /// A snapshot cannot be restored on this host as it is now (the message says why).
    Incompatible,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::AmbiguousRef | ErrorCode::InvalidRequest => 400,
            ErrorCode::NameTaken
            | ErrorCode::InvalidPhase
            | ErrorCode::LeaseExpired
            | ErrorCode::InUse
            | ErrorCode::Incompatible => 409,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::LimitReached => 429,
            ErrorCode::BootFailed | ErrorCode::ExecFailed | ErrorCode::Internal => 500,
            ErrorCode::RegistryFailed => 502,
        }
    }
}

/// The first message a client sends on an exec WebSocket (`GET /v1/sandboxes/{ref}/exec`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    /// The command; empty means the image's Entrypoint and Cmd.
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Whether the client will send stdin; without it the process reads /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Stop sending output after this many bytes (stdout and stderr together); the process runs
    /// on, and a `[moat: output truncated after N bytes]` line on stderr marks the cut.
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
    /// Run on a terminal of this size (`exec -t`): one output stream (stdout), the terminal's line
    /// discipline turns Ctrl-C into SIGINT, and `resize` messages follow the client's window.
    #[serde(default)]
    pub tty: Option<TtySize>,
    /// Remove the sandbox when this exec ends or the client goes away (one-shot `moat run`).
    #[serde(default)]
    pub remove_sandbox_after: bool,
}

/// Text messages from the client on an exec WebSocket. Binary messages are stdin bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecClientMessage {
    /// Send a signal to the process group.
    Signal { signal: i32 },
    /// No more stdin.
    StdinEof,
    /// The client's terminal changed size (only for an exec started with `tty`).
    Resize { rows: u16, cols: u16 },
}

/// A terminal's size in character cells; both at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Text messages from the daemon on an exec WebSocket. Binary messages are output: the first byte
/// is the stream (1 stdout, 2 stderr), the rest its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecServerMessage {
    Started { pid: u32 },
    Exit { code: Option<i32>, signal: Option<i32>, timed_out: bool },
    Error { error: ApiError },
}

/// Stream tags of binary exec output messages.
pub const STDOUT_TAG: u8 = 1;
pub const STDERR_TAG: u8 = 2;

/// Which log `GET /v1/sandboxes/{ref}/logs` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// The guest's serial console (kernel and agent messages).
    #[default]
    Console,
    /// QEMU's own messages.
    Qemu,
}

/// A signal by name (`TERM`, `SIGKILL`, case-insensitive) or number (1 to 64), for Linux guests.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.trim().parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let name = s.trim().to_ascii_uppercase();
    Ok(match name.strip_prefix("SIG").unwrap_or(&name) {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        _ => return Err(format!("{s:?} is not a signal; use a name (TERM, KILL, INT, HUP, USR1, …) or a number 1-64")),
    })
}

/// Sandbox names: 1-63 of letters, digits, `-`, `_`, `.`, starting with a letter or digit, and not
/// looking like an id prefix only (ids are 12 hex digits, so a name of hex digits alone is refused).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if name.is_empty() || name.len() > 63 || !ok_chars || !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!(
            "sandbox name {name:?} is not valid; use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ));
    }
    if name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "sandbox name {name:?} could be mistaken for an id; use a name with at least one letter beyond a-f"
        ));
    }
    Ok(())
}

/// Parse `90`, `90s`, `500ms`, `5m`, `2h`, `1d` into a duration.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration; use e.g. 30s, 500ms, 5m, 2h"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m, h or d")),
    };
    if d.is_zero() {
        return Err("a duration must be more than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("sigkill"), Ok(9));
        assert_eq!(parse_signal("2"), Ok(2));
        assert!(parse_signal("0").is_err() && parse_signal("BOGUS").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("box").is_ok());
        assert!(validate_name("web-1.test_a").is_ok());
        for bad in ["", "-x", ".x", "a b", "ab/c", "deadbeef", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn phases_round_trip_and_classify() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
            assert_ne!(p.is_live(), p.is_at_rest());
        }
    }

    #[test]
    fn exec_messages_are_tagged() {
        let m = ExecClientMessage::Signal { signal: 2 };
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"type":"signal","signal":2}"#);
        let e: ExecServerMessage = serde_json::from_str(r#"{"type":"started","pid":7}"#).unwrap();
        assert_eq!(e, ExecServerMessage::Started { pid: 7 });
    }
}
