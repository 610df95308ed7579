//! One sandbox's network stack: smoltcp on the frames of QEMU's stream netdev.
//!
//! Every TCP SYN from the guest is checked before smoltcp sees it: a refused destination gets no
//! socket (smoltcp answers with a reset), an allowed one gets a socket listening on exactly that
//! address, and a task that connects to the real destination from the host and copies bytes.
//! UDP does not go through smoltcp: DNS queries go to moat's resolver, other datagrams are relayed
//! through host UDP sockets.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpEndpoint,
    IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::dns::Dns;
use crate::policy::{HostAddrs, HostPattern, Pins, Policy, Rule, Verdict};
use crate::sniff::{sniff, Sniffed, MAX_SNIFF};
use crate::tls::{self, Ca, Secret};
use crate::{DNS_IP, GUEST_IP, HOST_IP, MTU};

/// The stack's own MAC address (locally administered).
const STACK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// Largest frame accepted from QEMU: a 1500-byte MTU frame, with room for VLAN tags.
const MAX_FRAME: usize = MTU + 32;
const TCP_BUFFER: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long to wait for the guest's first bytes when its name must be read from them.
const SNIFF_FIRST_BYTES: Duration = Duration::from_secs(2);
const SNIFF_TOTAL: Duration = Duration::from_secs(10);
/// Refusal events at most this often per second; the rest are counted.
const EVENTS_PER_SEC: u32 = 20;

/// How many host sockets one stack may hold at once; past these, new flows are refused.
///
/// Every TCP flow (guest-initiated or forwarded) and every UDP flow holds a host socket, and each
/// DNS query in flight may hold one. They all come out of the daemon's one descriptor limit, which
/// the API, QEMU's sockets and every other sandbox need too, so a stack gets a share of it
/// ([`FlowLimits::share_of`]) instead of whatever its guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    pub tcp: usize,
    pub udp: usize,
    pub dns: usize,
}

impl Default for FlowLimits {
    /// The most any stack gets, however many descriptors there are.
    fn default() -> FlowLimits {
        FlowLimits { tcp: 512, udp: 256, dns: 64 }
    }
}

impl FlowLimits {
    /// Descriptors the daemon keeps for itself whatever its sandboxes do: API connections, the
    /// state database, image builds and snapshots.
    pub const RESERVED: u64 = 256;
    /// Descriptors each sandbox needs besides its flows: its QEMU's NIC and agent sockets, its
    /// pidfd, its port-forward listeners.
    pub const PER_SANDBOX: u64 = 8;
    /// The least a stack gets even when the limit is too low to share (the daemon warns then).
    pub const FLOOR: FlowLimits = FlowLimits { tcp: 8, udp: 4, dns: 2 };

    /// One stack's share of `nofile` descriptors when up to `stacks` stacks run at once: what the
    /// daemon does not reserve, split evenly, and within a stack split between TCP, UDP and DNS
    /// as the default is (5:2:1); never more than the default, never less than a floor.
    pub fn share_of(nofile: u64, stacks: usize) -> FlowLimits {
        let stacks = stacks.max(1) as u64;
        let free = nofile.saturating_sub(Self::RESERVED + Self::PER_SANDBOX * stacks);
        let share = usize::try_from(free / stacks).unwrap_or(usize::MAX);
        let (max, floor) = (FlowLimits::default(), Self::FLOOR);
        FlowLimits {
            tcp: (share / 8 * 5).clamp(floor.tcp, max.tcp),
            udp: (share / 8 * 2).clamp(floor.udp, max.udp),
            dns: (share / 8).clamp(floor.dns, max.dns),
        }
    }

    /// The share of this process's descriptor limit (the soft `RLIMIT_NOFILE`).
    pub fn for_process(stacks: usize) -> FlowLimits {
        FlowLimits::share_of(nofile_limit(), stacks)
    }
}

/// The soft limit on open descriptors of this process.
fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024; // the usual default; getrlimit cannot fail for RLIMIT_NOFILE on Linux
    }
    lim.rlim_cur
}

/// What a stack needs from the daemon.
pub struct StackConfig {
    pub policy: Arc<RwLock<Policy>>,
    pub dns: Arc<Dns>,
    /// Called with a message for every refused flow or DNS query (rate-limited).
    pub on_refused: Arc<dyn Fn(String) + Send + Sync>,
    /// The sandbox's CA and secrets, when it has secrets.
    pub secrets: Option<Secrets>,
    /// Host sockets the guest may hold.
    pub limits: FlowLimits,
}

