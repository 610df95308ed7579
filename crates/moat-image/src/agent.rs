//! Finding the static guest agent binary.

use std::path::{Path, PathBuf};

use crate::elf::check_static;
use crate::ImageError;

/// Where `scripts/build-agent` puts the agent, relative to the cargo target directory.
const DEV_BUILD: &str = "x86_64-unknown-linux-gnu/agent/moat-agent";

/// The guest agent binary: `explicit` (MOAT_AGENT), else `moat-agent` next to the running binary
/// (an installed moat), else the output of `scripts/build-agent` in the build tree (`cargo run`,
/// tests). It must be a static x86-64 ELF: it runs as PID 1 in an initramfs without a loader.
pub fn find_agent(explicit: Option<&Path>) -> Result<PathBuf, ImageError> {
    if let Some(path) = explicit {
        return check_agent(path).map(|()| path.to_path_buf());
    }
    let exe = std::env::current_exe().map_err(ImageError::io("locating the running moat binary"))?;
    let candidates = candidates_for(&exe);
    // `cargo build` of the workspace also leaves a dynamically linked host build of the agent in
    // target/<profile>/; skip it in favour of the static one rather than failing on it.
    let mut refused = None;
    for path in candidates.iter().filter(|p| p.is_file()) {
        match check_agent(path) {
            Ok(()) => return Ok(path.clone()),
            Err(e) => refused = refused.or(Some(e)),
        }
    }
    Err(refused.unwrap_or_else(|| ImageError::AgentNotFound {
        looked: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    }))
}

/// For `target/<profile>/moat` and `target/<profile>/deps/<test binary>`: the directory of the
/// binary, the profile directory, then the agent build under the target directory.
fn candidates_for(exe: &Path) -> Vec<PathBuf> {
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let profile = if dir.file_name().is_some_and(|n| n == "deps") { dir.parent().unwrap_or(dir) } else { dir };
    let mut out = vec![dir.join("moat-agent")];
    if profile != dir {
        out.push(profile.join("moat-agent"));
    }
    if let Some(target) = profile.parent() {
        out.push(target.join(DEV_BUILD));
    }
    out
}

fn check_agent(path: &Path) -> Result<(), ImageError> {
    match check_static(path) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(ImageError::AgentNotStatic { path: path.to_path_buf(), why }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ImageError::AgentNotFound { looked: path.display().to_string() })
        }
        Err(e) => Err(ImageError::AgentNotStatic { path: path.to_path_buf(), why: format!("it cannot be read: {e}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_scripts_and_missing_files_are_refused_with_the_fix() {
        let err = crate::report(&find_agent(Some(Path::new("/bin/sh"))).unwrap_err());
        assert!(err.contains("dynamically linked") && err.contains("scripts/build-agent"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        assert!(find_agent(Some(&f)).unwrap_err().to_string().contains("not an ELF"));
        let err = crate::report(&find_agent(Some(&dir.path().join("missing"))).unwrap_err());
        assert!(err.contains("missing") && err.contains("scripts/build-agent"), "{err}");
        assert_eq!(find_agent(Some(Path::new("/bin/busybox"))).unwrap(), Path::new("/bin/busybox"));
    }

    #[test]
    fn the_build_tree_is_searched_from_binaries_and_test_binaries() {
        let from_bin = candidates_for(Path::new("/w/target/debug/moat"));
        assert_eq!(from_bin, [PathBuf::from("/w/target/debug/moat-agent"), PathBuf::from("/w/target").join(DEV_BUILD)]);
        let from_test = candidates_for(Path::new("/w/target/release/deps/run-0123abcd"));
        assert_eq!(
            from_test,
            [
                PathBuf::from("/w/target/release/deps/moat-agent"),
                PathBuf::from("/w/target/release/moat-agent"),
                PathBuf::from("/w/target").join(DEV_BUILD)
            ]
        );
    }
}
