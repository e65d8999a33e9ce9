//! Writes the seed inputs of every target into corpus/<target>/ (`cargo run --example seeds`
//! in fuzz/): valid images built by the same code the targets mutate, so the fuzzer starts
//! past the first checks. The files are committed; rerun after changing a builder.

use std::path::Path;

use bakedb_fuzz::{LAYER_TAR, Parts, sample_layer, sha256_hex};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(if path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, path, *data).unwrap();
    }
    tar.into_inner().unwrap()
}

fn main() {
    let parts = Parts::valid();
    put("oci_index", "seed-valid", &parts.index);
    put("oci_manifest", "seed-valid", &parts.manifest);
    put("oci_config", "seed-valid", &parts.config);
    let layer = sample_layer();
    put("layer_stream", "seed-tar", &[&[0u8][..], &layer].concat());

    // A docker-archive (`docker save` layout) and an oci-archive of the same image.
    let config_name = format!("{}.json", sha256_hex(&parts.config));
    let layer_name = format!("{}/layer.tar", sha256_hex(&layer));
    let manifest_json = format!(
        "[{{\"Config\":\"{config_name}\",\"RepoTags\":[\"x:t\"],\"Layers\":[\"{layer_name}\"]}}]"
    );
    let docker = tar_of(&[
        ("manifest.json", manifest_json.as_bytes()),
        (&config_name, &parts.config),
        (&layer_name, &layer),
    ]);
    put("archive", "seed-docker-archive", &docker);
    let blob = |b: &[u8]| format!("blobs/sha256/{}", sha256_hex(b));
    let oci = tar_of(&[
        ("oci-layout", b"{\"imageLayoutVersion\":\"1.0.0\"}"),
        ("index.json", &parts.index),
        (&blob(&parts.manifest), &parts.manifest),
        (&blob(&parts.config), &parts.config),
        (&blob(&layer), &layer),
    ]);
    put("archive", "seed-oci-archive", &oci);
    let _ = LAYER_TAR;

    for (i, r) in [
        "oci:out:v1",
        "oci:/var/tmp/layout",
        "oci-archive:img.tar:latest",
        "docker-archive:app.tar:bakedb/app:v1",
        "docker-archive:app.tar",
    ]
    .iter()
    .enumerate()
    {
        put("reference", &format!("seed-{i}"), r.as_bytes());
    }

    let image_json = br#"{
  "schema": 1,
  "engine": "sqlite",
  "profile": {"name": "sqlite-readonly", "env": {"SQLITE_TMPDIR": "/tmp", "BAKEDB_DATABASE": "{data_dir}/app.db"}},
  "data_dir": "/var/lib/bakedb",
  "owner": {"uid": 65532, "gid": 65532},
  "snapshot": {"source": "app.db", "taken_at": "2023-11-14T22:13:20Z"},
  "chunk_size": 16777216,
  "files": [
    {"path": "app.db", "size": 8192, "mode": "0644", "sha256": "4b227777d4dd1fc61c6f884f48641d02b4d121d3fd328cb08b5531fcacdabf8a"}
  ],
  "dirs": ["pgdata", "pgdata/base"]
}
"#;
    put("init_image_json", "seed-sqlite", image_json);

    // serve_request: [method][content type][target NUL body]
    let requests: [(u8, u8, &str, &str); 6] = [
        (0, 0, "healthz", ""),
        (0, 0, "v1/schema", ""),
        (
            0,
            0,
            "v1/query?sql=SELECT+id,name+FROM+items+WHERE+id+%3D+%3F1&params=%5B3%5D",
            "",
        ),
        (
            2,
            0,
            "v1/query",
            r#"{"sql": "SELECT * FROM items WHERE price < :max", "params": {"max": 2}}"#,
        ),
        (2, 4, "v1/query", r#"{"sql": "SELECT data FROM items"}"#),
        (0, 0, "metrics", ""),
    ];
    for (i, (method, content, target, body)) in requests.iter().enumerate() {
        let mut bytes = vec![*method, *content];
        bytes.extend_from_slice(target.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(body.as_bytes());
        put("serve_request", &format!("seed-{i}"), &bytes);
    }
}
