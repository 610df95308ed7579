//! A supervised QEMU process.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::command::{command_line, VmConfig};
use crate::qmp::Qmp;
use crate::VmmError;

/// How long QEMU may take to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Unix socket paths must fit `sun_path` (108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A running QEMU.
pub struct Vm {
    child: Child,
    pid: u32,
    run_dir: PathBuf,
    agent_socket: PathBuf,
    console_log: PathBuf,
    qemu_log: PathBuf,
    qmp: Option<Qmp>,
    exited: Option<ExitStatus>,
}

impl Vm {
    /// Start QEMU and connect to its QMP socket. When QEMU exits during start-up (a bad kernel
    /// path, bad arguments) the error carries what QEMU printed, and nothing is left running.
    pub async fn spawn(cfg: &VmConfig, die_with_parent: bool) -> Result<Vm, VmmError> {
        for sock in [cfg.qmp_socket(), cfg.agent_socket()] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmmError::PathTooLong(sock.display().to_string()));
            }
            let _ = std::fs::remove_file(&sock);
        }
        let qemu_log = cfg.run_dir.join("qemu.log");
        let log = std::fs::File::create(&qemu_log)
            .map_err(|e| VmmError::Io { what: format!("creating {}", qemu_log.display()), source: e })?;
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(command_line(cfg)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
        // functions (setsid, prctl), touching no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                // Own session: a Ctrl-C at the user's terminal goes to moat, which decides what the
                // guest gets, and not straight to QEMU.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(VmmError::Spawn)?;
        let pid = child.id().expect("a just-spawned child has a pid");
        tracing::debug!(pid, name = %cfg.name, "QEMU started");
        let mut vm = Vm {
            child,
            pid,
            run_dir: cfg.run_dir.clone(),
            agent_socket: cfg.agent_socket(),
            console_log: cfg.console_log(),
            qemu_log,
            qmp: None,
            exited: None,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = vm.child.try_wait().map_err(|e| VmmError::Io { what: "waiting for QEMU".into(), source: e })? {
                vm.exited = Some(status);
                return Err(VmmError::QemuExited { status: status.to_string(), stderr: vm.qemu_stderr() });
            }
            if let Ok(stream) = tokio::net::UnixStream::connect(cfg.qmp_socket()).await {
                vm.qmp = Some(Qmp::handshake(stream).await?);
                return Ok(vm);
            }
            if start.elapsed() > QMP_TIMEOUT {
                vm.kill().await;
                return Err(VmmError::QmpTimeout(QMP_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket.clone()
    }

    pub fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The QMP session.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut()
    }

    /// The last lines of the guest console, for error messages.
    pub fn console_tail(&self, max_lines: usize) -> String {
        tail(&self.console_log, max_lines)
    }

    fn qemu_stderr(&self) -> String {
        tail(&self.qemu_log, 20).trim().to_string()
    }

    /// Wait for QEMU to exit, at most `timeout`; `None` if it is still running.
    pub async fn wait(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, VmmError> {
        if let Some(s) = self.exited {
            return Ok(Some(s));
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status);
                Ok(Some(status))
            }
            Ok(Err(e)) => Err(VmmError::Io { what: "waiting for QEMU".into(), source: e }),
            Err(_) => Ok(None),
        }
    }

    /// Stop QEMU: give the guest `grace` to power off by itself, then ask QEMU to quit, then kill
    /// it. Always reaps the process. Idempotent.
    pub async fn stop(&mut self, grace: Duration) -> Result<(), VmmError> {
        if self.wait(grace).await?.is_none() {
            if let Some(qmp) = self.qmp.as_mut() {
                let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit", None)).await;
            }
            if self.wait(Duration::from_secs(3)).await?.is_none() {
                self.kill().await;
            }
        }
        self.qmp = None;
        Ok(())
    }

    /// SIGKILL QEMU and reap it.
    pub async fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.start_kill();
            if let Ok(status) = self.child.wait().await {
                self.exited = Some(status);
            }
        }
        self.qmp = None;
    }
}

/// The last `max_lines` lines of a file, reading at most its last 64 KiB.
fn tail(path: &Path, max_lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Accel;

    fn config(dir: &Path, kernel: PathBuf) -> VmConfig {
        VmConfig {
            qemu: crate::find_qemu(None).expect("qemu-system-x86_64 installed (apt-get install qemu-system-x86)"),
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mib: 128,
            initrd: kernel.clone(),
            kernel,
            cmdline: String::new(),
            root_disk: None,
            run_dir: dir.to_path_buf(),
            seccomp: true,
            name: "vmtest".into(),
        }
    }

    #[tokio::test]
    async fn a_missing_kernel_is_reported_with_qemus_message() {
        let dir = tempfile::tempdir().unwrap();
        let err = Vm::spawn(&config(dir.path(), "/nonexistent/vmlinuz".into()), true).await.err().expect("fails");
        let msg = err.to_string();
        assert!(msg.contains("QEMU exited") && msg.contains("/nonexistent/vmlinuz"), "{msg}");
    }

    #[tokio::test]
    async fn long_socket_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("x".repeat(120));
        let err = Vm::spawn(&config(&deep, "/k".into()), true).await.err().expect("fails");
        assert!(matches!(err, VmmError::PathTooLong(_)), "{err}");
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        std::fs::write(&f, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&f, 2), "c\nd");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }
}
