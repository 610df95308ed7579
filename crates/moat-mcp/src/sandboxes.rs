//! Tools for sandboxes themselves: create, list, info, stop, start, destroy, snapshot, revert,
//! fork and the console log.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use moat_api::{CreateSandbox, Fork, LogSource, OnExpire, SandboxInfo};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use crate::error::{Checked, ToolError, ToolResult};
use crate::policy::Policy;
use crate::server::{now_secs, MoatMcp};

/// A sandbox as a tool shows it.
pub(crate) fn view(info: &SandboxInfo, owned: bool) -> serde_json::Value {
    json!({
        "name": info.name,
        "id": info.id,
        "phase": info.phase,
        "image": info.image,
        "cpus": info.vcpus,
        "memory_mib": info.memory_mib,
        "disk_mib": info.disk_mib,
        "hostname": info.hostname,
        "accel": info.accel,
        "expires_in_secs": info.expires_at.map(|e| (e - now_secs()).max(0)),
        "owned_by_this_session": owned,
        // It may carry the guest's console: no terminal controls for whoever displays it.
        "last_error": info.last_error.as_deref().map(moat_api::escape_controls),
    })
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON values always serialize")
}

fn duration(field: &str, s: &str) -> Result<Duration, ToolError> {
    moat_api::parse_duration(s).map_err(|e| ToolError::invalid(format!("{field}: {e}")))
}

/// Hold `n` sandboxes of the session's limit while they are made.
struct Reservation<'a>(&'a MoatMcp, usize);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.session().owned().pending -= self.1;
    }
}

