//! Building Debian images for real: debootstrap from deb.debian.org into a fresh store. Needs root,
//! `debootstrap` (`apt-get install -y debootstrap`), e2fsprogs, qemu-utils and the network; a
//! missing prerequisite fails the test with what to install, it never skips.

use std::path::Path;

use moat_image::{build_debian, DebianRecipe, ImageError, ImageStore};

/// Staging directories left in the store (a build that did not clean up after itself).
fn staging_dirs(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp-"))
        .collect()
}

// The successful build is tested end to end, booted, in crates/moat/tests/images.rs.

#[test]
fn a_failed_build_says_why_and_registers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let packages = ["python3".to_string(), "moat-no-such-package".to_string()];
    let recipe = DebianRecipe::from_ref("debian:bookworm", &packages).unwrap();
    let err = build_debian(&store, "broken", &recipe, &mut |l| eprintln!("{l}")).unwrap_err();
    assert!(matches!(err, ImageError::DebootstrapFailed { .. }), "{err}");
    let message = moat_hint::Report::new(&err).to_string();
    assert!(message.contains("moat-no-such-package") && message.contains("\nhint: "), "{message}");
    assert!(matches!(store.resolve("broken"), Err(ImageError::NotFound { .. })));
    assert!(store.list().unwrap().is_empty());
    assert!(staging_dirs(dir.path()).is_empty(), "the staging directory was removed");
}
