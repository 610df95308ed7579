//! The state of one host mount that the FUSE session thread and the channel attached to it
//! share: the calls waiting for answers, the inode table, open files, and which channel (if
//! any) carries the calls now.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use moat_proto::hostfs::{Answer, Op};
use tokio::sync::Notify;

use super::calls::Calls;
use super::handles::Handles;
use super::inodes::Inodes;
use super::reply::Waiter;

/// Calls waiting for the host at once; past this the FUSE session thread waits for answers
/// (the kernel keeps the guest's further requests queued).
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// What the attached channel should do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// A call's message was appended to the buffer.
    Call,
    /// Nothing to send; wait for the channel's wake-up.
    Idle,
    /// Another channel took over, or the mount is gone: this channel is over.
    Over,
}

struct Attachment {
    id: u64,
    wake: Arc<Notify>,
}

pub(crate) struct State {
    pub(crate) calls: Calls<Waiter>,
    pub(crate) inodes: Inodes,
    pub(crate) handles: Handles,
    attached: Option<Attachment>,
    attachments: u64,
    /// The FUSE session ended (unmounted in the guest): nothing will be called again.
    ended: bool,
}

impl State {
    fn carried_by(&self, attachment: u64) -> bool {
        !self.ended && self.attached.as_ref().is_some_and(|a| a.id == attachment)
    }
}

/// One mount's shared state.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when calls complete, for a session thread waiting for room.
    room: Condvar,
}

impl Default for Shared {
    fn default() -> Shared {
        let state = State {
            calls: Calls::default(),
            inodes: Inodes::default(),
            handles: Handles::default(),
            attached: None,
            attachments: 0,
            ended: false,
        };
        Shared { state: Mutex::new(state), room: Condvar::new() }
    }
}

impl Shared {
    /// The state, for work that makes no call.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock aborts the agent; in tests, carry on with what is there.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, once fewer than [`MAX_IN_FLIGHT`] calls wait; blocks the FUSE session thread
    /// until then.
    pub(crate) fn room(&self) -> MutexGuard<'_, State> {
        let state = self.lock();
        self.room
            .wait_while(state, |s| s.calls.len() >= MAX_IN_FLIGHT && !s.ended)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a call and wake the attached channel, if any.
    pub(crate) fn call(&self, mut state: MutexGuard<'_, State>, op: Op, waiter: Waiter) {
        if state.ended {
            return waiter.fail(fuser::Errno::EIO);
        }
        state.calls.add(op, waiter);
        if let Some(a) = &state.attached {
            a.wake.notify_one();
        }
    }

    /// The host answered: complete the call it names (an unknown id is a late answer to a call
    /// completed already, and ignored).
    pub(crate) fn answer(&self, answer: Answer) {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(waiter) = state.calls.answered(answer.id) {
            waiter.complete(answer.result, &mut state.inodes, &mut state.handles);
            self.room.notify_all();
        }
    }

    /// A channel takes over: it gets every waiting call, and the one before it (if any) is
    /// woken to find it is over. Returns the attachment's id and its wake-up.
    pub(crate) fn attach(&self) -> (u64, Arc<Notify>) {
        let mut state = self.lock();
        state.attachments += 1;
        let id = state.attachments;
        let wake = Arc::new(Notify::new());
        if let Some(old) = state.attached.replace(Attachment { id, wake: wake.clone() }) {
            old.wake.notify_one();
        }
        state.calls.resend_all();
        (id, wake)
    }

    /// Channel `id` ended; calls wait for the next one.
    pub(crate) fn detach(&self, id: u64) {
        let mut state = self.lock();
        if state.attached.as_ref().is_some_and(|a| a.id == id) {
            state.attached = None;
        }
    }

    /// Whether channel `id` still carries this mount's calls.
    pub(crate) fn is_current(&self, id: u64) -> bool {
        self.lock().carried_by(id)
    }

    /// For channel `id`: append the next call to send to `out`.
    pub(crate) fn next_call(&self, id: u64, out: &mut Vec<u8>) -> Next {
        let mut state = self.lock();
        if !state.carried_by(id) {
            return Next::Over;
        }
        if state.calls.encode_next(out) {
            Next::Call
        } else {
            Next::Idle
        }
    }

    pub(crate) fn ended(&self) -> bool {
        self.lock().ended
    }

    /// The FUSE session is over: fail what still waits and end the attached channel.
    pub(crate) fn end(&self) {
        let mut state = self.lock();
        state.ended = true;
        for waiter in state.calls.drain() {
            waiter.fail(fuser::Errno::EIO);
        }
        if let Some(a) = &state.attached {
            a.wake.notify_one();
        }
        self.room.notify_all();
    }
}
