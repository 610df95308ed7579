//! Where the values of a sandbox's secrets (`--secret NAME@HOST`) are kept: one file per sandbox,
//! `<run dir>/secrets.json` (0600, in the sandbox's 0700 run directory), and the memory of the
//! network stack while the sandbox runs. Never in `state.db`: that file is what gets copied,
//! backed up and attached to bug reports, and its `net` column keeps only names and hosts.
//!
//! The run directory outlives stops, pauses and daemon restarts (the sandbox's disk is there too)
//! and goes with `moat rm`, or with gc once no sandbox owns it; so does the file. The record is
//! written first and the file after it: a crash in between leaves a sandbox whose start fails
//! saying how to recreate it, never a value without a sandbox.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use moat_api::{ErrorCode, NetSpec, SandboxInfo};
use rusqlite::{params, Connection};
use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::error::ServiceError;
use crate::service::Service;
use crate::state::StateError;

/// The file's name in the sandbox's run directory.
const FILE: &str = "secrets.json";

/// Larger files are refused unread: 256 secrets of 16 KiB each, JSON-escaped, fit well below.
const MAX_FILE: u64 = 32 << 20;

/// What the file holds: each secret's value by name (the names and hosts are in `state.db`).
/// Written from borrowed strings, read into owned ones.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored<S: Ord> {
    values: BTreeMap<S, S>,
}

/// Why a sandbox's secret values could not be kept or found.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("the secret values of {} are missing: {} is gone or lacks them", names.join(", "), path.display())]
    Missing { path: PathBuf, names: Vec<String> },
    #[error("reading the secret values in {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the secret values in {} are unreadable: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
    #[error("saving the secret values in {}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// What to do, said without the sandbox's name and secrets; [`SecretsError::for_sandbox`] says it
/// with them.
impl moat_hint::Hint for SecretsError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        Some(match self {
            SecretsError::Missing { .. } | SecretsError::Damaged { .. } => {
                "remove the sandbox (`moat rm`) and create it again with its secrets set in moat's environment".into()
            }
            SecretsError::Read { .. } => "check the permissions of the moat home".into(),
            SecretsError::Write { .. } => {
                "check the free space and permissions of the moat home, then create the sandbox again".into()
            }
        })
    }
}

impl SecretsError {
    /// The service error for sandbox `sandbox`, with what to do.
    fn for_sandbox(self, sandbox: &str, net: &NetSpec) -> ServiceError {
        let recreate = || {
            let names: Vec<&str> = net.secrets.iter().map(|s| s.name.as_str()).collect();
            format!(
                "moat cannot recover the values: remove the sandbox (`moat rm {sandbox}`) and create it again \
                 with {} set in moat's environment (`moat run --secret NAME@HOST …`)",
                names.join(", ")
            )
        };
        let message = moat_hint::one_line(&self);
        match self {
            SecretsError::Missing { .. } | SecretsError::Damaged { .. } => {
                ServiceError::new(ErrorCode::BootFailed, message, recreate())
            }
            SecretsError::Read { .. } => ServiceError::new(
                ErrorCode::Internal,
                message,
                format!("check the permissions of the moat home; if the file is lost, {}", recreate()),
            ),
            SecretsError::Write { .. } => ServiceError::new(
                ErrorCode::Internal,
                message,
                "check the free space and permissions of the moat home, then create the sandbox again",
            ),
        }
    }
}

impl Service {
    /// Save the secret values of a sandbox just recorded (its record holds none). When they
    /// cannot be saved the record goes again, so the create fails whole.
    pub(crate) fn keep_secrets(&self, info: &SandboxInfo) -> Result<(), ServiceError> {
        let dir = self.run_dir(&info.id);
        if let Err(e) = save(&dir, &info.net) {
            self.db(|db| db.delete(&info.id))?;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.for_sandbox(&info.name, &info.net));
        }
        Ok(())
    }

    /// Put the values of `info`'s secrets into `net` (its network as recorded, values left out).
    pub(crate) fn fill_secrets(&self, info: &SandboxInfo, net: &mut NetSpec) -> Result<(), ServiceError> {
        load(&self.run_dir(&info.id), net).map_err(|e| e.for_sandbox(&info.name, net))
    }
}

