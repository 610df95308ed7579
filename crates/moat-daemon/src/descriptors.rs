//! The daemon's file descriptors: every sandbox's network flows, QEMU sockets and API connections
//! come out of one per-process limit.

use moat_net::FlowLimits;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raise the soft descriptor limit to the hard one (the soft default, often 1024, is for programs
/// that never hold many sockets) and say what each sandbox's network gets of it.
pub(crate) fn raise_limit(max_sandboxes: usize) {
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit cannot be the soft one: the kernel caps descriptors at nr_open.
    let hard = limit.maximum.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20)
    });
    if limit.current.is_some_and(|soft| soft < hard) {
        if let Err(e) = setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: limit.maximum }) {
            tracing::warn!("could not raise the descriptor limit to {hard}: {e}");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(hard);
    let share = FlowLimits::for_process(max_sandboxes);
    if share == FlowLimits::FLOOR {
        tracing::warn!(
            descriptors = soft,
            max_sandboxes,
            hint = "raise it (`ulimit -n`, or LimitNOFILE= in the service) or lower --max-sandboxes",
            "the descriptor limit is too low to share between {max_sandboxes} sandboxes: a guest holding every flow it may can starve the others and the API"
        );
    } else if share.tcp < FlowLimits::default().tcp {
        tracing::info!(
            descriptors = soft,
            max_sandboxes,
            "each sandbox may hold {} TCP flows, {} UDP flows and {} DNS queries (a share of the descriptor limit; raise it with `ulimit -n` or LimitNOFILE= for more)",
            share.tcp,
            share.udp,
            share.dns
        );
    }
}
