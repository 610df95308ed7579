fn main() {
    if std::process::id() != 1 {
        eprintln!("moat-agent runs as PID 1 inside a moat VM; it is not meant to be started by hand");
        std::process::exit(2);
    }
    moat_agent::run_pid1()
}
