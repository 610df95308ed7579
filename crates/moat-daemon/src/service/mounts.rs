//! Mounts through a sandbox's life. Volumes are plugged in (virtio-scsi) and mounted after every
//! start and restore, and unmounted and unplugged before every save, so no snapshot ever holds a
//! volume or the guest's cached view of one: a restore mounts the volume as it is on disk now.
//! Host directories are served by the daemon while the VM runs; their file calls carry paths,
//! not handles, so a restored guest simply carries on with the new server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use moat_api::{validate_mounts, ErrorCode, ForkVolumes, Mount, MountType, Phase, SandboxInfo};
use moat_sandbox::Sandbox;

use super::Service;
use crate::error::ServiceError;

/// A guest user to own what a host directory's owner owns, and a fresh volume's root.
#[derive(Debug, Clone)]
pub(crate) struct GuestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The first ordinary user of the guest's `/etc/passwd` (uid 1000 to 59999), else root: the
/// user images are made to work as (`user` in E2B's images, the one account a Dockerfile adds).
fn primary_user(passwd: &str) -> GuestUser {
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (uid, gid) = (f.get(2)?.parse::<u32>().ok()?, f.get(3)?.parse::<u32>().ok()?);
            (1000..60000).contains(&uid).then(|| GuestUser { name: f[0].to_string(), uid, gid })
        })
        .min_by_key(|u| u.uid)
        .unwrap_or(GuestUser { name: "root".into(), uid: 0, gid: 0 })
}

/// Each fork's volume mounts, and the copies (volume, copy) to make for them.
type ForkMounts = (Vec<Vec<Mount>>, Vec<(String, String)>);

/// Host-directory servers of running sandboxes, by sandbox id; aborted when the VM goes.
#[derive(Default)]
pub(crate) struct HostServers(std::sync::Mutex<HashMap<String, Vec<tokio::task::AbortHandle>>>);

impl HostServers {
    fn add(&self, id: &str, task: tokio::task::AbortHandle) {
        self.0.lock().expect("no panics while held").entry(id.to_string()).or_default().push(task);
    }

    /// Stop serving `id`'s host directories (its VM is gone or going).
    pub(crate) fn stop(&self, id: &str) {
        for task in self.0.lock().expect("no panics while held").remove(id).unwrap_or_default() {
            task.abort();
        }
    }
}

impl Service {
    /// A create's mounts, checked against the host: volumes exist, host directories are
    /// directories (made absolute and free of symlinks, so the record says what is served).
    pub(crate) fn resolve_mounts(&self, mounts: &[Mount]) -> Result<Vec<Mount>, ServiceError> {
        validate_mounts(mounts).map_err(ServiceError::invalid)?;
        mounts
            .iter()
            .map(|m| match m.kind {
                MountType::Volume => {
                    let volume = self.volume(&m.source)?;
                    Ok(Mount { source: volume.name, ..m.clone() })
                }
                MountType::Host => {
                    let dir = std::fs::canonicalize(&m.source).map_err(|e| {
                        ServiceError::new(
                            ErrorCode::InvalidRequest,
                            format!("host directory {}: {e}", m.source),
                            "name an existing directory the daemon can read",
                        )
                    })?;
                    if !dir.is_dir() {
                        return Err(ServiceError::new(
                            ErrorCode::InvalidRequest,
                            format!("{} is not a directory", dir.display()),
                            "mount a directory; copy single files in with `moat cp`",
                        ));
                    }
                    Ok(Mount { source: dir.to_string_lossy().into_owned(), ..m.clone() })
                }
            })
            .collect()
    }

