//! The schema's versioned migrations, applied in order on open; `PRAGMA user_version` counts them.

use std::path::Path;

use super::{Db, StateError};

/// Migrations in order; `PRAGMA user_version` is how many have been applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    phase TEXT NOT NULL,
    version INTEGER NOT NULL,
    image TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    accel TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_mib INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    on_expire TEXT NOT NULL,
    pid INTEGER,
    last_error TEXT
);
CREATE TABLE lifecycle (
    sandbox_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    phase TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    error TEXT,
    PRIMARY KEY (sandbox_id, version)
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    sandbox_id TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    sandbox_id TEXT,
    sandbox_name TEXT NOT NULL,
    template_key TEXT,
    ready INTEGER NOT NULL,
    image TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_mib INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    qemu TEXT NOT NULL,
    accel TEXT NOT NULL,
    kernel TEXT NOT NULL,
    initramfs TEXT NOT NULL
);
ALTER TABLE sandboxes ADD COLUMN snapshot_id TEXT;
"#,
    // The network (JSON of moat_api::NetSpec, without secret values since the next migration);
    // NULL for sandboxes made before networking, which have no NIC. Snapshots record whether
    // their machine has one.
    r#"
ALTER TABLE sandboxes ADD COLUMN net TEXT;
ALTER TABLE snapshots ADD COLUMN nic INTEGER NOT NULL DEFAULT 0;
"#,
    // No schema change: secret values move out of `net` into files of their own (code below).
    "",
    // Labels (a JSON object of strings) and the default environment (JSON `[name, value]`
    // pairs); NULL for sandboxes made before them, which have neither.
    r#"
ALTER TABLE sandboxes ADD COLUMN labels TEXT;
ALTER TABLE sandboxes ADD COLUMN env TEXT;
"#,
    // Mounts (JSON of `Vec<moat_api::Mount>`), NULL for sandboxes made before them; a snapshot
    // records the host directories its guest had mounted, which every restore serves again.
    r#"
ALTER TABLE sandboxes ADD COLUMN mounts TEXT;
ALTER TABLE snapshots ADD COLUMN host_mounts TEXT;
"#,
    // Named volumes: one row per file `volumes/<id>.img`, written before the file and removed
    // before it, so gc tells a crash's leftovers from volumes. (`IF NOT EXISTS`: tests that wind
    // `user_version` back to replay older migrations keep the table.)
    r#"
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size_bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
    // The idle policy (JSON of moat_api::IdlePolicy), NULL for a sandbox without one.
    r#"
ALTER TABLE sandboxes ADD COLUMN idle TEXT;
"#,
    // Warm pools: how many sandboxes of an image and size the daemon keeps ready.
    r#"
CREATE TABLE IF NOT EXISTS pools (
    image TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_mib INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (image, vcpus, memory_mib, disk_mib)
);
"#,
    // Snapshots pulled from registries: the reference and manifest digest they came from, and the
    // digest of the base disk their layer sits on (in the image store's remote cache).
    r#"
ALTER TABLE snapshots ADD COLUMN remote TEXT;
ALTER TABLE snapshots ADD COLUMN remote_digest TEXT;
ALTER TABLE snapshots ADD COLUMN base_digest TEXT;
"#,
];

/// The schema version this moat writes: how many migrations it knows.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The migration that moves secret values out of the database
/// ([`crate::secrets_store::move_out_of_db`]).
const SECRETS_MOVED_OUT: usize = 3;

impl Db {
    pub(super) fn migrate(&mut self, home: &Path, db: &Path) -> Result<(), StateError> {
        let applied: i64 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = SCHEMA_VERSION;
        if applied > known {
            return Err(StateError::TooNew { db: db.to_path_buf(), found: applied, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            if i == 0 {
                let id = format!("{:016x}", rand::random::<u64>());
                tx.execute("INSERT INTO meta (key, value) VALUES ('state_id', ?1)", [id])?;
            }
            if i == SECRETS_MOVED_OUT {
                // The runtime's run directory (`RuntimeConfig::run_dir`), where sandboxes' files are.
                crate::secrets_store::move_out_of_db(&tx, &home.join("run"))?;
            }
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        crate::secrets_store::scrub_if_pending(&self.conn)
    }
}

#[cfg(test)]
mod tests {
    use crate::state::tests::sample;
    use crate::state::Db;

    /// A database from before labels and default environments opens, and its sandboxes have none.
    #[test]
    fn sandboxes_recorded_before_labels_upgrade_without_any() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        db.insert(&sample("abc000000001", "old")).unwrap();
        db.conn
            .execute_batch(
                "ALTER TABLE sandboxes DROP COLUMN labels; ALTER TABLE sandboxes DROP COLUMN env; \
                 ALTER TABLE sandboxes DROP COLUMN mounts; ALTER TABLE snapshots DROP COLUMN host_mounts; \
                 ALTER TABLE sandboxes DROP COLUMN idle; ALTER TABLE snapshots DROP COLUMN remote; \
                 ALTER TABLE snapshots DROP COLUMN remote_digest; ALTER TABLE snapshots DROP COLUMN base_digest;",
            )
            .unwrap();
        db.conn.pragma_update(None, "user_version", 4).unwrap();
        drop(db);
        let mut db = Db::open(home.path()).unwrap();
        let old = db.get("abc000000001").unwrap().expect("kept");
        assert!(old.labels.is_empty() && old.env.is_empty(), "{old:?}");
        let mut new = sample("abc000000002", "new");
        new.labels = [("team".to_string(), "ml".to_string())].into();
        new.env = vec![("A".into(), "1".into()), ("B".into(), "x=y".into())];
        db.insert(&new).unwrap();
        let got = db.get("abc000000002").unwrap().expect("recorded");
        assert_eq!((got.labels, got.env), (new.labels, new.env));
    }
}
