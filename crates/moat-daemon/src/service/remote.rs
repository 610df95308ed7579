//! Snapshots through registries: push a snapshot as an OCI artifact, pull one so sandboxes start
//! from it, and the template store (templates pulled when this host has none, pushed when it
//! makes one). The artifact format is `moat_image::artifact`'s; what a restore must match is
//! checked from the artifact's config before its memory is downloaded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_api::{ErrorCode, PushedSnapshot, SnapshotInfo, SnapshotKind, SnapshotTransfer};
use moat_image::{
    ArtifactImage, ArtifactMachine, ImageError, PullOptions, PullProgress, RemoteSnapshot, SnapshotArtifact,
    SnapshotFiles,
};
use moat_sandbox::{Fingerprint, Shape, DISK_FILE, MEM_FILE, STATE_FILE};

use super::images::credentials;
use super::snapshots::{disk_usage, Saving};
use super::Service;
use crate::error::{image_error, ServiceError};

/// Most seconds between two progress events of one transfer.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// `REGISTRY/REPOSITORY:TAG` → (`REGISTRY/REPOSITORY`, `TAG`), as a pulled snapshot is named
/// (`SANDBOX:NAME` with the repository as its sandbox); a digest reference is named by the
/// digest's start.
fn split_reference(reference: &str) -> (String, String) {
    if let Some((repo, digest)) = reference.split_once('@') {
        let hex = digest.trim_start_matches("sha256:");
        return (repo.to_string(), format!("sha256-{}", &hex[..hex.len().min(12)]));
    }
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo.to_string(), tag.to_string()),
        _ => (reference.to_string(), "latest".to_string()),
    }
}

fn check_reference(reference: &str) -> Result<(), ServiceError> {
    if reference.len() > 255 || !moat_api::is_remote_snapshot(reference) {
        return Err(ServiceError::invalid(format!(
            "{reference:?} is not a registry reference; write REGISTRY/REPOSITORY:TAG (for example \
             registry.example.com/team/env:clean)"
        )));
    }
    moat_image::registry_of(reference).map_err(image_error)?;
    Ok(())
}

impl Service {
    /// `moat snapshot push SNAPSHOT REFERENCE`.
    pub async fn push_snapshot(&self, snapshot: &str, req: SnapshotTransfer) -> Result<PushedSnapshot, ServiceError> {
        check_reference(&req.reference)?;
        let s = self.resolve_snapshot(snapshot)?;
        let options = PullOptions { insecure: req.insecure, credentials: credentials(req.username, req.password)? };
        self.push_remote(&s, &req.reference, &options).await
    }

