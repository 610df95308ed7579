//! One sandbox's network stack: smoltcp on the frames of QEMU's stream netdev.
//!
//! Every TCP SYN from the guest is checked before smoltcp sees it: a refused destination gets no
//! socket (smoltcp answers with a reset), an allowed one gets a socket listening on exactly that
//! address, and a task that connects to the real destination from the host and copies bytes.
//! UDP does not go through smoltcp: DNS queries go to moat's resolver, other datagrams are relayed
//! through host UDP sockets.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint,
    IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::dns::Dns;
use crate::policy::{HostAddrs, HostPattern, Pins, Policy, Rule, Verdict};
use crate::tls::{Ca, Secret};
use crate::{DNS_IP, GUEST_IP, HOST_IP};

mod device;
mod flow;
mod limits;
mod relay;
mod traffic;
mod udp;

use device::{Queues, MAX_FRAME};

pub use flow::GuestStream;
pub use limits::FlowLimits;
pub use traffic::{Traffic, RULES};

/// The stack's own MAC address (locally administered).
const STACK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// Socket buffers of a flow while the stack's budget for large ones lasts: toward the guest
/// (downloads) and from it. Large enough for several full-sized segments in flight each way.
const LARGE_TO_GUEST: usize = 512 * 1024;
const LARGE_FROM_GUEST: usize = 256 * 1024;
/// Bytes of large socket buffers one stack may hold at once; flows past it get small ones, so a
/// guest holding every connection it may costs the daemon at most this plus
/// `FlowLimits::tcp` × 2 × [`SMALL_BUFFER`].
const BUFFER_BUDGET: usize = 16 << 20;
const SMALL_BUFFER: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Refusal events at most this often per second; the rest are counted.
const EVENTS_PER_SEC: u32 = 20;

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
    /// Addresses of the host that no interface has (e.g. a public address behind NAT).
    pub host_addresses: Vec<Ipv4Addr>,
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
    /// Wakes the frame reader when a poll has emptied the queue it was waiting on.
    drained: Notify,
    cfg: StackConfig,
    pins: Mutex<Pins>,
    host_addrs: HostAddrs,
    udp: Mutex<HashMap<(u16, SocketAddrV4), UdpFlow>>,
    dns_slots: Arc<Semaphore>,
    events: Mutex<EventBudget>,
    traffic: Arc<Traffic>,
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
    /// Bytes of socket buffers held by sockets with large ones (see [`BUFFER_BUDGET`]).
    large_buffers: usize,
}

struct EventBudget {
    second: u64,
    used: u32,
    suppressed: u64,
}

impl Stack {
    /// Connect to the QEMU netdev socket at `socket` (QEMU listens) and run the stack.
    pub async fn connect(socket: &Path, cfg: StackConfig) -> io::Result<Stack> {
        Stack::over(UnixStream::connect(socket).await?, cfg)
    }

    /// Run the stack on a stream that carries QEMU's framing (a length, then a frame).
    pub fn over(stream: UnixStream, cfg: StackConfig) -> io::Result<Stack> {
        Stack::counted(stream, cfg, Arc::default())
    }

