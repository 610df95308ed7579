//! Finding the static guest agent binary.

use std::path::{Path, PathBuf};

use crate::ImageError;

/// Where `scripts/build-agent` puts the agent, relative to the cargo target directory.
const DEV_BUILD: &str = "x86_64-unknown-linux-gnu/agent/moat-agent";

/// `explicit` (MOAT_AGENT), else `moat-agent` next to the running binary, else the build tree
/// (for `cargo run` and tests). The file must be a static ELF: it runs as PID 1 in an initramfs
/// that has no dynamic loader.
pub fn find_agent(explicit: Option<&Path>) -> Result<PathBuf, ImageError> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let exe = std::env::current_exe().map_err(|e| ImageError::Io { what: "locating the moat binary".into(), source: e })?;
            let dir = exe.parent().unwrap_or(Path::new("/")).to_path_buf();
            // target/<profile>/moat or target/<profile>/deps/<test binary>
            let mut c = vec![dir.join("moat-agent")];
            for up in dir.ancestors().skip(1).take(2) {
                c.push(up.join(DEV_BUILD));
            }
            c
        }
    };
    let found = candidates.iter().find(|p| p.is_file()).ok_or_else(|| ImageError::AgentMissing {
        looked: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })?;
    check_static(found)?;
    Ok(found.clone())
}

/// Refuse anything that is not an x86-64 ELF without a program interpreter.
fn check_static(path: &Path) -> Result<(), ImageError> {
    let bad = |why: &str| ImageError::AgentNotStatic { path: path.display().to_string(), why: why.into() };
    let data = std::fs::read(path).map_err(|e| ImageError::Io { what: format!("reading {}", path.display()), source: e })?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad("it is not a 64-bit little-endian ELF file"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u64_at = |o: usize| data.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    if u16_at(18) != 62 {
        return Err(bad("it is not built for x86-64"));
    }
    let phoff = u64_at(32).ok_or_else(|| bad("truncated header"))?;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(|| bad("bad program headers"))?).ok_or_else(|| bad("bad program headers"))?;
        let ty = data.get(off..off + 4).ok_or_else(|| bad("truncated program headers"))?;
        if u32::from_le_bytes(ty.try_into().expect("4 bytes")) == 3 {
            return Err(bad("it is dynamically linked (has a program interpreter)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_and_non_elf_files_are_refused() {
        let err = find_agent(Some(Path::new("/bin/sh"))).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        assert!(find_agent(Some(&f)).unwrap_err().to_string().contains("not a 64-bit"));
        let err = find_agent(Some(&dir.path().join("missing"))).unwrap_err();
        assert!(err.to_string().contains("scripts/build-agent"), "{err}");
    }

    #[test]
    fn busybox_static_passes_the_static_check() {
        check_static(Path::new("/bin/busybox")).expect("busybox-static is static (apt-get install busybox-static)");
    }
}
