//! Network interfaces: `lo`, and `eth0` when the sandbox has a NIC. The addresses are the same in
//! every sandbox ([`moat_proto::net`]); the host's network stack does the rest.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use moat_proto::net::{DNS_IP, GUEST_IP, HOST_IP, MTU, PREFIX_LEN};

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the fd is owned by the OwnedFd from here on.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    req
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(addr) }
}

fn ioctl(fd: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a request number with the struct it reads or writes.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn up(fd: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name);
    ioctl(fd, libc::SIOCGIFFLAGS, (&mut req as *mut libc::ifreq).cast())?;
    // SAFETY: SIOCGIFFLAGS filled ifru_flags.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(fd, libc::SIOCSIFFLAGS, (&mut req as *mut libc::ifreq).cast())
}

fn set_addr(fd: &OwnedFd, name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr(ip);
    ioctl(fd, libc::SIOCSIFADDR, (&mut req as *mut libc::ifreq).cast())?;
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(fd, libc::SIOCSIFNETMASK, (&mut req as *mut libc::ifreq).cast())
}

/// The link's MTU: moat's stack takes frames of up to [`MTU`], and an emulated guest pays for
/// every packet it takes in (driver, stack, wakeups), so large packets are most of the link's
/// speed. A kernel that refuses keeps 1500, which still works: each side's SYN says what it takes.
fn set_mtu(fd: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_mtu = libc::c_int::try_from(MTU).unwrap_or(1500);
    ioctl(fd, libc::SIOCSIFMTU, (&mut req as *mut libc::ifreq).cast())
}

/// Bring up `lo`. The kernel adds 127.0.0.1/8 itself when loopback goes up; set it only if not.
pub fn loopback_up() -> io::Result<()> {
    let fd = socket()?;
    up(&fd, "lo")?;
    let mut req = ifreq("lo");
    if ioctl(&fd, libc::SIOCGIFADDR, (&mut req as *mut libc::ifreq).cast()).is_ok() {
        return Ok(());
    }
    set_addr(&fd, "lo", Ipv4Addr::LOCALHOST, 8)
}

/// Whether the sandbox has a NIC.
pub fn has_nic() -> bool {
    std::path::Path::new("/sys/class/net/eth0").exists()
}

/// Address `eth0`, route everything through the host's stack, and point the resolver at it.
pub fn eth0_up() -> io::Result<()> {
    let fd = socket()?;
    set_addr(&fd, "eth0", GUEST_IP, PREFIX_LEN)?;
    if let Err(e) = set_mtu(&fd, "eth0") {
        eprintln!("moat-agent: eth0 keeps its MTU, {MTU} refused: {e}");
    }
    up(&fd, "eth0")?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(HOST_IP);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match ioctl(&fd, libc::SIOCADDRT, (&mut route as *mut libc::rtentry).cast()) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
        _ => {}
    }
    write_resolv_conf()
}

/// `/etc/resolv.conf` names moat's resolver. A symlink (systemd-resolved's stub) is replaced by a
/// file; an image without `/etc` is left alone.
fn write_resolv_conf() -> io::Result<()> {
    let path = std::path::Path::new("/etc/resolv.conf");
    if !std::path::Path::new("/etc").is_dir() {
        return Ok(());
    }
    if path.is_symlink() {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, format!("# written by moat: the sandbox's resolver\nnameserver {DNS_IP}\n"))
}
