//! bakedb-engines: what bakedb knows about each database engine.
//!
//! Every engine implements one contract, [`Engine`] and the [`Plan`] it returns: check the
//! source and the flags before any work, learn what it needs from the base image, take the
//! snapshot (of a live source, or load a snapshot directory), and describe its image as
//! plain data ([`ImageSpec`]: owner, command, environment, ports, stop signal, healthcheck,
//! init profile). `bakedb` dispatches once, through [`engine`], and names no engine
//! anywhere else; adding an engine is a module here and a line in [`ENGINES`].
//!
//! This crate never writes an image layout; `bakedb-oci` never learns about databases.

pub mod datafiles;
pub mod delta;
pub mod image_json;
pub mod mariadb;
pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// `step` may be empty when the caller's context already says what was being done.
    #[error("{}{detail}", if step.is_empty() { String::new() } else { format!("{step}: ") })]
    Mariadb { step: String, detail: String },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The flags do not fit the engine or each other.
    #[error("{step}: {detail}")]
    Usage { step: String, detail: String },
    /// The base image cannot run the snapshot.
    #[error("{step}: {detail}")]
    Base { step: String, detail: String },
}

/// Whose fault an error is: `bakedb` turns it into its exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// Bad flags (exit 2).
    Usage,
    /// The source database (exit 4).
    Source,
    /// The base image (exit 5).
    Base,
}

impl Error {
    /// Bad flags, or flags that do not fit each other, found while doing `step`.
    pub fn usage(step: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Usage {
            step: step.into(),
            detail: detail.into(),
        }
    }

    /// A base image that cannot run the snapshot, found while doing `step`.
    pub fn base(step: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Base {
            step: step.into(),
            detail: detail.into(),
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            Error::Usage { .. } => Blame::Usage,
            Error::Base { .. } => Blame::Base,
            Error::Source { .. }
            | Error::Sqlite { .. }
            | Error::Postgres { .. }
            | Error::Mariadb { .. }
            | Error::Io { .. } => Blame::Source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One file of a snapshot, as it will appear under DATA_DIR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFile {
    /// Path relative to DATA_DIR.
    pub rel_path: String,
    pub host_path: PathBuf,
    pub mode: u32,
    /// The engine's page size for this file (delta re-bakes ship changed pages); 0: the
    /// whole file is one unit.
    pub page_size: u32,
    /// Bytes at the start of each page that a prepared copy may rewrite without changing
    /// the page (PostgreSQL's pd_lsn and pd_checksum: 10): the page index keeps them beside
    /// the page's hash, and a re-bake writes the previous ones back (docs/patch-format.md).
    pub page_header: u32,
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
    /// Files the engine hashed while it read them, by `rel_path`: the digests and pages
    /// `datafiles::digest_and_pages` would give for the whole file.
    pub hashed: Hashes,
    /// The files in `hashed` hold only the pages that differ from the previous image's index
    /// (`Plan::snapshot_changes`): enough for a patch, not for shipping them whole.
    pub partial: bool,
}

/// A snapshot being read from the source (`Plan::snapshot_stream`). It holds the source's
/// committed point from the start; its files' bytes come from `files`' readers in the order
/// of `snapshot.files`, and each reader's end is the engine's last word: it ends with an
/// error, not at its size, when the snapshot fails (a check that finds corruption), so a
/// layer written from it is never committed. Dropped unread, it ends the snapshot.
pub struct Streaming {
    /// The snapshot as known at its start: its files have no copy (`host_path` is empty).
    pub snapshot: Snapshot,
    pub files: Vec<StreamedFile>,
    /// Waits for the end of the snapshot, once the readers are done with: its verdict, and
    /// what goes in `Snapshot::hashed` (every file hashed on the way).
    pub finish: Box<dyn FnOnce() -> Result<Hashes> + Send>,
}

/// Files hashed while they were read, by `rel_path` (`Snapshot::hashed`).
pub type Hashes = BTreeMap<String, (datafiles::FileDigest, delta::FilePages)>;

/// One file of a `Streaming` snapshot.
pub struct StreamedFile {
    pub rel_path: String,
    pub size: u64,
    pub reader: Box<dyn std::io::Read + Send>,
}

/// What a delta re-bake knows of the previous image (`--from`) without reading its data: its
/// page index and its files' digests (image.json's "files"), so an engine can keep only what
/// changed.
#[derive(Clone, Copy, Debug)]
pub struct Known<'a> {
    pub index: &'a delta::PageIndex,
    pub files: &'a [datafiles::FileDigest],
}

impl Known<'_> {
    /// The previous image's pages and digest of the file at `rel_path`, when it had one.
    pub fn file(&self, rel_path: &str) -> Option<(&delta::FilePages, &datafiles::FileDigest)> {
        let pages = self.index.get(rel_path)?;
        let digest = self.files.iter().find(|f| f.path == rel_path)?;
        Some((pages, digest))
    }
}

/// What an engine may learn about a base image without knowing OCI: its config's Env, every
/// path in its merged file system (layers applied in order, whiteouts honoured; relative,
/// no leading '/'), and the contents of the files the engine asked for while the layers
/// were read (see each engine's `wants_base_file`).
#[derive(Clone, Debug, Default)]
pub struct BaseImage {
    /// Where it is, for messages ("oci:postgres:15").
    pub location: String,
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

/// The engine-specific flags of `bakedb build` and `bakedb snapshot`, as given. Each engine
/// takes its own and refuses the others with a usage error.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--accept WHAT`: a known loss to bake instead of refusing the source.
    pub accept: Vec<String>,
    /// `--busy-timeout`: how long to wait for a writer's lock (sqlite).
    pub busy_timeout: Option<Duration>,
    /// `--pg-bin DIR`: the PostgreSQL server tools.
    pub pg_bin: Option<PathBuf>,
    /// `--pg-lazy-copyup`: preload bakedb's lazy copy-up library into postgres.
    pub pg_lazy_copyup: bool,
    /// The plan is for `bakedb snapshot`: the source must be live, and there is no base
    /// image (nor an image).
    pub for_snapshot: bool,
}

/// A database engine bakedb can bake.
pub trait Engine: Sync {
    /// Its name on the command line (`--engine`) and in image.json.
    fn name(&self) -> &'static str;

