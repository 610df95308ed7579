//! envd's `filesystem.Filesystem` service over moat's file API: stat, list, make, move and
//! remove paths ([`entry`] makes envd's `EntryInfo`), and watch directories ([`watch`]).
//!
//! Every call runs as a guest user (`Authorization: Basic`, else the sandbox's default user):
//! relative and `~` paths resolve against that user's home, and the directories a call makes
//! belong to that user, as envd's do.

mod entry;
mod messages;
mod watch;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Extension, Json, Router};
use moat_api::{ErrorCode, FileKind, MakeDir, RemovePath, RenamePath};

pub(crate) use entry::{base_name, clean, parent};
pub(crate) use watch::Watchers;

use crate::connect::{RpcResult, Unary};
use crate::error::{Code, Failure};
use crate::users::{self, GuestUser};
use crate::{Front, Sandbox, Shared};
use entry::{EntryInfo, FileType};
use messages::{Empty, EntryResponse, ListDirRequest, ListDirResponse, MoveRequest, PathRequest};

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_path))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch::watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(watch::create_watcher))
        .route("/filesystem.Filesystem/GetWatcherEvents", post(watch::get_watcher_events))
        .route("/filesystem.Filesystem/RemoveWatcher", post(watch::remove_watcher))
}

/// The guest user an RPC runs as.
async fn request_user(front: &Front, sandbox: &Sandbox, headers: &HeaderMap) -> Result<GuestUser, Failure> {
    let name = users::from_authorization(headers)?;
    front.users.resolve(&front.client, &sandbox.id, name.as_deref()).await
}

/// A path as envd resolves it for `user`: absolute, `~/…` or relative to the home; cleaned.
pub(crate) fn user_path(user: &GuestUser, path: &str) -> String {
    clean(&user.resolve(path))
}

/// Make the directory `path` is in, and those above it, owned by `user` (the ones already there
/// are left as they are).
pub(crate) async fn make_parents(front: &Front, sandbox: &str, user: &GuestUser, path: &str) -> Result<(), Failure> {
    let dir = parent(path);
    if dir == "/" {
        return Ok(());
    }
    let req = MakeDir { path: dir.to_string(), parents: true, mode: None, owner: Some(user.name.clone()) };
    front.client.mkdir(sandbox, &req).await?;
    Ok(())
}

