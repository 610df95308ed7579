//! Each call runs with the rights of the shared directory's owner.
//!
//! A daemon running as root would otherwise give the guest root's rights over everything the
//! directory reaches: a hard link in it to `/etc/shadow`, a file of another user. The file
//! system credentials (fsuid, fsgid, supplementary groups) and capabilities are per thread in
//! Linux, so a call takes on the owner's on its own thread and gives them back when it ends,
//! leaving the daemon's other threads as they were.

use rustix::io::Errno;
use rustix::process::Gid;
use rustix::thread::{CapabilityFlags, CapabilitySets};

/// Whose rights a call runs with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Credentials {
    /// The daemon's own: it is not root, so they are no more than its user's.
    Own,
    /// The directory owner's, taken on by a daemon running as root.
    Owner { uid: u32, gid: u32 },
}

/// The credentials of a thread while it runs a call; dropping it gives the thread its own back.
#[must_use]
pub(crate) struct Assumed {
    saved: Option<Saved>,
}

struct Saved {
    caps: CapabilitySets,
    fsuid: u32,
    fsgid: u32,
    groups: Vec<Gid>,
}

impl Credentials {
    /// Take on these credentials on the calling thread until the result is dropped.
    pub(crate) fn assume(self) -> Result<Assumed, Errno> {
        let Credentials::Owner { uid, gid } = self else { return Ok(Assumed { saved: None }) };
        let caps = rustix::thread::capabilities(None)?;
        let groups = rustix::process::getgroups()?;
        let saved = Saved { caps, fsuid: fsuid(), fsgid: fsgid(), groups };
        // From here on, dropping the guard undoes whatever of the steps below took effect.
        let assumed = Assumed { saved: Some(saved) };
        // Only the owner's primary group: looking up its supplementary groups would mean NSS in
        // the daemon, and fewer groups can only grant less.
        rustix::thread::set_thread_groups(&[valid_gid(gid)?])?;
        if set_fsgid(gid) != gid || set_fsuid(uid) != uid {
            return Err(Errno::PERM);
        }
        // No capability outlives the switch: setfsuid drops only the file-system ones, and
        // others (CAP_SYS_RESOURCE: a full disk's reserved blocks) are not the owner's either.
        let sets = CapabilitySets { effective: CapabilityFlags::empty(), ..caps };
        rustix::thread::set_capabilities(None, sets)?;
        Ok(assumed)
    }
}

impl Drop for Assumed {
    fn drop(&mut self) {
        let Some(saved) = self.saved.take() else { return };
        // Capabilities first: they are what allows the rest.
        let caps = rustix::thread::set_capabilities(None, saved.caps);
        let ids = set_fsuid(saved.fsuid) == saved.fsuid && set_fsgid(saved.fsgid) == saved.fsgid;
        let groups = rustix::thread::set_thread_groups(&saved.groups);
        if caps.is_err() || !ids || groups.is_err() {
            tracing::error!(?caps, ids, ?groups, "a host-mount thread could not take back the daemon's credentials");
        }
    }
}

/// `gid` as a group id; -1 is none (to Linux, "leave unchanged").
fn valid_gid(gid: u32) -> Result<Gid, Errno> {
    if gid == u32::MAX {
        return Err(Errno::PERM);
    }
    // SAFETY: `Gid` only needs its value not to be -1, checked above.
    Ok(unsafe { Gid::from_raw(gid) })
}

/// `setfsuid`, answering the fsuid in effect afterwards.
fn set_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid changes the calling thread's credentials and touches no memory.
    unsafe { libc::setfsuid(uid) };
    fsuid()
}

fn set_fsgid(gid: u32) -> u32 {
    // SAFETY: as for setfsuid.
    unsafe { libc::setfsgid(gid) };
    fsgid()
}

/// The thread's fsuid: setfsuid with an invalid id changes nothing and answers the current one.
fn fsuid() -> u32 {
    // SAFETY: as for setfsuid; -1 is never a valid id, so nothing changes.
    unsafe { libc::setfsuid(u32::MAX) as u32 }
}

fn fsgid() -> u32 {
    // SAFETY: as for fsuid.
    unsafe { libc::setfsgid(u32::MAX) as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_its_credentials_back() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to change credentials");
            return;
        }
        let before =
            (fsuid(), fsgid(), rustix::process::getgroups().unwrap(), rustix::thread::capabilities(None).unwrap());
        let (go, wait) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || {
            wait.recv().unwrap();
            fsuid()
        });
        {
            let _owner = Credentials::Owner { uid: 65534, gid: 65534 }.assume().unwrap();
            assert_eq!((fsuid(), fsgid()), (65534, 65534));
            assert_eq!(rustix::process::getgroups().unwrap(), vec![valid_gid(65534).unwrap()]);
            assert!(rustix::thread::capabilities(None).unwrap().effective.is_empty());
            // A thread that was already running keeps the daemon's (a new one would inherit
            // the creator's).
            go.send(()).unwrap();
            assert_eq!(other.join().unwrap(), 0);
        }
        let after =
            (fsuid(), fsgid(), rustix::process::getgroups().unwrap(), rustix::thread::capabilities(None).unwrap());
        assert_eq!(before, after);
    }
}
