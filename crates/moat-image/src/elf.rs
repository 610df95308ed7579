//! Just enough ELF64 to tell whether a binary can run without a dynamic loader.
//!
//! The agent runs as PID 1 in an initramfs that has no `ld.so` and the minimal image ships only
//! busybox, so both must be static: an x86-64 ELF without a `PT_INTERP` program header (a
//! static-pie is fine). Parsed by hand: it is a few header fields, not worth a dependency.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PT_INTERP: u32 = 3;
/// Size of one ELF64 program header.
const PHENTSIZE: usize = 56;
const EM_X86_64: u16 = 62;
/// More program headers than any real binary has; bounds what a damaged file makes us read.
const MAX_PHNUM: usize = 4096;

/// Why `path` is not a static x86-64 executable, or `Ok(())` when it is.
/// The outer error is I/O (cannot open or read the file), the inner one the reason it is unfit.
pub(crate) fn check_static(path: &Path) -> std::io::Result<Result<(), String>> {
    let file = File::open(path)?;
    let mut header = [0u8; 64];
    if read_at(&file, &mut header, 0)? < header.len() || &header[..4] != b"\x7fELF" {
        return Ok(Err("it is not an ELF executable".into()));
    }
    if header[4] != 2 || header[5] != 1 {
        return Ok(Err("it is not a 64-bit little-endian ELF file".into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().expect("8 bytes within the 64-byte header"));
    if u16_at(18) != EM_X86_64 {
        return Ok(Err("it is not built for x86-64".into()));
    }
    let (phoff, phentsize, phnum) = (u64_at(32), usize::from(u16_at(54)), usize::from(u16_at(56)));
    if phnum == 0 || phnum > MAX_PHNUM || phentsize != PHENTSIZE {
        return Ok(Err("it has no usable program headers (not an executable)".into()));
    }
    let mut table = vec![0u8; phentsize * phnum];
    let len = file.metadata()?.len();
    let fits = phoff.checked_add(table.len() as u64).is_some_and(|end| end <= len);
    if !fits || read_at(&file, &mut table, phoff)? < table.len() {
        return Ok(Err("its program headers are truncated".into()));
    }
    let dynamic = table.chunks_exact(phentsize).any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    if dynamic {
        return Ok(Err("it is dynamically linked (it names a program interpreter)".into()));
    }
    Ok(Ok(()))
}

/// Fill as much of `buf` as the file has from `offset`; returns how many bytes were read.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let Some(at) = offset.checked_add(done as u64) else { break };
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_busybox_passes_and_dynamic_or_foreign_files_do_not() {
        assert_eq!(check_static(Path::new("/bin/busybox")).unwrap(), Ok(()), "busybox-static is installed and static");
        let sh = check_static(Path::new("/bin/sh")).unwrap().unwrap_err();
        assert!(sh.contains("dynamically linked"), "{sh}");

        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(check_static(&script).unwrap().unwrap_err().contains("not an ELF"));

        // A 64-bit header whose program header table points past the end of the file.
        let mut bogus = std::fs::read("/bin/busybox").unwrap()[..64].to_vec();
        bogus[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        let f = dir.path().join("bogus");
        std::fs::write(&f, &bogus).unwrap();
        assert!(check_static(&f).unwrap().unwrap_err().contains("truncated"));

        assert!(check_static(&dir.path().join("missing")).is_err());
    }
}
