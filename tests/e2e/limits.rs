//! Memory that does not grow with what a layout holds. A layout of 100,000 tags (a 22 MB
//! index.json) is resolved, listed, verified and added to with bakedb's data memory capped
//! at 64 MiB (RLIMIT_DATA; two CPUs): parsed whole into a serde_json::Value, this index took
//! 210 MB of RSS and the 400,001 tags (188 MB) of the report that found it 1 GB; streamed,
//! a build needs about 20 MiB whatever the index holds.

use std::fs;

use serde_json::Value;

use crate::util::{
    bakedb, build_json, dir_with_db, run, run_ok, sqlite_build, stderr, with_data_limit,
};

const TAGS: usize = 100_000;
/// bakedb's data memory cap: a build of a small database needs 16 to 24 MiB (two compression
/// workers); reading this index whole needed more than 128 MiB.
const DATA_LIMIT: u64 = 64 << 20;

#[test]
fn a_layout_of_a_hundred_thousand_tags_is_read_and_written_in_bounded_memory() {
    let dir = dir_with_db(20);
    let d = dir.path();
    let seed = build_json(&run_ok(
        bakedb(d)
            .args(sqlite_build("app.db", "oci:big:seed"))
            .args(["--quiet", "--json"]),
    ));
    // As bakedb writes an index (canonical JSON), every tag pointing at the seed image.
    let entry = |tag: &str| {
        format!(
            r#"{{"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}},"digest":"{}","mediaType":"application/vnd.oci.image.manifest.v1+json","size":{}}}"#,
            seed["manifest_digest"].as_str().unwrap(),
            seed["manifest_size"]
        )
    };
    let entries: Vec<String> = (0..TAGS).map(|i| entry(&format!("tag-{i:06}"))).collect();
    let tail = r#"],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}"#;
    let index = format!(r#"{{"manifests":[{}{tail}"#, entries.join(","));
    drop(entries);
    fs::write(d.join("big/index.json"), &index).unwrap();

    let build_new = [&sqlite_build("app.db", "oci:big:new")[..], &["--quiet"]].concat();
    for args in [
        &["verify", "oci:big:tag-099999"][..],
        &["inspect", "oci:big:tag-000001"],
        &["inspect", "--json", "oci:big:tag-050000"],
        &build_new,
    ] {
        let what = format!("bakedb {}", args.join(" "));
        let out = run(with_data_limit(bakedb(d).args(args), DATA_LIMIT));
        assert!(
            out.status.success(),
            "{what} with a {} MB index.json failed in {} MiB of data memory (memory must not grow with the number of tags): {}\n{}",
            index.len() / 1_000_000,
            DATA_LIMIT >> 20,
            out.status,
            stderr(&out)
        );
        match args[..2] {
            ["inspect", "--json"] => {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(v["tags"].as_array().unwrap().len(), TAGS);
                assert_eq!(v["tags"][TAGS - 1]["tag"], "tag-099999");
            }
            ["inspect", _] => {
                let text = String::from_utf8(out.stdout).unwrap();
                assert_eq!(
                    text.lines().filter(|l| l.starts_with("  tag-")).count(),
                    TAGS
                );
            }
            _ => {}
        }
    }

    // A tag that is not there: the message names the first 20 tags and counts the rest
    // (100,001 with the one the build added).
    let out = run(bakedb(d).args(["verify", "--quiet", "oci:big:nope"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert!(
        err.contains("no image tagged \"nope\" (tags present: tag-000000, tag-000001, ")
            && err.contains(", tag-000019 and 99981 more)")
            && err.len() < 1000,
        "{err}"
    );

    // The build kept every entry as it was, byte for byte, and appended its own.
    let after = fs::read_to_string(d.join("big/index.json")).unwrap();
    let head = &index[..index.len() - tail.len()];
    assert!(
        after.starts_with(head) && after.ends_with(tail),
        "the other tags' entries changed"
    );
    let added: Value = serde_json::from_str(
        after[head.len()..after.len() - tail.len()]
            .strip_prefix(',')
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        added["annotations"]["org.opencontainers.image.ref.name"],
        "new"
    );
    for reference in ["oci:big:new", "oci:big:tag-000000"] {
        run_ok(bakedb(d).args(["verify", "--quiet", reference]));
    }
}
