//! `bakedb`: parse the command line, run one subcommand, map failures to documented exit codes.

mod build;
mod duration;
mod exit;
mod inspect;
mod progress;
mod registry;
mod snapshot;
mod verify;
mod watch;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bakedb",
    version,
    about = "Bake a read-only database snapshot into an OCI image"
)]
struct Cli {
    /// Print nothing but errors (and --json output).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Snapshot a database and write it as an OCI image.
    Build(Box<BuildArgs>),
    /// Take a consistent, engine-prepared copy of a live database into a directory.
    Snapshot(SnapshotArgs),
    /// Check every blob digest and size, every diff_id, media types and references.
    Verify(VerifyArgs),
    /// Show tags, digests, sizes, layers, config and the baked data's provenance.
    Inspect(InspectArgs),
    /// Follow a live database: re-bake onto the previous image after each commit and move the tag.
    Watch(Box<watch::WatchArgs>),
}

/// `--engine`: the names bakedb_engines registers; no engine is named here.
fn engine_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(bakedb_engines::engine_names())
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CompressionArg {
    Gzip,
    Zstd,
    None,
}

#[derive(Args, Clone)]
pub struct BuildArgs {
    /// Database engine of the source.
    #[arg(long, value_name = "ENGINE", value_parser = engine_parser())]
    engine: String,
    /// The live database (SQLite: a database file; PostgreSQL: a postgresql:// URI; MariaDB:
    /// a mysql:// URI of a server on this machine) or a directory written by `bakedb snapshot`.
    #[arg(long, value_name = "SOURCE")]
    source: PathBuf,
    /// Directory of the PostgreSQL server tools (pg_basebackup, postgres, ...).
    #[arg(
        long,
        value_name = "DIR",
        long_help = "Directory of the PostgreSQL server tools of the base image's major version (pg_basebackup, postgres, pg_ctl, pg_isready, psql, vacuumdb, pg_controldata, pg_resetwal). Default: the directory of `postgres` on PATH, else /usr/lib/postgresql/N/bin or /usr/pgsql-N/bin for the base image's major version N."
    )]
    pg_bin: Option<PathBuf>,
    /// PostgreSQL: preload the lazy copy-up library (relation files opened read-only until written).
    #[arg(
        long,
        long_help = "PostgreSQL only: add /bakedb/copyup.so (a small layer, the same in every image) and have init preload it into postgres. PostgreSQL opens relation files read-write, so overlayfs copies every file a query touches up into the container's writable layer; with the library they are opened read-only and reopened read-write in place on their first write. Needs a glibc 2.34+ base (the official Debian bookworm images). BAKEDB_COPYUP_SHIM=off in the container turns it off. See README, PostgreSQL."
    )]
    pg_lazy_copyup: bool,
    /// Bake a known loss instead of refusing the source (repeatable).
    #[arg(
        long = "accept",
        value_name = "WHAT",
        long_help = ACCEPT_HELP
    )]
    accept: Vec<String>,
    /// SQLite: how long to wait for a writer's lock on the source (default 5s).
    #[arg(long, value_name = "DURATION", value_parser = duration::parse, long_help = BUSY_TIMEOUT_HELP)]
    busy_timeout: Option<std::time::Duration>,
    /// Where to write the image, in skopeo's syntax.
    #[arg(
        long,
        value_name = "REF",
        long_help = "Where to write the image, in skopeo's transport syntax: oci:DIR:TAG (an OCI layout; other tags are kept), oci-archive:FILE:TAG or docker-archive:FILE:NAME:TAG (replaced atomically), or docker://HOST[:PORT]/REPO:TAG (pushed: blobs the registry has are not sent, the tag moves once every blob is there)."
    )]
    output: String,
    /// Image to build on (default: FROM scratch).
    #[arg(
        long,
        value_name = "REF",
        long_help = "Image to build on: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] or docker://HOST/REPO[:TAG|@sha256:…] (an index gives its linux image for this machine's architecture). Its layers are reused as they are, their digests checked while copied; into a docker:// output on the same registry they are mounted, not downloaded. Without --base the image is FROM scratch."
    )]
    base: Option<String>,
    /// Re-bake onto this previous bakedb image: only what changed ships, as a patch layer.
    #[arg(
        long,
        value_name = "REF",
        long_help = "The previous bakedb image of this database (oci:DIR:TAG, oci-archive:FILE:TAG, docker-archive:FILE:NAME:TAG or docker://HOST/REPO:TAG; only its image.json layer is read). The new image keeps all its layers, shared by digest, and adds one patch layer with only what changed (new files whole, changed files as their changed pages, deleted files as whiteouts) and a new image.json layer; what changed is found from REF's page index, without reading its data. After --max-patches patch generations, or when the image would hold twice its data (base and patches against the data they compose to), the build writes a fresh base instead and says so. See docs/patch-format.md."
    )]
    from: Option<String>,
    /// With --from: patch generations on one base before a fresh base is written.
    #[arg(long, value_name = "N", default_value_t = 8)]
    max_patches: u64,
    /// Layer compression.
    #[arg(
        long,
        value_enum,
        default_value = "gzip",
        value_name = "ALGO",
        long_help = "Compression of the layers bakedb writes: gzip (default; every Docker can pull it), zstd (smaller and faster; needs Docker 23+ or podman) or none."
    )]
    compression: CompressionArg,
    /// Config label KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Manifest annotation KEY=VALUE (repeatable).
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// Image command, as a JSON array or a plain string split on spaces.
    #[arg(long, value_name = "CMD")]
    cmd: Option<String>,
    /// Image entrypoint, run by bakedb-init after verification (JSON array or plain string).
    #[arg(
        long,
        value_name = "ENTRYPOINT",
        long_help = "The image's own entrypoint, as a JSON array or a plain string split on spaces. The image's ENTRYPOINT becomes /bakedb/init followed by it, so it still runs only after the data is verified; like a Dockerfile ENTRYPOINT it drops the base image's CMD unless --cmd is given. Without it the base image's entrypoint is kept after /bakedb/init."
    )]
    entrypoint: Option<String>,
    /// Leave bakedb-init out: no verification at start, ENTRYPOINT as given.
    #[arg(
        long,
        long_help = "Build without bakedb-init: no /bakedb/init layer, nothing verifies the data when a container starts, and ENTRYPOINT is --entrypoint or the base image's. For images whose consumers verify by other means."
    )]
    no_init: bool,
    /// Numeric owner of the data files and the image's User.
    #[arg(
        long,
        value_name = "UID:GID",
        long_help = "Numeric owner of the data files and the image's User. Default: 65532:65532 for sqlite; for postgres the base image's `postgres` user, for mariadb its `mysql` user, from its /etc/passwd (999:999 in the official images)."
    )]
    user: Option<String>,
    /// Fail instead of replacing an existing tag or archive.
    #[arg(long)]
    no_overwrite: bool,
    /// Print the result as JSON on stdout (digest, size, layers).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: registry::RegistryArgs,
}

