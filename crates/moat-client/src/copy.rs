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

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use moat_api::{ErrorCode, FileKind};

use crate::{Client, ClientError};

/// A failed copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{what}")]
    Host { what: String, source: std::io::Error },
    /// SRC and DEST do not fit together.
    #[error("{message}")]
    Placement { message: String, hint: &'static str },
    /// The sandbox's archive held a member that a copy of SRC never holds; it was not written and
    /// the copy stopped there.
    #[error("the sandbox sent an unexpected archive: the member {member:?} {why}; the copy stopped before writing it")]
    UnexpectedArchive { member: String, why: &'static str, dest: String },
}

impl moat_hint::Hint for CopyError {
    fn hint(&self) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            CopyError::Client(e) => e.hint(),
            CopyError::Host { .. } => None,
            CopyError::Placement { hint, .. } => Some((*hint).into()),
            CopyError::UnexpectedArchive { dest, .. } => Some(
                format!(
                    "a process in the sandbox, or its agent, may be tampering with copies; what was copied before it \
                     is in {dest}: do not trust it"
                )
                .into(),
            ),
        }
    }
}

/// SRC and DEST do not fit together: `message`, and what to do.
fn misplaced(message: String, hint: &'static str) -> CopyError {
    CopyError::Placement { message, hint }
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
        None => Err(misplaced(
            format!("{path:?} names no file"),
            "give a file or directory, or `DIR/.` for what is inside DIR",
        )),
    }
}

