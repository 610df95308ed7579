//! The daemon's state: SQLite in WAL mode under `$MOAT_HOME`, with versioned migrations.
//!
//! Tables: `sandboxes` (one row per sandbox that exists), `lifecycle` (append-only: every phase a
//! sandbox entered, with the version, time and error), `events` (append-only, what `GET
//! /v1/events` streams) and `snapshots` (one row per saved machine under `snapshots/<id>`; a row
//! is written before its files and marked ready after them, so gc knows every snapshot directory). Every phase change goes through [`Db::set_phase`], which checks it with
//! [`crate::phase::check`] and writes the row, the lifecycle entry and the event in one transaction
//! *before* the caller acts on it.
//!
//! Events are kept for [`EVENTS_MAX_AGE_MS`], at most [`EVENTS_PER_SANDBOX`] per sandbox and
//! [`EVENTS_MAX`] in all: a guest can cause them (refused connections, every few milliseconds,
//! for as long as it runs), so they must not grow the disk without bound.
//!
//! A deleted or damaged database is never silently replaced by an empty one: a marker file next to
//! it (`state.id`) remembers that a database existed, and [`Db::open`] refuses to start without it.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use moat_api::{Event, LifecycleEntry, NetMode, NetSpec, OnExpire, Phase, SandboxInfo, SnapshotInfo, SnapshotKind};
use rusqlite::{params, Connection, OptionalExtension};

use crate::phase;

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
];

/// The migration that moves secret values out of the database
/// ([`crate::secrets_store::move_out_of_db`]).
const SECRETS_MOVED_OUT: usize = 3;

/// The newest events kept for each sandbox (and for the daemon itself); older ones are deleted.
pub const EVENTS_PER_SANDBOX: i64 = 1000;
/// The newest events kept in all, whatever their sandbox.
pub const EVENTS_MAX: i64 = 100_000;
/// Events older than this (30 days) are deleted.
pub const EVENTS_MAX_AGE_MS: i64 = 30 * 24 * 3600 * 1000;
/// Old events are deleted every this many new ones: a scan of a table this size takes
/// milliseconds, and between two prunes it grows by at most this much.
const PRUNE_EVENTS_EVERY: i64 = 256;

