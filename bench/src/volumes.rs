//! Volumes and host directories: sequential write and read, and a small-file workload (untar of
//! a source-like tree, then `find` over it), in a named volume and in a host directory mount,
//! each next to the same on the sandbox's root disk, in the same sandbox and run.

use std::path::Path;

use anyhow::Context;

use crate::files::moat;
use crate::net::timed_in;

const BOX: &str = "bench-volumes";
const VOLUME: &str = "bench-volume";

/// Median guest seconds of `timed` over `runs`, each after `setup` in a fresh `$D` and with the
/// guest's caches dropped (`$D` is a new directory under `dir`).
fn measure(moat_bin: &Path, home: &Path, dir: &str, setup: &str, timed: &str, runs: usize) -> anyhow::Result<f64> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let prepare = format!("D={dir}/b; rm -rf $D; mkdir -p $D; {setup}; sync; echo 3 > /proc/sys/vm/drop_caches");
        moat(moat_bin, home, &["exec", BOX, "--", "sh", "-c", &prepare])?;
        let timed = format!("D={dir}/b; {timed}");
        v.push(timed_in(&|args| moat(moat_bin, home, args).map(|(_, out)| out), BOX, &timed)?);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// A tar of `files` small files in 20-file directories, like a source tree.
fn source_tree(dir: &Path, files: usize) -> anyhow::Result<std::path::PathBuf> {
    let tree = dir.join("tree");
    for i in 0..files {
        let sub = tree.join(format!("pkg{}", i / 20));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("mod{i}.rs")), "fn main() { println!(\"hello\"); }\n".repeat(1 + i % 60))?;
    }
    let tar = dir.join("tree.tar");
    let ok = std::process::Command::new("tar").arg("-C").arg(dir).arg("-cf").arg(&tar).arg("tree").status()?;
    anyhow::ensure!(ok.success(), "tar failed");
    Ok(tar)
}

pub async fn bench(moat_bin: &Path, home: &Path, runs: usize, mib: usize, files: usize) -> anyhow::Result<()> {
    let _ = moat(moat_bin, home, &["rm", "-f", BOX]);
    let _ = moat(moat_bin, home, &["volume", "rm", VOLUME]);
    moat(moat_bin, home, &["volume", "create", VOLUME, "--size", &format!("{}M", mib * 2 + 256)])?;
    let host = tempfile::tempdir()?;
    let tar = source_tree(host.path(), files)?;
    let shared = host.path().join("shared");
    std::fs::create_dir(&shared)?;
    let (vol, hostdir) = (format!("{VOLUME}:/vol"), format!("{}:/host", shared.display()));
    let create = ["run", "-d", "--name", BOX, "--image", "minimal", "--memory", "1024", "-v", &vol, "-v", &hostdir];
    moat(moat_bin, home, &create)?;
    let result = async {
        moat(moat_bin, home, &["cp", tar.to_str().context("a UTF-8 temp path")?, &format!("{BOX}:/tmp/tree.tar")])?;
        let write = format!("dd if=/dev/zero of=$D/seq bs=1M count={mib} conv=fsync 2>/dev/null");
        let read = "dd if=$D/seq of=/dev/null bs=1M 2>/dev/null";
        let small = "tar -xf /tmp/tree.tar -C $D && find $D | wc -l >/dev/null && sync";
        println!(
            "\nvolumes and host directories ({mib} MiB sequential, {files} small files; guest clock, median of {runs})"
        );
        let mb = (mib << 20) as f64 / 1e6;
        let mut root = [0.0; 3];
        for (label, dir) in [("root disk (baseline)", "/root"), ("named volume", "/vol"), ("host directory", "/host")] {
            let w = measure(moat_bin, home, dir, "true", &write, runs)?;
            let r = measure(moat_bin, home, dir, &write, read, runs)?;
            let s = measure(moat_bin, home, dir, "true", small, runs)?;
            if dir == "/root" {
                root = [w, r, s];
            }
            println!(
                "  {label:<22} write {:>7.1} MB/s ({:.2}x)  read {:>7.1} MB/s ({:.2}x)  small files {:>6.2} s ({:.2}x)",
                mb / w,
                w / root[0],
                mb / r,
                r / root[1],
                s,
                s / root[2]
            );
        }
        anyhow::Ok(())
    }
    .await;
    let _ = moat(moat_bin, home, &["rm", "-f", BOX]);
    let _ = moat(moat_bin, home, &["volume", "rm", VOLUME]);
    result
}
