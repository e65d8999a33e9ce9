//! bakedb-engines: what bakedb knows about each database engine.
//!
//! Per engine: taking a consistent snapshot of a live source, where its files go in the image
//! and with which owner and modes, and what `/etc/bakedb/image.json` says about it. This crate
//! never writes an image layout; `bakedb-oci` never learns about databases.

pub mod datafiles;
pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Where the data lives inside every bakedb image.
pub const DATA_DIR: &str = "var/lib/bakedb";
/// Where the description of the data lives; its digest is the image's BAKEDB_DATA_DIGEST.
pub const IMAGE_JSON: &str = "etc/bakedb/image.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("source {}: {reason}", path.display())]
    Source { path: PathBuf, reason: String },
    #[error("source {}: {what}", path.display())]
    Sqlite {
        path: PathBuf,
        what: String,
        #[source]
        source: rusqlite::Error,
    },
    /// `step` may be empty when the caller's context already says what was being done.
    #[error("{}{detail}", if step.is_empty() { String::new() } else { format!("{step}: ") })]
    Postgres { step: String, detail: String },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One file of a snapshot, as it will appear under DATA_DIR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFile {
    /// Path relative to DATA_DIR.
    pub rel_path: String,
    pub host_path: PathBuf,
    pub mode: u32,
}

/// A directory of a snapshot that must exist in the image even when empty (PostgreSQL's
/// data directory has several), with its mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    /// Path relative to DATA_DIR.
    pub rel_path: String,
    pub mode: u32,
}

/// A consistent copy of a database, ready to be put in a layer.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub engine: &'static str,
    pub files: Vec<DataFile>,
    /// Directories with their modes, parents first; files' other parents are 0755.
    pub dirs: Vec<DataDir>,
    /// Where the snapshot came from and at which point (JSON object, engine-specific).
    pub provenance: serde_json::Value,
}

/// What an engine may learn about a base image without knowing OCI: its config's Env, every
/// path in its merged file system (layers applied in order, whiteouts honoured; relative,
/// no leading '/'), and the contents of the files the engine asked for while the layers
/// were read (see each engine's `wants_base_file`).
#[derive(Clone, Debug, Default)]
pub struct BaseImage {
    pub env: Vec<String>,
    pub paths: BTreeSet<String>,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl BaseImage {
    /// The value of `name` in the config's Env.
    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env.iter().find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
        })
    }
}
