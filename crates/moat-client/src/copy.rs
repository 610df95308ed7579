//! Copy files and directory trees between the host and a sandbox, with `docker cp` rules: what
//! `moat cp` and the MCP server's upload and download do. Trees travel as tar streams (modes,
//! mtimes and symlinks kept; symlinks never followed), and nothing is held in memory whole.
//!
//! Where the copy lands, for a copy of SRC to DEST:
//! - DEST is an existing directory: SRC goes inside it, under its own name (`SRC/.` copies what
//!   is inside SRC instead).
//! - DEST exists and is a file: a file SRC replaces it; a directory SRC is an error.
//! - DEST does not exist: SRC is copied as DEST (its parent must exist; a DEST ending in `/` must
//!   be an existing directory).

use std::path::{Path, PathBuf};

use moat_api::{ErrorCode, FileKind};

use crate::{Client, ClientError};

/// A failed copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{what}: {source}")]
    Host { what: String, source: std::io::Error },
    /// SRC and DEST do not fit together (the message ends with a hint).
    #[error("{0}")]
    Placement(String),
}

fn host(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CopyError {
    let what = what.into();
    move |source| CopyError::Host { what, source }
}

/// Where an archive is unpacked and the name its top entry gets; `None` for `SRC/.`.
#[derive(Debug)]
struct Placement {
    dir: String,
    name: Option<String>,
}

/// The last path component, `None` for `SRC/.` (copy the contents).
fn source_name(path: &str) -> Result<Option<String>, CopyError> {
    if path.ends_with("/.") || path == "." {
        return Ok(None);
    }
    match Path::new(path.trim_end_matches('/')).file_name() {
        Some(n) => Ok(Some(n.to_string_lossy().into_owned())),
        None => Err(CopyError::Placement(format!(
            "{path:?} names no file\nhint: give a file or directory, or `DIR/.` for what is inside DIR"
        ))),
    }
}

/// Decide the placement from what the destination is (`dest_kind`: `None` if it does not exist).
fn place(src: &str, src_is_dir: bool, dest: &str, dest_kind: Option<FileKind>) -> Result<Placement, CopyError> {
    let name = source_name(src)?;
    match dest_kind {
        Some(FileKind::Dir) => Ok(Placement { dir: dest.to_string(), name }),
        Some(_) if src_is_dir => Err(CopyError::Placement(format!(
            "cannot copy the directory {src} onto the file {dest}\nhint: give a directory as the destination"
        ))),
        Some(_) | None => {
            if dest.ends_with('/') {
                return Err(CopyError::Placement(format!(
                    "the directory {dest} does not exist\nhint: create it first, or drop the trailing `/` to copy as that name"
                )));
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

impl Client {
    /// Copy the host file or tree `src` to `dest` in the sandbox (an absolute path).
    pub async fn copy_to_sandbox(&self, src: &str, sandbox: &str, dest: &str) -> Result<(), CopyError> {
        let meta = std::fs::symlink_metadata(src).map_err(host(format!("cannot copy {src}")))?;
        let dest_kind = match self.stat(sandbox, dest).await {
            Ok(info) => Some(info.kind),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        let Placement { dir, name } = match place(src, meta.is_dir(), dest, dest_kind)? {
            // `SRC/.` to a new DEST: make DEST, then unpack the contents into it.
            p if p.dir.is_empty() => {
                let made = moat_api::MakeDir { path: dest.to_string(), parents: false, mode: None };
                self.mkdir(sandbox, &made).await?;
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
        let sent = self.write_archive(sandbox, &dir, reader).await;
        let packed = packer.await.map_err(|e| host("archiving")(std::io::Error::other(e)))?;
        sent?;
        packed.map_err(host(format!("reading {src}")))?;
        Ok(())
    }

    /// Copy the file or tree `src` (an absolute path in the sandbox) to `dest` on the host.
    pub async fn copy_from_sandbox(&self, sandbox: &str, src: &str, dest: &str) -> Result<(), CopyError> {
        let info = self.stat(sandbox, src).await?;
        let dest_kind = match std::fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => Some(FileKind::Dir),
            Ok(_) => Some(FileKind::File),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(host(format!("cannot write to {dest}"))(e)),
        };
        let placement = place(src, info.kind == FileKind::Dir, dest, dest_kind)?;
        let target = if placement.dir.is_empty() {
            std::fs::create_dir(dest).map_err(host(format!("creating {dest}")))?;
            PathBuf::from(dest)
        } else {
            PathBuf::from(&placement.dir)
        };
        if !target.is_dir() {
            return Err(CopyError::Placement(format!(
                "the directory {} does not exist\nhint: create it first",
                target.display()
            )));
        }
        let name = if placement.dir.is_empty() { Some(".") } else { placement.name.as_deref() };
        let download = self.read_archive(sandbox, src.trim_end_matches("/."), name).await?;
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
        .map_err(|e| host("unpacking")(std::io::Error::other(e)))?
        .map_err(host(format!("copying {sandbox}:{src} to {dest}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
