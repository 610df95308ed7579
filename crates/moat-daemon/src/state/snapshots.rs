//! Snapshot and template rows: written before a snapshot's files and marked ready after them,
//! so gc knows every snapshot directory; found by id prefix or `SANDBOX:NAME`.

use moat_api::{SnapshotInfo, SnapshotKind};
use rusqlite::{params, OptionalExtension};

use super::events::append_event;
use super::{Db, StateError};

impl Db {
    /// Record a snapshot being taken (not ready: lists leave it out, gc removes it after a crash).
    pub fn insert_snapshot(&mut self, s: &SnapshotInfo, template_key: Option<&str>) -> Result<(), StateError> {
        self.insert_snapshot_on(s, template_key, None)
    }

    /// [`Db::insert_snapshot`] for a pulled snapshot, whose disk sits on the base `base_digest`.
    pub fn insert_snapshot_on(
        &mut self,
        s: &SnapshotInfo,
        template_key: Option<&str>,
        base_digest: Option<&str>,
    ) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        if let Some(sandbox) = &s.sandbox_id {
            let taken: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM snapshots WHERE sandbox_id = ?1 AND name = ?2)",
                [sandbox, &s.name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(StateError::SnapshotNameTaken(s.name.clone()));
            }
        }
        tx.execute(
            "INSERT INTO snapshots (id, name, kind, sandbox_id, sandbox_name, template_key, ready, image, image_digest,
                vcpus, memory_mib, disk_mib, size_bytes, created_at, qemu, accel, kernel, initramfs, nic, host_mounts,
                remote, remote_digest, base_digest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,
                ?22)",
            params![
                s.id,
                s.name,
                s.kind.as_str(),
                s.sandbox_id,
                s.sandbox_name,
                template_key,
                s.image,
                s.image_digest,
                s.vcpus,
                s.memory_mib,
                s.disk_mib as i64,
                s.size_bytes as i64,
                s.created_at,
                s.qemu,
                s.accel,
                s.kernel,
                s.initramfs,
                s.nic,
                serde_json::to_string(&s.host_mounts).expect("mounts always serialize"),
                s.remote,
                s.remote_digest,
                base_digest,
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A snapshot's files are complete: it may be listed and restored.
    pub fn snapshot_ready(&mut self, id: &str, size_bytes: u64) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        tx.execute("UPDATE snapshots SET ready = 1, size_bytes = ?2 WHERE id = ?1", params![id, size_bytes as i64])?;
        let (name, sandbox, sandbox_id): (String, String, Option<String>) =
            tx.query_row("SELECT name, sandbox_name, sandbox_id FROM snapshots WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        append_event(&tx, sandbox_id.as_deref(), "snapshot", &format!("snapshot {sandbox}:{name} saved ({id})"))?;
        tx.commit()?;
        Ok(())
    }

    pub fn delete_snapshot(&mut self, id: &str) -> Result<(), StateError> {
        self.conn.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Ready snapshots, oldest first: of one sandbox, or all (templates too).
    pub fn snapshots(&self, sandbox_id: Option<&str>) -> Result<Vec<SnapshotInfo>, StateError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE ready = 1 AND (?1 IS NULL OR sandbox_id = ?1)
             ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([sandbox_id], row_to_snapshot)?;
        let mut out = rows.collect::<Result<Vec<_>, _>>()?;
        for s in &mut out {
            s.dependents = self.dependents(&s.id)?;
        }
        Ok(out)
    }

    /// Every snapshot row with whether it is ready, for gc.
    pub fn all_snapshot_ids(&self) -> Result<Vec<(String, bool)>, StateError> {
        let mut stmt = self.conn.prepare("SELECT id, ready FROM snapshots")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// A ready template for `key`.
    pub fn template(&self, key: &str) -> Result<Option<SnapshotInfo>, StateError> {
        let found = self
            .conn
            .query_row(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE ready = 1 AND template_key = ?1"),
                [key],
                row_to_snapshot,
            )
            .optional()?;
        Ok(found)
    }

    /// The ready snapshots a reference could mean: an id or unique id prefix, or `SANDBOX:NAME`
    /// (the sandbox by id or name, or a removed sandbox's name).
    pub fn snapshot_candidates(&self, reference: &str) -> Result<Vec<SnapshotInfo>, StateError> {
        // At the last `:`: a pulled snapshot's "sandbox" is its repository, which may name a port.
        let mut out: Vec<SnapshotInfo> = match reference.rsplit_once(':') {
            Some((sandbox, name)) => {
                let ids: Vec<String> = self.candidates(sandbox)?.into_iter().map(|s| s.id).collect();
                let mut stmt = self.conn.prepare(&format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE ready = 1 AND name = ?2
                     AND (sandbox_id = ?1 OR (sandbox_id IS NULL AND sandbox_name = ?3))"
                ))?;
                let mut found = Vec::new();
                for id in ids.iter().map(Some).chain([None]) {
                    let rows = stmt.query_map(params![id, name, sandbox], row_to_snapshot)?;
                    found.extend(rows.collect::<Result<Vec<_>, _>>()?);
                    if !found.is_empty() {
                        break;
                    }
                }
                found
            }
            None => {
                let mut stmt = self.conn.prepare(&format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE ready = 1 AND substr(id, 1, length(?1)) = ?1"
                ))?;
                let rows = stmt.query_map([reference], row_to_snapshot)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
        };
        for s in &mut out {
            s.dependents = self.dependents(&s.id)?;
        }
        Ok(out)
    }

    /// The ready snapshot pulled from `reference`, if there is one.
    pub fn remote_snapshot(&self, reference: &str) -> Result<Option<SnapshotInfo>, StateError> {
        let found = self
            .conn
            .query_row(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE ready = 1 AND remote = ?1"),
                [reference],
                row_to_snapshot,
            )
            .optional()?;
        Ok(found)
    }

    /// A pulled snapshot is superseded by a newer pull of its reference: it keeps its files (for
    /// the sandboxes on it) under the name `NAME@DIGEST` and no longer answers to the reference.
    pub fn supersede_remote(&mut self, id: &str) -> Result<(), StateError> {
        self.conn.execute(
            "UPDATE snapshots SET name = name || '@' || substr(COALESCE(remote_digest, id), 8, 12), remote = NULL
             WHERE id = ?1",
            [id],
        )?;
        Ok(())
    }

    /// The template key of snapshot `id`, if it is a template.
    pub fn template_key_of(&self, id: &str) -> Result<Option<String>, StateError> {
        let key =
            self.conn.query_row("SELECT template_key FROM snapshots WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        Ok(key.flatten())
    }

    /// The base disks (by digest) pulled snapshots sit on, for the image store's gc.
    pub fn snapshot_bases(&self) -> Result<Vec<String>, StateError> {
        let mut stmt = self.conn.prepare("SELECT DISTINCT base_digest FROM snapshots WHERE base_digest IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Names of the sandboxes restored from snapshot `id`.
    pub fn dependents(&self, id: &str) -> Result<Vec<String>, StateError> {
        let mut stmt = self.conn.prepare("SELECT name FROM sandboxes WHERE snapshot_id = ?1 ORDER BY name")?;
        let rows = stmt.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// A sandbox is going away: its snapshots stay (forks may build on them), known by its name.
    pub fn orphan_snapshots(&mut self, sandbox_id: &str) -> Result<(), StateError> {
        self.conn.execute("UPDATE snapshots SET sandbox_id = NULL WHERE sandbox_id = ?1", [sandbox_id])?;
        Ok(())
    }
}

const SNAPSHOT_COLUMNS: &str = "id, name, kind, sandbox_id, sandbox_name, image, image_digest, vcpus, memory_mib, \
                                disk_mib, size_bytes, created_at, qemu, accel, kernel, initramfs, nic, host_mounts, \
                                remote, remote_digest";

fn row_to_snapshot(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotInfo> {
    let kind: String = r.get(2)?;
    let disk: i64 = r.get(9)?;
    let size: i64 = r.get(10)?;
    Ok(SnapshotInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        kind: if kind == "template" { SnapshotKind::Template } else { SnapshotKind::Snapshot },
        sandbox_id: r.get(3)?,
        sandbox_name: r.get(4)?,
        image: r.get(5)?,
        image_digest: r.get(6)?,
        vcpus: r.get(7)?,
        memory_mib: r.get(8)?,
        disk_mib: disk.max(0) as u64,
        size_bytes: size.max(0) as u64,
        created_at: r.get(11)?,
        qemu: r.get(12)?,
        accel: r.get(13)?,
        kernel: r.get(14)?,
        initramfs: r.get(15)?,
        nic: r.get(16)?,
        host_mounts: r
            .get::<_, Option<String>>(17)?
            .and_then(|j| {
                serde_json::from_str(&j).map_err(|e| tracing::warn!(error = %e, "unreadable host mounts")).ok()
            })
            .unwrap_or_default(),
        dependents: Vec::new(),
        remote: r.get(18)?,
        remote_digest: r.get(19)?,
    })
}
