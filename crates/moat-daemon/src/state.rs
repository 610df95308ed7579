//! The daemon's state: SQLite in WAL mode under `$MOAT_HOME`, with versioned migrations.
//!
//! Tables: `sandboxes` (one row per sandbox that exists), `lifecycle` (append-only: every phase a
//! sandbox entered, with the version, time and error), `events` (append-only, what `GET
//! /v1/events` streams) and `snapshots` (one row per saved machine under `snapshots/<id>`; a row
//! is written before its files and marked ready after them, so gc knows every snapshot directory). Every phase change goes through [`Db::set_phase`], which checks it with
//! [`crate::phase::allowed`] and writes the row, the lifecycle entry and the event in one transaction
//! *before* the caller acts on it.
//!
//! Events are kept for [`EVENTS_MAX_AGE_MS`], at most [`EVENTS_PER_SANDBOX`] per sandbox and
//! [`EVENTS_MAX`] in all unless [`EventRetention`] says otherwise: a guest can cause them (refused connections, every few milliseconds,
//! for as long as it runs), so they must not grow the disk without bound.
//!
//! A deleted or damaged database is never silently replaced by an empty one: a marker file next to
//! it (`state.id`) remembers that a database existed, and [`Db::open`] refuses to start without it.

pub mod backup;
mod events;
mod migrations;
mod pools;
mod sandboxes;
mod snapshots;
mod volumes;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use moat_api::Phase;
use moat_hint::Hint;
use rusqlite::Connection;

pub use events::{EventRetention, EVENTS_MAX, EVENTS_MAX_AGE_MS, EVENTS_PER_SANDBOX};
pub use pools::PoolKey;

/// Errors of the state store; [`Hint`] says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the state database {} is missing, but {} says this home had one: sandboxes would be forgotten and leak", db.display(), marker.display())]
    Missing { db: PathBuf, marker: PathBuf },
    #[error("the state database {} is damaged: {reason}", db.display())]
    Corrupt { db: PathBuf, reason: String },
    #[error("the state database {} was written by a newer moat (schema {found}, this moat knows {known})", db.display())]
    TooNew { db: PathBuf, found: i64, known: i64 },
    #[error("a sandbox named {0:?} already exists")]
    NameTaken(String),
    #[error("the sandbox already has a snapshot named {0:?}")]
    SnapshotNameTaken(String),
    #[error("no sandbox {0:?}")]
    NotFound(String),
    #[error("sandbox {id} cannot go from {from} to {to}")]
    Transition { id: String, from: Phase, to: Phase },
    #[error("the state database failed")]
    Sql(#[from] rusqlite::Error),
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
}

impl Hint for StateError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        Some(match self {
            StateError::Missing { .. } => "restore the file from a backup, or start afresh with `moat serve \
                 --reset-state` (running VMs of the lost state are then killed by gc); `moat doctor` explains"
                .into(),
            StateError::Corrupt { .. } => "restore it from a backup, or move it aside and start afresh with `moat \
                 serve --reset-state`; `moat doctor` explains"
                .into(),
            StateError::TooNew { .. } => "run the newer moat, or start afresh with `moat serve --reset-state`".into(),
            StateError::NameTaken(_) => "choose another name, or remove the old sandbox with `moat rm`".into(),
            StateError::SnapshotNameTaken(_) => {
                "choose another name, or remove the old snapshot with `moat snapshot rm`".into()
            }
            StateError::NotFound(_) => "list sandboxes with `moat ps`; names, ids and unique id prefixes work".into(),
            StateError::Transition { .. } => "see the sandbox's phase with `moat inspect`".into(),
            StateError::Sql(_) | StateError::Io { .. } => "see the daemon log; `moat doctor` checks the state".into(),
        })
    }
}

/// The open state database.
pub struct Db {
    conn: Connection,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    now_ms() / 1000
}

impl Db {
    pub fn db_path(home: &Path) -> PathBuf {
        home.join("state.db")
    }

    fn marker_path(home: &Path) -> PathBuf {
        home.join("state.id")
    }

