//! `moat exec -it` and `moat shell` driven from a real pseudo-terminal made by the test, as a
//! person at a terminal would use them: a prompt, `stty size` following window resizes, Ctrl-C
//! interrupting a foreground command, the exit code coming back, the local terminal restored.

use crate::common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{moat_in, text, OwnHome};

/// A terminal the test types into: the controller side of a pty whose replica is `moat`'s
/// stdin, stdout, stderr and controlling terminal.
struct Terminal {
    controller: std::fs::File,
    screen: Arc<Mutex<Vec<u8>>>,
    child: Child,
}

impl Terminal {
    fn spawn(mut cmd: std::process::Command, rows: u16, cols: u16) -> Terminal {
        let (controller, replica) = common::pty();
        set_size(&controller, rows, cols);
        let stdio = || Stdio::from(replica.try_clone().expect("dup"));
        cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("moat starts");
        drop(replica);
        let controller = std::fs::File::from(controller);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = controller.try_clone().expect("dup");
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once moat exits and the replica is closed.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().expect("screen lock").extend_from_slice(&buf[..n]);
            }
        });
        Terminal { controller, screen, child }
    }

    fn screen(&self) -> String {
        text(&self.screen.lock().expect("screen lock"))
    }

    fn typed(&mut self, keys: &[u8]) {
        self.controller.write_all(keys).expect("the terminal takes input");
    }

    /// Wait until the screen shows `needle` `times` times.
    fn wait_for(&self, needle: &str, times: usize) {
        assert!(
            self.shows_within(needle, times, Duration::from_secs(30)),
            "{needle:?} did not appear {times}x; the screen:\n{}",
            self.screen()
        );
    }

    fn shows_within(&self, needle: &str, times: usize, timeout: Duration) -> bool {
        let start = std::time::Instant::now();
        while self.screen().matches(needle).count() < times {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Type `keys` again and again until the screen shows `needle` once: for state that changes
    /// asynchronously (a window size on its way to the guest).
    fn ask_until(&mut self, keys: &[u8], needle: &str) {
        let start = std::time::Instant::now();
        loop {
            self.typed(keys);
            if self.shows_within(needle, 1, Duration::from_secs(2)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{needle:?} never appeared; the screen:\n{}",
                self.screen()
            );
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        set_size(&self.controller, rows, cols);
    }

    fn exit_code(mut self) -> Option<i32> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(start.elapsed() < Duration::from_secs(30), "moat did not exit; the screen:\n{}", self.screen());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn set_size(fd: &impl std::os::fd::AsFd, rows: u16, cols: u16) {
    let ws = rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(fd, ws).expect("set the window size");
}

#[test]
fn exec_it_is_a_real_terminal_with_resize_ctrl_c_and_exit_codes() {
    let home = OwnHome::new();
    let h = home.path();
    let out = moat_in(h).args(["run", "-d", "--name", "tty", "--memory", "256"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let mut cmd = moat_in(h);
    cmd.args(["exec", "-it", "tty", "--", "sh"]);
    let mut term = Terminal::spawn(cmd, 24, 80);
    term.wait_for("# ", 1);
    term.typed(b"stty size\r");
    term.wait_for("24 80", 1);

    // The window grows: moat gets SIGWINCH and the sandbox's terminal follows.
    term.resize(40, 100);
    term.ask_until(b"stty size\r", "40 100");

    // Ctrl-C interrupts the foreground command, not the shell or moat.
    term.typed(b"sleep 60; echo slept\r");
    common::wait_for("sleep to run in the terminal", Duration::from_secs(30), || {
        moat_in(h).args(["exec", "tty", "--", "pidof", "sleep"]).output().is_ok_and(|o| o.status.success())
    });
    term.typed(&[0x03]);
    term.typed(b"echo after-$((40+2))\r");
    term.wait_for("after-42", 1);
    // No line of output says "slept" (only echoes of the typed line do, once or twice as the
    // line editor redraws typeahead): the list was abandoned.
    let screen = term.screen();
    assert!(
        !screen.lines().any(|l| l.trim_matches(|c: char| c.is_whitespace()) == "slept"),
        "sleep was interrupted: {screen}"
    );

    term.typed(b"exit 7\r");
    assert_eq!(term.exit_code(), Some(7));

    // `moat shell` logs in with the image's shell; Ctrl-D at the prompt ends it with 0.
    let mut cmd = moat_in(h);
    cmd.args(["shell", "tty"]);
    let mut term = Terminal::spawn(cmd, 30, 90);
    term.wait_for("# ", 1);
    term.typed(b"echo $0 $(stty size) $TERM\r");
    term.wait_for("30 90", 1);
    // root's shell in the minimal image's /etc/passwd, started as a login shell (the prompt is
    // the one /etc/profile sets).
    assert!(term.screen().contains("/bin/sh 30 90"), "the image's shell: {}", term.screen());
    assert!(term.screen().contains("moat-"), "/etc/profile was read: {}", term.screen());
    term.typed(&[0x04]);
    assert_eq!(term.exit_code(), Some(0));

    // -t without a terminal is refused with what to do instead.
    let out = moat_in(h).args(["exec", "-t", "tty", "--", "true"]).stdin(Stdio::null()).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("terminal"), "{}", text(&out.stderr));
    let out = moat_in(h).args(["rm", "-f", "tty"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
