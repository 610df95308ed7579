//! An image a create names but the store lacks is made on first use, here and nowhere else: the
//! default image is built from its recipe, any other name is pulled as a registry reference.
//! Progress goes to the event log (kind `image`, message `NAME: …`), so every front shows the
//! same thing: `moat run` follows it, `moat events` lists it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use moat_api::{BuildImage, ImageProgress, PullImage, PullPolicy, RegistryLogin, IMAGE_EVENT, IMAGE_MISSING};

use super::Service;
use crate::error::ServiceError;

/// Layer progress is recorded at most this often (and when a layer is done): the event log is a
/// log, not a progress bar.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Service {
    /// Make `name` if the store lacks it and `pull` allows. Parallel creates of one missing image
    /// make it once: the others wait for it. Errors other than "not found" are left to the
    /// create's own lookup, which reports them.
    pub(crate) async fn ensure_image(
        self: &Arc<Self>,
        name: &str,
        pull: PullPolicy,
        login: Option<RegistryLogin>,
    ) -> Result<(), ServiceError> {
        let missing = || matches!(self.rt.images.resolve(name), Err(moat_image::ImageError::NotFound { .. }));
        if pull == PullPolicy::Never || !missing() {
            return Ok(());
        }
        let lock = self.image_locks.of(name);
        let _making = lock.lock().await;
        if !missing() {
            return Ok(());
        }
        let (how, made): (_, Pin<Box<dyn Stream<Item = ImageProgress> + Send>>) = if name == moat_api::DEFAULT_IMAGE {
            let req = BuildImage {
                name: name.to_string(),
                from: moat_api::DEFAULT_IMAGE_FROM.to_string(),
                packages: moat_api::DEFAULT_IMAGE_PACKAGES.iter().map(|p| p.to_string()).collect(),
            };
            ("building it from its recipe (a minute or two)", Box::pin(self.build_image(req)?))
        } else {
            let (username, password) = login.map(|l| (l.username, l.password)).unzip();
            let req = PullImage { reference: name.to_string(), username, password, ..PullImage::default() };
            ("pulling it", Box::pin(self.pull_image(req)?))
        };
        self.image_event(name, &format!("{IMAGE_MISSING} {how}"));
        self.follow_making(name, made).await
    }

    /// Record `made`'s progress as events until it is done.
    async fn follow_making(
        &self,
        name: &str,
        mut made: Pin<Box<dyn Stream<Item = ImageProgress> + Send>>,
    ) -> Result<(), ServiceError> {
        let mut last = Instant::now();
        while let Some(p) = made.next().await {
            match p {
                // A build's messages are its log lines: each is kept.
                ImageProgress::Progress { message } => self.image_event(name, &message),
                ImageProgress::Layer { digest, done, total } if last.elapsed() >= PROGRESS_EVERY || done == total => {
                    last = Instant::now();
                    let short = digest.trim_start_matches("sha256:").get(..12).unwrap_or(&digest).to_string();
                    let mib = |b: u64| b as f64 / (1 << 20) as f64;
                    self.image_event(name, &format!("layer {short}: {:.1} of {:.1} MiB", mib(done), mib(total)));
                }
                ImageProgress::Layer { .. } => {}
                ImageProgress::Done { image } => {
                    self.image_event(name, &format!("ready ({})", image.digest));
                    return Ok(());
                }
                ImageProgress::Error { error } => {
                    self.image_event(name, &format!("failed: {}", error.message));
                    return Err(ServiceError::new(
                        error.code,
                        format!("image {name} is not in the store and could not be made: {}", error.message),
                        format!("{}; or name another image (`minimal` is built in)", error.hint),
                    ));
                }
            }
        }
        Err(ServiceError::internal(format!("making image {name} ended without a result")))
    }

    fn image_event(&self, name: &str, message: &str) {
        tracing::info!(image = name, "{message}");
        let _ = self.db(|db| db.event(None, IMAGE_EVENT, &format!("{name}: {message}")));
    }
}
