//! `GET /v1/df`: where the disk under the home goes, and what `prune`, `image gc` and `gc` would
//! free. Sizes are allocated bytes (`st_blocks × 512`): disks are sparse, and what they claim to
//! be says little about the host's disk.
//!
//! The predictions follow the rules of the operations they predict ([`Service::prune`],
//! [`moat_image::ImageStore::gc`], [`Service::gc`]) as they stand when nothing else runs; a
//! change to those rules belongs here too.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moat_api::{DiskUsage, DiskUse, Phase, SandboxInfo, SnapshotInfo, SnapshotKind, VolumeInfo};

use super::Service;
use crate::error::{image_error, ServiceError};

/// Most directory entries one measurement visits: a home is a few thousand files; a guest cannot
/// make the walk unbounded (it writes inside its disk, not the home), but a damaged home might.
const MAX_ENTRIES: usize = 1_000_000;

/// The records a measurement needs, read at once.
struct Records {
    sandboxes: Vec<SandboxInfo>,
    snapshots: Vec<SnapshotInfo>,
    volumes: Vec<VolumeInfo>,
}

impl Service {
    /// The disk use of the home (see the module's documentation).
    pub async fn disk_usage(self: &Arc<Self>) -> Result<DiskUsage, ServiceError> {
        let records = Records {
            sandboxes: self.list()?,
            snapshots: self.db(|db| db.snapshots(None))?,
            volumes: self.db(|db| db.volumes())?,
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.measure(&records))
            .await
            .map_err(|e| ServiceError::internal(format!("measuring the disk use failed: {e}")))?
    }

    fn measure(&self, r: &Records) -> Result<DiskUsage, ServiceError> {
        let mut walk = Walk::default();
        let mut usage = DiskUsage::default();
        let images_root = self.rt.images.root().to_path_buf();
        for dir in entries(&images_root.join("sha256")) {
            usage.images.add(walk.allocated(&dir));
        }
        for blob in entries(&images_root.join("blobs").join("sha256")) {
            usage.layers.add(walk.allocated(&blob));
        }
        for partial in entries(&images_root.join("blobs").join("partial")) {
            usage.layers.bytes = usage.layers.bytes.saturating_add(walk.allocated(&partial));
        }
        let snapshot_bytes = |walk: &mut Walk, s: &SnapshotInfo| walk.allocated(&self.snapshot_dir(&s.id));
        for s in &r.snapshots {
            let bytes = snapshot_bytes(&mut walk, s);
            match s.kind {
                SnapshotKind::Snapshot => usage.snapshots.add(bytes),
                SnapshotKind::Template => usage.templates.add(bytes),
            }
        }
        for s in &r.sandboxes {
            usage.sandboxes.add(walk.allocated(&self.run_dir(&s.id)));
        }
        for v in &r.volumes {
            usage.volumes.add(walk.allocated(&self.volume_path(&v.id)));
        }

        // `prune`: each sandbox at rest, and its snapshots that nothing else builds on.
        for s in r.sandboxes.iter().filter(|s| s.phase.is_at_rest()) {
            usage.reclaimable.prune.add(walk.allocated(&self.run_dir(&s.id)));
            for snap in r.snapshots.iter().filter(|snap| snap.sandbox_id.as_deref() == Some(&s.id)) {
                if snap.dependents.iter().all(|d| *d == snap.sandbox_name) {
                    usage.reclaimable.prune.bytes =
                        usage.reclaimable.prune.bytes.saturating_add(snapshot_bytes(&mut walk, snap));
                }
            }
        }

        usage.reclaimable.image_gc = self.image_gc_would_free(r, &mut walk)?;

        // `gc`: the image store's share, and what crashes left.
        let mut gc = usage.reclaimable.image_gc;
        for dir in entries(&self.rt.config.run_dir()) {
            let id = file_name(&dir);
            match r.sandboxes.iter().find(|s| s.id == id) {
                None if id.starts_with(moat_sandbox::HELPER_PREFIX) => {}
                None => gc.add(walk.allocated(&dir)),
                // A sandbox at rest keeps its saved memory only while it is paused.
                Some(s) if s.phase.is_at_rest() && s.phase != Phase::Paused => {
                    for f in [moat_sandbox::MEM_FILE, moat_sandbox::STATE_FILE] {
                        let path = dir.join(f);
                        if path.exists() {
                            gc.add(walk.allocated(&path));
                        }
                    }
                }
                Some(_) => {}
            }
        }
        let snapshot_ids: HashSet<&str> = r.snapshots.iter().map(|s| s.id.as_str()).collect();
        for dir in entries(&self.snapshots_root()) {
            if !snapshot_ids.contains(file_name(&dir).as_str()) {
                gc.add(walk.allocated(&dir));
            }
        }
        let volume_ids: HashSet<String> = r.volumes.iter().map(|v| format!("{}.img", v.id)).collect();
        for file in entries(&self.volumes_root()) {
            let name = file_name(&file);
            if name.ends_with(".img") && !volume_ids.contains(&name) {
                gc.add(walk.allocated(&file));
            }
        }
        usage.reclaimable.gc = gc;
        Ok(usage)
    }

