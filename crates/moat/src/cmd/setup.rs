//! `moat setup`: install what the host is missing, then prepare everything a first run needs;
//! `moat setup --service` installs the daemon as a systemd service.

mod service;

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::cli::{HostArgs, SetupArgs};
use crate::cmd::doctor::which;
use crate::cmd::prepare_runtime;
use crate::error::Hinted;

/// A Debian package moat needs and how to tell it is present.
struct Prerequisite {
    package: &'static str,
    present: fn() -> bool,
}

fn has_cloud_kernel() -> bool {
    std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
            })
        })
        .unwrap_or(false)
}

/// In install order. qemu-utils comes after qemu-system-x86 on purpose: installing QEMU can
/// replace a newer qemu-utils from backports, so it is checked again afterwards.
const PREREQUISITES: &[Prerequisite] = &[
    Prerequisite { package: "qemu-system-x86", present: || which("qemu-system-x86_64").is_some() },
    Prerequisite { package: "linux-image-cloud-amd64", present: has_cloud_kernel },
    Prerequisite { package: "busybox-static", present: || Path::new("/bin/busybox").exists() },
    Prerequisite {
        package: "e2fsprogs",
        present: || which("mkfs.ext4").is_some() || Path::new("/sbin/mkfs.ext4").exists(),
    },
    Prerequisite { package: "qemu-utils", present: || which("qemu-img").is_some() },
    // `moat image build` makes images from Debian packages with it.
    Prerequisite {
        package: "debootstrap",
        present: || which("debootstrap").is_some() || Path::new("/usr/sbin/debootstrap").exists(),
    },
];

pub async fn setup(args: SetupArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let missing: Vec<&str> = PREREQUISITES.iter().filter(|p| !(p.present)()).map(|p| p.package).collect();
    if args.service {
        if !missing.is_empty() && !args.dry_run {
            eprintln!(
                "moat: warning: missing host packages the daemon needs: {}; run `sudo moat setup`",
                missing.join(" ")
            );
        }
        return service::install(&args);
    }
    if missing.is_empty() {
        eprintln!("moat: host packages: all present");
    } else if args.dry_run {
        println!("would install: {}", missing.join(" "));
        return Ok(0);
    } else {
        install(&missing)?;
    }
    if args.dry_run {
        return Ok(0);
    }
    eprintln!("moat: preparing kernel, initramfs and accelerator");
    let rt = prepare_runtime(host).await?;
    eprintln!("moat: building the built-in minimal image (the default image, Debian with Python, is built by the first `moat run`)");
    let image = rt.images.resolve("minimal")?;
    eprintln!(
        "moat: ready: QEMU {}, kernel {}, accelerator {}, image {} ({})",
        rt.qemu_version, rt.kernel.release, rt.accel.accel, image.name, image.digest
    );
    Ok(0)
}

fn install(missing: &[&str]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Hinted::new(
            format!("missing host packages: {}", missing.join(" ")),
            format!(
                "run `sudo moat setup`, or install them yourself: sudo apt-get install -y --no-install-recommends {}",
                missing.join(" ")
            ),
        )
        .into());
    }
    if which("apt-get").is_none() {
        return Err(Hinted::new(
            format!("missing host packages: {}", missing.join(" ")),
            "this host has no apt-get; install the equivalents with your package manager",
        )
        .into());
    }
    eprintln!("moat: installing {}", missing.join(" "));
    apt(&["update", "-qq"])?;
    for p in PREREQUISITES {
        // Checked again each time: installing one package can remove or bring another.
        if !(p.present)() {
            apt(&["install", "-y", "-qq", "--no-install-recommends", p.package])?;
        }
    }
    let still: Vec<&str> = PREREQUISITES.iter().filter(|p| !(p.present)()).map(|p| p.package).collect();
    if !still.is_empty() {
        return Err(Hinted::new(
            format!("still missing after apt-get install: {}", still.join(" ")),
            format!("run `apt-get install {}` and read apt's message", still.join(" ")),
        )
        .into());
    }
    Ok(())
}

fn apt(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        return Err(Hinted::new(
            format!("`apt-get {}` failed ({status})", args.join(" ")),
            "fix apt's reported problem and run `moat setup` again",
        )
        .into());
    }
    Ok(())
}
