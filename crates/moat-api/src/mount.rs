//! Mounts: named volumes and host directories a sandbox sees at a path of its own.

use serde::{Deserialize, Serialize};

/// The most mounts one sandbox may have (volumes and host directories together).
pub const MAX_MOUNTS: usize = 16;

/// What a mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// A named volume (`moat volume create`): an ext4 disk of its own, plugged in while the
    /// sandbox runs. Read-write in one running sandbox at a time; read-only in any number.
    Volume,
    /// A directory of the host, live both ways; the daemon resolves every path the guest uses
    /// beneath it and enforces `readonly` itself.
    Host,
}

/// One mount: `-v SOURCE:TARGET[:ro]` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    #[serde(rename = "type")]
    pub kind: MountType,
    /// A volume's name or id, or an absolute directory of the host (as the daemon sees it).
    #[schema(min_length = 1, max_length = 4096)]
    pub source: String,
    /// Where the guest sees it: an absolute path, not `/` and not under `/proc`, `/sys`, `/dev`.
    #[schema(min_length = 2, max_length = 4096)]
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
}

impl Mount {
    /// `SOURCE:TARGET[:ro|:rw]`: a source with a `/` (or `.`, `..`, `~`-less relative path
    /// starting with `./`) is a host directory, made absolute against `cwd`; anything else names
    /// a volume.
    pub fn parse(spec: &str, cwd: &std::path::Path) -> Result<Mount, String> {
        let (rest, readonly) = match spec.rsplit_once(':') {
            Some((rest, "ro")) => (rest, true),
            Some((rest, "rw")) => (rest, false),
            _ => (spec, false),
        };
        let (source, target) = rest
            .split_once(':')
            .ok_or_else(|| format!("-v {spec:?}: expected SOURCE:TARGET[:ro], e.g. `work:/work` or `./src:/src:ro`"))?;
        let host = source.starts_with('/') || source.starts_with("./") || source.starts_with("../") || source == ".";
        let (kind, source) = if host {
            (MountType::Host, cwd.join(source).to_string_lossy().into_owned())
        } else {
            (MountType::Volume, source.to_string())
        };
        let mount = Mount { kind, source, target: target.to_string(), readonly };
        mount.validate()?;
        Ok(mount)
    }

    /// Checks everything that needs no host state: the target path, the source's form.
    pub fn validate(&self) -> Result<(), String> {
        validate_target(&self.target)?;
        match self.kind {
            MountType::Volume => {
                crate::validate_volume_name(&self.source).map_err(|e| format!("mount of {:?}: {e}", self.source))
            }
            MountType::Host => {
                if !self.source.starts_with('/') || self.source.len() > 4096 || self.source.contains('\0') {
                    return Err(format!(
                        "host directory {:?} must be an absolute path without NUL, at most 4096 bytes",
                        self.source
                    ));
                }
                Ok(())
            }
        }
    }
}

/// A guest path a mount may cover.
pub fn validate_target(target: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("mount target {target:?} {why}; mount at a path such as /work"));
    if !target.starts_with('/') {
        return bad("must be an absolute path");
    }
    if target.len() > 4096 || target.contains('\0') {
        return bad("must be at most 4096 bytes, without NUL");
    }
    let parts: Vec<&str> = target.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return bad("cannot be `/`");
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return bad("cannot contain `.` or `..`");
    }
    if matches!(parts[0], "proc" | "sys" | "dev") {
        return bad("cannot be under /proc, /sys or /dev");
    }
    Ok(())
}

/// Checks a sandbox's mounts as a whole: each one, their count, no target twice or inside
/// another, no volume twice.
pub fn validate_mounts(mounts: &[Mount]) -> Result<(), String> {
    if mounts.len() > MAX_MOUNTS {
        return Err(format!("{} mounts is too many; a sandbox may have at most {MAX_MOUNTS}", mounts.len()));
    }
    let norm = |t: &str| format!("{}/", t.trim_end_matches('/'));
    for (i, m) in mounts.iter().enumerate() {
        m.validate()?;
        for other in &mounts[..i] {
            let (a, b) = (norm(&m.target), norm(&other.target));
            if a.starts_with(&b) || b.starts_with(&a) {
                return Err(format!("mount targets {:?} and {:?} overlap; use separate paths", other.target, m.target));
            }
            if m.kind == MountType::Volume && other.kind == MountType::Volume && m.source == other.source {
                return Err(format!("volume {:?} is mounted twice; mount it once", m.source));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_volumes_and_host_directories() {
        let cwd = std::path::Path::new("/home/me/p");
        let m = Mount::parse("work:/work", cwd).unwrap();
        assert_eq!(
            (m.kind, m.source.as_str(), m.target.as_str(), m.readonly),
            (MountType::Volume, "work", "/work", false)
        );
        let m = Mount::parse("./src:/src:ro", cwd).unwrap();
        assert_eq!((m.kind, m.source.as_str(), m.readonly), (MountType::Host, "/home/me/p/./src", true));
        let m = Mount::parse("/data:/data:rw", cwd).unwrap();
        assert_eq!((m.kind, m.readonly), (MountType::Host, false));
        for bad in ["work", "work:", "work:rel", "work:/", "work:/proc/x", "work:/a/../b", "bad name:/x", ":/x"] {
            assert!(Mount::parse(bad, cwd).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlapping_targets_and_repeated_volumes_are_refused() {
        let v =
            |s: &str, t: &str| Mount { kind: MountType::Volume, source: s.into(), target: t.into(), readonly: false };
        assert!(validate_mounts(&[v("va", "/a"), v("vb", "/b")]).is_ok());
        assert!(validate_mounts(&[v("va", "/a"), v("vb", "/a/b")]).is_err());
        assert!(validate_mounts(&[v("va", "/a/"), v("vb", "/a")]).is_err());
        assert!(validate_mounts(&[v("va", "/a"), v("va", "/b")]).is_err());
        assert!(validate_mounts(&[v("va", "/ab"), v("vb", "/a")]).is_ok());
        let many: Vec<Mount> = (0..17).map(|i| v(&format!("v{i}"), &format!("/m{i}"))).collect();
        assert!(validate_mounts(&many).is_err());
    }
}
