//! `moat image`: pull, import, build, list, inspect and remove images, through the daemon; and
//! making sure the image a new sandbox needs is there (pulled or built on first use).

use std::collections::HashMap;
use std::io::{IsTerminal, Read};

use anyhow::Context;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use moat_api::{BuildImage, CreateSandbox, ErrorCode, ImageInfo, ImageProgress, PullImage, RegistryLogin, SandboxInfo};
use moat_client::Client;

use crate::cli::{HostArgs, ImageCommand};
use crate::cmd::daemon::connect;

/// Whether long work shows every line of the tools it runs (`--verbose`), not only its steps.
pub static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Shows the progress of a long image operation on stderr (stdout stays the result): a bar per
/// layer and a spinner with the current step on a terminal, plain lines otherwise. The lines a
/// build's tools print (hundreds, from debootstrap) only turn the spinner, unless `--verbose`.
struct ProgressView {
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    /// The current step of a build, on a terminal.
    spinner: Option<ProgressBar>,
    /// Layers already reported done, when there are no bars.
    done: Vec<String>,
    verbose: bool,
}

impl ProgressView {
    fn new() -> ProgressView {
        let bars = std::io::stderr().is_terminal().then(|| (MultiProgress::new(), HashMap::new()));
        let verbose = VERBOSE.load(std::sync::atomic::Ordering::Relaxed);
        ProgressView { bars, spinner: None, done: Vec::new(), verbose }
    }

    fn show(&mut self, p: ImageProgress) {
        match p {
            ImageProgress::Progress { message } => {
                let tool_line = message.strip_prefix(moat_image::TOOL_OUTPUT);
                match (&self.bars, tool_line) {
                    (_, Some(line)) if !self.verbose => {
                        if let Some((multi, _)) = &self.bars {
                            let spinner = self.spinner.get_or_insert_with(|| {
                                let style = ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
                                    .expect("the template is valid");
                                let s = multi.add(ProgressBar::new_spinner().with_style(style));
                                s.enable_steady_tick(std::time::Duration::from_millis(120));
                                s
                            });
                            spinner.set_message(moat_api::escape_controls(line).into_owned());
                        }
                    }
                    (Some((multi, _)), _) => {
                        let _ = multi.println(format!("moat: {message}"));
                    }
                    (None, _) => eprintln!("moat: {message}"),
                }
            }
            ImageProgress::Layer { digest, done, total } => {
                let short = digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
                match &mut self.bars {
                    Some((multi, bars)) => {
                        let bar = bars.entry(digest).or_insert_with(|| {
                            let style = ProgressStyle::with_template(
                                "{prefix} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
                            )
                            .expect("the template is valid")
                            .progress_chars("=> ");
                            multi.add(ProgressBar::new(total).with_style(style).with_prefix(short))
                        });
                        bar.set_position(done);
                        if done >= total {
                            bar.finish();
                        }
                    }
                    None if done >= total && !self.done.contains(&digest) => {
                        eprintln!("moat: layer {short}: {:.1} MiB, verified", total as f64 / (1 << 20) as f64);
                        self.done.push(digest);
                    }
                    None => {}
                }
            }
            ImageProgress::Done { .. } | ImageProgress::Error { .. } => {
                if let Some(s) = self.spinner.take() {
                    s.finish_and_clear();
                }
            }
        }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
    }
}

/// Registry credentials for `reference` from the Docker config (`docker login`, credential
/// helpers), if it has any.
pub(crate) fn docker_credentials(reference: &str) -> anyhow::Result<Option<(String, String)>> {
    Ok(moat_image::docker_credentials(reference)?)
}

/// Pull `reference`, showing progress.
async fn pull(client: &Client, mut req: PullImage) -> anyhow::Result<ImageInfo> {
    if req.username.is_none() {
        if let Some((user, password)) = docker_credentials(&req.reference)? {
            req.username = Some(user);
            req.password = Some(password);
        }
    }
    let mut view = ProgressView::new();
    Ok(client.pull_image(&req, |p| view.show(p)).await?)
}

