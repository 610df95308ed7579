//! The append-only logs: every phase a sandbox entered (`lifecycle`) and the event stream
//! (`events`), which is trimmed by age and count since a guest can make it grow.

use moat_api::{Event, LifecycleEntry, Phase};
use rusqlite::{params, Connection};

use super::sandboxes::parse_phase;
use super::{now_ms, Db, StateError};

/// The newest events kept for each sandbox (and for the daemon itself); older ones are deleted.
pub const EVENTS_PER_SANDBOX: i64 = 1000;
/// The newest events kept in all, whatever their sandbox, unless configured otherwise.
pub const EVENTS_MAX: i64 = 100_000;
/// Events older than this (30 days) are deleted, unless configured otherwise.
pub const EVENTS_MAX_AGE_MS: i64 = 30 * 24 * 3600 * 1000;
/// Old events are deleted every this many new ones: a scan of a table this size takes
/// milliseconds, and between two prunes it grows by at most this much.
const PRUNE_EVENTS_EVERY: i64 = 256;

/// How many events are kept and for how long (`moat serve --events-max --events-max-age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRetention {
    pub max_age: std::time::Duration,
    /// Events kept in all; each sandbox keeps at most [`EVENTS_PER_SANDBOX`] of them besides.
    pub max_events: u64,
}

impl Default for EventRetention {
    fn default() -> EventRetention {
        EventRetention {
            max_age: std::time::Duration::from_millis(EVENTS_MAX_AGE_MS as u64),
            max_events: EVENTS_MAX as u64,
        }
    }
}

/// The retention lives in a per-connection TEMP table: every write that records an event prunes
/// through the connection it has (a transaction's), and a backup never copies it.
pub(super) fn init_retention(conn: &Connection) -> Result<(), StateError> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS event_retention (max_age_ms INTEGER NOT NULL, max_events INTEGER NOT NULL);
         DELETE FROM temp.event_retention;",
    )?;
    set_retention(conn, EventRetention::default())
}

fn set_retention(conn: &Connection, r: EventRetention) -> Result<(), StateError> {
    let age = i64::try_from(r.max_age.as_millis()).unwrap_or(i64::MAX);
    let max = i64::try_from(r.max_events).unwrap_or(i64::MAX);
    conn.execute("DELETE FROM temp.event_retention", [])?;
    conn.execute("INSERT INTO temp.event_retention (max_age_ms, max_events) VALUES (?1, ?2)", params![age, max])?;
    Ok(())
}

impl Db {
    /// Keep events by `retention` from now on; what is already past it goes at once.
    pub fn set_event_retention(&mut self, retention: EventRetention) -> Result<(), StateError> {
        set_retention(&self.conn, retention)?;
        prune_events(&self.conn)?;
        Ok(())
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

    /// The sequence number of the newest event (0 when there is none).
    pub fn newest_event_seq(&self) -> Result<i64, StateError> {
        Ok(self.conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?)
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

pub(super) fn append_lifecycle(
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

pub(super) fn append_event(
    conn: &Connection,
    sandbox: Option<&str>,
    kind: &str,
    message: &str,
) -> Result<(), StateError> {
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
/// sandbox or the newest the retention keeps. Event numbers never repeat (AUTOINCREMENT), so a
/// follower that was behind simply resumes at the oldest one left. Returns how many went.
fn prune_events(conn: &Connection) -> Result<usize, StateError> {
    let (max_age_ms, max_events): (i64, i64) =
        conn.query_row("SELECT max_age_ms, max_events FROM temp.event_retention", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let old = conn.execute("DELETE FROM events WHERE at_ms < ?1", [now_ms().saturating_sub(max_age_ms)])?;
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
        [max_events],
    )?;
    Ok(old + per_sandbox + overall)
}

#[cfg(test)]
mod tests {
    use moat_api::Event;

    use super::*;

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
    fn configured_retention_trims_by_age_and_total() {
        let home = tempfile::tempdir().unwrap();
        let mut db = Db::open(home.path()).unwrap();
        let total = |db: &Db| -> i64 { db.conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0)).unwrap() };
        let insert_aged = |db: &Db, age_ms: i64, what: &str| {
            db.conn
                .execute(
                    "INSERT INTO events (at_ms, sandbox_id, kind, message) VALUES (?1, NULL, 'test', ?2)",
                    params![now_ms() - age_ms, what],
                )
                .unwrap();
        };
        // Two hours old and a minute old: a one-hour retention keeps only the second.
        insert_aged(&db, 2 * 3600 * 1000, "old");
        insert_aged(&db, 60 * 1000, "recent");
        for i in 0..20 {
            db.event(Some(&format!("s{i}")), "test", "new").unwrap();
        }
        let hour = EventRetention { max_age: std::time::Duration::from_secs(3600), max_events: 1_000_000 };
        db.set_event_retention(hour).unwrap();
        let left = db.events_after(0, usize::MAX).unwrap();
        assert!(left.iter().all(|e| e.message != "old") && left.iter().any(|e| e.message == "recent"));
        assert_eq!(total(&db), 21);
        // A total cap keeps the newest, across sandboxes.
        db.set_event_retention(EventRetention { max_events: 5, ..hour }).unwrap();
        assert_eq!(total(&db), 5);
        // And holds as events keep coming (checked every few hundred).
        for _ in 0..(2 * PRUNE_EVENTS_EVERY) {
            db.event(None, "test", "more").unwrap();
        }
        assert!(total(&db) <= 5 + PRUNE_EVENTS_EVERY, "{}", total(&db));
        // Reopening starts from the defaults (the binary sets them again each start).
        drop(db);
        let db = Db::open(home.path()).unwrap();
        let kept: (i64, i64) = db
            .conn
            .query_row("SELECT max_age_ms, max_events FROM temp.event_retention", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!(kept, (EVENTS_MAX_AGE_MS, EVENTS_MAX));
    }
}
