//! The jail every QEMU runs in. Firecracker's jailer is the model: a uid of its own, its own
//! mount, PID, IPC, UTS and network namespaces, and a root that holds only what QEMU needs.
//!
//! Under TCG QEMU itself is the only boundary between the guest and the host, so what an escape
//! from QEMU gets must be as little as possible:
//! - **a uid that owns nothing else** (root daemons): each VM gets a uid from a range no user
//!   has, with the same number as its gid, and one shared group that the read-only files all
//!   VMs use (image bases, snapshot layers and RAM, the initramfs) are readable by;
//! - **a root of its own**: a small read-only tmpfs with `/usr` (QEMU and its libraries), four
//!   device nodes, and exactly the VM's files bound in at their host paths (so the command line
//!   is the same in and out of the jail): the kernel, the initramfs, the disk and its backing
//!   chain, the RAM file, its console log and pidfile, and a directory for its sockets. The
//!   daemon's state, secrets, other sandboxes and the host's files are not there at all;
//! - **namespaces**: PID (QEMU is PID 1 of its own: it cannot see or signal any other process),
//!   IPC, UTS, network (no network at all: its NIC and agent are unix sockets, which are files)
//!   and mount;
//! - no capabilities, `no_new_privs`, and QEMU's own seccomp filter (`-sandbox on`).
//!
//! The jail is set up by a small helper: the moat binary started as `moat __jail SPEC QEMU ARGS…`
//! ([`JAIL_ARG`], [`main`]). It enters the namespaces, forks QEMU as PID 1 of the new PID
//! namespace, prints QEMU's host pid on stdout, and stays as its parent: it waits for QEMU and
//! exits as QEMU did, and QEMU dies with it (`PR_SET_PDEATHSIG`). A separate program rather than
//! a `pre_exec` hook, because a process only enters a new PID namespace by being forked into it,
//! and because the setup (mounts, error messages) is ordinary single-threaded code there.
//!
//! A daemon that is not root cannot give QEMU another uid: it uses a user namespace that maps its
//! own ids ([`JailIds::Own`]), and keeps every other layer.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::command::{Memory, VmConfig};

mod helper;

pub use helper::main;

/// The first argument that makes the moat binary the jail helper.
pub const JAIL_ARG: &str = "__jail";

/// Where jailed QEMUs' uids come from by default: 65536 ids at 0x6d6f0000 ("mo"), inside the
/// range systemd leaves to containers and far from users' and subordinate ids.
pub const DEFAULT_UID_BASE: u32 = 0x6d6f_0000;
pub const DEFAULT_UID_COUNT: u32 = 65536;

/// How QEMUs are jailed on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// The program that sets the jail up: the moat binary (run as `HELPER __jail …`).
    pub helper: PathBuf,
    pub ids: JailIds,
    /// The only directories a disk's backing files may be in (the image store, the snapshot and
    /// template directories). A QEMU that escaped could rewrite its own disk's header to name any
    /// host file as its backing file; such a disk is refused, never bound into a jail.
    pub read_roots: Vec<PathBuf>,
}

/// Which ids a jailed QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailIds {
    /// A root daemon: QEMU runs as a uid (and gid) of its own from `base + 1 .. base + count`,
    /// with the supplementary group `base`, which the files QEMUs share read-only belong to.
    Range { base: u32, count: u32 },
    /// A daemon without root: a user namespace maps the daemon's own ids, so QEMU keeps the
    /// daemon's uid on the host (and every other layer of the jail).
    Own,
}

impl JailIds {
    /// The group of the files all jailed QEMUs read, when there is one.
    pub fn shared_gid(&self) -> Option<u32> {
        match self {
            JailIds::Range { base, .. } => Some(*base),
            JailIds::Own => None,
        }
    }
}