pub struct Secrets {
    pub ca: Arc<Ca>,
    /// Each secret with the hostnames it is bound to.
    pub bound: Vec<(Vec<HostPattern>, Secret)>,
}

impl Secrets {
    /// The secrets bound to `host`: HTTPS to it is intercepted when there are any.
    fn for_host(&self, host: &str) -> Vec<Secret> {
        self.bound.iter().filter(|(hosts, _)| hosts.iter().any(|h| h.matches(host))).map(|(_, s)| s.clone()).collect()
    }
}

/// A running stack; dropping it ends the stack, its flows and its port forwards.
pub struct Stack {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    core: Mutex<Core>,
    /// Wakes the poll loop: a flow read or wrote, or a frame is queued.
    wake: Notify,
    cfg: StackConfig,
    pins: Mutex<Pins>,
    host_addrs: HostAddrs,
    udp: Mutex<HashMap<(u16, SocketAddrV4), UdpFlow>>,
    dns_slots: Arc<Semaphore>,
    events: Mutex<EventBudget>,
}

struct UdpFlow {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
}

struct Core {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queues,
    /// Guest-initiated TCP flows by (guest endpoint, destination).
    flows: HashMap<(SocketAddrV4, SocketAddrV4), SocketHandle>,
    /// Sockets whose task ended; removed once smoltcp is done with them.
    closing: Vec<SocketHandle>,
    guest_mac: Option<EthernetAddress>,
    next_port: u16,
}

struct EventBudget {
    second: u64,
    used: u32,
    suppressed: u64,
}

/// Frames between QEMU and smoltcp.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        caps
    }
}

impl Stack {
    /// Connect to the QEMU netdev socket at `socket` (QEMU listens) and run the stack.
    pub async fn connect(socket: &Path, cfg: StackConfig) -> io::Result<Stack> {
        Stack::over(UnixStream::connect(socket).await?, cfg)
    }

    /// Run the stack on a stream that carries QEMU's framing (a length, then a frame).
    pub fn over(stream: UnixStream, cfg: StackConfig) -> io::Result<Stack> {
        let mut dev = Queues::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(STACK_MAC)));
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut dev, SmolInstant::now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(HOST_IP), 24));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(DNS_IP), 24));
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(HOST_IP)
            .map_err(|_| io::Error::other("smoltcp route table is full"))?;
        // Accept packets for any destination: each flow's socket listens on the address the guest
        // asked for, so the guest sees the real server's address.
        iface.set_any_ip(true);
        let dns_slots = Arc::new(Semaphore::new(cfg.limits.dns));
        let inner = Arc::new(Inner {
            core: Mutex::new(Core {
                iface,
                sockets: SocketSet::new(Vec::new()),
                dev,
                flows: HashMap::new(),
                closing: Vec::new(),
                guest_mac: None,
                next_port: 49152,
            }),
            wake: Notify::new(),
            cfg,
            pins: Mutex::new(Pins::default()),
            host_addrs: HostAddrs::new(),
            udp: Mutex::new(HashMap::new()),
            dns_slots,
            events: Mutex::new(EventBudget { second: 0, used: 0, suppressed: 0 }),
        });
        let (reader, writer) = stream.into_split();
        let (frames_tx, frames_rx) = mpsc::channel(256);
        let read_task = tokio::spawn(read_frames(reader, frames_tx));
        let poll_task = tokio::spawn(poll_loop(inner.clone(), frames_rx, writer));
        Ok(Stack { inner, tasks: vec![read_task, poll_task] })
    }

    /// Forward connections accepted on `listener` to `guest_port` on the guest; ends with the
    /// returned task (abort it to stop forwarding).
    pub fn forward(&self, listener: TcpListener, guest_port: u16) -> JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Some(handle) = inner.connect_to_guest(guest_port) else {
                    drop(conn);
                    continue;
                };
                let mut guest = GuestStream { inner: inner.clone(), handle };
                tokio::spawn(async move {
                    if guest.established().await {
                        let mut conn = conn;
                        let _ = tokio::io::copy_bidirectional(&mut guest, &mut conn).await;
                    }
                });
            }
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, flow) in self.inner.udp.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            flow.task.abort();
        }
        // Flow tasks hold the inner state; aborting every socket ends them.
        let mut core = self.inner.core.lock().unwrap_or_else(|e| e.into_inner());
        for (_, socket) in core.sockets.iter_mut() {
            if let smoltcp::socket::Socket::Tcp(s) = socket {
                s.abort();
            }
        }
    }
}