/// What `path` is and where it leads, following a symlink: `None` when nothing is there (or
/// the link dangles).
async fn kind_at(front: &Front, sandbox: &str, path: &str) -> Result<Option<(String, FileKind)>, Failure> {
    match front.client.stat(sandbox, path).await {
        Ok(info) if info.kind == FileKind::Symlink => {
            Ok(entry::follow(&front.client, sandbox, &info).await.map(|r| (r.path, r.info.kind)))
        }
        Ok(info) => Ok(Some((path.to_string(), info.kind))),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A directory to watch must be there and be one; where it is, symlinks followed (the guest's
/// watch does not follow them).
async fn existing_dir(front: &Front, sandbox: &Sandbox, path: &str) -> Result<String, Failure> {
    match kind_at(front, &sandbox.id, path).await? {
        Some((dir, FileKind::Dir)) => Ok(dir),
        Some(_) => Err(Failure::invalid(format!("{path} is not a directory; watch a directory"))),
        None => Err(Failure::not_found(format!("directory {path} does not exist"))),
    }
}

/// `Stat`: the entry of a path (not_found makes the SDK's `exists()` false).
async fn stat(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<PathRequest>,
) -> RpcResult<EntryResponse> {
    let user = request_user(&front, &sandbox, &headers).await?;
    let path = user_path(&user, &req.path);
    let tables = front.users.tables(&front.client, &sandbox.id, false).await?;
    let entry = entry::entry_of(&front.client, &sandbox.id, &path, &tables).await?;
    Ok(Json(EntryResponse { entry }))
}

/// `MakeDir`: with its parents, owned by the user; already_exists (the SDK's `False`) when a
/// directory is there, invalid_argument when something else is.
async fn make_dir(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<PathRequest>,
) -> RpcResult<EntryResponse> {
    let user = request_user(&front, &sandbox, &headers).await?;
    let path = user_path(&user, &req.path);
    match kind_at(&front, &sandbox.id, &path).await?.map(|(_, kind)| kind) {
        Some(FileKind::Dir) => {
            return Err(Failure::new(Code::AlreadyExists, format!("directory {path} already exists")).into())
        }
        Some(_) => {
            return Err(Failure::invalid(format!(
                "{path} exists and is not a directory; remove it or pick another path"
            ))
            .into())
        }
        None => {}
    }
    let req = MakeDir { path: path.clone(), parents: true, mode: None, owner: Some(user.name.clone()) };
    front.client.mkdir(&sandbox.id, &req).await?;
    // envd answers only these fields; the SDK reads none of them.
    let entry = EntryInfo { name: base_name(&path).to_string(), kind: FileType::Directory, path, ..Default::default() };
    Ok(Json(EntryResponse { entry }))
}

/// `Move`: rename, making the destination's parents first; the moved entry.
async fn move_path(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<MoveRequest>,
) -> RpcResult<EntryResponse> {
    let user = request_user(&front, &sandbox, &headers).await?;
    let (from, to) = (user_path(&user, &req.source), user_path(&user, &req.destination));
    make_parents(&front, &sandbox.id, &user, &to).await?;
    front.client.rename(&sandbox.id, &RenamePath { from, to: to.clone() }).await?;
    let tables = front.users.tables(&front.client, &sandbox.id, false).await?;
    let entry = entry::entry_of(&front.client, &sandbox.id, &to, &tables).await?;
    Ok(Json(EntryResponse { entry }))
}

/// `ListDir`: the entries down to `depth` levels (0 means 1). A symlinked directory is listed;
/// symlinks below it are not followed into.
async fn list_dir(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<ListDirRequest>,
) -> RpcResult<ListDirResponse> {
    let user = request_user(&front, &sandbox, &headers).await?;
    let path = user_path(&user, &req.path);
    let depth = req.depth.max(1);
    // One level needs no recursive listing: a large tree below stays unread.
    let listing = front.client.list_dir(&sandbox.id, &path, depth > 1).await?;
    let files = entry::within_depth(&path, depth, listing.entries);
    let tables = front.users.tables(&front.client, &sandbox.id, false).await?;
    let entries = entry::entries(&front.client, &sandbox.id, files, &tables).await;
    Ok(Json(ListDirResponse { entries }))
}

/// `Remove`: a file or a whole tree; nothing there is no error (envd's `os.RemoveAll`).
async fn remove(
    State(front): State<Shared>,
    Extension(sandbox): Extension<Sandbox>,
    headers: HeaderMap,
    Unary(req): Unary<PathRequest>,
) -> RpcResult<Empty> {
    let user = request_user(&front, &sandbox, &headers).await?;
    let path = user_path(&user, &req.path);
    match front.client.remove_path(&sandbox.id, &RemovePath { path, recursive: true }).await {
        Err(e) if e.code() != Some(ErrorCode::NotFound) => Err(Failure::from(e).into()),
        _ => Ok(Json(Empty {})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_paths_resolve_against_the_home_and_are_cleaned() {
        let u = GuestUser { name: "user".into(), uid: 1000, gid: 1000, home: "/home/user".into() };
        assert_eq!(user_path(&u, "a/../b/./c"), "/home/user/b/c");
        assert_eq!(user_path(&u, "~/x/"), "/home/user/x");
        assert_eq!(user_path(&u, ""), "/home/user");
        assert_eq!(user_path(&u, "../../.."), "/");
        assert_eq!(user_path(&u, "/tmp//f"), "/tmp/f");
    }
}
