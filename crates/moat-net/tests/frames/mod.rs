//! Frames as QEMU's `-netdev stream` carries them, built and read with smoltcp's wire types:
//! what the stack tests share.
#![allow(dead_code)] // Each test file uses a different part.

use std::net::Ipv4Addr;

use moat_net::{DNS_IP, GUEST_IP};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket,
};

pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

pub fn ethernet(payload_len: usize, ethertype: EthernetProtocol, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let eth = EthernetRepr { src_addr: GUEST_MAC, dst_addr: EthernetAddress::BROADCAST, ethertype };
    let mut frame = vec![0u8; eth.buffer_len() + payload_len];
    let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut f);
    fill(f.payload_mut());
    frame
}

pub fn ip_frame(dst: Ipv4Addr, proto: IpProtocol, payload_len: usize, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let ip = Ipv4Repr { src_addr: GUEST_IP, dst_addr: dst, next_header: proto, payload_len, hop_limit: 64 };
    ethernet(ip.buffer_len() + payload_len, EthernetProtocol::Ipv4, |p| {
        let mut packet = Ipv4Packet::new_unchecked(p);
        ip.emit(&mut packet, &ChecksumCapabilities::default());
        fill(packet.payload_mut());
    })
}

pub fn dns_query(name: &str) -> Vec<u8> {
    use hickory_proto::op::Message;
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::query();
    m.add_query(hickory_proto::op::Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.metadata.recursion_desired = true;
    m.to_vec().unwrap()
}

pub fn dns_answer(frame: &[u8]) -> Option<Vec<Ipv4Addr>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    if ip.src_addr() != DNS_IP || udp.src_port() != 53 {
        return None;
    }
    let m = hickory_proto::op::Message::from_vec(udp.payload()).ok()?;
    Some(
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                hickory_proto::rr::RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect(),
    )
}
