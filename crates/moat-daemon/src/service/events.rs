//! The daemon's event log, read from a point on, filtered, and optionally followed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use moat_api::{ErrorCode, Event, EventsQuery};

use super::Service;
use crate::error::ServiceError;

/// Most events in one batch.
const BATCH: usize = 256;
/// How often a follower looks again when no wake-up came (an event recorded by another path).
const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// Longest `kind` filter: kinds are short words (`net.refused`).
const MAX_KIND: usize = 64;

/// Which events a reader wants.
#[derive(Debug, Default)]
struct Filter {
    /// A sandbox id, or the start of one.
    sandbox: Option<String>,
    /// An exact kind, or a prefix when it ended in `*`.
    kind: Option<(String, bool)>,
    from_ms: Option<i64>,
    until_ms: Option<i64>,
}

impl Filter {
    fn matches(&self, e: &Event) -> bool {
        let sandbox = self.sandbox.as_deref().is_none_or(|s| e.sandbox.as_deref().is_some_and(|id| id.starts_with(s)));
        let kind = match &self.kind {
            Some((k, true)) => e.kind.starts_with(k.as_str()),
            Some((k, false)) => e.kind == *k,
            None => true,
        };
        sandbox && kind && self.from_ms.is_none_or(|t| e.at_ms >= t) && self.until_ms.is_none_or(|t| e.at_ms <= t)
    }

    /// Whether nothing recorded from now on can match.
    fn over(&self) -> bool {
        self.until_ms.is_some_and(|t| t < crate::state::now_ms())
    }
}

impl Service {
    /// Events after sequence number `q.since` (a negative `since`: after the last one recorded
    /// now) that match the query's filters, in batches, oldest first. Without `q.follow` the
    /// stream ends with the last recorded event; with it, it waits for new ones for as long as it
    /// is read, or until `q.until_ms` has passed.
    pub fn events(self: &Arc<Self>, q: &EventsQuery) -> Result<impl Stream<Item = Vec<Event>> + Send, ServiceError> {
        let filter = self.event_filter(q)?;
        let since = if q.since < 0 { self.db(|db| db.newest_event_seq()).unwrap_or(0) } else { q.since };
        let (svc, follow) = (self.clone(), q.follow);
        let filter = Arc::new(filter);
        Ok(futures_util::stream::unfold(since, move |seq| {
            let (svc, filter) = (svc.clone(), filter.clone());
            async move {
                loop {
                    let notified = svc.events.notified();
                    let batch = svc.db(|db| db.events_after(seq, BATCH)).unwrap_or_default();
                    if let Some(next) = batch.last().map(|e| e.seq) {
                        if filter.until_ms.is_some_and(|t| batch[0].at_ms > t) {
                            return None;
                        }
                        // A batch with nothing that matches still moves the reader on.
                        return Some((batch.into_iter().filter(|e| filter.matches(e)).collect(), next));
                    }
                    if !follow || filter.over() {
                        return None;
                    }
                    let _ = tokio::time::timeout(FOLLOW_POLL, notified).await;
                }
            }
        }))
    }

    fn event_filter(&self, q: &EventsQuery) -> Result<Filter, ServiceError> {
        let sandbox = match q.sandbox.as_deref() {
            None => None,
            // A sandbox removed since still has its events, under its id.
            Some(r) => Some(match self.resolve(r) {
                Ok(info) => info.id,
                Err(e)
                    if e.code == ErrorCode::NotFound && !r.is_empty() && r.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    r.to_ascii_lowercase()
                }
                Err(e) => return Err(e),
            }),
        };
        let kind = match q.kind.as_deref() {
            None => None,
            Some(k) => {
                let (word, prefix) = match k.strip_suffix('*') {
                    Some(p) => (p, true),
                    None => (k, false),
                };
                if k.len() > MAX_KIND || !word.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                    return Err(ServiceError::new(
                        ErrorCode::InvalidRequest,
                        format!("{:?} is not an event kind", k.chars().take(MAX_KIND).collect::<String>()),
                        "name a kind (phase, net.refused) or a prefix ending in * (net.*)",
                    ));
                }
                Some((word.to_string(), prefix))
            }
        };
        Ok(Filter { sandbox, kind, from_ms: q.from_ms, until_ms: q.until_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sandbox: Option<&str>, kind: &str, at_ms: i64) -> Event {
        Event { seq: 1, at_ms, sandbox: sandbox.map(str::to_string), kind: kind.into(), message: String::new() }
    }

    #[test]
    fn filters_combine() {
        let f = Filter {
            sandbox: Some("ab".into()),
            kind: Some(("net.".into(), true)),
            from_ms: Some(10),
            until_ms: Some(20),
        };
        assert!(f.matches(&event(Some("abc"), "net.refused", 15)));
        assert!(!f.matches(&event(Some("xbc"), "net.refused", 15)));
        assert!(!f.matches(&event(None, "net.refused", 15)));
        assert!(!f.matches(&event(Some("abc"), "phase", 15)));
        assert!(!f.matches(&event(Some("abc"), "net.refused", 21)));
        assert!(!f.matches(&event(Some("abc"), "net.refused", 9)));
        let exact = Filter { kind: Some(("phase".into(), false)), ..Default::default() };
        assert!(exact.matches(&event(None, "phase", 0)) && !exact.matches(&event(None, "phased", 0)));
    }
}
