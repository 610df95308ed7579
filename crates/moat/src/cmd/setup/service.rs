//! `moat setup --service`: the daemon as a systemd service, `/etc/systemd/system/moat.service`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::cli::SetupArgs;
use crate::error::Hinted;

/// The service's home: where root's moat keeps its state anyway.
pub const SERVICE_HOME: &str = "/var/lib/moat";
/// The unit's name.
pub const UNIT: &str = "moat.service";
/// The first systemd with `DelegateSubgroup=`.
const DELEGATE_SUBGROUP_SINCE: u32 = 254;

/// Where unit files go: `MOAT_SYSTEMD_DIR` (for tests), else /etc/systemd/system.
fn unit_dir() -> PathBuf {
    std::env::var_os("MOAT_SYSTEMD_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| "/etc/systemd/system".into(), PathBuf::from)
}

/// One word of a unit's command line: quoted when it must be, with `%` (specifiers) and `$`
/// (variables) escaped.
fn word(s: &str) -> String {
    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%").replace('$', "$$");
    if escaped.is_empty() || escaped.contains(char::is_whitespace) || escaped != s {
        format!("\"{escaped}\"")
    } else {
        escaped
    }
}

/// The unit file. `systemd` is the installed systemd's version, when known.
pub fn unit(exe: &Path, group: Option<&str>, systemd: Option<u32>) -> String {
    let mut serve = vec![word(&exe.display().to_string()), "serve".to_string()];
    if let Some(g) = group {
        serve.extend(["--group".to_string(), word(g)]);
    }
    let serve = serve.join(" ");
    // Sandboxes get their cgroups under the daemon's: cgroup v2 allows that only from a cgroup
    // holding no processes, so the daemon runs in a leaf `daemon` beside them. systemd 254 puts
    // it there itself; an older one runs a shell that moves itself there before it becomes moat.
    let (subgroup, exec) = if systemd.is_some_and(|v| v >= DELEGATE_SUBGROUP_SINCE) {
        ("DelegateSubgroup=daemon\n", format!("ExecStart={serve}\n"))
    } else {
        let leaf = "cg=/sys/fs/cgroup$$(sed -n 's/^0:://p' /proc/self/cgroup)/daemon; \
                    mkdir -p \"$$cg\" && echo $$$$ > \"$$cg/cgroup.procs\"; exec \"$$0\" \"$$@\"";
        ("", format!("ExecStart=/bin/sh -c \"{}\" {serve}\n", leaf.replace('"', "\\\"")))
    };
    format!(
        "# Installed by `moat setup --service`; `moat setup --service` again rewrites it.
[Unit]
Description=moat: sandboxes in lightweight virtual machines
After=network-online.target
Wants=network-online.target

[Service]
Type=exec
Environment=MOAT_HOME={SERVICE_HOME}
{exec}Restart=on-failure
RestartSec=2
# Sandboxes outlive the daemon on purpose: QEMU runs in its own session, and a restarted daemon
# adopts every sandbox still running (moat-daemon/src/adoption.rs). So a stop or restart ends the
# daemon alone; the default (control-group) would kill every sandbox with it.
KillMode=process
TimeoutStopSec=30
# The sandboxes' cgroups (memory, CPU, pids, I/O limits) are made under the daemon's.
Delegate=yes
{subgroup}# A sandbox killed by its own memory limit must not take the service down.
OOMPolicy=continue
# QEMU threads count against the unit; each sandbox has a pids limit of its own.
TasksMax=infinity
LimitNOFILE=1048576
# Hardening that leaves QEMU, /dev/kvm, namespaces and cgroups alone. Not ProtectSystem= or
# ProtectHome= (host directories a user mounts into a sandbox may be anywhere), not PrivateTmp=
# (they may be under /tmp), not PrivateDevices= (/dev/kvm, /dev/net/tun), not
# ProtectKernelModules= (the initramfs is built from /lib/modules), not ProtectControlGroups=.
NoNewPrivileges=yes
RestrictRealtime=yes
LockPersonality=yes
UMask=0077

[Install]
WantedBy=multi-user.target
"
    )
}

/// The installed systemd's version (`systemctl --version`: `systemd 252 (252.39-1~deb12u2)`).
fn systemd_version() -> Option<u32> {
    let out = Command::new("systemctl").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Whether systemd manages this machine (what `sd_booted` checks).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        return Err(Hinted::new(
            format!("`{program} {}` failed ({status})", args.join(" ")),
            "fix what it reported and run `moat setup --service` again",
        )
        .into());
    }
    Ok(())
}

pub fn install(args: &SetupArgs) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding the moat binary")?;
    let text = unit(&exe, args.group.as_deref(), systemd_version());
    if args.dry_run {
        print!("{text}");
        return Ok(0);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Hinted::new(
            "installing the moat service needs root",
            "run `sudo moat setup --service`; `moat setup --service --dry-run` shows the unit it writes",
        )
        .into());
    }
    if let Some(group) = &args.group {
        if moat_daemon::listen::group_id(group).is_none() {
            run("groupadd", &["--system", group])?;
            eprintln!(
                "moat: created the group {group}; add the users who may use the daemon: usermod -aG {group} USER"
            );
        }
    }
    let dir = unit_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(UNIT);
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("moat: wrote {}", path.display());
    if !systemd_running() {
        eprintln!(
            "moat: systemd does not run this machine, so the service was not started; run the daemon yourself: \
             MOAT_HOME={SERVICE_HOME} {} serve{}",
            exe.display(),
            args.group.as_deref().map(|g| format!(" --group {g}")).unwrap_or_default()
        );
        return Ok(0);
    }
    run("systemctl", &["daemon-reload"])?;
    run("systemctl", &["enable", "--now", UNIT])?;
    eprintln!(
        "moat: the daemon runs as {UNIT} (MOAT_HOME={SERVICE_HOME}); `moat daemon status` as root shows it, \
         `moat daemon logs` its journal"
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_this_binary_and_keeps_sandboxes_across_restarts() {
        let text = unit(Path::new("/usr/local/bin/moat"), Some("moat"), Some(256));
        assert!(text.contains("\nExecStart=/usr/local/bin/moat serve --group moat\n"), "{text}");
        assert!(text.contains("\nEnvironment=MOAT_HOME=/var/lib/moat\n"), "{text}");
        for line in
            ["KillMode=process", "Restart=on-failure", "Delegate=yes", "DelegateSubgroup=daemon", "OOMPolicy=continue"]
        {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("ProtectSystem") || text.contains("Not ProtectSystem"), "{text}");
    }

    #[test]
    fn an_older_systemd_gets_the_daemon_into_a_leaf_itself() {
        let text = unit(Path::new("/opt/my moat/moat"), None, Some(252));
        assert!(!text.contains("DelegateSubgroup"), "{text}");
        let exec = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert!(exec.starts_with("ExecStart=/bin/sh -c \""), "{exec}");
        assert!(exec.ends_with(" \"/opt/my moat/moat\" serve"), "{exec}");
        // systemd turns `$$` into `$`: the shell sees its own pid and arguments.
        assert!(exec.contains("echo $$$$ >") && exec.contains("exec \\\"$$0\\\" \\\"$$@\\\""), "{exec}");
    }

    #[test]
    fn words_are_quoted_and_escaped_for_systemd() {
        assert_eq!(word("/usr/bin/moat"), "/usr/bin/moat");
        assert_eq!(word("/a b/moat"), "\"/a b/moat\"");
        assert_eq!(word("100%"), "\"100%%\"");
        assert_eq!(word("$HOME"), "\"$$HOME\"");
    }
}