/// Frames from QEMU: a 4-byte big-endian length, then the frame.
async fn read_frames(reader: tokio::net::unix::OwnedReadHalf, frames: mpsc::Sender<Vec<u8>>) {
    // Buffered: a length and a frame would otherwise be two reads per frame.
    let mut reader = tokio::io::BufReader::with_capacity(256 * 1024, reader);
    loop {
        let mut len = [0u8; 4];
        if reader.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            // A frame this size means the stream is out of step or the guest misbehaves; there is
            // no way to find the next frame boundary again.
            tracing::warn!("the guest NIC sent a {len}-byte frame; closing its network");
            return;
        }
        let mut frame = vec![0; len];
        if reader.read_exact(&mut frame).await.is_err() || frames.send(frame).await.is_err() {
            return;
        }
    }
}

async fn poll_loop(
    inner: Arc<Inner>,
    mut frames: mpsc::Receiver<Vec<u8>>,
    mut writer: tokio::net::unix::OwnedWriteHalf,
) {
    let mut out = Vec::new();
    loop {
        let delay = {
            let mut core = inner.core.lock().unwrap_or_else(|e| e.into_inner());
            let core = &mut *core;
            let now = SmolInstant::now();
            core.iface.poll(now, &mut core.dev, &mut core.sockets);
            core.reap();
            out.extend(core.dev.tx.drain(..));
            core.iface.poll_delay(now, &core.sockets)
        };
        // Every frame of this round in one write.
        let mut buf = Vec::new();
        for frame in out.drain(..) {
            buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            buf.extend_from_slice(&frame);
        }
        if !buf.is_empty() && writer.write_all(&buf).await.is_err() {
            return;
        }
        let sleep = delay.map(|d| Duration::from_micros(d.total_micros())).unwrap_or(Duration::from_secs(1));
        tokio::select! {
            frame = frames.recv() => {
                let Some(frame) = frame else { return };
                inner.input(frame);
                // Take whatever else is queued before polling again.
                while let Ok(frame) = frames.try_recv() {
                    inner.input(frame);
                }
            }
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

impl Core {
    /// Drop sockets whose flow ended once smoltcp has finished closing them.
    fn reap(&mut self) {
        let mut removed = Vec::new();
        let sockets = &mut self.sockets;
        self.closing.retain(|h| {
            let state = sockets.get::<tcp::Socket>(*h).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                sockets.remove(*h);
                removed.push(*h);
                false
            } else {
                true
            }
        });
        if !removed.is_empty() {
            self.flows.retain(|_, h| !removed.contains(h));
        }
    }

    fn new_socket(&mut self) -> SocketHandle {
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; TCP_BUFFER]), tcp::SocketBuffer::new(vec![0; TCP_BUFFER]));
        // A peer that vanishes mid-connection must not hold a socket forever.
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        socket.set_nagle_enabled(false);
        self.sockets.add(socket)
    }
}

