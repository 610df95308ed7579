//! Backups of the state database: consistent copies taken while the daemon runs (SQLite's online
//! backup API, from a connection of their own so the service's is never held), the daemon's
//! periodic copies under `backups/` with their retention, the check that a file is a moat state
//! database, and the restore that puts one in place while no daemon runs.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_hint::Hint;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::migrations::SCHEMA_VERSION;
use super::{now_ms, Db};

/// The tables every moat state database has had since its first schema.
const REQUIRED_TABLES: &[&str] = &["meta", "sandboxes", "lifecycle", "events"];
/// Tries of a backup that finds the database locked (a checkpoint in progress) before it gives up.
const BUSY_TRIES: u32 = 50;
/// The periodic backups' folder under the home and the prefix of their names.
const BACKUPS_DIR: &str = "backups";
const BACKUP_PREFIX: &str = "state-";

/// Errors of backups and restores; [`Hint`] says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot copy the state database {}", db.display())]
    Copy { db: PathBuf, source: rusqlite::Error },
    #[error("{} is not a moat state database: {reason}", file.display())]
    NotState { file: PathBuf, reason: String },
    #[error("{} was written by a newer moat (schema {found}, this moat knows {known})", file.display())]
    TooNew { file: PathBuf, found: i64, known: i64 },
    #[error("a moat daemon is running on {}", home.display())]
    DaemonRunning { home: PathBuf },
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
}

impl Hint for BackupError {
    fn hint(&self) -> Option<Cow<'static, str>> {
        Some(match self {
            BackupError::Copy { .. } => "see the daemon log; `moat doctor` checks the state".into(),
            BackupError::NotState { .. } => {
                "name a file written by `moat state backup` or one of `$MOAT_HOME/backups/state-*.db`; the current \
                 state is untouched"
                    .into()
            }
            BackupError::TooNew { .. } => "restore it with the newer moat; the current state is untouched".into(),
            BackupError::DaemonRunning { .. } => {
                "stop it first (`moat daemon stop`, or kill the pid in $MOAT_HOME/daemon.lock); sandboxes keep \
                 running and the next daemon reconciles them with the restored state"
                    .into()
            }
            BackupError::Io { .. } => return None,
        })
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

/// Copy the state database of `home` to `dest` (a new file), consistently, while the daemon
/// writes to it. The copy is taken in one step, inside one read transaction: in WAL mode that
/// blocks no writer, and a copy made in steps would restart whenever the daemon wrote between two.
pub fn backup(home: &Path, dest: &Path) -> Result<(), BackupError> {
    let db = Db::db_path(home);
    let copy = |source| BackupError::Copy { db: db.clone(), source };
    let from = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(copy)?;
    from.busy_timeout(Duration::from_secs(5)).map_err(copy)?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Owner only, like the database: it says what every sandbox runs and may reach.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(io(format!("creating {}", dest.display())))?;
    }
    let mut to = Connection::open(dest).map_err(copy)?;
    {
        let b = Backup::new(&from, &mut to).map_err(copy)?;
        let mut tries = 0;
        loop {
            match b.step(-1).map_err(copy)? {
                StepResult::Done => break,
                StepResult::More => {}
                // Busy or locked (a checkpoint, another writer's lock): wait and try again.
                _ if tries < BUSY_TRIES => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    return Err(copy(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some("the database stayed locked".into()),
                    )))
                }
            }
        }
    }
    // A copy is one file: no -wal beside it to lose.
    to.pragma_update(None, "journal_mode", "DELETE").map_err(copy)?;
    Ok(())
}

/// What [`check_file`] found in a state database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    /// Migrations applied (`PRAGMA user_version`).
    pub schema: i64,
    pub state_id: String,
    pub sandboxes: i64,
}

