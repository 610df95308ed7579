//! `moat doctor`: check the host, print each check with the fix for what fails.
//!
//! Exit code: 0 all good, 1 something is broken, 2 degraded (works, but e.g. only under TCG).
//! `--smoke` boots a sandbox to prove the whole path works (`smoke.rs`); `--bundle` writes a
//! support bundle (`bundle.rs`).

mod bundle;
mod smoke;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use moat_hint::one_line;
use moat_vmm::{Accel, AccelChoice};
use serde::Serialize;

use crate::cli::{DoctorArgs, HostArgs};
use crate::cmd::runtime_config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Degraded,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Ok, detail: detail.into(), fix: None }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Free space below which sandboxes and images will soon fail to write.
const MIN_FREE_BYTES: u64 = 2 * 1024 * 1024 * 1024;

pub async fn doctor(args: DoctorArgs, host: &HostArgs) -> anyhow::Result<i32> {
    if args.smoke {
        return smoke::smoke(&args, host).await;
    }
    if let Some(sandboxes) = &args.bundle {
        return bundle::bundle(sandboxes, &args, host).await;
    }
    let checks = run_checks(host).await?;
    let worst = checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Degraded => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{tag}  {:<12} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("      {:<12} fix: {fix}", "");
            }
        }
    }
    Ok(match worst {
        Status::Ok => 0,
        Status::Fail => 1,
        Status::Degraded => 2,
    })
}

async fn run_checks(host: &HostArgs) -> anyhow::Result<Vec<Check>> {
    let config = runtime_config(host)?;
    let mut checks = Vec::new();

    // The same lookups the daemon's runtime makes, each reported on its own.
    let parts = moat_sandbox::HostParts::find(&config);
    match &parts.qemu {
        Ok((q, v)) => checks.push(Check::ok("qemu", format!("QEMU {v} at {}", q.display()))),
        Err(e) => checks.push(Check::fail("qemu", one_line(e), "moat setup (or: apt-get install qemu-system-x86)")),
    }
    checks.push(tool_check("qemu-img", "qemu-utils"));
    checks.push(tool_check("mkfs.ext4", "e2fsprogs"));
    match &parts.kernel {
        Ok(k) => checks.push(Check::ok("kernel", format!("{} ({})", k.path.display(), k.release))),
        Err(e) => checks.push(Check::fail(
            "kernel",
            one_line(e),
            "moat setup (or: apt-get install linux-image-cloud-amd64), or point MOAT_KERNEL at a kernel",
        )),
    }
    match (&parts.kernel, &parts.modules) {
        (Ok(k), Some(Ok(m))) => {
            checks.push(Check::ok("modules", format!("{} modules from {}", m.len(), k.modules_dir.display())))
        }
        (Ok(k), Some(Err(e))) => checks.push(Check::fail(
            "modules",
            one_line(e),
            format!("install the module tree of kernel {} (the linux-image package that owns it)", k.release),
        )),
        _ => {}
    }
    match &parts.agent {
        Ok(a) => checks.push(Check::ok("agent", a.display().to_string())),
        Err(e) => {
            checks.push(Check::fail("agent", one_line(e), "build it with scripts/build-agent, or set MOAT_AGENT"))
        }
    }

    checks.push(home_check(&config.home));
    checks.push(crate::cmd::state::state_check(&config.home));
    checks.push(disk_check(&config.home));

    match (&parts.qemu, &parts.kernel, &parts.modules, &parts.agent) {
        (Ok((qemu, _)), Ok(kernel), Some(Ok(modules)), Ok(agent)) => {
            let accel = moat_sandbox::initrd_and_accel(&config, qemu, kernel, agent, modules).await;
            checks.push(match accel {
                Ok((_, d)) if d.accel == Accel::Kvm => Check::ok("accel", format!("kvm ({})", d.reason)),
                Ok((_, d)) if config.accel == AccelChoice::Tcg => {
                    Check::ok("accel", format!("tcg, as configured ({})", d.reason))
                }
                Ok((_, d)) => Check {
                    name: "accel",
                    status: Status::Degraded,
                    detail: format!("tcg: {}", d.reason),
                    fix: Some(
                        "sandboxes work but boot slower; for KVM run on a host (or a VM with nested virtualization) \
                         where /dev/kvm works"
                            .into(),
                    ),
                },
                Err(e) => {
                    Check::fail("accel", one_line(&e), "fix the kvm problem, or use --accel tcg / MOAT_ACCEL=tcg")
                }
            });
        }
        _ => checks.push(Check::fail(
            "accel",
            "not probed: qemu, kernel, modules and agent are needed first",
            "fix the checks above",
        )),
    }
    checks.push(state_check(&config.home));
    checks.push(jail_check(&config));
    checks.push(cgroup_check());
    Ok(checks)
}

