//! The daemon's event log, read from a point on and optionally followed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use moat_api::Event;

use super::Service;

/// Most events in one batch.
const BATCH: usize = 256;
/// How often a follower looks again when no wake-up came (an event recorded by another path).
const FOLLOW_POLL: Duration = Duration::from_secs(1);

impl Service {
    /// Events after sequence number `since` (a negative `since`: after the last one recorded
    /// now), in batches, oldest first. Without `follow` the stream ends with the last recorded
    /// event; with it, it waits for new ones for as long as it is read.
    pub fn events_since(self: &Arc<Self>, since: i64, follow: bool) -> impl Stream<Item = Vec<Event>> + Send {
        let since = if since < 0 { self.db(|db| db.newest_event_seq()).unwrap_or(0) } else { since };
        let svc = self.clone();
        futures_util::stream::unfold(since, move |seq| {
            let svc = svc.clone();
            async move {
                loop {
                    let notified = svc.events.notified();
                    let batch = svc.db(|db| db.events_after(seq, BATCH)).unwrap_or_default();
                    if let Some(next) = batch.last().map(|e| e.seq) {
                        return Some((batch, next));
                    }
                    if !follow {
                        return None;
                    }
                    let _ = tokio::time::timeout(FOLLOW_POLL, notified).await;
                }
            }
        })
    }
}
