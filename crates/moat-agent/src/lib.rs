//! moat-agent: PID 1 inside every moat sandbox.
//!
//! It prepares the guest (`init`), reaps every zombie (`reaper`) and serves the agent link
//! (`link`, `exec`) on a virtio-serial port (`port`), surviving host disconnects.

pub mod cmdline;
pub mod exec;
pub mod init;
pub mod link;
pub mod port;
pub mod reaper;
pub mod users;

use std::time::Duration;

/// Run as PID 1: boot the guest, then serve hosts forever. Never returns.
pub fn run_pid1() -> ! {
    let cmdline = match init::boot() {
        Ok(c) => c,
        Err(e) => fatal(&e.to_string()),
    };
    let port_name = cmdline.get("moat.port").unwrap_or("moat.agent").to_string();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => fatal(&format!("starting the runtime: {e}")),
    };
    runtime.block_on(async move {
        let path = match port::find(&port_name, Duration::from_secs(30)) {
            Ok(p) => p,
            Err(e) => fatal(&e),
        };
        let port = match port::Port::open(&path) {
            Ok(p) => p,
            Err(e) => fatal(&format!("opening {}: {e}", path.display())),
        };
        reaper::Reaper::get();
        loop {
            port.wait_for_host().await;
            let end = link::serve(port.clone(), port.clone(), link::Mode::Pid1).await;
            match end {
                moat_proto::FrameError::Closed => {}
                other => eprintln!("moat-agent: link reset: {other}"),
            }
        }
    })
}

fn fatal(message: &str) -> ! {
    eprintln!("moat-agent: fatal: {message}; powering off");
    init::power_off()
}