/// Per-sandbox limits: the cgroup version, and each controller moat limits with, usable or not.
/// Sandboxes run without the limits they cannot have, so a gap is degraded, not a failure.
/// Whether QEMU can be jailed here, found by building a jail around `/usr/bin/true`; which
/// layers a daemon of this user gets.
fn jail_check(config: &moat_sandbox::RuntimeConfig) -> Check {
    const NAME: &str = "jail";
    if !config.jail {
        return Check {
            name: NAME,
            status: Status::Degraded,
            detail: "off (MOAT_JAIL=off): QEMU runs as the daemon's user and sees the host's files".into(),
            fix: Some("unset MOAT_JAIL".into()),
        };
    }
    let jail = match moat_sandbox::jail_for(config) {
        Ok(jail) => jail,
        Err(e) => return Check::fail(NAME, one_line(&e), "build moat (`cargo build --release -p moat`)"),
    };
    let scratch = std::env::temp_dir().join(format!("moat-jail-probe-{}", std::process::id()));
    let probed = std::fs::create_dir_all(&scratch)
        .map_err(|e| e.to_string())
        .and_then(|()| moat_vmm::probe_jail(&jail, &scratch));
    let _ = std::fs::remove_dir(&scratch);
    let root = matches!(jail.ids, moat_vmm::JailIds::Range { .. });
    let layers =
        "its own mount, PID, IPC, UTS and network namespaces, a root of only its files, no capabilities, seccomp";
    match probed {
        Ok(()) if root => Check::ok(NAME, format!("each QEMU runs as a uid of its own, with {layers}")),
        Ok(()) => Check {
            name: NAME,
            status: Status::Degraded,
            detail: format!("each QEMU runs with {layers}, but as the daemon's uid (the daemon is not root)"),
            fix: Some("run the daemon as root (`sudo moat serve`) to give each QEMU a uid of its own".into()),
        },
        Err(e) if root => Check::fail(NAME, format!("QEMU cannot be jailed: {e}"), "see docs/troubleshooting.md (jail)"),
        Err(e) => Check::fail(
            NAME,
            format!("QEMU cannot be jailed without root: {e}"),
            "allow unprivileged user namespaces (`sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=10000`), \
             run the daemon as root, or set MOAT_JAIL=off to run QEMU unjailed",
        ),
    }
}

fn cgroup_check() -> Check {
    const NAME: &str = "cgroups";
    let degraded = |detail: String, fix: String| Check { name: NAME, status: Status::Degraded, detail, fix: Some(fix) };
    let host = match moat_vmm::CgroupHost::detect() {
        Ok(host) => host,
        Err(e) => {
            let fix = moat_hint::Hint::hint(&e).map(String::from);
            return degraded(
                format!("sandboxes run without limits: {}", one_line(&e)),
                fix.unwrap_or_else(|| "mount cgroup2 at /sys/fs/cgroup".into()),
            );
        }
    };
    let controllers = host.controllers();
    let usable: Vec<&str> = controllers.iter().filter(|(_, u)| u.is_ok()).map(|(name, _)| *name).collect();
    let unusable: Vec<_> = controllers.iter().filter_map(|(name, u)| u.as_ref().err().map(|u| (*name, u))).collect();
    let limited = if usable.is_empty() { "no limits".to_string() } else { format!("{} limited", usable.join(", ")) };
    if unusable.is_empty() {
        return Check::ok(NAME, format!("{}: {limited} per sandbox", host.version()));
    }
    let why: Vec<String> = unusable.iter().map(|(name, u)| format!("{name} ({})", u.reason)).collect();
    let mut fixes: Vec<&str> = Vec::new();
    for (_, u) in &unusable {
        if !fixes.contains(&u.fix.as_str()) {
            fixes.push(&u.fix);
        }
    }
    degraded(format!("{}: {limited}; not usable: {}", host.version(), why.join("; ")), fixes.join("; "))
}

