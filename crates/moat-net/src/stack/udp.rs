//! A guest's UDP: DNS to moat's resolver, other datagrams relayed through host sockets.

use std::net::SocketAddrV4;
use std::sync::Arc;

use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr,
};
use tokio::net::UdpSocket;

use super::{real_destination, Inner, UdpFlow, STACK_MAC, UDP_IDLE};
use crate::policy::{Rule, Verdict};
use crate::{DNS_IP, GUEST_IP, MTU};

impl Inner {
    pub(super) fn udp_input(self: &Arc<Self>, from: SocketAddrV4, to: SocketAddrV4, payload: Vec<u8>) {
        if *from.ip() != GUEST_IP {
            return;
        }
        if *to.ip() == DNS_IP {
            if to.port() == 53 {
                self.dns_query(from, to, payload);
            }
            return;
        }
        let mut flows = self.udp.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flow) = flows.get(&(from.port(), to)) {
            let _ = flow.socket.try_send(&payload);
            return;
        }
        let real = real_destination(*to.ip());
        let verdict = if flows.len() >= self.cfg.limits.udp {
            Verdict::Refuse(Rule::Limit)
        } else {
            let names = self.pins.lock().unwrap_or_else(|e| e.into_inner()).names(*to.ip());
            self.policy().check(real, &self.host_addrs, names)
        };
        match verdict {
            Verdict::Allow => {}
            Verdict::Refuse(rule) => {
                drop(flows);
                self.refused(format!("udp {to} refused: {} (rule {})", rule.describe(), rule.as_str()));
                return;
            }
            // A datagram names no host moat could check (QUIC's is encrypted): HTTP/3 clients
            // fall back to TCP, where the name is checked.
            Verdict::ByName => {
                drop(flows);
                self.refused(format!(
                    "udp {to} refused: UDP (QUIC included) cannot be checked by name; allow a CIDR for it with \
                     --allow-cidr (rule {})",
                    Rule::Allowlist.as_str()
                ));
                return;
            }
        }
        let socket = match std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| {
                s.set_nonblocking(true)?;
                s.connect(SocketAddrV4::new(real, to.port()))?;
                Ok(s)
            })
            .and_then(UdpSocket::from_std)
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::debug!("udp to {to}: {e}");
                return;
            }
        };
        let _ = socket.try_send(&payload);
        let inner = self.clone();
        let recv = socket.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, recv.recv(&mut buf)).await {
                inner.send_udp(to, from, &buf[..n]);
            }
            inner.udp.lock().unwrap_or_else(|e| e.into_inner()).remove(&(from.port(), to));
        });
        flows.insert((from.port(), to), UdpFlow { socket, task });
    }

    fn dns_query(self: &Arc<Self>, from: SocketAddrV4, to: SocketAddrV4, query: Vec<u8>) {
        let Ok(permit) = self.dns_slots.clone().try_acquire_owned() else { return };
        let inner = self.clone();
        tokio::spawn(async move {
            let policy = inner.policy().clone();
            let answer = inner.cfg.dns.answer(&query, &policy, &inner.pins).await;
            if let Some(name) = answer.refused {
                inner.refused(format!(
                    "dns {name} refused: {} (rule {})",
                    Rule::Allowlist.describe(),
                    Rule::Allowlist.as_str()
                ));
            }
            if let Some(packet) = answer.packet {
                inner.send_udp(to, from, &packet);
            }
            drop(permit);
        });
    }

    /// Send a datagram to the guest, as coming from `from`.
    fn send_udp(&self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        // Datagrams that do not fit one frame would need fragments; the guest never gets them.
        if payload.len() > MTU - 28 {
            return;
        }
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let Some(guest_mac) = core.guest_mac else { return };
        let udp = UdpRepr { src_port: from.port(), dst_port: to.port() };
        let ip = Ipv4Repr {
            src_addr: *from.ip(),
            dst_addr: *to.ip(),
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + payload.len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(STACK_MAC),
            dst_addr: guest_mac,
            ethertype: EthernetProtocol::Ipv4,
        };
        if !core.dev.tx_room() {
            return; // a full NIC queue drops the datagram, as a real one would
        }
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let len = eth.buffer_len() + ip.buffer_len() + udp.header_len() + payload.len();
        core.dev.push_tx(len, |frame| {
            let mut eth_frame = EthernetFrame::new_unchecked(frame);
            eth.emit(&mut eth_frame);
            let mut ip_packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
            ip.emit(&mut ip_packet, &caps);
            let mut udp_packet = UdpPacket::new_unchecked(ip_packet.payload_mut());
            udp.emit(
                &mut udp_packet,
                &IpAddress::Ipv4(ip.src_addr),
                &IpAddress::Ipv4(ip.dst_addr),
                payload.len(),
                |buf| buf.copy_from_slice(payload),
                &caps,
            );
        });
        drop(core);
        self.wake.notify_one();
    }
}
