//! Named volumes: ext4 disks of their own that outlive the sandboxes they are mounted in.

use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

/// A volume's size when the request names none: 10 GiB (sparse: it takes what it holds).
pub const DEFAULT_VOLUME_BYTES: u64 = 10 << 30;
/// The smallest volume: room for ext4's journal and metadata with space left for files.
pub const MIN_VOLUME_BYTES: u64 = 16 << 20;
/// The largest volume: 16 TiB.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;
/// Volume sizes are rounded up to this, a multiple of every ext4 block size up to 4 KiB, so the
/// file system fills its file exactly.
pub const VOLUME_SIZE_STEP: u64 = 4096;
const _: () =
    assert!(MIN_VOLUME_BYTES.is_multiple_of(VOLUME_SIZE_STEP) && MAX_VOLUME_BYTES.is_multiple_of(VOLUME_SIZE_STEP));

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Unique among volumes; the rules of sandbox names.
    #[schema(min_length = 1, max_length = 63, pattern = r"^(?![0-9A-Fa-f]+$)[A-Za-z0-9][A-Za-z0-9._-]*$")]
    pub name: String,
    /// The file system's size in bytes, 16 MiB to 16 TiB, rounded up to a multiple of 4 KiB
    /// [default: 10 GiB]. The file is sparse: the host's disk holds only what is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 16777216, maximum = 17592186044416_u64)]
    pub size_bytes: Option<u64>,
}

impl CreateVolume {
    /// The size the volume gets (the default, rounded up to [`VOLUME_SIZE_STEP`]), or why it is
    /// out of range.
    pub fn checked_size(&self) -> Result<u64, String> {
        let asked = self.size_bytes.unwrap_or(DEFAULT_VOLUME_BYTES);
        if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&asked) {
            return Err(format!("a volume of {asked} bytes is out of range"));
        }
        // Both bounds are multiples of the step (asserted above): rounding up stays within them.
        Ok(asked.div_ceil(VOLUME_SIZE_STEP) * VOLUME_SIZE_STEP)
    }
}

/// A volume's name: the rules of sandbox names.
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    crate::validate_name(name).map_err(|e| e.replacen("sandbox name", "volume name", 1))
}

/// A named volume (`GET /v1/volumes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeInfo {
    pub id: String,
    pub name: String,
    /// The file system's size.
    pub size_bytes: u64,
    /// Bytes in use inside the file system, as its superblock last recorded them (a guest that
    /// has it mounted writes the count back from time to time); absent when the volume holds no
    /// ext4 file system the daemon can read (a guest reformatted it).
    pub used_bytes: Option<u64>,
    /// Bytes the volume's sparse file takes on the host's disk.
    pub allocated_bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The sandboxes that mount it.
    pub users: Vec<VolumeUser>,
}

/// A sandbox that mounts a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeUser {
    pub sandbox_id: String,
    pub sandbox_name: String,
    /// Where the sandbox sees the volume.
    pub path: String,
    pub readonly: bool,
    /// Whether the sandbox is live now (booting, running, stopping…), so the volume is attached.
    pub running: bool,
}

/// `DELETE /v1/volumes/{ref}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveVolumeQuery {
    /// Remove a volume that sandboxes at rest still mount (they no longer start until their
    /// mount is removed). A volume mounted in a running sandbox is never removed.
    #[serde(default)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, size: Option<u64>) -> CreateVolume {
        CreateVolume { name: name.into(), size_bytes: size }
    }

    #[test]
    fn sizes_default_round_up_and_stay_in_bounds() {
        assert_eq!(create("data", None).checked_size(), Ok(10 << 30));
        assert_eq!(create("data", Some(16 << 20)).checked_size(), Ok(16 << 20));
        assert_eq!(create("data", Some((16 << 20) + 1)).checked_size(), Ok((16 << 20) + 4096));
        assert_eq!(create("data", Some((16 << 40) - 1)).checked_size(), Ok(16 << 40));
        assert_eq!(create("data", Some(16 << 40)).checked_size(), Ok(16 << 40));
        for bad in [0, 1024, (16 << 20) - 1, (16 << 40) + 1, 100 << 40, u64::MAX] {
            let e = create("data", Some(bad)).checked_size().unwrap_err();
            assert!(e.contains("out of range") && e.contains(&bad.to_string()), "{bad}: {e}");
        }
    }

    #[test]
    fn names_follow_the_rules_of_sandbox_names() {
        for bad in ["", "-x", "a b", "a/b", "deadbeef", &"x".repeat(64)] {
            let e = validate_volume_name(bad).unwrap_err();
            assert!(e.starts_with("volume name"), "{bad:?}: {e}");
        }
        assert!(validate_volume_name("web-1.cache_a").is_ok());
    }
}
