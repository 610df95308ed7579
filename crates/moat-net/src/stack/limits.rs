//! How many host sockets a stack may hold: its share of the daemon's descriptors.

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