    /// Whether the image must be built on a base image that brings the database server; the
    /// others can be FROM scratch (served by bakedb's own server).
    fn needs_base(&self) -> bool;

    /// Why `--base` is needed, with advice, for the usage error when it is missing.
    fn base_advice(&self) -> &'static str {
        "pass --base with an image that has the database server"
    }

    /// Base image files the engine reads while bakedb scans the base's layers: how many bytes
    /// of the file at `path` (relative), or None.
    fn wants_base_file(&self, _path: &str) -> Option<usize> {
        None
    }

    /// Check the flags, the source and the base image, before any work: nothing is copied
    /// or written. `source` is a live database or a directory written by `bakedb snapshot`.
    /// `previous`: the image.json of the image a delta re-bake (`--from`) builds on.
    fn plan(
        &self,
        source: &Path,
        options: &Options,
        base: Option<&BaseImage>,
        previous: Option<&image_json::ImageJson>,
    ) -> Result<Box<dyn Plan>>;

    /// Follow a live source for `bakedb watch` (never a snapshot directory: watch refuses
    /// those first): something that tells where it stands now.
    fn follow(&self, source: &Path, _options: &Options) -> Result<Box<dyn Follow>> {
        Err(Error::Usage {
            step: "following the source".into(),
            detail: format!(
                "bakedb watch cannot follow {} sources yet ({}); re-bake with `bakedb build --from`",
                self.name(),
                source.display()
            ),
        })
    }
}

/// A live source that `bakedb watch` follows.
pub trait Follow: Send {
    /// Where the source stands now, as an opaque text that is different after any
    /// transaction committed since the last call (it may also differ without one). A bake
    /// started after this call holds every transaction committed before it.
    fn position(&mut self) -> Result<String>;
}

/// A build or snapshot an engine has checked and is ready to do.
pub trait Plan {
    /// The data owner when `--user` does not say: an error names what is missing.
    fn owner(&self) -> Result<(u32, u32)>;

    /// What the snapshot step is, for messages: "taking the snapshot", "snapshotting URL".
    fn snapshot_step(&self) -> String;