    /// [`Stack::over`], counting what it carries and refuses in `traffic`.
    pub fn counted(stream: UnixStream, cfg: StackConfig, traffic: Arc<Traffic>) -> io::Result<Stack> {
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
                large_buffers: 0,
            }),
            wake: Notify::new(),
            drained: Notify::new(),
            host_addrs: HostAddrs::with(cfg.host_addresses.iter().copied()),
            cfg,
            pins: Mutex::new(Pins::default()),
            udp: Mutex::new(HashMap::new()),
            dns_slots,
            events: Mutex::new(EventBudget { second: 0, used: 0, suppressed: 0 }),
            traffic: traffic.clone(),
        });
        set_send_buffer(&stream);
        let (reader, writer) = stream.into_split();
        let read_task = tokio::spawn(read_frames(inner.clone(), reader));
        let poll_task = tokio::spawn(poll_loop(inner.clone(), writer));
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
                let inner = inner.clone();
                tokio::spawn(async move {
                    // A refused or silent guest port closes the host connection: all a listener can say.
                    if let Ok(guest) = inner.connect_guest(guest_port).await {
                        let _ = conn.set_nodelay(true);
                        let _ = relay::relay(&guest, conn).await;
                    }
                });
            }
        })
    }

    /// One TCP connection from the gateway to `guest_port` on the guest, once the guest has
    /// accepted it; no host socket is involved. Waits at most 10 s for the guest's answer.
    pub async fn connect_guest(&self, guest_port: u16) -> Result<GuestStream, ConnectGuestError> {
        self.inner.connect_guest(guest_port).await
    }

    /// What this stack has carried and refused.
    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.inner.traffic
    }
}

/// Why a connection to a guest port was not made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectGuestError {
    /// The guest answered the SYN with a reset: nothing listens on the port.
    #[error("the guest refused the connection to port {0}")]
    Refused(u16),
    /// No answer within the connect timeout (a stuck or paused guest, or a firewall dropping it).
    #[error("the guest did not answer a connection to port {port} within {}s", .wait.as_secs())]
    NoAnswer { port: u16, wait: Duration },
    /// The sandbox's network holds as many connections as it may.
    #[error("the sandbox's network has {0} connections open, the most it may hold")]
    Limit(usize),
    /// smoltcp would not start the connection (port 0).
    #[error("port {0} cannot be connected to")]
    Unaddressable(u16),
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

/// Frames from QEMU: a 4-byte big-endian length, then the frame. Each is handed to the stack
/// as it comes, and the poll loop woken; a poll takes all that came meanwhile at once.
async fn read_frames(inner: Arc<Inner>, reader: tokio::net::unix::OwnedReadHalf) {
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
        if reader.read_exact(&mut frame).await.is_err() {
            return;
        }
        inner.traffic.sent_by_guest(len);
        // A full queue waits for the poll loop, which leaves the rest of the guest's frames in
        // QEMU (and QEMU stops taking them from the guest) instead of in the daemon's memory.
        loop {
            let drained = inner.drained.notified();
            if !inner.core.lock().unwrap_or_else(|e| e.into_inner()).dev.rx_full() {
                break;
            }
            inner.wake.notify_one();
            drained.await;
        }
        inner.input(frame);
        inner.wake.notify_one();
    }
}

