//! Saving a running sandbox's whole machine (memory, device state, disk) and what a restore
//! must match.
//!
//! A saved machine is a directory of three files: [`MEM_FILE`] (guest RAM, sparse), [`STATE_FILE`]
//! (QEMU's device state without RAM, `x-ignore-shared`) and [`DISK_FILE`] (the disk overlay as a
//! layer on the image's base). Restores map the RAM file privately, so every VM restored from
//! one snapshot shares its pages until it writes them.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_vmm::{Memory, Vm, VmConfig};
use serde::{Deserialize, Serialize};

use crate::runtime::Runtime;
use crate::{Sandbox, SandboxError};

/// Guest RAM, as a sparse file of the VM's memory size.
pub const MEM_FILE: &str = "mem";
/// QEMU's device state, saved without RAM.
pub const STATE_FILE: &str = "state";
/// The disk, a qcow2 layer on the image's base disk.
pub const DISK_FILE: &str = "disk.qcow2";
/// Run directories of the helper VMs that turn a stream with RAM into the usual files start so.
pub const HELPER_PREFIX: &str = "save-";
/// A stream with RAM in it, on its way to becoming [`MEM_FILE`] + [`STATE_FILE`].
pub(crate) const FULL_STATE_FILE: &str = "state.full";
/// Added to a state file's name while it is written: renamed once whole, so a daemon killed half
/// way never leaves a file that looks like a saved machine.
const PARTIAL_SUFFIX: &str = ".partial";

/// Where `file` is written until it is whole.
fn partial(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(PARTIAL_SUFFIX);
    PathBuf::from(name)
}

/// What [`Sandbox::suspend`] left in a run directory, for a daemon that took over after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedMachine {
    Nothing,
    /// A save cut short: of no use.
    Partial,
    /// A whole machine, which [`Origin::Suspended`](crate::Origin::Suspended) continues: the
    /// device state with the RAM file, or a stream with RAM in it.
    Complete,
}

impl SavedMachine {
    pub fn of(dir: &Path) -> SavedMachine {
        let has = |f: &str| dir.join(f).exists();
        if (has(STATE_FILE) && has(MEM_FILE)) || has(FULL_STATE_FILE) {
            SavedMachine::Complete
        } else if has(STATE_FILE) || [STATE_FILE, FULL_STATE_FILE].iter().any(|f| partial(&dir.join(f)).exists()) {
            SavedMachine::Partial
        } else {
            SavedMachine::Nothing
        }
    }
}

/// Remove the saved machine files of a run directory: every one, or (`keep_complete`) only those
/// a [`SavedMachine::Complete`] does not need. Never the RAM file: a running VM may use it.
/// Returns what it removed.
pub fn discard_saved(dir: &Path, keep_complete: bool) -> Vec<PathBuf> {
    let mut doomed: Vec<PathBuf> = [STATE_FILE, FULL_STATE_FILE].iter().map(|f| partial(&dir.join(f))).collect();
    let whole = dir.join(STATE_FILE).exists() && dir.join(MEM_FILE).exists();
    if !keep_complete || whole {
        // With the device state and its RAM file whole, a stream with RAM is a leftover of the
        // helper that made them.
        doomed.push(dir.join(FULL_STATE_FILE));
    }
    if !keep_complete || !whole {
        doomed.push(dir.join(STATE_FILE));
    }
    doomed.retain(|f| std::fs::remove_file(f).is_ok());
    doomed
}

/// What a saved machine can only be restored with: QEMU's device state is specific to the QEMU
/// version and the accelerator, and the guest's memory to the kernel and agent it booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub qemu: String,
    pub accel: String,
    pub kernel: String,
    /// The initramfs build (its name carries the digest of the agent, kernel and modules in it).
    pub initramfs: String,
}

