//! Serving a host directory mount (`moat run -v ./src:/src`): the guest agent mounts a FUSE file
//! system whose calls come over one channel of the agent link; a [`moat_hostfs::Server`] carries
//! them out beneath the host directory and the answers go back on the same channel.
//!
//! Memory stays bounded whatever the guest sends: at most [`MAX_IN_FLIGHT`] calls are carried
//! out or waiting to be answered at once, and the next call is read from the channel only when
//! one of them is free, so a flooding guest waits on the link's credit.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use moat_hostfs::Server;
use moat_proto::hostfs::{encode, Answer, Call, Decoder};
use moat_proto::{AgentError, ErrorCode, ExitStatus, Request};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::agent_link::{AgentLink, Exec, ExecEvent, LinkError};
use crate::{Sandbox, SandboxError};

/// Calls of one mount carried out (or answered and not yet sent) at once.
pub const MAX_IN_FLIGHT: usize = 8;

/// How much of what the agent says on stderr is kept for the error.
const STDERR_KEPT: usize = 4096;

/// A mount the agent has made (or found from before a reconnect or restore), ready to serve.
pub struct HostMount {
    stream: Exec,
    guest_path: String,
}

/// Ask the agent in `sandbox` to mount a host directory at `guest_path`. Fails with
/// [`LinkError::Agent`] carrying the agent's reason when the guest could not mount it. The
/// guest's `readonly` is a courtesy: the [`Server`] given to [`HostMount::run`] enforces it.
pub async fn open(sandbox: &Sandbox, guest_path: &str, readonly: bool) -> Result<HostMount, SandboxError> {
    HostMount::open_on(&sandbox.link(), guest_path, readonly).await
}

/// Open the mount at `guest_path` in `sandbox` for the directory `server` shares, and serve it
/// until its channel ends (see [`HostMount::run`]). Use [`open`] and [`HostMount::run`] apart
/// to learn whether the guest could mount it before serving.
pub async fn serve(sandbox: &Sandbox, guest_path: &str, server: Arc<Server>) -> Result<(), SandboxError> {
    open(sandbox, guest_path, server.options().readonly).await?.run(server).await
}

impl HostMount {
    /// [`open`] over a given link.
    pub async fn open_on(link: &Arc<AgentLink>, guest_path: &str, readonly: bool) -> Result<HostMount, SandboxError> {
        let request = Request::HostMount { path: guest_path.to_owned(), readonly };
        let stream = link.file_stream(request).await?;
        tracing::debug!(path = guest_path, channel = stream.channel(), "host mount opened");
        Ok(HostMount { stream, guest_path: guest_path.to_owned() })
    }

    /// Answer the guest's calls with `server` until the channel ends. `Ok` when the agent
    /// closed it (the guest unmounted, or a later channel took the mount over); an error when
    /// the link broke, the agent reported a failure, or the guest sent something that is not a
    /// call.
    ///
    /// Cancel-safe: dropping the future closes the channel, and the agent keeps the mount's
    /// calls waiting for the next one. Calls already running finish on their threads and their
    /// answers are dropped.
    pub async fn run(self, server: Arc<Server>) -> Result<(), SandboxError> {
        let HostMount { mut stream, guest_path } = self;
        let channel = stream.channel();
        let control = stream.control();
        // Answers go out in the order they are ready, each holding its call's slot until sent.
        let (answers, mut ready) = mpsc::channel::<(Vec<u8>, OwnedSemaphorePermit)>(MAX_IN_FLIGHT);
        let writer = async move {
            while let Some((bytes, _slot)) = ready.recv().await {
                control.write_stdin(&bytes).await?;
            }
            Ok(())
        };
        tokio::pin!(writer);
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut calls = Decoder::default();
        let mut stderr = Vec::new();
        loop {
            // The writer only ends on an error: this loop holds a sender. While it has not, the
            // futures raced against it lose nothing when it wins.
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                end = &mut writer => return ended(end),
            };
            let call = loop {
                match calls.next::<Call>() {
                    Ok(Some(call)) => break call,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(path = %guest_path, channel, error = %e, "the guest broke the host-mount protocol");
                        let reason = format!("the host mount at {guest_path} sent a bad call: {e}");
                        return Err(LinkError::Protocol { channel, reason }.into());
                    }
                }
                let event = tokio::select! {
                    event = stream.next_event() => event,
                    end = &mut writer => return ended(end),
                };
                match event {
                    Ok(ExecEvent::Stdout(data)) => calls.push(&data),
                    Ok(ExecEvent::Stderr(data)) => {
                        let room = STDERR_KEPT.saturating_sub(stderr.len());
                        stderr.extend_from_slice(&data[..data.len().min(room)]);
                    }
                    Ok(ExecEvent::Exit(status)) => return exited(&guest_path, status, &stderr),
                    Err(e) => return ended(Err(e)),
                }
            };
            let (server, answers) = (server.clone(), answers.clone());
            tokio::task::spawn_blocking(move || {
                let result =
                    std::panic::catch_unwind(AssertUnwindSafe(|| server.call(call.op))).unwrap_or(Err(libc::EIO));
                let mut bytes = Vec::new();
                encode(&Answer { id: call.id, result }, &mut bytes);
                // Fails only once the mount is no longer served: no one is left to answer.
                let _ = answers.blocking_send((bytes, slot));
            });
        }
    }
}

/// The channel's end as seen by the link: the agent closing it is the normal end.
fn ended(end: Result<(), LinkError>) -> Result<(), SandboxError> {
    match end {
        Ok(()) | Err(LinkError::Closed) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The agent ended the mount's channel as a stream ends: 0, or 1 and the reason on stderr.
fn exited(guest_path: &str, status: ExitStatus, stderr: &[u8]) -> Result<(), SandboxError> {
    if status.code == Some(0) {
        return Ok(());
    }
    let said = String::from_utf8_lossy(stderr);
    let message = match said.trim() {
        "" => format!("the host mount at {guest_path} ended with {status:?}"),
        said => format!("the host mount at {guest_path} ended: {said}"),
    };
    Err(LinkError::Agent(AgentError { code: ErrorCode::Internal, message }).into())
}

#[cfg(test)]
mod tests;
