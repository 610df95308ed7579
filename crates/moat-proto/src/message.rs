//! Typed messages carried in frames.

use serde::{Deserialize, Serialize};

/// Version of the agent protocol. Host and agent refuse to talk across versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// Channel 0 carries the handshake; every other channel is one operation (an exec, a transfer).
pub const CONTROL_CHANNEL: u32 = 0;

/// Bytes a sender may have in flight on one stream before the receiver grants more credit.
pub const INITIAL_WINDOW: u32 = 1024 * 1024;

/// Largest data chunk a sender puts in one frame.
pub const MAX_CHUNK: usize = 64 * 1024;

/// First message on a fresh connection, sent by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHello {
    pub version: u32,
    /// Echoed in the agent's reply so the host can tell it from stale bytes of an earlier connection.
    pub nonce: u64,
    /// Host wall clock (nanoseconds since the Unix epoch); the agent sets the guest clock from it.
    pub time_unix_ns: u128,
    /// Fresh host entropy the agent mixes into the guest kernel's pool.
    #[serde(default)]
    pub entropy: Vec<u8>,
    /// Who the guest is: applied on every connection, so a VM restored from a snapshot takes
    /// on its own name before anything runs in it.
    #[serde(default)]
    pub identity: Option<Identity>,
}

/// A sandbox's identity inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The kernel hostname (also written to `/etc/hostname`).
    pub hostname: String,
    /// 32 lowercase hex digits for `/etc/machine-id`.
    pub machine_id: String,
}

impl Identity {
    /// Why this identity cannot be applied, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        let h = &self.hostname;
        if h.is_empty()
            || h.len() > 63
            || h.starts_with('-')
            || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("hostname {h:?} is not 1-63 letters, digits and '-'"));
        }
        let m = &self.machine_id;
        if m.len() != 32 || !m.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("machine id {m:?} is not 32 lowercase hex digits"));
        }
        Ok(())
    }
}

/// The wall clock and fresh entropy, for a guest that was paused (a snapshot was taken).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    /// u64, not u128 like the hello's: serde cannot buffer u128 inside a tagged enum (good to 2554).
    pub time_unix_ns: u64,
    pub entropy: Vec<u8>,
}

/// The agent's answer to [`HostHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    pub version: u32,
    pub nonce: u64,
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel: String,
}

/// How a process should be started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's base environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid\[:gid\]; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// The agent kills the process group after this long and reports `timed_out`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When false the process gets /dev/null as stdin and the host sends no stdin data.
    #[serde(default)]
    pub stdin: bool,
    /// Run in the background: the agent keeps the process (and its recent output) beyond this
    /// channel and this connection; `Started` is followed by `Close`. See `Jobs`, `Attach`, `Kill`.
    #[serde(default)]
    pub detach: bool,
    /// Run on a pseudo-terminal of this size: the process gets it as its controlling terminal
    /// (stdin, stdout and stderr), its output comes as one stdout stream, and `Resize` changes it.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// An operation the host asks of the agent; it opens the channel it is sent on.
