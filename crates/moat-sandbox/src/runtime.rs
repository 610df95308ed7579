//! The prepared host: where state lives, which QEMU, kernel, initramfs and accelerator to use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_image::{AgentModules, ImageStore, Kernel};
use moat_vmm::{AccelChoice, AccelDecision, CgroupHost, Jail, JailIds};

use crate::SandboxError;

/// Settings that decide how sandboxes are built on this host. Every path can be overridden so tests
/// and unusual hosts need no special casing.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `$MOAT_HOME`: images, caches, per-sandbox run directories.
    pub home: PathBuf,
    pub qemu: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    pub accel: AccelChoice,
    /// How long a KVM probe guest may take to boot before KVM is judged unusable.
    pub probe_timeout: Duration,
    /// Run each QEMU in a jail (`MOAT_JAIL=off` turns it off, for comparison and for hosts that
    /// cannot have one).
    pub jail: bool,
}

impl RuntimeConfig {
    /// The default home: `/var/lib/moat` for root, else `$XDG_DATA_HOME/moat` or `~/.local/share/moat`.
    pub fn default_home() -> PathBuf {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/moat");
        }
        if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("moat");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".local/share/moat")
    }

    /// Defaults overridden by the `MOAT_*` environment variables.
    pub fn from_env() -> Result<RuntimeConfig, SandboxError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let accel = match std::env::var("MOAT_ACCEL") {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e| SandboxError::Config(format!("MOAT_ACCEL: {e}")))?,
            _ => AccelChoice::Auto,
        };
        Ok(RuntimeConfig {
            home: var("MOAT_HOME").unwrap_or_else(Self::default_home),
            qemu: var("MOAT_QEMU"),
            kernel: var("MOAT_KERNEL"),
            agent: var("MOAT_AGENT"),
            accel,
            probe_timeout: Duration::from_secs(8),
            jail: match std::env::var("MOAT_JAIL").as_deref() {
                Ok("off") => false,
                Ok("on") | Ok("") | Err(_) => true,
                Ok(other) => {
                    return Err(SandboxError::Config(format!("MOAT_JAIL: {other:?} is neither `on` nor `off`")))
                }
            },
        })
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.home.join("cache")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.home.join("run")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.home.join("images")
    }

    /// Saved machines: snapshots and templates.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.home.join("snapshots")
    }

    /// Named volumes: one sparse ext4 file `<id>.img` each.
    pub fn volumes_dir(&self) -> PathBuf {
        self.home.join("volumes")
    }
}

/// Everything needed to boot sandboxes, resolved once.
pub struct Runtime {
    pub config: RuntimeConfig,
    pub qemu: PathBuf,
    pub qemu_version: String,
    pub kernel: Kernel,
    pub initrd: PathBuf,
    pub accel: AccelDecision,
    pub images: ImageStore,
    /// How QEMUs are jailed; `None` when `jail` is off.
    pub jail: Option<Jail>,
    /// Where each QEMU's cgroup goes; `None` when this host offers no usable controller (then
    /// nothing limits a sandbox beyond its RAM and vCPUs, and `moat doctor` says why).
    pub cgroups: Option<CgroupHost>,
}

/// What the runtime needs from the host, each looked for on its own: [`Runtime::prepare`] stops
/// at the first that is missing, `moat doctor` reports them all.
pub struct HostParts {
    /// QEMU and its version.
    pub qemu: Result<(PathBuf, String), SandboxError>,
    pub kernel: Result<Kernel, SandboxError>,
    /// The modules the agent loads, from the kernel's module tree; not looked for without a
    /// kernel.
    pub modules: Option<Result<AgentModules, SandboxError>>,
    pub agent: Result<PathBuf, SandboxError>,
}

