//! Images built from Debian packages with `debootstrap`: no registry, only a Debian mirror.
//!
//! The root tree is bootstrapped in the store's staging directory, tidied for a VM (the agent is
//! PID 1 and switches root into the disk, so no init system is needed), packed into ext4 + qcow2
//! and committed. An interrupted build leaves nothing registered: the staging directory is removed
//! when it is dropped, and debootstrap runs in a mount namespace of its own, so the `/proc` and
//! `/sys` it mounts inside the tree vanish with it and never outlive it in the host's namespace.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::store::{Image, ImageConfig, ImageStore, Provenance, MINIMAL};
use crate::{disk, ImageError};

/// The mirror used unless a recipe names another.
pub const DEFAULT_DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// Bump when the build below changes in a way the recipe does not show.
const RECIPE_VERSION: &str = "moat-debian-1";
const LABEL: &str = "moat-root";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Debian release numbers users write (`debian:12`) and the suites they stand for.
const RELEASES: &[(&str, &str)] =
    &[("9", "stretch"), ("10", "buster"), ("11", "bullseye"), ("12", "bookworm"), ("13", "trixie"), ("14", "forky")];
/// How many of debootstrap's last lines a failure reports.
const TAIL_LINES: usize = 20;

/// A Debian-based image to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianRecipe {
    /// The Debian suite: `bookworm`, `trixie`, `stable`, `sid`, …
    pub suite: String,
    /// Packages installed on top of the `minbase` variant (essential and required packages).
    pub packages: Vec<String>,
    /// The Debian mirror, [`DEFAULT_DEBIAN_MIRROR`] unless set.
    pub mirror: String,
}

impl DebianRecipe {
    /// The recipe for a base reference — `debian:bookworm`, `debian:12`, `bookworm`, or `debian`
    /// (the current stable) — with these packages, from the default mirror. Suite and package
    /// names are checked here, since they end up on debootstrap's command line.
    pub fn from_ref(from: &str, packages: &[String]) -> Result<DebianRecipe, ImageError> {
        let suite = match from.split_once(':') {
            None if from == "debian" => "stable",
            None => from,
            Some(("debian", "latest")) => "stable",
            Some(("debian", version)) => version,
            Some((distro, _)) => {
                return Err(invalid(format!(
                    "{from:?} is not a Debian reference ({distro:?} images cannot be built yet)"
                )))
            }
        };
        let suite = RELEASES.iter().find(|(number, _)| *number == suite).map_or(suite, |(_, name)| name);
        let recipe = DebianRecipe {
            suite: suite.to_string(),
            packages: packages.to_vec(),
            mirror: DEFAULT_DEBIAN_MIRROR.to_string(),
        };
        recipe.validate()?;
        Ok(recipe)
    }

