//! The sandbox network. Each sandbox's NIC is a QEMU `-netdev stream` socket whose other end is a
//! userspace TCP/IP stack (smoltcp) in the daemon: it terminates the guest's flows and opens
//! allowed ones again from the host, so the egress policy holds whatever the guest does, and
//! needs no root. DNS is answered by moat's resolver, names are checked on TLS SNI and HTTP Host,
//! and HTTPS to hosts that secrets are bound to is intercepted to put the secrets in.

pub mod dns;
mod gate;
pub mod policy;
pub mod sniff;
mod stack;
pub mod tls;

pub use moat_proto::net::{DNS_IP, GUEST_IP, HOST_IP, HOST_NAME, MTU, PREFIX_LEN};
pub use policy::{HostPattern, Policy, Rule};
pub use stack::{ConnectGuestError, FlowLimits, GuestStream, Secrets, Stack, StackConfig, Traffic, RULES};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad configuration from a user: the message says what to write instead.
    #[error("{0}")]
    Invalid(String),
    #[error("network stack: {0}")]
    Io(#[from] std::io::Error),
}
