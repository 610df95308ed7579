#[allow(clippy::print_stderr, clippy::exit)] // started by hand: say so and stop
fn main() {
    if std::process::id() != 1 {
        eprintln!("moat-agent: this is the guest init of a moat VM (PID 1); it is not meant to be started by hand");
        std::process::exit(2);
    }
    without_rep_movsb();
    moat_agent::run_pid1()
}

/// glibc's tunables, read once at startup. They keep memcpy and memset off `rep movsb` and `rep
/// stosb`: under TCG those are emulated one byte per iteration (about 100 MB/s), and every byte
/// a copy moves through the agent passes through several memcpys, so they set the speed of
/// `moat cp` and of exec output; the vector loops glibc uses instead run at over 1 GB/s. And
/// malloc keeps up to 64 MiB it freed (and serves blocks up to 4 MiB from its heap) instead of
/// handing pages back to the kernel, which would zero them again, byte by byte, for each of the
/// next chunks. Only the agent changes: exec gives processes an environment of their own.
const TUNABLES: &str = "glibc.cpu.x86_rep_movsb_threshold=4294967295:glibc.cpu.x86_rep_stosb_threshold=4294967295:\
                        glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=4194304";

/// Execute the agent again (still PID 1, nothing set up yet) with [`TUNABLES`] in its
/// environment, which glibc reads only when a program starts. Best effort: if that fails the
/// agent runs on as it is, only slower.
#[allow(clippy::print_stderr)] // PID 1 before init: the console is the only place to say it
fn without_rep_movsb() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    let mut args = std::env::args_os();
    let Some(program) = args.next() else { return };
    let e = std::process::Command::new(program).args(args).env("GLIBC_TUNABLES", TUNABLES).exec();
    eprintln!("moat-agent: starting again with faster memory copies failed: {e}; going on without");
}
