//! Reading one tar member with its extension headers (GNU long names, PAX) folded in, each read
//! into memory with a size bound.

use std::io::{self, Read};

use tar::EntryType;

use super::{shown, unreadable};
use crate::ImageError;

/// Largest GNU long name or PAX header read into memory.
const MAX_EXTENSION: u64 = 1 << 20;

/// Extension headers seen before the member they describe.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) long_name: Option<Vec<u8>>,
    pub(super) long_link: Option<Vec<u8>>,
    pub(super) pax: Option<Vec<u8>>,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// One member, with its extension headers folded in.
pub(super) struct Member {
    /// The path as written in the layer, for messages.
    pub(super) shown: String,
    pub(super) kind: EntryType,
    pub(super) path: Vec<u8>,
    pub(super) link: Option<Vec<u8>>,
    pub(super) mode: u32,
    pub(super) uid: u64,
    pub(super) gid: u64,
    pub(super) mtime: i64,
    pub(super) device: (u32, u32),
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub(super) fn read_extension(entry: &mut impl Read) -> Result<Vec<u8>, ImageError> {
    let mut data = Vec::new();
    entry
        .take(MAX_EXTENSION + 1)
        .read_to_end(&mut data)
        .map_err(|e| unreadable(format!("reading an extension header: {e}")))?;
    if data.len() as u64 > MAX_EXTENSION {
        return Err(unreadable(format!("an extension header is larger than {MAX_EXTENSION} bytes")));
    }
    Ok(data)
}

pub(super) fn member<R: Read>(entry: &tar::Entry<'_, R>, pending: Pending) -> Result<Member, ImageError> {
    let header = entry.header();
    let header_path = header.path_bytes();
    let trim = |mut v: Vec<u8>| {
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    };
    let mut path = pending.long_name.map(trim).unwrap_or_else(|| header_path.to_vec());
    let mut link = pending.long_link.map(trim).or_else(|| header.link_name_bytes().map(|l| l.to_vec()));
    let bad = |what: &str, e: io::Error| ImageError::LayerEntryRefused {
        entry: shown(&header_path),
        reason: format!("its header has a bad {what} field ({e})"),
    };
    // Some writers leave numeric fields blank; tar reads those as 0.
    let old = header.as_old();
    let number = |what: &str, raw: &[u8], parsed: io::Result<u64>| match parsed {
        Ok(n) => Ok(n),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(bad(what, e)),
    };
    let mut uid = number("uid", &old.uid, header.uid())?;
    let mut gid = number("gid", &old.gid, header.gid())?;
    let mut mtime = i64::try_from(number("mtime", &old.mtime, header.mtime())?).unwrap_or(i64::MAX);
    let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
    let device = match header.entry_type() {
        EntryType::Char | EntryType::Block => (
            header.device_major().map_err(|e| bad("device", e))?.unwrap_or(0),
            header.device_minor().map_err(|e| bad("device", e))?.unwrap_or(0),
        ),
        _ => (0, 0),
    };
    let mut xattrs = Vec::new();
    if let Some(pax) = &pending.pax {
        let pax_number = |key: &str, value: &[u8]| {
            std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
                ImageError::LayerEntryRefused {
                    entry: shown(&header_path),
                    reason: format!("its PAX header has a bad {key} value"),
                }
            })
        };
        for ext in tar::PaxExtensions::new(pax) {
            let ext = ext.map_err(|e| unreadable(format!("a PAX header is malformed: {e}")))?;
            let value = ext.value_bytes();
            match ext.key_bytes() {
                b"path" => path = value.to_vec(),
                b"linkpath" => link = Some(value.to_vec()),
                b"uid" => uid = pax_number("uid", value)?,
                b"gid" => gid = pax_number("gid", value)?,
                b"mtime" => {
                    // Seconds with an optional fraction; the fraction is dropped.
                    let whole = value.split(|&b| b == b'.').next().unwrap_or_default();
                    if let Some(secs) = std::str::from_utf8(whole).ok().and_then(|v| v.parse::<i64>().ok()) {
                        mtime = secs;
                    }
                }
                b"size" => {
                    // Raw iteration reads the header's size; a disagreeing PAX size would make this
                    // parser see a different archive than others do.
                    if pax_number("size", value)? != entry.size() {
                        return Err(unreadable(format!(
                            "the PAX size of {:?} disagrees with its header (files over 8 GiB are not supported)",
                            shown(&path)
                        )));
                    }
                }
                key => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(Member { shown: shown(&path), kind: header.entry_type(), path, link, mode, uid, gid, mtime, device, xattrs })
}

#[cfg(test)]
mod tests {
    use std::io::{self, Read};

    use tar::EntryType;

    use crate::layer::apply_layer;
    use crate::layer::fixture::{apply_all, scratch, Layer};
    use crate::ImageError;

    #[test]
    fn layer_long_names_work_and_huge_extension_headers_are_refused() {
        let (_scratch, root, _) = scratch();
        let long = format!("{}/file", "d".repeat(150));
        let layer = Layer::new().file(&long, b"x").tar();
        apply_all(&root, &[layer]);
        assert!(root.join(&long).exists());

        let mut header = Layer::header(EntryType::GNULongName, 0o644, 2 << 20);
        header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, io::repeat(b'a').take(2 << 20)).unwrap();
        let err = apply_layer(&builder.into_inner().unwrap()[..], &root).unwrap_err();
        assert!(matches!(err, ImageError::LayerUnreadable { .. }), "{err}");
    }
}
