//! Metadata operations answered at once: stat, list, mkdir, remove, rename and chmod.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use moat_proto::{AgentError, ErrorCode, FileInfo, FileKind, FsReply, Request};

use super::{checked, err, io_err, owner_ids, Owner};

/// JSON bytes a listing may take: its answer must fit one frame, or the host would end the link.
/// Room is left for the envelope around the entries. A larger tree is an error asking for a
/// narrower path.
const MAX_LISTING: usize = moat_proto::MAX_PAYLOAD - 4096;

fn info(path: &Path, m: &std::fs::Metadata) -> FileInfo {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        kind,
        size: m.len(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        target: ft
            .is_symlink()
            .then(|| std::fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

pub(super) fn metadata_op(request: Request) -> Result<FsReply, AgentError> {
    match request {
        Request::Stat { path } => {
            let p = checked(&path)?;
            let m = std::fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
            Ok(FsReply::Stat { info: info(&p, &m) })
        }
        Request::List { path, recursive } => {
            let p = checked(&path)?;
            let mut entries = Vec::new();
            let mut budget = MAX_LISTING;
            list(&p, recursive, &mut entries, &mut budget).map_err(|e| match e {
                Listed::Failed(e) => e,
                Listed::TooLarge => err(
                    ErrorCode::BadRequest,
                    format!(
                        "The listing of {} is over {} KiB ({} entries so far), more than one answer carries; \
                         list a narrower path{}.",
                        p.display(),
                        MAX_LISTING / 1024,
                        entries.len(),
                        if recursive { ", or without recursion" } else { "" }
                    ),
                ),
            })?;
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(FsReply::List { entries })
        }
        Request::Mkdir { path, parents, mode, owner } => {
            let p = checked(&path)?;
            let owner = owner_ids(owner.as_deref(), Path::new("/etc"))?;
            make_dir(&p, parents, mode.unwrap_or(0o755), owner)?;
            Ok(FsReply::Done)
        }
        Request::Remove { path, recursive } => {
            let p = checked(&path)?;
            if p == Path::new("/") {
                return Err(err(ErrorCode::BadRequest, "Refusing to remove /."));
            }
            let m = std::fs::symlink_metadata(&p).map_err(|e| io_err(&p, e))?;
            let r = match (m.is_dir(), recursive) {
                (true, true) => std::fs::remove_dir_all(&p),
                (true, false) => std::fs::remove_dir(&p),
                (false, _) => std::fs::remove_file(&p),
            };
            r.map_err(|e| io_err(&p, e))?;
            Ok(FsReply::Done)
        }
        Request::Rename { from, to } => {
            let (f, t) = (checked(&from)?, checked(&to)?);
            std::fs::rename(&f, &t).map_err(|e| io_err(&f, e))?;
            Ok(FsReply::Done)
        }
        Request::Chmod { path, mode } => {
            let p = checked(&path)?;
            if mode > 0o7777 {
                return Err(err(ErrorCode::BadRequest, format!("{mode:o} is not a file mode (at most 7777 octal).")));
            }
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(|e| io_err(&p, e))?;
            Ok(FsReply::Done)
        }
        _ => Err(err(ErrorCode::Unsupported, "This request is not a file operation.")),
    }
}

/// `mkdir` (`-p` with `parents`); with an owner, each directory made here is given to it, and
/// those that were already there are left as they are.
fn make_dir(p: &Path, parents: bool, mode: u32, owner: Option<Owner>) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut b = std::fs::DirBuilder::new();
    b.mode(mode);
    let Some((uid, gid)) = owner else {
        return b.recursive(parents).create(p).map_err(|e| io_err(p, e));
    };
    // One level at a time, top down, so what this call made is known exactly.
    let levels: Vec<&Path> =
        if parents { p.ancestors().collect::<Vec<_>>().into_iter().rev().collect() } else { vec![p] };
    for dir in levels {
        match b.create(dir) {
            Ok(()) => std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(|e| io_err(dir, e))?,
            Err(e) if parents && e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(io_err(dir, e)),
        }
    }
    Ok(())
}

/// Why a listing stopped.
enum Listed {
    Failed(AgentError),
    /// The entries would not fit in one answer.
    TooLarge,
}

/// Add `dir`'s entries (and, when recursive, everything below) to `entries`, while their JSON fits
/// in `budget` bytes; the budget also bounds the agent's memory and the recursion depth.
fn list(dir: &Path, recursive: bool, entries: &mut Vec<FileInfo>, budget: &mut usize) -> Result<(), Listed> {
    let read = std::fs::read_dir(dir).map_err(|e| Listed::Failed(io_err(dir, e)))?;
    for entry in read {
        let entry = entry.map_err(|e| Listed::Failed(io_err(dir, e)))?;
        let path = entry.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else { continue }; // Removed meanwhile.
        let entry = info(&path, &m);
        // The entry as it goes on the wire, and the comma after it.
        let size = serde_json::to_vec(&entry).expect("file infos serialize").len() + 1;
        *budget = budget.checked_sub(size).ok_or(Listed::TooLarge)?;
        entries.push(entry);
        if recursive && m.is_dir() {
            list(&path, true, entries, budget)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use moat_proto::{ErrorCode, FileKind, FsReply, Message, Request, Started};

    use super::metadata_op;
    use crate::files::tests::tempdir;

    #[test]
    fn metadata_operations_work_and_explain_failures() {
        let dir = std::env::temp_dir().join(format!("moat-files-{}", std::process::id()));
        let d = dir.to_string_lossy().into_owned();
        let op = |r: Request| metadata_op(r);
        assert_eq!(
            op(Request::Mkdir { path: format!("{d}/a/b"), parents: true, mode: None, owner: None }),
            Ok(FsReply::Done)
        );
        std::fs::write(dir.join("a/f"), b"hi").unwrap();
        std::os::unix::fs::symlink("f", dir.join("a/l")).unwrap();
        let Ok(FsReply::List { entries }) = op(Request::List { path: d.clone(), recursive: true }) else { panic!() };
        let names: Vec<_> = entries.iter().map(|e| (e.path.trim_start_matches(&d).to_string(), e.kind)).collect();
        assert_eq!(
            names,
            [
                ("/a".into(), FileKind::Dir),
                ("/a/b".into(), FileKind::Dir),
                ("/a/f".into(), FileKind::File),
                ("/a/l".into(), FileKind::Symlink)
            ]
        );
        let Ok(FsReply::Stat { info }) = op(Request::Stat { path: format!("{d}/a/l") }) else { panic!() };
        assert_eq!(info.target.as_deref(), Some("f"));
        assert_eq!(op(Request::Chmod { path: format!("{d}/a/f"), mode: 0o600 }), Ok(FsReply::Done));
        assert_eq!(std::fs::metadata(dir.join("a/f")).unwrap().mode() & 0o777, 0o600);
        let e = op(Request::Remove { path: format!("{d}/a"), recursive: false }).unwrap_err();
        assert!(e.message.contains("not empty"), "{}", e.message);
        let e = op(Request::Stat { path: format!("{d}/missing") }).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.ends_with("does not exist."), "{}", e.message);
        let e = op(Request::Mkdir { path: format!("{d}/a/f/x"), parents: false, mode: None, owner: None }).unwrap_err();
        assert!(e.message.contains("not a directory"), "{}", e.message);
        assert_eq!(op(Request::Rename { from: format!("{d}/a/f"), to: format!("{d}/g") }), Ok(FsReply::Done));
        assert_eq!(op(Request::Remove { path: d.clone(), recursive: true }), Ok(FsReply::Done));
        assert!(!dir.exists());
    }

    /// With an owner, the directories a mkdir makes are given to it; those already there are not.
    #[test]
    fn made_directories_and_only_those_get_the_owner() {
        if !rustix::process::geteuid().is_root() {
            return; // Only root gives files away.
        }
        let dir = tempdir();
        let owner_of = |p: &std::path::Path| std::fs::metadata(p).map(|m| (m.uid(), m.gid())).unwrap();
        std::fs::create_dir(dir.join("old")).unwrap();
        super::make_dir(&dir.join("old/a/b"), true, 0o750, Some((1000, 1001))).unwrap();
        assert_eq!(owner_of(&dir.join("old")), (0, 0));
        assert_eq!(owner_of(&dir.join("old/a")), (1000, 1001));
        assert_eq!(owner_of(&dir.join("old/a/b")), (1000, 1001));
        super::make_dir(&dir.join("old/a/b"), true, 0o750, Some((2000, 2000))).expect("-p: it exists");
        assert_eq!(owner_of(&dir.join("old/a/b")), (1000, 1001), "an existing directory keeps its owner");
        let e = super::make_dir(&dir.join("old/a/b"), false, 0o750, Some((2000, 2000))).unwrap_err();
        assert!(e.message.ends_with("already exists."), "{}", e.message);
        std::fs::write(dir.join("file"), b"").unwrap();
        let e = super::make_dir(&dir.join("file/x"), true, 0o750, Some((1000, 1001))).unwrap_err();
        assert!(e.message.contains("not a directory") || e.message.contains("already exists"), "{}", e.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every answer must fit one frame: a tree too large to list is an error, not a frame the host
    /// refuses (which ends the link) or a panic (which reboots the guest).
    #[test]
    fn listings_too_large_for_one_answer_are_refused() {
        let dir = tempdir();
        std::fs::create_dir(dir.join("sub")).unwrap();
        for i in 0..6000 {
            std::fs::write(dir.join("sub").join(format!("{i:0>200}")), b"").unwrap();
        }
        let path = dir.to_string_lossy().into_owned();
        let e = metadata_op(Request::List { path: path.clone(), recursive: true }).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("list a narrower path, or without recursion"), "{}", e.message);
        // The top level alone is small, and its answer fits a frame.
        let reply = metadata_op(Request::List { path, recursive: false }).unwrap();
        let frame = moat_proto::Frame::new(1, Message::Started(Started::Fs(reply)));
        assert!(frame.encode().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
