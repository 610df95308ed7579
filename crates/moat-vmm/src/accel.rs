//! Choosing the accelerator: KVM only when a probe guest really boots under it.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::VmConfig;
use crate::vm::Vm;
use crate::VmmError;

/// What the probe guest (the agent with `moat.probe=1`) prints when it is up.
pub const PROBE_MARKER: &str = "moat: probe ok";

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        })
    }
}

/// An accelerator name that is not `auto`, `kvm` or `tcg`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?}; use auto, kvm or tcg")]
pub struct AccelChoiceError(String);

impl FromStr for AccelChoice {
    type Err = AccelChoiceError;
    fn from_str(s: &str) -> Result<Self, AccelChoiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(AccelChoiceError(s.to_string())),
        }
    }
}

/// How long the probe guest may take to print its marker before KVM is judged unusable.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// The accelerator to use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    /// Why, in words for the user, e.g. "kvm unusable: …; using TCG (slow)".
    pub reason: String,
    /// The verdict came from the probe cache, no guest was booted.
    pub from_cache: bool,
}

/// The probe verdict stored on disk, valid only for the same QEMU, kernel, initrd and /dev/kvm.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct CachedProbe {
    key: String,
    kvm_ok: bool,
    reason: String,
}

/// What identifies a file for the cache: path, size, mtime; for devices also (dev, ino, rdev),
/// which change when the module is reloaded or the host reboots.
fn file_key(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{}:{}:{}.{}:{}:{}:{}",
            path.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.dev(),
            m.ino(),
            m.rdev()
        ),
        Err(_) => format!("{}:missing", path.display()),
    }
}

/// The cache key. The QEMU binary's identity stands in for its version: any upgrade replaces the
/// file, and it costs a `stat` instead of running `qemu --version` on every start.
fn cache_key(qemu: &Path, kernel: &Path, initrd: &Path) -> String {
    format!("v1|{}|{}|{}|{}", file_key(qemu), file_key(kernel), file_key(initrd), file_key(Path::new("/dev/kvm")))
}

/// Decide the accelerator. `Tcg` never touches KVM; `Kvm` fails with the reason when the probe
/// fails; `Auto` falls back to TCG and says why. The verdict is cached in `cache_file`.
pub async fn choose_accel(
    choice: AccelChoice,
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    cache_file: &Path,
    timeout: Duration,
) -> Result<AccelDecision, VmmError> {
    if choice == AccelChoice::Tcg {
        return Ok(AccelDecision { accel: Accel::Tcg, reason: "TCG requested".into(), from_cache: false });
    }
    let key = cache_key(qemu, kernel, initrd);
    let cached = std::fs::read(cache_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<CachedProbe>(&b).ok())
        .filter(|c| c.key == key);
    let (kvm_ok, reason, from_cache) = match cached {
        Some(c) => (c.kvm_ok, c.reason, true),
        None => {
            let started = std::time::Instant::now();
            let verdict = probe_kvm(qemu, kernel, initrd, timeout).await;
            let (ok, reason) = match verdict {
                Ok(()) => (true, format!("a probe guest booted under KVM in {:.1}s", started.elapsed().as_secs_f64())),
                Err(reason) => (false, reason),
            };
            tracing::info!(kvm_ok = ok, %reason, "KVM probe finished");
            store(cache_file, &CachedProbe { key, kvm_ok: ok, reason: reason.clone() });
            (ok, reason, false)
        }
    };
    match (kvm_ok, choice) {
        (true, _) => Ok(AccelDecision { accel: Accel::Kvm, reason, from_cache }),
        (false, AccelChoice::Kvm) => Err(VmmError::KvmUnusable {
            reason,
            hint: format!(
                "use --accel auto or --accel tcg, or fix KVM on this host and delete {} so it is probed again",
                cache_file.display()
            ),
        }),
        (false, _) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: format!("kvm unusable: {reason}; using TCG (slow)"),
            from_cache,
        }),
    }
}

/// Write the verdict atomically; a failure only costs a probe next time.
fn store(cache_file: &Path, record: &CachedProbe) {
    let tmp = cache_file.with_extension(format!("tmp.{}", std::process::id()));
    let written = cache_file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(&tmp, serde_json::to_vec_pretty(record).expect("probe record serializes")))
        .and_then(|_| std::fs::rename(&tmp, cache_file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(file = %cache_file.display(), error = %e, "cannot cache the KVM probe verdict");
    }
}

