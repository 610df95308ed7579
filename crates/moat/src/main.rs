use clap::Parser;
use moat::cli::Cli;

fn main() {
    // The daemon starts every QEMU through `moat __jail …`: a small single-threaded helper that
    // builds the jail and never reaches the CLI.
    let mut raw = std::env::args_os();
    if raw.nth(1).is_some_and(|a| a == moat_vmm::JAIL_ARG) {
        moat_vmm::jail_main(raw.collect());
    }
    // Before clap reads the environment, and before any thread starts.
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = moat::config::load(&args) {
        eprintln!("moat: error: {}", moat::error::render_error(&e));
        std::process::exit(2);
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into());
    // `moat serve --log-file` writes its log itself, under a size cap; everything else to stderr.
    match moat::cmd::daemon::log_file::of_command(&cli.command) {
        Ok(Some(log)) => tracing_subscriber::fmt().with_env_filter(filter).with_writer(log).with_ansi(false).init(),
        Ok(None) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Err(e) => {
            eprintln!("moat: error: cannot open the --log-file: {e}");
            std::process::exit(2);
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts on any Linux host");
    let code = match runtime.block_on(moat::main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat: error: {}", moat::error::render(&e));
            125
        }
    };
    // Exit without waiting for the blocking stdin reader, which may never return.
    std::process::exit(code);
}
