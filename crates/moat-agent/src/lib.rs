//! moat-agent: PID 1 inside every moat sandbox.
//!
//! It prepares the guest ([`init`], [`modules`]), reaps every zombie ([`reaper`]) and serves the
//! agent link ([`link`], [`exec`]) on a virtio-serial port ([`port`]), surviving host
//! disconnects. [`link::Agent::serve`] works on any byte stream, so the protocol is tested on the
//! host over a socket pair; only [`run_pid1`] touches the machine.
// PID 1 has no log but the console: what the agent has to say goes to stderr there.
#![allow(clippy::print_stderr)]

pub mod channel;
pub mod clock;
pub mod cmdline;
pub mod entropy;
pub mod exec;
pub mod files;
pub mod hostfs;
pub mod init;
pub mod jobs;
pub mod link;
pub mod modules;
pub mod netif;
pub mod port;
pub mod power;
pub mod reaper;
pub mod users;
pub mod volumes;
pub mod watch;

use std::time::Duration;

pub use link::{Agent, LinkEnd, Mode};
pub use reaper::{Reaper, Scope};

/// How long to wait for the agent port after the modules are loaded.
const PORT_WAIT: Duration = Duration::from_secs(30);

/// Default name of the agent's virtio-serial port.
pub const DEFAULT_PORT: &str = "moat.agent";

/// Run as PID 1: boot the guest, then serve hosts forever. Never returns; fatal errors are
/// reported on the console and end the VM.
pub fn run_pid1() -> ! {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("moat-agent: fatal: the agent panicked: {info}");
        power::reboot();
    }));
    let booted = init::boot().unwrap_or_else(|e| power::fatal(&e));
    let port_name = booted.cmdline.get("moat.port").unwrap_or(DEFAULT_PORT).to_string();
    let path = port::find(&port_name, PORT_WAIT).unwrap_or_else(|e| {
        for m in &booted.module_errors {
            eprintln!("moat-agent: earlier: {m}");
        }
        power::fatal(&e)
    });
    let port = port::Port::open(&path).unwrap_or_else(|e| power::fatal(&e));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| power::fatal(&format_args!("starting the async runtime failed: {e}")));
    runtime.block_on(async move {
        let reaper = Reaper::start(Scope::All)
            .unwrap_or_else(|e| power::fatal(&format_args!("installing the SIGCHLD handler failed: {e}")));
        let agent = Agent::new(reaper, Mode::Pid1);
        eprintln!("moat-agent: serving {} on {}", port_name, path.display());
        loop {
            port.wait_for_host().await;
            let conn = match port.connection() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("moat-agent: registering the port failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match agent.serve(conn).await {
                LinkEnd::HostGone => {}
                end => eprintln!("moat-agent: link reset: {end}"),
            }
        }
    })
}