/// Check that `file` is a moat state database this moat can open: SQLite's `integrity_check`
/// passes, it has moat's tables and a state id, and its schema is not newer than this moat's.
/// The file is opened read-only and never changed.
pub fn check_file(file: &Path) -> Result<StateFile, BackupError> {
    let not_state = |reason: String| BackupError::NotState { file: file.to_path_buf(), reason };
    let meta = std::fs::metadata(file).map_err(io(format!("reading {}", file.display())))?;
    if !meta.is_file() {
        return Err(not_state("it is not a regular file".into()));
    }
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| not_state(e.to_string()))?;
    let sql = |e: rusqlite::Error| not_state(e.to_string());
    let mut stmt = conn.prepare("PRAGMA integrity_check").map_err(sql)?;
    let problems: Vec<String> =
        stmt.query_map([], |r| r.get(0)).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
    if problems != ["ok"] {
        let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
        return Err(not_state(format!("SQLite's integrity check failed: {}", shown.join("; "))));
    }
    for table in REQUIRED_TABLES {
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |r| r.get(0))
            .map_err(sql)?;
        if n == 0 {
            return Err(not_state(format!("it has no table {table:?}")));
        }
    }
    let schema: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
    if schema > SCHEMA_VERSION {
        return Err(BackupError::TooNew { file: file.to_path_buf(), found: schema, known: SCHEMA_VERSION });
    }
    let state_id: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'state_id'", [], |r| r.get(0))
        .map_err(|_| not_state("it has no state id".into()))?;
    let sandboxes = conn.query_row("SELECT COUNT(*) FROM sandboxes", [], |r| r.get(0)).map_err(sql)?;
    Ok(StateFile { schema, state_id, sandboxes })
}

/// What [`restore`] did.
#[derive(Debug, Clone)]
pub struct Restored {
    pub file: StateFile,
    /// Where the state database that was replaced went (none when the home had none).
    pub aside: Option<PathBuf>,
}

/// Put the state database `file` in place of `home`'s, which is moved aside to
/// `state.db.before-restore-<ms>` (never deleted). Refused while a daemon serves the home: the
/// daemon's lock is held for the whole restore, so none can start halfway. The next daemon
/// migrates an older schema and reconciles sandboxes with what really runs (adoption, then gc).
pub fn restore(home: &Path, file: &Path) -> Result<Restored, BackupError> {
    let checked = check_file(file)?;
    let _lock = lock_home(home)?;
    let db = Db::db_path(home);
    // Copied next to the database first, so the swap is renames on one filesystem.
    let incoming = home.join("state.db.restoring");
    let _ = std::fs::remove_file(&incoming);
    copy_private(file, &incoming)?;
    let aside = home.join(format!("state.db.before-restore-{}", now_ms()));
    let mut moved = None;
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", db.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", aside.display()));
            std::fs::rename(&from, &to).map_err(io(format!("moving {} aside", from.display())))?;
            moved = Some(aside.clone());
        }
    }
    std::fs::rename(&incoming, &db).map_err(io(format!("putting {} in place", db.display())))?;
    // The marker names the database this home has now, so the daemon opens it.
    let marker = home.join("state.id");
    let tmp = home.join("state.id.tmp");
    std::fs::write(&tmp, checked.state_id.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, &marker))
        .map_err(io(format!("writing {}", marker.display())))?;
    Ok(Restored { file: checked, aside: moved })
}

fn copy_private(from: &Path, to: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from).map_err(io(format!("reading {}", from.display())))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io(format!("creating {}", to.display())))?;
    std::io::copy(&mut src, &mut dst).and_then(|_| dst.sync_all()).map_err(io(format!(
        "copying {} to {}",
        from.display(),
        to.display()
    )))?;
    Ok(())
}

/// The daemon's lock of `home` (see `lock_home` in the crate root), or why it is taken.
fn lock_home(home: &Path) -> Result<std::os::fd::OwnedFd, BackupError> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let path = home.join("daemon.lock");
    let fd = rustix::fs::open(&path, OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC, Mode::from_raw_mode(0o600))
        .map_err(|e| BackupError::Io { what: format!("opening {}", path.display()), source: e.into() })?;
    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| BackupError::DaemonRunning { home: home.to_path_buf() })?;
    Ok(fd)
}

/// Where the daemon's periodic backups go.
pub fn backups_dir(home: &Path) -> PathBuf {
    home.join(BACKUPS_DIR)
}

