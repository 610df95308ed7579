//! Images: list, inspect and remove them; pull (registries), import (archive uploads) and build
//! (debootstrap) them in the background, reporting progress as it goes.

use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use moat_api::{BuildImage, ErrorCode, ImageInfo, ImageProgress, PullImage, Reclaimed};
use moat_image::{Image, PullOptions, PullProgress};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::Service;
use crate::error::{image_error, ServiceError};

fn info(i: &Image) -> ImageInfo {
    ImageInfo {
        name: i.name.clone(),
        digest: i.digest.clone(),
        size_bytes: i.size_bytes,
        env: i.config.env.clone(),
        working_dir: i.config.working_dir.clone(),
        user: i.config.user.clone(),
        entrypoint: i.config.entrypoint.clone(),
        cmd: i.config.cmd.clone(),
        source: i.source.clone(),
        created_at: i.created as i64,
    }
}

fn outcome(result: Result<Image, ServiceError>) -> ImageProgress {
    match result {
        Ok(image) => ImageProgress::Done { image: info(&image) },
        Err(e) => ImageProgress::Error { error: e.into() },
    }
}

/// Progress messages, then one `done` or `error`. The operation goes on if nobody reads them.
fn progress(rx: UnboundedReceiver<ImageProgress>) -> impl Stream<Item = ImageProgress> + Send + 'static {
    UnboundedReceiverStream::new(rx)
}

fn spool_error(e: std::io::Error) -> ServiceError {
    ServiceError::new(ErrorCode::Internal, format!("cannot spool the upload: {e}"), "check free disk space")
}

/// `user:password` for a registry: both or neither.
pub(super) fn credentials(
    username: Option<String>,
    password: Option<String>,
) -> Result<Option<(String, String)>, ServiceError> {
    match (username, password) {
        (Some(u), Some(p)) => Ok(Some((u, p))),
        (None, None) => Ok(None),
        _ => Err(ServiceError::new(
            ErrorCode::InvalidRequest,
            "a username needs a password and a password a username",
            "give both, or neither for anonymous access",
        )),
    }
}

impl Service {
    pub fn images(&self) -> Result<Vec<ImageInfo>, ServiceError> {
        Ok(self.rt.images.list().map_err(image_error)?.iter().map(info).collect())
    }

    pub fn image(&self, name: &str) -> Result<ImageInfo, ServiceError> {
        Ok(info(&self.rt.images.resolve(name).map_err(image_error)?))
    }

    /// Remove an image's name; its base goes too when no other name and no sandbox uses it.
    /// Templates made of it go with it; sandboxes and snapshots on it keep it.
    pub async fn remove_image(&self, name: &str) -> Result<ImageInfo, ServiceError> {
        let image = self.rt.images.resolve(name).map_err(image_error)?;
        let users: Vec<String> =
            self.list()?.into_iter().filter(|s| s.image_digest == image.digest).map(|s| s.name).collect();
        if !users.is_empty() {
            return Err(ServiceError::new(
                ErrorCode::InvalidPhase,
                format!("image {name} is used by sandboxes {}", users.join(", ")),
                "remove those sandboxes first (`moat rm -f`)",
            ));
        }
        // Snapshot disks are layers on the image's base disk.
        let (templates, snapshots): (Vec<_>, Vec<_>) = self
            .snapshots(None)?
            .into_iter()
            .filter(|s| s.image_digest == image.digest)
            .partition(|s| s.kind == moat_api::SnapshotKind::Template);
        if !snapshots.is_empty() {
            let names: Vec<String> = snapshots.iter().map(|s| s.reference()).collect();
            return Err(ServiceError::new(
                ErrorCode::InUse,
                format!("image {name} is the base of snapshots {}", names.join(", ")),
                format!("remove them first (`moat snapshot rm {}`)", names.join(" ")),
            ));
        }
        for t in templates {
            self.remove_snapshot(&t.id).await?;
        }
        self.rt.images.remove(name).map_err(image_error)?;
        Ok(info(&image))
    }

    /// Remove cached layers, interrupted downloads and builds, and image files no name or
    /// sandbox needs.
    pub fn gc_images(&self) -> Result<Reclaimed, ServiceError> {
        let paths = tokio::task::block_in_place(|| self.image_gc())?;
        Ok(Reclaimed { paths, ..Reclaimed::default() })
    }

