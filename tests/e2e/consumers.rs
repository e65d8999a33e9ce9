//! The consumers judge bakedb's output: skopeo reads and copies every transport, a registry
//! round trip keeps the manifest digest, umoci unpacks what image.json promises, docker,
//! podman and runc run a busybox-based image next to the baked data, oci-image-tool validates
//! the layout, and zstd layers work where they can and are refused where they cannot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use bakedb_testkit::containers::{DockerImage, Runc, podman, podman_in, runc_and_umoci_as_root};

use crate::require;
use crate::util::{
    self, assert_process_user, bakedb, build_sqlite, busybox_base, dir_with_db, make_big_db,
    make_db, run, run_ok, sha256_hex, sqlite_build, stderr, stdout, test_dir, unique_name,
};

/// Where the image keeps the data of a source named app.db.
const DATA_FILE: &str = "/var/lib/bakedb/app.db";
/// A command a busybox-based image runs to show the data as the container sees it.
const SHA256SUM_CMD: &str = r#"["sha256sum","/var/lib/bakedb/app.db"]"#;
/// The default --user.
const OWNER: &str = "65532:65532";

/// `bakedb build --json` from `source` (relative to `dir`) into `output`, plus `extra` flags.
fn build(dir: &Path, source: &str, output: &str, extra: &[&str]) -> Value {
    build_sqlite(dir, source, output, extra)
}

/// A busybox-based image that prints the data file's sha256 when run.
fn build_on_busybox(dir: &Path, output: &str, extra: &[&str]) -> Value {
    let base = format!("oci:{}:latest", busybox_base().display());
    let mut args = vec!["--base", base.as_str(), "--cmd", SHA256SUM_CMD];
    args.extend_from_slice(extra);
    build(dir, "app.db", output, &args)
}

fn inspect(dir: &Path, reference: &str) -> Value {
    let out = run_ok(bakedb(dir).args(["inspect", "--json", reference]));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("inspect --json printed no JSON ({e}): {}", stdout(&out)))
}

fn verify(dir: &Path, reference: &str) {
    let out = run_ok(bakedb(dir).args(["verify", "--json", reference]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "verify {reference}: {report}");
}

/// `skopeo ARGS` run in `dir`, its stdout parsed as JSON.
fn skopeo_json(skopeo: &Path, dir: &Path, args: &[&str]) -> Value {
    let out = run_ok(Command::new(skopeo).current_dir(dir).args(args));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("skopeo {args:?} printed no JSON ({e}): {}", stdout(&out)))
}

/// `skopeo ARGS` run in `dir`, its stdout as bytes.
fn skopeo_raw(skopeo: &Path, dir: &Path, args: &[&str]) -> Vec<u8> {
    run_ok(Command::new(skopeo).current_dir(dir).args(args)).stdout
}

fn hex(digest: &Value) -> &str {
    let d = digest
        .as_str()
        .unwrap_or_else(|| panic!("{digest} is not a string"));
    d.strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("{d} is not a sha256 digest"))
}

/// The sha256 image.json records for a data file that fits in one chunk.
fn recorded_sha256(image_json: &Value, rel_path: &str) -> String {
    let files = image_json["files"]
        .as_array()
        .unwrap_or_else(|| panic!("image.json has no files: {image_json}"));
    let file = files
        .iter()
        .find(|f| f["path"] == rel_path)
        .unwrap_or_else(|| panic!("image.json has no file {rel_path}: {image_json}"));
    let sha = file["sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("image.json records no sha256 for {rel_path}: {file}"));
    assert_eq!(sha.len(), 64, "{sha}");
    sha.to_owned()
}

/// The sha256 that image.json of `oci:img:v1` in `dir` records for app.db.
fn baked_sha256(dir: &Path) -> String {
    recorded_sha256(&inspect(dir, "oci:img:v1")["image_json"], "app.db")
}

/// sha256sum's line for the data file in a container's output matches `expected`.
fn assert_sees_the_data(output: &str, expected: &str, what: &str) {
    assert_eq!(
        printed_sha256(output),
        expected,
        "{what}the container sees other data"
    );
}

/// The sha256 sha256sum printed for DATA_FILE.
fn printed_sha256(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.ends_with(DATA_FILE))
        .unwrap_or_else(|| panic!("no sha256sum line for {DATA_FILE} in {text:?}"));
    line.split_whitespace().next().unwrap().to_owned()
}

