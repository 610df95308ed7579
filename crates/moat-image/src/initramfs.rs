//! The initramfs: the agent as `/init` plus exactly the kernel modules it loads.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::kernel::Kernel;
use crate::ImageError;

/// Bumped whenever the layout below changes, so cached archives are rebuilt.
const FORMAT_VERSION: &str = "moat-initramfs-1";

/// A minimal writer for the kernel's "newc" cpio format. Hand-written because it is a few dozen
/// lines and the crates for it either only read or do not write device nodes.
struct Newc<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Newc<W> {
    fn new(out: W) -> Self {
        Newc { out, ino: 1, written: 0 }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> std::io::Result<()> {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.raw(header.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad()?;
        self.raw(data)?;
        self.pad()
    }

    fn raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.written += b.len() as u64;
        self.out.write_all(b)
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.raw(&[0u8; 3][..n])
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, 0o100000 | mode, (0, 0), data)
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Build (or reuse from `cache_dir`) the initramfs for `kernel` with `agent` as `/init` and the
/// given module files, loaded in the order given (listed in `/moat/modules`).
pub fn build_initramfs(cache_dir: &Path, kernel: &Kernel, agent: &Path, modules: &[PathBuf]) -> Result<PathBuf, ImageError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| ImageError::Io { what: format!("reading {}", p.display()), source: e });
    let agent_bytes = read(agent)?;
    let mut files = Vec::new();
    for m in modules {
        let rel = m.strip_prefix(&kernel.modules_dir).map_err(|_| ImageError::ModulesMissing {
            release: kernel.release.clone(),
            reason: format!("{} is outside {}", m.display(), kernel.modules_dir.display()),
        })?;
        let name = rel.to_string_lossy().into_owned();
        if name.ends_with(".ko.xz") || name.ends_with(".ko.zst") || name.ends_with(".ko.gz") {
            return Err(ImageError::ModulesMissing {
                release: kernel.release.clone(),
                reason: format!("{name} is compressed; moat loads uncompressed .ko files only (use a kernel package with uncompressed modules)"),
            });
        }
        files.push((format!("lib/modules/{}/{name}", kernel.release), read(m)?));
    }
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION);
    h.update(kernel.release.as_bytes());
    h.update(&agent_bytes);
    for (name, data) in &files {
        h.update(name.as_bytes());
        h.update(data);
    }
    let key = hex::encode(&h.finalize()[..16]);
    let path = cache_dir.join(format!("initramfs-{key}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| ImageError::Io { what: format!("creating {}", cache_dir.display()), source: e })?;
    let tmp = tempfile::NamedTempFile::new_in(cache_dir).map_err(|e| ImageError::Io { what: "creating a temp file".into(), source: e })?;
    let io = |e| ImageError::Io { what: format!("writing {}", path.display()), source: e };
    let mut w = Newc::new(std::io::BufWriter::new(tmp));
    for d in ["dev", "proc", "sys", "tmp", "newroot", "moat", "lib", "lib/modules"] {
        w.dir(d).map_err(io)?;
    }
    w.entry("dev/console", 0o020600, (5, 1), &[]).map_err(io)?;
    w.file("init", 0o755, &agent_bytes).map_err(io)?;
    let mut dirs: Vec<String> = Vec::new();
    for (name, data) in &files {
        let mut acc = String::new();
        for part in name.split('/').collect::<Vec<_>>().split_last().map(|(_, d)| d.to_vec()).unwrap_or_default() {
            acc = if acc.is_empty() { part.to_string() } else { format!("{acc}/{part}") };
            if !dirs.contains(&acc) && acc != "lib" && acc != "lib/modules" {
                w.dir(&acc).map_err(io)?;
                dirs.push(acc.clone());
            }
        }
        w.file(name, 0o644, data).map_err(io)?;
    }
    let list: String = files.iter().map(|(n, _)| format!("/{n}\n")).collect();
    w.file("moat/modules", 0o644, list.as_bytes()).map_err(io)?;
    let tmp = w.finish().map_err(io)?.into_inner().map_err(|e| io(e.into_error()))?;
    tmp.persist(&path).map_err(|e| io(e.error))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse a newc archive back into (name, mode, data).
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at offset {off}");
            let field = |i: usize| u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16).unwrap() as usize;
            let (mode, size, namesize) = (field(1) as u32, field(6), field(11));
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            let data_start = (110 + namesize + 3) & !3;
            let data = b[data_start..data_start + size].to_vec();
            let next = (data_start + size + 3) & !3;
            off += next;
            b = &b[next..];
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn archive_holds_init_modules_and_list_and_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let mods = dir.path().join("mods");
        std::fs::create_dir_all(mods.join("kernel/drivers")).unwrap();
        std::fs::write(mods.join("kernel/drivers/a.ko"), b"AAA").unwrap();
        std::fs::write(mods.join("kernel/drivers/b.ko"), b"BBBBB").unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF-agent").unwrap();
        let k = Kernel { path: "/k".into(), release: "6.1-test".into(), modules_dir: mods.clone() };
        let list = vec![mods.join("kernel/drivers/b.ko"), mods.join("kernel/drivers/a.ko")];
        let cache = dir.path().join("cache");
        let p = build_initramfs(&cache, &k, &agent, &list).unwrap();
        let entries = parse(&std::fs::read(&p).unwrap());
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap_or_else(|| panic!("{n} in archive"));
        assert_eq!(get("init").2, b"\x7fELF-agent");
        assert_eq!(get("init").1, 0o100755);
        assert_eq!(get("dev/console").1, 0o020600);
        assert_eq!(get("lib/modules/6.1-test/kernel/drivers/a.ko").2, b"AAA");
        assert_eq!(
            String::from_utf8(get("moat/modules").2.clone()).unwrap(),
            "/lib/modules/6.1-test/kernel/drivers/b.ko\n/lib/modules/6.1-test/kernel/drivers/a.ko\n"
        );
        // Same inputs: same file, not rebuilt; a changed agent: a new file.
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        assert_eq!(build_initramfs(&cache, &k, &agent, &list).unwrap(), p);
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), mtime);
        std::fs::write(&agent, b"\x7fELF-agent-2").unwrap();
        assert_ne!(build_initramfs(&cache, &k, &agent, &list).unwrap(), p);
    }
}
