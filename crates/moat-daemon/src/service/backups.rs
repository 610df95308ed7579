//! Keeping the state safe: backups of the state database on request (`GET /v1/state/backup`) and
//! on a schedule, and removing sandboxes that ended long ago (`moat serve --prune-after`).

use std::sync::Arc;
use std::time::Duration;

use moat_api::Phase;

use super::Service;
use crate::error::ServiceError;
use crate::state::backup::{self, BackupError};
use crate::state::now_ms;

/// How often the daemon copies its state database, and how many copies it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSchedule {
    /// None: no periodic backups.
    pub every: Option<Duration>,
    pub keep: usize,
}

impl Default for BackupSchedule {
    fn default() -> BackupSchedule {
        BackupSchedule { every: Some(Duration::from_secs(24 * 3600)), keep: 7 }
    }
}

/// How long the daemon keeps what piles up: events, backups of its state, ended sandboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub events: crate::state::EventRetention,
    pub backups: BackupSchedule,
    /// Remove stopped, failed and expired sandboxes this long after they ended.
    pub prune_after: Option<Duration>,
}

fn backup_failed(e: BackupError) -> ServiceError {
    let hint = moat_hint::Hint::hint(&e).unwrap_or_else(|| "see the daemon log".into());
    ServiceError::new(moat_api::ErrorCode::Internal, moat_hint::one_line(&e), hint)
}

/// `3d`, `5h`, `12m`, `40s`: a duration in its largest whole unit, for messages.
pub(crate) fn roughly(secs: i64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl Service {
    /// A fresh, consistent copy of the state database, as an open file that is already unlinked:
    /// it goes away when the caller is done with it, whatever happens to the request.
    pub async fn backup_state(&self) -> Result<std::fs::File, ServiceError> {
        let home = self.rt.config.home.clone();
        tokio::task::spawn_blocking(move || {
            let tmp = home.join(format!(".state-backup-{:016x}.db", rand::random::<u64>()));
            let made = backup::backup(&home, &tmp).and_then(|()| {
                std::fs::File::open(&tmp)
                    .map_err(|source| BackupError::Io { what: format!("reading {}", tmp.display()), source })
            });
            let _ = std::fs::remove_file(&tmp);
            made.map_err(backup_failed)
        })
        .await
        .map_err(|e| ServiceError::internal(format!("the backup task failed: {e}")))?
    }

    /// Copy the state database to `backups/` every `schedule.every`, keeping the newest
    /// `schedule.keep`; runs until the daemon ends. The first copy is made one period after start.
    pub async fn back_up_periodically(self: Arc<Self>, schedule: BackupSchedule) {
        let Some(every) = schedule.every else { return std::future::pending().await };
        let home = self.rt.config.home.clone();
        loop {
            tokio::time::sleep(every).await;
            let (home, keep) = (home.clone(), schedule.keep);
            match tokio::task::spawn_blocking(move || backup::periodic_backup(&home, keep)).await {
                Ok(Ok(file)) => tracing::info!(file = %file.display(), "backed up the state database"),
                Ok(Err(e)) => tracing::warn!(error = %moat_hint::one_line(&e), "backing up the state database failed"),
                Err(e) => tracing::warn!(error = %e, "the backup task failed"),
            }
        }
    }

    /// Remove sandboxes that ended (stopped, failed or expired) at least `after` ago. A paused
    /// sandbox is kept: it was put away to be resumed, its memory on disk on purpose.
    pub async fn prune_ended(&self, after: Duration) {
        let Ok(all) = self.list() else { return };
        let now = now_ms();
        let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        for s in all.into_iter().filter(|s| matches!(s.phase, Phase::Stopped | Phase::Failed | Phase::Expired)) {
            let Ok(lifecycle) = self.db(|db| db.lifecycle(&s.id)) else { continue };
            let Some(ended) = lifecycle.last().map(|e| e.at_ms) else { continue };
            if now.saturating_sub(ended) < after_ms {
                continue;
            }
            let message = format!(
                "{} removed: it had been {} for {} (--prune-after {})",
                s.name,
                s.phase,
                roughly(now.saturating_sub(ended) / 1000),
                roughly(after_ms / 1000)
            );
            tracing::info!(sandbox = %s.id, %message, "pruning an ended sandbox");
            if let Err(e) = self.db(|db| db.event(Some(&s.id), "pruned", &message)) {
                tracing::warn!(sandbox = %s.id, error = %e, "recording a prune failed");
            }
            if let Err(e) = self.remove(&s.id, false).await {
                tracing::warn!(sandbox = %s.id, error = %e, "pruning an ended sandbox failed");
            }
        }
    }
}