    fn validate(&self) -> Result<(), ImageError> {
        let s = &self.suite;
        if s.is_empty() || !s.as_bytes()[0].is_ascii_lowercase() || !s.bytes().all(debian_name_byte) {
            let numbers = RELEASES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
            return Err(invalid(format!(
                "{s:?} is not a Debian suite (a name such as `bookworm` or a release number: {numbers})"
            )));
        }
        for p in &self.packages {
            // Debian policy: at least two characters, starting with a letter or digit.
            if p.len() < 2 || !p.as_bytes()[0].is_ascii_alphanumeric() || !p.bytes().all(debian_name_byte) {
                return Err(invalid(format!("{p:?} is not a Debian package name")));
            }
        }
        let m = &self.mirror;
        let scheme_ok = ["http://", "https://", "file:///"].iter().any(|scheme| m.starts_with(scheme));
        if !scheme_ok || m.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(invalid(format!("{m:?} is not a mirror URL (http://, https:// or file:///, without spaces)")));
        }
        Ok(())
    }

    /// `build debian:bookworm +python3,git`, as `moat image ls` shows an image's source.
    pub fn describe(&self) -> String {
        let mut s = format!("build debian:{}", self.suite);
        if !self.packages.is_empty() {
            s += &format!(" +{}", self.sorted_packages().join(","));
        }
        if self.mirror != DEFAULT_DEBIAN_MIRROR {
            s += &format!(" from {}", self.mirror);
        }
        s
    }

    /// The packages as debootstrap gets them: sorted, each once.
    fn sorted_packages(&self) -> Vec<&str> {
        let mut packages: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        packages.sort_unstable();
        packages.dedup();
        packages
    }

    /// The digest of this recipe built on `day` (`YYYY-MM-DD`, UTC).
    ///
    /// Builds are not reproducible: the mirror moves on (security updates, point releases) and
    /// debootstrap stamps files with the build time, so the same recipe gives different bytes on
    /// different days. The day is hashed in so a build is reused for the rest of its day and a
    /// rebuild on a later day is a new image rather than a claim that nothing changed.
    fn digest(&self, day: &str) -> String {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(RECIPE_VERSION.as_bytes());
        field(self.suite.as_bytes());
        field(self.sorted_packages().join(",").as_bytes());
        field(self.mirror.as_bytes());
        field(day.as_bytes());
        field(&serde_json::to_vec(&config()).expect("ImageConfig serializes"));
        format!("sha256:{}", hex::encode(h.finalize()))
    }
}

fn debian_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b)
}

fn invalid(reason: String) -> ImageError {
    ImageError::InvalidRecipe { reason }
}

fn config() -> ImageConfig {
    ImageConfig {
        env: vec![("PATH".into(), PATH_ENV.into())],
        working_dir: Some("/".into()),
        user: None,
        entrypoint: Vec::new(),
        cmd: vec!["/bin/bash".into()],
    }
}

/// Build `recipe` and commit it as `name`. `progress` gets human-readable lines as the build goes
/// (debootstrap's own `I:` lines, then the packing steps). A recipe already built today is reused.
///
/// Needs root (debootstrap creates device nodes, sets owners and chroots), `debootstrap`, the
/// Debian archive keyring, and the mirror over the network; takes a minute or two.
pub fn build_debian(
    store: &ImageStore,
    name: &str,
    recipe: &DebianRecipe,
    progress: &mut dyn FnMut(&str),
) -> Result<Image, ImageError> {
    check_name(name)?;
    recipe.validate()?;
    let digest = recipe.digest(&utc_day(SystemTime::now()));
    if let Some(image) = store.load(&digest)? {
        progress(&format!("debian:{} with these packages was already built today; reusing it", recipe.suite));
        store.ensure_named(name, &digest)?;
        return Ok(Image { name: name.to_string(), ..image });
    }
    let debootstrap = find_debootstrap()?;
    let euid = rustix::process::geteuid();
    if !euid.is_root() {
        return Err(ImageError::BuildNeedsRoot { uid: euid.as_raw() });
    }
    if !Path::new(KEYRING).is_file() {
        return Err(ImageError::KeyringMissing { path: KEYRING.into() });
    }

    let started = std::time::Instant::now();
    let staging = store.stage()?;
    let tree = staging.path().join("rootfs");
    run_debootstrap(&debootstrap, recipe, &tree, progress)?;
    progress("tidying the tree for a VM");
    tidy(&tree)?;
    progress("packing the tree into ext4 and qcow2");
    disk::pack_tree(&tree, &staging.base(), LABEL)?;
    std::fs::remove_dir_all(&tree).map_err(ImageError::io(format!("removing {}", tree.display())))?;
    let image =
        store.commit(staging, name, &digest, config(), Provenance { source: recipe.describe(), layers: Vec::new() })?;
    progress(&format!("built {name} ({})", image.digest));
    tracing::info!(name, digest = %image.digest, suite = %recipe.suite, elapsed_ms = started.elapsed().as_millis() as u64, "built a Debian image");
    Ok(image)
}