/// Why a QEMU could not be jailed. Messages are sentences.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the disk {} names {} as its backing file, which is outside the image and snapshot stores", disk.display(), backing.display())]
    UntrustedBacking { disk: PathBuf, backing: PathBuf },
    #[error("the disk {} names {} as its backing file, but moat made it on {}", disk.display(), backing.display(), noted.display())]
    BackingChanged { disk: PathBuf, backing: PathBuf, noted: PathBuf },
    #[error("cannot read the disk header of {}: {reason}", path.display())]
    BadDisk { path: PathBuf, reason: String },
    #[error("all {0} uids of the jail range are in use")]
    NoFreeUid(u32),
    #[error("{} is not readable by jailed QEMUs (mode {mode:o}, outside moat's home)", path.display())]
    Unreadable { path: PathBuf, mode: u32 },
    #[error("the saved RAM file {} was written to after it was saved", path.display())]
    Tampered { path: PathBuf },
    #[error("cannot prepare {} for the jail", path.display())]
    Prepare { path: PathBuf, source: std::io::Error },
}

impl moat_hint::Hint for JailError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        Some(match self {
            JailError::UntrustedBacking { .. } | JailError::BackingChanged { .. } => {
                "the disk was changed behind moat's back; remove the sandbox (`moat rm -f`) and create it again".into()
            }
            JailError::BadDisk { .. } => "the disk is damaged; remove the sandbox and create it again".into(),
            JailError::Tampered { .. } => {
                "a sandbox restored from it may have changed it; remove the snapshot (templates are made again)".into()
            }
            JailError::NoFreeUid(_) => "stop some sandboxes, or widen the range (`jail.uid_count`)".into(),
            JailError::Unreadable { .. } => {
                "make it world-readable (`chmod o+r`), or point moat at a copy that is".into()
            }
            JailError::Prepare { .. } => return None,
        })
    }
}

/// What the helper needs to build one jail, passed to it as JSON.
/// uid, gid and supplementary group of a jailed process.
pub(crate) type SpecIds = (u32, u32, u32);

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Spec {
    /// An empty directory the jail's root (a tmpfs) is mounted on, in the jail's own mount
    /// namespace only.
    pub root: PathBuf,
    pub hostname: String,
    /// uid, gid and supplementary group to run QEMU as; `None`: a user namespace with the
    /// helper's own ids.
    pub ids: Option<SpecIds>,
    /// Host paths bound into the jail at the same path.
    pub binds: Vec<Bind>,
    /// Symbolic links to recreate in the jail (`/lib` → `usr/lib` on merged-/usr hosts).
    pub links: Vec<(PathBuf, PathBuf)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// Files and directories in the run directory that QEMU creates itself are created there
/// beforehand: QEMU gets no write access to the run directory, where the daemon keeps its own
/// files. Its sockets go into [`SOCKET_DIR`], the one directory it may write.
pub const SOCKET_DIR: &str = "sock";
/// The mount point of the jail's root, an empty directory in the run directory.
const ROOT_DIR: &str = "jail";

/// The uids this process has handed to QEMUs that still run, so two VMs started at the same time
/// never get the same one. QEMUs of earlier daemons are found through `/proc`.
static TAKEN: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// A uid given to one VM; given back when dropped.
#[derive(Debug)]
pub(crate) struct UidLease(pub u32);

impl Drop for UidLease {
    fn drop(&mut self) {
        if let Some(taken) = TAKEN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            taken.remove(&self.0);
        }
    }
}

/// A uid of the range that no process has and no other VM of this process was given.
fn lease_uid(base: u32, count: u32) -> Result<UidLease, JailError> {
    let running: HashSet<u32> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().as_bytes().iter().all(u8::is_ascii_digit))
                .filter_map(|e| e.metadata().ok().map(|m| m.uid()))
                .collect()
        })
        .unwrap_or_default();
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    let slots = count.saturating_sub(1).max(1);
    let start = rand_u32() % slots;
    for i in 0..slots {
        let uid = base + 1 + (start + i) % slots;
        if !taken.contains(&uid) && !running.contains(&uid) {
            taken.insert(uid);
            return Ok(UidLease(uid));
        }
    }
    Err(JailError::NoFreeUid(slots))
}

