//! Which saved machines a session may start from or go back to: the snapshots of sandboxes it
//! owns, and the images' templates (a freshly booted image holds nobody's data). A snapshot
//! holds its sandbox's memory and disk, so another session's (or the CLI's) is as private as the
//! sandbox itself. References are resolved here, among the usable snapshots only, and the daemon
//! is handed the exact id: a foreign snapshot, or an id prefix that only foreign snapshots share,
//! gets the very answer a missing one gets.

use moat_api::{SandboxInfo, SnapshotInfo, SnapshotKind};

use crate::error::ToolError;
use crate::server::MoatMcp;

/// Why a reference named no single usable snapshot.
#[derive(Debug, PartialEq)]
enum Miss {
    None,
    Several(usize),
}

/// The snapshot `reference` names among `usable`: `SANDBOX:NAME` (the sandbox by name, id or id
/// prefix), a snapshot name (with `by_name`, among one sandbox's), or an id or unique id prefix.
fn pick(usable: Vec<SnapshotInfo>, reference: &str, by_name: bool) -> Result<SnapshotInfo, Miss> {
    if reference.is_empty() {
        return Err(Miss::None);
    }
    if by_name {
        if let Some(s) = usable.iter().find(|s| s.kind == SnapshotKind::Snapshot && s.name == reference) {
            return Ok(s.clone());
        }
    }
    let mut found: Vec<SnapshotInfo> = match reference.split_once(':') {
        Some((sandbox, name)) if !sandbox.is_empty() => usable
            .into_iter()
            .filter(|s| s.kind == SnapshotKind::Snapshot && s.name == name)
            .filter(|s| s.sandbox_name == sandbox || s.sandbox_id.as_deref().is_some_and(|id| id.starts_with(sandbox)))
            .collect(),
        Some(_) => Vec::new(),
        None => usable.into_iter().filter(|s| s.id.starts_with(reference)).collect(),
    };
    match found.len() {
        0 => Err(Miss::None),
        1 => Ok(found.remove(0)),
        n => Err(Miss::Several(n)),
    }
}

impl MoatMcp {
    /// Whether this session may use the snapshot at all.
    fn may_use(&self, s: &SnapshotInfo) -> bool {
        s.kind == SnapshotKind::Template
            || self.policy.all_sandboxes
            || s.sandbox_id.as_deref().is_some_and(|id| self.owns(id))
    }

    /// The snapshot a new sandbox may start from (`sandbox_create.from_snapshot`).
    pub(crate) async fn usable_snapshot(&self, reference: &str) -> Result<SnapshotInfo, ToolError> {
        let all = self.client.snapshots(None).await?;
        let usable = all.into_iter().filter(|s| self.may_use(s)).collect();
        self.picked(pick(usable, reference.trim(), false), reference)
    }

    /// One of `sandbox`'s own snapshots (revert, fork), by name, `SANDBOX:NAME` or id.
    pub(crate) async fn snapshot_of(&self, sandbox: &SandboxInfo, reference: &str) -> Result<SnapshotInfo, ToolError> {
        let own = self.client.snapshots(Some(&sandbox.id)).await?;
        self.picked(pick(own, reference.trim(), true), reference)
    }

    fn picked(&self, pick: Result<SnapshotInfo, Miss>, reference: &str) -> Result<SnapshotInfo, ToolError> {
        match pick {
            Ok(s) => Ok(s),
            Err(Miss::None) => Err(ToolError::new(
                format!("there is no snapshot {reference:?} that this MCP session may use"),
                "sandbox_info lists a sandbox's snapshots with their references; a session may use the snapshots \
                 of its own sandboxes",
            )),
            Err(Miss::Several(n)) => Err(ToolError::new(
                format!("{reference:?} matches {n} snapshots this MCP session may use"),
                "name the snapshot as SANDBOX:NAME, as sandbox_snapshot returned it",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, kind: SnapshotKind, sandbox: Option<&str>, sandbox_name: &str, name: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: name.into(),
            kind,
            sandbox_id: sandbox.map(Into::into),
            sandbox_name: sandbox_name.into(),
            image: "minimal".into(),
            image_digest: String::new(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 4096,
            size_bytes: 0,
            created_at: 0,
            qemu: String::new(),
            accel: String::new(),
            kernel: String::new(),
            initramfs: String::new(),
            nic: true,
            host_mounts: Vec::new(),
            dependents: Vec::new(),
            remote: None,
            remote_digest: None,
        }
    }

    #[test]
    fn references_match_only_among_usable_snapshots() {
        let usable = || {
            vec![
                snap("a1b2c3", SnapshotKind::Snapshot, Some("5b0x00"), "box", "clean"),
                snap("a1ffff", SnapshotKind::Snapshot, Some("5b0x00"), "box", "later"),
                snap("e9e9e9", SnapshotKind::Template, None, "template", "minimal"),
            ]
        };
        let id = |p: Result<SnapshotInfo, Miss>| p.expect("one snapshot").id;
        assert_eq!(id(pick(usable(), "box:clean", false)), "a1b2c3");
        assert_eq!(id(pick(usable(), "5b0:later", false)), "a1ffff");
        assert_eq!(id(pick(usable(), "a1b", false)), "a1b2c3");
        assert_eq!(id(pick(usable(), "e", false)), "e9e9e9");
        assert_eq!(id(pick(usable(), "later", true)), "a1ffff");
        assert_eq!(pick(usable(), "a1", false), Err(Miss::Several(2)));
        for missing in ["later", "other:clean", "box:", ":clean", "b", "minimal", "template:minimal", ""] {
            assert_eq!(pick(usable(), missing, false), Err(Miss::None), "{missing:?}");
        }
    }
}