/// The crate's rule for names, and not the built-in image's name: `resolve` never looks that one
/// up in the index, so an image built under it could never be used.
fn check_name(name: &str) -> Result<(), ImageError> {
    crate::validate_image_name(name)?;
    if name == MINIMAL {
        return Err(ImageError::BadImageName { name: name.into(), why: "it is the built-in image's name".into() });
    }
    Ok(())
}

/// debootstrap is in /usr/sbin, which a non-root PATH often lacks.
fn find_debootstrap() -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("debootstrap"))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::ToolMissing {
            tool: "debootstrap".into(),
            package: "debootstrap".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "it is not in PATH, /usr/sbin or /sbin"),
        })
}

/// Kills debootstrap if the build stops early (an error reading its output, a panic in
/// `progress`), so it does not keep writing into a staging directory being removed.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// How the lines debootstrap prints begin among a build's progress lines: a front shows them as
/// the current step, not one by one (there are hundreds), and the daemon logs them all.
pub const TOOL_OUTPUT: &str = "debootstrap: ";

fn run_debootstrap(
    debootstrap: &Path,
    recipe: &DebianRecipe,
    tree: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let mut cmd = Command::new("unshare");
    // A private mount namespace: whatever debootstrap mounts in the tree goes when it exits,
    // however it exits, and can never make removing the staging directory reach into the host.
    cmd.args(["--mount", "--propagation", "private"]).arg(debootstrap);
    cmd.arg("--variant=minbase").arg(format!("--keyring={KEYRING}"));
    let packages = recipe.sorted_packages();
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(&recipe.suite).arg(tree).arg(&recipe.mirror);
    cmd.env("PATH", PATH_ENV).env("LC_ALL", "C.UTF-8").env("DEBIAN_FRONTEND", "noninteractive");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // The tree's modes are the guest's: the usual umask, not the daemon's private 077.
    // SAFETY: umask is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0o022);
            Ok(())
        });
    }
    progress(&format!(
        "debootstrap {} from {} with {}",
        recipe.suite,
        recipe.mirror,
        if packages.is_empty() { "no extra packages".to_string() } else { packages.join(" ") }
    ));
    let child = cmd.spawn().map_err(|source| ImageError::ToolMissing {
        tool: "unshare".into(),
        package: "util-linux".into(),
        source,
    })?;
    let mut running = Running(child);

    // Both streams feed one channel so `progress` (not Send) is called on this thread only.
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        running.0.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        running.0.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || forward_lines(stream, &tx))
    })
    .collect();
    drop(tx);
    let mut tail = std::collections::VecDeque::with_capacity(TAIL_LINES);
    for line in rx {
        progress(&format!("{TOOL_OUTPUT}{line}"));
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = running.0.wait().map_err(ImageError::io("waiting for debootstrap"))?;
    if status.success() {
        return Ok(());
    }
    let mut log: Vec<String> = tail.into();
    // The second stage (dpkg) writes to this log rather than to the terminal.
    let detail = tree.join("debootstrap/debootstrap.log");
    if let Ok(text) = std::fs::read_to_string(&detail) {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        log.push(format!("--- the end of {}:", detail.display()));
        log.extend(lines[lines.len().saturating_sub(TAIL_LINES)..].iter().map(|l| l.to_string()));
    }
    Err(ImageError::DebootstrapFailed { suite: recipe.suite.clone(), status: status.to_string(), log: log.join("\n") })
}