#[derive(Args)]
pub struct SnapshotArgs {
    /// Database engine of the source.
    #[arg(long, value_name = "ENGINE", value_parser = engine_parser())]
    engine: String,
    /// The live database (SQLite: a database file; PostgreSQL: a postgresql:// URI; MariaDB:
    /// a mysql:// URI of a server on this machine).
    #[arg(long, value_name = "SOURCE")]
    source: PathBuf,
    /// Directory to write the snapshot into (must not exist or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Directory of the PostgreSQL server tools (default: `postgres` on PATH).
    #[arg(long, value_name = "DIR")]
    pg_bin: Option<PathBuf>,
    /// Bake a known loss instead of refusing the source (repeatable).
    #[arg(long = "accept", value_name = "WHAT", long_help = ACCEPT_HELP)]
    accept: Vec<String>,
    /// SQLite: how long to wait for a writer's lock on the source (default 5s).
    #[arg(long, value_name = "DURATION", value_parser = duration::parse, long_help = BUSY_TIMEOUT_HELP)]
    busy_timeout: Option<std::time::Duration>,
}

const BUSY_TIMEOUT_HELP: &str = "SQLite only: how long to wait when another process holds a lock on the source (a writer in the middle of a transaction; in rollback-journal mode its commit locks out readers) before failing with exit code 4. A duration as docker and skopeo take them: 500ms, 30s, 2m, 1m30s; 0 fails at once. Default: 5s.";

const ACCEPT_HELP: &str = "What the source holds that a baked image cannot serve as the source does, accepted instead of refused (repeatable). postgres: `empty-unlogged` bakes UNLOGGED tables and sequences empty (a base backup does not copy their data); `offline-foreign-tables` bakes foreign tables without their user mappings and server options (a replica never talks to another server, so queries on them fail). Each accepted loss is printed as a warning and recorded in image.json \"notes\".";

#[derive(Args)]
pub struct VerifyArgs {
    /// Image reference: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], docker://HOST/REPO:TAG.
    #[arg(value_name = "REF")]
    reference: String,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: registry::RegistryArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Image reference: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], docker://HOST/REPO:TAG.
    #[arg(value_name = "REF")]
    reference: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: registry::RegistryArgs,
}

fn main() {
    let cli = Cli::parse();
    let quiet = cli.quiet;
    let result = match cli.command {
        Command::Build(args) => build::run(*args, quiet),
        Command::Snapshot(args) => snapshot::run(args, quiet),
        Command::Verify(args) => verify::run(args, quiet),
        Command::Inspect(args) => inspect::run(args),
        Command::Watch(args) => watch::run(*args, quiet),
    };
    if let Err(err) = result {
        exit::report_and_exit(err);
    }
}
