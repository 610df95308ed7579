//! What a sandbox's network carried and refused, counted for the daemon's metrics and its idle
//! checks. Relaxed atomics: each number is read on its own, never as a consistent set.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::Rule;

/// Every rule a refusal can name, in the order [`Traffic::refusals`] reports them.
pub const RULES: [Rule; 9] = [
    Rule::Loopback,
    Rule::Private,
    Rule::LinkLocal,
    Rule::Metadata,
    Rule::Multicast,
    Rule::Reserved,
    Rule::Host,
    Rule::Allowlist,
    Rule::Limit,
];

/// Counters of one sandbox's network. The daemon makes one per sandbox and hands it to each
/// stack it starts for it, so the counts run on across restarts of the sandbox.
#[derive(Debug, Default)]
pub struct Traffic {
    from_guest: AtomicU64,
    to_guest: AtomicU64,
    refused: [AtomicU64; RULES.len()],
}

impl Traffic {
    /// Bytes of Ethernet frames the guest sent, and that were sent to it.
    pub fn bytes(&self) -> (u64, u64) {
        (self.from_guest.load(Ordering::Relaxed), self.to_guest.load(Ordering::Relaxed))
    }

    /// Flows and DNS queries refused, by rule (every rule, zeros included).
    pub fn refusals(&self) -> [(Rule, u64); RULES.len()] {
        std::array::from_fn(|i| (RULES[i], self.refused[i].load(Ordering::Relaxed)))
    }

    pub(super) fn sent_by_guest(&self, bytes: usize) {
        self.from_guest.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn sent_to_guest(&self, bytes: usize) {
        self.to_guest.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Count a refusal by the rule its message names (every refusal message of the stack ends
    /// with `(rule NAME)`); one naming none is counted under the allowlist, the rule that refuses
    /// what no address rule does.
    pub(super) fn refused(&self, message: &str) {
        let rule = rule_of(message).unwrap_or(Rule::Allowlist);
        self.refused[index(rule)].fetch_add(1, Ordering::Relaxed);
    }
}

/// The rule a refusal message names.
fn rule_of(message: &str) -> Option<Rule> {
    let (_, rest) = message.rsplit_once("(rule ")?;
    let name = rest.split(')').next()?;
    RULES.into_iter().find(|r| r.as_str() == name)
}

/// Where `rule` is counted; a match, so that a new rule fails to compile until it has a place.
fn index(rule: Rule) -> usize {
    match rule {
        Rule::Loopback => 0,
        Rule::Private => 1,
        Rule::LinkLocal => 2,
        Rule::Metadata => 3,
        Rule::Multicast => 4,
        Rule::Reserved => 5,
        Rule::Host => 6,
        Rule::Allowlist => 7,
        Rule::Limit => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_has_its_own_counter() {
        for (i, rule) in RULES.into_iter().enumerate() {
            assert_eq!(index(rule), i, "{}", rule.as_str());
        }
    }

    #[test]
    fn refusals_are_counted_by_the_rule_the_message_names() {
        let t = Traffic::default();
        t.refused("tcp 127.0.0.1:1 refused: loopback address (rule loopback)");
        t.refused("udp 10.0.0.1:53 refused: private address (rule private)");
        t.refused("dns x.org refused: not on the allowlist (rule allowlist) (3 more refusals not logged)");
        t.refused("tcp 10.0.2.2:80 refused: private address (rule private)");
        t.refused("something new (rule nonsense)");
        let counts: std::collections::HashMap<&str, u64> =
            t.refusals().into_iter().map(|(r, n)| (r.as_str(), n)).collect();
        assert_eq!(counts["loopback"], 1);
        assert_eq!(counts["private"], 2);
        assert_eq!(counts["allowlist"], 2);
        assert_eq!(counts["limit"], 0);
        assert_eq!(counts.len(), RULES.len());
    }

    #[test]
    fn bytes_add_up_each_way() {
        let t = Traffic::default();
        t.sent_by_guest(60);
        t.sent_by_guest(1514);
        t.sent_to_guest(42);
        assert_eq!(t.bytes(), (1574, 42));
    }
}
