//! Choosing the guest kernel: the distribution's own kernel package, never one moat ships.

use std::cmp::Ordering;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// A kernel image with the module tree that belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The bzImage (`/boot/vmlinuz-…`).
    pub path: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// `explicit` (from `--kernel` / MOAT_KERNEL), else the newest `/boot/vmlinuz-*-cloud-amd64`,
/// else the newest `/boot/vmlinuz-*`. Its modules are looked for under `/lib/modules`.
pub fn find_kernel(explicit: Option<&Path>) -> Result<Kernel, ImageError> {
    find_kernel_in(explicit, Path::new("/boot"), Path::new("/lib/modules"))
}

/// [`find_kernel`] with the `/boot` and `/lib/modules` roots given (tests, other layouts).
pub fn find_kernel_in(explicit: Option<&Path>, boot: &Path, modules_root: &Path) -> Result<Kernel, ImageError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => newest_kernel(boot).ok_or_else(|| ImageError::KernelNotFound { boot: boot.to_path_buf() })?,
    };
    let unreadable = |source| ImageError::KernelUnreadable { path: path.clone(), source };
    let file = File::open(&path).map_err(unreadable)?;
    if file.metadata().map_err(unreadable)?.is_dir() {
        return Err(unreadable(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a directory, not a kernel image",
        )));
    }
    // The release compiled into the image is authoritative (the file may have been copied or
    // renamed); the file name is the fallback for images without a version string.
    let release = release_from_header(&file).or_else(|| release_from_name(&path)).ok_or_else(|| {
        unreadable(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it has no version string and its name is not vmlinuz-<release>, so its modules cannot be found",
        ))
    })?;
    Ok(Kernel { modules_dir: modules_root.join(&release), path, release })
}

/// The newest `vmlinuz-*-cloud-amd64` in `boot`, else the newest `vmlinuz-*`.
fn newest_kernel(boot: &Path) -> Option<PathBuf> {
    let names: Vec<String> = std::fs::read_dir(boot)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vmlinuz-") && n.len() > "vmlinuz-".len())
        .collect();
    let newest = |cloud_only: bool| {
        names.iter().filter(|n| !cloud_only || n.ends_with("-cloud-amd64")).max_by(|a, b| version_cmp(a, b)).cloned()
    };
    newest(true).or_else(|| newest(false)).map(|n| boot.join(n))
}

fn release_from_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("vmlinuz-").filter(|r| !r.is_empty()).map(str::to_string)
}

/// The release from an x86 bzImage's setup header: `kernel_version` (at 0x20e) points, relative to
/// 0x200, at a string such as `6.1.0-56-cloud-amd64 (debian-kernel@…) #1 SMP …`.
fn release_from_header(file: &File) -> Option<String> {
    let mut hdr = [0u8; 0x210];
    file.read_exact_at(&mut hdr, 0).ok()?;
    if &hdr[0x202..0x206] != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([hdr[0x20e], hdr[0x20f]]);
    if ptr == 0 {
        return None;
    }
    let mut text = [0u8; 256];
    let n = file.read_at(&mut text, u64::from(ptr) + 0x200).ok()?;
    let text = &text[..n];
    let end = text.iter().position(|&c| c == 0 || c == b' ').unwrap_or(text.len());
    let release = std::str::from_utf8(&text[..end]).ok()?;
    let plausible = !release.is_empty() && release.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_+~".contains(&c));
    plausible.then(|| release.to_string())
}

/// Compare so that runs of digits compare as numbers: `6.1.0-10` is newer than `6.1.0-9`.
pub(crate) fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros.min(digits.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_boot(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::write(dir.path().join(n), b"not a real kernel").unwrap();
        }
        dir
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_cmp("vmlinuz-6.1.0-10-cloud-amd64", "vmlinuz-6.1.0-9-cloud-amd64"), Ordering::Greater);
        assert_eq!(version_cmp("vmlinuz-6.10.0", "vmlinuz-6.9.9"), Ordering::Greater);
        assert_eq!(version_cmp("vmlinuz-6.1.0", "vmlinuz-6.1.0-1"), Ordering::Less);
        assert_eq!(version_cmp("a-01", "a-1"), Ordering::Equal);
    }

    #[test]
    fn the_newest_cloud_kernel_wins_over_newer_generic_ones() {
        let boot = fake_boot(&[
            "vmlinuz-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-10-cloud-amd64",
            "vmlinuz-6.5.0-1-amd64",
            "config-6.1.0-11-cloud-amd64",
        ]);
        let k = find_kernel_in(None, boot.path(), Path::new("/mods")).unwrap();
        assert_eq!(k.release, "6.1.0-10-cloud-amd64");
        assert_eq!(k.path, boot.path().join("vmlinuz-6.1.0-10-cloud-amd64"));
        assert_eq!(k.modules_dir, Path::new("/mods/6.1.0-10-cloud-amd64"));
    }

    #[test]
    fn without_a_cloud_kernel_the_newest_kernel_is_used() {
        let boot = fake_boot(&["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-10-amd64", "vmlinuz-"]);
        assert_eq!(find_kernel_in(None, boot.path(), Path::new("/m")).unwrap().release, "6.1.0-10-amd64");
    }

    #[test]
    fn missing_kernels_say_how_to_get_one() {
        let boot = fake_boot(&[]);
        let err = crate::report(&find_kernel_in(None, boot.path(), Path::new("/m")).unwrap_err());
        assert!(
            err.contains("vmlinuz-*-cloud-amd64") && err.contains("apt-get install linux-image-cloud-amd64"),
            "{err}"
        );
        assert!(err.contains("MOAT_KERNEL"), "{err}");

        let err =
            find_kernel_in(Some(Path::new("/nope/vmlinuz-1")), boot.path(), Path::new("/m")).unwrap_err().to_string();
        assert!(err.contains("/nope/vmlinuz-1"), "{err}");
        let err = crate::report(&find_kernel_in(Some(boot.path()), boot.path(), Path::new("/m")).unwrap_err());
        assert!(err.contains("directory"), "{err}");
    }

    #[test]
    fn the_release_comes_from_the_image_itself_when_it_was_renamed() {
        let real = find_kernel(None).expect("a kernel is installed (apt-get install linux-image-cloud-amd64)");
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("bzImage");
        let head = std::fs::read(&real.path).unwrap();
        std::fs::write(&copy, &head[..head.len().min(64 << 10)]).unwrap();
        let k = find_kernel_in(Some(&copy), dir.path(), Path::new("/lib/modules")).unwrap();
        assert_eq!(k.release, real.release);
        assert!(k.modules_dir.join("modules.dep").is_file(), "{} has modules", k.modules_dir.display());
    }
}
