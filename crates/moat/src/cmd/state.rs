//! `moat state …`: backups of the daemon's state database, restoring one, and the state check
//! of `moat doctor`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use futures_util::StreamExt;
use moat_daemon::state::backup;
use tokio::io::AsyncWriteExt;

use crate::cli::{HostArgs, StateCommand};
use crate::cmd::daemon::connect;
use crate::cmd::doctor::{Check, Status};
use crate::cmd::runtime_config;
use crate::error::Hinted;

pub async fn state(command: StateCommand, host: &HostArgs) -> anyhow::Result<i32> {
    match command {
        StateCommand::Backup { file, force } => back_up(&file, force, host).await,
        StateCommand::Restore { file } => restore(&file, host),
    }
}

/// `FILE.tmp` beside `file`: written whole, checked, then renamed over `file`.
fn partial(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

async fn back_up(file: &Path, force: bool, host: &HostArgs) -> anyhow::Result<i32> {
    if !force && file.symlink_metadata().is_ok() {
        return Err(Hinted::new(
            format!("{} exists", file.display()),
            "name another file, or pass --force to replace it",
        )
        .into());
    }
    let client = connect(host).await?;
    let tmp = partial(file);
    let written = async {
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut body = std::pin::pin!(client.backup_state().await?);
        let mut bytes = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            out.write_all(&chunk).await.with_context(|| format!("writing {}", tmp.display()))?;
        }
        out.sync_all().await.with_context(|| format!("writing {}", tmp.display()))?;
        // What arrived is checked as a restore would check it: a cut-off copy is never kept.
        let checked = backup::check_file(&tmp)?;
        anyhow::Ok((bytes, checked))
    }
    .await;
    let (bytes, checked) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, file).with_context(|| format!("renaming {} to {}", tmp.display(), file.display()))?;
    println!("{}: {} sandboxes, {} bytes (schema {})", file.display(), checked.sandboxes, bytes, checked.schema);
    Ok(0)
}

fn restore(file: &Path, host: &HostArgs) -> anyhow::Result<i32> {
    let home = runtime_config(host)?.home;
    let restored = backup::restore(&home, file)?;
    println!("restored {} ({} sandboxes)", file.display(), restored.file.sandboxes);
    if let Some(aside) = &restored.aside {
        println!("the state it replaced is kept as {}", aside.display());
    }
    println!(
        "the next daemon reconciles sandboxes with the VMs and disks that exist: see `moat ps`; `moat gc` reclaims \
         what the restored state does not know"
    );
    Ok(0)
}

/// `moat doctor`'s check of the state database: SQLite's integrity check, read-only (safe while
/// the daemon runs), its schema, and the newest periodic backup.
pub fn state_check(home: &Path) -> Check {
    let db = moat_daemon::Db::db_path(home);
    if !db.exists() {
        return Check { name: "state", status: Status::Ok, detail: "no state database yet".into(), fix: None };
    }
    match backup::check_file(&db) {
        Ok(f) => {
            let newest = std::fs::read_dir(backup::backups_dir(home)).ok().and_then(|d| {
                d.filter_map(Result::ok).map(|e| e.file_name()).filter(|n| n.to_string_lossy().ends_with(".db")).max()
            });
            let backups = match newest {
                Some(n) => format!("newest backup backups/{}", n.to_string_lossy()),
                None => "no periodic backup yet".into(),
            };
            Check {
                name: "state",
                status: Status::Ok,
                detail: format!("{} intact (schema {}, {} sandboxes); {backups}", db.display(), f.schema, f.sandboxes),
                fix: None,
            }
        }
        Err(e) => Check {
            name: "state",
            status: Status::Fail,
            detail: moat_hint::one_line(&e),
            fix: Some(
                "restore a backup with `moat state restore FILE` (the daemon stopped; $MOAT_HOME/backups has the \
                 daemon's own), or start afresh with `moat serve --reset-state`"
                    .into(),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_check_passes_a_sound_database_and_fails_a_damaged_one() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(state_check(home.path()).status, Status::Ok, "no database yet is fine");
        drop(moat_daemon::Db::open(home.path()).unwrap());
        let check = state_check(home.path());
        assert_eq!(check.status, Status::Ok, "{check:?}");
        assert!(check.detail.contains("intact") && check.detail.contains("no periodic backup"), "{check:?}");
        std::fs::write(moat_daemon::Db::db_path(home.path()), vec![b'x'; 4096]).unwrap();
        let check = state_check(home.path());
        assert_eq!(check.status, Status::Fail, "{check:?}");
        assert!(check.fix.unwrap().contains("moat state restore"));
    }

    #[test]
    fn a_partial_backup_is_written_beside_the_file() {
        assert_eq!(partial(Path::new("/x/state.db")), Path::new("/x/state.db.tmp"));
    }
}
