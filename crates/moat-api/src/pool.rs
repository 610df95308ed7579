//! Warm pools (`moat pool`, `/v1/pools`): sandboxes of an image and machine size restored ahead
//! of time and kept paused, so that a create asking for that image and size claims one instead of
//! restoring or booting.

use serde::{Deserialize, Serialize};

/// The most sandboxes one pool keeps.
pub const MAX_POOL_SIZE: u32 = 64;

/// `PUT /v1/pools`: keep `size` sandboxes of `image` at these sizes ready; size 0 ends the pool.
/// A create claims from the pool when it names the same image and sizes, has a network (any
/// mode but `none`) and no secrets, and neither `from` nor `template: false`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPool {
    /// An image the store has (pull or build it first).
    #[schema(min_length = 1, max_length = 255)]
    pub image: String,
    /// Sandboxes kept ready, 0 to 64; 0 removes the pool and its members.
    #[schema(maximum = 64)]
    pub size: u32,
    /// vCPUs of each member [default: the create default].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub vcpus: Option<u32>,
    /// Memory of each member in MiB [default: the create default].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 64, maximum = 262144)]
    pub memory_mib: Option<u32>,
    /// Root disk of each member in MiB [default: the create default].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 64, maximum = 16777216)]
    pub disk_mib: Option<u64>,
}

/// One pool and how full it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolInfo {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    /// Members it keeps.
    pub size: u32,
    /// Members restored, paused and ready to claim.
    pub ready: u32,
    /// Members being restored now.
    pub starting: u32,
    /// Creates this pool served since the daemon started.
    pub claimed: u64,
    /// Why the last refill failed, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
