//! The E2B-compatible API (`moat serve --e2b`) driven by the official `e2b` SDKs nobody here
//! wrote, unmodified: Python 2.63.0 and 2.7.0 (the oldest 2.x with `sandbox_url`) from PyPI in
//! venvs under the target directory, and the JavaScript SDK from npm. `tests/e2e/e2b/sdk_test.py`
//! and `tests/e2e/e2b/sdk_test.mjs` play the user; these tests set up what a user would (a daemon
//! with `--e2b`, `eval "$(moat e2b env)"`, an E2B-style template image) and check what is left.
//! A last test sends what no SDK would, byte by byte.
//!
//! One daemon serves every test here (started by the first, stopped when the test binary
//! exits), and the tests run one at a time: each boots VMs, and on a small TCG host two at
//! once only slow each other down.

use crate::common;
use crate::oci;
mod wire;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{moat_in, text, wait_for};
use oci::{docker_save_with, Tar};

/// The Python SDKs: the newest, and the oldest 2.x that has `sandbox_url` (`E2B_SANDBOX_URL`).
const PYTHON_SDK_NEWEST: &str = "2.63.0";
const PYTHON_SDK_OLDEST: &str = "2.7.0";
/// The JavaScript SDK (2.x; runs on node >= 20.18.1).
const JS_SDK: &str = "2.51.0";
/// The template (a moat image) the SDKs create sandboxes from.
const TEMPLATE: &str = "e2b-test";
/// No script may take longer than this: a hang fails the test.
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);

static ONE_TEST: Mutex<()> = Mutex::new(());

/// The daemon every test here uses, with what `moat e2b env` printed for it.
struct Front {
    home: PathBuf,
    pid: u32,
    /// The three variables `moat e2b env` exports.
    env: Vec<(String, String)>,
    /// The E2B listener.
    addr: SocketAddr,
    /// `E2B_API_KEY`.
    key: String,
}

impl Front {
    fn var(&self, name: &str) -> &str {
        self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default()
    }

    /// The daemon still runs (the same one), its CLI answers, and the sandboxes the tests made
    /// are all gone.
    fn assert_healthy_and_empty(&self) {
        assert_eq!(common::daemon_pid(&self.home), Some(self.pid as i32), "the daemon died:\n{}", self.log_tail());
        wait_for("the tests' sandboxes to be gone", Duration::from_secs(90), || self.sandboxes().is_empty());
    }

    /// Remove what a test that failed before left behind, so that this one starts clean.
    fn clear(&self) {
        for left in self.sandboxes() {
            let id = left["id"].as_str().unwrap_or_default();
            eprintln!("removing sandbox {id}, left by an earlier test");
            let _ = moat_in(&self.home).args(["rm", "-f", id]).stdin(Stdio::null()).output();
        }
    }

