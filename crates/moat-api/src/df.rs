//! `GET /v1/df` (`moat df`): where the disk under the daemon's home goes, and what the cleaning
//! commands would give back. Bytes are allocated bytes (blocks in use): disks are sparse, and
//! their apparent sizes say little about the host's disk.

use serde::{Deserialize, Serialize};

/// How many things of one kind there are, and the bytes they take on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskUse {
    pub count: u64,
    pub bytes: u64,
}

impl DiskUse {
    /// Count one more thing of `bytes`.
    pub fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes = self.bytes.saturating_add(bytes);
    }
}

/// What each cleaning command would free now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reclaimable {
    /// `moat prune` (`POST /v1/prune`): the sandboxes at rest (stopped, failed, expired, paused)
    /// with their disks, saved memory, and the snapshots that go with them.
    pub prune: DiskUse,
    /// `moat image gc` (`POST /v1/images/gc`): images no name points at and nothing uses, cached
    /// layers no kept image needs, unfinished downloads and builds.
    pub image_gc: DiskUse,
    /// `moat gc` (`POST /v1/gc`): what `image_gc` frees, and what crashes left: directories
    /// of sandboxes, snapshots and volumes without a record, and the saved memory of sandboxes
    /// that are not paused.
    pub gc: DiskUse,
}

/// The disk use of a daemon's home, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskUsage {
    /// Committed images: their base disks.
    pub images: DiskUse,
    /// The cache of layer blobs pulled images were unpacked from (downloads in progress too).
    pub layers: DiskUse,
    /// Snapshots taken by users (and by `fork`).
    pub snapshots: DiskUse,
    /// The booted VMs kept per image so that sandboxes start without booting.
    pub templates: DiskUse,
    /// Every sandbox's run directory: its disk overlay, and saved memory while it is paused.
    pub sandboxes: DiskUse,
    pub volumes: DiskUse,
    pub reclaimable: Reclaimable,
}

impl DiskUsage {
    /// The kinds in the order `moat df` shows them, with their names.
    pub fn kinds(&self) -> [(&'static str, DiskUse); 6] {
        [
            ("images", self.images),
            ("layers", self.layers),
            ("snapshots", self.snapshots),
            ("templates", self.templates),
            ("sandboxes", self.sandboxes),
            ("volumes", self.volumes),
        ]
    }

    /// Bytes of every kind together.
    pub fn total_bytes(&self) -> u64 {
        self.kinds().iter().fold(0u64, |sum, (_, u)| sum.saturating_add(u.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_adds_every_kind_once() {
        let mut usage = DiskUsage::default();
        usage.images.add(100);
        usage.layers.add(20);
        usage.sandboxes.add(3);
        usage.sandboxes.add(4);
        usage.reclaimable.prune.add(3);
        assert_eq!(usage.sandboxes, DiskUse { count: 2, bytes: 7 });
        assert_eq!(usage.total_bytes(), 127);
        let back: DiskUsage = serde_json::from_str(&serde_json::to_string(&usage).unwrap()).unwrap();
        assert_eq!(back, usage);
    }
}
