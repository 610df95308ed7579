//! A supervised QEMU process: one this daemon spawned, or one it adopted from an earlier daemon.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use serde_json::json;

use crate::command::{command_line, Memory, VmConfig};
use crate::console::{console_tail, keep_under_cap, rotated_path, tail, ConsoleCap};
use crate::exit::{has_exited, open_pidfd, wait_readable, watch, Exit, ExitWatcher};
use crate::identity::is_our_qemu;
use crate::qmp::Qmp;
use crate::VmmError;
use crate::{CgroupLimits, SandboxCgroup};

/// How long QEMU may take to open its QMP socket and greet.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits for QEMU after `quit` before killing it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(3);
/// Unix socket paths must fit `sun_path` (108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How this process is related to QEMU.
enum Process {
    /// Started by [`Vm::spawn`]: our child, reaped through `Child`, killed when dropped.
    Spawned(Child),
    /// Taken over by [`Vm::adopt`], or a spawned VM after [`Vm::detach`]: never killed on drop,
    /// its exit is seen through the pidfd only.
    Adopted,
}

/// A running QEMU. Dropping a spawned `Vm` SIGKILLs QEMU without waiting (use [`Vm::stop`] to
/// end it cleanly, [`Vm::detach`] to leave it running); dropping an adopted one leaves QEMU
/// running.
pub struct Vm {
    process: Process,
    /// Refers to exactly this QEMU even after its pid is reused; readable once it has exited.
    pidfd: AsyncFd<OwnedFd>,
    pid: u32,
    run_dir: PathBuf,
    qmp_socket: PathBuf,
    agent_socket: PathBuf,
    console_log: PathBuf,
    pid_file: PathBuf,
    qemu_log: PathBuf,
    qmp: Option<Qmp>,
    exited: Option<Exit>,
    /// Guest RAM is a shared file mapping ([`Memory::Own`]): saved streams leave it out.
    ram_shared: bool,
    /// Keeps `console.log` under its cap until the VM is stopped (or this handle dropped).
    console_cap: Option<ConsoleCap>,
    /// The uid a jailed QEMU this process started runs as, held while it runs.
    uid: Option<crate::jail::UidLease>,
    /// The VM's cgroup, removed once QEMU has ended.
    cgroup: Option<SandboxCgroup>,
}

/// How long saving or loading a VM's state may take. Streams without RAM take milliseconds; one
/// with a few GiB of RAM takes seconds.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// The name a migration stream's file descriptor gets inside QEMU.
const STATE_FD: &str = "moat-state";
/// How long a cancelled migration may take to stop (it stops at the next chunk it writes).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

