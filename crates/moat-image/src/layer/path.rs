//! Paths as a layer names them: normalised relative to the root, with `..`, NUL bytes and
//! over-long paths refused.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// Longest path (bytes) and component accepted, as Linux's `PATH_MAX - 1` and `NAME_MAX`.
pub(super) const MAX_PATH: usize = 4095;
const MAX_NAME: usize = 255;
/// Deepest path accepted in a layer, in components.
const MAX_COMPONENTS: usize = 256;

/// `raw` made relative to the layer's root: empty and `.` components dropped (so a leading `/`
/// or `./` is), `..`, NUL bytes and over-long paths refused. The result joins components by `/`.
pub(super) fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    if raw.len() > MAX_PATH {
        return Err(format!("the path is longer than {MAX_PATH} bytes"));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut count = 0;
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err("the path climbs out with `..`".into()),
            _ if part.len() > MAX_NAME => return Err(format!("a path component is longer than {MAX_NAME} bytes")),
            _ => {}
        }
        count += 1;
        if count > MAX_COMPONENTS {
            return Err(format!("the path is more than {MAX_COMPONENTS} levels deep"));
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// `path` split into its parent and last component.
pub(super) fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

pub(super) fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use tar::EntryType;

    use crate::layer::apply_layer;
    use crate::layer::fixture::{apply_all, is_empty, refused, scratch, Layer};

    #[test]
    fn layer_paths_climbing_out_are_refused() {
        for name in [&b"../evil"[..], b"a/../../evil", b"./../evil", b"/../evil"] {
            let (scratch, root, outside) = scratch();
            let layer = Layer::new().raw(EntryType::Regular, name, b"", 0o644, b"x").tar();
            let why = refused(apply_layer(&layer[..], &root));
            assert!(why.contains(".."), "{why}");
            assert!(!scratch.path().join("evil").exists());
            assert!(is_empty(&root) && is_empty(&outside));
        }
    }

    #[test]
    fn layer_absolute_paths_are_taken_inside_root() {
        let (_scratch, root, _) = scratch();
        let layer = Layer::new().raw(EntryType::Regular, b"/etc/x", b"", 0o644, b"inside").tar();
        apply_all(&root, &[layer]);
        assert_eq!(fs::read(root.join("etc/x")).unwrap(), b"inside");
    }
}