    /// The sandboxes `moat ps` lists.
    fn sandboxes(&self) -> Vec<serde_json::Value> {
        let out = moat_in(&self.home).args(["ps", "-a", "--json"]).stdin(Stdio::null()).output().expect("moat runs");
        assert!(out.status.success(), "moat ps: {}", text(&out.stderr));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("moat ps --json prints JSON");
        list.as_array().cloned().unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.home.join("serve.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// The shared daemon, started on first use. A start that failed fails every later test at once.
fn front() -> &'static Front {
    static FRONT: OnceLock<Result<Front, String>> = OnceLock::new();
    let started = FRONT.get_or_init(|| {
        std::panic::catch_unwind(start_front).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    started.as_ref().unwrap_or_else(|e| panic!("the shared `moat serve --e2b` did not start: {e}"))
}

/// What the exit handler stops and removes: the shared daemon, its VMs and its home.
static AT_EXIT: Mutex<Option<(PathBuf, Option<Child>)>> = Mutex::new(None);

extern "C" fn stop_the_shared_daemon() {
    let Some((home, daemon)) = AT_EXIT.lock().ok().and_then(|mut left| left.take()) else { return };
    if let Some(mut daemon) = daemon {
        // SAFETY: SIGTERM to the daemon this test binary started.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while matches!(daemon.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
    // A stopped daemon leaves its VMs running on purpose; these are ours to end.
    let start = Instant::now();
    loop {
        let left = common::qemu_processes_mentioning(&home.display().to_string());
        if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break;
        }
        for pid in left {
            // SAFETY: SIGKILL to a QEMU whose command line names this binary's own home.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Kept for a look after a failure; the home goes.
    let _ = std::fs::copy(home.join("serve.log"), Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2b-serve.log"));
    let _ = std::fs::remove_dir_all(&home);
}

fn start_front() -> Front {
    common::require_host();
    let started = Instant::now();
    let home = tempfile::Builder::new().prefix("moat-e2b-").tempdir().expect("a temp dir").keep();
    *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()) = Some((home.clone(), None));
    // SAFETY: registers a plain function, run once by libc when the test binary exits.
    assert_eq!(unsafe { libc::atexit(stop_the_shared_daemon) }, 0, "atexit");

    // What the user runs: `moat serve --e2b 127.0.0.1:0 --home H` (port 0: any free one).
    let log = std::fs::File::create(home.join("serve.log")).expect("the home is writable");
    let daemon = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["serve", "--e2b", "127.0.0.1:0", "--home"])
        .arg(&home)
        .env("MOAT_HOME", &home)
        .env("MOAT_LOG", "info")
        .env("MOAT_IMAGE", "minimal")
        .env_remove("MOAT_IDLE_EXIT")
        .env_remove("MOAT_KERNEL")
        .env_remove("MOAT_ACCEL")
        .env_remove("MOAT_MAX_SANDBOXES")
        .env_remove("MOAT_E2B_LISTEN")
        .env_remove("MOAT_E2B_DOMAIN")
        .env_remove("MOAT_E2B_IMAGE")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("the log fd can be duplicated"))
        .stderr(log)
        .spawn()
        .expect("moat serve starts");
    let pid = daemon.id();
    *AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()) = Some((home.clone(), Some(daemon)));
    let serve_log = || std::fs::read_to_string(home.join("serve.log")).unwrap_or_default();
    let exited = || {
        let mut left = AT_EXIT.lock().unwrap_or_else(|e| e.into_inner());
        left.as_mut().and_then(|(_, d)| d.as_mut()).is_some_and(|d| !matches!(d.try_wait(), Ok(None)))
    };
    // The first start on a home builds the initramfs and the minimal image.
    wait_for("the daemon to start", Duration::from_secs(240), || {
        assert!(!exited(), "moat serve --e2b exited:\n{}", serve_log());
        common::daemon_pid(&home) == Some(pid as i32)
    });

    // What the user runs next: `eval "$(moat e2b env --home H)"`.
    let mut printed = String::new();
    wait_for("`moat e2b env` to print the E2B settings", Duration::from_secs(120), || {
        assert!(!exited(), "moat serve --e2b exited:\n{}", serve_log());
        let out = moat_in(&home).args(["e2b", "env", "--home"]).arg(&home).stdin(Stdio::null()).output();
        let out = out.expect("moat runs");
        printed = text(&out.stdout);
        out.status.success()
    });
    let env = exports(&printed);
    let names: BTreeSet<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL"]), "{printed}");
    let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let url = get("E2B_API_URL");
    assert_eq!(get("E2B_SANDBOX_URL"), url, "both planes on one listener: {printed}");
    let addr: SocketAddr = url
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("E2B_API_URL is http://ADDR: {printed}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "the listener's real address: {printed}");
    let key = get("E2B_API_KEY");
    // SDKs 2.25 to 2.45 refuse other keys before sending anything.
    let hex = key.strip_prefix("e2b_").unwrap_or_default();
    assert!(!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{key}");

    import_template(&home);
    // The first boot of an image is a cold one: done here, so that the SDK's 60 s deadline on
    // create meets a warm image, and so that a broken image fails as such.
    let out = moat_in(&home)
        .args(["run", "--image", TEMPLATE, "--", "/bin/bash", "-l", "-c", "echo bash $BASH_VERSION; id -u user"])
        .stdin(Stdio::null())
        .output()
        .expect("moat runs");
    let said = text(&out.stdout);
    assert!(
        out.status.success() && said.starts_with("bash ") && said.ends_with("\n1000\n"),
        "the template: {said}{}",
        text(&out.stderr)
    );
    eprintln!("the shared daemon (pid {pid}) serves E2B at {addr}; ready in {:?}", started.elapsed());
    Front { home, pid, env, addr, key }
}

/// `export NAME=VALUE` lines (values possibly quoted) as pairs.
fn exports(printed: &str) -> Vec<(String, String)> {
    printed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches(|c| c == '\'' || c == '"').to_string()))
        .collect()
}

/// The busybox applets the template links in `/bin` (the SDK runs everything through bash).
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "sleep", "echo", "env", "id", "pwd", "mkdir", "httpd", "touch", "mv", "rm", "head", "tail",
    "wc", "tr", "seq", "stty", "stat", "whoami", "ps", "true", "false", "test", "[", "grep", "sed", "uname", "date",
    "chmod", "chown", "cp", "ln", "kill", "expr", "printf", "sort", "cut", "tee", "dd", "find", "xargs", "basename",
    "dirname", "readlink", "hostname", "sync", "which", "yes", "nproc", "uniq", "mktemp", "timeout", "tty",
];

/// An E2B-style template as a `docker save` archive: the host's static busybox and its bash
/// (with the libraries `ldd` names), user `user` (1000) with home `/home/user`, root's `/root`.
fn template_archive() -> Vec<u8> {
    let read = |path: &str| std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let busybox = std::fs::read("/bin/busybox")
        .unwrap_or_else(|e| panic!("/bin/busybox: {e}; install it with: sudo apt-get install -y busybox-static"));
    let bash = std::fs::read("/bin/bash")
        .unwrap_or_else(|e| panic!("/bin/bash: {e}; install it with: sudo apt-get install -y bash"));
    let libraries = bash_libraries();
    let mut dirs: BTreeSet<String> =
        ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "home", "var", "run", "root"]
            .into_iter()
            .map(String::from)
            .collect();
    for lib in &libraries {
        for parent in Path::new(lib.trim_start_matches('/')).ancestors().skip(1) {
            if !parent.as_os_str().is_empty() {
                dirs.insert(parent.display().to_string());
            }
        }
    }
    let mut t = Tar::new();
    for dir in &dirs {
        t = t.dir(dir);
    }
    t = t.dir_owned("tmp", 0o1777, 0, 0).dir_owned("home/user", 0o755, 1000, 1000);
    t = t.file("bin/busybox", &busybox, 0o755).file("bin/bash", &bash, 0o755);
    for applet in APPLETS {
        t = t.symlink(&format!("bin/{applet}"), "busybox");
    }
    for lib in &libraries {
        t = t.file(lib.trim_start_matches('/'), &read(lib), 0o755);
    }
    let passwd = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000:user:/home/user:/bin/bash\n";
    t = t.file("etc/passwd", passwd.as_bytes(), 0o644).file("etc/group", b"root:x:0:\nuser:x:1000:\n", 0o644);
    let config = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"],"WorkingDir":"/","Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    docker_save_with(&[t.bytes()], &format!("{TEMPLATE}:latest"), config)
}

/// The shared libraries and the loader `/bin/bash` needs, as `ldd` lists them.
fn bash_libraries() -> Vec<String> {
    let out = Command::new("ldd")
        .arg("/bin/bash")
        .output()
        .unwrap_or_else(|e| panic!("ldd: {e}; install it with: sudo apt-get install -y libc-bin"));
    assert!(out.status.success(), "ldd /bin/bash: {}", text(&out.stderr));
    let libraries: Vec<String> = text(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    assert!(libraries.iter().any(|l| l.contains("libc.so")), "ldd /bin/bash names libc: {}", text(&out.stdout));
    libraries
}

/// `moat image import --name e2b-test -`, once per daemon.
fn import_template(home: &Path) {
    use std::io::Write;
    let mut child = moat_in(home)
        .args(["image", "import", "--name", TEMPLATE, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moat starts");
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(&template_archive()).expect("moat reads the archive");
    drop(stdin);
    let out = child.wait_with_output().expect("moat finishes");
    assert!(out.status.success(), "moat image import: {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("{TEMPLATE} sha256:")), "{}", text(&out.stdout));
}

/// A Python with `e2b==version`: a venv per version, made once per target directory.
fn python(version: &str) -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2b-venv-{version}"));
    let python = venv.join("bin/python");
    let has_sdk = |python: &Path| {
        Command::new(python)
            .args(["-c", "import e2b, importlib.metadata as m; print(m.version('e2b'))"])
            .output()
            .is_ok_and(|o| o.status.success() && text(&o.stdout).trim() == version)
    };
    if has_sdk(&python) {
        return python;
    }
    let install =
        "install it with: sudo apt-get install -y python3 python3-venv python3-pip (e2b 2.63 needs Python >= 3.11)";
    let out = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .output()
        .unwrap_or_else(|e| panic!("the E2B tests need python3 ({e}); {install}"));
    assert!(out.status.success(), "python3 -m venv failed: {}\n{install}", text(&out.stderr));
    let package = format!("e2b=={version}");
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", &package])
        .output()
        .expect("the venv's python runs");
    assert!(
        out.status.success(),
        "pip install {package} failed: {}{}\nthe E2B tests need PyPI; {install}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(has_sdk(&python), "the e2b SDK does not import after pip install {package}");
    python
}

/// A directory whose node_modules holds the JavaScript `e2b` package, with the test script.
fn node_project() -> PathBuf {
    let install = "install Node.js >= 20.18.1 with npm (the distribution's nodejs package when new enough: \
                   sudo apt-get install -y nodejs)";
    let node = Command::new("node").arg("--version").output();
    let node = node.unwrap_or_else(|e| panic!("the JavaScript E2B test needs node ({e}); {install}"));
    let version = text(&node.stdout);
    let parts: Vec<u32> = version.trim().trim_start_matches('v').split('.').filter_map(|p| p.parse().ok()).collect();
    assert!(parts >= vec![20, 18, 1], "node {version} is too old for e2b {JS_SDK}; {install}");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2b-npm-{JS_SDK}"));
    std::fs::create_dir_all(&dir).expect("the target dir is writable");
    let installed = std::fs::read_to_string(dir.join("node_modules/e2b/package.json"))
        .ok()
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .is_some_and(|p| p["version"] == JS_SDK);
    if !installed {
        std::fs::write(dir.join("package.json"), r#"{"private": true, "type": "module"}"#).expect("writable");
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error", &format!("e2b@{JS_SDK}")])
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("the JavaScript E2B test needs npm ({e}); {install}"));
        assert!(out.status.success(), "npm install e2b@{JS_SDK}: {}{}", text(&out.stdout), text(&out.stderr));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/e2b/sdk_test.mjs");
    std::fs::copy(&script, dir.join("sdk_test.mjs")).expect("the script can be copied next to node_modules");
    dir
}

/// Run `cmd` with the environment `moat e2b env` printed (and no other E2B setting), killing it
/// after [`SCRIPT_LIMIT`]; it must print `ok` last and exit 0.
fn run_script(front: &Front, mut cmd: Command, what: &str) {
    for (k, _) in std::env::vars() {
        if k.starts_with("E2B_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(front.env.iter().map(|(k, v)| (k, v))).env("PYTHONUNBUFFERED", "1").env("PYTHONDONTWRITEBYTECODE", "1");
    let started = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("it starts");
    let pipes = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = pipe.read_to_end(&mut all);
            all
        })
    };
    let (stdout, stderr) = (drain(Box::new(pipes.0)), drain(Box::new(pipes.1)));
    let mut timed_out = false;
    while child.try_wait().expect("the child's state is readable").is_none() {
        if started.elapsed() > SCRIPT_LIMIT {
            let _ = child.kill();
            timed_out = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = child.wait().expect("the child is reaped");
    let out = Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() };
    let log = format!("--- stdout ---\n{}--- stderr ---\n{}", text(&out.stdout), text(&out.stderr));
    assert!(!timed_out, "{what} did not finish within {SCRIPT_LIMIT:?}:\n{log}");
    if !out.status.success() || !text(&out.stdout).trim_end().ends_with("ok") {
        let (status, took, daemon) = (out.status, started.elapsed(), front.log_tail());
        panic!("{what} failed ({status}, after {took:?}):\n{log}--- the daemon's log, last lines ---\n{daemon}");
    }
    eprintln!("{what} passed in {:?}\n{log}", started.elapsed());
}

fn python_sdk_drives_sandboxes(version: &str) {
    let _alone = ONE_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let python = python(version);
    let front = front();
    front.clear();
    let mut cmd = Command::new(python);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/e2b/sdk_test.py")).arg(TEMPLATE);
    run_script(front, cmd, &format!("the Python SDK {version}"));
    front.assert_healthy_and_empty();
}

#[test]
fn moat_e2b_env_prints_what_the_sdks_read() {
    let _alone = ONE_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let front = front();
    // `start_front` checked the shape; the listener answers the key it printed, and only it.
    let list = |key: &str| wire::request(front.addr, "GET", "/v2/sandboxes", &[("X-API-KEY", key)], b"");
    let ok = list(&front.key);
    assert_eq!(ok.status, 200, "{ok}");
    assert!(ok.json().is_array(), "{ok}");
    let bare = list(front.key.trim_start_matches("e2b_"));
    assert_eq!(bare.status, 200, "the bare daemon token is a key too: {bare}");
    assert_eq!(front.var("E2B_API_URL"), format!("http://{}", front.addr));
}

#[test]
fn the_python_sdk_2_63_drives_moat_sandboxes() {
    python_sdk_drives_sandboxes(PYTHON_SDK_NEWEST);
}

#[test]
fn the_oldest_python_sdk_with_sandbox_url_drives_moat_sandboxes() {
    python_sdk_drives_sandboxes(PYTHON_SDK_OLDEST);
}

#[test]
fn the_javascript_sdk_runs_the_core_flow() {
    let _alone = ONE_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = node_project();
    let front = front();
    front.clear();
    let mut cmd = Command::new("node");
    cmd.arg("sdk_test.mjs").arg(TEMPLATE).current_dir(&dir);
    run_script(front, cmd, &format!("the JavaScript SDK {JS_SDK}"));
    front.assert_healthy_and_empty();
}

mod bad_input;