fn env_var<'a>(env: &'a Value, key: &str) -> Option<&'a str> {
    env.as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn diff_ids(inspect: &Value) -> Vec<Value> {
    inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["diff_id"].clone())
        .collect()
}

/// The files under `dir`, by relative path, with their contents (modes left out).
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    util::tree(dir)
        .into_iter()
        .map(|(path, (_, bytes))| (path, bytes))
        .collect()
}

#[test]
fn skopeo_inspects_every_output_transport() {
    let skopeo = require!("skopeo");
    let dir = dir_with_db(2000);
    let d = dir.path();
    let oci = build(d, "app.db", "oci:img:v1", &[]);
    let oci_archive = build(d, "app.db", "oci-archive:img.oci.tar:v1", &[]);
    let docker_archive = build(
        d,
        "app.db",
        "docker-archive:img.docker.tar:bakedb-e2e/app:v1",
        &[],
    );
    // Same inputs and SOURCE_DATE_EPOCH: the same image, whichever transport carries it.
    assert_eq!(oci_archive["manifest_digest"], oci["manifest_digest"]);
    assert_eq!(docker_archive["config_digest"], oci["config_digest"]);

    let data_digest = oci["data_digest"].as_str().unwrap();
    for reference in [
        "oci:img:v1",
        "oci-archive:img.oci.tar:v1",
        "docker-archive:img.docker.tar",
        "docker-archive:img.docker.tar:bakedb-e2e/app:v1",
    ] {
        let summary = skopeo_json(&skopeo, d, &["inspect", reference]);
        assert_eq!(
            env_var(&summary["Env"], "BAKEDB_DATA_DIGEST"),
            Some(data_digest),
            "{reference}: {summary}"
        );
        assert_eq!(
            summary["Labels"]["io.bakedb.data-digest"], data_digest,
            "{reference}: {summary}"
        );
        assert_eq!(
            // FROM scratch: init, serve, data, image.json.
            summary["Layers"].as_array().map(Vec::len),
            Some(4),
            "{reference}: {summary}"
        );
        assert_eq!(summary["Os"], "linux", "{reference}: {summary}");
        // skopeo hands out the config as stored: the bytes bakedb wrote and digested.
        let config = skopeo_raw(&skopeo, d, &["inspect", "--config", "--raw", reference]);
        assert_eq!(
            sha256_hex(&config),
            hex(&oci["config_digest"]),
            "{reference}"
        );
        let config: Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["config"]["User"], OWNER, "{reference}: {config}");
    }
    for reference in ["oci:img:v1", "oci-archive:img.oci.tar:v1"] {
        let summary = skopeo_json(&skopeo, d, &["inspect", reference]);
        assert_eq!(summary["Digest"], oci["manifest_digest"], "{reference}");
        let manifest = skopeo_raw(&skopeo, d, &["inspect", "--raw", reference]);
        assert_eq!(
            sha256_hex(&manifest),
            hex(&oci["manifest_digest"]),
            "{reference}"
        );
        let manifest: Value = serde_json::from_slice(&manifest).unwrap();
        let layer_digests: Vec<&Value> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| &l["digest"])
            .collect();
        let built_digests: Vec<&Value> = oci["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| &l["digest"])
            .collect();
        assert_eq!(layer_digests, built_digests, "{reference}");
    }
}