impl Fingerprint {
    /// This host's.
    pub fn of(rt: &Runtime) -> Fingerprint {
        Fingerprint {
            qemu: rt.qemu_version.clone(),
            accel: rt.accel.accel.to_string(),
            kernel: rt.kernel.release.clone(),
            initramfs: rt.initrd.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }

    /// Why a machine saved with `self` cannot run on a host with `current`, if it cannot.
    pub fn mismatch(&self, current: &Fingerprint) -> Option<String> {
        let differs = |what: &str, saved: &str, now: &str| {
            (saved != now).then(|| format!("it was saved with {what} {saved}, and this host now has {what} {now}"))
        };
        differs("QEMU", &self.qemu, &current.qemu)
            .or_else(|| differs("accelerator", &self.accel, &current.accel))
            .or_else(|| differs("guest kernel", &self.kernel, &current.kernel))
            .or_else(|| differs("agent build", &self.initramfs, &current.initramfs))
    }
}

impl Sandbox {
    /// Save the whole machine into the empty directory `dest`. The guest is paused while its
    /// device state, RAM file and disk overlay are copied, then runs on with its clock set and
    /// its RNG reseeded. A guest whose RAM is not its own file (it was restored from a snapshot)
    /// is saved with RAM in the stream, which a helper QEMU then turns into the usual files.
    pub async fn snapshot(&self, rt: &Runtime, dest: &Path) -> Result<(), SandboxError> {
        let begun = std::time::Instant::now();
        let mut vm = self.vm.lock().await;
        let saved = async {
            let ram_in_file = vm.save(&dest.join(if self.ram_is_own() { STATE_FILE } else { FULL_STATE_FILE })).await?;
            let (mem, overlay) = (self.dir.join(MEM_FILE), self.dir.join(crate::OVERLAY_FILE));
            let (dest, image) = (dest.to_path_buf(), self.image.clone());
            let images = rt.images.clone();
            let roots = rt.jail.as_ref().map(|j| j.read_roots.clone());
            blocking(move || {
                // A jailed QEMU writes its disk's header: what it names is read only once it
                // checks out (qemu-img below would read it as the daemon's user).
                if let Some(roots) = roots {
                    moat_vmm::check_disk(&overlay, &roots).map_err(moat_vmm::VmmError::from)?;
                }
                if ram_in_file {
                    copy_sparse(&mem, &dest.join(MEM_FILE))?;
                }
                Ok(images.freeze_overlay(&image, &overlay, &dest.join(DISK_FILE))?)
            })
            .await
        }
        .await;
        // Whatever happened, the sandbox runs on.
        let resumed = vm.cont().await;
        drop(vm);
        saved?;
        resumed?;
        let paused = begun.elapsed();
        match tokio::time::timeout(Duration::from_secs(5), self.link().resync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(sandbox = %self.id, error = %e, "resyncing the clock after a snapshot failed"),
            Err(_) => tracing::warn!(sandbox = %self.id, "the agent did not answer the resync after a snapshot"),
        }
        if !self.ram_is_own() {
            materialize(rt, &self.cfg, dest, &dest.join(DISK_FILE)).await?;
        }
        let split = begun.elapsed();
        let dir = dest.to_path_buf();
        let shared_gid = rt.jail.as_ref().and_then(|j| j.ids.shared_gid());
        blocking(move || {
            let mem = dir.join(MEM_FILE);
            moat_vmm::seal_snapshot_ram(&mem, shared_gid)
                .map_err(|e| SandboxError::Io { what: format!("sealing {}", mem.display()), source: e })?;
            sync_dir(&dir)
        })
        .await?;
        tracing::debug!(sandbox = %self.id, ?paused, ?split, synced = ?begun.elapsed(), "snapshot saved");
        Ok(())
    }