    /// What [`moat_image::ImageStore::gc`] would remove now: image directories no name points at
    /// and no sandbox or snapshot uses, layer blobs no kept image lists, unfinished downloads and
    /// staging directories.
    fn image_gc_would_free(&self, r: &Records, walk: &mut Walk) -> Result<DiskUse, ServiceError> {
        let store = &self.rt.images;
        let named = store.list().map_err(image_error)?;
        let mut keep: HashSet<String> = named.iter().map(|i| i.digest.clone()).collect();
        let mut layers: HashSet<String> = named.iter().flat_map(|i| i.layers.iter().cloned()).collect();
        let in_use = r.sandboxes.iter().map(|s| &s.image_digest).chain(r.snapshots.iter().map(|s| &s.image_digest));
        for digest in in_use.filter(|d| !d.is_empty()) {
            if keep.insert(digest.clone()) {
                if let Ok(image) = store.by_digest("", digest) {
                    layers.extend(image.layers);
                }
            }
        }
        let hex = |d: &String| d.strip_prefix("sha256:").map(str::to_string);
        let keep: HashSet<String> = keep.iter().filter_map(hex).collect();
        let layers: HashSet<String> = layers.iter().filter_map(hex).collect();
        let root = store.root();
        let mut freed = DiskUse::default();
        for dir in entries(&root.join("sha256")) {
            if !keep.contains(&file_name(&dir)) {
                freed.add(walk.allocated(&dir));
            }
        }
        for blob in entries(&root.join("blobs").join("sha256")) {
            if !layers.contains(&file_name(&blob)) {
                freed.add(walk.allocated(&blob));
            }
        }
        for partial in entries(&root.join("blobs").join("partial")) {
            freed.add(walk.allocated(&partial));
        }
        for staging in entries(root).into_iter().filter(|p| file_name(p).starts_with("tmp-")) {
            freed.add(walk.allocated(&staging));
        }
        Ok(freed)
    }
}

/// The entries of a directory (none when it cannot be read).
fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().take(MAX_ENTRIES).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// One measurement's walk of the disk: each file is counted once, however many names it has and
/// however many kinds it belongs to (a kind's bytes and a command's bytes are separate tallies).
#[derive(Default)]
struct Walk {
    visited: usize,
}

impl Walk {
    /// Bytes allocated to `path` and, for a directory, everything under it. Symbolic links are
    /// not followed; a file with several links is counted once within one call.
    fn allocated(&mut self, path: &Path) -> u64 {
        let mut seen = HashSet::new();
        let mut total = 0u64;
        let mut todo = vec![path.to_path_buf()];
        while let Some(p) = todo.pop() {
            if self.visited >= MAX_ENTRIES {
                break;
            }
            self.visited += 1;
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                todo.extend(entries(&p));
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sparse files count what they hold, not what they claim; hard links count once.
    #[test]
    fn allocated_bytes_follow_blocks_not_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("disk.img");
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(1 << 30).unwrap();
        let data = dir.path().join("sub").join("data");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(&data, vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(&data, dir.path().join("sub").join("again")).unwrap();
        let mut walk = Walk::default();
        let file = walk.allocated(&data);
        assert!(file >= 64 * 1024, "{file}");
        let all = walk.allocated(dir.path());
        assert!(all >= file && all < file + (1 << 20), "a 1 GiB sparse file and a hard link add little: {all}");
        assert_eq!(walk.allocated(&dir.path().join("absent")), 0);
    }

    #[test]
    fn a_measurement_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        let mut walk = Walk { visited: MAX_ENTRIES };
        assert_eq!(walk.allocated(dir.path()), 0);
    }
}