#[test]
fn skopeo_copies_between_all_transports_and_bakedb_verifies_the_copies() {
    let skopeo = require!("skopeo");
    let dir = dir_with_db(2000);
    let d = dir.path();
    let built = build(d, "app.db", "oci:src:v1", &[]);
    build(d, "app.db", "oci-archive:src.oci.tar:v1", &[]);
    build(
        d,
        "app.db",
        "docker-archive:src.docker.tar:bakedb-e2e/src:v1",
        &[],
    );
    let original = inspect(d, "oci:src:v1");
    let data_digest = built["data_digest"].as_str().unwrap();

    // What must survive any copy: the layers' content (diff_ids), the data's description and
    // the expectation the config carries. `copied` is how a copy is named for bakedb; a
    // docker-archive is named by its path alone here (see the test of skopeo's names below).
    let check = |copied: &str| {
        verify(d, copied);
        let copy = inspect(d, copied);
        assert_eq!(diff_ids(&copy), diff_ids(&original), "{copied}");
        assert_eq!(copy["image_json"], original["image_json"], "{copied}");
        assert_eq!(
            env_var(&copy["config"]["Env"], "BAKEDB_DATA_DIGEST"),
            Some(data_digest),
            "{copied}"
        );
        assert_eq!(copy["config"]["User"], OWNER, "{copied}");
        copy
    };

    let sources = [
        ("oci", "oci:src:v1"),
        ("oci-archive", "oci-archive:src.oci.tar:v1"),
        (
            "docker-archive",
            "docker-archive:src.docker.tar:bakedb-e2e/src:v1",
        ),
    ];
    for (from, source) in sources {
        for to in ["oci", "oci-archive", "docker-archive"] {
            if to == from {
                continue;
            }
            let (destination, copied) = match to {
                "oci" => (format!("oci:from-{from}:v2"), format!("oci:from-{from}:v2")),
                "oci-archive" => (
                    format!("oci-archive:from-{from}.oci.tar:v2"),
                    format!("oci-archive:from-{from}.oci.tar:v2"),
                ),
                _ => (
                    format!("docker-archive:from-{from}.docker.tar:bakedb-e2e/copy:v2"),
                    format!("docker-archive:from-{from}.docker.tar"),
                ),
            };
            run_ok(Command::new(&skopeo).current_dir(d).args([
                "copy",
                "--quiet",
                source,
                &destination,
            ]));
            let copy = check(&copied);
            // Between the two OCI transports skopeo moves blobs as they are.
            if from != "docker-archive" && to != "docker-archive" {
                assert_eq!(
                    copy["manifest_digest"], built["manifest_digest"],
                    "{source} -> {destination}"
                );
            }
        }
    }

    // And a chain through every transport back to a layout.
    let chain = [
        (
            "oci:src:v1",
            "oci-archive:chain1.oci.tar:c1",
            "oci-archive:chain1.oci.tar:c1",
        ),
        (
            "oci-archive:chain1.oci.tar:c1",
            "docker-archive:chain2.docker.tar:bakedb-e2e/chain:c2",
            "docker-archive:chain2.docker.tar",
        ),
        (
            "docker-archive:chain2.docker.tar",
            "oci:chain3:c3",
            "oci:chain3:c3",
        ),
        (
            "oci:chain3:c3",
            "oci-archive:chain4.oci.tar:c4",
            "oci-archive:chain4.oci.tar:c4",
        ),
    ];
    for (source, destination, copied) in chain {
        run_ok(
            Command::new(&skopeo)
                .current_dir(d)
                .args(["copy", "--quiet", source, destination]),
        );
        check(copied);
    }
}

