//! docs/openapi.json is generated from the API types (`moat_api::openapi`); this test keeps it
//! true. Regenerate with: UPDATE_DOCS=1 cargo test -p moat-api --test openapi

use std::path::Path;

#[test]
fn openapi_document_matches_the_types() {
    let doc = moat_api::openapi::to_json();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &doc).expect("docs/openapi.json writable");
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == doc,
        "docs/openapi.json is stale; regenerate with: UPDATE_DOCS=1 cargo test -p moat-api --test openapi"
    );
}
