//! The stack driven the way QEMU drives it: length-prefixed Ethernet frames on a unix stream,
//! built with smoltcp's wire types. Everything stays on loopback.

use std::net::Ipv4Addr;
mod frames;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use frames::{dns_answer, dns_query, ethernet, ip_frame, GUEST_MAC};
use moat_net::dns::Dns;
use moat_net::{ConnectGuestError, Policy, Stack, StackConfig, DNS_IP, GUEST_IP, HOST_IP};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol,
    Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

struct Guest {
    stream: UnixStream,
    refused: Arc<Mutex<Vec<String>>>,
    stack: Arc<Stack>,
}

fn start(policy: Policy) -> Guest {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let refused = Arc::new(Mutex::new(Vec::new()));
    let log = refused.clone();
    let cfg = StackConfig {
        policy: Arc::new(RwLock::new(policy)),
        // Never asked in these tests: every name they query is answered by moat itself.
        dns: Arc::new(Dns::new(&["127.0.0.1:9".parse().unwrap()]).unwrap()),
        on_refused: Arc::new(move |m| log.lock().unwrap().push(m)),
        secrets: None,
        limits: Default::default(),
        host_addresses: Vec::new(),
    };
    Guest { stream: ours, refused, stack: Arc::new(Stack::over(theirs, cfg).unwrap()) }
}

impl Guest {
    async fn send(&mut self, frame: &[u8]) {
        self.stream.write_all(&(frame.len() as u32).to_be_bytes()).await.unwrap();
        self.stream.write_all(frame).await.unwrap();
    }

    /// The next frame the stack sends that `want` accepts (others, e.g. ARP requests, skipped).
    async fn expect<T>(&mut self, what: &str, want: impl Fn(&[u8]) -> Option<T>) -> T {
        let wait = async {
            loop {
                let mut len = [0u8; 4];
                self.stream.read_exact(&mut len).await.unwrap();
                let mut frame = vec![0; u32::from_be_bytes(len) as usize];
                self.stream.read_exact(&mut frame).await.unwrap();
                if let Some(t) = want(&frame) {
                    return t;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap_or_else(|_| panic!("no {what} from the stack"))
    }
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    ethernet(arp.buffer_len(), EthernetProtocol::Arp, |p| arp.emit(&mut ArpPacket::new_unchecked(p)))
}

fn syn(dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port,
        dst_port,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64240,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    ip_frame(dst, IpProtocol::Tcp, tcp.buffer_len(), |p| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(p),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(dst),
            &ChecksumCapabilities::default(),
        )
    })
}

fn udp(dst: Ipv4Addr, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr { src_port: 40000, dst_port };
    ip_frame(dst, IpProtocol::Udp, udp.header_len() + payload.len(), |p| {
        udp.emit(
            &mut UdpPacket::new_unchecked(p),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(dst),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        )
    })
}

/// The TCP segment in a frame to the guest: (source, control flags as SYN/ACK/RST).
fn tcp_reply(frame: &[u8]) -> Option<(Ipv4Addr, u16, bool, bool, bool)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    (ip.next_header() == IpProtocol::Tcp).then(|| (ip.src_addr(), tcp.src_port(), tcp.syn(), tcp.ack(), tcp.rst()))
}

fn arp_reply_for(target: Ipv4Addr) -> impl Fn(&[u8]) -> Option<()> {
    move |frame| {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
        matches!(arp, ArpRepr::EthernetIpv4 { operation: ArpOperation::Reply, source_protocol_addr, .. }
            if source_protocol_addr == target)
        .then_some(())
    }
}

#[tokio::test]
async fn arp_dns_and_refusals() {
    let mut g = start(Policy::default());
    g.send(&arp_request(HOST_IP)).await;
    g.expect("ARP reply for the gateway", arp_reply_for(HOST_IP)).await;
    g.send(&udp(DNS_IP, 53, &dns_query("host.moat.internal."))).await;
    assert_eq!(g.expect("DNS answer", dns_answer).await, [HOST_IP]);

    // A private address: refused with a reset, and the refusal names the rule.
    g.send(&syn(Ipv4Addr::new(10, 1, 2, 3), 41000, 80)).await;
    let (src, port, s, _, rst) = g.expect("reset", tcp_reply).await;
    assert_eq!((src, port, s, rst), (Ipv4Addr::new(10, 1, 2, 3), 80, false, true));
    let refused = g.refused.lock().unwrap().clone();
    assert_eq!(refused, ["tcp 10.1.2.3:80 refused: private address (rule private)"]);
    // The host's loopback behind the gateway: refused unless allowed.
    g.send(&syn(HOST_IP, 41001, 8080)).await;
    assert!(g.expect("reset", tcp_reply).await.4);
    assert!(g.refused.lock().unwrap()[1].contains("rule loopback"), "{:?}", g.refused);
}