/// Send each non-empty line of `stream` (lossily decoded) until it ends or the receiver is gone.
fn forward_lines(stream: impl Read, tx: &mpsc::Sender<String>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if !line.is_empty() && tx.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

/// Make a bootstrapped tree fit to be a sandbox's disk: no host identity (debootstrap copies the
/// host's hostname and resolv.conf), no package caches, nothing left of debootstrap.
fn tidy(tree: &Path) -> Result<(), ImageError> {
    let etc = tree.join("etc");
    write(&etc.join("hostname"), "moat\n")?;
    if !etc.join("hosts").exists() {
        write(&etc.join("hosts"), "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")?;
    }
    // Remove first: it may be a symlink (to systemd-resolved's file) that must not be followed.
    let resolv = etc.join("resolv.conf");
    remove_if_present(&resolv)?;
    write(&resolv, "# moat writes the sandbox's name servers here when the sandbox has a network.\n")?;
    // What `apt-get clean` and `rm -rf /var/lib/apt/lists/*` remove: downloaded packages and
    // indexes, which `apt-get update` fetches again when needed.
    clear_dir(&tree.join("var/cache/apt/archives"), |name| name.ends_with(".deb"))?;
    clear_dir(&tree.join("var/cache/apt/archives/partial"), |_| true)?;
    clear_dir(&tree.join("var/cache/apt"), |name| name.ends_with(".bin"))?;
    clear_dir(&tree.join("var/lib/apt/lists"), |_| true)?;
    remove_if_present(&tree.join("debootstrap"))
}

/// Write a file of the guest's tree, readable by the guest's users whatever the daemon's umask.
fn write(path: &Path, text: &str) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)
        .and_then(|_| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
        .map_err(ImageError::io(format!("writing {}", path.display())))
}

/// Remove a file, link or directory tree; a missing one is fine.
fn remove_if_present(path: &Path) -> Result<(), ImageError> {
    let result = match path.symlink_metadata() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.map_err(ImageError::io(format!("removing {}", path.display())))
}