    /// Save the machine into its run directory and end QEMU: the sandbox holds no memory until
    /// [`Origin::Suspended`](crate::Origin::Suspended) starts it again. On failure the sandbox
    /// keeps running. The state is whole on disk ([`SavedMachine::Complete`]) before QEMU ends.
    pub async fn suspend(&self, rt: &Runtime) -> Result<(), SandboxError> {
        let own = self.ram_is_own();
        let saved = self.dir.join(if own { STATE_FILE } else { FULL_STATE_FILE });
        discard_saved(&self.dir, false);
        let writing = partial(&saved);
        let mut vm = self.vm.lock().await;
        let written = match vm.save(&writing).await {
            Ok(_) => std::fs::rename(&writing, &saved)
                .map_err(|e| SandboxError::Io { what: format!("renaming {}", writing.display()), source: e }),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = written {
            let _ = vm.cont().await;
            discard_saved(&self.dir, false);
            return Err(e);
        }
        self.link().close();
        vm.stop(Duration::ZERO).await?;
        drop(vm);
        if !own {
            let (mem, dir) = (self.dir.join(MEM_FILE), self.dir.clone());
            blocking(move || remove_if_exists(&mem)).await?;
            // Without the RAM file the stream itself is resumed, only more slowly.
            if let Err(e) = materialize(rt, &self.cfg, &dir, &dir.join(crate::OVERLAY_FILE)).await {
                tracing::warn!(sandbox = %self.id, error = %e, "splitting the saved RAM into its own file failed");
                let mem = self.dir.join(MEM_FILE);
                blocking(move || remove_if_exists(&mem)).await?;
            }
        }
        let dir = self.dir.clone();
        blocking(move || sync_dir(&dir)).await
    }

    fn ram_is_own(&self) -> bool {
        self.cfg.memory.as_ref().is_some_and(Memory::is_shared)
    }
}

/// Turn `dir/state.full` (device state with RAM) into `dir/mem` + `dir/state`: a helper QEMU
/// with the same machine loads it into a fresh RAM file, paused, and saves it again without RAM.
/// `state.full` goes only once `state` is whole.
async fn materialize(rt: &Runtime, machine: &VmConfig, dir: &Path, disk: &Path) -> Result<(), SandboxError> {
    let name = format!("{HELPER_PREFIX}{}", crate::new_id());
    let cfg = VmConfig {
        name: name.clone(),
        run_dir: rt.config.run_dir().join(&name),
        memory: Some(Memory::Own(dir.join(MEM_FILE))),
        root_disk: Some(disk.to_path_buf()),
        incoming: true,
        ..machine.clone()
    };
    let full = dir.join(FULL_STATE_FILE);
    let state = dir.join(STATE_FILE);
    let writing = partial(&state);
    let result = async {
        let mut vm = Vm::spawn(&cfg, true).await?;
        let saved = async {
            vm.load(&full, false).await?;
            vm.save(&writing).await
        }
        .await;
        vm.stop(Duration::ZERO).await?;
        saved?;
        std::fs::rename(&writing, &state)
            .map_err(|e| SandboxError::Io { what: format!("renaming {}", writing.display()), source: e })
    }
    .await;
    let _ = std::fs::remove_dir_all(&cfg.run_dir);
    let _ = std::fs::remove_file(if result.is_ok() { &full } else { &writing });
    result
}

/// Run blocking file work off the async runtime.
async fn blocking(f: impl FnOnce() -> Result<(), SandboxError> + Send + 'static) -> Result<(), SandboxError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(SandboxError::Io { what: "a file task".into(), source: std::io::Error::other(e.to_string()) })
    })
}

/// Remove a file that may not exist.
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), SandboxError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(SandboxError::Io { what: format!("removing {}", path.display()), source: e })
        }
        _ => Ok(()),
    }
}