impl Inner {
    fn refused(&self, message: String) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut budget = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if budget.second != now {
            budget.second = now;
            budget.used = 0;
        }
        if budget.used >= EVENTS_PER_SEC {
            budget.suppressed += 1;
            return;
        }
        budget.used += 1;
        let message = match std::mem::take(&mut budget.suppressed) {
            0 => message,
            n => format!("{message} ({n} more refusals not logged)"),
        };
        drop(budget);
        tracing::info!("{message}");
        (self.cfg.on_refused)(message);
    }

    fn policy(&self) -> std::sync::RwLockReadGuard<'_, Policy> {
        self.cfg.policy.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A frame from the guest: TCP SYNs are checked, UDP is handled here, the rest goes to
    /// smoltcp (ARP, TCP segments of known flows, ICMP to the gateway).
    fn input(self: &Arc<Self>, frame: Vec<u8>) {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else { return };
        let src_mac = eth.src_addr();
        match eth.ethertype() {
            EthernetProtocol::Arp => {}
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return };
                if ip.more_frags() || ip.frag_offset() != 0 {
                    return; // moat's guests never need IP fragments
                }
                let (src, dst) = (ip.src_addr(), ip.dst_addr());
                match ip.next_header() {
                    IpProtocol::Udp => {
                        let Ok(udp) = UdpPacket::new_checked(ip.payload()) else { return };
                        if src_mac.is_unicast() {
                            self.core.lock().unwrap_or_else(|e| e.into_inner()).guest_mac = Some(src_mac);
                        }
                        let from = SocketAddrV4::new(src, udp.src_port());
                        let to = SocketAddrV4::new(dst, udp.dst_port());
                        self.udp_input(from, to, udp.payload().to_vec());
                        return;
                    }
                    IpProtocol::Tcp => {
                        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else { return };
                        if tcp.syn() && !tcp.ack() {
                            self.tcp_syn(src, dst, &tcp);
                        }
                    }
                    IpProtocol::Icmp => {
                        if dst != HOST_IP && dst != DNS_IP {
                            return; // no ICMP beyond the gateway: pings elsewhere go unanswered
                        }
                    }
                    _ => return,
                }
            }
            _ => return,
        }
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        if core.dev.rx.len() < 1024 {
            core.dev.rx.push_back(frame);
        }
    }

    /// A new connection from the guest: decide, and if allowed, make a socket for it and start its
    /// task. Without a socket, smoltcp answers the SYN with a reset.
    fn tcp_syn(self: &Arc<Self>, src: Ipv4Addr, dst: Ipv4Addr, tcp: &TcpPacket<&[u8]>) {
        let from = SocketAddrV4::new(src, tcp.src_port());
        let to = SocketAddrV4::new(dst, tcp.dst_port());
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        if core.flows.contains_key(&(from, to)) || dst == DNS_IP || src != GUEST_IP {
            return; // a retransmitted SYN, or nothing to connect to
        }
        let real = real_destination(dst);
        let verdict = if core.sockets.iter().count() >= self.cfg.limits.tcp {
            Verdict::Refuse(Rule::Limit)
        } else {
            let names = self.pins.lock().unwrap_or_else(|e| e.into_inner()).names(dst);
            self.policy().check(real, &self.host_addrs, names)
        };
        if let Verdict::Refuse(rule) = verdict {
            drop(core);
            self.refused(format!("tcp {to} refused: {} (rule {})", rule.describe(), rule.as_str()));
            return;
        }
        let handle = core.new_socket();
        let listen = IpListenEndpoint { addr: Some(IpAddress::Ipv4(dst)), port: to.port() };
        if core.sockets.get_mut::<tcp::Socket>(handle).listen(listen).is_err() {
            core.sockets.remove(handle);
            return;
        }
        core.flows.insert((from, to), handle);
        drop(core);
        let guest = GuestStream { inner: self.clone(), handle };
        let inner = self.clone();
        tokio::spawn(async move {
            // A SYN answered by a reset puts a listening socket back to listening: give up then.
            if tokio::time::timeout(CONNECT_TIMEOUT, guest.established()).await != Ok(true) {
                return;
            }
            if let Err(e) = inner.tcp_flow(guest, to, real, verdict).await {
                tracing::debug!("flow to {to}: {e}");
            }
        });
    }

    async fn tcp_flow(
        &self,
        mut guest: GuestStream,
        to: SocketAddrV4,
        real: Ipv4Addr,
        verdict: Verdict,
    ) -> io::Result<()> {
        // Secrets apply to names the guest resolved through moat's DNS; only connections to such
        // an address wait for the client's first bytes when no allowlist asks for the name.
        let for_secrets = self.cfg.secrets.as_ref().is_some_and(|secrets| {
            let names = self.pins.lock().unwrap_or_else(|e| e.into_inner()).names(*to.ip());
            names.iter().any(|n| !secrets.for_host(n).is_empty())
        });
        let must_name = matches!(verdict, Verdict::ByName(_));
        let mut first = Vec::new();
        let mut sniffed = Sniffed::Other;
        if for_secrets || must_name {
            sniffed = read_name(&mut guest, &mut first).await?;
        }
        let name = match &sniffed {
            Sniffed::Tls(Some(n)) | Sniffed::Http(Some(n)) => Some(n.clone()),
            _ => None,
        };
        if must_name {
            if let Some(name) = &name {
                let (listed, by_cidr) = {
                    let policy = self.policy();
                    (policy.name_allowed(name), policy.cidr_allowed(real))
                };
                let resolved = self.pins.lock().unwrap_or_else(|e| e.into_inner()).resolved(name, *to.ip());
                if !listed || !(resolved || by_cidr) {
                    let why = if listed {
                        format!("{name} was not resolved to this address through moat's DNS")
                    } else {
                        Rule::Allowlist.describe().to_string()
                    };
                    self.refused(format!("tcp {to} ({name}) refused: {why} (rule {})", Rule::Allowlist.as_str()));
                    guest.abort();
                    return Ok(());
                }
            }
        }
        let intercept = match (&sniffed, &self.cfg.secrets) {
            (Sniffed::Tls(Some(host)), Some(secrets)) => {
                Some((host.clone(), secrets.for_host(host), secrets)).filter(|(_, values, _)| !values.is_empty())
            }
            _ => None,
        };
        let upstream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(SocketAddrV4::new(real, to.port()))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    guest.abort();
                    return Err(e);
                }
                Err(_) => {
                    guest.abort();
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
                }
            };
        let _ = upstream.set_nodelay(true);
        match intercept {
            Some((host, values, secrets)) => {
                let guest = Replay { first: first.into(), inner: guest };
                tls::intercept(guest, &host, upstream, &secrets.ca, tls::upstream_roots(), &values)
                    .await
                    .map_err(io::Error::other)?;
            }
            None => {
                let mut upstream = upstream;
                upstream.write_all(&first).await?;
                tokio::io::copy_bidirectional(&mut guest, &mut upstream).await?;
            }
        }
        Ok(())
    }

    /// A socket connecting from the gateway to `port` on the guest (a port forward).
    fn connect_to_guest(&self, port: u16) -> Option<SocketHandle> {
        let handle = {
            let mut guard = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let core = &mut *guard;
            if core.sockets.iter().count() >= self.cfg.limits.tcp {
                return None;
            }
            let local_port = core.next_port;
            core.next_port = if local_port == u16::MAX { 49152 } else { local_port + 1 };
            let handle = core.new_socket();
            let remote = IpEndpoint::new(IpAddress::Ipv4(GUEST_IP), port);
            let local = IpListenEndpoint { addr: Some(IpAddress::Ipv4(HOST_IP)), port: local_port };
            if core.sockets.get_mut::<tcp::Socket>(handle).connect(core.iface.context(), remote, local).is_err() {
                core.sockets.remove(handle);
                return None;
            }
            handle
        };
        self.wake.notify_one();
        Some(handle)
    }

    fn udp_input(self: &Arc<Self>, from: SocketAddrV4, to: SocketAddrV4, payload: Vec<u8>) {
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
        if let Verdict::Refuse(rule) = verdict {
            drop(flows);
            self.refused(format!("udp {to} refused: {} (rule {})", rule.describe(), rule.as_str()));
            return;
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
        let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + udp.header_len() + payload.len()];
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let mut eth_frame = EthernetFrame::new_unchecked(&mut frame[..]);
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
        if core.dev.tx.len() < 1024 {
            core.dev.tx.push_back(frame);
        }
        drop(core);
        self.wake.notify_one();
    }
}

