//! `moat cp`: copy files and directory trees between the host and a sandbox, with `docker cp`
//! semantics. Trees travel as tar streams (modes, mtimes and symlinks kept; symlinks never
//! followed), and nothing is held in memory whole.
//!
//! Where the copy lands, for `cp SRC DEST`:
//! - DEST is an existing directory: SRC goes inside it, under its own name (`SRC/.` copies what
//!   is inside SRC instead).
//! - DEST exists and is a file: a file SRC replaces it; a directory SRC is an error.
//! - DEST does not exist: SRC is copied as DEST (its parent must exist; a DEST ending in `/` must
//!   be an existing directory).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use moat_api::FileKind;
use moat_client::Client;

use crate::cli::{CpArgs, HostArgs};
use crate::cmd::daemon::connect;

/// One side of a copy: a host path, or a path in a sandbox (`box:/path`).
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Host(String),
    Sandbox { sandbox: String, path: String },
}

fn side(arg: &str) -> Side {
    // `box:/p` names a sandbox; a host path with a colon needs a slash before it (`./a:b`).
    match arg.split_once(':') {
        Some((sandbox, path)) if !sandbox.is_empty() && !sandbox.contains('/') => {
            Side::Sandbox { sandbox: sandbox.to_string(), path: path.to_string() }
        }
        _ => Side::Host(arg.to_string()),
    }
}

/// Where an archive is unpacked and the name its top entry gets; `None` for `SRC/.`.
#[derive(Debug)]
struct Placement {
    dir: String,
    name: Option<String>,
}

/// The last path component, `None` for `SRC/.` (copy the contents).
fn source_name(path: &str) -> anyhow::Result<Option<String>> {
    if path.ends_with("/.") || path == "." {
        return Ok(None);
    }
    match Path::new(path.trim_end_matches('/')).file_name() {
        Some(n) => Ok(Some(n.to_string_lossy().into_owned())),
        None => bail!("{path:?} names no file\nhint: give a file or directory, or `DIR/.` for what is inside DIR"),
    }
}

/// Decide the placement from what the destination is (`dest_kind`: `None` if it does not exist).
fn place(src: &str, src_is_dir: bool, dest: &str, dest_kind: Option<FileKind>) -> anyhow::Result<Placement> {
    let name = source_name(src)?;
    match dest_kind {
        Some(FileKind::Dir) => Ok(Placement { dir: dest.to_string(), name }),
        Some(_) if src_is_dir => {
            bail!("cannot copy the directory {src} onto the file {dest}\nhint: give a directory as the destination")
        }
        Some(_) | None => {
            if dest.ends_with('/') {
                bail!("the directory {dest} does not exist\nhint: create it first, or drop the trailing `/` to copy as that name");
            }
            let dest_path = Path::new(dest);
            let parent = dest_path.parent().map(|p| p.to_string_lossy().into_owned()).filter(|p| !p.is_empty());
            let new_name = dest_path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_none() && dest_kind.is_none() {
                // `SRC/.` to a new DEST: DEST becomes a copy of SRC's contents.
                return Ok(Placement { dir: String::new(), name: Some(dest.to_string()) });
            }
            Ok(Placement { dir: parent.unwrap_or_else(|| ".".into()), name: new_name })
        }
    }
}

pub async fn cp(args: CpArgs, host: &HostArgs) -> anyhow::Result<i32> {
    match (side(&args.src), side(&args.dest)) {
        (Side::Host(src), Side::Sandbox { sandbox, path }) => {
            let client = connect(host).await?;
            to_sandbox(&client, &src, &sandbox, &path).await?;
        }
        (Side::Sandbox { sandbox, path }, Side::Host(dest)) => {
            let client = connect(host).await?;
            from_sandbox(&client, &sandbox, &path, &dest).await?;
        }
        (Side::Host(_), Side::Host(_)) => {
            bail!("neither side is in a sandbox\nhint: write the sandbox side as BOX:PATH, e.g. `moat cp ./src box:/work`")
        }
        (Side::Sandbox { .. }, Side::Sandbox { .. }) => {
            bail!("both sides are in sandboxes\nhint: copy through the host: `moat cp a:/x ./x && moat cp ./x b:/x`")
        }
    }
    Ok(0)
}

