//! Image benchmarks against a real registry on loopback (Debian's `docker-registry`): pull +
//! unpack throughput next to a plain HTTP download of the same blob, and the first run of a
//! freshly pulled image next to a run of the built-in `minimal` image.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use rand::RngCore;

use crate::{median, ms};

const INSTALL: &str = "apt-get install -y docker-registry curl";

/// A registry process with its storage; killed on drop.
pub(crate) struct Registry {
    child: Child,
    pub(crate) addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub(crate) fn start() -> anyhow::Result<Registry> {
        let bin = Path::new("/usr/bin/docker-registry");
        if !bin.exists() {
            bail!("the image benchmark needs a local registry: {INSTALL}");
        }
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry")?;
        let registry = Registry { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on {} within 10 s", registry.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(registry)
    }
}

/// A tar holding `files` (path, bytes, mode) and symlinks (path → target).
fn tar(files: &[(&str, &[u8], u32)], links: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data)?;
    }
    for (path, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, path, target)?;
    }
    Ok(b.into_inner()?)
}

/// Push an image of busybox plus `mib` MiB of incompressible data; returns the data layer's
/// size and digest.
async fn push(addr: &str, repo: &str, mib: usize) -> anyhow::Result<(usize, String)> {
    let busybox = std::fs::read("/bin/busybox").context("the benchmark needs busybox-static")?;
    let base = tar(&[("bin/busybox", &busybox, 0o755)], &[("bin/sh", "busybox"), ("bin/true", "busybox")])?;
    let mut data = vec![0u8; mib << 20];
    rand::thread_rng().fill_bytes(&mut data);
    let big = tar(&[("data/blob.bin", &data, 0o644)], &[])?;
    drop(data);
    let media = "application/vnd.oci.image.layer.v1.tar";
    let layers = vec![ImageLayer::new(base, media.into(), None), ImageLayer::new(big, media.into(), None)];
    let size = layers[1].data.len();
    let digest = layers[1].sha256_digest();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["true"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.sha256_digest()).collect::<Vec<_>>()},
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![addr.to_string()]),
        ..ClientConfig::default()
    });
    let reference = format!("{addr}/{repo}:1").parse()?;
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    client.push(&reference, &layers, config, &RegistryAuth::Anonymous, None).await?;
    Ok((size, digest))
}

fn moat(moat: &Path, home: &Path, args: &[&str]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = Command::new(moat)
        .args(args)
        .env("MOAT_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running moat")?;
    if !out.status.success() {
        bail!("`moat {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed())
}

pub async fn bench(moat_bin: &Path, home: &Path, runs: usize, mib: usize) -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let (size, digest) = push(&registry.addr, "bench/big", mib).await?;
    let reference = format!("{}/bench/big:1", registry.addr);
    let blob_url = format!("http://{}/v2/bench/big/blobs/{digest}", registry.addr);
    let mut pulls = Vec::new();
    let mut downloads = Vec::new();
    let mut first_runs = Vec::new();
    let mut minimal_runs = Vec::new();
    for _ in 0..runs {
        // From nothing: no image, no cached layers.
        let _ = moat(moat_bin, home, &["image", "rm", &reference]);
        moat(moat_bin, home, &["image", "gc"])?;
        let t = Instant::now();
        let status = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &blob_url])
            .status()
            .with_context(|| format!("the baseline download needs curl: {INSTALL}"))?;
        downloads.push(t.elapsed());
        if !status.success() {
            bail!("curl {blob_url} failed: {status}");
        }
        pulls.push(moat(moat_bin, home, &["image", "pull", &reference])?);
        first_runs.push(moat(moat_bin, home, &["run", "--image", &reference, "--", "true"])?);
        minimal_runs.push(moat(moat_bin, home, &["run", "--image", "minimal", "--", "true"])?);
    }
    let _ = moat(moat_bin, home, &["image", "rm", &reference]);
    moat(moat_bin, home, &["image", "gc"])?;
    let mbps = |d: Duration| size as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let (pull, download) = (median(pulls), median(downloads));
    println!("\nimage pull from a registry on loopback ({mib} MiB data layer + busybox, median of {runs})");
    println!("  moat image pull (fetch, verify, unpack, ext4, qcow2) {:>10}  {:>7.1} MB/s", ms(pull), mbps(pull));
    println!("  curl of the same blob (baseline)               {:>10}  {:>7.1} MB/s", ms(download), mbps(download));
    println!("  ratio                                          {:>10.2}x", pull.as_secs_f64() / download.as_secs_f64());
    let (first, minimal) = (median(first_runs), median(minimal_runs));
    println!("\nfirst `moat run -- true` of the freshly pulled image (median of {runs})");
    println!("  pulled image                   {:>10}", ms(first));
    println!("  built-in minimal (baseline)    {:>10}", ms(minimal));
    println!("  ratio                          {:>10.2}x", first.as_secs_f64() / minimal.as_secs_f64());
    Ok(())
}