/// Decide the placement from what the destination is (`dest_kind`: `None` if it does not exist).
fn place(src: &str, src_is_dir: bool, dest: &str, dest_kind: Option<FileKind>) -> Result<Placement, CopyError> {
    let name = source_name(src)?;
    match dest_kind {
        Some(FileKind::Dir) => Ok(Placement { dir: dest.to_string(), name }),
        Some(_) if src_is_dir => Err(misplaced(
            format!("cannot copy the directory {src} onto the file {dest}"),
            "give a directory as the destination",
        )),
        Some(_) | None => {
            if dest.ends_with('/') {
                return Err(misplaced(
                    format!("the directory {dest} does not exist"),
                    "create it first, or drop the trailing `/` to copy as that name",
                ));
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
                let made = moat_api::MakeDir { path: dest.to_string(), parents: false, mode: None, owner: None };
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
            return Err(misplaced(format!("the directory {} does not exist", target.display()), "create it first"));
        }
        // The archive's top entry is always named here, so the host knows what to expect; `.` for
        // what is inside SRC (`SRC/.`).
        let top = if placement.dir.is_empty() { None } else { placement.name };
        let download =
            self.read_archive(sandbox, src.trim_end_matches("/."), Some(top.as_deref().unwrap_or("."))).await?;
        let reader = tokio_util::io::SyncIoBridge::new(download.into_async_read());
        tokio::task::spawn_blocking(move || unpack(reader, &target, top.as_deref().map(OsStr::new)))
            .await
            .map_err(|e| host("unpacking")(std::io::Error::other(e)))?
    }
}

/// Unpack the guest's archive of one file or tree into the existing directory `target`.
///
/// The guest is hostile (its agent, or any process in it racing the agent), so the archive must
/// hold what a copy of SRC holds and nothing else: first the top entry `top` (`None`: `.`, the
/// contents of a directory), then, only if that is a directory, members under it; each a regular
/// file, a directory or a symlink. Anything else stops the copy before it is written. tar-rs adds
/// the rest: no `..` or absolute names, nothing written through a symlink (every parent must
/// resolve inside `target`; an existing file is replaced, not opened), owners not applied.
/// Modes become `mode & 0o755`, as a plain `cp` under umask 022 makes them (no setuid, setgid,
/// sticky or group/other write), and a directory that existed before the copy keeps its mode.
fn unpack(reader: impl Read, target: &Path, top: Option<&OsStr>) -> Result<(), CopyError> {
    let target = target.canonicalize().map_err(host(format!("cannot write to {}", target.display())))?;
    let reading = || host("reading the archive from the sandbox");
    let mut archive = tar::Archive::new(reader);
    // Without preserving, tar-rs applies `mode & 0o777 & !mask`.
    archive.set_preserve_permissions(false);
    archive.set_mask(0o022);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut top_kind = None;
    // Directories this copy creates get their modes last, deepest first (as tar-rs does), so a
    // read-only directory is filled before it becomes read-only.
    let mut new_dirs = Vec::new();
    for entry in archive.entries().map_err(reading())? {
        let mut entry = entry.map_err(reading())?;
        let member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse =
            |why| CopyError::UnexpectedArchive { member: member.clone(), why, dest: target.display().to_string() };
        let kind = entry.header().entry_type();
        if let Some(why) = unexpected_kind(kind) {
            return Err(refuse(why));
        }
        // tar-rs makes a directory of a non-ustar file header whose name ends in `/`.
        if !kind.is_dir() && member.ends_with('/') {
            return Err(refuse("is not a directory but its name ends in /"));
        }
        let path = entry.path().map_err(reading())?.into_owned();
        let (rel, is_top) = placed(&path, top).map_err(refuse)?;
        match (is_top, top_kind) {
            (true, None) if top.is_none() && !kind.is_dir() => {
                return Err(refuse("is not a directory, but the copy is of a directory's contents"))
            }
            (true, None) => top_kind = Some(kind),
            (true, Some(_)) => return Err(refuse("is a second top-level entry")),
            (false, None) => return Err(refuse("comes before the top-level entry")),
            (false, Some(k)) if !k.is_dir() => return Err(refuse("follows a top-level entry that is not a directory")),
            (false, Some(_)) => {}
        }
        if kind.is_dir() {
            // A directory already there (the destination, or one of the same name) keeps its mode.
            if std::fs::symlink_metadata(target.join(&rel)).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            new_dirs.push((member, entry));
            continue;
        }
        entry.unpack_in(&target).map_err(host(format!("writing {member:?} into {}", target.display())))?;
    }
    new_dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (member, mut dir) in new_dirs {
        dir.unpack_in(&target).map_err(host(format!("writing {member:?} into {}", target.display())))?;
    }
    Ok(())
}

/// Why a member of this type is refused; `None` for the three a copy holds.
fn unexpected_kind(kind: tar::EntryType) -> Option<&'static str> {
    use tar::EntryType as T;
    match kind {
        // Agents before moat's own tar writer stored sparse files as GNU sparse members.
        T::Regular | T::GNUSparse | T::Directory | T::Symlink => None,
        T::Link => Some("is a hard link (a copy never holds one)"),
        T::Char | T::Block => Some("is a device node"),
        T::Fifo => Some("is a FIFO"),
        _ => Some("is not a file, directory or symlink"),
    }
}