/// Create a sandbox. When its image is not in the store the daemon makes it first (the default
/// image is built from its recipe, any other name pulled): say so, lend the daemon the Docker
/// config's credentials for the registry, and show the daemon's progress events meanwhile.
pub async fn create_showing_image(client: &Client, req: &CreateSandbox) -> anyhow::Result<SandboxInfo> {
    let Some(name) = req.image.as_deref() else { return Ok(client.create(req).await?) };
    match client.image(name).await {
        Ok(_) => return Ok(client.create(req).await?),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    let mut req = req.clone();
    let announce = if name == moat_api::DEFAULT_IMAGE {
        format!(
            "moat: building the default image ({} with {}) once; this takes a minute or two",
            moat_api::DEFAULT_IMAGE_FROM,
            moat_api::DEFAULT_IMAGE_PACKAGES.join(", ")
        )
    } else {
        if req.registry_login.is_none() {
            req.registry_login =
                docker_credentials(name)?.map(|(username, password)| RegistryLogin { username, password });
        }
        format!("moat: image {name} is not in the store; pulling it")
    };
    // From now on: the daemon's events about this image, until the create returns. The notice
    // waits for the first of them, so a request the daemon refuses at once shows only its error.
    let events = client.events(-1, true).await?;
    let prefix = format!("{name}: ");
    let mut announced = false;
    let mut view = ProgressView::new();
    let show = events.for_each(|e| {
        if let Some(message) = e
            .ok()
            .filter(|e| e.kind == moat_api::IMAGE_EVENT)
            .and_then(|e| e.message.strip_prefix(&prefix).map(str::to_owned))
        {
            if !announced {
                announced = true;
                eprintln!("{announce}");
            }
            if !message.starts_with(moat_api::IMAGE_MISSING) {
                view.show(ImageProgress::Progress { message });
            }
        }
        std::future::ready(())
    });
    let created = client.create(&req);
    tokio::pin!(created);
    let info = tokio::select! {
        info = &mut created => info,
        _ = show => created.await,
    };
    Ok(info?)
}

pub async fn image(cmd: ImageCommand, host: &HostArgs) -> anyhow::Result<i32> {
    let client = connect(host).await?;
    match cmd {
        ImageCommand::Ls { json } => {
            let images = client.images().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                println!("{:<32}  {:<19}  {:>9}  {:<10}  SOURCE", "NAME", "DIGEST", "SIZE", "CREATED");
                for i in images {
                    let short = i.digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
                    println!(
                        "{:<32}  sha256:{short}  {:>7}MiB  {:<10}  {}",
                        i.name,
                        i.size_bytes >> 20,
                        crate::cmd::sandbox::ago_or_in(i.created_at),
                        i.source
                    );
                }
            }
        }
        ImageCommand::Pull { reference, name, insecure, username, password_stdin } => {
            let mut req = PullImage { reference, name, insecure, ..PullImage::default() };
            if password_stdin {
                let mut password = String::new();
                std::io::stdin().read_to_string(&mut password).context("reading the password from standard input")?;
                req.username = username;
                req.password = Some(password.trim_end_matches(['\n', '\r']).to_string());
            }
            let image = pull(&client, req).await?;
            println!("{} {}", image.name, image.digest);
        }
        ImageCommand::Import { file, name } => {
            let mut view = ProgressView::new();
            let image = if file.as_os_str() == "-" {
                client.import_image(tokio::io::stdin(), name.as_deref(), |p| view.show(p)).await?
            } else {
                let f = tokio::fs::File::open(&file).await.map_err(|e| {
                    let hint = "give a docker-save or OCI archive, or `-` for stdin";
                    crate::error::Hinted::new(format!("cannot open {}: {e}", file.display()), hint)
                })?;
                client.import_image(f, name.as_deref(), |p| view.show(p)).await?
            };
            println!("{} {}", image.name, image.digest);
        }
        ImageCommand::Build { name, from, packages } => {
            let mut view = ProgressView::new();
            let image = client.build_image(&BuildImage { name, from, packages }, |p| view.show(p)).await?;
            println!("{} {}", image.name, image.digest);
        }
        ImageCommand::Gc => {
            let reclaimed = client.image_gc().await?;
            for p in &reclaimed.paths {
                println!("{p}");
            }
            eprintln!("moat: removed {} files and directories", reclaimed.paths.len());
        }
        ImageCommand::Inspect { name } => println!("{}", serde_json::to_string_pretty(&client.image(&name).await?)?),
        ImageCommand::Rm { names } => {
            let mut failed = 0;
            for n in names {
                match client.remove_image(&n).await {
                    Ok(i) => println!("{}", i.name),
                    Err(e) => {
                        eprintln!("moat: error: {n}: {}", crate::error::render_error(&e));
                        failed += 1;
                    }
                }
            }
            return Ok(if failed == 0 { 0 } else { 1 });
        }
    }
    Ok(0)
}
