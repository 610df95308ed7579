//! `moat run` end to end: the real binary boots a real VM under QEMU for each test.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{moat, moat_in, moat_output, qemu_processes_mentioning, stop_daemon, text, wait_for};

#[test]
fn run_prints_output_and_exits_zero() {
    let out = moat_output(&["run", "--hostname", "t-echo", "--", "echo", "hello"]);
    assert_eq!(text(&out.stdout), "hello\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert!(qemu_processes_mentioning("moat.hostname=t-echo").is_empty(), "the VM is gone after the run");
}

#[test]
fn run_exits_with_the_commands_exit_code() {
    let out = moat_output(&["run", "--", "sh", "-c", "echo oops >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("oops"));
}

#[test]
fn run_sets_env_and_workdir() {
    let out = moat_output(&["run", "-e", "K=V", "-e", "EMPTY=", "-w", "/tmp", "--", "sh", "-c", "env; pwd"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(stdout.lines().any(|l| l == "K=V"), "env shows K=V: {stdout}");
    assert!(stdout.lines().any(|l| l == "EMPTY="), "env shows EMPTY=: {stdout}");
    assert_eq!(stdout.lines().last(), Some("/tmp"));
}

#[test]
fn run_forwards_stdin() {
    let mut child = moat()
        .args(["run", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat starts");
    child.stdin.take().expect("piped").write_all(b"hi\nthere\n").expect("stdin accepts");
    let out = child.wait_with_output().expect("moat finishes");
    assert_eq!(text(&out.stdout), "hi\nthere\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn run_reports_a_missing_program() {
    let out = moat_output(&["run", "--", "no-such-program", "x"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("no-such-program"), "the error names the program: {err}");
}

/// 64 MiB of output reaches the host complete and in order, while moat's own memory stays far
/// below the size of the output (flow control: it is streamed, never buffered whole).
#[test]
fn run_streams_large_output_without_buffering_it() {
    const TOTAL: usize = 64 << 20;
    let mut child = moat()
        .args(["run", "--", "sh", "-c", &format!("yes 0123456789abcdef | head -c {TOTAL}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat starts");
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0usize;
    let mut peak_rss_kib = 0u64;
    let line = b"0123456789abcdef\n";
    loop {
        let n = stdout.read(&mut buf).expect("stdout readable");
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, line[(total + i) % line.len()], "byte {} is intact", total + i);
        }
        total += n;
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(rss) = status.lines().find_map(|l| l.strip_prefix("VmRSS:")) {
                let kib: u64 = rss.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                peak_rss_kib = peak_rss_kib.max(kib);
            }
        }
    }
    let status = child.wait().expect("moat finishes");
    assert_eq!(total, TOTAL);
    assert_eq!(status.code(), Some(0));
    assert!(peak_rss_kib > 0, "RSS was sampled");
    assert!(peak_rss_kib < 48 * 1024, "moat's RSS peaked at {peak_rss_kib} KiB while streaming 64 MiB");
}

/// Ctrl-C (SIGINT to moat) stops the command in the guest, moat exits 130, and the VM is gone.
#[test]
fn ctrl_c_kills_the_command_and_cleans_up() {
    let mut child = moat()
        .args(["run", "--hostname", "t-ctrlc", "--", "sh", "-c", "echo started; exec sleep 1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat starts");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first).expect("stdout readable");
    assert_eq!(first, "started\n");
    // SAFETY: kill with a valid pid of our own child and a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("child state readable") {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "moat exits after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "128 + SIGINT");
    wait_for("the VM to be gone", Duration::from_secs(10), || {
        qemu_processes_mentioning("moat.hostname=t-ctrlc").is_empty()
    });
}

#[test]
fn a_missing_kernel_fails_fast_with_a_clear_error() {
    let home = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let out = moat_in(home.path())
        .args(["run", "--kernel", "/nonexistent/vmlinuz", "--", "true"])
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/vmlinuz"), "the error names the kernel path: {err}");
    assert!(start.elapsed() < Duration::from_secs(20));
}

/// A corrupt kernel (the real one, truncated): the guest never answers, so moat gives up within the
/// boot timeout, says why with the console output, and leaves no QEMU behind.
#[test]
fn a_guest_that_never_boots_fails_within_the_boot_timeout() {
    let real = moat_image::find_kernel(None).expect("a kernel is installed");
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join(real.path.file_name().expect("kernel has a file name"));
    let bytes = std::fs::read(&real.path).expect("kernel readable");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).expect("write truncated kernel");
    let home = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let out = moat_in(home.path())
        .args(["run", "--accel", "tcg", "--hostname", "t-noboot", "--boot-timeout", "8s", "--kernel"])
        .arg(&broken)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("did not come up within 8s") || err.contains("failed to boot"),
        "the error says the guest did not boot: {err}"
    );
    assert!(start.elapsed() < Duration::from_secs(60), "gave up in {:?}", start.elapsed());
    assert!(qemu_processes_mentioning("moat.hostname=t-noboot").is_empty(), "no QEMU left behind");
    stop_daemon(home.path());
}