/// Where `path` lands, relative to the target directory, and whether it is the top entry itself;
/// `Err` if it is not `top` or under it. `top` `None` is `.`: everything is under it.
fn placed(path: &Path, top: Option<&OsStr>) -> Result<(PathBuf, bool), &'static str> {
    let mut parts = Vec::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::Normal(p) => parts.push(p),
            Component::ParentDir => return Err("has a `..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    let under = match top {
        None => &parts[..],
        Some(top) => match parts.split_first() {
            Some((first, rest)) if *first == top => rest,
            _ => return Err("is not the copied name or under it"),
        },
    };
    Ok((parts.iter().collect(), under.is_empty()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use tar::EntryType;

    use super::*;

    #[test]
    fn every_error_keeps_its_cause_and_hint_out_of_its_message() {
        let io = || std::io::Error::other("the io cause");
        let api = |hint: &str| {
            ClientError::Api(moat_api::ApiError {
                code: ErrorCode::NotFound,
                message: "no sandbox \"x\"".into(),
                hint: hint.into(),
            })
        };
        let client = [
            (ClientError::Connect { path: "/s".into(), source: io() }, true),
            (api("list sandboxes with `moat ps`"), true),
            (api(""), false),
            (ClientError::Transport("x".into()), true),
        ];
        for (e, hinted) in &client {
            moat_hint::check(e, *hinted).unwrap();
        }
        let copy = [
            (CopyError::Client(api("list sandboxes with `moat ps`")), true),
            (CopyError::Host { what: "x".into(), source: io() }, false),
            (misplaced("x".into(), "create it first"), true),
            (CopyError::UnexpectedArchive { member: "x".into(), why: "is a link", dest: "/d".into() }, true),
        ];
        for (e, hinted) in &copy {
            moat_hint::check(e, *hinted).unwrap();
        }
    }

    /// A member as a hostile agent could write it: any name (`..` included), type and mode.
    fn member(tar: &mut tar::Builder<Vec<u8>>, name: &str, kind: EntryType, mode: u32, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        if kind == EntryType::Link || kind == EntryType::Symlink {
            h.set_link_name("name/f").unwrap();
        }
        h.set_cksum();
        tar.append(&h, data).unwrap();
    }

    fn archive(members: &[(&str, EntryType, u32)]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, kind, mode) in members {
            member(&mut tar, name, *kind, *mode, if kind.is_file() { b"data" } else { b"" });
        }
        tar.into_inner().unwrap()
    }

    /// A directory removed when the test ends, even by a failed assertion.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("moat-copy-{}-{n}", std::process::id()));
            std::fs::create_dir_all(dir.join("dest")).unwrap();
            Scratch(dir)
        }

        fn dest(&self) -> PathBuf {
            self.0.join("dest")
        }

        /// Everything under the scratch directory, relative to it.
        fn tree(&self) -> Vec<String> {
            let mut found = Vec::new();
            let mut todo = vec![self.0.clone()];
            while let Some(dir) = todo.pop() {
                for e in std::fs::read_dir(&dir).unwrap().flatten() {
                    found.push(e.path().strip_prefix(&self.0).unwrap().display().to_string());
                    if e.file_type().unwrap().is_dir() {
                        todo.push(e.path());
                    }
                }
            }
            found.sort();
            found
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const F: EntryType = EntryType::Regular;
    const D: EntryType = EntryType::Directory;

    /// Unpack `members` into a fresh `dest` expecting top entry `name`: the error (if any) and
    /// what is on disk afterwards.
    fn attempt(members: &[(&str, EntryType, u32)]) -> (Option<String>, Vec<String>) {
        let s = Scratch::new();
        let result = unpack(&archive(members)[..], &s.dest(), Some(OsStr::new("name")));
        (result.err().map(|e| moat_hint::Report::new(&e).to_string()), s.tree())
    }

    #[test]
    fn only_the_copied_name_is_written() {
        let (err, tree) = attempt(&[("name", F, 0o644), ("other", F, 0o644)]);
        let err = err.expect("a member beside the copied name is refused");
        assert!(err.starts_with("the sandbox sent an unexpected archive: the member \"other\""), "{err}");
        assert!(err.contains("\nhint: a process in the sandbox"), "{err}");
        assert_eq!(tree, ["dest", "dest/name"]);

        let (err, tree) = attempt(&[("name", D, 0o755), ("name/../x", F, 0o644)]);
        assert!(err.unwrap().contains("\"name/../x\" has a `..` component"));
        assert_eq!(tree, ["dest"], "the directory is created last, and the copy stopped");
        let (err, _) = attempt(&[("/name", F, 0o644)]);
        assert!(err.unwrap().contains("is an absolute path"));
    }

    #[test]
    fn a_file_copy_holds_one_entry() {
        let (err, tree) = attempt(&[("name", F, 0o644), ("name", F, 0o644)]);
        assert!(err.unwrap().contains("is a second top-level entry"));
        assert_eq!(tree, ["dest", "dest/name"]);
        let (err, _) = attempt(&[("name", F, 0o644), ("name/x", F, 0o644)]);
        assert!(err.unwrap().contains("follows a top-level entry that is not a directory"));
        let (err, tree) = attempt(&[("name/x", F, 0o644), ("name", D, 0o755)]);
        assert!(err.unwrap().contains("comes before the top-level entry"));
        assert_eq!(tree, ["dest"]);
    }

    #[test]
    fn links_devices_fifos_and_unknown_types_are_refused() {
        for (kind, why) in [
            (EntryType::Link, "is a hard link"),
            (EntryType::Char, "is a device node"),
            (EntryType::Block, "is a device node"),
            (EntryType::Fifo, "is a FIFO"),
            (EntryType::Continuous, "is not a file, directory or symlink"),
            (EntryType::Regular, "is not a directory but its name ends in /"),
        ] {
            let x = if kind == EntryType::Regular { "name/x/" } else { "name/x" };
            let (err, tree) = attempt(&[("name", D, 0o755), ("name/f", F, 0o644), (x, kind, 0o644)]);
            let err = err.unwrap_or_else(|| panic!("{kind:?} is refused"));
            assert!(err.contains(&format!("{x:?} {why}")), "{err}");
            assert_eq!(tree, ["dest", "dest/name", "dest/name/f"]);
        }
        // Symlinks are kept, and nothing is written through one (tar-rs checks every parent).
        let (err, tree) = attempt(&[("name", D, 0o755), ("name/l", EntryType::Symlink, 0o777), ("name/l/f", F, 0o644)]);
        assert!(err.unwrap().contains("name/l/f"));
        assert_eq!(tree, ["dest", "dest/name", "dest/name/l"]);
    }

    #[test]
    fn modes_lose_setuid_and_world_write_and_existing_directories_keep_theirs() {
        let s = Scratch::new();
        let dest = s.dest();
        std::fs::create_dir(dest.join("name")).unwrap();
        std::fs::set_permissions(dest.join("name"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o750)).unwrap();
        let tar = archive(&[
            ("name", D, 0o777),
            ("name/tool", F, 0o4755),
            ("name/g", F, 0o2777),
            ("name/open", D, 0o1777),
            ("name/open/f", F, 0o666),
        ]);
        unpack(&tar[..], &dest, Some(OsStr::new("name"))).unwrap();
        let mode = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("name"), 0o700, "an existing directory keeps its mode");
        assert_eq!(mode("name/tool"), 0o755);
        assert_eq!(mode("name/g"), 0o755);
        assert_eq!(mode("name/open"), 0o755);
        assert_eq!(mode("name/open/f"), 0o644);

        // `SRC/.`: the top entry is the destination itself, which keeps its mode too.
        let tar = archive(&[(".", D, 0o777), ("./more", F, 0o4777)]);
        unpack(&tar[..], &dest, None).unwrap();
        assert_eq!((mode("."), mode("more")), (0o750, 0o755));
        let tar = archive(&[(".", F, 0o644)]);
        let err = unpack(&tar[..], &dest, None).unwrap_err().to_string();
        assert!(err.contains("is not a directory, but the copy is of a directory's contents"), "{err}");
    }

    #[test]
    fn an_honest_tree_unpacks_whole() {
        let s = Scratch::new();
        let mut tar = tar::Builder::new(Vec::new());
        member(&mut tar, "name", D, 0o555, b"");
        member(&mut tar, "name/sub", D, 0o755, b"");
        member(&mut tar, "name/sub/f", F, 0o600, b"contents");
        member(&mut tar, "name/l", EntryType::Symlink, 0o777, b"");
        unpack(&tar.into_inner().unwrap()[..], &s.dest(), Some(OsStr::new("name"))).unwrap();
        assert_eq!(std::fs::read(s.dest().join("name/sub/f")).unwrap(), b"contents");
        assert_eq!(std::fs::read_link(s.dest().join("name/l")).unwrap(), Path::new("name/f"));
        let mode = std::fs::metadata(s.dest().join("name")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o555, "a read-only directory gets its mode after it was filled");
        std::fs::set_permissions(s.dest().join("name"), std::fs::Permissions::from_mode(0o755)).unwrap();
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