    async fn push_remote(
        &self,
        s: &SnapshotInfo,
        reference: &str,
        options: &PullOptions,
    ) -> Result<PushedSnapshot, ServiceError> {
        if !s.host_mounts.is_empty() {
            return Err(ServiceError::invalid(format!(
                "snapshot {} serves host directories ({}), which do not travel to other hosts",
                s.reference(),
                s.host_mounts.iter().map(|m| m.source.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let image = self.rt.images.by_digest(&s.image, &s.image_digest).map_err(image_error)?;
        let artifact = SnapshotArtifact {
            format: moat_image::ARTIFACT_FORMAT,
            kind: s.kind.as_str().to_string(),
            machine: ArtifactMachine {
                qemu: s.qemu.clone(),
                accel: s.accel.clone(),
                kernel: s.kernel.clone(),
                initramfs: s.initramfs.clone(),
                vcpus: s.vcpus,
                memory_mib: s.memory_mib,
                disk_mib: s.disk_mib,
                nic: s.nic,
            },
            image: ArtifactImage {
                name: s.image.clone(),
                digest: s.image_digest.clone(),
                config: image.config,
                size_bytes: image.size_bytes,
            },
            template_key: self.db(|db| db.template_key_of(&s.id))?,
            created_at: s.created_at,
        };
        let dir = self.snapshot_dir(&s.id);
        let (disk, state, mem) = (dir.join(DISK_FILE), dir.join(STATE_FILE), dir.join(MEM_FILE));
        let files = SnapshotFiles { disk: &disk, state: &state, mem: &mem };
        let what = format!("push {reference}");
        let report = |m: String| self.progress_event(s.sandbox_id.as_deref(), &what, &m);
        let _saving = Saving::new(self);
        let pushed = moat_image::push_snapshot(&self.rt.images, reference, options, files, &artifact, &report)
            .await
            .map_err(image_error)?;
        Ok(PushedSnapshot {
            reference: reference.to_string(),
            digest: pushed.digest,
            uploaded_bytes: pushed.uploaded_bytes,
            reused_bytes: pushed.reused_bytes,
        })
    }

    /// `moat snapshot pull REFERENCE`: fetch the artifact (again, if the tag moved).
    pub async fn pull_snapshot(&self, req: SnapshotTransfer) -> Result<SnapshotInfo, ServiceError> {
        check_reference(&req.reference)?;
        let options = PullOptions { insecure: req.insecure, credentials: credentials(req.username, req.password)? };
        let remote = self.inspect_remote(&req.reference, &options).await.map_err(image_error)?;
        self.pull_remote(&req.reference, remote, None).await
    }

    /// The snapshot a `from` naming a registry reference means: one pulled before, else pulled now.
    pub(crate) async fn remote_snapshot(
        &self,
        reference: &str,
        login: Option<moat_api::RegistryLogin>,
    ) -> Result<SnapshotInfo, ServiceError> {
        check_reference(reference)?;
        if let Some(s) = self.db(|db| db.remote_snapshot(reference))? {
            return Ok(s);
        }
        let options = PullOptions { insecure: false, credentials: login.map(|l| (l.username, l.password)) };
        let remote = self.inspect_remote(reference, &options).await.map_err(image_error)?;
        self.pull_remote(reference, remote, None).await
    }

    /// Read the manifest and config of `reference`: a pull's first step, and all a caller needs
    /// to tell a missing artifact (`ImageError::RemoteMissing`) from a failure.
    async fn inspect_remote(&self, reference: &str, options: &PullOptions) -> Result<RemoteSnapshot, ImageError> {
        self.progress_event(None, &format!("pull {reference}"), "reading the manifest");
        moat_image::inspect_snapshot(reference, options).await
    }

    /// Pull `reference`, whose manifest and config are `remote`, into a snapshot (with
    /// `template_key`: into the template of that key).
    /// Every blob is verified by digest and kept in the image store's remote cache, so a pull cut
    /// short continues where it stopped; the snapshot's row is written before its files and
    /// marked ready after them, as for a local snapshot.
    async fn pull_remote(
        &self,
        reference: &str,
        remote: RemoteSnapshot,
        template_key: Option<&str>,
    ) -> Result<SnapshotInfo, ServiceError> {
        let lock = self.template_locks.of(reference);
        let _one_pull = lock.lock().await;
        let report = |m: String| self.progress_event(None, &format!("pull {reference}"), &m);
        let existing = self.db(|db| db.remote_snapshot(reference))?;
        if let Some(s) = existing.as_ref().filter(|s| s.remote_digest.as_deref() == Some(remote.digest.as_str())) {
            report(format!("up to date ({})", remote.digest));
            return Ok(s.clone());
        }
        let a = &remote.artifact;
        // Checked before anything large is fetched: an artifact this host cannot restore costs
        // one manifest and one config.
        let saved = Fingerprint {
            qemu: a.machine.qemu.clone(),
            accel: a.machine.accel.clone(),
            kernel: a.machine.kernel.clone(),
            initramfs: a.machine.initramfs.clone(),
        };
        if let Some(why) = saved.mismatch(&Fingerprint::of(&self.rt)) {
            return Err(ServiceError::new(
                ErrorCode::Incompatible,
                format!("snapshot {reference} cannot be restored on this host: {why}"),
                "saved VMs do not carry across QEMU, accelerator, kernel or agent changes; push it from a host \
                 with the same ones, or boot a sandbox here and snapshot that",
            ));
        }
        Shape::new(a.machine.vcpus, a.machine.memory_mib, a.machine.disk_mib)
            .map_err(|e| ServiceError::invalid(format!("snapshot {reference} has an impossible machine: {e}")))?;
        moat_image::validate_image_name(&a.image.name).map_err(image_error)?;
        let (sandbox_name, name) = split_reference(reference);
        let kind = if template_key.is_some() { SnapshotKind::Template } else { SnapshotKind::Snapshot };
        let snapshot = SnapshotInfo {
            id: moat_sandbox::new_id(),
            name,
            kind,
            sandbox_id: None,
            sandbox_name,
            image: a.image.name.clone(),
            image_digest: a.image.digest.clone(),
            vcpus: a.machine.vcpus,
            memory_mib: a.machine.memory_mib,
            disk_mib: a.machine.disk_mib,
            size_bytes: 0,
            created_at: a.created_at,
            qemu: saved.qemu,
            accel: saved.accel,
            kernel: saved.kernel,
            initramfs: saved.initramfs,
            nic: a.machine.nic,
            host_mounts: Vec::new(),
            dependents: Vec::new(),
            remote: Some(reference.to_string()),
            remote_digest: Some(remote.digest.clone()),
        };
        let _saving = Saving::new(self);
        let progress = self.layer_progress(format!("pull {reference}"));
        let fetched = remote.fetch(&self.rt.images, &progress).await.map_err(image_error)?;
        self.db(|db| db.insert_snapshot_on(&snapshot, template_key, Some(&fetched.base_digest)))?;
        report("unpacking".into());
        let dir = self.snapshot_dir(&snapshot.id);
        let (images, machine, image) = (self.rt.images.clone(), a.machine.clone(), a.image.clone());
        let shared_gid = self.rt.jail.as_ref().and_then(|j| j.ids.shared_gid());
        let source = format!("snapshot {reference}@{}", remote.digest);
        let target = dir.clone();
        let unpacked = tokio::task::spawn_blocking(move || -> Result<(), ServiceError> {
            let io = |what: String| move |e: std::io::Error| ServiceError::internal(format!("{what}: {e}"));
            std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
            fetched.unpack(&machine, &target, [MEM_FILE, STATE_FILE, DISK_FILE]).map_err(image_error)?;
            images.adopt_pulled_image(&image, &fetched.base, &source).map_err(image_error)?;
            let mem = target.join(MEM_FILE);
            moat_vmm::seal_snapshot_ram(&mem, shared_gid).map_err(io(format!("sealing {}", mem.display())))?;
            for f in [MEM_FILE, STATE_FILE, DISK_FILE] {
                let path = target.join(f);
                std::fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io(format!("syncing {}", path.display())))?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(ServiceError::internal(format!("unpacking the snapshot: {e}"))));
        if let Err(e) = unpacked {
            let _ = std::fs::remove_dir_all(&dir);
            self.db(|db| db.delete_snapshot(&snapshot.id))?;
            return Err(e);
        }
        if let Some(old) = existing {
            self.db(|db| db.supersede_remote(&old.id))?;
        }
        let size = disk_usage(&dir);
        self.db(|db| db.snapshot_ready(&snapshot.id, size))?;
        report(format!("pulled ({})", remote.digest));
        self.resolve_snapshot(&snapshot.id)
    }

    /// The template of `key` from the template store, if the store has one this host can restore
    /// for `info`'s image and size. `Ok(None)`: the store has none.
    pub(crate) async fn template_from_store(
        &self,
        store: &str,
        key: &str,
        info: &moat_api::SandboxInfo,
    ) -> Result<Option<SnapshotInfo>, ServiceError> {
        let reference = format!("{store}:{key}");
        let options = self.store_options(&reference)?;
        // A missing tag is the usual answer (no host made this template yet), not a failure.
        let remote = match self.inspect_remote(&reference, &options).await {
            Ok(remote) => remote,
            Err(ImageError::RemoteMissing { .. }) => return Ok(None),
            Err(e) => return Err(image_error(e)),
        };
        let t = self.pull_remote(&reference, remote, Some(key)).await?;
        // The store is trusted no further than any registry: its template must be of this very
        // machine, or it is not used.
        let fits = t.image_digest == info.image_digest
            && (t.vcpus, t.memory_mib, t.disk_mib) == (info.vcpus, info.memory_mib, info.disk_mib)
            && t.nic == (info.net.mode != moat_api::NetMode::None)
            && t.kind == SnapshotKind::Template;
        if !fits {
            let _ = self.remove_snapshot(&t.id).await;
            return Err(ServiceError::invalid(format!(
                "{reference} is not a template of image {} ({}) with {} vCPUs, {} MiB and a {} MiB disk",
                info.image, info.image_digest, info.vcpus, info.memory_mib, info.disk_mib
            )));
        }
        Ok(Some(t))
    }

    /// Push the template this host just made to the template store, in the background. A failure
    /// is an event and a note on `sandbox` (the sandbox whose boot made it).
    pub(crate) fn push_template_later(self: &Arc<Self>, store: &str, template: SnapshotInfo, key: &str, sandbox: &str) {
        let reference = format!("{store}:{key}");
        let (svc, sandbox, busy) = (self.clone(), sandbox.to_string(), self.hold());
        tokio::spawn(async move {
            let _busy = busy;
            let pushed = match svc.store_options(&reference) {
                Ok(options) => svc.push_remote(&template, &reference, &options).await,
                Err(e) => Err(e),
            };
            match pushed {
                Ok(p) => {
                    tracing::info!(reference = %p.reference, digest = %p.digest, uploaded = p.uploaded_bytes, "template pushed to the store")
                }
                Err(e) => {
                    let note = format!("template store: pushing the template to {reference} failed: {}", e.message);
                    tracing::warn!(%note);
                    let _ = svc.db(|db| db.note(&sandbox, &note));
                }
            }
        });
    }

    /// How the daemon reaches its template store: its own Docker config's credentials.
    fn store_options(&self, reference: &str) -> Result<PullOptions, ServiceError> {
        Ok(PullOptions {
            insecure: false,
            credentials: moat_image::docker_credentials(reference).map_err(image_error)?,
        })
    }

    /// One progress event (kind `snapshot`) of a push or pull.
    fn progress_event(&self, sandbox: Option<&str>, what: &str, message: &str) {
        let _ = self.db(|db| db.event(sandbox, moat_api::SNAPSHOT_EVENT, &format!("{what}: {message}")));
    }

    /// Byte progress of blob downloads as events: each blob's start and end, and at most one a
    /// second between.
    fn layer_progress(&self, what: String) -> impl Fn(PullProgress) + Send + Sync + '_ {
        let last = Mutex::new(Instant::now() - PROGRESS_EVERY);
        move |p| {
            let message = match p {
                PullProgress::Message(m) => m,
                PullProgress::Layer { digest, done, total } => {
                    let mut last = last.lock().expect("no panics while held");
                    if done != 0 && done != total && last.elapsed() < PROGRESS_EVERY {
                        return;
                    }
                    *last = Instant::now();
                    format!("{} {} of {} MiB", &digest[..digest.len().min(19)], done >> 20, total.div_ceil(1 << 20))
                }
            };
            self.progress_event(None, &what, &message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulled_snapshots_are_named_by_repository_and_tag() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        for (reference, repo, name) in [
            ("registry.example.com/team/env:clean", "registry.example.com/team/env", "clean"),
            ("127.0.0.1:5000/env:v1", "127.0.0.1:5000/env", "v1"),
            ("127.0.0.1:5000/env", "127.0.0.1:5000/env", "latest"),
            (&format!("registry.example.com/env@{digest}"), "registry.example.com/env", "sha256-abababababab"),
        ] {
            assert_eq!(split_reference(reference), (repo.to_string(), name.to_string()), "{reference}");
        }
        for bad in ["box:clean", "nope", "a/b c:d"] {
            assert!(check_reference(bad).is_err(), "{bad}");
        }
        assert!(check_reference("registry.example.com/team/env:clean").is_ok());
    }
}