/// A uid for one jailed process (none for [`JailIds::Own`]) and the spec's `ids` with it: uid,
/// gid (the same number) and the shared group.
fn lease_ids(ids: JailIds) -> Result<(Option<UidLease>, Option<SpecIds>), JailError> {
    let lease = match ids {
        JailIds::Range { base, count } => Some(lease_uid(base, count)?),
        JailIds::Own => None,
    };
    let spec_ids = lease.as_ref().zip(ids.shared_gid()).map(|(l, shared)| (l.0, l.0, shared));
    Ok((lease, spec_ids))
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`. Should it fail, a zero start
    // is as good as any.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u32::from_ne_bytes(b)
}

/// Everything the helper needs for `cfg`'s QEMU, with the VM's files made accessible to the
/// uid it will run as. Returns the spec and the uid lease (none for [`JailIds::Own`]).
pub(crate) fn prepare(cfg: &VmConfig, jail: &Jail) -> Result<(Spec, Option<UidLease>), JailError> {
    let (lease, ids) = lease_ids(jail.ids)?;
    let owner = ids.map(|(uid, gid, _)| (uid, gid));
    let shared = jail.ids.shared_gid();
    let mut binds = Vec::new();
    let writable = |path: PathBuf, binds: &mut Vec<Bind>| -> Result<(), JailError> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(prep(&path))?;
        }
        binds.push(Bind { path, writable: true });
        Ok(())
    };
    // The run directory stays the daemon's; QEMU writes only these, made for it here.
    let root = cfg.run_dir.join(ROOT_DIR);
    std::fs::create_dir_all(&root).map_err(prep(&root))?;
    let sockets = cfg.run_dir.join(SOCKET_DIR);
    std::fs::create_dir_all(&sockets).map_err(prep(&sockets))?;
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700)).map_err(prep(&sockets))?;
    writable(sockets, &mut binds)?;
    for file in [cfg.console_log(), cfg.pid_file()] {
        create_private_file(&file).map_err(prep(&file))?;
        writable(file, &mut binds)?;
    }
    // A restore starts no kernel (crate::command), so neither kernel nor initramfs is bound in.
    let mut shared_reads = if cfg.incoming { Vec::new() } else { vec![cfg.initrd.clone()] };
    if let Some(disk) = &cfg.root_disk {
        shared_reads.extend(check_disk(disk, &jail.read_roots)?);
        writable(disk.clone(), &mut binds)?;
    }
    match &cfg.memory {
        Some(Memory::Own(mem)) => {
            if !mem.exists() {
                create_private_file(mem).map_err(prep(mem))?;
            }
            writable(mem.clone(), &mut binds)?;
        }
        Some(Memory::Snapshot(mem)) => {
            if let Some(gid) = shared {
                check_seal(mem, gid)?;
            }
            binds.push(Bind { path: mem.clone(), writable: true });
        }
        None => {}
    }
    for path in shared_reads {
        if let Some(gid) = shared {
            share_read_only(&path, gid).map_err(prep(&path))?;
        }
        binds.push(Bind { path, writable: false });
    }
    if !cfg.incoming {
        // The kernel is the host's (/boot), not moat's to change: it must be readable as it is.
        let meta = std::fs::metadata(&cfg.kernel).map_err(prep(&cfg.kernel))?;
        if shared.is_some() && meta.mode() & 0o004 == 0 {
            return Err(JailError::Unreadable { path: cfg.kernel.clone(), mode: meta.mode() & 0o7777 });
        }
        binds.push(Bind { path: cfg.kernel.clone(), writable: false });
    }
    if !cfg.qemu.starts_with("/usr/") {
        binds.push(Bind { path: cfg.qemu.clone(), writable: false });
    }
    for dev in ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"] {
        binds.push(Bind { path: dev.into(), writable: true });
    }
    if cfg.accel == crate::Accel::Kvm {
        binds.push(Bind { path: "/dev/kvm".into(), writable: true });
    }
    let links = system_dirs(&mut binds);
    let spec = Spec { root, hostname: format!("moat-{}", cfg.name), ids, binds, links };
    Ok((spec, lease))
}

/// `/usr`, and the top-level library and program directories beside it: links into `/usr` on
/// merged-/usr hosts (returned, to be made again in the jail), else bound read-only.
fn system_dirs(binds: &mut Vec<Bind>) -> Vec<(PathBuf, PathBuf)> {
    binds.push(Bind { path: "/usr".into(), writable: false });
    let mut links = Vec::new();
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        match std::fs::read_link(top) {
            Ok(target) => links.push((PathBuf::from(top), target)),
            Err(_) if Path::new(top).is_dir() => binds.push(Bind { path: top.into(), writable: false }),
            Err(_) => {}
        }
    }
    links
}

/// Build a jail the way [`crate::Vm::spawn`] does, around `/usr/bin/true` instead of QEMU, in
/// the empty directory `scratch`: `Ok` when this host can jail QEMU, else what the helper said.
pub fn probe(jail: &Jail, scratch: &Path) -> Result<(), String> {
    let (_lease, ids) = lease_ids(jail.ids).map_err(|e| e.to_string())?;
    let mut binds = vec![Bind { path: "/dev/null".into(), writable: true }];
    let links = system_dirs(&mut binds);
    let spec = Spec { root: scratch.to_path_buf(), hostname: "moat-probe".into(), ids, binds, links };
    let spec = serde_json::to_string(&spec).expect("a jail spec serialises");
    let out = std::process::Command::new(&jail.helper)
        .arg(JAIL_ARG)
        .arg(spec)
        .arg("/usr/bin/true")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", jail.helper.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(said.lines().last().unwrap_or("the jail helper failed without saying why").trim().to_string())
}

fn prep(path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Prepare { path, source }
}

/// An empty file only its owner may read and write (replacing any earlier one).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map(drop)
}

/// Give a file moat keeps for several VMs to the jails' shared group, readable and nothing more.
fn share_read_only(path: &Path, gid: u32) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.gid() != gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    let mode = (meta.mode() & 0o700) | 0o040;
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Connect to one of a VM's sockets in its socket directory (`sock/`). A jailed QEMU may write that
/// directory, so it could swap a socket for a symbolic link to any socket of the host (the
/// daemon's own API, say): the last component is opened without following links, checked to be
/// a socket, and connected to through that very descriptor.
pub async fn connect_vm_socket(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    use rustix::fs::{FileType, Mode, OFlags};
    let fd = rustix::fs::open(path, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::Socket {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    tokio::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await
}

/// Where the seal of a snapshot's RAM file is kept: beside it, the daemon's.
fn seal_path(mem: &Path) -> PathBuf {
    let mut name = mem.as_os_str().to_owned();
    name.push(".seal");
    PathBuf::from(name)
}

/// What identifies one unchanged state of a file: any write to it, or any change of its owner
/// or mode, moves its ctime, which no one can set back.
fn seal_of(meta: &std::fs::Metadata) -> String {
    format!("{} {} {} {}.{:09}\n", meta.dev(), meta.ino(), meta.len(), meta.ctime(), meta.ctime_nsec())
}

/// Make a snapshot's RAM file usable by jailed QEMUs and seal it.
///
/// QEMU 7.2 opens the RAM file it restores from read-write even though it maps it private, so
/// every jailed QEMU restored from the file could write to it: the file belongs to the jails'
/// shared group, read-write. What protects the snapshot (and every later sandbox restored from
/// it) from a QEMU that escaped and wrote to it is the seal taken here: its ctime, checked
/// before each restore (when the jail is prepared), which any write changes for good.
/// `shared_gid` is [`JailIds::shared_gid`]; the file goes back to the daemon's own uid (a helper
/// VM may have written it).
pub fn seal_snapshot_ram(mem: &Path, shared_gid: Option<u32>) -> std::io::Result<()> {
    if let Some(gid) = shared_gid {
        std::os::unix::fs::chown(mem, Some(rustix::process::geteuid().as_raw()), Some(gid))?;
        std::fs::set_permissions(mem, std::fs::Permissions::from_mode(0o660))?;
    }
    let seal = seal_of(&std::fs::metadata(mem)?);
    let path = seal_path(mem);
    std::fs::write(&path, seal)
}

/// Refuse a snapshot RAM file that changed since [`seal_snapshot_ram`]. A file without a seal
/// (saved by a moat before jails) is sealed now.
fn check_seal(mem: &Path, gid: u32) -> Result<(), JailError> {
    let path = seal_path(mem);
    match std::fs::read_to_string(&path) {
        Ok(seal) => {
            let now = std::fs::metadata(mem).map_err(prep(mem))?;
            if seal != seal_of(&now) {
                return Err(JailError::Tampered { path: mem.to_path_buf() });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => seal_snapshot_ram(mem, Some(gid)).map_err(prep(mem)),
        Err(e) => Err(prep(&path)(e)),
    }
}

/// Where moat notes the backing file it made a disk on: beside the disk, in the run directory,
/// which only the daemon may write.
fn backing_note(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_owned();
    name.push(".backing");
    PathBuf::from(name)
}

/// Note the backing file of `disk`, a qcow2 file moat has just made (so its header is still
/// moat's): later, a header that names anything else is refused ([`check_disk`]).
pub fn note_backing(disk: &Path) -> Result<(), JailError> {
    let note = backing_note(disk);
    let backing = qcow2_backing(disk)?.unwrap_or_default();
    std::fs::write(&note, backing.as_os_str().as_bytes()).map_err(prep(&note))
}

/// The backing files below `disk`, a disk a jailed QEMU may have written to: its own backing
/// file must be the one moat made it on ([`note_backing`]; disks from before the note only need
/// to be in `roots`), and each file of the chain a regular file inside `roots`. Used before a
/// jail is built and before a disk is copied into a snapshot, where `qemu-img` would otherwise
/// read whatever the header names, as root.
pub fn check_disk(disk: &Path, roots: &[PathBuf]) -> Result<Vec<PathBuf>, JailError> {
    if let Ok(noted) = std::fs::read(backing_note(disk)) {
        let named = qcow2_backing(disk)?.unwrap_or_default();
        if named.as_os_str().as_bytes() != noted.as_slice() {
            return Err(JailError::BackingChanged {
                disk: disk.to_path_buf(),
                backing: named,
                noted: PathBuf::from(OsStr::from_bytes(&noted)),
            });
        }
    }
    backing_chain(disk, roots)
}

/// The backing files below `disk`, each checked to be a regular file inside `roots`.
fn backing_chain(disk: &Path, roots: &[PathBuf]) -> Result<Vec<PathBuf>, JailError> {
    /// moat's chains are two deep (overlay, saved layer, base); anything deeper was not made by it.
    const MAX_DEPTH: usize = 8;
    let mut chain = Vec::new();
    let mut current = disk.to_path_buf();
    while let Some(backing) = qcow2_backing(&current)? {
        let backing = if backing.is_absolute() { backing } else { current.with_file_name(backing) };
        let real = std::fs::canonicalize(&backing).ok();
        let trusted = real.as_ref().is_some_and(|r| {
            r == &backing
                && roots.iter().any(|root| r.starts_with(root))
                && std::fs::metadata(r).is_ok_and(|m| m.is_file())
        });
        if !trusted || chain.len() >= MAX_DEPTH {
            return Err(JailError::UntrustedBacking { disk: current, backing });
        }
        chain.push(backing.clone());
        current = backing;
    }
    Ok(chain)
}

/// The backing file a qcow2 disk's header names, if any; raw files have none. Reads at most a
/// few KiB: the header is untrusted (QEMU writes the file).
fn qcow2_backing(path: &Path) -> Result<Option<PathBuf>, JailError> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |reason: String| JailError::BadDisk { path: path.to_path_buf(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut header = [0u8; 20];
    if file.read_exact(&mut header).is_err() || &header[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    // qcow2 limits the name to 1023 bytes.
    if len > 1023 {
        return Err(bad(format!("its backing file name is {len} bytes long")));
    }
    let mut name = vec![0u8; len];
    file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut name)).map_err(|e| bad(e.to_string()))?;
    if name.contains(&0) {
        return Err(bad("its backing file name has a NUL byte".into()));
    }
    Ok(Some(PathBuf::from(OsStr::from_bytes(&name))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2(dir: &Path, name: &str, backing: Option<&Path>) -> PathBuf {
        let path = dir.join(name);
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some(b) = backing {
            cmd.args(["-F", "qcow2", "-b"]).arg(b);
        }
        let ok = cmd.arg(&path).arg("1M").status().expect("qemu-img runs (apt-get install qemu-utils)").success();
        assert!(ok);
        path
    }

    #[test]
    fn a_backing_chain_is_followed_only_inside_the_stores() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("images");
        std::fs::create_dir(&store).unwrap();
        let store = std::fs::canonicalize(&store).unwrap();
        let base = qcow2(&store, "base.qcow2", None);
        let layer = qcow2(&store, "layer.qcow2", Some(&base));
        let top = qcow2(tmp.path(), "top.qcow2", Some(&layer));
        assert_eq!(qcow2_backing(&base).unwrap(), None);
        assert_eq!(backing_chain(&top, std::slice::from_ref(&store)).unwrap(), [layer.clone(), base.clone()]);

        // A header rewritten to name a host file outside the stores is refused.
        let secret = tmp.path().join("state.db");
        std::fs::write(&secret, b"secrets").unwrap();
        let evil = qcow2(tmp.path(), "evil.qcow2", Some(&base));
        rewrite_backing(&evil, &secret);
        let err = backing_chain(&evil, std::slice::from_ref(&store)).unwrap_err();
        assert!(matches!(err, JailError::UntrustedBacking { .. }), "{err}");
        // So is a symbolic link inside the store that points out of it.
        let link = store.join("link.qcow2");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let via_link = qcow2(tmp.path(), "via-link.qcow2", Some(&base));
        rewrite_backing(&via_link, &link);
        assert!(backing_chain(&via_link, std::slice::from_ref(&store)).is_err());
        // And a raw file has no chain at all.
        assert_eq!(backing_chain(&secret, &[store]).unwrap(), Vec::<PathBuf>::new());
    }

    /// Point a qcow2 header at `to` without looking at it, as a hostile QEMU could.
    fn rewrite_backing(disk: &Path, to: &Path) {
        let ok = std::process::Command::new("qemu-img")
            .args(["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(to)
            .arg(disk)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    #[test]
    fn a_header_with_an_oversized_name_is_an_error_not_a_huge_read() {
        use std::io::{Seek, SeekFrom, Write};
        let tmp = tempfile::tempdir().unwrap();
        let disk = qcow2(tmp.path(), "d.qcow2", None);
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.seek(SeekFrom::Start(8)).unwrap();
        f.write_all(&512u64.to_be_bytes()).unwrap();
        f.write_all(&u32::MAX.to_be_bytes()).unwrap();
        drop(f);
        let err = qcow2_backing(&disk).unwrap_err();
        assert!(err.to_string().contains("bytes long"), "{err}");
    }

    #[test]
    fn leased_uids_are_distinct_and_given_back() {
        // A range of its own, so VMs other tests start cannot take these.
        const BASE: u32 = 0x7a00_0000;
        let a = lease_uid(BASE, 3).unwrap();
        let b = lease_uid(BASE, 3).unwrap();
        assert_ne!(a.0, b.0);
        assert!((BASE + 1..BASE + 3).contains(&a.0));
        assert!(matches!(lease_uid(BASE, 3), Err(JailError::NoFreeUid(2))));
        drop(a);
        lease_uid(BASE, 3).expect("a uid given back is free again");
    }
}