impl MoatMcp {
    async fn reserve(&self, n: usize) -> Result<Reservation<'_>, ToolError> {
        let live = self.live_owned().await?;
        let mut owned = self.session().owned();
        self.session().check_room(&self.policy, live + owned.pending, n)?;
        owned.pending += n;
        Ok(Reservation(self, n))
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    /// Name for the sandbox (letters, digits, `-`, `_`, `.`; unique). Default: a generated name.
    #[serde(default)]
    pub name: Option<String>,
    /// Image to boot: "default" (Debian with Python 3, pip, curl), "minimal" (busybox only), a
    /// name from the image store, or a registry reference such as "python:3.12-slim" (pulled
    /// on first use, which can take minutes). Default: the server's default image.
    #[serde(default)]
    pub image: Option<String>,
    /// Virtual CPUs. Default 1; at most the server's limit (4 unless the operator changed it).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory in MiB. Default 512; at most the server's limit (4096 unless the operator changed it).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Root disk size in MiB. Default 4096; at most the server's limit (20480 unless the operator
    /// changed it).
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Remove the sandbox after it has not been used by any tool for this long, e.g. "30m",
    /// "2h". Every tool call on the sandbox restarts the clock. Default: the server's (1h).
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Continue from a snapshot instead of booting: "SANDBOX:SNAPSHOT" as sandbox_snapshot
    /// returned it (a snapshot of one of this session's sandboxes). Image and sizes are the
    /// snapshot's.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Network: "default" (the public internet; private, loopback and cloud-metadata addresses are
    /// refused), "none" (no network device at all) or "allow" (only the hostnames in
    /// allow_hosts). Default: "default" (or the snapshot's with from_snapshot).
    #[serde(default)]
    pub network: Option<String>,
    /// With network "allow": the reachable hostnames, e.g. ["pypi.org", "*.pythonhosted.org"].
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Host ports forwarded to the sandbox, "[ADDR:]HOSTPORT:GUESTPORT", e.g. ["8080:80"] (host
    /// port 0 picks a free one; sandbox_ports lists what was picked). The address defaults to
    /// 127.0.0.1; others than loopback only where the operator allows them.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Mounts, "SOURCE:/path" or "SOURCE:/path:ro": a volume by name (made with `moat volume
    /// create`; a read-write one is in one running sandbox at a time), or a host directory
    /// ("./dir" or an absolute path), only under the directory the operator allowed.
    #[serde(default)]
    pub mounts: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Hostnames to add to the allowlist (sandboxes created with network "allow" only).
    #[serde(default)]
    pub allow_add: Vec<String>,
    /// Hostnames to remove from the allowlist.
    #[serde(default)]
    pub allow_remove: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortsParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Forward a host port: "[ADDR:]HOSTPORT:GUESTPORT", e.g. "8080:80" or "0:8000" (any free
    /// host port). The address defaults to 127.0.0.1; others than loopback only where the
    /// operator allows them.
    #[serde(default)]
    pub add: Option<String>,
    /// Stop forwarding this host port.
    #[serde(default)]
    pub remove: Option<u16>,
}

/// The mounts of a create request: host directories must lie (symlinks followed) under the
/// operator's `--host-dir`.
fn mounts(p: &CreateParams, policy: &Policy) -> Result<Vec<moat_api::Mount>, ToolError> {
    let root = match &policy.host_files {
        crate::policy::HostFiles::Under(root) => root.clone(),
        crate::policy::HostFiles::Off => std::path::PathBuf::from("/"),
    };
    p.mounts
        .iter()
        .map(|spec| {
            let mut m = moat_api::Mount::parse(spec, &root).map_err(|e| ToolError::invalid(format!("mounts: {e}")))?;
            if m.kind == moat_api::MountType::Host {
                let given = spec.split(':').next().unwrap_or_default();
                let path = policy.host_files.resolve(given, policy.flags)?;
                // The mount follows a final symlink, so it must stay inside too.
                let dir = Path::new(&path)
                    .canonicalize()
                    .map_err(|e| ToolError::invalid(format!("mounts: host directory {given}: {e}")))?;
                policy.host_files.resolve(&dir.to_string_lossy(), policy.flags)?;
                m.source = dir.to_string_lossy().into_owned();
            }
            Ok(m)
        })
        .collect()
}

/// The network part of a create request, from the tool's arguments.
fn net_spec(p: &CreateParams, policy: &Policy) -> Result<Option<moat_api::NetSpec>, ToolError> {
    if p.network.is_none() && p.allow_hosts.is_empty() && p.ports.is_empty() {
        return Ok(None);
    }
    let mode = match p.network.as_deref() {
        None | Some("default") => moat_api::NetMode::Default,
        Some("none") => moat_api::NetMode::None,
        Some("allow") => moat_api::NetMode::Allow,
        Some(other) => {
            return Err(ToolError::invalid(format!("network: {other:?} is not a mode; use default, none or allow")))
        }
    };
    let ports = p
        .ports
        .iter()
        .map(|s| {
            let forward = moat_api::PortForward::parse(s).map_err(|e| ToolError::invalid(format!("ports: {e}")))?;
            policy.check_forward(&forward)?;
            Ok(forward)
        })
        .collect::<Result<Vec<_>, ToolError>>()?;
    Ok(Some(moat_api::NetSpec { mode, allow: p.allow_hosts.clone(), ports, ..Default::default() }))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxParams {
    /// The sandbox's name or id (from sandbox_create or sandbox_list).
    pub sandbox: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// Name of the snapshot, unique within the sandbox. Default: "snap-N".
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// One of the sandbox's snapshots, by the name given to sandbox_snapshot.
    pub snapshot: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkParams {
    /// The sandbox to fork (it keeps running).
    pub sandbox: String,
    /// How many copies, 1 to 16. Default 1.
    #[serde(default)]
    pub count: Option<u32>,
    /// The copies are named PREFIX1, PREFIX2, ... Default: "<sandbox>-fork-".
    #[serde(default)]
    pub name_prefix: Option<String>,
    /// Fork from this snapshot of the sandbox instead of its current state.
    #[serde(default)]
    pub snapshot: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsParams {
    /// The sandbox's name or id.
    pub sandbox: String,
    /// How many of the last lines to return. Default 100.
    #[serde(default)]
    pub lines: Option<usize>,
}

#[tool_router(router = sandbox_tools, vis = "pub(crate)")]
impl MoatMcp {
    #[tool(
        description = "Create a sandbox: a fresh Linux microVM with its own kernel, filesystem and processes. \
Returns its name and details; pass the name as `sandbox` to the other tools. Usually takes well under a minute; \
the first use of an image can take minutes while it is built or pulled. The sandbox belongs to this session and \
is removed when the session ends or after idle_timeout without use.",
        annotations(
            title = "Create sandbox",
            read_only_hint = false,
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn sandbox_create(&self, Parameters(Checked(p)): Parameters<Checked<CreateParams>>) -> ToolResult {
        let ttl = match &p.idle_timeout {
            Some(t) => duration("idle_timeout", t)?,
            None => self.policy.idle_ttl,
        };
        if let Some(name) = &p.name {
            moat_api::validate_name(name).map_err(ToolError::invalid)?;
        }
        let net = net_spec(&p, &self.policy)?;
        // Only snapshots of this session's sandboxes, or templates; the daemon gets the exact id.
        let from = match &p.from_snapshot {
            Some(reference) => {
                let s = self.usable_snapshot(reference).await?;
                self.policy.check_size(Some(s.vcpus), Some(s.memory_mib), Some(s.disk_mib))?;
                Some(s.id)
            }
            None => {
                self.policy.check_size(p.cpus, p.memory_mib, p.disk_mib)?;
                None
            }
        };
        let mounts = mounts(&p, &self.policy)?;
        let _slot = self.reserve(1).await?;
        // A missing image is pulled or built by the daemon on create.
        let image = p.image.clone().unwrap_or_else(|| self.policy.default_image.clone());
        let req = CreateSandbox {
            name: p.name,
            image: from.is_none().then_some(image),
            vcpus: p.cpus,
            memory_mib: p.memory_mib,
            disk_mib: p.disk_mib,
            ttl_secs: Some(ttl.as_secs().max(1)),
            on_expire: Some(OnExpire::Remove),
            from,
            net,
            mounts,
            ..CreateSandbox::default()
        };
        let info = self.client.create(&req).await?;
        self.session().owned().add(&info.id, ttl);
        Ok(pretty(&view(&info, true)))
    }

    #[tool(
        description = "List the sandboxes this session can use, with their phase (running, stopped, ...), image and size.",
        annotations(title = "List sandboxes", read_only_hint = true, open_world_hint = false)
    )]
    async fn sandbox_list(&self) -> ToolResult {
        let all = self.client.list().await?;
        let list: Vec<_> = all
            .iter()
            .filter_map(|s| {
                let owned = self.owns(&s.id);
                (owned || self.policy.all_sandboxes).then(|| view(s, owned))
            })
            .collect();
        if list.is_empty() {
            return Ok("no sandboxes yet; create one with sandbox_create".into());
        }
        Ok(pretty(&json!(list)))
    }

    #[tool(
        description = "Everything about one sandbox: phase, image, sizes, when it expires, its snapshots and its background processes.",
        annotations(title = "Sandbox info", read_only_hint = true, open_world_hint = false)
    )]
    async fn sandbox_info(&self, Parameters(Checked(p)): Parameters<Checked<SandboxParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let mut v = view(&info, self.owns(&info.id));
        let snapshots = self.client.snapshots(Some(&info.id)).await?;
        v["snapshots"] =
            json!(snapshots.iter().map(|s| json!({"name": s.name, "reference": s.reference()})).collect::<Vec<_>>());
        if info.phase == moat_api::Phase::Running {
            let jobs = self.client.processes(&info.id).await?;
            v["background_processes"] = json!(jobs
                .iter()
                .map(|j| json!({"pid": j.pid, "command": j.argv.join(" "), "running": j.exit.is_none()}))
                .collect::<Vec<_>>());
        }
        Ok(pretty(&v))
    }

    #[tool(
        description = "Stop a running sandbox: its VM shuts down, its disk is kept, and sandbox_start boots it again \
(running processes and memory are lost; use sandbox_snapshot to keep them).",
        annotations(title = "Stop sandbox", destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn sandbox_stop(&self, Parameters(Checked(p)): Parameters<Checked<SandboxParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let info = self.client.stop(&info.id).await?;
        Ok(format!("stopped {}; sandbox_start boots it again from its disk", info.name))
    }

    #[tool(
        description = "Pause a running sandbox: its whole machine (memory, running processes, disk) is saved to \
the host's disk and the VM ends, so it holds no memory or CPU. sandbox_start continues it exactly where it was.",
        annotations(
            title = "Pause sandbox",
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_pause(&self, Parameters(Checked(p)): Parameters<Checked<SandboxParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let info = self.client.pause(&info.id).await?;
        Ok(format!("paused {}; sandbox_start continues it where it was", info.name))
    }

    #[tool(
        description = "Start a stopped sandbox again from its disk, or continue a paused one where it was.",
        annotations(
            title = "Start sandbox",
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_start(&self, Parameters(Checked(p)): Parameters<Checked<SandboxParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let info = self.client.start(&info.id).await?;
        Ok(pretty(&view(&info, self.owns(&info.id))))
    }

    #[tool(
        description = "Destroy a sandbox: stop its VM and delete it with its disk. Its snapshots that no other sandbox uses go too.",
        annotations(
            title = "Destroy sandbox",
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_destroy(&self, Parameters(Checked(p)): Parameters<Checked<SandboxParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        self.client.remove(&info.id, true).await?;
        self.session().owned().remove(&info.id);
        Ok(format!("destroyed {}", info.name))
    }

    #[tool(
        description = "Snapshot a running sandbox: its memory, running processes and disk, saved under a name. \
The sandbox runs on after a short pause. sandbox_revert goes back to it; sandbox_fork and sandbox_create \
(from_snapshot) start new sandboxes from it.",
        annotations(title = "Snapshot sandbox", destructive_hint = false, open_world_hint = false)
    )]
    async fn sandbox_snapshot(&self, Parameters(Checked(p)): Parameters<Checked<SnapshotParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let snap = self.client.snapshot(&info.id, p.name).await?;
        Ok(pretty(&json!({
            "snapshot": snap.name,
            "reference": snap.reference(),
            "id": snap.id,
            "size_bytes": snap.size_bytes,
            "use": format!("sandbox_revert with snapshot {:?}, or sandbox_create with from_snapshot {:?}", snap.name, snap.reference()),
        })))
    }

    #[tool(
        description = "Show a sandbox's network (mode, allowlist, port forwards; secrets by name only), or change \
the allowlist of a sandbox created with network \"allow\": new connections and DNS lookups follow at once. \
A connection the policy refuses fails in the sandbox as \"connection refused\" (a name off the allowlist does \
not resolve).",
        annotations(title = "Sandbox network", destructive_hint = false, open_world_hint = false)
    )]
    async fn sandbox_network(&self, Parameters(Checked(p)): Parameters<Checked<NetworkParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let net = if p.allow_add.is_empty() && p.allow_remove.is_empty() {
            self.client.net(&info.id).await?
        } else {
            let change = moat_api::ChangeAllowlist { add: p.allow_add, remove: p.allow_remove };
            self.client.change_allowlist(&info.id, &change).await?
        };
        Ok(pretty(&json!(net)))
    }

    #[tool(
        description = "Forward a host port to a port of a running sandbox (add), stop one (remove), or list them \
(neither). The service in the sandbox must listen on 0.0.0.0, not only on 127.0.0.1. Answers \
\"ADDR:HOSTPORT -> GUESTPORT\" lines; connect to ADDR:HOSTPORT on the host.",
        annotations(title = "Sandbox port forwards", destructive_hint = false, open_world_hint = false)
    )]
    async fn sandbox_ports(&self, Parameters(Checked(p)): Parameters<Checked<PortsParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let ports = match (p.add, p.remove) {
            (Some(_), Some(_)) => return Err(ToolError::invalid("give add or remove, not both")),
            (Some(add), None) => {
                let forward =
                    moat_api::PortForward::parse(&add).map_err(|e| ToolError::invalid(format!("add: {e}")))?;
                self.policy.check_forward(&forward)?;
                vec![self.client.add_port(&info.id, &forward).await?]
            }
            (None, Some(port)) => self.client.remove_port(&info.id, port).await?.ports,
            (None, None) => self.client.ports(&info.id).await?,
        };
        Ok(ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))
    }

    #[tool(
        description = "Put a sandbox back to one of its snapshots: memory, processes and files exactly as they were \
when the snapshot was taken. Everything since is lost.",
        annotations(
            title = "Revert sandbox",
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn sandbox_revert(&self, Parameters(Checked(p)): Parameters<Checked<RevertParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let snapshot = self.snapshot_of(&info, &p.snapshot).await?;
        let info = self.client.revert(&info.id, &snapshot.id).await?;
        Ok(format!("{} is back at snapshot {}", info.name, p.snapshot))
    }

    #[tool(
        description = "Fork a running sandbox into new sandboxes that continue from its current state (or from one of \
its snapshots): same files, same running processes, each with its own hostname and randomness. Use it to try \
several approaches side by side. The forks belong to this session.",
        annotations(title = "Fork sandbox", destructive_hint = false, open_world_hint = false)
    )]
    async fn sandbox_fork(&self, Parameters(Checked(p)): Parameters<Checked<ForkParams>>) -> ToolResult {
        let count = p.count.unwrap_or(1);
        if !(1..=16).contains(&count) {
            return Err(ToolError::invalid(format!("count is {count}; fork 1 to 16 sandboxes at a time")));
        }
        let info = self.sandbox(&p.sandbox).await?;
        let snapshot = match &p.snapshot {
            Some(reference) => Some(self.snapshot_of(&info, reference).await?.id),
            None => None,
        };
        let _slots = self.reserve(count as usize).await?;
        let req = Fork { count: Some(count), name_prefix: p.name_prefix, snapshot, volumes: None };
        let forked = self.client.fork(&info.id, &req).await?;
        // Forks of a sandbox the session owns inherit its idle timeout.
        let ttl = self.session().owned().ttl(&info.id).unwrap_or(self.policy.idle_ttl);
        let mut sandboxes = Vec::new();
        for s in forked.sandboxes {
            self.session().owned().add(&s.id, ttl);
            // The daemon gives forks no lease of their own: give them the idle timeout.
            let s = self.client.renew(&s.id, ttl.as_secs().max(1)).await.unwrap_or(s);
            sandboxes.push(view(&s, true));
        }
        Ok(pretty(&json!({ "from_snapshot": forked.snapshot.reference(), "sandboxes": sandboxes })))
    }

    #[tool(
        description = "The end of a sandbox's console log: kernel and guest agent messages. Useful when a sandbox \
failed to start or behaves oddly; command output comes from sandbox_exec instead.",
        annotations(title = "Sandbox logs", read_only_hint = true, open_world_hint = false)
    )]
    async fn sandbox_logs(&self, Parameters(Checked(p)): Parameters<Checked<LogsParams>>) -> ToolResult {
        let info = self.sandbox(&p.sandbox).await?;
        let lines = p.lines.unwrap_or(100).clamp(1, 10_000);
        let mut stream = Box::pin(self.client.logs(&info.id, LogSource::Console, false).await?);
        // Keep only the end: the console of a long-lived sandbox can be large.
        let keep = self.policy.max_output;
        let mut tail: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            tail.extend_from_slice(&chunk?);
            if tail.len() > 2 * keep {
                tail.drain(..tail.len() - keep);
            }
        }
        // The guest wrote it: no terminal controls for whoever displays the answer.
        let text = String::from_utf8_lossy(&tail[tail.len().saturating_sub(keep)..]);
        let text = moat_api::escape_controls(&text);
        let all: Vec<&str> = text.lines().collect();
        let out = all[all.len().saturating_sub(lines)..].join("\n");
        Ok(if out.is_empty() { "(the console log is empty)".into() } else { out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Flags, HostFiles};

    fn params(mounts: &[&str]) -> CreateParams {
        serde_json::from_value(json!({ "mounts": mounts })).expect("valid parameters")
    }

    /// Volumes mount as asked; host directories only under the operator's `--host-dir`, with
    /// symlinks followed before the check.
    #[test]
    fn host_directory_mounts_stay_under_the_allowed_directory() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().canonicalize().unwrap();
        std::fs::create_dir(r.join("src")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("escape")).unwrap();
        let allowed = Policy { host_files: HostFiles::Under(r.clone()), ..Policy::default() };
        let got = mounts(&params(&["work:/work:ro", "./src:/src"]), &allowed).unwrap();
        assert_eq!(got[0].kind, moat_api::MountType::Volume);
        assert!(got[0].readonly);
        assert_eq!(got[1].source, r.join("src").display().to_string());
        for bad in ["./escape:/x", "/etc:/x", "../:/x", "./missing:/x"] {
            assert!(mounts(&params(&[bad]), &allowed).is_err(), "{bad}");
        }
        let off = Policy { host_files: HostFiles::Off, flags: Flags::Daemon, ..Policy::default() };
        let e = mounts(&params(&["./src:/src"]), &off).unwrap_err();
        assert!(format!("{e:?}").contains("host-dir"), "{e:?}");
        assert!(mounts(&params(&["work:/work"]), &off).is_ok(), "volumes need no host directory");
    }
}
