//! `moat doctor --bundle`: a support bundle for a bug report. The daemon builds it, since it
//! alone knows every value to leave out (see `moat_daemon::service::bundle`); this side adds the
//! checks and the configuration as it sees them, and writes the file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use moat_api::CreateBundle;

use super::run_checks;
use crate::cli::{DoctorArgs, HostArgs};
use crate::cmd::daemon::connect;
use crate::error::Hinted;

pub async fn bundle(sandboxes: &[String], args: &DoctorArgs, host: &HostArgs) -> anyhow::Result<i32> {
    let Some(out) = &args.out else {
        return Err(Hinted::new(
            "--bundle needs a file to write",
            "add --out FILE.tar.gz, e.g. `moat doctor --bundle --out moat-bundle.tar.gz`",
        )
        .into());
    };
    // Refused before any work is done.
    if !args.force && out.symlink_metadata().is_ok() {
        return Err(Hinted::new(
            format!("{} exists", out.display()),
            "choose another --out, or add --force to overwrite it",
        )
        .into());
    }
    // A check that cannot run is itself worth reporting; the bundle is made either way.
    let doctor = match run_checks(host).await {
        Ok(checks) => serde_json::to_value(&checks)?,
        Err(e) => serde_json::json!({ "error": crate::error::render(&e) }),
    };
    let client = connect(host).await?;
    let req = CreateBundle {
        sandboxes: sandboxes.to_vec(),
        doctor: Some(doctor),
        config: crate::cmd::config::settings_json().as_object().cloned(),
    };
    let gz = client.bundle(&req).await.context("building the bundle")?;
    write_private(out, &gz, args.force)?;
    eprintln!(
        "moat: wrote {} ({} KiB); secrets, tokens and environment values the daemon knows are [REDACTED], but \
         look through it before you share it",
        out.display(),
        gz.len().div_ceil(1024)
    );
    Ok(0)
}

/// Write `data` to a new file of mode 0600; with `force`, replace an existing one (renamed into
/// place, so a reader never sees half a file and the old file's mode does not carry over).
fn write_private(out: &Path, data: &[u8], force: bool) -> anyhow::Result<()> {
    let target = if force {
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    } else {
        out.to_path_buf()
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .and_then(|()| if force { std::fs::rename(&target, out) } else { Ok(()) });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&target);
        let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
            "choose another --out, or add --force to overwrite it"
        } else {
            "check that its directory exists and is writable"
        };
        return Err(anyhow::Error::new(e).context(Hinted::new(format!("writing {}", out.display()), hint)));
    }
    Ok(())
}