    /// Take the snapshot into `out_dir` (an existing, private directory), or load the
    /// snapshot directory the plan was made for (then `out_dir` is not used). `durable`:
    /// fsync what is written (a snapshot directory that outlives the command).
    fn snapshot(
        &mut self,
        out_dir: &Path,
        taken_at: &str,
        durable: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Snapshot>;

    /// For a delta re-bake: a snapshot that keeps on disk only the pages that differ from
    /// `known`, hashing the rest as it reads them (`Snapshot::partial`), so a small change
    /// costs one read of the source and no full copy. None: this plan has no such snapshot
    /// (the caller takes a whole one). A build that finds it needs whole files after all (a
    /// fresh base) takes a whole snapshot again: a later point of the source, as consistent.
    fn snapshot_changes(
        &mut self,
        _out_dir: &Path,
        _taken_at: &str,
        _known: &Known<'_>,
        _progress: &mut dyn FnMut(&str),
    ) -> Result<Option<Snapshot>> {
        Ok(None)
    }

    /// For a full build: a snapshot whose files go from the source straight into the data
    /// layer as they are read, with no private copy (`Streaming`). None: this plan has no
    /// such snapshot (the caller takes one with `snapshot`).
    fn snapshot_stream(
        &mut self,
        _taken_at: &str,
        _progress: &mut dyn FnMut(&str),
    ) -> Result<Option<Streaming>> {
        Ok(None)
    }

    /// One line about a snapshot just taken, for the progress output (None: nothing to say,
    /// e.g. a snapshot directory read as it is).
    fn describe(&self, snapshot: &Snapshot) -> Option<String>;

    /// Write `snapshot.json` into a snapshot directory (last: a directory without it is not a
    /// snapshot).
    fn write_snapshot_meta(&self, dir: &Path, snapshot: &Snapshot) -> Result<()>;

    /// The image of `snapshot`, as plain data. `from_scratch`: no base image.
    fn image(&self, snapshot: &Snapshot, from_scratch: bool) -> Result<ImageSpec>;
}

/// bakedb's own programs an image may need, each in a layer of its own that is the same in
/// every image (so registries and nodes store it once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bundled {
    /// bakedb-serve, the read-only SQLite server of FROM-scratch images.
    Serve,
    /// The lazy copy-up preload library for postgres (crates/copyup-shim).
    CopyupShim,
}

/// Where the lazy copy-up library lives in an image.
pub const COPYUP_SHIM_PATH: &str = "/bakedb/copyup.so";

/// An engine's image as plain data; `bakedb` turns it into a config.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSpec {
    /// The command when the user gives none; None keeps the base image's.
    pub cmd: Option<Vec<String>>,
    /// Whether the base image's ENTRYPOINT still runs after bakedb-init (a server image's
    /// entrypoint that initialises a database must not).
    pub inherit_entrypoint: bool,
    /// With --no-init and no --entrypoint: replace the base's entrypoint by nothing.
    pub clear_entrypoint_without_init: bool,
    /// Added to the config's Env, after BAKEDB_DATA_DIGEST.
    pub env: Vec<String>,
    /// A PATH the image needs, put first in its Env.
    pub path: Option<String>,
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
    /// Docker's HEALTHCHECK object.
    pub healthcheck: Option<serde_json::Value>,
    /// How bakedb-init starts the engine read-only.
    pub profile: image_json::Profile,
    pub bundled: Vec<Bundled>,
    /// How patched files of a delta re-bake reach the engine.
    pub patch_mode: PatchMode,
    /// What the build lost or left out: printed as warnings and kept in image.json. None: the
    /// engine keeps no notes (image.json has no "notes").
    pub notes: Option<Vec<String>>,
}

/// How the files of a delta re-bake (docs/patch-format.md) reach the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchMode {
    /// bakedb-init composes them in place before the engine starts (engines that read their
    /// files themselves).
    Apply,
    /// The engine reads base and patches itself; this variable of its profile lists the
    /// patch files of its data file, oldest first, separated by ':'.
    InPlace { env: &'static str },
}

/// Every engine bakedb can bake, in `--engine`'s order.
pub static ENGINES: [&dyn Engine; 3] = [&sqlite::Sqlite, &postgres::Postgres, &mariadb::Mariadb];

/// The engine called `name`.
pub fn engine(name: &str) -> Option<&'static dyn Engine> {
    ENGINES.iter().copied().find(|e| e.name() == name)
}

/// The names `--engine` takes.
pub fn engine_names() -> Vec<&'static str> {
    ENGINES.iter().map(|e| e.name()).collect()
}

/// A snapshot's "notes" (in its provenance): what it lost or left out, one sentence each.
pub fn notes_of(provenance: &serde_json::Value) -> Vec<String> {
    provenance["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}
