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
    tar_listing_with(blob, |_, _| false)
}

/// The listing, with the size and digest of entries `opaque` picks replaced by a placeholder.
fn tar_listing_with(blob: &[u8], mut opaque: impl FnMut(&str, &[u8]) -> bool) -> String {
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    let mut out = String::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let h = e.header().clone();
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        use sha2::Digest as _;
        let path = e.path().unwrap().display().to_string();
        if opaque(&path, &content) {
            out += &format!(
                "{:?} {path} {:o} {}:{} {} <size> <sha256>\n",
                h.entry_type(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap(),
            );
            continue;
        }
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
        // The init and serve layers hold compiled binaries whose bytes follow the toolchain:
        // init has its own test below, and the serve layer's digests are replaced by
        // placeholders (with the config and manifest digests that follow from them).
        // Everything else must not change unnoticed.
        "--no-init",
    ]));
    let out = dir.path().join("out");
    let blob = |d: &str| {
        std::fs::read(
            out.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let index_bytes = std::fs::read(out.join("index.json")).unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index_bytes).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let manifest_bytes = blob(&manifest_digest);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let config_bytes = blob(&config_digest);
    let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "serve, data, image.json: {manifest}");
    assert!(
        config["history"][0]["created_by"]
            .as_str()
            .unwrap()
            .contains("bakedb-serve"),
        "{config}"
    );
    let placeholders = [
        (
            layers[0]["digest"].as_str().unwrap().to_owned(),
            "sha256:<bakedb-serve layer>",
        ),
        (
            config["rootfs"]["diff_ids"][0].as_str().unwrap().to_owned(),
            "sha256:<bakedb-serve diff_id>",
        ),
        (config_digest.clone(), "sha256:<config>"),
        (manifest_digest.clone(), "sha256:<manifest>"),
    ];
    let serve_size = format!("\"size\": {}", layers[0]["size"]);
    let normalise = |bytes: &[u8]| {
        let mut text =
            pretty(bytes).replace(&serve_size, "\"size\": \"<bakedb-serve layer size>\"");
        for (digest, placeholder) in &placeholders {
            text = text.replace(digest.as_str(), placeholder);
        }
        text
    };
    expect("index.json", &normalise(&index_bytes));
    expect(
        "oci-layout",
        &String::from_utf8(std::fs::read(out.join("oci-layout")).unwrap()).unwrap(),
    );
    expect("manifest.json", &normalise(&manifest_bytes));
    expect("config.json", &normalise(&config_bytes));
    expect(
        "data-layer.txt",
        &tar_listing(&blob(layers[1]["digest"].as_str().unwrap())),
    );
    let meta = blob(layers[2]["digest"].as_str().unwrap());
    expect("meta-layer.txt", &tar_listing(&meta));
    // image.json itself, byte for byte: bakedb-init's reader and the typed module in
    // bakedb-engines are both tested against this file.
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&meta[..]));
    let mut image_json = String::new();
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        if e.path().unwrap().ends_with("image.json") {
            e.read_to_string(&mut image_json).unwrap();
        }
    }
    expect("image.json", &image_json);
    let serve_listing =
        tar_listing_with(&blob(layers[0]["digest"].as_str().unwrap()), |path, _| {
            path == "usr/local/bin/bakedb-serve"
        });
    expect("serve-layer.txt", &serve_listing);
}

/// The init and serve layers are the same blobs in every image (different data, different
/// SOURCE_DATE_EPOCH), so registries and hosts store them once; the init layer's listing is
/// golden except for the binary itself, which is checked to be a static bakedb-init that runs.
#[test]
fn init_layer_is_shared_by_every_image() {
    let dir = test_dir();
    crate::util::make_db(&dir.path().join("one.db"), 10);
    crate::util::make_db(&dir.path().join("two.db"), 20);
    let mut layers = Vec::new();
    for (db, epoch) in [("one.db", "1700000000"), ("two.db", "1800000000")] {
        let out = run_ok(
            bakedb(dir.path())
                .args(["build", "--engine", "sqlite", "--source", db])
                .args(["--output", &format!("oci:{db}-out:v1"), "--json"])
                .env("SOURCE_DATE_EPOCH", epoch),
        );
        let built = crate::util::build_json(&out);
        let digests: Vec<String> = built["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            digests.len(),
            4,
            "init, serve, data, image.json layers: {digests:?}"
        );
        layers.push((dir.path().join(format!("{db}-out")), digests));
    }
    assert_eq!(layers[0].1[0], layers[1].1[0], "the init layers differ");
    assert_eq!(layers[0].1[1], layers[1].1[1], "the serve layers differ");
    assert_ne!(
        layers[0].1[2], layers[1].1[2],
        "the data layers should differ"
    );
    let (out, digests) = &layers[0];
    let blob = std::fs::read(
        out.join("blobs/sha256")
            .join(digests[0].trim_start_matches("sha256:")),
    )
    .unwrap();
    let mut init = Vec::new();
    let listing = tar_listing_with(&blob, |path, content| {
        if path == "bakedb/init" {
            init = content.to_vec();
            true
        } else {
            false
        }
    });
    expect("init-layer.txt", &listing);
    assert_eq!(&init[..4], b"\x7fELF");
    let exe = dir.path().join("init");
    std::fs::write(&exe, &init).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let version = run_ok(std::process::Command::new(&exe).arg("--version"));
    assert_eq!(
        crate::util::stdout(&version).trim(),
        format!("bakedb-init {}", env!("CARGO_PKG_VERSION"))
    );
    let file = run_ok(std::process::Command::new("file").arg(&exe));
    let file = crate::util::stdout(&file);
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "bakedb-init in the image is not static: {file}"
    );
}