    /// Refuse a read-write volume another live sandbox has, or one this sandbox would have
    /// read-write while others have it at all.
    pub(crate) fn check_volume_free(&self, id: &str, mount: &Mount) -> Result<(), ServiceError> {
        if mount.kind != MountType::Volume {
            return Ok(());
        }
        let holders = self
            .db(|db| db.list())?
            .into_iter()
            .filter(|s| s.id != id && matches!(s.phase, Phase::Booting | Phase::Running | Phase::Stopping));
        for other in holders {
            if let Some(theirs) = other.mounts.iter().find(|o| o.kind == MountType::Volume && o.source == mount.source)
            {
                if !(mount.readonly && theirs.readonly) {
                    return Err(ServiceError::new(
                        ErrorCode::InUse,
                        format!(
                            "volume {} is mounted {} in running sandbox {}",
                            mount.source,
                            if theirs.readonly { "read-only" } else { "read-write" },
                            other.name
                        ),
                        "a read-write volume is in one running sandbox at a time: stop that sandbox, mount it \
                         read-only (`:ro`) in both, or fork with `--volumes copy`",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The guest's primary user, read from its `/etc/passwd`.
    async fn guest_user(&self, sandbox: &Sandbox) -> GuestUser {
        let passwd = async {
            let read = sandbox.file_stream(moat_proto::Request::ReadFile { path: "/etc/passwd".into() }).await.ok()?;
            let (out, _, status) =
                tokio::time::timeout(std::time::Duration::from_secs(10), read.collect()).await.ok()?.ok()?;
            // A passwd file is kilobytes; a guest that sends more gets root.
            (status.code == Some(0) && out.len() <= 1 << 20).then(|| String::from_utf8_lossy(&out).into_owned())
        }
        .await;
        primary_user(passwd.as_deref().unwrap_or(""))
    }

    /// Plug in and mount `info`'s volumes and serve its host directories in its running VM.
    /// On failure what was attached stays for the caller's stop to clear.
    pub(crate) async fn attach_mounts(&self, info: &SandboxInfo, sandbox: &Arc<Sandbox>) -> Result<(), ServiceError> {
        if info.mounts.is_empty() {
            return Ok(());
        }
        let user = self.guest_user(sandbox).await;
        for (slot, mount) in info.mounts.iter().enumerate() {
            match mount.kind {
                MountType::Volume => self.plug(info, sandbox, slot, mount, &user).await?,
                MountType::Host => self.serve_host_dir(info, sandbox, mount, &user).await?,
            }
        }
        Ok(())
    }

    /// Serve `info`'s host directories again in a VM an earlier daemon started (its volumes
    /// stayed plugged in and mounted).
    pub(crate) async fn serve_host_dirs(&self, info: &SandboxInfo, sandbox: &Arc<Sandbox>) -> Result<(), ServiceError> {
        if !info.mounts.iter().any(|m| m.kind == MountType::Host) {
            return Ok(());
        }
        let user = self.guest_user(sandbox).await;
        for mount in info.mounts.iter().filter(|m| m.kind == MountType::Host) {
            self.serve_host_dir(info, sandbox, mount, &user).await?;
        }
        Ok(())
    }

    async fn plug(
        &self,
        info: &SandboxInfo,
        sandbox: &Arc<Sandbox>,
        slot: usize,
        mount: &Mount,
        user: &GuestUser,
    ) -> Result<(), ServiceError> {
        // One check-and-plug at a time, so two starts cannot both take a read-write volume.
        let _claiming = self.volume_claims.lock().await;
        self.check_volume_free(&info.id, mount)?;
        let (_, file) = self.open_volume(&mount.source, mount.readonly)?;
        sandbox
            .plug_volume(slot as u8, file, &mount.target, mount.readonly, Some(&user.name))
            .await
            .map_err(|e| mount_error(mount, e.into()))
    }

    async fn serve_host_dir(
        &self,
        info: &SandboxInfo,
        sandbox: &Arc<Sandbox>,
        mount: &Mount,
        user: &GuestUser,
    ) -> Result<(), ServiceError> {
        let opts = moat_hostfs::Options { readonly: mount.readonly, guest_uid: user.uid, guest_gid: user.gid };
        let server = moat_hostfs::Server::open(Path::new(&mount.source), opts).map_err(|e| {
            ServiceError::new(
                ErrorCode::InvalidRequest,
                format!("host directory {}: {e}", mount.source),
                "name an existing directory the daemon can read",
            )
        })?;
        let serving = moat_sandbox::host_mount::open(sandbox, &mount.target, mount.readonly)
            .await
            .map_err(|e| mount_error(mount, e.into()))?;
        let (id, target) = (info.id.clone(), mount.target.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = serving.run(Arc::new(server)).await {
                tracing::warn!(sandbox = %id, target = %target, error = %e, "serving a host directory ended");
            }
        });
        self.host_servers.add(&info.id, task.abort_handle());
        Ok(())
    }

    /// Unmount and unplug `info`'s plugged volumes before its VM is saved: the save must hold
    /// none. Returns the slots unplugged, for [`Service::replug_volumes`] after the save.
    pub(crate) async fn unplug_volumes(
        &self,
        info: &SandboxInfo,
        sandbox: &Arc<Sandbox>,
    ) -> Result<Vec<usize>, ServiceError> {
        let plugged = sandbox.plugged_volumes().await.map_err(ServiceError::from)?;
        let mut done = Vec::new();
        for (slot, mount) in info.mounts.iter().enumerate() {
            if mount.kind != MountType::Volume || !plugged.contains(&(slot as u8)) {
                continue;
            }
            if let Err(e) = sandbox.unplug_volume(slot as u8, &mount.target).await {
                let e = ServiceError::from(e);
                // What was unplugged goes back in, so the sandbox runs on as it was.
                let _ = self.replug_volumes(info, sandbox, &done).await;
                return Err(ServiceError::new(
                    e.code,
                    format!("cannot unmount volume {} at {}: {}", mount.source, mount.target, e.message),
                    "volumes are unmounted for a snapshot, fork or pause; end the processes using it and try again",
                ));
            }
            done.push(slot);
        }
        Ok(done)
    }

    /// Plug in and mount again the volumes in `slots` after a save.
    pub(crate) async fn replug_volumes(
        &self,
        info: &SandboxInfo,
        sandbox: &Arc<Sandbox>,
        slots: &[usize],
    ) -> Result<(), ServiceError> {
        if slots.is_empty() {
            return Ok(());
        }
        let user = self.guest_user(sandbox).await;
        for &slot in slots {
            let Some(mount) = info.mounts.get(slot) else { continue };
            let (_, file) = self.open_volume(&mount.source, mount.readonly)?;
            sandbox
                .plug_volume(slot as u8, file, &mount.target, mount.readonly, Some(&user.name))
                .await
                .map_err(|e| mount_error(mount, e.into()))?;
        }
        Ok(())
    }
}

impl Service {
    /// The volume mounts of each of `names` forked from `info`, and the volume copies to make
    /// (volume, copy). Host directories come with the snapshot.
    pub(crate) fn fork_volumes(
        &self,
        info: &SandboxInfo,
        names: &[String],
        how: ForkVolumes,
    ) -> Result<ForkMounts, ServiceError> {
        let volumes: Vec<&Mount> = info.mounts.iter().filter(|m| m.kind == MountType::Volume).collect();
        if let Some(rw) = volumes.iter().find(|m| !m.readonly).filter(|_| how == ForkVolumes::Refuse) {
            return Err(ServiceError::new(
                ErrorCode::InUse,
                format!("sandbox {} has volume {} mounted read-write at {}", info.name, rw.source, rw.target),
                "a read-write volume is in one running sandbox at a time: fork with `--volumes copy` to give each \
                 fork its own copy, or mount the volume read-only",
            ));
        }
        let mut copies = Vec::new();
        let mut per_fork = Vec::new();
        for name in names {
            let mut mounts = Vec::new();
            for m in &volumes {
                if m.readonly {
                    mounts.push((*m).clone());
                    continue;
                }
                let copy = format!("{name}-{}", m.source);
                moat_api::validate_name(&copy).map_err(|e| {
                    ServiceError::invalid(format!("the copy of volume {} for fork {name}: {e}", m.source))
                })?;
                if self.volume(&copy).is_ok() {
                    return Err(ServiceError::new(
                        ErrorCode::NameTaken,
                        format!("volume {copy} already exists"),
                        "remove it (`moat volume rm`), or choose another --name-prefix",
                    ));
                }
                copies.push((m.source.clone(), copy.clone()));
                mounts.push(Mount { source: copy, ..(*m).clone() });
            }
            per_fork.push(mounts);
        }
        Ok((per_fork, copies))
    }
}

fn mount_error(mount: &Mount, e: ServiceError) -> ServiceError {
    let what = match mount.kind {
        MountType::Volume => format!("volume {}", mount.source),
        MountType::Host => format!("host directory {}", mount.source),
    };
    ServiceError::new(e.code, format!("mounting {what} at {} failed: {}", mount.target, e.message), e.hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_user_is_the_first_ordinary_account() {
        let passwd = "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n\
                      dev:x:1001:1001::/home/dev:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n";
        let u = primary_user(passwd);
        assert_eq!((u.name.as_str(), u.uid, u.gid), ("user", 1000, 1000));
        let u = primary_user("root:x:0:0::/root:/bin/sh\nbroken:line\n:::\n");
        assert_eq!((u.name.as_str(), u.uid), ("root", 0));
    }
}