/// Write the values of `net`'s secrets to `dir`'s file, replacing it whole: a new file made with
/// `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600 under a temporary name, synced, then renamed over.
/// Nothing when `net` has no values.
fn save(dir: &Path, net: &NetSpec) -> Result<(), SecretsError> {
    write_values(dir, net).map_err(|source| SecretsError::Write { path: dir.join(FILE), source })
}

fn write_values(dir: &Path, net: &NetSpec) -> std::io::Result<()> {
    let values: BTreeMap<&str, &str> =
        net.secrets.iter().filter_map(|s| Some((s.name.as_str(), s.value.as_deref()?))).collect();
    if values.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(&Stored { values }).expect("a map of strings always serializes");
    moat_sandbox::create_private_dir(dir).map_err(std::io::Error::other)?;
    // A random name: a file left by a crash mid-write does not block the next one.
    let tmp = dir.join(format!(".{FILE}.{:016x}", rand::random::<u64>()));
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut file = std::fs::File::from(rustix::fs::open(&tmp, flags, Mode::from_raw_mode(0o600))?);
    let written =
        file.write_all(&json).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&tmp, dir.join(FILE)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself must reach the disk before the caller counts on the file.
    std::fs::File::open(dir)?.sync_all()
}

/// Fill in the value of every secret of `net` from `dir`'s file.
fn load(dir: &Path, net: &mut NetSpec) -> Result<(), SecretsError> {
    if net.secrets.is_empty() {
        return Ok(());
    }
    let path = dir.join(FILE);
    let all = |net: &NetSpec| net.secrets.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    // Not following links, and not blocking on a FIFO: the file must be one moat wrote.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = match rustix::fs::open(&path, flags, Mode::empty()) {
        Ok(fd) => std::fs::File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Err(SecretsError::Missing { path, names: all(net) }),
        Err(e) => return Err(SecretsError::Read { path, source: e.into() }),
    };
    let meta = file.metadata().map_err(|source| SecretsError::Read { path: path.clone(), source })?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        let reason = format!("not a regular file of at most {} MiB", MAX_FILE >> 20);
        return Err(SecretsError::Damaged { path, reason });
    }
    let mut raw = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE).read_to_end(&mut raw).map_err(|source| SecretsError::Read { path: path.clone(), source })?;
    let stored: Stored<String> = serde_json::from_slice(&raw)
        .map_err(|e| SecretsError::Damaged { path: path.clone(), reason: e.to_string() })?;
    let mut missing = Vec::new();
    for s in &mut net.secrets {
        match stored.values.get(&s.name) {
            Some(v) => s.value = Some(v.clone()),
            None => missing.push(s.name.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(SecretsError::Missing { path, names: missing });
    }
    Ok(())
}

/// Schema migration: moats before this one kept secret values in `sandboxes.net`. Each row's
/// values go to its sandbox's file (under `run_root`, the runtime's run directory) and the row
/// is written back without them, in the migration's transaction: a crash before the commit
/// leaves the rows as they were, and the next start writes the files again. The database is
/// then scrubbed ([`scrub_if_pending`]), since rewritten rows leave the old bytes in free pages
/// and the WAL.
pub(crate) fn move_out_of_db(tx: &Connection, run_root: &Path) -> Result<(), StateError> {
    let mut rows: Vec<(String, NetSpec)> = Vec::new();
    {
        let mut stmt = tx.prepare("SELECT id, net FROM sandboxes WHERE net IS NOT NULL")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (id, raw) = row?;
            // A spec moat cannot read is treated as no network (see `state::sandboxes::parse_net`) and
            // stays as it is.
            if let Ok(net) = serde_json::from_str::<NetSpec>(&raw) {
                if net.secrets.iter().any(|s| s.value.is_some()) {
                    rows.push((id, net));
                }
            }
        }
    }
    for (id, mut net) in rows {
        let dir = run_root.join(&id);
        write_values(&dir, &net).map_err(|source| StateError::Io {
            what: format!("moving the secret values of sandbox {id} out of the state database into {}", dir.display()),
            source,
        })?;
        for s in &mut net.secrets {
            s.value = None;
        }
        let json = serde_json::to_string(&net).expect("a NetSpec always serializes");
        tx.execute("UPDATE sandboxes SET net = ?2 WHERE id = ?1", params![id, json])?;
    }
    tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('secrets_scrub', 'pending')", [])?;
    Ok(())
}

