//! envd's `EntryInfo` made from moat's `FileInfo` (an `lstat`), and the path rules envd applies
//! before it looks at a file.

use futures_util::StreamExt;
use moat_api::{FileInfo, FileKind};
use moat_client::Client;
use serde::{Serialize, Serializer};

use crate::error::Failure;
use crate::users::Tables;

/// How many links deep a symlink is followed to learn what it points at (Linux stops at 40;
/// each link here costs a call to the daemon).
const MAX_HOPS: usize = 16;
/// How many symlinks of one listing are followed; past it they read as `FILE_TYPE_SYMLINK`.
pub(super) const MAX_FOLLOWED: usize = 256;
/// Symlinks followed at once for one listing.
const FOLLOW_CONCURRENCY: usize = 8;

/// `filesystem.FileType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum FileType {
    #[default]
    Unspecified,
    File,
    Directory,
    Symlink,
}

impl Serialize for FileType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            FileType::Unspecified => "FILE_TYPE_UNSPECIFIED",
            FileType::File => "FILE_TYPE_FILE",
            FileType::Directory => "FILE_TYPE_DIRECTORY",
            FileType::Symlink => "FILE_TYPE_SYMLINK",
        })
    }
}

/// `filesystem.EntryInfo`, in proto3 JSON: `size` (int64) is a string, unset optional fields
/// are left out (the SDK tests `symlinkTarget` for presence).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EntryInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileType,
    pub path: String,
    #[serde(serialize_with = "int64")]
    pub size: u64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_symlink: bool,
}

fn int64<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

/// Where a symlink ends up: the path of the first thing along the chain that is not a link, and
/// its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub path: String,
    pub info: FileInfo,
}

/// The entry envd shows for a file. A symlink shows its target's type and permission bits,
/// `isSymlink` and where it leads (`resolved`); a dangling one is `FILE_TYPE_SYMLINK`.
pub(crate) fn entry_info(info: &FileInfo, resolved: Option<&Resolved>, tables: &Tables) -> EntryInfo {
    let (kind, mode, symlink_target) = match info.kind {
        FileKind::Symlink => match resolved {
            Some(r) => (file_type(r.info.kind), r.info.mode & 0o777, Some(r.path.clone())),
            None => {
                let target = info.target.as_deref().map(|t| link_target(&info.path, t));
                (FileType::Symlink, 0, target)
            }
        },
        k => (file_type(k), info.mode & 0o777, None),
    };
    EntryInfo {
        name: base_name(&info.path).to_string(),
        kind,
        path: info.path.clone(),
        size: info.size,
        mode,
        permissions: permissions(info.kind, info.mode),
        owner: tables.user_name(info.uid),
        group: tables.group_name(info.gid),
        modified_time: rfc3339(info.mtime),
        symlink_target,
        is_symlink: info.kind == FileKind::Symlink,
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::File,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        // envd has no type for FIFOs, sockets and devices either.
        FileKind::Other => FileType::Unspecified,
    }
}

