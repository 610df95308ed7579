//! The frames between QEMU's stream netdev and smoltcp, both ways bounded in bytes.
//!
//! Frames for the guest are written by smoltcp straight into the bytes that go on the socket
//! (a 4-byte big-endian length, then the frame), so a round of the poll loop is one `write` and
//! no frame is copied on the way.

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant as SmolInstant;

use crate::MTU;

/// Largest frame accepted from QEMU: an MTU-sized packet in an Ethernet header, with room for
/// VLAN tags. QEMU never sends more (its stream netdev's own limit is 69632 bytes).
pub(super) const MAX_FRAME: usize = MTU + 32;
/// Bytes of the guest's frames waiting for smoltcp; the reader waits beyond this, so a guest
/// that sends faster than the stack polls is slowed down instead of growing the queue.
pub(super) const RX_LIMIT: usize = 1 << 20;
/// Bytes of frames for the guest one round of the poll loop may produce before it writes them
/// out; smoltcp holds the rest of its segments back until the next round.
const WIRE_LIMIT: usize = 512 * 1024;

/// Frames from the guest waiting for smoltcp, and the bytes for QEMU that smoltcp produced.
#[derive(Default)]
pub(super) struct Queues {
    rx: VecDeque<Vec<u8>>,
    rx_bytes: usize,
    /// Length-prefixed frames for the guest, in QEMU's framing.
    wire: Vec<u8>,
    /// Bytes of the frames in `wire` (without the length prefixes), for the traffic counters.
    bytes_out: usize,
    /// smoltcp had more to send than `wire` could take this round.
    held_back: bool,
}

impl Queues {
    /// Whether the guest's frames fill the queue: the reader waits until a poll drains it.
    pub(super) fn rx_full(&self) -> bool {
        self.rx_bytes >= RX_LIMIT
    }

    pub(super) fn push_rx(&mut self, frame: Vec<u8>) {
        self.rx_bytes += frame.len();
        self.rx.push_back(frame);
    }

    /// Append a frame for the guest, built by `fill` in place.
    pub(super) fn push_tx(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) {
        let start = self.wire.len();
        // smoltcp never builds a frame over its MTU, and every caller bounds `len` by it.
        let prefix = u32::try_from(len).expect("a frame is shorter than 4 GiB");
        self.wire.extend_from_slice(&prefix.to_be_bytes());
        self.wire.resize(start + 4 + len, 0);
        fill(&mut self.wire[start + 4..]);
        self.bytes_out += len;
    }

    /// Whether more frames for the guest may be queued this round.
    pub(super) fn tx_room(&self) -> bool {
        self.wire.len() < WIRE_LIMIT
    }

    /// Hand this round's bytes for QEMU to the writer, swapping in `spare` (emptied) for the
    /// next round; returns the bytes of frames handed over, and whether smoltcp held some back.
    pub(super) fn take_wire(&mut self, spare: &mut Vec<u8>) -> (usize, bool) {
        spare.clear();
        std::mem::swap(&mut self.wire, spare);
        let out = (self.bytes_out, std::mem::take(&mut self.held_back));
        self.bytes_out = 0;
        out
    }
}

pub(super) struct Rx(Vec<u8>);
pub(super) struct Tx<'a>(&'a mut Queues);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut r = None;
        self.0.push_tx(len, |buf| r = Some(f(buf)));
        r.expect("push_tx calls its fill once")
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        // A reply to a frame is always taken (it is bounded by the frames received), so that
        // ARP and resets never wait for room.
        let frame = self.rx.pop_front()?;
        self.rx_bytes -= frame.len();
        Some((Rx(frame), Tx(self)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        if !self.tx_room() {
            self.held_back = true;
            return None;
        }
        Some(Tx(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_for_the_guest_go_out_in_qemu_framing_and_the_round_is_bounded() {
        let mut q = Queues::default();
        let mut rounds = 0;
        while q.tx_room() {
            let tx = q.transmit(SmolInstant::ZERO).expect("room for a frame");
            tx.consume(MTU + 14, |buf| buf.fill(7));
            rounds += 1;
        }
        assert!(q.transmit(SmolInstant::ZERO).is_none());
        let mut spare = Vec::new();
        let (bytes, held_back) = q.take_wire(&mut spare);
        assert_eq!((bytes, held_back), (rounds * (MTU + 14), true));
        assert_eq!(&spare[..4], &((MTU + 14) as u32).to_be_bytes());
        assert_eq!(spare.len(), rounds * (MTU + 18));
        assert!(q.tx_room() && q.wire.is_empty());
    }

    #[test]
    fn the_guests_frames_are_counted_in_bytes() {
        let mut q = Queues::default();
        while !q.rx_full() {
            q.push_rx(vec![0; MAX_FRAME]);
        }
        while q.receive(SmolInstant::ZERO).is_some() {}
        assert_eq!(q.rx_bytes, 0);
        assert!(!q.rx_full());
    }
}
