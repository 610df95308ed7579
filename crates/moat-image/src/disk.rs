//! Disk files, through the distribution's tools: ext4 from a directory tree (`mkfs.ext4 -d`),
//! qcow2 conversion, overlays and size queries (`qemu-img`).

use std::path::Path;
use std::process::{Command, Output};

use crate::ImageError;

/// Run `cmd`; a tool that cannot be started names the package that provides it, a failure
/// carries the tool's own stderr.
fn run(cmd: &mut Command, package: &str) -> Result<Output, ImageError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|source| ImageError::ToolMissing { tool, package: package.into(), source })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(ImageError::CommandFailed { command: render(cmd), status: out.status.to_string(), stderr });
    }
    Ok(out)
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// Make `raw` a sparse file of `size` bytes holding an ext4 file system with the contents of
/// `tree`, owned as `owners` says.
pub(crate) fn make_ext4(tree: &Path, raw: &Path, size: u64, label: &str, owners: Owners) -> Result<(), ImageError> {
    let file = std::fs::File::create(raw).map_err(ImageError::io(format!("creating {}", raw.display())))?;
    file.set_len(size).map_err(ImageError::io(format!("sizing {}", raw.display())))?;
    drop(file);
    // Keep the journal: sandboxes are killed without warning, and fsck-free recovery matters
    // more than the few MiB it takes.
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-E", "root_owner=0:0", "-d"])
            .arg(tree)
            .arg(raw),
        "e2fsprogs",
    )?;
    match owners {
        Owners::FromTree => Ok(()),
        Owners::AllRoot => chown_all_to_root(tree, raw),
    }
}

/// Who owns the files in a new ext4 file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owners {
    /// As in the tree (`mkfs.ext4 -d` copies them): right when root built the tree with the
    /// owners the image wants, as layers and debootstrap do.
    FromTree,
    /// Everything root's: a non-root builder's tree has its own uid everywhere.
    AllRoot,
}

/// Pack a root tree into `qcow2` (via a raw ext4 next to it, removed afterwards), sized for the
/// tree plus room to work: 30% and 256 MiB more, at least 512 MiB. Returns the virtual size.
pub(crate) fn pack_tree(tree: &Path, qcow2: &Path, label: &str) -> Result<u64, ImageError> {
    let used = tree_size(tree)?;
    let size = (used + used * 3 / 10 + (256 << 20)).max(512 << 20).next_multiple_of(1 << 20);
    let raw = qcow2.with_extension("ext4");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owners = if unsafe { libc::geteuid() } == 0 { Owners::FromTree } else { Owners::AllRoot };
    make_ext4(tree, &raw, size, label, owners)?;
    convert_to_qcow2(&raw, qcow2)?;
    std::fs::remove_file(&raw).map_err(ImageError::io(format!("removing {}", raw.display())))?;
    Ok(size)
}

/// Bytes the files of a tree take (apparent sizes plus a block per inode), without following links.
fn tree_size(tree: &Path) -> Result<u64, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(ImageError::io(format!("listing {}", dir.display())))? {
            let entry = entry.map_err(ImageError::io(format!("listing {}", dir.display())))?;
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(ImageError::io(format!("reading {}", entry.path().display())))?;
            total += meta.size().next_multiple_of(4096) + 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// `mkfs.ext4 -d` copies the builder's uid/gid; a non-root builder would leave files owned by some
/// host user. Set every inode to 0:0 in one `debugfs` session.
fn chown_all_to_root(tree: &Path, raw: &Path) -> Result<(), ImageError> {
    let mut script = String::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(ImageError::io(format!("listing {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(ImageError::io(format!("listing {}", dir.display())))?;
            let path = entry.path();
            let rel = path.strip_prefix(tree).expect("walked paths are under the tree");
            let Some(rel) = rel.to_str().filter(|r| !r.contains(['"', '\n', ' '])) else {
                return Err(ImageError::Io {
                    what: format!("adding {} to the image", path.display()),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "file names in built images must be plain",
                    ),
                });
            };
            script.push_str(&format!("sif /{rel} uid 0\nsif /{rel} gid 0\n"));
            let ty = entry.file_type().map_err(ImageError::io(format!("inspecting {}", path.display())))?;
            if ty.is_dir() {
                stack.push(path);
            }
        }
    }
    let script_path = raw.with_extension("debugfs");
    std::fs::write(&script_path, script).map_err(ImageError::io(format!("writing {}", script_path.display())))?;
    let out = run(Command::new("debugfs").arg("-w").arg("-f").arg(&script_path).arg(raw), "e2fsprogs");
    let _ = std::fs::remove_file(&script_path);
    // debugfs reports failed requests on stderr but still exits 0.
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = stderr.lines().find(|l| !l.starts_with("debugfs ") && !l.trim().is_empty()) {
        return Err(ImageError::CommandFailed {
            command: format!("debugfs -w -f {} {}", script_path.display(), raw.display()),
            status: out.status.to_string(),
            stderr: line.to_string(),
        });
    }
    Ok(())
}

/// Convert a raw disk to a compact qcow2 (zero blocks are left out).
pub(crate) fn convert_to_qcow2(raw: &Path, qcow2: &Path) -> Result<(), ImageError> {
    run(
        Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(qcow2),
        "qemu-utils",
    )?;
    Ok(())
}

/// A qcow2 overlay on `base` (an absolute path, recorded in the overlay). `size` grows the
/// virtual disk beyond the base's; `None` keeps the base's size.
pub(crate) fn create_overlay(base: &Path, overlay: &Path, size: Option<u64>) -> Result<(), ImageError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(base).arg(overlay);
    if let Some(size) = size {
        cmd.arg(size.to_string());
    }
    run(&mut cmd, "qemu-utils")?;
    Ok(())
}

