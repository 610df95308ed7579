//! Snapshots: take, list and remove them, revert and fork, pause and resume, and move them
//! through registries.

use hyper::Method;
use moat_api::{CreateSnapshot, Fork, Forked, Revert, SandboxInfo, SnapshotInfo};

use crate::{segment, Client, ClientError};

impl Client {
    pub async fn snapshot(&self, reference: &str, name: Option<String>) -> Result<SnapshotInfo, ClientError> {
        let body = CreateSnapshot { name };
        self.call(Method::POST, &format!("/v1/sandboxes/{}/snapshots", segment(reference)), Some(&body)).await
    }

    /// Ready snapshots of one sandbox, or all snapshots and templates.
    pub async fn snapshots(&self, sandbox: Option<&str>) -> Result<Vec<SnapshotInfo>, ClientError> {
        let path = match sandbox {
            Some(r) => format!("/v1/sandboxes/{}/snapshots", segment(r)),
            None => "/v1/snapshots".to_string(),
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Send a snapshot to a registry as an artifact other hosts can pull.
    pub async fn push_snapshot(
        &self,
        snapshot: &str,
        req: &moat_api::SnapshotTransfer,
    ) -> Result<moat_api::PushedSnapshot, ClientError> {
        self.call(Method::POST, &format!("/v1/snapshots/{}/push", segment(snapshot)), Some(req)).await
    }

    /// Fetch a snapshot artifact from a registry.
    pub async fn pull_snapshot(&self, req: &moat_api::SnapshotTransfer) -> Result<SnapshotInfo, ClientError> {
        self.call(Method::POST, "/v1/snapshots/pull", Some(req)).await
    }

    /// New sandboxes from a snapshot of no particular sandbox (a pulled one, say).
    pub async fn fork_snapshot(&self, snapshot: &str, req: &Fork) -> Result<Forked, ClientError> {
        self.call(Method::POST, &format!("/v1/snapshots/{}/fork", segment(snapshot)), Some(req)).await
    }

    pub async fn remove_snapshot(&self, reference: &str) -> Result<SnapshotInfo, ClientError> {
        self.call(Method::DELETE, &format!("/v1/snapshots/{}", segment(reference)), None::<&()>).await
    }

    pub async fn revert(&self, reference: &str, snapshot: &str) -> Result<SandboxInfo, ClientError> {
        let body = Revert { snapshot: snapshot.to_string() };
        self.call(Method::POST, &format!("/v1/sandboxes/{}/revert", segment(reference)), Some(&body)).await
    }

    pub async fn fork(&self, reference: &str, req: &Fork) -> Result<Forked, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/fork", segment(reference)), Some(req)).await
    }

    pub async fn pause(&self, reference: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/pause", segment(reference)), None::<&()>).await
    }

    pub async fn resume(&self, reference: &str) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/sandboxes/{}/resume", segment(reference)), None::<&()>).await
    }
}
