//! A guest that opens every flow it can must not use up the daemon's file descriptors: the other
//! sandboxes' networks and the API's `accept` still get theirs. This file is its own test process
//! because it lowers the process's descriptor limit.

use std::net::{Ipv4Addr, SocketAddr};
mod frames;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use frames::{dns_answer, dns_query, ethernet, ip_frame, GUEST_MAC};
use moat_net::dns::Dns;
use moat_net::{FlowLimits, Policy, Stack, StackConfig, DNS_IP, GUEST_IP, HOST_IP};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol,
    Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{TcpSocket, UdpSocket, UnixStream};
use tokio::sync::mpsc;

/// The soft limit the test runs under: a daemon whose limit could not be raised far.
const NOFILE: u64 = 256;
/// Flows the hostile guest opens: more than the limit.
const FLOWS: u16 = 600;
/// What the second stack's DNS upstream answers.
const ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// One sandbox's network as the guest sees it: frames out, frames in.
struct Guest {
    tx: OwnedWriteHalf,
    frames: mpsc::UnboundedReceiver<Vec<u8>>,
    refused: Arc<Mutex<Vec<String>>>,
    _stack: Stack,
}

fn start(policy: Policy, upstream_dns: SocketAddr, limits: FlowLimits) -> Guest {
    let (ours, theirs) = UnixStream::pair().expect("a socket pair");
    let refused = Arc::new(Mutex::new(Vec::new()));
    let log = refused.clone();
    let cfg = StackConfig {
        policy: Arc::new(RwLock::new(policy)),
        dns: Arc::new(Dns::new(&[upstream_dns]).expect("a resolver")),
        on_refused: Arc::new(move |m| log.lock().unwrap().push(m)),
        secrets: None,
        limits,
        host_addresses: Vec::new(),
    };
    let stack = Stack::over(theirs, cfg).expect("the stack starts");
    // Read concurrently: a stack whose frames nobody reads stops polling.
    let (mut rx, tx) = ours.into_split();
    let (frames_tx, frames) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let mut len = [0u8; 4];
            if rx.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut frame = vec![0; u32::from_be_bytes(len) as usize];
            if rx.read_exact(&mut frame).await.is_err() || frames_tx.send(frame).is_err() {
                return;
            }
        }
    });
    Guest { tx, frames, refused, _stack: stack }
}

impl Guest {
    async fn send(&mut self, frame: &[u8]) {
        self.tx.write_all(&(frame.len() as u32).to_be_bytes()).await.unwrap();
        self.tx.write_all(frame).await.unwrap();
    }

    /// The next frame `want` accepts, within 5 s.
    async fn expect<T>(&mut self, what: &str, want: impl Fn(&[u8]) -> Option<T>) -> T {
        let wait = async {
            loop {
                let frame = self.frames.recv().await.expect("the stack is running");
                if let Some(t) = want(&frame) {
                    return t;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap_or_else(|_| panic!("no {what} from the stack"))
    }

    /// Say who we are, as Linux does before it sends anything.
    async fn announce(&mut self) {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: GUEST_MAC,
            source_protocol_addr: GUEST_IP,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: HOST_IP,
        };
        let frame = ethernet(arp.buffer_len(), EthernetProtocol::Arp, |p| arp.emit(&mut ArpPacket::new_unchecked(p)));
        self.send(&frame).await;
        self.expect("ARP reply", |f| {
            let eth = EthernetFrame::new_checked(f).ok()?;
            let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
            matches!(arp, ArpRepr::EthernetIpv4 { operation: ArpOperation::Reply, .. }).then_some(())
        })
        .await;
    }
}

/// A segment from the guest to the gateway: a SYN, or the ACK that completes the handshake.
fn segment(src_port: u16, dst_port: u16, ack_of: Option<TcpSeqNumber>) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port,
        dst_port,
        control: if ack_of.is_none() { TcpControl::Syn } else { TcpControl::None },
        seq_number: TcpSeqNumber(if ack_of.is_none() { 1000 } else { 1001 }),
        ack_number: ack_of.map(|s| s + 1),
        window_len: 64240,
        window_scale: None,
        max_seg_size: ack_of.is_none().then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
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

/// A TCP segment to the guest: (guest port, its sequence number if it is a SYN-ACK, whether it
/// is a reset).
fn reply(frame: &[u8]) -> Option<(u16, Option<TcpSeqNumber>, bool)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((tcp.dst_port(), (tcp.syn() && tcp.ack()).then(|| tcp.seq_number()), tcp.rst()))
}

/// A name server on loopback that answers every A query with [`ANSWER`].
async fn upstream_dns() -> SocketAddr {
    use hickory_proto::op::Message;
    use hickory_proto::rr::{rdata::A, RData, Record};
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
            answer.metadata.recursion_available = true;
            for q in &query.queries {
                answer.add_query(q.clone());
                answer.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(ANSWER))));
            }
            let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
        }
    });
    addr
}