/// Where a guest's destination really is: the gateway stands for the host's loopback.
fn real_destination(dst: Ipv4Addr) -> Ipv4Addr {
    if dst == HOST_IP {
        Ipv4Addr::LOCALHOST
    } else {
        dst
    }
}

/// Read the guest's first bytes until they name a host (TLS SNI or HTTP Host) or clearly will not.
async fn read_name(guest: &mut GuestStream, buf: &mut Vec<u8>) -> io::Result<Sniffed> {
    let deadline = tokio::time::Instant::now() + SNIFF_TOTAL;
    let mut chunk = vec![0u8; 4096];
    loop {
        let wait = if buf.is_empty() { SNIFF_FIRST_BYTES } else { deadline - tokio::time::Instant::now() };
        let n = match tokio::time::timeout(wait, guest.read(&mut chunk)).await {
            Ok(r) => r?,
            // The client waits for the server to speak first (or is slow): no name to read.
            Err(_) => return Ok(Sniffed::Other),
        };
        if n == 0 {
            return Ok(Sniffed::Other);
        }
        buf.extend_from_slice(&chunk[..n]);
        match sniff(buf) {
            Sniffed::NeedMore if buf.len() < MAX_SNIFF => continue,
            Sniffed::NeedMore => return Ok(Sniffed::Other),
            found => return Ok(found),
        }
    }
}