/// Finish [`move_out_of_db`]: rebuild the database from its live rows (VACUUM: no free page keeps
/// an old value, including those of sandboxes removed long ago) and empty the WAL. Done at every
/// open until it has succeeded once, so a crash half-way is finished by the next start.
pub(crate) fn scrub_if_pending(conn: &Connection) -> Result<(), StateError> {
    let pending: bool =
        conn.query_row("SELECT EXISTS(SELECT 1 FROM meta WHERE key = 'secrets_scrub')", [], |r| r.get(0))?;
    if !pending {
        return Ok(());
    }
    conn.execute_batch("VACUUM")?;
    conn.execute("DELETE FROM meta WHERE key = 'secrets_scrub'", [])?;
    // TRUNCATE leaves a WAL of zero bytes rather than old frames waiting to be overwritten.
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    if busy != 0 {
        tracing::warn!("the state database's WAL could not be emptied after moving secret values out of it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::sample;
    use moat_api::{Phase, SecretSpec};
    use std::os::unix::fs::PermissionsExt;

    use crate::state::Db;

    fn net_with(values: &[(&str, Option<&str>)]) -> NetSpec {
        NetSpec {
            secrets: values
                .iter()
                .map(|(name, value)| SecretSpec {
                    name: name.to_string(),
                    value: value.map(String::from),
                    hosts: vec!["api.test".into()],
                    in_body: false,
                })
                .collect(),
            ..NetSpec::default()
        }
    }

    fn without_values(net: &NetSpec) -> NetSpec {
        let mut net = net.clone();
        for s in &mut net.secrets {
            s.value = None;
        }
        net
    }

    /// Every file of the database (main, WAL, shared memory) that holds `needle`.
    fn db_files_holding(home: &Path, needle: &str) -> Vec<String> {
        ["state.db", "state.db-wal", "state.db-shm", "state.db-journal"]
            .into_iter()
            .filter(|f| {
                std::fs::read(home.join(f))
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
            .map(String::from)
            .collect()
    }

    fn sandbox(id: &str, net: NetSpec) -> SandboxInfo {
        SandboxInfo { phase: Phase::Stopped, memory_mib: 256, disk_mib: 1024, net, ..sample(id, &format!("box-{id}")) }
    }

    #[test]
    fn values_round_trip_through_an_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("abc");
        let net = net_with(&[("A", Some("sk-one")), ("B", Some("v\"with\\quotes\u{1}"))]);
        save(&run, &net).unwrap();
        let meta = std::fs::metadata(run.join(FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(std::fs::read_dir(&run).unwrap().count(), 1, "no temporary file is left");
        let mut back = without_values(&net);
        load(&run, &mut back).unwrap();
        assert_eq!(back, net);
        // Written again (a migration re-run after a crash): replaced, not refused.
        save(&run, &net).unwrap();
        let mut none = NetSpec::default();
        load(&dir.path().join("elsewhere"), &mut none).expect("no secrets need no file");
    }

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let (p, io) = (|| PathBuf::from("/p"), || std::io::Error::other("the io cause"));
        let cases = [
            SecretsError::Missing { path: p(), names: vec!["A".into()] },
            SecretsError::Read { path: p(), source: io() },
            SecretsError::Damaged { path: p(), reason: "x".into() },
            SecretsError::Write { path: p(), source: io() },
        ];
        for e in &cases {
            moat_hint::check(e, true).unwrap();
        }
        let e = SecretsError::Read { path: p(), source: io() }.for_sandbox("box", &net_with(&[("A", None)]));
        assert_eq!(e.message, "reading the secret values in /p: the io cause");
    }

    #[test]
    fn a_missing_file_or_value_is_named_with_the_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let net = net_with(&[("A", Some("sk-one"))]);
        let e = load(dir.path(), &mut without_values(&net)).unwrap_err();
        assert!(matches!(&e, SecretsError::Missing { names, .. } if names == &["A"]), "{e}");
        let hint = e.for_sandbox("box", &net).hint;
        assert!(hint.contains("moat rm box") && hint.contains("A set in moat's environment"), "{hint}");
        save(dir.path(), &net).unwrap();
        let mut more = without_values(&net_with(&[("A", None), ("B", None)]));
        let e = load(dir.path(), &mut more).unwrap_err();
        assert!(matches!(&e, SecretsError::Missing { names, .. } if names == &["B"]), "{e}");
    }

    #[test]
    fn a_link_or_a_fifo_in_place_of_the_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::write(&elsewhere, br#"{"values":{"A":"planted"}}"#).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(FILE)).unwrap();
        let mut net = without_values(&net_with(&[("A", None)]));
        assert!(matches!(load(dir.path(), &mut net), Err(SecretsError::Read { .. })));
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join(FILE),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(load(dir.path(), &mut net), Err(SecretsError::Damaged { .. })));
        assert_eq!(net.secrets[0].value, None);
    }

    #[test]
    fn the_database_never_holds_a_value() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        let net = net_with(&[("A", Some("sk-never-in-the-db"))]);
        db.insert(&sample_with(&net)).unwrap();
        db.set_net("abc000000001", &net).unwrap();
        assert_eq!(db.net_spec("abc000000001").unwrap(), without_values(&net));
        assert_eq!(db_files_holding(home.path(), "sk-never-in-the-db"), Vec::<String>::new());
    }

    fn sample_with(net: &NetSpec) -> SandboxInfo {
        sandbox("abc000000001", net.clone())
    }

    /// A home from before this store: its rows hold values in clear, and removed sandboxes left
    /// theirs in free pages. Opening it moves the values to the files and leaves none behind.
    #[test]
    fn an_old_database_has_its_values_moved_out_on_open() {
        let home = tempfile::tempdir().unwrap();
        let kept = net_with(&[("A", Some("sk-live-value")), ("B", Some("sk-second-value"))]);
        let gone = net_with(&[("A", Some("sk-removed-long-ago"))]);
        {
            let mut db = Db::open(home.path()).unwrap();
            db.insert(&sandbox("abc000000001", NetSpec::default())).unwrap();
            db.insert(&sandbox("abc000000002", NetSpec::default())).unwrap();
        }
        // What an older moat wrote: values in the JSON, schema before the move.
        let conn = Connection::open(Db::db_path(home.path())).unwrap();
        // Three migrations came before the move; the columns of later ones go too (first: that
        // rewrites the table, which would take the free pages the test looks into with it).
        conn.execute_batch(
            "ALTER TABLE sandboxes DROP COLUMN labels; ALTER TABLE sandboxes DROP COLUMN env; \
                 ALTER TABLE sandboxes DROP COLUMN mounts; ALTER TABLE snapshots DROP COLUMN host_mounts; \
                 ALTER TABLE sandboxes DROP COLUMN idle; ALTER TABLE snapshots DROP COLUMN remote; \
                 ALTER TABLE snapshots DROP COLUMN remote_digest; ALTER TABLE snapshots DROP COLUMN base_digest;",
        )
        .unwrap();
        for (id, net) in [("abc000000001", &kept), ("abc000000002", &gone)] {
            let json = serde_json::to_string(net).unwrap();
            conn.execute("UPDATE sandboxes SET net = ?2 WHERE id = ?1", params![id, json]).unwrap();
        }
        conn.execute("DELETE FROM sandboxes WHERE id = 'abc000000002'", []).unwrap();
        conn.pragma_update(None, "user_version", 3).unwrap();
        drop(conn);
        for value in ["sk-live-value", "sk-removed-long-ago"] {
            assert!(!db_files_holding(home.path(), value).is_empty(), "the old layout holds {value}");
        }

        let db = Db::open(home.path()).unwrap();
        let mut net = db.net_spec("abc000000001").unwrap();
        assert_eq!(net, without_values(&kept), "the row was written back without its values");
        load(&home.path().join("run/abc000000001"), &mut net).unwrap();
        assert_eq!(net, kept, "the values are in the sandbox's file");
        for value in ["sk-live-value", "sk-second-value", "sk-removed-long-ago"] {
            assert_eq!(db_files_holding(home.path(), value), Vec::<String>::new(), "{value}");
        }
        drop(db);
        Db::open(home.path()).expect("the migrated database opens again");
    }
}
