//! Tar archives in and out of the guest: a tree read into an archive member by member, each
//! exactly its header's size, and an archive unpacked into a directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::io_err;

/// A tar archive of the file or tree at `path`, its top entry named `name`; symlinks are stored,
/// never followed.
///
/// Every member carries exactly the bytes its header announces. tar-rs's own `append_file` copies
/// to EOF, so a file that a guest process grows while it is read would spill bytes past its
/// member, and the host would read them as members of their own (tar-rs issues #282, #352). A
/// file that shrinks is padded with zeros; a sparse one travels whole, its holes as zeros. Sockets,
/// FIFOs and devices inside a tree are left out: the host takes only files, directories and
/// symlinks.
pub(super) fn read_tar(path: &Path, name: Option<String>, w: &mut dyn Write) -> Result<(), String> {
    let name =
        name.or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| ".".to_string());
    if name.is_empty() || name.contains('/') || name == ".." || name.contains('\0') {
        return Err(format!("{name:?} cannot name an archive's top-level entry."));
    }
    let m = std::fs::symlink_metadata(path).map_err(|e| io_err(path, e).message)?;
    if !(m.is_file() || m.is_dir() || m.is_symlink()) {
        return Err(format!("{} is not a file, directory or symlink; only those can be copied out.", path.display()));
    }
    let fail = |p: &Path, e: std::io::Error| format!("Archiving {} failed: {e}.", p.display());
    let mut b = tar::Builder::new(w);
    let mut todo = vec![(path.to_path_buf(), PathBuf::from(&name))];
    while let Some((src, dest)) = todo.pop() {
        let m = match std::fs::symlink_metadata(&src) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && src != path => continue, // Removed meanwhile.
            Err(e) => return Err(io_err(&src, e).message),
        };
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&m);
        let appended = if m.is_dir() {
            for entry in std::fs::read_dir(&src).map_err(|e| io_err(&src, e).message)? {
                let entry = entry.map_err(|e| io_err(&src, e).message)?;
                todo.push((entry.path(), dest.join(entry.file_name())));
            }
            b.append_data(&mut header, &dest, std::io::empty())
        } else if m.is_symlink() {
            let target = std::fs::read_link(&src).map_err(|e| io_err(&src, e).message)?;
            b.append_link(&mut header, &dest, target)
        } else if m.is_file() {
            append_file(&mut b, &src, &dest)
        } else {
            continue;
        };
        appended.map_err(|e| fail(&src, e))?;
    }
    b.finish().map_err(|e| fail(path, e))
}

/// Append the regular file `src` as `dest`, exactly as many bytes as its header says.
fn append_file(b: &mut tar::Builder<&mut dyn Write>, src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not following a symlink or blocking on a FIFO swapped in since the listing; the header
    // comes from the file opened.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(src)?;
    let m = file.metadata()?;
    if !m.is_file() {
        return Ok(());
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata(&m);
    let size = m.len();
    // tar-rs copies through an 8 KiB buffer; reading the file in whole chunks saves the emulated
    // guest seven system calls in eight, worth more than the extra copy out of this buffer.
    let file = std::io::BufReader::with_capacity(super::stream::FILE_CHUNK, file.take(size));
    b.append_data(&mut header, dest, file.chain(std::io::repeat(0)).take(size))
}

pub(super) fn write_tar(dir: &Path, r: &mut dyn Read) -> Result<(), String> {
    let mut archive = tar::Archive::new(r);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(dir).map_err(|e| format!("Unpacking into {} failed: {e}.", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    use super::{read_tar, write_tar};
    use crate::files::tests::tempdir;

    #[test]
    fn archives_round_trip_trees_with_links_and_modes() {
        let src = tempdir();
        std::fs::create_dir_all(src.join("t/empty")).unwrap();
        std::fs::write(src.join("t/x"), b"x").unwrap();
        std::fs::set_permissions(src.join("t/x"), std::fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("t/link")).unwrap();
        // A FIFO inside a tree is left out (the host takes only files, directories and symlinks);
        // one asked for by name is an error.
        let fifo = src.join("t/fifo");
        let fifo_mode = rustix::fs::Mode::from_raw_mode(0o644);
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, fifo_mode, 0).unwrap();
        let e = read_tar(&fifo, None, &mut Vec::new()).unwrap_err();
        assert!(e.ends_with("is not a file, directory or symlink; only those can be copied out."), "{e}");
        let mut tar = Vec::new();
        read_tar(&src.join("t"), Some("renamed".into()), &mut tar).unwrap();
        let (names, _) = members(&tar);
        let names: Vec<_> = names.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(!names.contains(&"renamed/fifo".to_string()), "{names:?}");
        let dst = tempdir();
        write_tar(&dst, &mut &tar[..]).unwrap();
        assert!(dst.join("renamed/empty").is_dir());
        assert_eq!(std::fs::metadata(dst.join("renamed/x")).unwrap().mode() & 0o777, 0o751);
        assert_eq!(std::fs::read_link(dst.join("renamed/link")).unwrap(), Path::new("/etc/passwd"));
        std::fs::remove_dir_all(&src).unwrap();
        std::fs::remove_dir_all(&dst).unwrap();
    }

    /// A sink that runs `race` at its first write (the archive's first header): what a guest
    /// process changing the file at that moment does.
    struct Racing<F: FnOnce()> {
        out: Vec<u8>,
        race: Option<F>,
    }

    impl<F: FnOnce()> Write for Racing<F> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(race) = self.race.take() {
                race();
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Each member of an archive as its name and the size in its header, and their data.
    fn members(tar: &[u8]) -> (Vec<(String, u64)>, Vec<Vec<u8>>) {
        let mut archive = tar::Archive::new(tar);
        let entries = archive.entries().unwrap();
        entries
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                ((e.path().unwrap().display().to_string(), e.header().size().unwrap()), data)
            })
            .unzip()
    }

    #[test]
    fn a_file_that_grows_while_archived_stays_one_member_of_its_header_size() {
        let dir = tempdir();
        let path = dir.join("out.bin");
        let original: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        std::fs::write(&path, &original).unwrap();
        // What the guest process appends: a whole archive of its own, holding `pwned`.
        let mut payload = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        payload.append_data(&mut h, "pwned", &b"hi\n"[..]).unwrap();
        let payload = payload.into_inner().unwrap();
        let append = || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&payload).unwrap();
        };
        let mut sink = Racing { out: Vec::new(), race: Some(append) };
        read_tar(&path, None, &mut sink).unwrap();
        assert!(sink.race.is_none(), "the file grew during the copy");
        let (names, data) = members(&sink.out);
        assert_eq!(names, [("out.bin".to_string(), 4096)]);
        assert!(data[0] == original, "the member holds the file as it was");

        // One that shrinks meanwhile is padded to its header's size, so the archive stays whole.
        std::fs::write(&path, &original).unwrap();
        let shrink = || std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
        let mut sink = Racing { out: Vec::new(), race: Some(shrink) };
        read_tar(&path, Some("renamed".into()), &mut sink).unwrap();
        let padded = [&original[..100], &[0; 3996][..]].concat();
        let (names, data) = members(&sink.out);
        assert_eq!(names, [("renamed".to_string(), 4096)]);
        assert!(data[0] == padded, "the member is padded with zeros");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
