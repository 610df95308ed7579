//! The calls of one mount that wait for the host's answers.
//!
//! A call stays here, with whatever waits for its answer, until the answer comes: not until it
//! was sent. A channel that ends (the host closed it, the link went away, the VM was restored
//! from a snapshot) loses nothing: the next channel that attaches sends every waiting call
//! again, in the order they were made.

use std::collections::{BTreeMap, VecDeque};

use moat_proto::hostfs::{encode, Call, Op};

/// The waiting calls; `W` is what completes one (a FUSE reply).
#[derive(Debug)]
pub(crate) struct Calls<W> {
    next_id: u64,
    /// By id, which is the order they were made in.
    waiting: BTreeMap<u64, (Call, W)>,
    /// Ids the attached channel has not sent yet.
    unsent: VecDeque<u64>,
}

impl<W> Default for Calls<W> {
    fn default() -> Calls<W> {
        Calls { next_id: 1, waiting: BTreeMap::new(), unsent: VecDeque::new() }
    }
}

impl<W> Calls<W> {
    /// Queue a call; it goes out with the attached channel, or the next one.
    pub(crate) fn add(&mut self, op: Op, waiter: W) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.insert(id, (Call { id, op }, waiter));
        self.unsent.push_back(id);
        id
    }

    /// How many calls wait for an answer.
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Append the next unsent call's message to `out`; false when there is none.
    pub(crate) fn encode_next(&mut self, out: &mut Vec<u8>) -> bool {
        while let Some(id) = self.unsent.pop_front() {
            if let Some((call, _)) = self.waiting.get(&id) {
                encode(call, out);
                return true;
            }
        }
        false
    }

    /// A new channel took over: everything still waiting goes out again.
    pub(crate) fn resend_all(&mut self) {
        self.unsent = self.waiting.keys().copied().collect();
    }

    /// What waits for call `id`, which the host just answered; `None` for an id that waits
    /// for nothing (already answered, or never made).
    pub(crate) fn answered(&mut self, id: u64) -> Option<W> {
        self.waiting.remove(&id).map(|(_, w)| w)
    }

    /// Everything still waiting, for a mount that is gone.
    pub(crate) fn drain(&mut self) -> Vec<W> {
        self.unsent.clear();
        std::mem::take(&mut self.waiting).into_values().map(|(_, w)| w).collect()
    }
}

#[cfg(test)]
mod tests {
    use moat_proto::hostfs::Decoder;

    use super::*;

    fn getattr(path: &str) -> Op {
        Op::Getattr { path: path.into() }
    }

    /// The calls the next sends would carry.
    fn sent(calls: &mut Calls<&'static str>) -> Vec<Call> {
        let mut bytes = Vec::new();
        while calls.encode_next(&mut bytes) {}
        let mut d = Decoder::default();
        d.push(&bytes);
        std::iter::from_fn(|| d.next::<Call>().expect("the agent's own messages decode")).collect()
    }

    #[test]
    fn answers_complete_their_own_call_in_any_order() {
        let mut calls = Calls::default();
        let a = calls.add(getattr("a"), "a");
        let b = calls.add(getattr("b"), "b");
        assert_eq!(sent(&mut calls).iter().map(|c| c.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(calls.answered(b), Some("b"));
        assert_eq!(calls.answered(b), None, "a second answer is ignored");
        assert_eq!(calls.answered(999), None, "an unknown id is ignored");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls.answered(a), Some("a"));
        assert_eq!(calls.len(), 0);
    }

    #[test]
    fn a_new_channel_gets_every_unanswered_call_again_in_order() {
        let mut calls = Calls::default();
        let ids: Vec<u64> = ["a", "b", "c"].iter().map(|p| calls.add(getattr(p), "w")).collect();
        assert_eq!(sent(&mut calls).len(), 3);
        calls.answered(ids[1]);
        // The channel ended; one more call came while none was attached.
        let d = calls.add(getattr("d"), "w");
        calls.resend_all();
        let again = sent(&mut calls);
        assert_eq!(again.iter().map(|c| c.id).collect::<Vec<_>>(), vec![ids[0], ids[2], d]);
        assert_eq!(again[0].op, getattr("a"));
        assert!(sent(&mut calls).is_empty(), "each call goes out once per channel");
    }

    #[test]
    fn a_call_answered_before_it_went_out_is_not_sent() {
        let mut calls = Calls::default();
        let a = calls.add(getattr("a"), "w");
        calls.resend_all();
        calls.answered(a); // on the channel before, just as the new one took over
        assert!(sent(&mut calls).is_empty());
    }

    #[test]
    fn a_gone_mount_hands_back_every_waiter() {
        let mut calls = Calls::default();
        calls.add(getattr("a"), "a");
        calls.add(getattr("b"), "b");
        assert_eq!(calls.drain(), vec!["a", "b"]);
        assert_eq!(calls.len(), 0);
        assert!(sent(&mut calls).is_empty());
    }
}
