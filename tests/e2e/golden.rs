//! Golden files for what bakedb writes: index.json, manifest, config, image.json and the tar
//! listing of each layer, from a fixed database and SOURCE_DATE_EPOCH. Any change to the
//! canonical form shows up here. Refresh with `UPDATE_EXPECT=1 cargo test -p bakedb-cli --test e2e golden`.

use std::io::Read;
use std::path::Path;

use crate::util::{bakedb, run_ok, test_dir};

fn expect(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/e2e/golden")
        .join(name);
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_EXPECT=1", path.display()));
    assert!(
        expected == actual,
        "{name} changed; if intended, refresh with UPDATE_EXPECT=1\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

fn pretty(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

fn tar_listing(blob: &[u8]) -> String {
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    let mut out = String::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let h = e.header().clone();
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        use sha2::Digest as _;
        out += &format!(
            "{:?} {} {:o} {}:{} {} {} {:x}\n",
            h.entry_type(),
            e.path().unwrap().display(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            content.len(),
            sha2::Sha256::digest(&content)
        );
    }
    out
}

#[test]
fn build_output_matches_golden_files() {
    let dir = test_dir();
    {
        // Fixed content, rollback journal, bundled SQLite: the same file bytes every time.
        let c = rusqlite::Connection::open(dir.path().join("golden.db")).unwrap();
        c.execute_batch(
            "PRAGMA page_size=4096; CREATE TABLE kv(k TEXT PRIMARY KEY, v INTEGER);
             INSERT INTO kv VALUES ('a', 1), ('b', 2), ('c', 3);",
        )
        .unwrap();
    }
    run_ok(bakedb(dir.path()).args([
        "build",
        "--engine",
        "sqlite",
        "--source",
        "golden.db",
        "--output",
        "oci:out:golden",
        "--label",
        "team=data",
    ]));
    let out = dir.path().join("out");
    let blob = |d: &str| {
        std::fs::read(
            out.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let index = std::fs::read(out.join("index.json")).unwrap();
    expect("index.json", &pretty(&index));
    expect(
        "oci-layout",
        &String::from_utf8(std::fs::read(out.join("oci-layout")).unwrap()).unwrap(),
    );
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    let manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    expect("manifest.json", &pretty(&manifest));
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    expect(
        "config.json",
        &pretty(&blob(manifest["config"]["digest"].as_str().unwrap())),
    );
    let layers = manifest["layers"].as_array().unwrap();
    expect(
        "data-layer.txt",
        &tar_listing(&blob(layers[0]["digest"].as_str().unwrap())),
    );
    expect(
        "meta-layer.txt",
        &tar_listing(&blob(layers[1]["digest"].as_str().unwrap())),
    );
}
