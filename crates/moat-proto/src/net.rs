//! The guest's side of the network, the same in every sandbox: each sandbox has its own network
//! stack on the host, so every guest can use the same addresses.

use std::net::Ipv4Addr;

/// The guest's address on `eth0`.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's default gateway; connections to it reach the host's 127.0.0.1 when the policy
/// allows loopback (`--allow-cidr 127.0.0.1/32`).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// moat's resolver, the guest's only nameserver.
pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const PREFIX_LEN: u8 = 24;
/// The name moat's resolver answers with [`HOST_IP`].
pub const HOST_NAME: &str = "host.moat.internal";
/// The MTU of the guest link. The link ends in moat's stack, never on a wire, so it is as large
/// as IPv4 allows: the emulated guest pays per packet, and large packets make few of them.
pub const MTU: usize = 65520;
