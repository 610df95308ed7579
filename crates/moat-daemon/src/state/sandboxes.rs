//! Sandbox rows: recording a sandbox, moving it between phases, its network, lease and pid,
//! and finding it by id, name or id prefix.

use moat_api::{NetMode, NetSpec, OnExpire, Phase, SandboxInfo};
use rusqlite::{params, Connection, OptionalExtension};

use super::events::{append_event, append_lifecycle};
use super::{Db, StateError};
use crate::phase;

impl Db {
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
                disk_mib, hostname, created_at, expires_at, on_expire, pid, last_error, net, labels, env, mounts, idle)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)",
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
                serde_json::to_string(&s.labels).expect("labels always serialize"),
                serde_json::to_string(&s.env).expect("an environment always serializes"),
                serde_json::to_string(&s.mounts).expect("mounts always serialize"),
                s.idle.map(|i| serde_json::to_string(&i).expect("an idle policy always serializes")),
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

    /// Note why something around a sandbox went wrong that did not fail it (its `last_error`, shown
    /// by inspect), with an event.
    pub fn note(&mut self, id: &str, note: &str) -> Result<(), StateError> {
        let note = moat_api::escape_controls(note);
        let tx = self.conn.transaction()?;
        tx.execute("UPDATE sandboxes SET last_error = ?2 WHERE id = ?1", params![id, note])?;
        append_event(&tx, Some(id), "note", &note)?;
        tx.commit()?;
        Ok(())
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
}

const COLUMNS: &str = "id, name, phase, version, image, image_digest, accel, vcpus, memory_mib, disk_mib, hostname, \
                       created_at, expires_at, on_expire, pid, last_error, snapshot_id, net, labels, env, mounts, idle";

fn get(conn: &Connection, id: &str) -> Result<Option<SandboxInfo>, StateError> {
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"), [id], row_to_info).optional()?)
}

pub(super) fn parse_phase(col: usize, s: &str) -> rusqlite::Result<Phase> {
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
        OnExpire::Pause => "pause",
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
        on_expire: match on_expire.as_str() {
            "stop" => OnExpire::Stop,
            "pause" => OnExpire::Pause,
            _ => OnExpire::Remove,
        },
        pid: r.get(14)?,
        last_error: r.get(15)?,
        snapshot_id: r.get(16)?,
        isolation: None,
        net: redacted(parse_net(r.get::<_, Option<String>>(17)?.as_deref())),
        labels: parse_json(r.get::<_, Option<String>>(18)?.as_deref(), "labels"),
        env: parse_json(r.get::<_, Option<String>>(19)?.as_deref(), "default environment"),
        mounts: parse_json(r.get::<_, Option<String>>(20)?.as_deref(), "mounts"),
        idle: parse_json(r.get::<_, Option<String>>(21)?.as_deref(), "idle policy"),
    })
}

/// A JSON column; empty when NULL (a sandbox made before the column existed).
fn parse_json<T: serde::de::DeserializeOwned + Default>(raw: Option<&str>, what: &str) -> T {
    let Some(raw) = raw else { return T::default() };
    serde_json::from_str(raw).unwrap_or_else(|e| {
        tracing::warn!("unreadable {what} in the state database ({e}); treating them as none");
        T::default()
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

#[cfg(test)]
mod tests {
    use moat_api::Phase;

    use crate::state::tests::sample;
    use crate::state::{Db, StateError};

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
}