impl HostParts {
    pub fn find(config: &RuntimeConfig) -> HostParts {
        let qemu = moat_vmm::find_qemu(config.qemu.as_deref())
            .and_then(|q| moat_vmm::qemu_version(&q).map(|v| (q, v)))
            .map_err(SandboxError::from);
        let kernel = moat_image::find_kernel(config.kernel.as_deref()).map_err(SandboxError::from);
        let modules = kernel.as_ref().ok().map(|k| moat_image::resolve_agent_modules(k).map_err(SandboxError::from));
        let agent = moat_image::find_agent(config.agent.as_deref()).map_err(SandboxError::from);
        HostParts { qemu, kernel, modules, agent }
    }
}

/// The initramfs (built, or reused from the cache) and the accelerator (a cached probe; a KVM
/// probe boots a guest) for these parts.
pub async fn initrd_and_accel(
    config: &RuntimeConfig,
    qemu: &Path,
    kernel: &Kernel,
    agent: &Path,
    modules: &AgentModules,
) -> Result<(PathBuf, AccelDecision), SandboxError> {
    create_private_dir(&config.cache_dir())?;
    let initrd = moat_image::build_initramfs(&config.cache_dir(), kernel, agent, modules)?;
    let accel = moat_vmm::choose_accel(
        config.accel,
        qemu,
        &kernel.path,
        &initrd,
        &config.cache_dir().join("accel.json"),
        config.probe_timeout,
    )
    .await?;
    Ok((initrd, accel))
}

impl Runtime {
    /// Find QEMU, the kernel and the agent, build (or reuse) the initramfs and decide the accelerator.
    pub async fn prepare(config: RuntimeConfig) -> Result<Runtime, SandboxError> {
        for dir in [&config.home, &config.cache_dir(), &config.run_dir()] {
            create_private_dir(dir)?;
        }
        let parts = HostParts::find(&config);
        let (qemu, qemu_version) = parts.qemu?;
        let kernel = parts.kernel?;
        let agent = parts.agent?;
        let modules = parts.modules.expect("modules are looked for whenever the kernel is found")?;
        let (initrd, accel) = initrd_and_accel(&config, &qemu, &kernel, &agent, &modules).await?;
        let images = ImageStore::open(&config.images_dir())?;
        let jail = if config.jail { Some(jail_for(&config)?) } else { None };
        let cgroups = usable_cgroups().map(|host| host.scoped(&home_tag(&config.home)));
        Ok(Runtime { config, qemu, qemu_version, kernel, initrd, accel, images, jail, cgroups })
    }
}

/// The jail for this host: a uid of its own per QEMU for a root daemon, a user namespace with
/// the daemon's ids otherwise.
pub fn jail_for(config: &RuntimeConfig) -> Result<Jail, SandboxError> {
    let ids = jail_ids();
    // Canonical, as backing file names are; a home not made yet (doctor) is taken as it is.
    let home = std::fs::canonicalize(&config.home).unwrap_or_else(|_| config.home.clone());
    let read_roots = vec![home.join("images"), home.join("snapshots")];
    Ok(Jail { helper: find_jail_helper()?, ids, read_roots })
}

/// A short tag of the home, which names its sandboxes' cgroups apart from other homes'.
fn home_tag(home: &Path) -> String {
    use sha2::Digest;
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    let hash = sha2::Sha256::digest(home.as_os_str().as_encoded_bytes());
    hash[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// This host's cgroups, when at least one controller can limit sandboxes.
fn usable_cgroups() -> Option<CgroupHost> {
    match CgroupHost::detect() {
        Ok(host) if host.controllers().iter().any(|(_, usable)| usable.is_ok()) => Some(host),
        Ok(_) => {
            tracing::warn!("no cgroup controller can limit sandboxes on this host; `moat doctor` says why");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cgroups cannot be used; sandboxes run without limits");
            None
        }
    }
}

/// The ids jailed QEMUs get from a daemon running as this user.
pub fn jail_ids() -> JailIds {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        JailIds::Range { base: moat_vmm::DEFAULT_UID_BASE, count: moat_vmm::DEFAULT_UID_COUNT }
    } else {
        JailIds::Own
    }
}

/// The moat binary, which is also the jail helper: the running program when it is moat, else
/// `moat` beside it or one directory up (tests and benchmarks run from `target/<profile>/deps`
/// and `target/<profile>`).
fn find_jail_helper() -> Result<PathBuf, SandboxError> {
    let exe = std::env::current_exe()
        .map_err(|e| SandboxError::Io { what: "locating the running binary".into(), source: e })?;
    if exe.file_name().is_some_and(|n| n == "moat") {
        return Ok(exe);
    }
    let dir = exe.parent().unwrap_or(Path::new("/"));
    [dir.join("moat"), dir.join("../moat")].into_iter().find(|p| p.is_file()).ok_or_else(|| {
        SandboxError::Config(format!(
            "the moat binary, which jails QEMU, is not next to {}; build it (`cargo build --release -p moat`) or \
                 set MOAT_JAIL=off",
            exe.display()
        ))
    })
}

/// Create a directory (and parents) readable only by its owner.
pub fn create_private_dir(dir: &Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| SandboxError::Io { what: format!("creating {}", dir.display()), source: e })
}

