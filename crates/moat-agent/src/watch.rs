//! Watching a directory for changes with inotify, for the `Watch` file operation.

use std::collections::HashMap;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use moat_proto::{AgentError, ErrorCode, FsEvent};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};

/// Directories one recursive watch follows at most (each costs a kernel watch).
const MAX_DIRS: usize = 8192;
/// How often a quiet watch checks that the host still listens.
const IDLE_CHECK_MS: i32 = 500;

pub struct Watcher {
    fd: OwnedFd,
    dirs: HashMap<i32, PathBuf>,
    recursive: bool,
}

fn flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::MODIFY
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::ATTRIB
        | WatchFlags::DONT_FOLLOW
        | WatchFlags::ONLYDIR
}

impl Watcher {
    /// Watch the directory `path` (and, with `recursive`, every directory under it).
    pub fn new(path: &Path, recursive: bool) -> Result<Watcher, AgentError> {
        let fail = |e: std::io::Error| AgentError {
            code: if e.kind() == std::io::ErrorKind::NotFound { ErrorCode::NotFound } else { ErrorCode::BadRequest },
            message: format!("Cannot watch {}: {e}.", path.display()),
        };
        if !std::fs::metadata(path).map_err(fail)?.is_dir() {
            return Err(AgentError {
                code: ErrorCode::BadRequest,
                message: format!("{} is not a directory.", path.display()),
            });
        }
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).map_err(|e| fail(e.into()))?;
        let mut w = Watcher { fd, dirs: HashMap::new(), recursive };
        w.add(path).map_err(fail)?;
        Ok(w)
    }

    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        if self.dirs.len() >= MAX_DIRS {
            return Ok(()); // Deeper directories go unwatched rather than failing the watch.
        }
        let wd = inotify::add_watch(&self.fd, dir, flags())?;
        self.dirs.insert(wd, dir.to_path_buf());
        if self.recursive {
            for entry in std::fs::read_dir(dir)?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = self.add(&entry.path());
                }
            }
        }
        Ok(())
    }

    /// Write events as JSON lines to `sink` until it is closed (the host stopped listening).
    pub fn run(mut self, sink: &mut dyn Write) -> Result<(), String> {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        loop {
            let mut pfd = [rustix::event::PollFd::new(&self.fd, rustix::event::PollFlags::IN)];
            match rustix::event::poll(&mut pfd, IDLE_CHECK_MS) {
                Ok(0) => {
                    if sink.flush().is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(format!("Watching failed: {e}.")),
            }
            let mut events = Vec::new();
            let mut new_dirs = Vec::new();
            let fd = self.fd.as_fd();
            let mut reader = inotify::Reader::new(fd, &mut buf);
            loop {
                let e = match reader.next() {
                    Ok(e) => e,
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(format!("Watching failed: {e}.")),
                };
                let flags = e.events();
                let dir = flags.contains(ReadFlags::ISDIR);
                let base = self.dirs.get(&e.wd()).cloned().unwrap_or_default();
                let path = match e.file_name() {
                    Some(name) if !name.to_bytes().is_empty() => base.join(name.to_string_lossy().as_ref()),
                    _ => base,
                };
                if flags.contains(ReadFlags::IGNORED) {
                    self.dirs.remove(&e.wd());
                    continue;
                }
                let event = if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                    "overflow"
                } else if flags.contains(ReadFlags::CREATE) {
                    if dir && self.recursive {
                        new_dirs.push(path.clone());
                    }
                    "create"
                } else if flags.contains(ReadFlags::DELETE) {
                    "delete"
                } else if flags.contains(ReadFlags::MOVED_FROM) {
                    "move_from"
                } else if flags.contains(ReadFlags::MOVED_TO) {
                    if dir && self.recursive {
                        new_dirs.push(path.clone());
                    }
                    "move_to"
                } else if flags.contains(ReadFlags::MODIFY) {
                    "modify"
                } else if flags.contains(ReadFlags::ATTRIB) {
                    "attrib"
                } else {
                    continue;
                };
                let event = FsEvent { event: event.into(), path: path.to_string_lossy().into_owned(), dir };
                // A burst of writes to one file is one `modify`.
                if events.last() != Some(&event) {
                    events.push(event);
                }
            }
            for d in new_dirs {
                let _ = self.add(&d);
            }
            for event in &events {
                if !emit(sink, event) {
                    return Ok(());
                }
            }
        }
    }
}

/// Write one event as a JSON line, at once; false once the host stopped listening.
pub fn emit(sink: &mut dyn Write, event: &FsEvent) -> bool {
    let mut line = serde_json::to_vec(event).expect("events serialize");
    line.push(b'\n');
    sink.write_all(&line).and_then(|()| sink.flush()).is_ok()
}