    /// Open (or, on a home that never had one, create) the database and apply migrations.
    pub fn open(home: &Path) -> Result<Db, StateError> {
        let db = Self::db_path(home);
        let marker = Self::marker_path(home);
        if !db.exists() && marker.exists() {
            return Err(StateError::Missing { db, marker });
        }
        let corrupt = |reason: String| StateError::Corrupt { db: db.clone(), reason };
        // Owner only: the database says what every sandbox runs and may reach. SQLite gives its
        // -wal and -shm files the same mode.
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let made = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&db);
            if let Err(e) = made.and_then(|_| std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))) {
                return Err(StateError::Io { what: format!("securing {}", db.display()), source: e });
            }
            for side in ["state.db-wal", "state.db-shm"] {
                let _ = std::fs::set_permissions(home.join(side), std::fs::Permissions::from_mode(0o600));
            }
        }
        let conn = Connection::open(&db).map_err(|e| corrupt(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let check: String =
            conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(|e| corrupt(e.to_string()))?;
        if check != "ok" {
            return Err(corrupt(check));
        }
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| corrupt(e.to_string()))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut this = Db { conn };
        this.migrate(home, &db)?;
        events::init_retention(&this.conn)?;
        let id = this.state_id()?;
        match std::fs::read_to_string(&marker) {
            Ok(m) if m.trim() == id => {}
            Ok(m) => {
                return Err(corrupt(format!(
                    "it is not the database this home had (state id {}, the marker says {})",
                    id,
                    m.trim()
                )))
            }
            Err(_) => write_atomically(&marker, id.as_bytes())?,
        }
        Ok(this)
    }

    /// Move a damaged or unwanted database aside (never delete it) so the next open starts afresh.
    /// Returns where it went.
    pub fn reset(home: &Path) -> Result<Option<PathBuf>, StateError> {
        let db = Self::db_path(home);
        let _ = std::fs::remove_file(Self::marker_path(home));
        if !db.exists() {
            return Ok(None);
        }
        let aside = home.join(format!("state.db.broken-{}", now_secs()));
        for suffix in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", db.display()));
            if from.exists() {
                let to = PathBuf::from(format!("{}{suffix}", aside.display()));
                std::fs::rename(&from, &to)
                    .map_err(|e| StateError::Io { what: format!("moving {} aside", from.display()), source: e })?;
            }
        }
        Ok(Some(aside))
    }

    fn state_id(&self) -> Result<String, StateError> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = 'state_id'", [], |r| r.get(0))?)
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| StateError::Io { what: format!("writing {}", path.display()), source: e })
}

#[cfg(test)]
pub(crate) mod tests {
    use moat_api::{NetSpec, OnExpire, SandboxInfo};

    use super::*;

    pub(crate) fn sample(id: &str, name: &str) -> SandboxInfo {
        SandboxInfo {
            id: id.into(),
            name: name.into(),
            phase: Phase::Creating,
            image: "minimal".into(),
            image_digest: "sha256:00".into(),
            accel: "tcg".into(),
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 4096,
            hostname: "h".into(),
            created_at: 1,
            expires_at: None,
            on_expire: OnExpire::Remove,
            pid: None,
            last_error: None,
            version: 1,
            snapshot_id: None,
            isolation: None,
            net: NetSpec::default(),
            labels: Default::default(),
            env: Vec::new(),
            mounts: Vec::new(),
            idle: None,
        }
    }

    #[test]
    fn state_survives_reopening() {
        let home = tempfile::tempdir().unwrap();
        Db::open(home.path()).unwrap().insert(&sample("abc000000001", "one")).unwrap();
        let db = Db::open(home.path()).unwrap();
        assert_eq!(db.list().unwrap().len(), 1);
    }

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let (s, p) = (|| "x".to_string(), || PathBuf::from("/p"));
        let cases = [
            StateError::Missing { db: p(), marker: p() },
            StateError::Corrupt { db: p(), reason: s() },
            StateError::TooNew { db: p(), found: 9, known: 8 },
            StateError::NameTaken(s()),
            StateError::SnapshotNameTaken(s()),
            StateError::NotFound(s()),
            StateError::Transition { id: s(), from: Phase::Stopped, to: Phase::Paused },
            StateError::Sql(rusqlite::Error::InvalidQuery),
            StateError::Io { what: s(), source: std::io::Error::other("the io cause") },
        ];
        for e in &cases {
            moat_hint::check(e, true).unwrap();
        }
    }

    #[test]
    fn a_deleted_database_is_refused_not_replaced() {
        let home = tempfile::tempdir().unwrap();
        Db::open(home.path()).unwrap();
        std::fs::remove_file(Db::db_path(home.path())).unwrap();
        let e = Db::open(home.path()).err().expect("refused");
        assert!(matches!(e, StateError::Missing { .. }), "{e}");
        assert!(e.hint().is_some_and(|h| h.contains("--reset-state")), "{e}");
        Db::reset(home.path()).unwrap();
        Db::open(home.path()).expect("a reset starts afresh");
    }

    #[test]
    fn a_damaged_database_is_refused_and_kept_for_recovery() {
        let home = tempfile::tempdir().unwrap();
        drop(Db::open(home.path()).unwrap());
        std::fs::write(Db::db_path(home.path()), b"this is not an sqlite database, it is garbage........").unwrap();
        let e = Db::open(home.path()).err().expect("refused");
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        let aside = Db::reset(home.path()).unwrap().expect("moved aside");
        assert!(aside.exists());
        Db::open(home.path()).expect("a reset starts afresh");
    }
}