/// Write a periodic backup, `backups/state-<UTC date-time>.db`, then delete all but the newest
/// `keep`. Returns the new file.
pub fn periodic_backup(home: &Path, keep: usize) -> Result<PathBuf, BackupError> {
    let dir = backups_dir(home);
    moat_sandbox::create_private_dir(&dir).map_err(|e| BackupError::Io {
        what: format!("creating {}", dir.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let name = format!("{BACKUP_PREFIX}{}.db", utc_stamp(now_ms()));
    let file = dir.join(&name);
    // Written under a name the retention ignores until it is whole.
    let partial = dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_file(&partial);
    let made = backup(home, &partial)
        .and_then(|()| std::fs::rename(&partial, &file).map_err(io(format!("renaming {}", partial.display()))));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    prune_backups(&dir, keep)?;
    Ok(file)
}

/// Delete all but the newest `keep` periodic backups in `dir` (their names sort by time).
pub fn prune_backups(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, BackupError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(format!("listing {}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(BACKUP_PREFIX) && n.ends_with(".db"))
        })
        .collect();
    files.sort();
    let extra = files.len().saturating_sub(keep);
    let gone: Vec<PathBuf> = files.into_iter().take(extra).collect();
    for f in &gone {
        std::fs::remove_file(f).map_err(io(format!("deleting {}", f.display())))?;
    }
    Ok(gone)
}

/// `20261203T084510.123Z`: sorts by time, and safe in a file name.
fn utc_stamp(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::sample;

    #[test]
    fn a_backup_restores_what_was_recorded_and_keeps_the_replaced_state() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        db.insert(&sample("abc000000001", "kept")).unwrap();
        let copy = home.path().join("copy.db");
        // Taken with the daemon's connection open, as the daemon does.
        backup(home.path(), &copy).unwrap();
        db.insert(&sample("abc000000002", "later")).unwrap();
        drop(db);
        let checked = check_file(&copy).unwrap();
        assert_eq!((checked.schema, checked.sandboxes), (SCHEMA_VERSION, 1));
        let restored = restore(home.path(), &copy).unwrap();
        let aside = restored.aside.expect("the old state moved aside");
        assert!(aside.file_name().unwrap().to_str().unwrap().starts_with("state.db.before-restore-"));
        let db = Db::open(home.path()).unwrap();
        let names: Vec<String> = db.list().unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["kept"]);
        assert_eq!(check_file(&aside).unwrap().sandboxes, 2, "the replaced state is intact");
    }

    #[test]
    fn garbage_and_foreign_databases_are_refused() {
        let home = tempfile::tempdir().unwrap();
        let garbage = home.path().join("garbage.db");
        std::fs::write(&garbage, vec![b'x'; 8192]).unwrap();
        assert!(matches!(check_file(&garbage), Err(BackupError::NotState { .. })));
        let foreign = home.path().join("foreign.db");
        Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
        let e = check_file(&foreign).unwrap_err();
        assert!(e.to_string().contains("no table \"meta\""), "{e}");
        moat_hint::check(&e, true).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused_and_the_state_untouched() {
        let home = tempfile::tempdir().unwrap();
        Db::open(home.path()).unwrap().insert(&sample("abc000000001", "mine")).unwrap();
        let newer = home.path().join("newer.db");
        backup(home.path(), &newer).unwrap();
        Connection::open(&newer).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let e = restore(home.path(), &newer).unwrap_err();
        assert!(matches!(e, BackupError::TooNew { .. }), "{e}");
        assert_eq!(Db::open(home.path()).unwrap().list().unwrap().len(), 1);
    }

    #[test]
    fn a_restore_is_refused_while_the_daemon_holds_the_home() {
        let home = tempfile::tempdir().unwrap();
        drop(Db::open(home.path()).unwrap());
        let copy = home.path().join("copy.db");
        backup(home.path(), &copy).unwrap();
        let _daemon = lock_home(home.path()).unwrap();
        let e = restore(home.path(), &copy).unwrap_err();
        assert!(matches!(e, BackupError::DaemonRunning { .. }), "{e}");
        assert!(e.hint().unwrap().contains("moat daemon stop"));
    }

    #[test]
    fn periodic_backups_keep_the_newest() {
        let home = tempfile::tempdir().unwrap();
        drop(Db::open(home.path()).unwrap());
        let mut made = Vec::new();
        for _ in 0..4 {
            made.push(periodic_backup(home.path(), 2).unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut left: Vec<PathBuf> =
            std::fs::read_dir(backups_dir(home.path())).unwrap().map(|e| e.unwrap().path()).collect();
        left.sort();
        assert_eq!(left, made[2..]);
        check_file(&left[1]).unwrap();
    }

    #[test]
    fn stamps_are_utc_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000.000Z");
        assert_eq!(utc_stamp(1_796_287_510_123), "20261203T084510.123Z");
        assert_eq!(utc_stamp(951_782_400_000), "20000229T000000.000Z");
    }
}
