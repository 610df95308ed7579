//! The registry fixture checks itself: a real `docker-registry` with auth serves what skopeo pushed
//! (a plain image and a multi-platform index), a corrupted blob no longer matches its digest, and
//! the cutting proxy stops after exactly its budget of bytes.

use crate::oci;
use crate::registry;

use oci::{app_layer, big_layer, digest, Layer, OciLayoutDir, CONFIG, INDEX, MANIFEST};
use registry::{http_get, http_get_raw, CutProxy, Registry};

#[test]
fn registry_serves_pushed_images_and_the_proxy_cuts_on_cue() {
    let registry = Registry::start(Some(("moat", "hunter2")));
    let work = tempfile::tempdir().expect("tempdir");
    let mut layout = OciLayoutDir::create(&work.path().join("layout"));
    let big = big_layer("data/big.bin", 2, 7);
    let single = layout.add_image("single", &[Layer::gzip(&app_layer()), big], CONFIG);
    let multi = layout.add_multi_platform("multi", &[]);
    registry.push(layout.path(), "single", "moat/single:1");
    registry.push(layout.path(), "multi", "moat/multi:1");
    let accept = format!("{MANIFEST}, {INDEX}");

    // Without credentials the registry refuses, and says how to authenticate.
    let anonymous = http_get(&registry.addr(), "/v2/moat/single/manifests/1", &[("Accept", accept.clone())]);
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.header("www-authenticate"), Some(r#"Basic realm="moat-test""#));

    // The tag serves the manifest as written: same bytes, so the same digest, config and layers.
    let manifest = registry.get("/v2/moat/single/manifests/1", &accept);
    assert_eq!(manifest.status, 200, "{}", registry.log_tail());
    assert_eq!(manifest.header("content-type"), Some(MANIFEST));
    assert_eq!(digest(&manifest.body), single.manifest);
    assert_eq!(manifest.header("docker-content-digest"), Some(single.manifest.as_str()));
    let body: serde_json::Value = serde_json::from_slice(&manifest.body).expect("manifest is JSON");
    assert_eq!(body["config"]["digest"], single.config.as_str());
    let layers: Vec<&str> =
        body["layers"].as_array().expect("layers").iter().filter_map(|l| l["digest"].as_str()).collect();
    assert_eq!(layers, single.layers);

    // The multi-platform tag is still an index after the push, arm64 first.
    let index = registry.get("/v2/moat/multi/manifests/1", &accept);
    assert_eq!(index.status, 200, "{}", registry.log_tail());
    assert_eq!(index.header("content-type"), Some(INDEX));
    assert_eq!(digest(&index.body), multi.index);
    let body: serde_json::Value = serde_json::from_slice(&index.body).expect("index is JSON");
    let platforms: Vec<(&str, &str)> = body["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| (m["platform"]["architecture"].as_str().unwrap_or(""), m["digest"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(platforms, [("arm64", multi.arm64.manifest.as_str()), ("amd64", multi.amd64.manifest.as_str())]);
    let amd64 = registry.get(&format!("/v2/moat/multi/manifests/{}", multi.amd64.manifest), &accept);
    assert_eq!((amd64.status, digest(&amd64.body)), (200, multi.amd64.manifest.clone()));

    // A corrupted blob is still served under its digest, with the same length and other bytes.
    let arch_layer = multi.amd64.layers.last().expect("the arch layer");
    let blob_url = format!("/v2/moat/multi/blobs/{arch_layer}");
    let before = registry.get(&blob_url, "*/*");
    assert_eq!((before.status, digest(&before.body)), (200, arch_layer.clone()));
    registry.corrupt_blob(arch_layer);
    let after = registry.get(&blob_url, "*/*");
    assert_eq!((after.status, after.body.len()), (200, before.body.len()));
    assert_ne!(digest(&after.body), *arch_layer);

    // Through the proxy: whole, then cut after exactly 1000 bytes, then closed on connect, then whole again.
    let proxy = CutProxy::start(&registry.addr());
    let auth = registry::basic_auth("moat", "hunter2");
    let big_url = format!("/v2/moat/single/blobs/{}", single.layers[1]);
    let whole = http_get(&proxy.addr(), &big_url, &[("Authorization", auth.clone())]);
    assert_eq!((whole.status, digest(&whole.body)), (200, single.layers[1].clone()));
    assert!(whole.body.len() > 2 << 20, "the big layer is incompressible: {} bytes", whole.body.len());
    let passed = proxy.bytes_to_client();

    proxy.set_cut_after(1000);
    let cut = http_get_raw(&proxy.addr(), &big_url, &[("Authorization", auth.clone())]);
    assert_eq!(cut.len(), 1000);
    assert!(cut.starts_with(b"HTTP/1.0 200 OK\r\n"), "{}", String::from_utf8_lossy(&cut[..40]));
    assert_eq!(proxy.bytes_to_client(), passed + 1000);
    assert!(proxy.is_cut());
    assert!(http_get_raw(&proxy.addr(), "/v2/", &[]).is_empty(), "a new connection is closed while down");
    assert_eq!(proxy.bytes_to_client(), passed + 1000);

    proxy.set_pass();
    let again = http_get(&proxy.addr(), &big_url, &[("Authorization", auth)]);
    assert_eq!((again.status, digest(&again.body)), (200, single.layers[1].clone()));
}
