//! Warm pools.

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List the warm pools: size, members ready and starting, creates served.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep N sandboxes of an image and size restored and paused, so that `moat run` of that
    /// image and size starts in milliseconds. Members hold memory; 0 removes the pool.
    Set {
        #[command(flatten)]
        pool: PoolArgs,
        /// Sandboxes to keep ready (0 to 64).
        #[arg(long)]
        size: u32,
        /// Print the pool as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a pool and end its members (the same as `set --size 0`).
    Rm {
        #[command(flatten)]
        pool: PoolArgs,
    },
}

/// Which pool: an image and the sizes of the sandboxes it serves (those of `moat run`).
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// The image (it must be in the store: `moat image ls`).
    pub image: String,
    /// vCPUs of the sandboxes it serves.
    #[arg(long, default_value_t = moat_api::DEFAULT_VCPUS)]
    pub cpus: u32,
    /// Memory in MiB of the sandboxes it serves.
    #[arg(long, default_value_t = moat_api::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Root disk size in MiB of the sandboxes it serves.
    #[arg(long, default_value_t = moat_api::DEFAULT_DISK_MIB)]
    pub disk: u64,
}

impl PoolArgs {
    pub fn to_request(&self, size: u32) -> moat_api::SetPool {
        moat_api::SetPool {
            image: self.image.clone(),
            size,
            vcpus: Some(self.cpus),
            memory_mib: Some(self.memory),
            disk_mib: Some(self.disk),
        }
    }
}