/// Errors of the state store. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the state database {} is missing, but {} says this home had one: sandboxes would be forgotten and leak\nhint: restore the file from a backup, or start afresh with `moat serve --reset-state` (running VMs of the lost state are then killed by gc); `moat doctor` explains", db.display(), marker.display())]
    Missing { db: PathBuf, marker: PathBuf },
    #[error("the state database {} is damaged: {reason}\nhint: restore it from a backup, or move it aside and start afresh with `moat serve --reset-state`; `moat doctor` explains", db.display())]
    Corrupt { db: PathBuf, reason: String },
    #[error("the state database {} was written by a newer moat (schema {found}, this moat knows {known})\nhint: run the newer moat, or start afresh with `moat serve --reset-state`", db.display())]
    TooNew { db: PathBuf, found: i64, known: i64 },
    #[error("a sandbox named {0:?} already exists")]
    NameTaken(String),
    #[error("the sandbox already has a snapshot named {0:?}")]
    SnapshotNameTaken(String),
    #[error("no sandbox {0:?}")]
    NotFound(String),
    #[error("sandbox {id} cannot go from {from} to {to}")]
    Transition { id: String, from: Phase, to: Phase },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
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

    fn migrate(&mut self, home: &Path, db: &Path) -> Result<(), StateError> {
        let applied: i64 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
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

    fn state_id(&self) -> Result<String, StateError> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = 'state_id'", [], |r| r.get(0))?)
    }

    /// Record a new sandbox in phase `creating`.
    pub fn insert(&mut self, s: &SandboxInfo) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        let taken: bool =
            tx.query_row("SELECT EXISTS(SELECT 1 FROM sandboxes WHERE name = ?1)", [&s.name], |r| r.get(0))?;
        if taken {
            return Err(StateError::NameTaken(s.name.clone()));
        }
        tx.execute(
            "INSERT INTO sandboxes (id, name, phase, version, image, image_digest, accel, vcpus, memory_mib,
                disk_mib, hostname, created_at, expires_at, on_expire, pid, last_error, net)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                s.id,
                s.name,
                s.phase.as_str(),
                s.version,
                s.image,
                s.image_digest,
                s.accel,
                s.vcpus,
                s.memory_mib,
                s.disk_mib as i64,
                s.hostname,
                s.created_at,
                s.expires_at,
                on_expire_str(s.on_expire),
                s.pid,
                s.last_error,
                net_json(&s.net),
            ],
        )?;
        append_lifecycle(&tx, &s.id, s.version, s.phase, None)?;
        append_event(&tx, Some(&s.id), "phase", &format!("{} created ({})", s.name, s.phase))?;
        tx.commit()?;
        Ok(())
    }

    /// Move a sandbox to `to` (checked), recording the lifecycle entry and an event. Returns the
    /// updated sandbox. `error` becomes `last_error` when given.
    pub fn set_phase(&mut self, id: &str, to: Phase, error: Option<&str>) -> Result<SandboxInfo, StateError> {
        // Errors quote the guest's console, and `last_error` ends up on operators' terminals.
        let error = error.map(moat_api::escape_controls);
        let error = error.as_deref();
        let tx = self.conn.transaction()?;
        let current = get(&tx, id)?.ok_or_else(|| StateError::NotFound(id.to_string()))?;
        if !phase::allowed(current.phase, to) {
            return Err(StateError::Transition { id: id.to_string(), from: current.phase, to });
        }
        let version = current.version + 1;
        tx.execute(
            "UPDATE sandboxes SET phase = ?2, version = ?3, last_error = COALESCE(?4, last_error) WHERE id = ?1",
            params![id, to.as_str(), version, error],
        )?;
        append_lifecycle(&tx, id, version, to, error)?;
        let message = match error {
            Some(e) => format!("{} {} -> {}: {e}", current.name, current.phase, to),
            None => format!("{} {} -> {}", current.name, current.phase, to),
        };
        append_event(&tx, Some(id), "phase", &message)?;
        let updated = get(&tx, id)?.ok_or_else(|| StateError::NotFound(id.to_string()))?;
        tx.commit()?;
        Ok(updated)
    }

    /// A sandbox's network. Secret values are not in it: they are in the sandbox's own file
    /// (`crate::secrets_store`).
    pub fn net_spec(&self, id: &str) -> Result<NetSpec, StateError> {
        let raw: Option<String> = self
            .conn
            .query_row("SELECT net FROM sandboxes WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StateError::NotFound(id.to_string()))?;
        Ok(parse_net(raw.as_deref()))
    }

    pub fn set_net(&mut self, id: &str, net: &NetSpec) -> Result<(), StateError> {
        self.conn.execute("UPDATE sandboxes SET net = ?2 WHERE id = ?1", params![id, net_json(net)])?;
        Ok(())
    }

    /// Record which snapshot a sandbox's disk (and memory) now builds on.
    pub fn set_snapshot(&mut self, id: &str, snapshot: Option<&str>) -> Result<(), StateError> {
        self.conn.execute("UPDATE sandboxes SET snapshot_id = ?2 WHERE id = ?1", params![id, snapshot])?;
        Ok(())
    }

    /// Record a snapshot being taken (not ready: lists leave it out, gc removes it after a crash).
    pub fn insert_snapshot(&mut self, s: &SnapshotInfo, template_key: Option<&str>) -> Result<(), StateError> {
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
                vcpus, memory_mib, disk_mib, size_bytes, created_at, qemu, accel, kernel, initramfs, nic)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
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
                s.nic
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
        let mut out: Vec<SnapshotInfo> = match reference.split_once(':') {
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

    pub fn set_pid(&mut self, id: &str, pid: Option<u32>) -> Result<(), StateError> {
        self.conn.execute("UPDATE sandboxes SET pid = ?2 WHERE id = ?1", params![id, pid])?;
        Ok(())
    }

    pub fn set_expiry(&mut self, id: &str, expires_at: Option<i64>) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        tx.execute("UPDATE sandboxes SET expires_at = ?2 WHERE id = ?1", params![id, expires_at])?;
        let message = match expires_at {
            Some(t) => format!("lease renewed until {t}"),
            None => "lease cleared".to_string(),
        };
        append_event(&tx, Some(id), "lease", &message)?;
        tx.commit()?;
        Ok(())
    }

    /// Forget a sandbox. Its lifecycle stays, ending with the removal event.
    pub fn delete(&mut self, id: &str) -> Result<(), StateError> {
        let tx = self.conn.transaction()?;
        let name: Option<String> =
            tx.query_row("SELECT name FROM sandboxes WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        tx.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
        append_event(&tx, Some(id), "removed", &format!("{} removed", name.unwrap_or_else(|| id.to_string())))?;
        tx.commit()?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<SandboxInfo>, StateError> {
        get(&self.conn, id)
    }

    /// All sandboxes, oldest first.
    pub fn list(&self) -> Result<Vec<SandboxInfo>, StateError> {
        let mut stmt = self.conn.prepare(&format!("SELECT {COLUMNS} FROM sandboxes ORDER BY created_at, id"))?;
        let rows = stmt.query_map([], row_to_info)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The sandboxes a reference could mean: an exact id or name wins, else every id starting
    /// with it.
    pub fn candidates(&self, reference: &str) -> Result<Vec<SandboxInfo>, StateError> {
        let exact: Option<SandboxInfo> = self
            .conn
            .query_row(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1 OR name = ?1"), [reference], row_to_info)
            .optional()?;
        if let Some(s) = exact {
            return Ok(vec![s]);
        }
        let mut stmt =
            self.conn.prepare(&format!("SELECT {COLUMNS} FROM sandboxes WHERE substr(id, 1, length(?1)) = ?1"))?;
        let rows = stmt.query_map([reference], row_to_info)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn lifecycle(&self, id: &str) -> Result<Vec<LifecycleEntry>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT version, phase, at_ms, error FROM lifecycle WHERE sandbox_id = ?1 ORDER BY version")?;
        let rows = stmt.query_map([id], |r| {
            let phase: String = r.get(1)?;
            Ok(LifecycleEntry {
                version: r.get(0)?,
                phase: parse_phase(1, &phase)?,
                at_ms: r.get(2)?,
                error: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Record an event that is not a phase change.
    pub fn event(&mut self, sandbox: Option<&str>, kind: &str, message: &str) -> Result<(), StateError> {
        append_event(&self.conn, sandbox, kind, message)
    }

    /// Changes exactly when a write recorded an event: every write that records one inserts the
    /// event last, and event numbers only grow. Reads never change it.
    pub fn last_event_seq(&self) -> i64 {
        self.conn.last_insert_rowid()
    }

    /// Events after `seq`, oldest first, at most `limit`.
    pub fn events_after(&self, seq: i64, limit: usize) -> Result<Vec<Event>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, at_ms, sandbox_id, kind, message FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = stmt.query_map(params![seq, limit as i64], |r| {
            Ok(Event { seq: r.get(0)?, at_ms: r.get(1)?, sandbox: r.get(2)?, kind: r.get(3)?, message: r.get(4)? })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

const COLUMNS: &str = "id, name, phase, version, image, image_digest, accel, vcpus, memory_mib, disk_mib, hostname, \
                       created_at, expires_at, on_expire, pid, last_error, snapshot_id, net";

const SNAPSHOT_COLUMNS: &str = "id, name, kind, sandbox_id, sandbox_name, image, image_digest, vcpus, memory_mib, \
                                disk_mib, size_bytes, created_at, qemu, accel, kernel, initramfs, nic";

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
        dependents: Vec::new(),
    })
}

fn get(conn: &Connection, id: &str) -> Result<Option<SandboxInfo>, StateError> {
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"), [id], row_to_info).optional()?)
}

fn parse_phase(col: usize, s: &str) -> rusqlite::Result<Phase> {
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(
            col,
            rusqlite::types::Type::Text,
            Box::<dyn std::error::Error + Send + Sync>::from(e),
        )
    })
}

fn on_expire_str(o: OnExpire) -> &'static str {
    match o {
        OnExpire::Stop => "stop",
        OnExpire::Remove => "remove",
    }
}

fn row_to_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxInfo> {
    let phase: String = r.get(2)?;
    let on_expire: String = r.get(13)?;
    let disk: i64 = r.get(9)?;
    Ok(SandboxInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        phase: parse_phase(2, &phase)?,
        version: r.get(3)?,
        image: r.get(4)?,
        image_digest: r.get(5)?,
        accel: r.get(6)?,
        vcpus: r.get(7)?,
        memory_mib: r.get(8)?,
        disk_mib: disk.max(0) as u64,
        hostname: r.get(10)?,
        created_at: r.get(11)?,
        expires_at: r.get(12)?,
        on_expire: if on_expire == "stop" { OnExpire::Stop } else { OnExpire::Remove },
        pid: r.get(14)?,
        last_error: r.get(15)?,
        snapshot_id: r.get(16)?,
        net: redacted(parse_net(r.get::<_, Option<String>>(17)?.as_deref())),
    })
}

/// Secret values never go into the database, whoever passes them: see [`crate::secrets_store`].
fn net_json(net: &NetSpec) -> String {
    serde_json::to_string(&redacted(net.clone())).expect("a NetSpec always serializes")
}

/// A sandbox made before networking existed has no NIC.
fn parse_net(raw: Option<&str>) -> NetSpec {
    match raw {
        None => NetSpec { mode: NetMode::None, ..NetSpec::default() },
        Some(raw) => serde_json::from_str(raw).unwrap_or_else(|e| {
            tracing::warn!("unreadable network spec in the state database ({e}); treating it as none");
            NetSpec { mode: NetMode::None, ..NetSpec::default() }
        }),
    }
}

fn redacted(mut net: NetSpec) -> NetSpec {
    for s in &mut net.secrets {
        s.value = None;
    }
    net
}

fn append_lifecycle(
    conn: &Connection,
    id: &str,
    version: i64,
    phase: Phase,
    error: Option<&str>,
) -> Result<(), StateError> {
    conn.execute(
        "INSERT INTO lifecycle (sandbox_id, version, phase, at_ms, error) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, version, phase.as_str(), now_ms(), error],
    )?;
    Ok(())
}

fn append_event(conn: &Connection, sandbox: Option<&str>, kind: &str, message: &str) -> Result<(), StateError> {
    // Messages can carry what a guest chose (a console line, a name it looked up).
    let message = moat_api::escape_controls(message);
    conn.execute(
        "INSERT INTO events (at_ms, sandbox_id, kind, message) VALUES (?1, ?2, ?3, ?4)",
        params![now_ms(), sandbox, kind, message],
    )?;
    if conn.last_insert_rowid() % PRUNE_EVENTS_EVERY == 0 {
        prune_events(conn)?;
    }
    Ok(())
}

/// Delete the events past their age or beyond the newest [`EVENTS_PER_SANDBOX`] of their
/// sandbox or the newest [`EVENTS_MAX`]. Event numbers never repeat (AUTOINCREMENT), so a
/// follower that was behind simply resumes at the oldest one left. Returns how many went.
fn prune_events(conn: &Connection) -> Result<usize, StateError> {
    let old = conn.execute("DELETE FROM events WHERE at_ms < ?1", [now_ms() - EVENTS_MAX_AGE_MS])?;
    let per_sandbox = conn.execute(
        "DELETE FROM events WHERE seq IN (
             SELECT seq FROM (
                 SELECT seq, ROW_NUMBER() OVER (PARTITION BY sandbox_id ORDER BY seq DESC) AS newer FROM events
             ) WHERE newer > ?1
         )",
        [EVENTS_PER_SANDBOX],
    )?;
    let overall = conn.execute(
        "DELETE FROM events WHERE seq <= (SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?1)",
        [EVENTS_MAX],
    )?;
    Ok(old + per_sandbox + overall)
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| StateError::Io { what: format!("writing {}", path.display()), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str) -> SandboxInfo {
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
            net: NetSpec::default(),
        }
    }

    #[test]
    fn lifecycle_is_recorded_and_transitions_are_checked() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        db.insert(&sample("aaaa00000001", "box")).unwrap();
        assert!(matches!(db.insert(&sample("aaaa00000002", "box")), Err(StateError::NameTaken(_))));
        db.set_phase("aaaa00000001", Phase::Booting, None).unwrap();
        let s = db.set_phase("aaaa00000001", Phase::Running, None).unwrap();
        assert_eq!((s.phase, s.version), (Phase::Running, 3));
        assert!(matches!(db.set_phase("aaaa00000001", Phase::Creating, None), Err(StateError::Transition { .. })));
        let s = db.set_phase("aaaa00000001", Phase::Failed, Some("QEMU died")).unwrap();
        assert_eq!(s.last_error.as_deref(), Some("QEMU died"));
        let phases: Vec<Phase> = db.lifecycle("aaaa00000001").unwrap().into_iter().map(|e| e.phase).collect();
        assert_eq!(phases, [Phase::Creating, Phase::Booting, Phase::Running, Phase::Failed]);
        assert!(db.events_after(0, 100).unwrap().len() >= 4);
    }

    #[test]
    fn events_are_trimmed_by_count_and_age() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        let count = |db: &Db, sandbox: &str| -> i64 {
            db.conn.query_row("SELECT COUNT(*) FROM events WHERE sandbox_id = ?1", [sandbox], |r| r.get(0)).unwrap()
        };
        // A month-old event of a sandbox long gone.
        db.conn
            .execute(
                "INSERT INTO events (at_ms, sandbox_id, kind, message) VALUES (?1, 'gone', 'phase', 'old')",
                [now_ms() - EVENTS_MAX_AGE_MS - 1000],
            )
            .unwrap();
        // A guest hammering refusals: far more events than are kept, and a quieter neighbour.
        db.conn.execute_batch("BEGIN").unwrap();
        for i in 0..(3 * EVENTS_PER_SANDBOX) {
            db.event(Some("noisy"), "refused", &format!("refused {i}")).unwrap();
            if i % 10 == 0 {
                db.event(Some("quiet"), "lease", &format!("lease {i}")).unwrap();
            }
        }
        db.conn.execute_batch("COMMIT").unwrap();
        // Pruning runs every few hundred events; the table never held much more than the cap.
        assert!(count(&db, "noisy") <= EVENTS_PER_SANDBOX + PRUNE_EVENTS_EVERY, "{}", count(&db, "noisy"));
        prune_events(&db.conn).unwrap();
        assert_eq!(count(&db, "noisy"), EVENTS_PER_SANDBOX);
        assert_eq!(count(&db, "quiet"), 3 * EVENTS_PER_SANDBOX / 10);
        assert_eq!(count(&db, "gone"), 0);
        // What is kept is the newest, and numbering goes on past what was deleted.
        let noisy: Vec<Event> = db
            .events_after(0, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| e.sandbox.as_deref() == Some("noisy"))
            .collect();
        assert_eq!(noisy.last().unwrap().message, format!("refused {}", 3 * EVENTS_PER_SANDBOX - 1));
        let seq = db.last_event_seq();
        db.event(None, "daemon", "next").unwrap();
        assert_eq!(db.last_event_seq(), seq + 1);
    }

    #[test]
    fn guest_text_is_stored_without_terminal_controls() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        db.insert(&sample("aaaa00000001", "box")).unwrap();
        db.set_phase("aaaa00000001", Phase::Booting, None).unwrap();
        let s = db.set_phase("aaaa00000001", Phase::Failed, Some("console:\r\n\x1b]52;c;aGk=\x07\x1b[2J")).unwrap();
        assert_eq!(s.last_error.as_deref(), Some("console:\r\n\\x1b]52;c;aGk=\\x07\\x1b[2J"));
        assert!(db.lifecycle("aaaa00000001").unwrap().iter().all(|e| !e
            .error
            .as_deref()
            .unwrap_or("")
            .contains('\x1b')));
        assert!(db.events_after(0, 100).unwrap().iter().all(|e| !e.message.contains('\x1b')));
    }

    #[test]
    fn references_resolve_by_id_name_and_unique_prefix() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        db.insert(&sample("abc000000001", "one")).unwrap();
        db.insert(&sample("abd000000002", "two")).unwrap();
        assert_eq!(db.candidates("one").unwrap().len(), 1);
        assert_eq!(db.candidates("abc").unwrap()[0].name, "one");
        assert_eq!(db.candidates("ab").unwrap().len(), 2);
        assert!(db.candidates("zz").unwrap().is_empty());
    }

    #[test]
    fn state_survives_reopening() {
        let home = tempfile::tempdir().unwrap();
        Db::open(home.path()).unwrap().insert(&sample("abc000000001", "one")).unwrap();
        let db = Db::open(home.path()).unwrap();
        assert_eq!(db.list().unwrap().len(), 1);
    }

    #[test]
    fn a_deleted_database_is_refused_not_replaced() {
        let home = tempfile::tempdir().unwrap();
        Db::open(home.path()).unwrap();
        std::fs::remove_file(Db::db_path(home.path())).unwrap();
        let e = Db::open(home.path()).err().expect("refused");
        assert!(matches!(e, StateError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("--reset-state"), "{e}");
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