async fn poll_loop(inner: Arc<Inner>, mut writer: tokio::net::unix::OwnedWriteHalf) {
    let mut out = Vec::new();
    loop {
        let (delay, bytes, held_back) = {
            let mut core = inner.core.lock().unwrap_or_else(|e| e.into_inner());
            let core = &mut *core;
            let now = SmolInstant::now();
            core.iface.poll(now, &mut core.dev, &mut core.sockets);
            core.reap();
            let (bytes, held_back) = core.dev.take_wire(&mut out);
            (core.iface.poll_delay(now, &core.sockets), bytes, held_back)
        };
        inner.drained.notify_one();
        // Every frame of this round in one write.
        if !out.is_empty() {
            inner.traffic.sent_to_guest(bytes);
            if writer.write_all(&out).await.is_err() {
                return;
            }
        }
        if held_back {
            continue; // smoltcp has more to send now that the round's bytes are out
        }
        let sleep = delay.map(|d| Duration::from_micros(d.total_micros())).unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// A larger send buffer on the NIC socket lets a round of large frames go out in one write
/// while QEMU is still delivering the last one; the kernel caps it at `net.core.wmem_max`.
fn set_send_buffer(stream: &UnixStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 1 << 20;
    // SAFETY: setsockopt reads `size` (an int, as SO_SNDBUF takes) for the duration of the call;
    // the descriptor is the stream's own and stays open.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("SO_SNDBUF on the NIC socket: {}", io::Error::last_os_error());
    }
}

impl Core {
    /// Drop sockets whose flow ended once smoltcp has finished closing them.
    fn reap(&mut self) {
        let mut removed = Vec::new();
        let sockets = &self.sockets;
        self.closing.retain(|h| {
            let state = sockets.get::<tcp::Socket>(*h).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                removed.push(*h);
                false
            } else {
                true
            }
        });
        if !removed.is_empty() {
            for h in &removed {
                self.remove_socket(*h);
            }
            self.flows.retain(|_, h| !removed.contains(h));
        }
    }

    /// A socket with large buffers while the stack's budget for them lasts, small ones after.
    fn new_socket(&mut self) -> SocketHandle {
        let (to_guest, from_guest) = if self.large_buffers + LARGE_TO_GUEST + LARGE_FROM_GUEST <= BUFFER_BUDGET {
            self.large_buffers += LARGE_TO_GUEST + LARGE_FROM_GUEST;
            (LARGE_TO_GUEST, LARGE_FROM_GUEST)
        } else {
            (SMALL_BUFFER, SMALL_BUFFER)
        };
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; from_guest]), tcp::SocketBuffer::new(vec![0; to_guest]));
        // A peer that vanishes mid-connection must not hold a socket forever.
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        socket.set_nagle_enabled(false);
        self.sockets.add(socket)
    }

    /// Remove a socket, giving its large buffers back to the budget.
    fn remove_socket(&mut self, handle: SocketHandle) {
        let s = self.sockets.remove(handle);
        if let smoltcp::socket::Socket::Tcp(s) = s {
            if s.send_capacity() == LARGE_TO_GUEST && s.recv_capacity() == LARGE_FROM_GUEST {
                self.large_buffers -= LARGE_TO_GUEST + LARGE_FROM_GUEST;
            }
        }
    }
}

impl Inner {
    fn refused(&self, message: String) {
        // Counted before the event budget: the counts stay exact when the events do not.
        self.traffic.refused(&message);
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
        // The reader waited for room: the queue holds at most one frame past its limit.
        self.core.lock().unwrap_or_else(|e| e.into_inner()).dev.push_rx(frame);
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
            core.remove_socket(handle);
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

    /// A connection from the gateway to `port` on the guest (a port forward, or a client of the
    /// daemon), once the guest has accepted it, within [`CONNECT_TIMEOUT`].
    async fn connect_guest(self: &Arc<Self>, port: u16) -> Result<GuestStream, ConnectGuestError> {
        let handle = {
            let mut guard = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let core = &mut *guard;
            if core.sockets.iter().count() >= self.cfg.limits.tcp {
                return Err(ConnectGuestError::Limit(self.cfg.limits.tcp));
            }
            let local_port = core.next_port;
            core.next_port = if local_port == u16::MAX { 49152 } else { local_port + 1 };
            let handle = core.new_socket();
            let remote = IpEndpoint::new(IpAddress::Ipv4(GUEST_IP), port);
            let local = IpListenEndpoint { addr: Some(IpAddress::Ipv4(HOST_IP)), port: local_port };
            if core.sockets.get_mut::<tcp::Socket>(handle).connect(core.iface.context(), remote, local).is_err() {
                core.remove_socket(handle);
                return Err(ConnectGuestError::Unaddressable(port));
            }
            handle
        };
        self.wake.notify_one();
        // From here on, dropping the stream closes the socket (and the poll loop removes it).
        let guest = GuestStream { inner: self.clone(), handle };
        match tokio::time::timeout(CONNECT_TIMEOUT, guest.established()).await {
            Ok(true) => Ok(guest),
            Ok(false) => Err(ConnectGuestError::Refused(port)),
            Err(_) => Err(ConnectGuestError::NoAnswer { port, wait: CONNECT_TIMEOUT }),
        }
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