/// A path under `$MOAT_HOME` that others could read or enter, with the mode it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loosened {
    pub path: PathBuf,
    pub mode: u32,
}

impl Loosened {
    /// `PATH (was MODE)` for the first few, and how many more there were.
    pub fn list(all: &[Loosened]) -> String {
        const SHOWN: usize = 10;
        let mut list: Vec<String> =
            all.iter().take(SHOWN).map(|l| format!("{} (was {:o})", l.path.display(), l.mode)).collect();
        if all.len() > SHOWN {
            list.push(format!("and {} more", all.len() - SHOWN));
        }
        list.join(", ")
    }
}

/// Why `$MOAT_HOME` could not be made private.
#[derive(Debug, thiserror::Error)]
#[error("cannot take group and other access away from {}: {reason}", path.display())]
pub struct HomeAccessError {
    pub path: PathBuf,
    reason: std::io::Error,
}

impl moat_hint::Hint for HomeAccessError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        Some(
            "the daemon's user must own everything under its home: `chown -R` it to that user, or remove what is not \
             theirs"
                .into(),
        )
    }
}

/// Take every group and other permission away from the existing `home` and everything under it
/// (guest memory and disks are in there), and say what was open. `home_mode` is what the home
/// itself may keep: 0o710 lets a socket group reach the socket and nothing else. Files of the
/// jails' `shared_gid` keep their group's read and write bits: jailed QEMUs use them (image
/// bases, snapshot RAM; see `moat_vmm::Jail`), and nobody else can reach them in a private home.
pub fn make_home_private(
    home: &Path,
    home_mode: u32,
    shared_gid: Option<u32>,
) -> Result<Vec<Loosened>, HomeAccessError> {
    use rustix::fs::{Mode, OFlags};
    let dir = rustix::fs::open(home, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(denied(home))?;
    let mode = rustix::fs::fstat(&dir).map_err(denied(home))?.st_mode & 0o7777;
    let mut loosened = Vec::new();
    let keep = !(0o077 & !home_mode);
    if mode & !keep != 0 {
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode & keep)).map_err(denied(home))?;
        loosened.push(Loosened { path: home.to_path_buf(), mode });
    }
    make_private_under(&dir, home, shared_gid, &mut loosened)?;
    Ok(loosened)
}

fn denied(path: &Path) -> impl FnOnce(rustix::io::Errno) -> HomeAccessError {
    let path = path.to_path_buf();
    move |e| HomeAccessError { path, reason: e.into() }
}

