//! `/etc/bakedb/image.json`: what an image's data is, how to start its engine, and where the
//! data came from. `bakedb build` writes it, `bakedb inspect` shows it, `bakedb verify`
//! checks it against the config's BAKEDB_DATA_DIGEST; bakedb-init keeps its own minimal
//! reader (it may use no workspace crate), held to the same golden files. The schema is in
//! docs/image-json.md.
//!
//! Its sha256 is the image's BAKEDB_DATA_DIGEST, so its bytes must not depend on anything
//! but its content: it is serialised through sorted maps (serde_json's Map), pretty-printed,
//! with a final newline.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::datafiles::FileDigest;

/// The version of the format this bakedb writes and understands.
pub const SCHEMA: u64 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageJson {
    pub schema: u64,
    /// The engine that baked the data ("sqlite", "postgres").
    pub engine: String,
    /// How bakedb-init starts the engine read-only. (Images from before profiles were
    /// objects name it only: read as a profile with that name.)
    #[serde(deserialize_with = "profile_or_name")]
    pub profile: Profile,
    /// Where the data lives in the image, absolute.
    pub data_dir: String,
    /// Who owns the data (and runs the engine).
    pub owner: Owner,
    /// Where the data came from and at which point: engine-specific provenance.
    pub snapshot: serde_json::Value,
    /// Bytes per chunk digest of a large file.
    pub chunk_size: u64,
    /// Every data file, relative to data_dir, with its digests.
    pub files: Vec<FileDigest>,
    /// Directories that must exist even when empty, relative to data_dir.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<String>,
    /// What the build lost or left out, one sentence each (accepted losses, removed
    /// credentials, settings not carried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<Vec<String>>,
    /// 0 for a full build, one more than the previous image's for `--from`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// The page index files whose fold is this image's index, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub page_index: Vec<IndexFile>,
    /// What each generation since the last base added, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<ChainLink>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One generation's page index file (docs/patch-format.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    pub generation: u64,
    /// Absolute, e.g. /etc/bakedb/pages/3.idx.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The layer that holds it; None: this image.json's own layer.
    pub layer: Option<String>,
}

/// What one generation added to the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    pub generation: u64,
    /// "base" (the data written whole) or "patch".
    pub kind: String,
    /// Its data or patch layer.
    pub layer: Option<String>,
    /// Files shipped whole, as patches, and deleted.
    pub whole: u64,
    pub patched: u64,
    pub deleted: u64,
    /// Pages in its patch files.
    pub pages: u64,
    /// Uncompressed bytes of what it shipped (files and patches).
    pub raw_bytes: u64,
    /// The layer's size, compressed.
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The engine's read-only tuning, applied by bakedb-init (see crates/init/src/profile.rs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    /// The program the profile is for: its args are added only when the image's command
    /// runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Set unless the container sets them. `{data_dir}` and `{runtime_dir}` are substituted.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// "first-start" for engines that write into their data directory; absent: every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// Files written into the runtime directory before the engine starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ProfileFile>,
    /// init stays PID 1 and supervises the engine instead of exec'ing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervise: Option<bool>,
    /// How patched files reach the engine: "apply" (init composes them) or "in-place" (the
    /// engine reads base and patches). Absent when no file is patched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patches: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileFile {
    pub name: String,
    /// Octal, e.g. "0600".
    pub mode: String,
    pub content: String,
}

fn profile_or_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Profile, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Name(String),
        Profile(Profile),
    }
    Ok(match Either::deserialize(d)? {
        Either::Name(name) => Profile {
            name,
            ..Profile::default()
        },
        Either::Profile(p) => p,
    })
}

/// Why image.json could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageJsonError {
    #[error("image.json is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("image.json has schema {0}; this bakedb understands {SCHEMA}: use a newer bakedb")]
    NewerSchema(u64),
}

impl ImageJson {
    /// The bytes that go into the image (and whose sha256 is BAKEDB_DATA_DIGEST).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Through a Value: serde_json's Map sorts keys, so field order in this file never
        // changes a digest.
        let value = serde_json::to_value(self).expect("image.json serialises");
        let mut bytes = serde_json::to_vec_pretty(&value).expect("image.json serialises");
        bytes.push(b'\n');
        bytes
    }

    pub fn parse(bytes: &[u8]) -> Result<ImageJson, ImageJsonError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)?;
        let schema = value["schema"].as_u64().unwrap_or(0);
        if schema > SCHEMA {
            return Err(ImageJsonError::NewerSchema(schema));
        }
        Ok(serde_json::from_value(value)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageJson {
        ImageJson {
            schema: SCHEMA,
            engine: "sqlite".into(),
            profile: Profile {
                name: "sqlite-readonly".into(),
                env: BTreeMap::from([("SQLITE_TMPDIR".into(), "/tmp".into())]),
                ..Profile::default()
            },
            data_dir: "/var/lib/bakedb".into(),
            owner: Owner {
                uid: 65532,
                gid: 65532,
            },
            snapshot: serde_json::json!({"source": "app.db", "method": "sqlite_dbpage"}),
            chunk_size: 16 << 20,
            files: vec![FileDigest {
                path: "app.db".into(),
                size: 3,
                mode: "0644".into(),
                sha256: Some("ab".repeat(32)),
                chunks: Vec::new(),
                generation: None,
                base: None,
                patches: Vec::new(),
            }],
            dirs: Vec::new(),
            notes: None,
            generation: 0,
            page_index: Vec::new(),
            chain: Vec::new(),
        }
    }

    #[test]
    fn keys_are_sorted_and_absent_parts_left_out() {
        let text = String::from_utf8(sample().to_bytes()).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  \"") && !l.starts_with("    "))
            .map(|l| l.trim().split('"').nth(1).unwrap())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(!text.contains("\"dirs\"") && !text.contains("\"notes\""));
        assert!(!text.contains("\"command\"") && !text.contains("\"verify\""));
        assert!(text.ends_with("}\n"));
        assert_eq!(ImageJson::parse(text.as_bytes()).unwrap(), sample());
    }

    /// The image.json of the e2e golden image, as `bakedb build` wrote it: read and written
    /// back, the same bytes (bakedb-init's reader is tested on the same file).
    #[test]
    fn the_golden_image_json_round_trips() {
        let golden = include_bytes!("../../../tests/e2e/golden/image.json");
        let parsed = ImageJson::parse(golden).unwrap();
        assert_eq!(parsed.engine, "sqlite");
        assert_eq!(parsed.to_bytes(), golden);
    }

    #[test]
    fn refuses_a_newer_schema_and_garbage() {
        let mut newer = serde_json::to_value(sample()).unwrap();
        newer["schema"] = serde_json::json!(2);
        let e = ImageJson::parse(newer.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("schema 2"), "{e}");
        assert!(ImageJson::parse(b"{").is_err());
        assert!(ImageJson::parse(b"{\"schema\": 1}").is_err());
        let mut old = serde_json::to_value(sample()).unwrap();
        old["profile"] = serde_json::json!("sqlite-readonly");
        let read = ImageJson::parse(old.to_string().as_bytes()).unwrap();
        assert_eq!(read.profile.name, "sqlite-readonly");
    }
}