///
/// Paths are absolute guest paths. Streaming operations answer `Started::Stream`, then move bytes
/// like an exec (stdout out, stdin in, under credit) and end with `Exit` (code 0, or 1 with the
/// reason on stderr) and `Close`; the others answer `Started::Fs` and `Close`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Exec(ExecRequest),
    /// Flush filesystems and power the guest off.
    Shutdown,
    Ping,
    /// Set the clock and reseed the RNG now (answered with `Done`).
    Resync(Resync),
    /// A tar stream of `path` (a file or a directory tree; symlinks stored as links, never
    /// followed) whose top-level entry is called `name` (default: the path's last component).
    ReadTar {
        path: String,
        name: Option<String>,
    },
    /// Unpack the tar stream sent as stdin into the existing directory `path`.
    WriteTar {
        path: String,
    },
    /// The bytes of the regular file `path`.
    ReadFile {
        path: String,
    },
    /// Stdin becomes the file `path`: written beside it and renamed into place when `atomic`.
    WriteFile {
        path: String,
        mode: Option<u32>,
        atomic: bool,
        /// A guest user (name, uid or user:group, as exec's `user`) to own the file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    Stat {
        path: String,
    },
    /// Entries of a directory (with `recursive`, of the whole tree, symlinks not followed).
    List {
        path: String,
        recursive: bool,
    },
    Mkdir {
        path: String,
        parents: bool,
        mode: Option<u32>,
        /// A guest user to own the directories this request creates (not those already there).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// A file, symlink or empty directory; with `recursive`, a whole tree.
    Remove {
        path: String,
        recursive: bool,
    },
    Rename {
        from: String,
        to: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    /// File system events under `path` as JSON lines on stdout, until the host closes.
    Watch {
        path: String,
        recursive: bool,
    },
    /// The background processes (detached execs), running and ended.
    Jobs,
    /// The output of background process `pid` (first what it printed so far, when `replay`),
    /// then, live, until it ends; then its `Exit`. Closing the channel leaves the process running.
    Attach {
        pid: u32,
        replay: bool,
    },
    /// Send `signal` to the process group of background process `pid`.
    Kill {
        pid: u32,
        signal: i32,
    },
    /// Mount the volume disk whose SCSI serial is `serial` (it may take a moment to appear after
    /// the host plugged it) at `path`, creating the directory. A fresh volume's root (empty,
    /// owned by root) is given to `owner` first (a guest user as exec's `user`). Answered with
    /// `Done` once mounted; mounting what is already mounted there is `Done` too.
    MountVolume {
        serial: String,
        path: String,
        readonly: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Flush and unmount the volume at `path` so its disk can be unplugged. Refused (`busy`),
    /// naming the processes, while any process has a file, directory or mapping in it.
    UnmountVolume {
        path: String,
    },
    /// Serve the host directory mount at `path` over this channel (see [`crate::hostfs`]):
    /// mounted on first use, taken over again by a later channel after a reconnect or restore.
    /// `Started(Stream)`, then calls on stdout and answers on stdin until either side closes.
    HostMount {
        path: String,
        readonly: bool,
    },
}

/// A background process the agent keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct JobInfo {
    pub pid: u32,
    pub argv: Vec<String>,
    /// Seconds since the Unix epoch (guest clock).
    pub started_at: i64,
    /// How it ended; `None` while it runs.
    pub exit: Option<ExitStatus>,
    /// Bytes of output it wrote, and how many of the oldest are no longer kept.
    pub output_bytes: u64,
    pub dropped_bytes: u64,
}

/// The agent's positive answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Started {
    Exec {
        pid: u32,
    },
    Shutdown,
    Pong,
    /// A streaming file operation began.
    Stream,
    /// A file operation's result.
    Fs(FsReply),
    Jobs {
        jobs: Vec<JobInfo>,
    },
    /// The request was carried out.
    Done,
}

/// The result of a file operation that is not a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum FsReply {
    Stat { info: FileInfo },
    List { entries: Vec<FileInfo> },
    Done,
}

/// What kind of file a path is (not following symlinks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One file's metadata, as `lstat` sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct FileInfo {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (and setuid/setgid/sticky), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    /// Where a symlink points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A change seen by `Watch`, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct FsEvent {
    /// `create`, `modify`, `delete`, `move_from`, `move_to`, `attrib`, or `overflow` (events were
    /// lost).
    pub event: String,
    pub path: String,
    #[serde(default)]
    pub dir: bool,
}

/// Why the agent refused or failed an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    PermissionDenied,
    SpawnFailed,
    Unsupported,
    Internal,
    /// Something in the guest still uses it (a volume that cannot be unmounted yet).
    Busy,
}

/// An error reported by the agent on a channel; it closes the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    pub code: ErrorCode,
    pub message: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// True when the agent killed the process because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// The exit code a shell would report: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 255,
        }
    }
}

/// One of a process's standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Stream {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
}

impl Stream {
    pub fn from_u8(v: u8) -> Option<Stream> {
        match v {
            0 => Some(Stream::Stdin),
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// Everything that travels on the agent link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(HostHello),
    HelloAck(AgentHello),
    Request(Request),
    Started(Started),
    Error(AgentError),
    Exit(ExitStatus),
    Data {
        stream: Stream,
        data: Vec<u8>,
    },
    Eof {
        stream: Stream,
    },
    /// The receiver consumed `bytes` of `stream`; the sender may send that much more.
    Credit {
        stream: Stream,
        bytes: u32,
    },
    /// Send this signal to the process group of the channel's process.
    Signal(i32),
    /// The sender is done with the channel and has dropped its state.
    Close,
    /// The host's terminal changed size; applies to an exec started with a tty.
    Resize(TtySize),
}