impl Vm {
    /// Start QEMU and connect to its QMP socket. When QEMU exits during start-up (a bad kernel
    /// path, bad arguments) the error carries what QEMU printed, and nothing is left running.
    ///
    /// `die_with_parent` sets `PR_SET_PDEATHSIG(SIGKILL)` for one-shot runs. The kernel ties it
    /// to the *thread* that forked, so call this from a long-lived runtime thread (any tokio
    /// worker), never from `spawn_blocking`. A VM meant to outlive the daemon ([`Vm::detach`])
    /// must be spawned without it.
    pub async fn spawn(cfg: &VmConfig, die_with_parent: bool) -> Result<Vm, VmmError> {
        for sock in [cfg.qmp_socket(), cfg.agent_socket()] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmmError::PathTooLong(sock.display().to_string()));
            }
        }
        let sockets = cfg.run_dir.join(crate::jail::SOCKET_DIR);
        std::fs::create_dir_all(&sockets).map_err(|e| VmmError::Io {
            what: format!("cannot create run directory {}", sockets.display()),
            source: e,
        })?;
        // QEMU appends to the console log (so it can be cut under it): each boot starts afresh.
        let console = cfg.console_log();
        for stale in
            [cfg.qmp_socket(), cfg.agent_socket(), cfg.net_socket(), cfg.pid_file(), rotated_path(&console), console]
        {
            let _ = std::fs::remove_file(stale);
        }
        let qemu_log = cfg.qemu_log();
        let log = std::fs::File::create(&qemu_log)
            .map_err(|e| VmmError::Io { what: format!("cannot create {}", qemu_log.display()), source: e })?;
        let (mut cmd, lease) = match &cfg.jail {
            Some(jail) => {
                let (spec, lease) = crate::jail::prepare(cfg, jail)?;
                let spec = serde_json::to_string(&spec).expect("a jail spec serialises");
                let mut cmd = Command::new(&jail.helper);
                cmd.arg(crate::jail::JAIL_ARG).arg(spec).arg(&cfg.qemu).stdout(Stdio::piped());
                (cmd, lease)
            }
            None => {
                let mut cmd = Command::new(&cfg.qemu);
                cmd.stdout(Stdio::null());
                (cmd, None)
            }
        };
        // No `kill_on_drop`: `Vm`'s own drop kills, so that `detach` can leave QEMU running.
        cmd.args(command_line(cfg)).stdin(Stdio::null()).stderr(log);
        let parent = std::process::id() as libc::pid_t;
        let cgroup = match &cfg.cgroups {
            Some(host) => {
                Some(SandboxCgroup::create(host, &cfg.name, &CgroupLimits::for_vm(cfg.memory_mib, cfg.vcpus))?)
            }
            None => None,
        };
        let cgroup_procs = procs_files(cgroup.as_ref());
        // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
        // functions (setsid, prctl, getppid, open, write, close) on memory prepared before the
        // fork, touching nothing shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                // Into the sandbox's cgroup first, so everything after counts against its limits.
                for procs in &cgroup_procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                // Own session: a Ctrl-C at the user's terminal goes to moat, which decides what the
                // guest gets, and not straight to QEMU.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // No transparent huge pages for QEMU (inherited by the jail's fork, kept across
                // exec): TCG asks for them on its translation buffer, where each 2 MiB region it
                // starts then costs 2 MiB however little code it holds — most of what a restored
                // VM holds of its own. A failure costs memory, not safety: ignored.
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
                if die_with_parent {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died between fork and prctl; then nobody would kill us.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                remove_cgroup(cgroup).await;
                return Err(VmmError::Spawn(e));
            }
        };
        let pid = match qemu_pid(&mut child, cfg.jail.is_some()).await {
            Ok(pid) => pid,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                remove_cgroup(cgroup).await;
                return Err(e.unwrap_or_else(|| VmmError::QemuExited {
                    status: "the jail helper ended before QEMU started".into(),
                    stderr: tail(&qemu_log, 20),
                }));
            }
        };
        // The child is not reaped before we wait for it, so its pid cannot have been reused yet;
        // a jailed QEMU dies with the helper, our child.
        let pidfd = match open_pidfd(pid).and_then(|fd| watch(fd).map_err(std::io::Error::from)) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                remove_cgroup(cgroup).await;
                return Err(VmmError::Io { what: format!("cannot open a pidfd for QEMU {pid}"), source: e });
            }
        };
        tracing::debug!(pid, name = %cfg.name, accel = %cfg.accel, "QEMU started");
        let mut vm = Vm::new(Process::Spawned(child), pidfd, pid, cfg);
        vm.uid = lease;
        vm.cgroup = cgroup;
        match vm.connect_qmp().await {
            Ok(qmp) => {
                vm.qmp = Some(qmp);
                Ok(vm)
            }
            Err(e) => {
                vm.kill().await;
                vm.remove_files();
                Err(e)
            }
        }
    }

    /// Take over the QEMU an earlier daemon started for `cfg`, known by its `pid`. The process
    /// must be that very QEMU ([`is_our_qemu`]); anything else is refused with
    /// [`VmmError::NotOurProcess`] and never signalled. The adopted `Vm` works like a spawned one,
    /// except that QEMU's exit status is [`Exit::Unknown`] and dropping it leaves QEMU running.
    pub async fn adopt(cfg: &VmConfig, pid: u32) -> Result<Vm, VmmError> {
        let not_ours = |reason: String| VmmError::NotOurProcess { pid, reason };
        is_our_qemu(pid, cfg).map_err(not_ours)?;
        let pidfd = open_pidfd(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => not_ours(format!("process {pid} has exited")),
            _ => VmmError::Io { what: format!("cannot open a pidfd for process {pid}"), source: e },
        })?;
        // The pid may have been reused between the check and `pidfd_open`: check again, now that
        // the pidfd pins the process. If it is still running after the second read, the
        // command line read belonged to it.
        is_our_qemu(pid, cfg).map_err(not_ours)?;
        let exited =
            |e: std::io::Error| VmmError::Io { what: format!("cannot poll the pidfd of process {pid}"), source: e };
        if has_exited(&pidfd).map_err(exited)? {
            return Err(not_ours(format!("process {pid} has exited")));
        }
        let pidfd = watch(pidfd)
            .map_err(|e| VmmError::Io { what: format!("cannot watch the pidfd of process {pid}"), source: e.into() })?;
        let qmp_socket = cfg.qmp_socket();
        let qmp = match tokio::time::timeout(QMP_TIMEOUT, Qmp::connect(&qmp_socket)).await {
            Ok(Ok(qmp)) => qmp,
            Ok(Err(e)) => return Err(VmmError::AdoptQmp { pid, socket: qmp_socket, reason: e.to_string() }),
            Err(_) => {
                return Err(VmmError::AdoptQmp {
                    pid,
                    socket: qmp_socket,
                    reason: format!("no greeting within {}s", QMP_TIMEOUT.as_secs()),
                })
            }
        };
        tracing::info!(pid, name = %cfg.name, "adopted a running QEMU");
        let mut vm = Vm::new(Process::Adopted, pidfd, pid, cfg);
        vm.qmp = Some(qmp);
        vm.cgroup = cfg.cgroups.as_ref().and_then(|host| SandboxCgroup::open(host, &cfg.name));
        Ok(vm)
    }

    fn new(process: Process, pidfd: AsyncFd<OwnedFd>, pid: u32, cfg: &VmConfig) -> Vm {
        Vm {
            process,
            pidfd,
            pid,
            run_dir: cfg.run_dir.clone(),
            qmp_socket: cfg.qmp_socket(),
            agent_socket: cfg.agent_socket(),
            console_log: cfg.console_log(),
            pid_file: cfg.pid_file(),
            qemu_log: cfg.qemu_log(),
            qmp: None,
            exited: None,
            ram_shared: cfg.memory.as_ref().is_some_and(Memory::is_shared),
            console_cap: Some(keep_under_cap(cfg.console_log())),
            uid: None,
            cgroup: None,
        }
    }

    /// Pause the guest and write its state into the new file `state`. With RAM in a shared file
    /// ([`Memory::Own`]) the stream holds the device state only (kilobytes) and the caller may copy
    /// the RAM file while the VM stays paused; otherwise RAM is in the stream. Returns whether RAM
    /// was left out, which [`Vm::load`] needs to know. The VM stays paused: [`Vm::cont`] runs it
    /// again, [`Vm::stop`] ends it.
    pub async fn save(&mut self, state: &Path) -> Result<bool, VmmError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(state)
            .map_err(|e| VmmError::Io { what: format!("cannot create {}", state.display()), source: e })?;
        let ram_in_file = self.ram_shared;
        let qmp = self.qmp()?;
        qmp.execute("stop", None).await?;
        prepare_migration(qmp, ram_in_file).await?;
        qmp.execute_with_fd("getfd", Some(json!({ "fdname": STATE_FD })), Some(file.as_fd())).await?;
        drop(file);
        qmp.execute("migrate", Some(json!({ "uri": format!("fd:{STATE_FD}") }))).await?;
        self.wait_migration("saving").await?;
        Ok(ram_in_file)
    }

    /// Load the state [`Vm::save`] wrote into a VM spawned with `incoming`, then run it.
    /// `ram_in_file` is what `save` returned. A stream QEMU cannot load (another QEMU version, a
    /// different machine) ends QEMU; the error carries what it printed.
    pub async fn load(&mut self, state: &Path, ram_in_file: bool) -> Result<(), VmmError> {
        let file = std::fs::File::open(state)
            .map_err(|e| VmmError::Io { what: format!("cannot open {}", state.display()), source: e })?;
        let result = async {
            let qmp = self.qmp()?;
            prepare_migration(qmp, ram_in_file).await?;
            qmp.execute_with_fd("getfd", Some(json!({ "fdname": STATE_FD })), Some(file.as_fd())).await?;
            qmp.execute("migrate-incoming", Some(json!({ "uri": format!("fd:{STATE_FD}") }))).await?;
            self.wait_migration("loading").await?;
            self.cont().await
        }
        .await;
        match result {
            Err(VmmError::Qmp(e)) => Err(self.exited_early(Duration::from_secs(2)).await?.unwrap_or(VmmError::Qmp(e))),
            other => other,
        }
    }

    /// Run a paused guest again.
    pub async fn cont(&mut self) -> Result<(), VmmError> {
        self.qmp()?.execute("cont", None).await?;
        Ok(())
    }

    /// Undo what a save cut short left (a daemon killed while [`Vm::save`] ran or while it copied
    /// files with the guest paused): cancel a migration still in flight, then run the guest again
    /// if it is paused. Returns whether it was paused. A guest QEMU stopped for good (shut down,
    /// panicked) cannot run again: that is an error.
    pub async fn resume_if_paused(&mut self) -> Result<bool, VmmError> {
        let deadline = Instant::now() + CANCEL_TIMEOUT;
        let mut cancelled = false;
        loop {
            let info = self.qmp()?.execute("query-migrate", None).await?;
            match info.get("status").and_then(|s| s.as_str()).unwrap_or("none") {
                "none" | "completed" | "failed" | "cancelled" => break,
                status if Instant::now() > deadline => {
                    return Err(VmmError::Migration(format!(
                        "a save of the VM state left by an earlier daemon is still {status} {}s after it was cancelled",
                        CANCEL_TIMEOUT.as_secs()
                    )))
                }
                _ => {
                    if !cancelled {
                        self.qmp()?.execute("migrate_cancel", None).await?;
                        cancelled = true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let status = self.qmp()?.execute("query-status", None).await?;
        if status.get("running").and_then(|r| r.as_bool()).unwrap_or(false) {
            return Ok(false);
        }
        // `cont` refuses a guest that needs a reset (shut down, panicked) with QEMU's reason.
        self.cont().await?;
        Ok(true)
    }

    /// Poll `query-migrate` until the migration in either direction has completed.
    async fn wait_migration(&mut self, what: &str) -> Result<(), VmmError> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            let info = self.qmp()?.execute("query-migrate", None).await?;
            match info.get("status").and_then(|s| s.as_str()).unwrap_or("none") {
                "completed" => return Ok(()),
                status @ ("failed" | "cancelled") => {
                    let desc = info.get("error-desc").and_then(|d| d.as_str()).unwrap_or("no reason given");
                    return Err(VmmError::Migration(format!("{what} the VM state {status}: {desc}")));
                }
                _ if Instant::now() > deadline => {
                    return Err(VmmError::Migration(format!(
                        "{what} the VM state took longer than {}s",
                        MIGRATION_TIMEOUT.as_secs()
                    )))
                }
                _ => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Let go of QEMU without stopping it: it keeps running after this `Vm`, and this daemon,
    /// are gone, for a later [`Vm::adopt`]. While this process lives it still reaps a spawned
    /// QEMU when it exits, so no zombie is left.
    pub fn detach(mut self) {
        tracing::debug!(pid = self.pid, "detaching from QEMU; it keeps running");
        // Dropping a `Child` without `kill_on_drop` hands it to tokio's orphan reaper.
        self.process = Process::Adopted;
    }

    /// Something that resolves when QEMU exits, independent of this `Vm` (it holds its own
    /// pidfd), for a task that watches the VM while another drives it.
    pub fn exit_watcher(&self) -> Result<ExitWatcher, VmmError> {
        let fd = self.pidfd.get_ref().try_clone().map_err(|e| VmmError::Io {
            what: format!("cannot duplicate the pidfd of QEMU {}", self.pid),
            source: e,
        })?;
        Ok(ExitWatcher::new(fd))
    }

    /// Whether this `Vm` came from [`Vm::adopt`] (or was detached), rather than being our child.
    pub fn is_adopted(&self) -> bool {
        matches!(self.process, Process::Adopted)
    }

    /// Wait for QEMU's QMP socket and greet it, noticing an early exit of QEMU.
    async fn connect_qmp(&mut self) -> Result<Qmp, VmmError> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            if let Some(err) = self.exited_early(Duration::ZERO).await? {
                return Err(err);
            }
            if let Ok(stream) = crate::jail::connect_vm_socket(&self.qmp_socket).await {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                return match tokio::time::timeout(left, Qmp::handshake(stream)).await {
                    Ok(Ok(qmp)) => Ok(qmp),
                    // QEMU opens the QMP socket before it loads the kernel, so a bad kernel path
                    // shows up as QEMU hanging up on us: report its exit, not a QMP error.
                    Ok(Err(e)) => Err(self.exited_early(Duration::from_secs(2)).await?.unwrap_or(VmmError::Qmp(e))),
                    Err(_) => Err(VmmError::QmpTimeout(QMP_TIMEOUT.as_secs())),
                };
            }
            if Instant::now() > deadline {
                return Err(VmmError::QmpTimeout(QMP_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `QemuExited` if QEMU exits within `within`.
    async fn exited_early(&mut self, within: Duration) -> Result<Option<VmmError>, VmmError> {
        let exit = if within.is_zero() { self.poll_exit()? } else { self.wait(within).await? };
        Ok(exit.map(|exit| VmmError::QemuExited { status: exit.to_string(), stderr: self.qemu_stderr() }))
    }

    /// Record QEMU's exit if it has happened, without waiting.
    fn poll_exit(&mut self) -> Result<Option<Exit>, VmmError> {
        if self.exited.is_none() {
            let exit = match &mut self.process {
                Process::Spawned(child) => child
                    .try_wait()
                    .map_err(|e| VmmError::Io { what: "cannot wait for QEMU".into(), source: e })?
                    .map(Exit::Status),
                Process::Adopted => has_exited(self.pidfd.get_ref())
                    .map_err(|e| VmmError::Io { what: "cannot poll QEMU's pidfd".into(), source: e })?
                    .then_some(Exit::Unknown),
            };
            self.exited = exit;
        }
        Ok(self.exited)
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The unix socket of the agent's virtio-serial port.
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket.clone()
    }

    /// The guest's serial console, as QEMU writes it.
    pub fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    /// The directory with the VM's sockets, logs and pidfile.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The QMP session; `NotRunning` once QEMU has exited or was stopped.
    pub fn qmp(&mut self) -> Result<&mut Qmp, VmmError> {
        if self.exited.is_some() {
            return Err(VmmError::NotRunning);
        }
        self.qmp.as_mut().ok_or(VmmError::NotRunning)
    }

    /// The last lines of the guest console, for error messages.
    pub fn console_tail(&self, max_lines: usize) -> String {
        console_tail(&self.console_log, max_lines)
    }

    /// What QEMU printed on stderr (its last lines).
    pub fn qemu_stderr(&self) -> String {
        let text = tail(&self.qemu_log, 20);
        let text = text.trim();
        if text.is_empty() {
            "QEMU printed nothing".to_string()
        } else {
            text.to_string()
        }
    }

    /// Whether QEMU has exited (without waiting).
    pub fn try_exited(&mut self) -> Option<Exit> {
        self.poll_exit().ok().flatten()
    }

    /// Wait for QEMU to exit, at most `timeout`; `None` if it is still running.
    pub async fn wait(&mut self, timeout: Duration) -> Result<Option<Exit>, VmmError> {
        if let Some(exit) = self.exited {
            return Ok(Some(exit));
        }
        let exit = match &mut self.process {
            Process::Spawned(child) => match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) => Exit::Status(status),
                Ok(Err(e)) => return Err(VmmError::Io { what: "cannot wait for QEMU".into(), source: e }),
                Err(_) => return Ok(None),
            },
            Process::Adopted => match tokio::time::timeout(timeout, wait_readable(&self.pidfd)).await {
                Ok(Ok(())) => Exit::Unknown,
                Ok(Err(e)) => return Err(VmmError::Io { what: "cannot wait on QEMU's pidfd".into(), source: e }),
                Err(_) => return Ok(None),
            },
        };
        self.exited = Some(exit);
        tracing::debug!(pid = self.pid, %exit, "QEMU exited");
        Ok(Some(exit))
    }

    /// Stop QEMU: give the guest `grace` to power off by itself (the caller has usually asked the
    /// agent to), then ask QEMU to `quit`, then SIGKILL it. Always waits for the process to end
    /// (reaping it when it is our child) and removes the sockets and the pidfile. Idempotent.
    pub async fn stop(&mut self, grace: Duration) -> Result<(), VmmError> {
        if self.wait(grace).await?.is_none() {
            if let Some(qmp) = self.qmp.as_mut() {
                tracing::debug!(pid = self.pid, "guest did not power off; sending QMP quit");
                let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit", None)).await;
            }
            if self.wait(QUIT_TIMEOUT).await?.is_none() {
                tracing::warn!(pid = self.pid, "QEMU ignored quit; killing it");
                self.kill().await;
            }
        }
        self.qmp = None;
        if let Some(cap) = self.console_cap.take() {
            cap.stop().await;
        }
        self.remove_files();
        remove_cgroup(self.cgroup.take()).await;
        Ok(())
    }

    /// SIGKILL QEMU and wait until it has exited (reaping it when it is our child).
    pub async fn kill(&mut self) {
        if self.exited.is_none() {
            match &mut self.process {
                Process::Spawned(child) => {
                    // QEMU itself first: when jailed, our child is the helper, which reaps QEMU
                    // and exits as it did.
                    let _ = rustix::process::pidfd_send_signal(self.pidfd.get_ref(), rustix::process::Signal::Kill);
                    let _ = tokio::time::timeout(QUIT_TIMEOUT, wait_readable(&self.pidfd)).await;
                    let _ = child.start_kill();
                    if let Ok(status) = child.wait().await {
                        self.exited = Some(Exit::Status(status));
                    }
                }
                Process::Adopted => {
                    // Through the pidfd: even if QEMU is gone and its pid reused, nothing else
                    // can receive this signal.
                    let _ = rustix::process::pidfd_send_signal(self.pidfd.get_ref(), rustix::process::Signal::Kill);
                    if wait_readable(&self.pidfd).await.is_ok() {
                        self.exited = Some(Exit::Unknown);
                    }
                }
            }
        }
        self.qmp = None;
        if self.exited.is_some() {
            remove_cgroup(self.cgroup.take()).await;
        }
    }

    fn remove_files(&self) {
        for f in [&self.qmp_socket, &self.agent_socket, &self.pid_file] {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(cap) = &self.console_cap {
            cap.abort();
        }
        // Never block in drop: signal and let tokio's orphan reaper collect the process. An
        // adopted QEMU belongs to the sandbox, not to this handle: leave it running.
        if let Process::Spawned(child) = &mut self.process {
            if self.exited.is_none() && matches!(child.try_wait(), Ok(None)) {
                tracing::debug!(pid = self.pid, "Vm dropped while QEMU runs; killing it");
                let _ = rustix::process::pidfd_send_signal(self.pidfd.get_ref(), rustix::process::Signal::Kill);
                let _ = child.start_kill();
            }
        }
    }
}

/// QEMU's pid: our child's, or the one the jail helper reports on its stdout (the helper forks
/// QEMU into a new PID namespace). `Err(None)` when the helper ended without reporting one.
async fn qemu_pid(child: &mut Child, jailed: bool) -> Result<u32, Option<VmmError>> {
    use tokio::io::AsyncBufReadExt;
    let own = child.id().expect("a just-spawned child has a pid");
    if !jailed {
        return Ok(own);
    }
    let out = child.stdout.take().expect("the helper's stdout is piped");
    let mut line = String::new();
    // A pid is a few digits: a longer line is not the helper's.
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(out, 32));
    match tokio::time::timeout(QMP_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => line.trim().parse().map_err(|_| None),
        Ok(Err(e)) => Err(Some(VmmError::Io { what: format!("cannot read from the jail helper {own}"), source: e })),
        Err(_) => Err(Some(VmmError::QmpTimeout(QMP_TIMEOUT.as_secs()))),
    }
}

/// The `cgroup.procs` files QEMU joins before it starts, as C strings made before the fork.
fn procs_files(cgroup: Option<&SandboxCgroup>) -> Vec<std::ffi::CString> {
    use std::os::unix::ffi::OsStringExt;
    let files = cgroup.map(SandboxCgroup::procs_files).unwrap_or_default();
    // Paths made from a cgroup mount point and a checked name: no NUL byte.
    files.into_iter().filter_map(|f| std::ffi::CString::new(f.into_os_string().into_vec()).ok()).collect()
}

/// Remove a VM's cgroup once QEMU is gone (the kernel may report it busy for a moment).
async fn remove_cgroup(cgroup: Option<SandboxCgroup>) {
    if let Some(cgroup) = cgroup {
        let name = cgroup.name().to_string();
        match tokio::task::spawn_blocking(move || cgroup.remove()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %name, error = %e, "cannot remove the VM's cgroup; gc will"),
            Err(_) => {}
        }
    }
}

/// Capabilities and parameters both ends of a migration must agree on. The VM is paused, so the
/// whole stream is written at once: no bandwidth limit (QEMU's default is 32 MiB/s).
async fn prepare_migration(qmp: &mut Qmp, ram_in_file: bool) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": ram_in_file }] })),
    )
    .await?;
    qmp.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": i64::MAX / 2 }))).await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
