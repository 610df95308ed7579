//! Volume rows: one per file `volumes/<id>.img`, written before the file and deleted before it,
//! so gc knows every volume; found by name, id or unique id prefix. The rows hold what the host
//! decided (name, size, time); what the file holds is read from the file.

use moat_api::VolumeInfo;
use rusqlite::{params, OptionalExtension};

use super::events::append_event;
use super::{Db, StateError};

impl Db {
    /// Record a volume about to be made, with an event. `Ok(false)`: the name is taken, and
    /// nothing is written.
    pub fn insert_volume(&mut self, v: &VolumeInfo) -> Result<bool, StateError> {
        let tx = self.conn.transaction()?;
        let taken: bool =
            tx.query_row("SELECT EXISTS(SELECT 1 FROM volumes WHERE name = ?1)", [&v.name], |r| r.get(0))?;
        if taken {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO volumes (id, name, size_bytes, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![v.id, v.name, v.size_bytes as i64, v.created_at],
        )?;
        // Last, as every write that records an event does (see `last_event_seq`).
        append_event(&tx, None, "volume", &format!("volume {} created ({}, {} bytes)", v.name, v.id, v.size_bytes))?;
        tx.commit()?;
        Ok(true)
    }

    /// Delete a volume's row, with an event saying `why`; false if there was none.
    pub fn delete_volume(&mut self, id: &str, why: &str) -> Result<bool, StateError> {
        let tx = self.conn.transaction()?;
        let name: Option<String> =
            tx.query_row("SELECT name FROM volumes WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        let Some(name) = name else { return Ok(false) };
        tx.execute("DELETE FROM volumes WHERE id = ?1", [id])?;
        append_event(&tx, None, "volume", &format!("volume {name} ({id}) {why}"))?;
        tx.commit()?;
        Ok(true)
    }

    pub fn volume(&self, id: &str) -> Result<Option<VolumeInfo>, StateError> {
        let found = self
            .conn
            .query_row(&format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1"), [id], row_to_volume)
            .optional()?;
        Ok(found)
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, StateError> {
        let mut stmt = self.conn.prepare(&format!("SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY name"))?;
        let rows = stmt.query_map([], row_to_volume)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The volumes a reference could mean: the one with that id or name, else those whose id
    /// starts with it.
    pub fn volume_candidates(&self, reference: &str) -> Result<Vec<VolumeInfo>, StateError> {
        let exact = self
            .conn
            .query_row(
                &format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1 OR name = ?1"),
                [reference],
                row_to_volume,
            )
            .optional()?;
        if let Some(v) = exact {
            return Ok(vec![v]);
        }
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE substr(id, 1, length(?1)) = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([reference], row_to_volume)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

const VOLUME_COLUMNS: &str = "id, name, size_bytes, created_at";

/// A row as a volume whose file has not been looked at: nothing used, allocated or mounting it.
fn row_to_volume(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeInfo> {
    let size: i64 = r.get(2)?;
    Ok(VolumeInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        size_bytes: size.max(0) as u64,
        used_bytes: None,
        allocated_bytes: 0,
        created_at: r.get(3)?,
        users: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use moat_api::VolumeInfo;

    use crate::state::Db;

    fn volume(id: &str, name: &str) -> VolumeInfo {
        VolumeInfo {
            id: id.into(),
            name: name.into(),
            size_bytes: 16 << 40,
            used_bytes: None,
            allocated_bytes: 0,
            created_at: 7,
            users: Vec::new(),
        }
    }

    #[test]
    fn volumes_are_found_by_name_id_and_unique_prefix_and_survive_reopening() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        assert!(db.insert_volume(&volume("abc000000001", "data")).unwrap());
        assert!(db.insert_volume(&volume("abc000000002", "cache")).unwrap());
        assert!(db.insert_volume(&volume("def000000003", "logs")).unwrap());
        drop(db);
        let db = Db::open(home.path()).unwrap();

        let names = |found: Vec<VolumeInfo>| found.into_iter().map(|v| v.name).collect::<Vec<_>>();
        assert_eq!(names(db.volumes().unwrap()), ["cache", "data", "logs"]);
        assert_eq!(names(db.volume_candidates("data").unwrap()), ["data"]);
        assert_eq!(names(db.volume_candidates("abc000000002").unwrap()), ["cache"]);
        assert_eq!(names(db.volume_candidates("def").unwrap()), ["logs"]);
        assert_eq!(names(db.volume_candidates("abc").unwrap()), ["data", "cache"], "ambiguous: both");
        assert!(db.volume_candidates("zzz").unwrap().is_empty());
        let v = db.volume("abc000000001").unwrap().expect("recorded");
        assert_eq!(v, volume("abc000000001", "data"), "the size keeps all 64 bits it needs");
    }

    #[test]
    fn a_taken_name_writes_nothing_and_a_delete_frees_it() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        assert!(db.insert_volume(&volume("abc000000001", "data")).unwrap());
        let events = db.last_event_seq();
        assert!(!db.insert_volume(&volume("abc000000002", "data")).unwrap(), "the name is taken");
        assert_eq!(db.volume("abc000000002").unwrap(), None);
        assert_eq!(db.last_event_seq(), events, "no event for what was not made");

        assert!(db.delete_volume("abc000000001", "removed").unwrap());
        assert!(!db.delete_volume("abc000000001", "removed").unwrap(), "already gone");
        assert!(db.insert_volume(&volume("abc000000002", "data")).unwrap(), "the name is free again");
        let said: Vec<String> = db.events_after(0, 10).unwrap().into_iter().map(|e| e.message).collect();
        assert_eq!(
            said,
            [
                format!("volume data created (abc000000001, {} bytes)", 16u64 << 40),
                "volume data (abc000000001) removed".to_string(),
                format!("volume data created (abc000000002, {} bytes)", 16u64 << 40),
            ]
        );
    }
}
