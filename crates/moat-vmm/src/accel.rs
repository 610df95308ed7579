//! Choosing the accelerator: KVM only when a probe guest really boots under it.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!("unknown accelerator {other:?}; use auto, kvm or tcg")),
        }
    }
}

/// The accelerator to use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
    #[serde(skip)]
    pub from_cache: bool,
}

/// The probe verdict stored on disk, valid only for the same QEMU, kernel, initrd and /dev/kvm.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct CachedProbe {
    key: String,
    kvm_ok: bool,
    reason: String,
}

fn file_key(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{}:{}:{}:{}", path.display(), m.len(), m.mtime(), m.mtime_nsec()),
        Err(_) => format!("{}:missing", path.display()),
    }
}

/// Decide the accelerator. `Tcg` never touches KVM; `Kvm` fails with the reason when the probe
/// fails; `Auto` falls back to TCG and says why.
pub async fn choose_accel(
    choice: AccelChoice,
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    cache_file: &Path,
    timeout: Duration,
) -> Result<AccelDecision, VmmError> {
    if choice == AccelChoice::Tcg {
        return Ok(AccelDecision { accel: Accel::Tcg, reason: "requested".into(), from_cache: false });
    }
    let key = format!("{}|{}|{}|{}", file_key(qemu), file_key(kernel), file_key(initrd), file_key(Path::new("/dev/kvm")));
    let cached = std::fs::read(cache_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<CachedProbe>(&b).ok())
        .filter(|c| c.key == key);
    let (kvm_ok, reason, from_cache) = match cached {
        Some(c) => (c.kvm_ok, c.reason, true),
        None => {
            let verdict = probe_kvm(qemu, kernel, initrd, cache_file.parent().unwrap_or(Path::new("/tmp")), timeout).await;
            let (ok, reason) = match verdict {
                Ok(()) => (true, "a probe guest booted under KVM".to_string()),
                Err(reason) => (false, reason),
            };
            let record = CachedProbe { key, kvm_ok: ok, reason: reason.clone() };
            let tmp = cache_file.with_extension("tmp");
            let _ = std::fs::write(&tmp, serde_json::to_vec(&record).expect("probe record serializes"))
                .and_then(|_| std::fs::rename(&tmp, cache_file));
            (ok, reason, false)
        }
    };
    match (kvm_ok, choice) {
        (true, _) => Ok(AccelDecision { accel: Accel::Kvm, reason, from_cache }),
        (false, AccelChoice::Kvm) => Err(VmmError::KvmUnusable {
            reason,
            hint: "use --accel auto or --accel tcg, or run on a host where /dev/kvm works (and delete the cached verdict in accel.json after fixing it)".into(),
        }),
        (false, _) => Ok(AccelDecision { accel: Accel::Tcg, reason: format!("kvm unusable: {reason}"), from_cache }),
    }
}

/// Boot the probe guest under KVM; Err carries why KVM is not usable.
async fn probe_kvm(qemu: &Path, kernel: &Path, initrd: &Path, scratch: &Path, timeout: Duration) -> Result<(), String> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return Err("/dev/kvm does not exist".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        return Err(format!("cannot open /dev/kvm: {e}"));
    }
    let dir = scratch.join(format!("probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
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
        name: "kvm-probe".into(),
    };
    let result = async {
        let mut vm = Vm::spawn(&cfg, true).await.map_err(|e| e.to_string())?;
        let exited = vm.wait(timeout).await.map_err(|e| e.to_string())?;
        let console = vm.console_tail(50);
        vm.kill().await;
        if console.contains(PROBE_MARKER) {
            Ok(())
        } else if exited.is_none() {
            Err(format!("a probe guest did not boot within {}s", timeout.as_secs()))
        } else {
            Err("a probe guest stopped without coming up".into())
        }
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert!("hvf".parse::<AccelChoice>().unwrap_err().contains("auto, kvm or tcg"));
    }

    #[tokio::test]
    async fn tcg_needs_no_probe() {
        let d = choose_accel(AccelChoice::Tcg, Path::new("/x"), Path::new("/y"), Path::new("/z"), Path::new("/nonexistent/c"), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(d.accel, Accel::Tcg);
    }

    #[tokio::test]
    async fn cached_verdict_is_reused_only_for_the_same_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("accel.json");
        let (q, k, i) = (dir.path().join("q"), dir.path().join("k"), dir.path().join("i"));
        for f in [&q, &k, &i] {
            std::fs::write(f, b"x").unwrap();
        }
        let key = format!("{}|{}|{}|{}", file_key(&q), file_key(&k), file_key(&i), file_key(Path::new("/dev/kvm")));
        std::fs::write(&cache, serde_json::to_vec(&CachedProbe { key, kvm_ok: false, reason: "broken".into() }).unwrap()).unwrap();
        let d = choose_accel(AccelChoice::Auto, &q, &k, &i, &cache, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.from_cache && d.reason.contains("broken"));
        let err = choose_accel(AccelChoice::Kvm, &q, &k, &i, &cache, Duration::from_secs(1)).await.unwrap_err();
        assert!(err.to_string().contains("KVM is not usable") && err.to_string().contains("broken"), "{err}");
    }
}