/// One TCP socket of the stack as a tokio stream.
struct GuestStream {
    inner: Arc<Inner>,
    handle: SocketHandle,
}

impl GuestStream {
    fn with<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> R {
        let mut core = self.inner.core.lock().unwrap_or_else(|e| e.into_inner());
        f(core.sockets.get_mut::<tcp::Socket>(self.handle))
    }

    /// Wait until the handshake is done; false if the connection never got there.
    async fn established(&self) -> bool {
        std::future::poll_fn(|cx| {
            self.with(|s| match s.state() {
                tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent => {
                    s.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Established => Poll::Ready(true),
                _ => Poll::Ready(s.may_send() || s.can_recv()),
            })
        })
        .await
    }

    /// Reset the connection (the guest sees "connection refused" or "reset").
    fn abort(&self) {
        self.with(|s| s.abort());
        self.inner.wake.notify_one();
    }
}

impl Drop for GuestStream {
    /// The flow is done: close the socket and let the poll loop remove it once closed.
    fn drop(&mut self) {
        {
            let mut core = self.inner.core.lock().unwrap_or_else(|e| e.into_inner());
            core.sockets.get_mut::<tcp::Socket>(self.handle).close();
            core.closing.push(self.handle);
        }
        self.inner.wake.notify_one();
    }
}

impl AsyncRead for GuestStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let r = self.with(|s| {
            if s.can_recv() {
                match s.recv_slice(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        Poll::Ready(Ok(true))
                    }
                    Err(_) => Poll::Ready(Ok(false)),
                }
            } else if !s.may_recv() {
                match s.state() {
                    tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent => {
                        s.register_recv_waker(cx.waker());
                        Poll::Pending
                    }
                    _ => Poll::Ready(Ok(false)),
                }
            } else {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            }
        });
        match r {
            Poll::Ready(Ok(true)) => {
                // Reading opened the window: let the poll loop tell the guest.
                self.inner.wake.notify_one();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(false)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for GuestStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = self.with(|s| {
            if s.can_send() {
                Poll::Ready(s.send_slice(data).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)))
            } else if !s.may_send() {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)))
            } else {
                s.register_send_waker(cx.waker());
                Poll::Pending
            }
        });
        if matches!(r, Poll::Ready(Ok(_))) {
            self.inner.wake.notify_one();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.close());
        self.inner.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

/// A guest stream whose first bytes were already read (to find its name) and are read again.
struct Replay {
    first: VecDeque<u8>,
    inner: GuestStream,
}

impl AsyncRead for Replay {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = buf.remaining().min(self.first.len());
            let bytes: Vec<u8> = self.first.drain(..n).collect();
            buf.put_slice(&bytes);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::FlowLimits;

    #[test]
    fn every_stack_together_stays_within_the_descriptor_limit() {
        // A host with plenty of descriptors: every stack gets the most there is.
        assert_eq!(FlowLimits::share_of(1 << 20, 32), FlowLimits::default());
        for (nofile, stacks) in [(20_000, 32), (4096, 32), (65_536, 256), (2048, 4)] {
            let l = FlowLimits::share_of(nofile, stacks);
            let all = (l.tcp + l.udp + l.dns) as u64 * stacks as u64;
            let reserved = FlowLimits::RESERVED + FlowLimits::PER_SANDBOX * stacks as u64;
            assert!(all + reserved <= nofile, "{nofile} descriptors, {stacks} stacks: {l:?}");
            assert!(l.tcp < FlowLimits::default().tcp && l.tcp >= 8, "{l:?}");
        }
        // Too few to share: the floor, which the daemon warns about.
        assert_eq!(FlowLimits::share_of(256, 4), FlowLimits { tcp: 8, udp: 4, dns: 2 });
        assert_eq!(FlowLimits::share_of(0, 0), FlowLimits { tcp: 8, udp: 4, dns: 2 });
    }
}