#[tokio::test]
async fn an_allowed_connection_is_accepted_with_the_real_address() {
    let policy = Policy { allow_cidrs: vec!["127.0.0.1/32".parse().unwrap()], ..Policy::default() };
    let mut g = start(policy);
    // The guest's ARP announces its MAC the way Linux does before it sends anything.
    g.send(&arp_request(HOST_IP)).await;
    g.expect("ARP reply", arp_reply_for(HOST_IP)).await;
    g.send(&syn(HOST_IP, 41002, 8080)).await;
    let (src, port, s, ack, rst) = g.expect("SYN-ACK", tcp_reply).await;
    assert_eq!((src, port, s, ack, rst), (HOST_IP, 8080, true, true, false));
    assert!(g.refused.lock().unwrap().is_empty());
}

#[tokio::test]
async fn garbage_frames_never_wedge_the_stack() {
    let mut g = start(Policy::default());
    let valid = [
        arp_request(HOST_IP),
        syn(Ipv4Addr::new(10, 9, 9, 9), 1, 2),
        udp(DNS_IP, 53, &dns_query("host.moat.internal.")),
        udp(DNS_IP, 53, b"\x00\x01garbage"),
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..20_000 {
        let mut frame = valid[i % valid.len()].clone();
        for _ in 0..(next() % 6) {
            let at = (next() as usize) % frame.len();
            frame[at] = next() as u8;
        }
        frame.truncate((next() as usize) % (frame.len() + 1));
        g.send(&frame).await;
    }
    // Drain whatever the garbage provoked, then the stack must still answer.
    g.send(&udp(DNS_IP, 53, &dns_query("host.moat.internal."))).await;
    assert_eq!(g.expect("DNS answer after garbage", dns_answer).await, [HOST_IP]);
    g.send(&arp_request(DNS_IP)).await;
    g.expect("ARP reply after garbage", arp_reply_for(DNS_IP)).await;
}

/// A segment from the guest's `port` to the gateway's `to_port`.
fn tcp_from_guest(
    port: u16,
    to_port: u16,
    control: TcpControl,
    seq: TcpSeqNumber,
    ack: TcpSeqNumber,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: port,
        dst_port: to_port,
        control,
        seq_number: seq,
        ack_number: Some(ack),
        window_len: 64240,
        window_scale: None,
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    ip_frame(HOST_IP, IpProtocol::Tcp, tcp.buffer_len(), |p| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(p),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(HOST_IP),
            &ChecksumCapabilities::default(),
        )
    })
}

/// A segment to the guest: (gateway port, guest port, SYN, sequence number, payload).
fn tcp_to_guest(frame: &[u8]) -> Option<(u16, u16, bool, TcpSeqNumber, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.dst_addr() != GUEST_IP {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((tcp.src_port(), tcp.dst_port(), tcp.syn(), tcp.seq_number(), tcp.payload().to_vec()))
}

#[tokio::test]
async fn the_host_connects_to_guest_ports_and_a_closed_one_is_refused() {
    let mut g = start(Policy::default());
    g.send(&arp_request(HOST_IP)).await;
    g.expect("ARP reply", arp_reply_for(HOST_IP)).await;

    // Nothing listens: the guest answers the SYN with a reset.
    let stack = g.stack.clone();
    let closed = tokio::spawn(async move { stack.connect_guest(8081).await });
    let (from, to, syn, seq, _) = g.expect("SYN to the guest", tcp_to_guest).await;
    assert_eq!((to, syn), (8081, true));
    g.send(&tcp_from_guest(8081, from, TcpControl::Rst, TcpSeqNumber(0), seq + 1, &[])).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), closed).await.expect("an answer in time").unwrap();
    assert!(matches!(refused, Err(ConnectGuestError::Refused(8081))), "{:?}", refused.err());

    // A server: the handshake, then bytes both ways.
    let stack = g.stack.clone();
    let open = tokio::spawn(async move { stack.connect_guest(8080).await });
    let (from, to, syn, seq, _) = g.expect("SYN to the guest", tcp_to_guest).await;
    assert_eq!((to, syn), (8080, true));
    let ours = TcpSeqNumber(5000);
    g.send(&tcp_from_guest(8080, from, TcpControl::Syn, ours, seq + 1, &[])).await;
    let mut stream = tokio::time::timeout(Duration::from_secs(5), open)
        .await
        .expect("connected in time")
        .unwrap()
        .expect("the guest accepted");
    stream.write_all(b"ping").await.unwrap();
    let sent = g.expect("data to the guest", |f| tcp_to_guest(f).filter(|s| !s.4.is_empty())).await;
    assert_eq!((sent.3, sent.4.as_slice()), (seq + 1, &b"ping"[..]));
    g.send(&tcp_from_guest(8080, from, TcpControl::Psh, ours + 1, seq + 5, b"pong")).await;
    let mut answer = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer)).await.unwrap().unwrap();
    assert_eq!(&answer, b"pong");
}
