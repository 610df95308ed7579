//! Images and volumes.

use std::path::PathBuf;

use clap::Subcommand;

use super::parse_size;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from a registry (Docker Hub, GHCR, a private registry).
    ///
    /// Credentials come from the Docker config (`docker login`, credential helpers) unless given
    /// here. Plain http is used only for registries on localhost, or with --insecure.
    Pull {
        /// [REGISTRY/]REPOSITORY[:TAG][@DIGEST], e.g. debian:bookworm-slim or ghcr.io/org/app:1.2.
        reference: String,
        /// Name of the image in the store [default: the reference as written].
        #[arg(long)]
        name: Option<String>,
        /// Allow plain http to a registry that is not on localhost.
        #[arg(long)]
        insecure: bool,
        /// Registry user; the password is read from standard input (see --password-stdin).
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password (or token) from standard input.
        #[arg(long, requires = "username")]
        password_stdin: bool,
    },
    /// Import a `docker save` tarball or an OCI image-layout archive (`-` reads standard input).
    Import {
        /// The archive, or `-` for standard input.
        file: PathBuf,
        /// Name of the image [default: the archive's first tag].
        #[arg(long)]
        name: Option<String>,
    },
    /// Build an image from Debian packages with debootstrap (no registry needed).
    Build {
        /// Name of the new image.
        name: String,
        /// Base: debian:bookworm (or debian:12, bookworm).
        #[arg(long, default_value = "debian:bookworm")]
        from: String,
        /// Packages to install, comma-separated (e.g. python3,git).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
    },
    /// Show an image's digest, size and config.
    Inspect { name: String },
    /// Remove cached layers, interrupted pulls and builds, and image files that no image name
    /// and no sandbox needs.
    Gc,
    /// Remove images (refused while a sandbox uses one).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: an empty ext4 file system in a sparse file, which takes only what is
    /// written to it.
    Create {
        /// Name of the volume (the rules of sandbox names).
        name: String,
        /// Size of its file system, 16M to 16T (e.g. 512M, 10G, 1T) [default: 10G].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<u64>,
    },
    /// List volumes.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's sizes and the sandboxes that mount it.
    Inspect {
        /// Volume name, id or unique id prefix.
        volume: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove volumes and their data. Refused while sandboxes mount one; with --force, only while
    /// a running sandbox does.
    Rm {
        /// Remove a volume that stopped sandboxes still mount (they do not start again until
        /// their mount of it is gone).
        #[arg(short, long)]
        force: bool,
        /// Volume names, ids or unique id prefixes.
        #[arg(required = true)]
        volumes: Vec<String>,
    },
}