/// skopeo stores a docker-archive's name normalised (`bakedb-e2e/app:v1` as
/// `docker.io/bakedb-e2e/app:v1`, `app:v1` as `docker.io/library/app:v1`) and reads the archive
/// back by the name it was given. bakedb promises "users can pass the same strings to both
/// tools": verify, inspect and --base must find the image by that name too.
#[test]
fn bakedb_reads_a_docker_archive_by_the_name_skopeo_wrote_it_with() {
    let skopeo = require!("skopeo");
    let dir = dir_with_db(500);
    let d = dir.path();
    build(d, "app.db", "oci:img:v1", &[]);
    // As a base it must not be a bakedb image (refused, see errors.rs).
    util::unbake(&d.join("img"), "v1");
    let mut failures = Vec::new();
    for (n, named) in [
        "docker-archive:repo.docker.tar:bakedb-e2e/app:v1",
        "docker-archive:short.docker.tar:app:v1",
    ]
    .into_iter()
    .enumerate()
    {
        run_ok(
            Command::new(&skopeo)
                .current_dir(d)
                .args(["copy", "--quiet", "oci:img:v1", named]),
        );
        // skopeo finds the image by the name it was given.
        skopeo_json(&skopeo, d, &["inspect", named]);
        let output = format!("oci:rebuilt:v{n}");
        let attempts = [
            vec!["verify", named],
            vec!["inspect", named],
            vec![
                "build", "--engine", "sqlite", "--source", "app.db", "--base", named, "--output",
                &output,
            ],
        ];
        for args in attempts {
            let out = run(bakedb(d).args(&args));
            if !out.status.success() {
                failures.push(format!(
                    "bakedb {}: {}: {}",
                    args.join(" "),
                    out.status,
                    stderr(&out).trim()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "bakedb does not find images by the names skopeo wrote them with:\n{}",
        failures.join("\n")
    );
}

#[test]
fn registry_round_trip_keeps_the_manifest_digest() {
    let skopeo = require!("skopeo");
    let Some(registry) = util::registry() else {
        return;
    };
    let dir = dir_with_db(2000);
    let d = dir.path();
    let built = build(d, "app.db", "oci:img:v1", &[]);
    let remote = format!(
        "docker://{registry}/bakedb-e2e/{}:v1",
        unique_name("roundtrip")
    );

    run_ok(Command::new(&skopeo).current_dir(d).args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "oci:img:v1",
        &remote,
    ]));
    let pushed = skopeo_raw(
        &skopeo,
        d,
        &["inspect", "--tls-verify=false", "--raw", &remote],
    );
    assert_eq!(
        sha256_hex(&pushed),
        hex(&built["manifest_digest"]),
        "the registry serves another manifest"
    );

    run_ok(Command::new(&skopeo).current_dir(d).args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &remote,
        "oci:pulled:v1",
    ]));
    let pulled = skopeo_raw(&skopeo, d, &["inspect", "--raw", "oci:pulled:v1"]);
    assert_eq!(sha256_hex(&pulled), hex(&built["manifest_digest"]));
    assert_eq!(
        inspect(d, "oci:pulled:v1")["manifest_digest"],
        built["manifest_digest"]
    );
    verify(d, "oci:pulled:v1");
    // Every blob came back byte for byte, and nothing else came with it.
    let (original, pulled) = (
        contents(&d.join("img/blobs")),
        contents(&d.join("pulled/blobs")),
    );
    assert_eq!(
        pulled.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &original {
        assert!(
            pulled[path] == *bytes,
            "blobs/{} changed on the way",
            path.display()
        );
    }
}

/// `umoci unpack --rootless` of `image` (an oci: reference relative to `dir`) into `bundle`,
/// then every promise checked against the unpacked bytes: image.json hashes to
/// BAKEDB_DATA_DIGEST (as built and as umoci's runtime config carries it), the data directory
/// holds exactly the files image.json lists, each with its size, mode, whole-file sha256 (a
/// file of one chunk) or chunk digests (a larger file). Returns the data file's path.
fn unpack_and_check(umoci: &Path, dir: &Path, image: &str, bundle: &str, built: &Value) -> PathBuf {
    run_ok(Command::new(umoci).current_dir(dir).args([
        "unpack",
        "--rootless",
        "--image",
        image,
        bundle,
    ]));
    let rootfs = dir.join(bundle).join("rootfs");
    let image_json_bytes = std::fs::read(rootfs.join("etc/bakedb/image.json")).unwrap();
    assert_eq!(
        sha256_hex(&image_json_bytes),
        hex(&built["data_digest"]),
        "{image}: image.json does not hash to data_digest"
    );
    let runtime: Value =
        serde_json::from_slice(&std::fs::read(dir.join(bundle).join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        env_var(&runtime["process"]["env"], "BAKEDB_DATA_DIGEST"),
        built["data_digest"].as_str(),
        "{image}: {}",
        runtime["process"]
    );

    let image_json: Value = serde_json::from_slice(&image_json_bytes).unwrap();
    let files = image_json["files"].as_array().unwrap();
    let listed: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    let present: Vec<PathBuf> = util::tree(&rootfs.join("var/lib/bakedb"))
        .into_keys()
        .collect();
    assert_eq!(
        present,
        vec![PathBuf::from("app.db")],
        "{image}: files in the data directory"
    );
    assert_eq!(listed, vec!["app.db"], "{image}: files in image.json");

    let file = &files[0];
    let data_path = rootfs.join("var/lib/bakedb/app.db");
    let data = std::fs::read(&data_path).unwrap();
    assert_eq!(
        Some(data.len() as u64),
        file["size"].as_u64(),
        "{image}: size of {DATA_FILE}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&data_path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644, "{image}: mode of {DATA_FILE}");
        assert_eq!(file["mode"], "0644", "{image}: {file}");
    }
    let chunk_size = image_json["chunk_size"].as_u64().unwrap() as usize;
    if data.len() <= chunk_size {
        let sha = file["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("{image}: no sha256 for a one-chunk file: {file}"));
        assert_eq!(sha, sha256_hex(&data), "{image}: sha256 of {DATA_FILE}");
    } else {
        let chunks: Vec<String> = file["chunks"]
            .as_array()
            .unwrap_or_else(|| {
                panic!(
                    "{image}: no chunk digests for a {}-byte file: {file}",
                    data.len()
                )
            })
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        let actual: Vec<String> = data.chunks(chunk_size).map(sha256_hex).collect();
        assert_eq!(chunks, actual, "{image}: chunk digests of {DATA_FILE}");
        // A whole-file digest is optional here; where image.json records one it must hold.
        if let Some(sha) = file["sha256"].as_str() {
            assert_eq!(sha, sha256_hex(&data), "{image}: sha256 of {DATA_FILE}");
        }
    }
    data_path
}

#[test]
fn umoci_unpacks_the_bytes_image_json_promises() {
    let umoci = require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    std::fs::create_dir(d.join("small")).unwrap();
    std::fs::create_dir(d.join("big")).unwrap();
    make_db(&d.join("small/app.db"), 3000);
    // Big enough for many gzip members and three data chunks, the last one short.
    let mib = 40;
    make_big_db(&d.join("big/app.db"), mib);

    let small = build(d, "small/app.db", "oci:small-img:v1", &[]);
    let data_path = unpack_and_check(&umoci, d, "small-img:v1", "small-bundle", &small);
    let db = rusqlite::Connection::open_with_flags(
        &data_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let rows: i64 = db
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3000, "the baked database");

    let big = build(d, "big/app.db", "oci:big-img:v1", &[]);
    // The data layer really is many gzip members: a single-member reader stops early.
    let data_layer = std::fs::read(
        d.join("big-img/blobs/sha256")
            .join(hex(&big["layers"][2]["digest"])),
    )
    .unwrap();
    let mut first_member = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&data_layer[..]),
        &mut first_member,
    )
    .unwrap();
    let mut all_members = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::MultiGzDecoder::new(&data_layer[..]),
        &mut all_members,
    )
    .unwrap();
    assert!(
        all_members.len() > mib << 20,
        "the data layer unpacks to {} bytes",
        all_members.len()
    );
    assert!(
        first_member.len() < all_members.len(),
        "the data layer is a single gzip member"
    );
    drop((data_layer, first_member, all_members));

    let data_path = unpack_and_check(&umoci, d, "big-img:v1", "big-bundle", &big);
    assert!(
        std::fs::metadata(&data_path).unwrap().len() > 2 * (16 << 20),
        "the big file spans fewer than three chunks"
    );
    let db = rusqlite::Connection::open_with_flags(
        &data_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let (rows, bytes): (i64, i64) = db
        .query_row("SELECT count(*), sum(length(data)) FROM b", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(
        (rows, bytes),
        (mib as i64, (mib << 20) as i64),
        "the baked database"
    );
    assert_eq!(
        db.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
            .unwrap(),
        "ok"
    );
}

#[test]
fn docker_runs_the_image_from_skopeo_and_bakedb_docker_archives() {
    let skopeo = require!("skopeo");
    require!("umoci");
    let Some(docker) = util::docker() else { return };
    let dir = dir_with_db(3000);
    let d = dir.path();
    let built = build_on_busybox(d, "oci:img:v1", &[]);
    let expected = baked_sha256(d);

    let via_skopeo = format!("bakedb-e2e/{}:v1", unique_name("skopeo"));
    run_ok(Command::new(&skopeo).current_dir(d).args([
        "copy",
        "--quiet",
        "oci:img:v1",
        &format!("docker-archive:skopeo.tar:{via_skopeo}"),
    ]));
    let via_bakedb = format!("bakedb-e2e/{}:v1", unique_name("own"));
    let own = build_on_busybox(d, &format!("docker-archive:own.tar:{via_bakedb}"), &[]);
    assert_eq!(own["config_digest"], built["config_digest"]);

    for (archive, name) in [("skopeo.tar", via_skopeo), ("own.tar", via_bakedb)] {
        let image = DockerImage {
            docker: docker.clone(),
            name,
        };
        let loaded = run_ok(
            Command::new(&docker)
                .current_dir(d)
                .args(["load", "--input", archive]),
        );
        assert!(
            stdout(&loaded).contains(&format!("Loaded image: {}", image.name)),
            "{archive}: {}",
            stdout(&loaded)
        );
        // Docker's image ID is the digest of the config: the one bakedb wrote, unchanged.
        let id = run_ok(Command::new(&docker).args([
            "image",
            "inspect",
            "--format",
            "{{.Id}}",
            &image.name,
        ]));
        assert_eq!(
            stdout(&id).trim(),
            built["config_digest"].as_str().unwrap(),
            "{archive}"
        );

        let sum =
            run_ok(Command::new(&docker).args(["run", "--rm", "--network", "none", &image.name]));
        assert_eq!(
            printed_sha256(&stdout(&sum)),
            expected,
            "{archive}: the container sees other data"
        );
        let who = run_ok(Command::new(&docker).args([
            "run",
            "--rm",
            "--network",
            "none",
            &image.name,
            "sh",
            "-c",
            &format!("id -u; id -g; stat -c %u:%g:%a {DATA_FILE}"),
        ]));
        assert_eq!(
            stdout(&who).lines().collect::<Vec<_>>(),
            ["65532", "65532", "65532:65532:644"],
            "{archive}"
        );
    }
}

/// `podman run` of an oci: layout or oci-archive:, named relative to `dir`: podman names the
/// image after the path and rejects upper-case letters, which temp dirs have.
fn podman_run(podman_bin: &Path, dir: &Path, image: &str, args: &[&str]) -> String {
    assert!(
        !image.contains('/') && image == image.to_lowercase(),
        "{image}"
    );
    let out = run_ok(
        podman_in(podman_bin, dir)
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .arg(image)
            .args(args),
    );
    stdout(&out)
}

#[test]
fn podman_runs_the_oci_layout() {
    let Some(podman_bin) = podman() else {
        return;
    };
    require!("umoci");
    let dir = dir_with_db(3000);
    let d = dir.path();
    build_on_busybox(d, "oci:img:v1", &[]);
    let expected = baked_sha256(d);

    let sum = podman_run(&podman_bin, d, "oci:img:v1", &[]);
    assert_sees_the_data(&sum, &expected, "");
    // bakedb's oci-archive runs directly too.
    build_on_busybox(d, "oci-archive:img.oci.tar:v1", &[]);
    let sum = podman_run(&podman_bin, d, "oci-archive:img.oci.tar:v1", &[]);
    assert_sees_the_data(&sum, &expected, "oci-archive: ");
    let who = podman_run(
        &podman_bin,
        d,
        "oci:img:v1",
        &[
            "sh",
            "-c",
            &format!("id -u; id -g; stat -c %u:%g:%a {DATA_FILE}"),
        ],
    );
    assert_eq!(
        who.lines().collect::<Vec<_>>(),
        ["65532", "65532", "65532:65532:644"]
    );
}

#[test]
fn runc_runs_a_bundle_umoci_unpacked_with_real_ownership() {
    let Some((runc, umoci)) = runc_and_umoci_as_root() else {
        return;
    };
    let dir = dir_with_db(3000);
    let d = dir.path();
    // No --cmd: the base's /bin/sh stays the command, and the test overrides it.
    let base = format!("oci:{}:latest", busybox_base().display());
    build(d, "app.db", "oci:img:v1", &["--base", &base]);
    let expected = baked_sha256(d);

    // As root, umoci applies the tar headers' ownership for real.
    run_ok(
        Command::new(&umoci)
            .current_dir(d)
            .args(["unpack", "--image", "img:v1", "bundle"]),
    );
    let rootfs = d.join("bundle/rootfs");
    {
        use std::os::unix::fs::MetadataExt;
        for (path, owner, mode) in [
            ("var/lib/bakedb/app.db", (65532, 65532), 0o644),
            ("var/lib/bakedb", (65532, 65532), 0o755),
            ("etc/bakedb/image.json", (0, 0), 0o644),
        ] {
            let meta = std::fs::symlink_metadata(rootfs.join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), owner, "owner of /{path}");
            assert_eq!(meta.mode() & 0o7777, mode, "mode of /{path}");
        }
    }

    let config_path = d.join("bundle/config.json");
    let config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    assert_process_user(&config, 65532, 65532);
    let runc = Runc::new(&runc, &d.join("runc-state"));
    let run_in_bundle = |args: &[&str]| {
        let mut config = config.clone();
        config["process"]["terminal"] = Value::Bool(false);
        config["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let out = run_ok(
            runc.cmd(&["run", "--bundle", "bundle", &unique_name("bakedb-e2e")])
                .current_dir(d),
        );
        stdout(&out)
    };
    assert_eq!(
        printed_sha256(&run_in_bundle(&["sha256sum", DATA_FILE])),
        expected,
        "the container sees other data"
    );
    assert_eq!(run_in_bundle(&["id", "-u"]).trim(), "65532");
}

#[test]
fn oci_image_tool_validates_the_layouts() {
    let tool = require!("oci-image-tool");
    require!("umoci");
    let dir = dir_with_db(1000);
    let d = dir.path();
    // Two images in one layout: FROM scratch, and on busybox (three layers, a base's config).
    let scratch = build(d, "app.db", "oci:layout:scratch", &[]);
    let on_busybox = build_on_busybox(d, "oci:layout:busybox", &[]);
    let validate = |args: &[&str]| {
        let mut cmd = Command::new(&tool);
        cmd.current_dir(d).arg("validate").args(args);
        cmd
    };

    // Debian's 1.0.0-rc1 has no imageLayout type ("unimplemented"); `--type image` on a
    // directory validates the layout: index.json, and per tag (all tags without --ref) the
    // manifest, config and layers against their digests. It cannot read archives at all
    // ("find failed: unable to walk: end of walk", skopeo's oci-archive too).
    run_ok(&mut validate(&["--type", "image", "layout"]));
    for tag in ["scratch", "busybox"] {
        run_ok(&mut validate(&[
            "--type",
            "image",
            "--ref",
            &format!("name={tag}"),
            "layout",
        ]));
    }
    run_ok(&mut validate(&[
        "--type",
        "imageIndex",
        "layout/index.json",
    ]));
    for built in [&scratch, &on_busybox] {
        let blob = |digest: &Value| format!("layout/blobs/sha256/{}", hex(digest));
        run_ok(&mut validate(&[
            "--type",
            "manifest",
            &blob(&built["manifest_digest"]),
        ]));
        run_ok(&mut validate(&[
            "--type",
            "config",
            &blob(&built["config_digest"]),
        ]));
    }

    // The tool does judge: a corrupted layer of either image fails the whole-layout run. (An
    // unknown --ref is no control: on a layout with several images rc1 validates nothing
    // and succeeds.)
    for built in [&scratch, &on_busybox] {
        let copy = d.join("corrupt");
        let _ = std::fs::remove_dir_all(&copy);
        util::copy_dir(&d.join("layout"), &copy);
        // bakedb's data layer: the last but one, under image.json's.
        let layers = built["layers"].as_array().unwrap();
        let data_layer = copy
            .join("blobs/sha256")
            .join(hex(&layers[layers.len() - 2]["digest"]));
        let mut bytes = std::fs::read(&data_layer).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&data_layer, bytes).unwrap();
        let corrupt = run(&mut validate(&["--type", "image", "corrupt"]));
        assert!(
            !corrupt.status.success(),
            "oci-image-tool accepted a corrupted layer {}",
            data_layer.display()
        );
    }
}

