//! The channel side of a host mount: calls go out as stdout under the host's credit, answers
//! come in as stdin and are credited back as soon as they are decoded.

use std::sync::Arc;

use moat_proto::hostfs::{Answer, Decoder};
use moat_proto::{Message, Stream, INITIAL_WINDOW, MAX_CHUNK};
use tokio::sync::{mpsc, Notify};

use super::shared::{Next, Shared};
use crate::channel::{Ctl, Outbox};

/// Why a mount's channel ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// The host closed the channel or the link went away; the calls wait for the next one.
    Closed,
    /// Another channel took the mount over, or the mount is gone.
    Over,
    /// The host sent something that is not an answer.
    Broken,
}

/// Carry mount calls over channel `id` (attachment `me`) until it ends.
pub(crate) async fn run(
    id: u32,
    mount: &Shared,
    me: u64,
    wake: Arc<Notify>,
    out: &Outbox,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
) -> End {
    let mut credit: u32 = INITIAL_WINDOW;
    // The call being sent, and how much of it went out.
    let mut sending: Vec<u8> = Vec::new();
    let mut sent = 0;
    let mut answers = Decoder::default();
    loop {
        if !mount.is_current(me) {
            return End::Over;
        }
        loop {
            if sent == sending.len() {
                sending.clear();
                sent = 0;
                match mount.next_call(me, &mut sending) {
                    Next::Call => {}
                    Next::Idle => break,
                    Next::Over => return End::Over,
                }
            }
            if credit == 0 {
                break;
            }
            let n = (sending.len() - sent).min(MAX_CHUNK).min(credit as usize);
            let data = sending[sent..sent + n].to_vec();
            if !out.send(id, Message::Data { stream: Stream::Stdout, data }).await {
                return End::Closed;
            }
            sent += n;
            credit -= n as u32;
        }
        tokio::select! {
            msg = ctl.recv() => match msg {
                // Answers are handed over as they are decoded, so the host's credit comes back
                // at once: it never has more than one frame unacknowledged.
                Some(Ctl::Stdin(data)) => {
                    answers.push(&data);
                    loop {
                        match answers.next::<Answer>() {
                            Ok(Some(answer)) => mount.answer(answer),
                            Ok(None) => break,
                            Err(e) => {
                                eprintln!("moat-agent: channel {id}: {e}; closing the host mount's channel");
                                return End::Broken;
                            }
                        }
                    }
                    let bytes = data.len() as u32;
                    if bytes > 0 && !out.send(id, Message::Credit { stream: Stream::Stdin, bytes }).await {
                        return End::Closed;
                    }
                }
                Some(Ctl::Credit(Stream::Stdout, n)) => credit = credit.saturating_add(n),
                Some(Ctl::Close) | None => return End::Closed,
                Some(_) => {}
            },
            () = wake.notified() => {}
        }
    }
}
