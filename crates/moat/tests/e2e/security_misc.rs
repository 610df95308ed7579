//! A hostile guest's console: what it writes reaches the operator's terminal only as text (no
//! control sequences), and however much it writes, the host keeps a bounded console log.

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{moat_in, moat_ok, text, wait_for, OwnHome};

/// Terminal controls a guest would like the operator's terminal to obey: OSC 52 (write the
/// clipboard), OSC 0 (the window title), CSI 2J (clear the screen), BEL.
const HOSTILE: &str =
    r"printf '\033]52;c;bW9hdC1wd25lZA==\007\033[2J\033]0;owned\007hostile-console-line\n' > /dev/console";

/// Run `cmd` with its stdout and stderr on a pseudo-terminal the test made; what it printed.
fn on_a_terminal(mut cmd: Command) -> (Option<i32>, Vec<u8>) {
    let (controller, replica) = common::pty();
    let stdio = || Stdio::from(replica.try_clone().expect("dup"));
    let mut child = cmd.stdin(Stdio::null()).stdout(stdio()).stderr(stdio()).spawn().expect("moat starts");
    // The command keeps its copies of the replica: only with every copy closed does reading the
    // controller end (EIO) when moat exits.
    drop(cmd);
    drop(replica);
    let mut controller = std::fs::File::from(controller);
    let mut screen = Vec::new();
    let mut buf = [0u8; 4096];
    // EIO once moat exits and the replica is closed.
    while let Ok(n @ 1..) = controller.read(&mut buf) {
        screen.extend_from_slice(&buf[..n]);
    }
    (child.wait().expect("wait").code(), screen)
}

fn console_log(home: &Path, id: &str) -> std::path::PathBuf {
    home.join("run").join(id).join("console.log")
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_guest_cannot_drive_the_operators_terminal_or_fill_the_disk_through_its_console() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["run", "-d", "--name", "loud", "--memory", "256"]);
    let id = moat_ok(h, &["inspect", "loud", "--json"]);
    let id = serde_json::from_str::<serde_json::Value>(&id).expect("inspect prints JSON")["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let log = console_log(h, &id);

    // 1. Control sequences on the console: `moat logs` on a terminal shows them as text.
    moat_ok(h, &["exec", "loud", "--", "sh", "-c", HOSTILE]);
    let mut logs = moat_in(h);
    logs.args(["logs", "loud"]);
    let (code, screen) = on_a_terminal(logs);
    let shown = text(&screen);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("hostile-console-line"), "the console line is shown:\n{shown}");
    assert!(shown.contains(r"\x1b]52;c;"), "the escape is shown as text:\n{shown}");
    assert!(!screen.contains(&0x1b) && !screen.contains(&0x07), "ESC or BEL reached the terminal:\n{shown:?}");
    // Piped, the log is the guest's bytes as they are.
    let piped = moat_in(h).args(["logs", "loud"]).stdin(Stdio::null()).output().expect("moat runs");
    assert!(piped.stdout.windows(5).any(|w| w == b"\x1b]52;"), "a pipe gets the raw console");

    // 2. A flood: the console written as fast as the guest can, until the log has passed its
    // cap and been moved aside (a few MiB: 10-20 s under TCG).
    let cap = moat_vmm::CONSOLE_LOG_CAP;
    let flood = "yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde > /dev/console";
    // A follower keeps reading across the cut.
    let mut follower = moat_in(h)
        .args(["logs", "--follow", "loud"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("moat logs starts");
    let followed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (mut out, followed) = (follower.stdout.take().expect("piped"), followed.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                let mut seen = followed.lock().expect("no panics while held");
                seen.extend_from_slice(&buf[..n]);
                // Only the end matters; the flood is megabytes.
                let excess = seen.len().saturating_sub(1 << 16);
                seen.drain(..excess);
            }
        })
    };
    let pid = moat_ok(h, &["exec", "-d", "loud", "--", "sh", "-c", flood]);
    let rotated = log.with_file_name("console.log.1");
    let start = Instant::now();
    let (mut largest, mut samples, mut rotated_at) = (0, 0, None);
    // Two seconds of flooding past the first rotation show the cap holding while it goes on.
    while rotated_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(2)) {
        largest = largest.max(size(&log));
        samples += 1;
        // The daemon checks four times a second; the guest writes well under 2 MiB in that time.
        assert!(largest <= cap + cap / 2, "console.log reached {largest} bytes; the cap is {cap}");
        if rotated_at.is_none() && size(&rotated) >= cap {
            rotated_at = Some(Instant::now());
        }
        assert!(start.elapsed() < Duration::from_secs(90), "the guest wrote less than {cap} bytes in 90 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    moat_ok(h, &["kill", "loud", pid.trim()]);
    eprintln!(
        "flood: {:.1} s; console.log at most {} KiB over {samples} samples, now {} KiB; console.log.1 {} KiB",
        start.elapsed().as_secs_f64(),
        largest >> 10,
        size(&log) >> 10,
        size(&rotated) >> 10
    );
    assert!(size(&log) + size(&rotated) <= 3 * cap, "the console's files hold at most about twice the cap");
    moat_ok(h, &["exec", "loud", "--", "sh", "-c", "echo after-the-cut > /dev/console"]);
    wait_for("`moat logs --follow` to show a line written after the cut", Duration::from_secs(10), || {
        text(&followed.lock().expect("no panics while held")).contains("after-the-cut")
    });
    let _ = follower.kill();
    let _ = follower.wait();
    reader.join().expect("the reader thread ends with moat logs");
    // `moat logs` still shows the console: the part moved aside, then the current one.
    let out = moat_in(h).args(["logs", "loud"]).stdin(Stdio::null()).output().expect("moat runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.len() as u64 >= cap, "moat logs shows the kept console");
    let end = text(&out.stdout[out.stdout.len().saturating_sub(200)..]);
    assert!(end.contains("0123456789abcdef"), "the end of the flood is shown: {end:?}");

    // 3. The guest writes control sequences and reboots: the failed sandbox's last_error quotes
    // its console, without them.
    // The exec ends with the VM, so its own answer is no matter.
    let reboot = format!("{HOSTILE}; reboot -f");
    let _ = moat_in(h).args(["exec", "loud", "--", "sh", "-c", &reboot]).stdin(Stdio::null()).output();
    wait_for("the sandbox to fail", Duration::from_secs(30), || {
        moat_ok(h, &["inspect", "loud", "--json"]).contains(r#""phase": "failed""#)
    });
    let info: serde_json::Value = serde_json::from_str(&moat_ok(h, &["inspect", "loud", "--json"])).expect("JSON");
    let last_error = info["last_error"].as_str().expect("a failed sandbox has a last_error");
    assert!(last_error.contains("hostile-console-line"), "it quotes the console: {last_error}");
    assert!(!last_error.contains(['\x1b', '\x07']), "no terminal controls in last_error: {last_error:?}");
    let mut inspect = moat_in(h);
    inspect.args(["inspect", "loud"]);
    let (code, screen) = on_a_terminal(inspect);
    assert_eq!(code, Some(0), "{}", text(&screen));
    assert!(!screen.contains(&0x1b) && !screen.contains(&0x07), "{:?}", text(&screen));
    moat_ok(h, &["rm", "-f", "loud"]);
}