/// Make everything in the (already private) directory `dir` private, top down: a directory is
/// closed before its entries are looked at, so nobody else can swap an entry for a symbolic link
/// between the look and the chmod.
fn make_private_under(
    dir: &std::os::fd::OwnedFd,
    path: &Path,
    shared_gid: Option<u32>,
    loosened: &mut Vec<Loosened>,
) -> Result<(), HomeAccessError> {
    use std::os::unix::ffi::OsStrExt;

    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    for entry in rustix::fs::Dir::read_from(dir).map_err(denied(path))? {
        let entry = entry.map_err(denied(path))?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let child = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => continue, // removed meanwhile
            Err(e) => return Err(denied(&child)(e)),
        };
        let mode = stat.st_mode & 0o7777;
        match FileType::from_raw_mode(stat.st_mode) {
            // A link's own mode means nothing; what it points to is private where it lives.
            FileType::Symlink => {}
            FileType::Directory => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let sub = rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(denied(&child))?;
                if mode & 0o077 != 0 {
                    rustix::fs::fchmod(&sub, Mode::from_raw_mode(mode & !0o077)).map_err(denied(&child))?;
                    loosened.push(Loosened { path: child.clone(), mode });
                }
                make_private_under(&sub, &child, shared_gid, loosened)?;
            }
            FileType::RegularFile if Some(stat.st_gid) == shared_gid && mode & 0o017 == 0 => {}
            _ if mode & 0o077 != 0 => {
                rustix::fs::chmodat(dir, name, Mode::from_raw_mode(mode & !0o077), AtFlags::empty())
                    .map_err(denied(&child))?;
                loosened.push(Loosened { path: child, mode });
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn an_open_home_is_closed_and_what_was_open_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"not ours to change").unwrap();
        chmod(&outside, 0o644);
        std::fs::create_dir_all(home.join("snapshots/abc")).unwrap();
        std::fs::write(home.join("snapshots/abc/mem"), b"guest ram").unwrap();
        std::fs::write(home.join("state.db"), b"").unwrap();
        symlink(&outside, home.join("link")).unwrap();
        chmod(&home, 0o755);
        chmod(&home.join("snapshots"), 0o755);
        chmod(&home.join("snapshots/abc"), 0o750);
        chmod(&home.join("snapshots/abc/mem"), 0o644);
        chmod(&home.join("state.db"), 0o600);

        let mut open: Vec<_> = make_home_private(&home, 0o700, None).unwrap().into_iter().map(|l| l.path).collect();
        open.sort();
        let want = [&home, &home.join("snapshots"), &home.join("snapshots/abc"), &home.join("snapshots/abc/mem")];
        assert_eq!(open, want.map(|p| p.to_path_buf()));
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&home.join("snapshots/abc")), 0o700);
        assert_eq!(mode(&home.join("snapshots/abc/mem")), 0o600);
        // Links are not followed out of the home.
        assert_eq!(mode(&outside), 0o644);
        // A private home has nothing to report.
        assert_eq!(make_home_private(&home, 0o700, None).unwrap(), []);
    }

    #[test]
    fn files_of_the_jails_group_keep_its_read_and_write_bits_and_nothing_more() {
        let tmp = tempfile::tempdir().unwrap();
        let (shared, other, open) = (tmp.path().join("mem"), tmp.path().join("other"), tmp.path().join("open"));
        for (f, mode) in [(&shared, 0o660), (&other, 0o660), (&open, 0o664)] {
            std::fs::write(f, b"x").unwrap();
            std::os::unix::fs::chown(f, None, Some(4242)).unwrap();
            chmod(f, mode);
        }
        std::os::unix::fs::chown(&other, None, Some(4243)).unwrap();
        chmod(tmp.path(), 0o700);
        let loosened: Vec<_> =
            make_home_private(tmp.path(), 0o700, Some(4242)).unwrap().into_iter().map(|l| l.path).collect();
        assert_eq!(mode(&shared), 0o660);
        assert_eq!(mode(&other), 0o600, "another group's bits go");
        assert_eq!(mode(&open), 0o600, "a file others may read loses its group bits too");
        assert_eq!(loosened.len(), 2, "{loosened:?}");
    }

    #[test]
    fn a_socket_group_may_keep_entering_the_home_and_nothing_more() {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o775);
        let open = make_home_private(tmp.path(), 0o710, None).unwrap();
        assert_eq!(open, [Loosened { path: tmp.path().to_path_buf(), mode: 0o775 }]);
        assert_eq!(mode(tmp.path()), 0o710);
        assert_eq!(make_home_private(tmp.path(), 0o710, None).unwrap(), []);
    }
}
