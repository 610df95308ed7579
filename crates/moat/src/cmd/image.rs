//! `moat image`: list, import, build, inspect and remove images, through the daemon.

use moat_api::BuildImage;

use crate::cli::{HostArgs, ImageCommand};
use crate::cmd::daemon::connect;

/// Progress lines on stderr, so stdout stays the result.
fn progress(line: &str) {
    eprintln!("moat: {line}");
}

pub async fn image(cmd: ImageCommand, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    match cmd {
        ImageCommand::Ls { json } => {
            let images = client.images().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                println!("{:<32}  {:<19}  {:>9}", "NAME", "DIGEST", "SIZE");
                for i in images {
                    let short = i.digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
                    println!("{:<32}  sha256:{short}  {:>7}MiB", i.name, i.size_bytes >> 20);
                }
            }
        }
        ImageCommand::Import { file, name } => {
            let image = if file.as_os_str() == "-" {
                client.import_image(tokio::io::stdin(), name.as_deref(), progress).await?
            } else {
                let f = tokio::fs::File::open(&file).await.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open {}: {e}\nhint: give a docker-save or OCI archive, or `-` for stdin",
                        file.display()
                    )
                })?;
                client.import_image(f, name.as_deref(), progress).await?
            };
            println!("{} {}", image.name, image.digest);
        }
        ImageCommand::Build { name, from, packages } => {
            let image = client.build_image(&BuildImage { name, from, packages }, progress).await?;
            println!("{} {}", image.name, image.digest);
        }
        ImageCommand::Inspect { name } => println!("{}", serde_json::to_string_pretty(&client.image(&name).await?)?),
        ImageCommand::Rm { names } => {
            let mut failed = 0;
            for n in names {
                match client.remove_image(&n).await {
                    Ok(i) => println!("{}", i.name),
                    Err(e) => {
                        eprintln!("moat: error: {n}: {e}");
                        failed += 1;
                    }
                }
            }
            return Ok(if failed == 0 { 0 } else { 1 });
        }
    }
    Ok(0)
}