async fn to_sandbox(client: &Client, src: &str, sandbox: &str, dest: &str) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(src).with_context(|| format!("cannot copy {src}"))?;
    let dest_kind = match client.stat(sandbox, dest).await {
        Ok(info) => Some(info.kind),
        Err(e) if e.code() == Some(moat_api::ErrorCode::NotFound) => None,
        Err(e) => return Err(e.into()),
    };
    let Placement { dir, name } = match place(src, meta.is_dir(), dest, dest_kind)? {
        // `SRC/.` to a new DEST: make DEST, then unpack the contents into it.
        p if p.dir.is_empty() => {
            let made = moat_api::MakeDir { path: dest.to_string(), parents: false, mode: None };
            client.mkdir(sandbox, &made).await?;
            Placement { dir: dest.to_string(), name: None }
        }
        p => p,
    };
    let (reader, writer) = tokio::io::duplex(256 << 10);
    let src_path = PathBuf::from(src.trim_end_matches("/."));
    let packer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut tar = tar::Builder::new(tokio_util::io::SyncIoBridge::new(writer));
        tar.follow_symlinks(false);
        match &name {
            Some(name) if meta.is_dir() => tar.append_dir_all(name, &src_path)?,
            Some(name) => tar.append_path_with_name(&src_path, name)?,
            None => tar.append_dir_all(".", &src_path)?,
        }
        tar.into_inner()?.shutdown()
    });
    let sent = client.write_archive(sandbox, &dir, reader).await;
    let packed = packer.await.context("archiving panicked")?;
    sent?;
    packed.with_context(|| format!("reading {src}"))?;
    Ok(())
}

async fn from_sandbox(client: &Client, sandbox: &str, src: &str, dest: &str) -> anyhow::Result<()> {
    let info = client.stat(sandbox, src).await?;
    let dest_kind = match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => Some(FileKind::Dir),
        Ok(_) => Some(FileKind::File),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot write to {dest}")),
    };
    let placement = place(src, info.kind == FileKind::Dir, dest, dest_kind)?;
    let target = if placement.dir.is_empty() {
        std::fs::create_dir(dest).with_context(|| format!("creating {dest}"))?;
        PathBuf::from(dest)
    } else {
        PathBuf::from(&placement.dir)
    };
    if !target.is_dir() {
        bail!("the directory {} does not exist\nhint: create it first", target.display());
    }
    let name = if placement.dir.is_empty() { Some(".") } else { placement.name.as_deref() };
    let download = client.read_archive(sandbox, src.trim_end_matches("/."), name).await?;
    let reader = tokio_util::io::SyncIoBridge::new(download.into_async_read());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        // The archive comes from the guest, which is untrusted: the tar crate refuses `..` and
        // absolute paths, never writes through a symlink (it checks that every parent resolves
        // inside the target, and replaces rather than opens an existing file), and owners are
        // not applied.
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        archive.unpack(&target)
    })
    .await
    .context("unpacking panicked")?
    .with_context(|| format!("copying {sandbox}:{src} to {dest}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_told_apart_like_docker_cp() {
        assert_eq!(side("box:/tmp/x"), Side::Sandbox { sandbox: "box".into(), path: "/tmp/x".into() });
        assert_eq!(side("./a:b"), Side::Host("./a:b".into()));
        assert_eq!(side("/abs/path"), Side::Host("/abs/path".into()));
        assert_eq!(side(":x"), Side::Host(":x".into()));
    }

    #[test]
    fn placement_follows_docker_cp() {
        let p = place("src/dir", true, "/work", Some(FileKind::Dir)).unwrap();
        assert_eq!((p.dir.as_str(), p.name.as_deref()), ("/work", Some("dir")));
        let p = place("f.txt", false, "/work/g.txt", None).unwrap();
        assert_eq!((p.dir.as_str(), p.name.as_deref()), ("/work", Some("g.txt")));
        let p = place("f.txt", false, "/work/g.txt", Some(FileKind::File)).unwrap();
        assert_eq!((p.dir.as_str(), p.name.as_deref()), ("/work", Some("g.txt")));
        let p = place("src/dir/.", true, "/work", Some(FileKind::Dir)).unwrap();
        assert_eq!((p.dir.as_str(), p.name.as_deref()), ("/work", None));
        assert!(place("d", true, "/work/f", Some(FileKind::File)).is_err());
        assert!(place("f", false, "/nope/", None).unwrap_err().to_string().contains("does not exist"));
    }
}