/// Copy a sparse file, skipping its holes (guest RAM is mostly holes). Written by hand: no crate
/// copies sparse files, and `std::fs::copy` fills the holes in.
pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> Result<(), SandboxError> {
    use rustix::fs::{copy_file_range, seek, SeekFrom};
    let io = |what: String| move |e: std::io::Error| SandboxError::Io { what, source: e };
    let what = format!("copying {} to {}", src.display(), dst.display());
    let from = std::fs::File::open(src).map_err(io(what.clone()))?;
    let to = std::fs::File::create(dst).map_err(io(what.clone()))?;
    let len = from.metadata().map_err(io(what.clone()))?.len();
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(from.as_fd(), SeekFrom::Data(pos as i64)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(e) => return Err(io(what)(e.into())),
        };
        let hole = seek(from.as_fd(), SeekFrom::Hole(data as i64)).map_err(|e| io(what.clone())(e.into()))?.min(len);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in) as usize;
            let n = copy_file_range(from.as_fd(), Some(&mut off_in), to.as_fd(), Some(&mut off_out), want)
                .map_err(|e| io(what.clone())(e.into()))?;
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    to.set_len(len).map_err(io(what))?;
    Ok(())
}

/// Flush every file of a directory, and the directory, to disk.
fn sync_dir(dir: &Path) -> Result<(), SandboxError> {
    let io = |p: &PathBuf| {
        let what = format!("syncing {}", p.display());
        move |e: std::io::Error| SandboxError::Io { what, source: e }
    };
    let entries = std::fs::read_dir(dir).map_err(io(&dir.to_path_buf()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
        }
    }
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io(&dir.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_copies_keep_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[7u8; 100_000]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks < 4 << 20, "holes stay holes: {blocks} bytes allocated");
    }

    #[test]
    fn a_saved_machine_is_whole_once_renamed_and_discarding_keeps_what_a_resume_needs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let touch = |f: &str| std::fs::write(d.join(f), b"x").unwrap();
        let names = |paths: Vec<PathBuf>| -> Vec<String> {
            paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
        };
        touch(MEM_FILE); // a running VM's own RAM file
        assert_eq!(SavedMachine::of(d), SavedMachine::Nothing);
        touch("state.partial");
        assert_eq!(SavedMachine::of(d), SavedMachine::Partial, "a save cut short");
        std::fs::rename(d.join("state.partial"), d.join(STATE_FILE)).unwrap();
        assert_eq!(SavedMachine::of(d), SavedMachine::Complete);

        // The helper that split RAM off was cut short after its rename: the stream is a leftover.
        touch(FULL_STATE_FILE);
        touch("state.full.partial");
        assert_eq!(names(discard_saved(d, true)), ["state.full.partial", FULL_STATE_FILE]);
        assert_eq!(SavedMachine::of(d), SavedMachine::Complete);
        assert_eq!(names(discard_saved(d, false)), [STATE_FILE]);
        assert_eq!(SavedMachine::of(d), SavedMachine::Nothing);
        assert!(d.join(MEM_FILE).exists(), "the RAM file is never discarded");

        // A stream with RAM in it is a whole machine by itself, kept while nothing replaces it.
        std::fs::remove_file(d.join(MEM_FILE)).unwrap();
        touch(FULL_STATE_FILE);
        assert_eq!(SavedMachine::of(d), SavedMachine::Complete);
        assert!(discard_saved(d, true).is_empty());
        assert_eq!(SavedMachine::of(d), SavedMachine::Complete);
    }

    #[test]
    fn a_mismatch_names_what_changed() {
        let a =
            Fingerprint { qemu: "7.2.22".into(), accel: "tcg".into(), kernel: "6.1".into(), initramfs: "i-1".into() };
        assert_eq!(a.mismatch(&a.clone()), None);
        let b = Fingerprint { qemu: "8.0.0".into(), ..a.clone() };
        assert_eq!(a.mismatch(&b).unwrap(), "it was saved with QEMU 7.2.22, and this host now has QEMU 8.0.0");
        let c = Fingerprint { accel: "kvm".into(), ..a.clone() };
        assert!(a.mismatch(&c).unwrap().contains("accelerator tcg"));
    }
}
