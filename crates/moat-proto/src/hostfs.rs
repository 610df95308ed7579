//! Host directory mounts: the file calls a guest makes into a directory of the host.
//!
//! The host opens a channel with [`Request::HostMount`](crate::Request::HostMount); the agent
//! mounts a FUSE file system at its path (or finds the one it mounted before a snapshot or a
//! reconnect) and answers `Started(Stream)`. From then on the channel's stdout carries
//! [`Call`]s (guest → host) and its stdin carries [`Answer`]s (host → guest), each one
//! [`encode`]d as `len: u32 LE | postcard body`, under the link's usual credit.
//!
//! Every call names its file by a path relative to the mount's root, so the host keeps no state
//! per file: a guest restored from a snapshot, or a host that reconnected, carries on with the
//! calls it has. The host resolves each path beneath the root itself and never follows a symlink
//! (the guest's kernel resolves them in the guest), answers with an errno on failure, and is the
//! one that enforces read-only mounts.

use serde::{Deserialize, Serialize};

/// The most bytes one `Read` asks for or one `Write` carries.
pub const MAX_IO: u32 = 128 * 1024;
/// The most entries one `Readdir` answer holds; the guest asks again from where it ended.
pub const MAX_DIR_ENTRIES: u32 = 256;
/// The longest path a call may name, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// The longest message on either side: a full write or read plus its envelope.
pub const MAX_MESSAGE: usize = MAX_IO as usize + 64 * 1024;

/// One file call from the guest. `id` is the guest's, echoed in the [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub id: u64,
    pub op: Op,
}

/// Paths are relative to the mount's root, `/`-separated, without `.` or `..` components; the
/// root itself is the empty path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The attributes of `path`, not following a final symlink.
    Getattr {
        path: String,
    },
    /// Change what is `Some`; answered with the new attributes.
    Setattr {
        path: String,
        mode: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    },
    Readlink {
        path: String,
    },
    /// Up to [`MAX_DIR_ENTRIES`] entries of directory `path` after the first `offset` (`.` and
    /// `..` are not listed).
    Readdir {
        path: String,
        offset: u64,
    },
    /// A regular file, answered with its attributes. `exclusive`: fail if it exists.
    Create {
        path: String,
        mode: u32,
        exclusive: bool,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    /// A symlink at `path` whose text is `target` (any text: the guest resolves it).
    Symlink {
        path: String,
        target: String,
    },
    /// A hard link at `to` of the file at `from`.
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    /// `flags`: `RENAME_NOREPLACE` (1) and `RENAME_EXCHANGE` (2) as in renameat2.
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    /// At most `size` (≤ [`MAX_IO`]) bytes of regular file `path` from `offset`.
    Read {
        path: String,
        offset: u64,
        size: u32,
    },
    /// `data` (≤ [`MAX_IO`] bytes) into regular file `path` at `offset`, or at its end.
    Write {
        path: String,
        offset: u64,
        append: bool,
        #[serde(with = "serde_bytes_vec")]
        data: Vec<u8>,
    },
    /// Flush regular file `path` to stable storage.
    Fsync {
        path: String,
    },
    Statfs,
}

impl Op {
    /// Whether the call changes the directory (refused on a read-only mount).
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Op::Getattr { .. }
                | Op::Readlink { .. }
                | Op::Readdir { .. }
                | Op::Read { .. }
                | Op::Statfs
                | Op::Fsync { .. }
        )
    }
}

/// A new access or modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Timestamp),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// The host's answer to the [`Call`] with the same id: a result, or a Linux errno.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub id: u64,
    pub result: Result<Reply, i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// For Getattr, Setattr, Create, Mkdir, Symlink and Link.
    Attr(Attr),
    /// For Read: fewer bytes than asked only at the end of the file.
    Data(#[serde(with = "serde_bytes_vec")] Vec<u8>),
    /// For Readdir; `end`: nothing follows.
    Entries {
        entries: Vec<DirEntry>,
        end: bool,
    },
    /// For Readlink.
    Target(String),
    /// For Write: how many bytes were written.
    Written(u32),
    Statfs(Statfs),
    /// For Unlink, Rmdir, Rename and Fsync.
    Done,
}

/// What a call answers about a file. The host maps owners: the host directory's owner is shown
/// as the mount's guest user, everyone else as `nobody`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// The host's inode number (stable while the file exists).
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (`0o7777` at most).
    pub perm: u32,
    pub size: u64,
    pub blocks: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A device, fifo or socket: listed, never opened.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub ino: u64,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// A message that cannot be decoded: the peer broke the protocol and the mount's channel ends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("a host-mount message of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("a malformed host-mount message: {0}")]
    Malformed(String),
}

/// `len: u32 LE | body`, appended to `out`.
pub fn encode<T: Serialize>(message: &T, out: &mut Vec<u8>) {
    let body = postcard::to_stdvec(message).expect("host-mount messages serialise");
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Splits a byte stream into messages. Holds at most one partial message
/// ([`MAX_MESSAGE`] bytes plus the chunk being pushed).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `None` until one is in, or an error that ends the stream.
    #[allow(clippy::should_implement_trait)] // generic over the message type: not an Iterator
    pub fn next<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, DecodeError> {
        let Some(head) = self.buf.get(..4) else { return Ok(None) };
        let len = u32::from_le_bytes(head.try_into().expect("4 bytes")) as usize;
        if len > MAX_MESSAGE {
            return Err(DecodeError::TooLong(len));
        }
        let Some(body) = self.buf.get(4..4 + len) else { return Ok(None) };
        let message = postcard::from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        self.buf.drain(..4 + len);
        Ok(Some(message))
    }
}

/// `Vec<u8>` as one byte string rather than a sequence of numbers (postcard writes both the
/// same, but this keeps the intent visible and JSON debug output small).
mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        // Borrowed from the input: no length-driven preallocation.
        <&[u8]>::deserialize(d).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_any_split() {
        let calls = vec![
            Call { id: 1, op: Op::Getattr { path: String::new() } },
            Call { id: 2, op: Op::Write { path: "a/b".into(), offset: 7, append: false, data: vec![9; 1000] } },
            Call { id: 3, op: Op::Rename { from: "x".into(), to: "y".into(), flags: 1 } },
        ];
        let mut bytes = Vec::new();
        for c in &calls {
            encode(c, &mut bytes);
        }
        for cut in 0..bytes.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for part in [&bytes[..cut], &bytes[cut..]] {
                d.push(part);
                while let Some(c) = d.next::<Call>().unwrap() {
                    got.push(c);
                }
            }
            assert_eq!(got, calls);
        }
    }

    #[test]
    fn oversized_and_malformed_messages_are_errors() {
        let mut d = Decoder::default();
        d.push(&u32::MAX.to_le_bytes());
        assert_eq!(d.next::<Call>(), Err(DecodeError::TooLong(u32::MAX as usize)));
        let mut d = Decoder::default();
        d.push(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next::<Call>(), Err(DecodeError::Malformed(_))));
    }
}
