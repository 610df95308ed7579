//! Warm pool settings: one row per image and machine size, kept across daemon restarts. The
//! members themselves are not recorded: they live and die with the daemon that made them.

use rusqlite::params;

use super::events::append_event;
use super::{Db, StateError};

/// What a pool is of. Members match a create of this image (by name) and these sizes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
}

impl Db {
    /// Set the size of a pool; 0 removes its row. Records an event.
    pub fn set_pool(&mut self, key: &PoolKey, size: u32) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        if size == 0 {
            tx.execute(
                "DELETE FROM pools WHERE image = ?1 AND vcpus = ?2 AND memory_mib = ?3 AND disk_mib = ?4",
                params![key.image, key.vcpus, key.memory_mib, key.disk_mib as i64],
            )?;
        } else {
            tx.execute(
                "INSERT INTO pools (image, vcpus, memory_mib, disk_mib, size) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (image, vcpus, memory_mib, disk_mib) DO UPDATE SET size = excluded.size",
                params![key.image, key.vcpus, key.memory_mib, key.disk_mib as i64, size],
            )?;
        }
        let what = format!("{}, {} vCPU, {} MiB, {} MiB disk", key.image, key.vcpus, key.memory_mib, key.disk_mib);
        append_event(&tx, None, "pool", &format!("pool of {what}: size {size}"))?;
        tx.commit()?;
        Ok(())
    }

    /// Every pool with its size, by image and size.
    pub fn pools(&self) -> Result<Vec<(PoolKey, u32)>, StateError> {
        let mut stmt = self.conn.prepare(
            "SELECT image, vcpus, memory_mib, disk_mib, size FROM pools ORDER BY image, vcpus, memory_mib, disk_mib",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                PoolKey {
                    image: r.get(0)?,
                    vcpus: r.get(1)?,
                    memory_mib: r.get(2)?,
                    disk_mib: r.get::<_, i64>(3)? as u64,
                },
                r.get(4)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_set_changed_and_removed() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        let key = PoolKey { image: "minimal".into(), vcpus: 1, memory_mib: 256, disk_mib: 4096 };
        db.set_pool(&key, 2).unwrap();
        db.set_pool(&key, 3).unwrap();
        assert_eq!(db.pools().unwrap(), vec![(key.clone(), 3)]);
        drop(db);
        let mut db = Db::open(home.path()).unwrap();
        assert_eq!(db.pools().unwrap(), vec![(key.clone(), 3)], "kept across a reopen");
        db.set_pool(&key, 0).unwrap();
        assert!(db.pools().unwrap().is_empty());
    }
}