    /// Pull an image from a registry in the background.
    pub fn pull_image(
        self: &Arc<Self>,
        req: PullImage,
    ) -> Result<impl Stream<Item = ImageProgress> + Send + 'static, ServiceError> {
        moat_image::registry_of(&req.reference).map_err(image_error)?;
        moat_image::validate_image_name(req.name.as_deref().unwrap_or(&req.reference)).map_err(image_error)?;
        let options = PullOptions { insecure: req.insecure, credentials: credentials(req.username, req.password)? };
        let (tx, rx) = unbounded_channel::<ImageProgress>();
        let busy = self.hold();
        let svc = self.clone();
        tokio::spawn(async move {
            let _busy = busy;
            let progress_tx = tx.clone();
            let progress = move |p: PullProgress| {
                let _ = progress_tx.send(match p {
                    PullProgress::Message(message) => ImageProgress::Progress { message },
                    PullProgress::Layer { digest, done, total } => ImageProgress::Layer { digest, done, total },
                });
            };
            let result =
                moat_image::pull(&svc.rt.images, &req.reference, req.name.as_deref(), &options, &progress).await;
            if let Err(e) = &result {
                tracing::warn!(reference = %req.reference, error = %e, "pull failed");
            }
            let _ = tx.send(outcome(result.map_err(image_error)));
        });
        Ok(progress(rx))
    }

    /// Build a Debian image (debootstrap) in the background.
    pub fn build_image(
        self: &Arc<Self>,
        req: BuildImage,
    ) -> Result<impl Stream<Item = ImageProgress> + Send + 'static, ServiceError> {
        moat_image::validate_image_name(&req.name).map_err(image_error)?;
        let recipe = moat_image::DebianRecipe::from_ref(&req.from, &req.packages).map_err(image_error)?;
        let svc = self.clone();
        Ok(self.in_background(move |progress| {
            // Every line in the daemon's log too: a front shows only the current step.
            let mut logged = |line: &str| {
                tracing::info!(image = %req.name, "{line}");
                progress(line)
            };
            moat_image::build_debian(&svc.rt.images, &req.name, &recipe, &mut logged).map_err(image_error)
        }))
    }

    /// Import an image archive (OCI layout or `docker save`) read from `data`. It is spooled to a
    /// file in the store first (the archive's manifest may come last), then imported in the
    /// background.
    pub async fn import_image<S, B, E>(
        self: &Arc<Self>,
        name: Option<String>,
        mut data: S,
    ) -> Result<impl Stream<Item = ImageProgress> + Send + 'static, ServiceError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let _busy = self.hold(); // The upload itself may take longer than the idle timeout.
        let _spooling = self.rt.images.begin_operation().map_err(image_error)?;
        if let Some(name) = &name {
            moat_image::validate_image_name(name).map_err(image_error)?;
        }
        let spool =
            tempfile::Builder::new().prefix("tmp-upload-").tempfile_in(self.rt.images.root()).map_err(spool_error)?;
        let mut file = tokio::fs::File::from_std(spool.reopen().map_err(spool_error)?);
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                ServiceError::new(ErrorCode::InvalidRequest, format!("the upload broke off: {e}"), "send it again")
            })?;
            file.write_all(chunk.as_ref()).await.map_err(spool_error)?;
        }
        file.flush().await.ok();
        drop(file);
        let svc = self.clone();
        Ok(self.in_background(move |progress| {
            let archive = std::fs::File::open(spool.path()).map_err(|e| {
                ServiceError::new(ErrorCode::Internal, format!("cannot read the upload: {e}"), "send it again")
            })?;
            moat_image::import_archive(&svc.rt.images, std::io::BufReader::new(archive), name.as_deref(), progress)
                .map_err(image_error)
        }))
    }

    /// Run a long image operation on a blocking thread; its progress, then its result.
    fn in_background<F>(&self, op: F) -> impl Stream<Item = ImageProgress> + Send + 'static
    where
        F: FnOnce(&mut dyn FnMut(&str)) -> Result<Image, ServiceError> + Send + 'static,
    {
        let (tx, rx) = unbounded_channel::<ImageProgress>();
        let busy = self.hold();
        tokio::task::spawn_blocking(move || {
            let _busy = busy;
            let progress_tx = tx.clone();
            let mut progress = move |m: &str| {
                let _ = progress_tx.send(ImageProgress::Progress { message: m.to_string() });
            };
            let _ = tx.send(outcome(op(&mut progress)));
        });
        progress(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_credentials_come_in_pairs() {
        assert_eq!(credentials(None, None).expect("anonymous"), None);
        let pair = credentials(Some("u".into()), Some("p".into())).expect("a pair");
        assert_eq!(pair, Some(("u".into(), "p".into())));
        for (u, p) in [(Some("u".to_string()), None), (None, Some("p".to_string()))] {
            assert_eq!(credentials(u, p).expect_err("half a pair").code, ErrorCode::InvalidRequest);
        }
    }
}