/// Make `disk` sit on `base` instead of its current backing chain, copying into it whatever of
/// the old chain differs from `base`; what the disk reads stays the same.
pub(crate) fn rebase(disk: &Path, base: &Path) -> Result<(), ImageError> {
    run(
        Command::new("qemu-img").args(["rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(base).arg(disk),
        "qemu-utils",
    )?;
    Ok(())
}

/// Point `disk` at `base` without reading either: for a layer known to have been made on a copy
/// of exactly `base` (a pulled snapshot's layer names the pushing host's path).
pub(crate) fn set_backing(disk: &Path, base: &Path) -> Result<(), ImageError> {
    run(
        Command::new("qemu-img").args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(base).arg(disk),
        "qemu-utils",
    )?;
    Ok(())
}

/// Facts `qemu-img info` reports about a disk file.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct DiskInfo {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    pub format: String,
    #[serde(rename = "backing-filename")]
    pub backing_file: Option<String>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<serde_json::Value>,
}

impl DiskInfo {
    /// The external data file a qcow2 keeps its data in, if it names one.
    pub fn data_file(&self) -> Option<String> {
        let f = self.format_specific.as_ref()?.get("data")?.get("data-file")?;
        Some(f.as_str().unwrap_or("?").to_string())
    }
}

pub(crate) fn info(path: &Path) -> Result<DiskInfo, ImageError> {
    let out = run(Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(path), "qemu-utils")?;
    serde_json::from_slice(&out.stdout).map_err(|e| ImageError::CommandFailed {
        command: format!("qemu-img info --output=json -U {}", path.display()),
        status: out.status.to_string(),
        stderr: format!("unexpected output: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_images_are_root_owned_whoever_owned_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        std::fs::write(tree.join("usr/bin/tool"), b"x").unwrap();
        std::os::unix::fs::symlink("tool", tree.join("usr/bin/alias")).unwrap();
        // As root, hand the tree to another user, as a non-root builder's tree would be.
        for p in ["usr", "usr/bin", "usr/bin/tool", "usr/bin/alias"] {
            let _ = std::os::unix::fs::lchown(tree.join(p), Some(1000), Some(1000));
        }
        let raw = dir.path().join("fs.raw");
        make_ext4(&tree, &raw, 16 << 20, "t", Owners::AllRoot).unwrap();
        for p in ["/", "/usr", "/usr/bin", "/usr/bin/tool", "/usr/bin/alias"] {
            let out = Command::new("debugfs").args(["-R", &format!("stat {p}")]).arg(&raw).output().unwrap();
            let stat = String::from_utf8_lossy(&out.stdout);
            assert!(stat.contains("User:     0   Group:     0"), "{p}: {stat}");
        }
        assert!(!raw.with_extension("debugfs").exists(), "the debugfs script is removed");
    }

    #[test]
    fn failures_carry_the_tools_stderr_and_missing_tools_name_their_package() {
        let err = crate::report(&info(Path::new("/nonexistent/disk.qcow2")).unwrap_err());
        assert!(err.contains("qemu-img info") && err.contains("/nonexistent/disk.qcow2"), "{err}");
        assert!(err.contains("No such file"), "stderr is included: {err}");
        let err = crate::report(&run(&mut Command::new("moat-no-such-tool"), "moat-no-such-package").unwrap_err());
        assert!(err.contains("apt-get install moat-no-such-package"), "{err}");
    }
}
