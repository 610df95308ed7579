//! Copy benchmarks: `moat cp` of a 256 MB file into and out of a sandbox next to the guest
//! writing and reading the same number of bytes on its own disk (`dd` in the guest), and the exec
//! round trip while a copy runs next to the same round trip on an idle link.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moat_api::ExecStart;
use moat_client::Client;
use rand::RngCore;

use crate::{median, ms};

const BOX: &str = "bench-cp";

/// Run the `moat` CLI against `home`; its wall time and standard output.
pub(crate) fn moat(moat: &Path, home: &Path, args: &[&str]) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let out =
        Command::new(moat).args(args).env("MOAT_HOME", home).stdin(Stdio::null()).output().context("running moat")?;
    if !out.status.success() {
        bail!("`moat {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok((t.elapsed(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Seconds a shell snippet takes inside the guest, by the guest's clock.
fn guest_seconds(moat_bin: &Path, home: &Path, script: &str) -> anyhow::Result<f64> {
    let timed = format!("read s _ < /proc/uptime; {script}; read e _ < /proc/uptime; echo $s $e");
    let (_, out) = moat(moat_bin, home, &["exec", BOX, "--", "sh", "-c", &timed])?;
    let t: Vec<f64> = out.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    match t[..] {
        [s, e] => Ok((e - s).max(0.01)),
        _ => bail!("unexpected guest timing output {out:?}"),
    }
}

async fn exec_rtts(client: &Client, n: usize) -> anyhow::Result<Vec<Duration>> {
    let start = ExecStart { argv: vec!["true".into()], ..Default::default() };
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.exec(BOX, &start).await?.collect().await?;
        v.push(t.elapsed());
    }
    Ok(v)
}

pub async fn bench(moat_bin: &Path, home: &Path, mib: usize) -> anyhow::Result<()> {
    let _ = moat(moat_bin, home, &["rm", "-f", BOX]);
    moat(moat_bin, home, &["run", "-d", "--name", BOX, "--image", "minimal", "--memory", "1024"])?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("blob.bin");
    let mut data = vec![0u8; mib << 20];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(&file, &data)?;
    drop(data);
    let mb = (mib << 20) as f64 / 1e6;

    let dd_write =
        guest_seconds(moat_bin, home, &format!("dd if=/dev/zero of=/root/dd.bin bs=1M count={mib} 2>/dev/null"))?;
    let (up, _) = moat(moat_bin, home, &["cp", file.to_str().unwrap(), &format!("{BOX}:/root/up.bin")])?;
    let dd_read = guest_seconds(moat_bin, home, "dd if=/root/up.bin of=/dev/null bs=1M 2>/dev/null")?;
    let back = dir.path().join("back.bin");
    let (down, _) = moat(moat_bin, home, &["cp", &format!("{BOX}:/root/up.bin"), back.to_str().unwrap()])?;
    if std::fs::metadata(&back)?.len() != (mib << 20) as u64 {
        bail!("the copy back has the wrong size");
    }
    println!("\nmoat cp of a {mib} MiB file (one run each)");
    println!("  host → guest (moat cp)         {:>8.1} MB/s", mb / up.as_secs_f64());
    println!(
        "  guest dd to its disk (baseline){:>8.1} MB/s   ratio {:.2}x",
        mb / dd_write,
        dd_write / up.as_secs_f64()
    );
    println!("  guest → host (moat cp)         {:>8.1} MB/s", mb / down.as_secs_f64());
    println!(
        "  guest dd from its disk (base.) {:>8.1} MB/s   ratio {:.2}x",
        mb / dd_read,
        dd_read / down.as_secs_f64()
    );

    // Exec round trips on an idle link, then while the same file is copied in again.
    let client = Client::new(&home.join("moat.sock"));
    let idle = median(exec_rtts(&client, 20).await?);
    let copying = {
        let (moat_bin, home, file) = (moat_bin.to_path_buf(), home.to_path_buf(), file.clone());
        let copy = std::thread::spawn(move || {
            moat(&moat_bin, &home, &["cp", file.to_str().unwrap(), &format!("{BOX}:/root/again.bin")])
        });
        let mut v = Vec::new();
        while !copy.is_finished() {
            v.extend(exec_rtts(&client, 1).await?);
        }
        copy.join().map_err(|_| anyhow::anyhow!("the copy thread panicked"))??;
        v
    };
    let n = copying.len();
    let busy = median(copying);
    println!("\nexec round trip of `true` (median)");
    println!("  idle link (baseline)           {:>10}", ms(idle));
    println!(
        "  during a {mib} MiB copy ({n} execs) {:>10}   ratio {:.2}x",
        ms(busy),
        busy.as_secs_f64() / idle.as_secs_f64()
    );
    moat(moat_bin, home, &["rm", "-f", BOX])?;
    Ok(())
}