#[test]
fn zstd_layers_work_with_skopeo_and_podman_and_docker_archive_refuses_them() {
    let skopeo = require!("skopeo");
    let Some(podman_bin) = podman() else {
        return;
    };
    require!("umoci");
    let dir = dir_with_db(3000);
    let d = dir.path();
    let built = build_on_busybox(d, "oci:img:v1", &["--compression", "zstd"]);
    verify(d, "oci:img:v1");

    let manifest = skopeo_raw(&skopeo, d, &["inspect", "--raw", "oci:img:v1"]);
    assert_eq!(sha256_hex(&manifest), hex(&built["manifest_digest"]));
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    let media_types: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    // The base layer is reused as it is; bakedb's own three layers (init, data, image.json)
    // are zstd.
    assert_eq!(
        media_types,
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar+zstd"
        ]
    );
    let summary = skopeo_json(&skopeo, d, &["inspect", "oci:img:v1"]);
    assert_eq!(summary["Digest"], built["manifest_digest"]);
    assert_eq!(
        env_var(&summary["Env"], "BAKEDB_DATA_DIGEST"),
        built["data_digest"].as_str()
    );

    // docker load before Docker 23 cannot read zstd: refused as a usage error, nothing written.
    let before = util::tree(d);
    let refused = run(bakedb(d)
        .args(sqlite_build(
            "app.db",
            "docker-archive:zstd.docker.tar:bakedb-e2e/zstd:v1",
        ))
        .args(["--compression", "zstd"]));
    assert_eq!(
        refused.status.code(),
        Some(2),
        "docker-archive with zstd: {}",
        stderr(&refused)
    );
    assert!(stderr(&refused).contains("zstd"), "{}", stderr(&refused));
    util::assert_tree_unchanged(d, &before, "a refused docker-archive build");

    let expected = baked_sha256(d);
    let sum = podman_run(&podman_bin, d, "oci:img:v1", &[]);
    assert_sees_the_data(&sum, &expected, "");
}