/// Go's `FileMode.String()` as envd sends it: type letters in Go's order (`d`, `L`, setuid `u`,
/// setgid `g`, sticky `t`, `?` for a kind moat does not name), or `-`, then `rwxrwxrwx`.
pub(crate) fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(12);
    match kind {
        FileKind::Dir => s.push('d'),
        FileKind::Symlink => s.push('L'),
        FileKind::File | FileKind::Other => {}
    }
    for (bit, c) in [(0o4000, 'u'), (0o2000, 'g'), (0o1000, 't')] {
        if mode & bit != 0 {
            s.push(c);
        }
    }
    if kind == FileKind::Other {
        s.push('?');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// Seconds since the epoch as RFC 3339, in UTC.
fn rfc3339(secs: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(secs).ok()?;
    t.format(&time::format_description::well_known::Rfc3339).ok()
}

/// The last component of an absolute path (`/` for the root).
pub(crate) fn base_name(path: &str) -> &str {
    match path.trim_end_matches('/').rsplit('/').next() {
        Some(name) if !name.is_empty() => name,
        _ => "/",
    }
}

/// The directory an absolute path is in (`/` for the root and its children).
pub(crate) fn parent(path: &str) -> &str {
    match path.trim_end_matches('/').rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// An absolute path without `.`, `..`, repeated or trailing slashes, as Go's `path.Clean` (envd
/// cleans every path it is given); `..` never climbs above `/`.
pub(crate) fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where the link at `link` with contents `target` points, as an absolute path.
fn link_target(link: &str, target: &str) -> String {
    if target.starts_with('/') {
        clean(target)
    } else {
        clean(&format!("{}/{target}", parent(link)))
    }
}

/// Follow the symlink `info` to what it finally points at; `None` when the chain dangles,
/// loops or is longer than [`MAX_HOPS`].
pub(crate) async fn follow(client: &Client, sandbox: &str, info: &FileInfo) -> Option<Resolved> {
    let mut current = info.clone();
    for _ in 0..MAX_HOPS {
        if current.kind != FileKind::Symlink {
            return Some(Resolved { path: current.path.clone(), info: current });
        }
        let next = link_target(&current.path, current.target.as_deref()?);
        current = client.stat(sandbox, &next).await.ok()?;
        current.path = next;
    }
    None
}

/// The entries for a listing's files: symlinks followed (at most [`MAX_FOLLOWED`] of them, a
/// few at a time), names from the guest's tables.
pub(crate) async fn entries(client: &Client, sandbox: &str, files: Vec<FileInfo>, tables: &Tables) -> Vec<EntryInfo> {
    let mut links = 0;
    let jobs = files.into_iter().map(|f| {
        let follow_it = f.kind == FileKind::Symlink && links < MAX_FOLLOWED;
        links += usize::from(follow_it);
        async move {
            let resolved = if follow_it { follow(client, sandbox, &f).await } else { None };
            entry_info(&f, resolved.as_ref(), tables)
        }
    });
    futures_util::stream::iter(jobs).buffered(FOLLOW_CONCURRENCY).collect().await
}

/// The entry of one path (`Stat`, `Move`), its symlink followed.
pub(crate) async fn entry_of(
    client: &Client,
    sandbox: &str,
    path: &str,
    tables: &Tables,
) -> Result<EntryInfo, Failure> {
    let info = client.stat(sandbox, path).await?;
    let resolved = if info.kind == FileKind::Symlink { follow(client, sandbox, &info).await } else { None };
    Ok(entry_info(&info, resolved.as_ref(), tables))
}

/// The entries of a listing of `dir` that are at most `depth` levels below it (1: its
/// children). The listing's paths are `dir` joined with names, as the agent makes them.
pub(crate) fn within_depth(dir: &str, depth: u32, files: Vec<FileInfo>) -> Vec<FileInfo> {
    let prefix = if dir.ends_with('/') { dir.to_string() } else { format!("{dir}/") };
    files
        .into_iter()
        .filter(|f| {
            f.path.strip_prefix(&prefix).is_some_and(|rel| {
                let levels = rel.split('/').filter(|p| !p.is_empty()).count();
                levels >= 1 && levels <= depth as usize
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, kind: FileKind, mode: u32) -> FileInfo {
        FileInfo { path: path.into(), kind, size: 11, mode, uid: 1000, gid: 1000, mtime: 1_796_205_600, target: None }
    }

    #[test]
    fn permissions_read_as_go_prints_them() {
        assert_eq!(permissions(FileKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(FileKind::Symlink, 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions(FileKind::Dir, 0o1777), "dtrwxrwxrwx");
        assert_eq!(permissions(FileKind::File, 0o4755), "urwxr-xr-x");
        assert_eq!(permissions(FileKind::File, 0o6711), "ugrwx--x--x");
        assert_eq!(permissions(FileKind::File, 0), "----------");
        assert_eq!(permissions(FileKind::Other, 0o600), "?rw-------");
    }

    #[test]
    fn files_and_directories_map_to_entries() {
        let t = Tables::default();
        let e = entry_info(&info("/home/user/a.txt", FileKind::File, 0o4644), None, &t);
        assert_eq!(e.name, "a.txt");
        assert_eq!((e.kind, e.mode, e.permissions.as_str()), (FileType::File, 0o644, "urw-r--r--"));
        assert_eq!((e.owner.as_str(), e.group.as_str()), ("1000", "1000"));
        assert_eq!(e.modified_time.as_deref(), Some("2026-12-02T10:00:00Z"));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["size"], "11");
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        assert_eq!(json["modifiedTime"], "2026-12-02T10:00:00Z");
        // Unset optional fields and false booleans are left out, as proto3 JSON does.
        assert!(json.get("symlinkTarget").is_none() && json.get("isSymlink").is_none());
        let d = entry_info(&info("/", FileKind::Dir, 0o755), None, &t);
        assert_eq!((d.name.as_str(), d.kind), ("/", FileType::Directory));
    }

    #[test]
    fn symlinks_show_their_targets_type_or_dangle() {
        let t = Tables::default();
        let mut link = info("/home/user/l", FileKind::Symlink, 0o777);
        link.target = Some("../shared/data".into());
        let target =
            Resolved { path: "/home/shared/data".into(), info: info("/home/shared/data", FileKind::Dir, 0o750) };
        let e = entry_info(&link, Some(&target), &t);
        assert_eq!((e.kind, e.mode, e.is_symlink), (FileType::Directory, 0o750, true));
        assert_eq!(e.permissions, "Lrwxrwxrwx");
        assert_eq!(e.symlink_target.as_deref(), Some("/home/shared/data"));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            (json["isSymlink"].clone(), json["symlinkTarget"].clone()),
            (true.into(), "/home/shared/data".into())
        );
        let dangling = entry_info(&link, None, &t);
        assert_eq!((dangling.kind, dangling.mode), (FileType::Symlink, 0));
        assert_eq!(dangling.symlink_target.as_deref(), Some("/home/shared/data"));
    }

    #[test]
    fn paths_clean_like_go() {
        assert_eq!(clean("/home/user/../x//./y/"), "/home/x/y");
        assert_eq!(clean("/../.."), "/");
        assert_eq!(clean("/"), "/");
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(parent("/a"), "/");
        assert_eq!(base_name("/a/b/"), "b");
        assert_eq!(link_target("/a/b/l", "/etc//x"), "/etc/x");
        assert_eq!(link_target("/a/b/l", "../c"), "/a/c");
    }

    #[test]
    fn listings_are_cut_at_the_depth() {
        let files = ["/d/a", "/d/a/b", "/d/a/b/c", "/d/e", "/dx/f"].map(|p| info(p, FileKind::Dir, 0o755)).to_vec();
        let paths = |depth| within_depth("/d", depth, files.clone()).into_iter().map(|f| f.path).collect::<Vec<_>>();
        assert_eq!(paths(1), ["/d/a", "/d/e"]);
        assert_eq!(paths(2), ["/d/a", "/d/a/b", "/d/e"]);
        assert_eq!(paths(9), ["/d/a", "/d/a/b", "/d/a/b/c", "/d/e"]);
        let root = [info("/a", FileKind::File, 0), info("/a/b", FileKind::File, 0)].to_vec();
        assert_eq!(within_depth("/", 1, root).len(), 1);
    }
}