/// The daemon's state database: present and sound, or what to do to recover.
fn state_check(home: &Path) -> Check {
    const NAME: &str = "state db";
    let db = moat_daemon::Db::db_path(home);
    if !db.exists() && !home.join("state.id").exists() {
        return Check::ok(NAME, "none yet (the first daemon creates it)");
    }
    match moat_daemon::Db::open(home).and_then(|d| d.list()) {
        Ok(list) => Check::ok(NAME, format!("{} ({} sandboxes)", db.display(), list.len())),
        Err(e) => Check::fail(
            NAME,
            one_line(&e).lines().next().unwrap_or_default().to_string(),
            "restore the database from a backup; or run `moat serve --reset-state`, which moves it aside \
             (kept as state.db.broken-*) and starts empty: sandboxes of the lost state are forgotten, and gc \
             kills their VMs and removes their disks",
        ),
    }
}

fn tool_check(tool: &'static str, package: &str) -> Check {
    match which(tool) {
        Some(p) => Check::ok(tool, p.display().to_string()),
        None => {
            Check::fail(tool, format!("{tool} is not on PATH"), format!("moat setup (or: apt-get install {package})"))
        }
    }
}

/// The first executable called `name` on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.mode() & 0o111 != 0).unwrap_or(false))
}

fn home_check(home: &Path) -> Check {
    const NAME: &str = "state dir";
    if let Err(e) = std::fs::create_dir_all(home) {
        return Check::fail(
            NAME,
            format!("cannot create {}: {e}", home.display()),
            "set MOAT_HOME to a directory you own",
        );
    }
    let meta = match std::fs::metadata(home) {
        Ok(m) => m,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot read {}: {e}", home.display()),
                "set MOAT_HOME to a directory you own",
            )
        }
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Check::fail(
            NAME,
            format!("{} belongs to uid {}, not to you (uid {uid})", home.display(), meta.uid()),
            format!("chown -R {uid} {} or set MOAT_HOME", home.display()),
        );
    }
    if meta.mode() & 0o002 != 0 {
        return Check::fail(
            NAME,
            format!("{} is writable by everyone", home.display()),
            format!("chmod o-w {}", home.display()),
        );
    }
    let probe = home.join(".doctor-write-test");
    match std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe)) {
        Ok(()) => Check::ok(NAME, format!("{} (mode {:o})", home.display(), meta.mode() & 0o7777)),
        Err(e) => Check::fail(
            NAME,
            format!("cannot write in {}: {e}", home.display()),
            "fix its permissions or set MOAT_HOME",
        ),
    }
}

fn disk_check(home: &Path) -> Check {
    const NAME: &str = "disk space";
    match rustix::fs::statvfs(home) {
        Ok(s) => {
            let free = s.f_bavail.saturating_mul(s.f_frsize);
            let gib = free as f64 / (1u64 << 30) as f64;
            if free < MIN_FREE_BYTES {
                Check::fail(
                    NAME,
                    format!("only {gib:.1} GiB free under {}", home.display()),
                    "free space (moat prune / moat image gc once available) or move MOAT_HOME to a larger disk",
                )
            } else {
                Check::ok(NAME, format!("{gib:.1} GiB free under {}", home.display()))
            }
        }
        Err(e) => {
            Check::fail(NAME, format!("cannot stat {}: {e}", home.display()), "set MOAT_HOME to an existing directory")
        }
    }
}