fn lower_descriptor_limit(to: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write a struct this function owns.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = to;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "lowering RLIMIT_NOFILE");
    }
}

#[tokio::test]
async fn a_guest_holding_every_flow_leaves_descriptors_for_other_sandboxes_and_the_api() {
    lower_descriptor_limit(NOFILE);
    let dns = upstream_dns().await;
    // A server on the host's loopback that the hostile guest may reach (--allow-cidr 127.0.0.1/32),
    // with room for every connection in its backlog.
    let server = TcpSocket::new_v4().unwrap();
    server.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = server.listen(1024).unwrap();
    let port = server.local_addr().unwrap().port();

    // Four sandboxes may run: each stack gets a quarter of what the daemon does not keep.
    let limits = FlowLimits::share_of(NOFILE, 4);
    let open = Policy { allow_cidrs: vec!["127.0.0.1/32".parse().unwrap()], ..Policy::default() };
    let mut hostile = start(open, dns, limits);
    hostile.announce().await;
    for i in 0..FLOWS {
        hostile.send(&segment(20_000 + i, port, None)).await;
    }
    // Complete every handshake the stack accepts; it resets the rest.
    let (mut established, mut reset) = (std::collections::HashSet::new(), 0);
    while established.len() + reset < FLOWS as usize {
        let (guest_port, syn_ack, rst) = hostile.expect("an answer to every SYN", reply).await;
        if let Some(seq) = syn_ack {
            if established.insert(guest_port) {
                hostile.send(&segment(guest_port, port, Some(seq))).await;
            }
        } else if rst {
            reset += 1;
        }
    }
    assert!(established.len() <= limits.tcp, "{} flows for a share of {limits:?}", established.len());
    assert!(hostile.refused.lock().unwrap().iter().any(|m| m.contains("rule limit")), "{:?}", hostile.refused);
    // The stack connects each flow to the server, which holds them open. (A real server is on
    // another host; this one shares our descriptors, so it stops when they run out.)
    let mut held = Vec::new();
    while held.len() < established.len() {
        match tokio::time::timeout(Duration::from_secs(10), server.accept()).await {
            Ok(Ok((conn, _))) => held.push(conn),
            Ok(Err(e)) => {
                eprintln!("the server took {} of {} flows, then: {e}", held.len(), established.len());
                break;
            }
            Err(_) => panic!("only {} of {} flows reached the server", held.len(), established.len()),
        }
    }

    // Another sandbox's DNS still reaches its upstream (a host socket per query).
    let mut other = start(Policy::default(), dns, limits);
    other.announce().await;
    let query = dns_query("pkgs.example.test.");
    let udp = UdpRepr { src_port: 40000, dst_port: 53 };
    let frame = ip_frame(DNS_IP, IpProtocol::Udp, udp.header_len() + query.len(), |p| {
        udp.emit(
            &mut UdpPacket::new_unchecked(p),
            &IpAddress::Ipv4(GUEST_IP),
            &IpAddress::Ipv4(DNS_IP),
            query.len(),
            |b| b.copy_from_slice(&query),
            &ChecksumCapabilities::default(),
        )
    });
    other.send(&frame).await;
    assert_eq!(other.expect("DNS answer for the other sandbox", dns_answer).await, [ANSWER]);

    // And the API can still take a connection.
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener for the API");
    let client = tokio::net::TcpStream::connect(api.local_addr().unwrap()).await.expect("an API client connects");
    api.accept().await.expect("the API accepts");
    drop((client, held));
}
