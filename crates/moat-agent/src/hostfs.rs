//! Host directory mounts: a FUSE file system per mount whose calls go to the host
//! (`moat_proto::hostfs`).
//!
//! A mount outlives the channel that serves it. When the host goes away (a daemon restart) or
//! the VM is restored from a snapshot (the agent's memory and the kernel's FUSE state come back
//! as they were), the guest's calls wait, like on an NFS hard mount, until the host opens a new
//! channel for the same path; that channel gets every call still waiting, sent again.
//!
//! Threads: the FUSE session runs on its own thread and never waits for the host (each reply
//! waits with its call in `shared::Shared`); the channel task sends calls and completes
//! replies as answers come.

mod calls;
mod fs;
mod handles;
mod inodes;
mod kernel;
mod reply;
mod shared;
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use moat_proto::hostfs::MAX_PATH;
use moat_proto::{AgentError, ErrorCode, Message, Started};
use tokio::sync::mpsc;

use self::kernel::MountError;
use self::shared::Shared;
use self::stream::End;
use crate::channel::{Ctl, Outbox};

/// Where a host directory may not be mounted: the guest's own kernel interfaces.
const RESERVED: [&str; 3] = ["/proc", "/sys", "/dev"];

/// One mount this agent made.
struct Mounted {
    shared: Arc<Shared>,
    readonly: bool,
}

/// The FUSE mounts of this guest, by path; they outlive connections.
#[derive(Default)]
pub struct HostMounts {
    mounts: Arc<Mutex<HashMap<String, Mounted>>>,
}

impl HostMounts {
    /// Serve the mount at `path` over channel `id` until the host closes it: mount it first, or
    /// take over the one mounted before and send its waiting calls again.
    pub async fn serve(&self, id: u32, path: String, readonly: bool, out: Outbox, rx: mpsc::UnboundedReceiver<Ctl>) {
        let mounted = match check_path(&path) {
            Ok(path) => {
                let (mounts, at) = (self.mounts.clone(), path.clone());
                tokio::task::spawn_blocking(move || mount_or_find(&mounts, &at, readonly))
                    .await
                    .unwrap_or_else(|e| Err(MountError::Thread(std::io::Error::other(e.to_string()))))
                    .map_err(|e| AgentError {
                        code: match e {
                            MountError::NoFuse(_) | MountError::NoModule(_) => ErrorCode::Unsupported,
                            _ => ErrorCode::Internal,
                        },
                        message: format!("Cannot mount the host directory at {path} in the sandbox: {e}."),
                    })
            }
            Err(e) => Err(e),
        };
        let shared = match mounted {
            Ok(shared) => shared,
            Err(e) => {
                out.send(id, Message::Error(e)).await;
                out.send(id, Message::Close).await;
                return;
            }
        };
        let (me, wake) = shared.attach();
        if out.send(id, Message::Started(Started::Stream)).await {
            match stream::run(id, &shared, me, wake, &out, rx).await {
                End::Closed => {}
                End::Over | End::Broken => {
                    out.send(id, Message::Close).await;
                }
            }
        }
        shared.detach(me);
    }
}

/// `path` as the mount's key: absolute, without `.`, `..` or empty components, not `/` and
/// not in the guest's kernel interfaces.
fn check_path(path: &str) -> Result<String, AgentError> {
    let bad = |why: &str| AgentError {
        code: ErrorCode::BadRequest,
        message: format!("Cannot mount a host directory at {path:?}: {why}."),
    };
    if path.contains('\0') {
        return Err(bad("the path holds a NUL byte"));
    }
    if path.len() > MAX_PATH {
        return Err(bad("the path is too long"));
    }
    let trimmed = path.trim_end_matches('/');
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute"));
    }
    if trimmed.is_empty() {
        return Err(bad("the sandbox's root cannot be replaced"));
    }
    if trimmed[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(bad("the path must not have empty, '.' or '..' components"));
    }
    if RESERVED.iter().any(|r| trimmed == *r || trimmed.starts_with(&format!("{r}/"))) {
        return Err(bad("/proc, /sys and /dev belong to the sandbox's kernel"));
    }
    Ok(trimmed.to_string())
}

/// The live mount at `path`, made read-only or writable as asked, or a new one.
///
/// A new mount is made under the lock of the table, so two channels never mount the same path
/// twice. Its mount point is resolved in the guest: a mount inside another host mount waits for
/// that one's host, so the host opens nested mounts parent first. Taking over an existing mount
/// (what a reconnect or a restore does, in any order) needs no lock while it resolves paths.
fn mount_or_find(
    mounts: &Mutex<HashMap<String, Mounted>>,
    path: &str,
    readonly: bool,
) -> Result<Arc<Shared>, MountError> {
    let lock = || mounts.lock().unwrap_or_else(PoisonError::into_inner);
    let existing = {
        let mut mounts = lock();
        match mounts.get(path) {
            Some(m) if !m.shared.ended() => Some((m.shared.clone(), m.readonly)),
            _ => {
                // Unmounted in the guest since, if it was there: mount again.
                mounts.remove(path);
                None
            }
        }
    };
    if let Some((shared, was_readonly)) = existing {
        if was_readonly != readonly {
            kernel::set_readonly(path, readonly)?;
            if let Some(m) = lock().get_mut(path) {
                m.readonly = readonly;
            }
        }
        return Ok(shared);
    }
    let mut mounts = lock();
    if let Some(m) = mounts.get(path).filter(|m| !m.shared.ended()) {
        return Ok(m.shared.clone()); // Another channel mounted it meanwhile.
    }
    let shared = start(path, readonly)?;
    mounts.insert(path.to_string(), Mounted { shared: shared.clone(), readonly });
    Ok(shared)
}

/// Mount a new FUSE file system at `path` and start its session thread.
fn start(path: &str, readonly: bool) -> Result<Arc<Shared>, MountError> {
    use std::os::fd::AsFd;

    let device = kernel::open_device()?;
    kernel::mount(path, device.as_fd(), readonly)?;
    let shared = Arc::new(Shared::default());
    let mut config = fuser::Config::default();
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(1);
    // The kernel queued its INIT request at mount time, so the handshake does not wait.
    let session = fuser::Session::from_fd(fs::HostFs::new(shared.clone()), device, fuser::SessionACL::All, config)
        .map_err(|e| {
            kernel::unmount(path);
            MountError::Session(e)
        })?;
    let ended = shared.clone();
    let at = path.to_string();
    std::thread::Builder::new()
        .name("moat-hostfs".into())
        .spawn(move || {
            if let Err(e) = session.run() {
                eprintln!("moat-agent: the host mount at {at} failed: {e}");
            }
            ended.end();
        })
        .map_err(|e| {
            kernel::unmount(path);
            MountError::Thread(e)
        })?;
    Ok(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_checked_before_anything_is_mounted() {
        assert_eq!(check_path("/src").unwrap(), "/src");
        assert_eq!(check_path("/work/src/").unwrap(), "/work/src");
        assert_eq!(check_path("/devices").unwrap(), "/devices", "only /dev itself is reserved");
        for bad in ["", "src", "/", "//", "/proc", "/sys/x", "/dev/shm", "/a/../proc", "/a//b", "/a/./b", "/a\0b"] {
            let e = check_path(bad).expect_err(bad);
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad:?}");
            assert!(e.message.ends_with('.'), "{}", e.message);
        }
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }
}