/// Boot the probe guest under KVM with the same command line sandboxes get; Err says why KVM is
/// not usable.
async fn probe_kvm(qemu: &Path, kernel: &Path, initrd: &Path, timeout: Duration) -> Result<(), String> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return Err("/dev/kvm does not exist (no KVM module loaded, or not exposed to this container)".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        return Err(format!("cannot open /dev/kvm read-write: {e} (add the user to the kvm group)"));
    }
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let unique = format!("{}-{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed));
    // Under the temp dir, not MOAT_HOME: socket paths stay short whatever MOAT_HOME is.
    let dir = std::env::temp_dir().join(format!("moat-probe-{unique}"));
    let cfg = VmConfig {
        qemu: qemu.to_path_buf(),
        accel: Accel::Kvm,
        vcpus: 1,
        memory_mib: 128,
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        cmdline: "moat.probe=1".into(),
        root_disk: None,
        run_dir: dir.clone(),
        seccomp: true,
        name: format!("kvm-probe-{unique}"),
        memory: None,
        incoming: false,
        nic: false,
        jail: None,
        cgroups: None,
    };
    let result = async {
        let mut vm = Vm::spawn(&cfg, true).await.map_err(|e| format!("QEMU could not start a KVM guest: {e}"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        // Poll the console: the marker is the verdict, whether or not the guest then powers off.
        let verdict = loop {
            if vm.console_tail(50).contains(PROBE_MARKER) {
                break Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break Err(format!("a probe guest did not boot within {}s", timeout.as_secs_f64().round()));
            }
            let exited = vm.wait((deadline - now).min(Duration::from_millis(50))).await.map_err(|e| e.to_string())?;
            if let Some(status) = exited {
                if vm.console_tail(50).contains(PROBE_MARKER) {
                    break Ok(());
                }
                let last = vm.console_tail(3);
                let stderr = vm.qemu_stderr();
                break Err(format!(
                    "a probe guest stopped without coming up ({status}); qemu: {stderr}; console: {last}"
                ));
            }
        };
        let _ = vm.stop(Duration::ZERO).await;
        verdict
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::tests::host_kernel;

    #[test]
    fn choices_parse_and_print() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("KVM".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        let err = "hvf".parse::<AccelChoice>().unwrap_err().to_string();
        assert_eq!(err, "unknown accelerator \"hvf\"; use auto, kvm or tcg");
        assert_eq!(Accel::Kvm.to_string(), "kvm");
        assert_eq!(serde_json::to_string(&Accel::Tcg).unwrap(), "\"tcg\"");
    }

    #[tokio::test]
    async fn tcg_needs_no_probe() {
        let d = choose_accel(
            AccelChoice::Tcg,
            Path::new("/x"),
            Path::new("/y"),
            Path::new("/z"),
            Path::new("/nonexistent/c"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(!d.from_cache);
    }

    #[tokio::test]
    async fn a_cached_verdict_is_reused_only_for_the_same_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("accel.json");
        let (q, k, i) = (dir.path().join("q"), dir.path().join("k"), dir.path().join("i"));
        for f in [&q, &k, &i] {
            std::fs::write(f, b"x").unwrap();
        }
        store(&cache, &CachedProbe { key: cache_key(&q, &k, &i), kvm_ok: false, reason: "broken".into() });
        let d = choose_accel(AccelChoice::Auto, &q, &k, &i, &cache, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.from_cache && d.reason.contains("broken") && d.reason.contains("TCG"), "{d:?}");
        let err = choose_accel(AccelChoice::Kvm, &q, &k, &i, &cache, Duration::from_secs(1)).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("KVM is not usable") && msg.contains("broken"), "{msg}");
        assert!(moat_hint::Hint::hint(&err).is_some_and(|h| !h.is_empty()), "{err:?}");

        std::fs::write(&k, b"a new kernel").unwrap();
        assert_ne!(
            cache_key(&q, &k, &i),
            serde_json::from_slice::<CachedProbe>(&std::fs::read(&cache).unwrap()).unwrap().key
        );
    }

    /// On this host /dev/kvm belongs to a nested PVM hypervisor on which guests hang: `auto` must
    /// find out by booting, fall back to TCG with the reason, and remember the verdict. (On a host
    /// with working KVM, the guest without the agent never prints the marker either, so the
    /// verdict is the same.)
    #[tokio::test]
    async fn auto_falls_back_to_tcg_when_no_probe_guest_comes_up_and_caches_it() {
        let qemu = crate::find_qemu(None).expect("qemu-system-x86_64 installed");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.cpio");
        std::fs::write(&empty, b"").unwrap();
        let cache = dir.path().join("cache/accel.json");
        let kernel = host_kernel();
        let started = std::time::Instant::now();
        let d = choose_accel(AccelChoice::Auto, &qemu, &kernel, &empty, &cache, Duration::from_secs(5)).await.unwrap();
        let probe_time = started.elapsed();
        assert_eq!(d.accel, Accel::Tcg, "{d:?}");
        assert!(!d.from_cache);
        assert!(d.reason.starts_with("kvm unusable: ") && d.reason.ends_with("using TCG (slow)"), "{}", d.reason);
        assert!(probe_time < Duration::from_secs(15), "{probe_time:?}");
        assert!(cache.exists());

        let started = std::time::Instant::now();
        let again =
            choose_accel(AccelChoice::Auto, &qemu, &kernel, &empty, &cache, Duration::from_secs(5)).await.unwrap();
        assert!(again.from_cache && again.accel == Accel::Tcg && again.reason == d.reason, "{again:?}");
        assert!(started.elapsed() < Duration::from_millis(500), "a cached verdict costs nothing");

        let err =
            choose_accel(AccelChoice::Kvm, &qemu, &kernel, &empty, &cache, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, VmmError::KvmUnusable { .. }), "{err}");
        let leftovers = crate::vm::tests::processes_with(&format!("process=moat-kvm-probe-{}-", std::process::id()));
        assert!(leftovers.is_empty(), "probe QEMUs left running: {leftovers:?}");
        eprintln!("KVM probe verdict after {probe_time:?}: {}", d.reason);
    }
}
