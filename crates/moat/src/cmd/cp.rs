//! `moat cp`: copy files and directory trees between the host and a sandbox, with `docker cp`
//! semantics (see `moat_client::copy` for the rules; the MCP server's upload and download use
//! the same code).

use crate::cli::{CpArgs, HostArgs};
use crate::cmd::daemon::connect;
use crate::error::Hinted;

/// One side of a copy: a host path, or a path in a sandbox (`box:/path`).
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Host(String),
    Sandbox { sandbox: String, path: String },
}

fn side(arg: &str) -> Side {
    // `box:/p` names a sandbox; a host path with a colon needs a slash before it (`./a:b`).
    match arg.split_once(':') {
        Some((sandbox, path)) if !sandbox.is_empty() && !sandbox.contains('/') => {
            Side::Sandbox { sandbox: sandbox.to_string(), path: path.to_string() }
        }
        _ => Side::Host(arg.to_string()),
    }
}

pub async fn cp(args: CpArgs, host: &HostArgs) -> anyhow::Result<i32> {
    match (side(&args.src), side(&args.dest)) {
        (Side::Host(src), Side::Sandbox { sandbox, path }) => {
            let client = connect(host).await?;
            client.copy_to_sandbox(&src, &sandbox, &path).await?;
        }
        (Side::Sandbox { sandbox, path }, Side::Host(dest)) => {
            let client = connect(host).await?;
            client.copy_from_sandbox(&sandbox, &path, &dest).await?;
        }
        (Side::Host(_), Side::Host(_)) => {
            let hint = "write the sandbox side as BOX:PATH, e.g. `moat cp ./src box:/work`";
            return Err(Hinted::new("neither side is in a sandbox", hint).into());
        }
        (Side::Sandbox { .. }, Side::Sandbox { .. }) => {
            let hint = "copy through the host: `moat cp a:/x ./x && moat cp ./x b:/x`";
            return Err(Hinted::new("both sides are in sandboxes", hint).into());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_told_apart_like_docker_cp() {
        assert_eq!(side("box:/tmp/x"), Side::Sandbox { sandbox: "box".into(), path: "/tmp/x".into() });
        assert_eq!(side("./a:b"), Side::Host("./a:b".into()));
        assert_eq!(side("/abs/path"), Side::Host("/abs/path".into()));
        assert_eq!(side(":x"), Side::Host(":x".into()));
    }
}
