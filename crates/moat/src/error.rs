//! How the CLI shows an error: its message, each cause on a `caused by:` line, then the hint of
//! the first error in the chain that has one (see `moat-hint`).

use std::borrow::Cow;
use std::error::Error;

pub use moat_hint::Hinted;
use moat_hint::{hint_of, Hint, Report};

/// The hint of `e` when it is one of the error types that reach the CLI. Wrappers give their inner
/// error's hint themselves; this names the types that can stand anywhere in an `anyhow` chain.
fn hint(e: &(dyn Error + 'static)) -> Option<Cow<'static, str>> {
    hint_of::<Hinted>(e)
        .or_else(|| hint_of::<moat_client::ClientError>(e))
        .or_else(|| hint_of::<moat_client::CopyError>(e))
        .or_else(|| hint_of::<crate::config::ConfigError>(e))
        .or_else(|| hint_of::<moat_daemon::ServeError>(e))
        .or_else(|| hint_of::<moat_daemon::ServiceError>(e))
        .or_else(|| hint_of::<moat_daemon::StateError>(e))
        .or_else(|| hint_of::<moat_daemon::state::backup::BackupError>(e))
        .or_else(|| hint_of::<moat_daemon::listen::ListenError>(e))
        .or_else(|| hint_of::<moat_sandbox::SandboxError>(e))
        .or_else(|| hint_of::<moat_sandbox::LinkError>(e))
        .or_else(|| hint_of::<moat_sandbox::HomeAccessError>(e))
        .or_else(|| hint_of::<moat_sandbox::ShapeError>(e))
        .or_else(|| hint_of::<moat_image::ImageError>(e))
        .or_else(|| hint_of::<moat_vmm::VmmError>(e))
        .or_else(|| hint_of::<moat_vmm::QmpError>(e))
        .or_else(|| hint_of::<moat_mcp::McpError>(e))
        .or_else(|| hint_of::<moat_mcp::PolicyError>(e))
        .or_else(|| hint_of::<moat_mcp::HostPathError>(e))
}

/// `e` as the CLI prints it after `moat: error: `, terminal controls escaped: errors can quote
/// the guest's console (a failed boot).
pub fn render(e: &anyhow::Error) -> String {
    let error: &(dyn Error + 'static) = e.as_ref();
    let report = Report::find(error, hint);
    let text = match report.hint() {
        Some(_) => report.to_string(),
        // `.context(Hinted::new(..))` keeps its Hinted where only anyhow's own downcast finds it.
        None => Report::with_hint(error, e.downcast_ref::<Hinted>().and_then(Hint::hint)).to_string(),
    };
    moat_api::escape_controls(&text).into_owned()
}

/// A typed error on its own (not in an `anyhow` chain), rendered the same way.
pub fn render_error<E: Error + Hint + 'static>(e: &E) -> String {
    moat_api::escape_controls(&Report::new(e).to_string()).into_owned()
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn the_chain_is_printed_once_and_the_first_hint_last() {
        let inner = moat_client::ClientError::Connect {
            path: "/run/moat.sock".into(),
            source: std::io::Error::other("connection refused"),
        };
        let e = Err::<(), _>(inner).context("starting the daemon").unwrap_err();
        assert_eq!(
            render(&e),
            "starting the daemon\ncaused by: cannot reach the moat daemon at /run/moat.sock\ncaused by: connection \
             refused\nhint: start it with `moat serve` (the CLI starts one on its own)"
        );
    }

    #[test]
    fn hinted_errors_are_found_as_errors_and_as_context() {
        let e = anyhow::Error::from(Hinted::new("neither side is in a sandbox", "write BOX:PATH"));
        assert_eq!(render(&e), "neither side is in a sandbox\nhint: write BOX:PATH");
        let e = Err::<(), _>(std::io::Error::other("gone"))
            .context(Hinted::new("cannot open x", "give an archive"))
            .unwrap_err();
        assert_eq!(render(&e), "cannot open x\ncaused by: gone\nhint: give an archive");
        let e = anyhow::anyhow!("plain \x1b[31m");
        assert_eq!(render(&e), "plain \\x1b[31m");
    }
}
