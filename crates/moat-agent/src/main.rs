#[allow(clippy::print_stderr, clippy::exit)] // started by hand: say so and stop
fn main() {
    if std::process::id() != 1 {
        eprintln!("moat-agent: this is the guest init of a moat VM (PID 1); it is not meant to be started by hand");
        std::process::exit(2);
    }
    moat_agent::run_pid1()
}