/// Remove the entries of `dir` whose names pass `pick`; a missing `dir` is fine.
fn clear_dir(dir: &Path, pick: impl Fn(&str) -> bool) -> Result<(), ImageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io(format!("listing {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(ImageError::io(format!("listing {}", dir.display())))?;
        if pick(&entry.file_name().to_string_lossy()) {
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

/// `YYYY-MM-DD` of `at` in UTC.
fn utc_day(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn pkgs(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn references_name_a_suite_by_codename_or_release_number() {
        let python = pkgs(&["python3"]);
        for (from, suite) in [
            ("debian:bookworm", "bookworm"),
            ("debian:12", "bookworm"),
            ("bookworm", "bookworm"),
            ("12", "bookworm"),
            ("debian:13", "trixie"),
            ("debian:sid", "sid"),
            ("debian", "stable"),
            ("debian:latest", "stable"),
        ] {
            let recipe = DebianRecipe::from_ref(from, &python).unwrap();
            assert_eq!(recipe.suite, suite, "{from}");
            assert_eq!(
                (recipe.packages.as_slice(), recipe.mirror.as_str()),
                (python.as_slice(), DEFAULT_DEBIAN_MIRROR)
            );
        }
    }

    #[test]
    fn references_and_packages_that_could_smuggle_arguments_are_refused() {
        for from in ["ubuntu:jammy", "debian:Bookworm", "debian:book worm", "debian:--foreign", "", "debian:-x", "a;b"]
        {
            let err = DebianRecipe::from_ref(from, &[]).unwrap_err();
            assert!(matches!(err, ImageError::InvalidRecipe { .. }), "{from}: {err}");
            assert!(crate::report(&err).contains("hint:"), "{err}");
        }
        for package in ["python3,curl", "--keyring=/x", "a", "", "Python3", "py thon", "pkg:amd64", "x/y"] {
            let err = DebianRecipe::from_ref("debian:bookworm", &pkgs(&["curl", package])).unwrap_err();
            assert!(err.to_string().contains(&format!("{package:?} is not a Debian package name")), "{err}");
        }
        let ok = DebianRecipe::from_ref("debian:bookworm", &pkgs(&["g++", "libstdc++6", "python3.11", "r-base"]));
        assert!(ok.is_ok(), "{ok:?}");
        let mut recipe = ok.unwrap();
        for mirror in ["ftp://x", "http://x y", "deb.debian.org", "http://x\n"] {
            recipe.mirror = mirror.into();
            assert!(matches!(recipe.validate(), Err(ImageError::InvalidRecipe { .. })), "{mirror}");
        }
    }

    #[test]
    fn image_names_are_checked_and_the_builtin_name_is_refused() {
        for name in ["py", "py:bookworm", "ghcr.io/me/py:3.11", "0day"] {
            assert!(check_name(name).is_ok(), "{name}");
        }
        for name in ["", "Py", "-py", ".py", "py bookworm", "a/../b", "minimal", &"a".repeat(256)] {
            assert!(matches!(check_name(name), Err(ImageError::BadImageName { .. })), "{name:?}");
        }
    }

    #[test]
    fn the_digest_follows_suite_packages_mirror_and_day_not_package_order() {
        let recipe = DebianRecipe::from_ref("debian:bookworm", &pkgs(&["python3", "curl"])).unwrap();
        let reordered = DebianRecipe::from_ref("bookworm", &pkgs(&["curl", "python3", "curl"])).unwrap();
        let day = "2026-05-20";
        assert_eq!(recipe.digest(day), reordered.digest(day));
        assert!(recipe.digest(day).starts_with("sha256:") && recipe.digest(day).len() == 7 + 64);
        assert_ne!(recipe.digest(day), recipe.digest("2026-05-21"));
        let trixie = DebianRecipe { suite: "trixie".into(), ..recipe.clone() };
        let fewer = DebianRecipe { packages: pkgs(&["python3"]), ..recipe.clone() };
        let mirror = DebianRecipe { mirror: "http://ftp.de.debian.org/debian".into(), ..recipe.clone() };
        for other in [trixie, fewer, mirror] {
            assert_ne!(recipe.digest(day), other.digest(day), "{other:?}");
        }
    }

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(utc_day(UNIX_EPOCH), "1970-01-01");
        assert_eq!(utc_day(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29");
        assert_eq!(utc_day(UNIX_EPOCH + Duration::from_secs(1_767_225_599)), "2025-12-31");
        assert_eq!(utc_day(UNIX_EPOCH + Duration::from_secs(1_767_225_600)), "2026-01-01");
    }

    #[test]
    fn tidying_removes_host_identity_and_package_caches() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        for d in ["etc", "var/cache/apt/archives/partial", "var/lib/apt/lists/partial", "debootstrap"] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::write(tree.join("etc/hostname"), "buildhost\n").unwrap();
        std::os::unix::fs::symlink("/run/systemd/resolve/stub-resolv.conf", tree.join("etc/resolv.conf")).unwrap();
        for f in [
            "var/cache/apt/archives/python3_3.11.2-1+b1_amd64.deb",
            "var/cache/apt/archives/lock",
            "var/cache/apt/archives/partial/x.deb",
            "var/cache/apt/pkgcache.bin",
            "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
            "debootstrap/debootstrap.log",
        ] {
            std::fs::write(tree.join(f), "x").unwrap();
        }
        tidy(tree).unwrap();
        assert_eq!(std::fs::read_to_string(tree.join("etc/hostname")).unwrap(), "moat\n");
        assert!(std::fs::read_to_string(tree.join("etc/hosts")).unwrap().contains("localhost"));
        assert!(!tree.join("etc/resolv.conf").symlink_metadata().unwrap().is_symlink());
        assert!(!std::fs::read_to_string(tree.join("etc/resolv.conf")).unwrap().contains("nameserver"));
        let names = |d: &str| -> Vec<String> {
            std::fs::read_dir(tree.join(d)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect()
        };
        let mut archives = names("var/cache/apt/archives");
        archives.sort();
        assert_eq!(archives, ["lock", "partial"]);
        assert!(names("var/cache/apt/archives/partial").is_empty());
        assert!(!names("var/cache/apt").contains(&"pkgcache.bin".to_string()));
        assert!(names("var/lib/apt/lists").is_empty());
        assert!(!tree.join("debootstrap").exists());
    }
}
