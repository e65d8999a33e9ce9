//! `bakedb build`: snapshot (or reuse a snapshot), then write base layers, the data layer and
//! the image.json layer, then config, manifest and the tag, in that order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use bakedb_engines::{BaseImage, DATA_DIR, IMAGE_JSON, Snapshot, datafiles, postgres, sqlite};
use bakedb_oci::compress::Compression;
use bakedb_oci::image::{ConfigChanges, NewLayer, derive_config};
use bakedb_oci::layer::LayerInfo;
use bakedb_oci::output::Output;
use bakedb_oci::reference::ImageRef;
use bakedb_oci::source::{ImageSource, ResolvedImage};
use bakedb_oci::tarball::TarEntry;
use bakedb_oci::{Digest, time};
use serde_json::json;

use crate::exit::{Code, StageExt};
use crate::progress::{Progress, human_bytes};
use crate::{BuildArgs, CompressionArg, EngineArg};

/// The static bakedb-init built by build.rs; the same bytes go into every image.
pub const INIT_BINARY: &[u8] = include_bytes!(env!("BAKEDB_INIT_PATH"));
/// Where init lives in the image: its ENTRYPOINT.
pub const INIT_PATH: &str = "/bakedb/init";

/// The init layer: identical in every image this bakedb writes with the same compression
/// (fixed mtime, no SOURCE_DATE_EPOCH), so registries and hosts store it once. It also
/// brings /tmp, which a FROM-scratch image lacks and the engines' profiles write into.
fn init_entries() -> Vec<TarEntry> {
    vec![
        TarEntry::dir("bakedb", 0o755, 0, 0),
        TarEntry::bytes(&INIT_PATH[1..], INIT_BINARY.to_vec(), 0o755, 0, 0),
        TarEntry::dir("tmp", 0o1777, 0, 0),
    ]
}

/// The lazy copy-up preload library for postgres (crates/copyup-shim), built by build.rs.
pub const COPYUP_SHIM: &[u8] = include_bytes!(env!("BAKEDB_COPYUP_SHIM_PATH"));
/// Where it lives in the image; the postgres profile's LD_PRELOAD names it.
pub const COPYUP_SHIM_PATH: &str = "/bakedb/copyup.so";

/// The copy-up shim layer: like the init layer, the same blob in every image that has it.
fn copyup_shim_entries() -> Vec<TarEntry> {
    vec![
        TarEntry::dir("bakedb", 0o755, 0, 0),
        TarEntry::bytes(&COPYUP_SHIM_PATH[1..], COPYUP_SHIM.to_vec(), 0o644, 0, 0),
    ]
}

/// The static bakedb-serve built by build.rs: the engine of a FROM-scratch image.
pub const SERVE_BINARY: &[u8] = include_bytes!(env!("BAKEDB_SERVE_PATH"));
/// On the default PATH, so `bakedb-serve` works as a command in any image.
pub const SERVE_PATH: &str = "/usr/local/bin/bakedb-serve";

/// The serve layer: like the init layer, the same blob in every FROM-scratch image.
fn serve_entries() -> Vec<TarEntry> {
    vec![TarEntry::bytes(
        &SERVE_PATH[1..],
        SERVE_BINARY.to_vec(),
        0o755,
        0,
        0,
    )]
}

/// ENTRYPOINT and CMD as Docker would combine them, with init in front: the user's
/// --entrypoint or else the base's runs after /bakedb/init; a new entrypoint drops the base's
/// CMD unless --cmd is given. `inherit` false ignores the base's entrypoint (the official
/// postgres image's docker-entrypoint.sh would initialise a database, not serve the baked one).
fn init_command(
    base_config: Option<&serde_json::Value>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    inherit: bool,
) -> (Vec<String>, Option<Vec<String>>) {
    let inherited = |key: &str| -> Option<Vec<String>> {
        if !inherit {
            return None;
        }
        serde_json::from_value(base_config?.get("config")?.get(key)?.clone()).ok()
    };
    let user_gave_entrypoint = entrypoint.is_some();
    let mut full = vec![INIT_PATH.to_owned()];
    full.extend(
        entrypoint
            .or_else(|| inherited("Entrypoint"))
            .unwrap_or_default(),
    );
    let cmd = match cmd {
        Some(cmd) => Some(cmd),
        None if user_gave_entrypoint => None,
        None => inherited("Cmd"),
    };
    (full, cmd)
}

/// A base image bakedb built itself is refused: the new image would carry the old data and
/// image.json under the new ones (init finds files image.json does not list and exits 3)
/// and, without --entrypoint, run `/bakedb/init /bakedb/init ...`. Re-baking a bakedb image
/// is what `--from` is for; until it exists, the advice is to build from the original base.
fn refuse_bakedb_base(config: &serde_json::Value) -> Result<(), String> {
    let runtime = &config["config"];
    let mut marks = Vec::new();
    if let Some(engine) = runtime["Labels"]["io.bakedb.engine"].as_str() {
        marks.push(format!("label io.bakedb.engine={engine}"));
    }
    let env = runtime["Env"].as_array().into_iter().flatten();
    if env
        .filter_map(|v| v.as_str())
        .any(|v| v.starts_with("BAKEDB_DATA_DIGEST="))
    {
        marks.push("BAKEDB_DATA_DIGEST in its Env".into());
    }
    if runtime["Entrypoint"][0].as_str() == Some(INIT_PATH) {
        marks.push(format!("ENTRYPOINT {INIT_PATH}"));
    }
    if marks.is_empty() {
        return Ok(());
    }
    // bakedb marks each history entry it adds; an image with nothing else was FROM scratch.
    let history = config["history"].as_array().into_iter().flatten();
    let from_scratch = history
        .clone()
        .all(|h| h["comment"].as_str() == Some("bakedb"));
    let advice = if from_scratch && history.count() > 0 {
        "it was built FROM scratch, so drop --base"
    } else {
        "pass the base image it was built on as --base"
    };
    Err(format!(
        "it is an image bakedb built ({}): building on it would stack new data and a new image.json over the old ones, and the image would never start (init finds files image.json does not list); build from the original base image instead: {advice} (re-baking a bakedb image is what --from will do, in a later version)",
        marks.join(", ")
    ))
}

/// A `postgresql://` --source, its password moved out of the command line.
pub fn live_source(text: &str) -> Result<postgres::Source> {
    postgres::Source::new(text)
        .stage(Code::Output, || "preparing the connection to --source".into())?
        .ok_or_else(|| {
            anyhow!(
                "{:?} is not a PostgreSQL connection URI; pass postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (the user needs the REPLICATION attribute) or a directory written by `bakedb snapshot --engine postgres`",
                postgres::redact(text)
            )
        })
        .stage(Code::Source, || "checking --source".into())
}

pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn parse_kv(items: &[String], flag: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(anyhow!("{flag} {kv:?}: expected KEY=VALUE")),
        })
        .collect::<Result<_>>()
        .stage(Code::Usage, || format!("parsing {flag}"))
}

fn parse_command(text: &str, flag: &str) -> Result<Vec<String>> {
    if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
            .with_context(|| format!("{flag} {text:?} is not a JSON array of strings"))
            .stage(Code::Usage, || format!("parsing {flag}"))
    } else {
        Ok(text.split_whitespace().map(str::to_owned).collect())
    }
}

fn parse_user(user: &str) -> Result<(u32, u32)> {
    let parsed = user
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    parsed
        .ok_or_else(|| anyhow!("--user {user:?}: expected numeric UID:GID, e.g. 65532:65532"))
        .stage(Code::Usage, || "parsing --user".into())
}

/// A scratch directory removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self> {
        let base = std::env::temp_dir();
        remove_dead_scratch_dirs(&base);
        for n in 0..1000 {
            let p = base.join(format!("bakedb-snapshot.{}.{n}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return Ok(ScratchDir(p));
            }
        }
        bail!(
            "could not create a scratch directory under {}",
            base.display()
        )
    }
}

/// Scratch directories of builds that were killed (SIGKILL skips Drop): full database copies.
fn remove_dead_scratch_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("bakedb-snapshot.")
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A SQLite snapshot into `out`. The stage does not name the source: the engine's error
/// starts with it ("source app.db: is busy: ...").
pub fn take_snapshot(
    source: &Path,
    out: &Path,
    epoch: i64,
    durable: bool,
    busy_timeout: Option<std::time::Duration>,
) -> Result<Snapshot> {
    let snap = sqlite::snapshot(
        source,
        out,
        &time::rfc3339(epoch.min(time::now())),
        durable,
        busy_timeout.unwrap_or(sqlite::DEFAULT_BUSY_TIMEOUT),
    )
    .stage(Code::Source, || "taking the snapshot".into())?;
    Ok(snap)
}

/// The postgres facts of a base image: one pass over its layers for the merged file tree
/// and the few files the engine reads.
fn postgres_base(source: &ImageSource, image: &ResolvedImage) -> Result<postgres::Base> {
    let what = || format!("reading base image {}", source.location());
    let tree = source
        .file_tree(&image.layers, &postgres::wants_base_file)
        .stage(Code::Base, what)?;
    let env = image.config["config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let base_image = BaseImage {
        env,
        paths: tree.paths,
        files: tree.files,
    };
    postgres::Base::discover(&base_image)
        .map_err(|why| anyhow!(why))
        .stage(Code::Base, what)
}

/// The snapshot's "notes": what it lost or left out, one sentence each.
pub fn notes_of(provenance: &serde_json::Value) -> Vec<String> {
    provenance["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

/// Print what a snapshot lost or left out: loudly, --quiet or not (it is also in image.json).
pub fn warn_notes(notes: &[String]) {
    for note in notes {
        crate::exit::stderr_line(&format!("bakedb: warning: {note}"));
    }
}

pub fn run(args: BuildArgs, quiet: bool) -> Result<()> {
    if args.engine == EngineArg::Mariadb {
        return Err(anyhow!(
            "engine mariadb is not supported yet: sqlite and postgres can be baked in this version"
        ))
        .stage(Code::Usage, || "checking --engine".into());
    }
    let is_postgres = args.engine == EngineArg::Postgres;
    if args.pg_lazy_copyup && !is_postgres {
        return Err(anyhow!("--pg-lazy-copyup is for --engine postgres"))
            .stage(Code::Usage, || "checking --pg-lazy-copyup".into());
    }
    if args.busy_timeout.is_some() && is_postgres {
        return Err(anyhow!(
            "--busy-timeout is for --engine sqlite: a PostgreSQL base backup does not wait for writers' locks"
        ))
        .stage(Code::Usage, || "checking --busy-timeout".into());
    }
    if is_postgres && args.base.is_none() {
        return Err(anyhow!(
            "--engine postgres needs --base: an image with the PostgreSQL server, e.g. the official one copied with `skopeo copy docker://postgres:15 oci:postgres:15` (`cargo xtask fixtures` builds an equivalent from Debian's packages)"
        ))
        .stage(Code::Usage, || "checking --base".into());
    }
    let compression = match args.compression {
        CompressionArg::Gzip => Compression::Gzip,
        CompressionArg::Zstd => Compression::Zstd,
        CompressionArg::None => Compression::None,
    };
    let epoch = time::build_epoch()
        .map_err(|e| anyhow!(e))
        .stage(Code::Usage, || "reading SOURCE_DATE_EPOCH".into())?;
    let created = time::rfc3339(epoch);
    let mtime = epoch as u64;
    let labels = parse_kv(&args.labels, "--label")?;
    let mut annotations = parse_kv(&args.annotations, "--annotation")?;
    let cmd = args
        .cmd
        .as_deref()
        .map(|c| parse_command(c, "--cmd"))
        .transpose()?;
    let entrypoint = args
        .entrypoint
        .as_deref()
        .map(|c| parse_command(c, "--entrypoint"))
        .transpose()?;
    let output_ref: ImageRef = args
        .output
        .parse()
        .stage(Code::Usage, || "parsing --output".into())?;
    let mut progress = Progress::new(quiet);

    // Everything that can be checked cheaply is checked before the output is touched.
    let from_snapshot_dir = args.source.is_dir();
    if !from_snapshot_dir && !is_postgres {
        sqlite::check_source(&args.source).stage(Code::Source, || "checking --source".into())?;
    }
    let base = match &args.base {
        None => None,
        Some(text) => {
            let base_ref: ImageRef = text
                .parse()
                .stage(Code::Usage, || "parsing --base".into())?;
            let what = || format!("reading base image {base_ref}");
            let source = ImageSource::open(&base_ref).stage(Code::Base, what)?;
            let image = source.resolve().stage(Code::Base, what)?;
            refuse_bakedb_base(&image.config)
                .map_err(|why| anyhow!(why))
                .stage(Code::Base, || format!("checking base image {base_ref}"))?;
            source
                .check_layers_present(&image)
                .stage(Code::Base, what)?;
            Some((source, image))
        }
    };
    // PostgreSQL: the data directory only starts under the major version that wrote it, so
    // the base image's version decides, and a mismatch stops the build before any work; so
    // does a base that lacks what the data needs (a locale, an extension).
    let source_text = args.source.to_string_lossy().into_owned();
    let accept = if is_postgres {
        postgres::Accept::parse(&args.accept)
            .map_err(|why| anyhow!(why))
            .stage(Code::Usage, || "parsing --accept".into())?
    } else if let Some(what) = args.accept.first() {
        return Err(anyhow!(
            "{what:?}: a SQLite database is baked whole, there is nothing to accept"
        ))
        .stage(Code::Usage, || "parsing --accept".into());
    } else {
        postgres::Accept::default()
    };
    let mut pg_snapshot = None;
    let mut pg_live = None;
    let mut pg_base = None;
    if let (true, Some((source, image))) = (is_postgres, &base) {
        let pg = postgres_base(source, image)?;
        let major = pg.major;
        let check_fit = |needs: &serde_json::Value| {
            pg.fit(needs)
                .map_err(|why| anyhow!(why))
                .stage(Code::Base, || {
                    format!("checking base image {}", source.location())
                })
        };
        if from_snapshot_dir {
            let (snap, data_major) = postgres::load_snapshot_dir(&args.source)
                .stage(Code::Source, || {
                    format!("reading snapshot directory {}", args.source.display())
                })?;
            if data_major != major {
                return Err(anyhow!(
                    "the snapshot is a PostgreSQL {data_major} data directory and the base image has PostgreSQL {major}; use a base image of PostgreSQL {data_major}"
                ))
                .stage(Code::Base, || "checking versions".into());
            }
            let fit = check_fit(&snap.provenance)?;
            pg_snapshot = Some(snap);
            pg_base = Some((pg, fit));
        } else {
            let tools = postgres::Tools::find(args.pg_bin.as_deref(), Some(major))
                .stage(Code::Usage, || "finding the PostgreSQL server tools".into())?;
            let conn = live_source(&source_text)?;
            let info = postgres::probe_source(&tools, &conn, accept)
                .stage(Code::Source, || "checking --source".into())?;
            check_fit(&info.needs())?;
            pg_live = Some((tools, conn, info));
            pg_base = Some((pg, postgres::Fit::default()));
        }
    }

    let (uid, gid) = match (&args.user, &base) {
        (Some(user), _) => parse_user(user)?,
        (None, Some((source, _))) if is_postgres => pg_base
            .as_ref()
            .and_then(|(pg, _)| pg.postgres_user)
            .ok_or_else(|| {
                anyhow!("the base image's /etc/passwd has no `postgres` user; pass --user UID:GID of the user its postgres should run as")
            })
            .stage(Code::Base, || format!("reading base image {}", source.location()))?,
        (None, _) => (65532, 65532),
    };
    let output = Output::open(&output_ref, compression, !args.no_overwrite)
        .stage(Code::Output, || format!("opening output {output_ref}"))?;

    let scratch;
    let snapshot = if let Some(snap) = pg_snapshot {
        snap
    } else if let Some((tools, conn, info)) = &pg_live {
        scratch =
            ScratchDir::new().stage(Code::Output, || "creating a scratch directory".into())?;
        let taken_at = time::rfc3339(epoch.min(time::now()));
        let request = postgres::Request {
            tools,
            source: conn,
            info,
            accept,
            out_dir: &scratch.0,
            taken_at: &taken_at,
            durable: false,
        };
        let snap = postgres::snapshot(&request, &mut |step| progress.phase(step, 0))
            .stage(Code::Source, || format!("snapshotting {}", conn.redacted()))?;
        progress.done(&format!(
            "snapshot of {} ({}) at LSN {} (pg_basebackup, ANALYZE, VACUUM (FREEZE), clean shutdown)",
            conn.redacted(),
            snap.provenance["server_role"].as_str().unwrap_or("?"),
            snap.provenance["position"]["lsn"].as_str().unwrap_or("?")
        ));
        // The copy is the authoritative look at what the data needs.
        if let Some((pg, fit)) = &mut pg_base {
            *fit = pg
                .fit(&snap.provenance)
                .map_err(|why| anyhow!(why))
                .stage(Code::Base, || {
                    "checking the base image against the copy".into()
                })?;
        }
        snap
    } else if from_snapshot_dir {
        // The engine's error names the directory ("source DIR: ...").
        sqlite::load_snapshot_dir(&args.source)
            .stage(Code::Source, || "reading the snapshot directory".into())?
    } else {
        scratch =
            ScratchDir::new().stage(Code::Output, || "creating a scratch directory".into())?;
        progress.phase("snapshot", 0);
        let snap = take_snapshot(&args.source, &scratch.0, epoch, false, args.busy_timeout)?;
        progress.done(&format!(
            "snapshot of {} taken with the SQLite online backup API",
            args.source.display()
        ));
        snap
    };

    let mut layers: Vec<LayerInfo> = Vec::new();
    let mut new_layers = Vec::new();
    if let Some((source, image)) = &base {
        let total: u64 = image.layers.iter().map(|l| l.size).sum();
        progress.phase("base layers", total);
        layers = output
            .copy_base_layers(source, image, &mut |n| progress.inc(n))
            .stage(Code::Base, || {
                format!("copying layers of base image {}", source.location())
            })?;
        progress.done(&format!(
            "{} base layers ({}) reused from {}",
            layers.len(),
            human_bytes(total),
            source.location()
        ));
    }

    // Layers that are the same in every image: fixed mtime, no SOURCE_DATE_EPOCH.
    let from_scratch = base.is_none();
    let mut fixed = Vec::new();
    if !args.no_init {
        fixed.push(("bakedb-init", INIT_PATH, INIT_BINARY.len(), init_entries()));
    }
    if args.pg_lazy_copyup {
        fixed.push((
            "bakedb-copyup-shim",
            COPYUP_SHIM_PATH,
            COPYUP_SHIM.len(),
            copyup_shim_entries(),
        ));
    }
    if from_scratch {
        fixed.push((
            "bakedb-serve",
            SERVE_PATH,
            SERVE_BINARY.len(),
            serve_entries(),
        ));
    }
    for (name, path, size, entries) in fixed {
        let layer = output
            .write_fixed_layer(compression, entries, threads())
            .stage(Code::Output, || {
                format!("writing the {name} layer to {output_ref}")
            })?;
        progress.done(&format!(
            "{name} layer {} ({} {name} {})",
            layer.digest,
            human_bytes(size as u64),
            env!("CARGO_PKG_VERSION")
        ));
        new_layers.push(NewLayer {
            layer: layer.clone(),
            created_by: format!(
                "bakedb build: {path} ({name} {})",
                env!("CARGO_PKG_VERSION")
            ),
        });
        layers.push(layer);
    }

    let data_total: u64 = snapshot
        .files
        .iter()
        .map(|f| std::fs::metadata(&f.host_path).map_or(0, |m| m.len()))
        .sum();
    let mut data_entries = vec![TarEntry::dir(DATA_DIR, 0o755, uid, gid)];
    for d in &snapshot.dirs {
        data_entries.push(TarEntry::dir(
            &format!("{DATA_DIR}/{}", d.rel_path),
            d.mode,
            uid,
            gid,
        ));
    }
    for f in &snapshot.files {
        data_entries.push(
            TarEntry::file(
                &format!("{DATA_DIR}/{}", f.rel_path),
                f.host_path.clone(),
                f.mode,
                uid,
                gid,
            )
            .stage(Code::Source, || {
                format!("reading snapshot file {}", f.host_path.display())
            })?,
        );
    }
    progress.phase("data layer", data_total);
    let threads = threads();
    // The data layer and image.json's file digests read the same files: do both at once,
    // leaving the layer writer's thread a core of its own.
    let (data_layer, digests) = std::thread::scope(|scope| {
        let digests = scope.spawn(|| {
            snapshot
                .files
                .iter()
                .map(|f| datafiles::digest_file(f, (threads - 1).max(1)))
                .collect::<Result<Vec<_>, _>>()
        });
        let layer = output.write_layer(compression, data_entries, mtime, threads, &mut |n| {
            progress.inc(n)
        });
        (layer, digests.join().expect("digest thread panicked"))
    });
    let data_layer = data_layer.stage(Code::Output, || {
        format!("writing the data layer to {output_ref}")
    })?;
    let digests = digests.stage(Code::Source, || "hashing the snapshot files".into())?;
    progress.done(&format!(
        "data layer {} ({} → {} {})",
        data_layer.digest,
        human_bytes(data_total),
        human_bytes(data_layer.size),
        compression.name()
    ));

    let mut image_json = json!({
        "schema": 1,
        "engine": snapshot.engine,
        "profile": if let Some((_, fit)) = &pg_base {
            postgres::profile(&fit.carried, args.pg_lazy_copyup.then_some(COPYUP_SHIM_PATH))
        } else {
            sqlite::profile(&snapshot)
        },
        "data_dir": format!("/{DATA_DIR}"),
        "owner": {"uid": uid, "gid": gid},
        "snapshot": snapshot.provenance,
        "chunk_size": datafiles::CHUNK_SIZE,
        "files": digests,
    });
    if !snapshot.dirs.is_empty() {
        // Empty directories PostgreSQL insists on (pg_notify, pg_twophase, ...) are part of
        // the data, so init checks they exist.
        image_json["dirs"] = json!(
            snapshot
                .dirs
                .iter()
                .map(|d| &d.rel_path)
                .collect::<Vec<_>>()
        );
    }
    let mut notes = notes_of(&snapshot.provenance);
    if let Some((_, fit)) = &pg_base {
        notes.extend(fit.notes.iter().cloned());
        image_json["notes"] = json!(notes);
    }
    warn_notes(&notes);
    let mut image_json_bytes = serde_json::to_vec_pretty(&image_json).expect("json");
    image_json_bytes.push(b'\n');
    let data_digest = Digest::of(&image_json_bytes);
    let meta_layer = output
        .write_layer(
            compression,
            vec![TarEntry::bytes(IMAGE_JSON, image_json_bytes, 0o644, 0, 0)],
            mtime,
            threads,
            &mut |_| {},
        )
        .stage(Code::Output, || {
            format!("writing the image.json layer to {output_ref}")
        })?;

    // FROM scratch, the image's own command is bakedb-serve on the baked database; on a
    // postgres base it is postgres on the baked cluster (the profile adds its flags).
    let cmd = match cmd {
        None if from_scratch && entrypoint.is_none() => Some(vec!["bakedb-serve".to_owned()]),
        None if is_postgres && entrypoint.is_none() => Some(vec!["postgres".to_owned()]),
        cmd => cmd,
    };
    let (entrypoint, cmd) = if args.no_init {
        (entrypoint.or_else(|| is_postgres.then(Vec::new)), cmd)
    } else {
        let (entrypoint, cmd) = init_command(
            base.as_ref().map(|(_, i)| &i.config),
            entrypoint,
            cmd,
            !is_postgres,
        );
        (Some(entrypoint), cmd)
    };
    let mut env = vec![format!("BAKEDB_DATA_DIGEST={data_digest}")];
    if from_scratch {
        env.insert(0, "PATH=/usr/local/bin:/usr/bin:/bin".into());
    }
    if is_postgres {
        // For the tools people run in the container (psql, pg_isready, pg_controldata): the
        // baked cluster and the socket directory of the profile.
        env.push(format!("PGDATA=/{DATA_DIR}/{}", postgres::PGDATA));
        env.push("PGHOST=/tmp".into());
        // Debian's and RHEL's server packages keep postgres off PATH; the image's command
        // and healthcheck name it bare.
        if let Some(path) = pg_base.as_ref().and_then(|(pg, _)| pg.path_env.clone()) {
            env.push(format!("PATH={path}"));
        }
    }
    let changes = ConfigChanges {
        user: Some(format!("{uid}:{gid}")),
        env,
        exposed_ports: if from_scratch {
            vec!["8080/tcp".into()]
        } else if is_postgres {
            vec!["5432/tcp".into()]
        } else {
            Vec::new()
        },
        stop_signal: if from_scratch {
            Some("SIGTERM".into())
        } else if is_postgres {
            // Fast shutdown: PostgreSQL's SIGTERM waits for every client to disconnect.
            Some("SIGINT".into())
        } else {
            None
        },
        healthcheck: is_postgres.then(|| {
            json!({
                "Test": ["CMD", "pg_isready", "-q"],
                "Interval": 5_000_000_000u64,
                "Timeout": 5_000_000_000u64,
                "Retries": 3,
            })
        }),
        entrypoint,
        cmd,
        labels: {
            let mut l = labels;
            l.entry("io.bakedb.engine".into())
                .or_insert_with(|| snapshot.engine.into());
            l.insert("io.bakedb.data-digest".into(), data_digest.to_string());
            l
        },
        ..Default::default()
    };
    new_layers.push(NewLayer {
        layer: data_layer.clone(),
        created_by: format!("bakedb build: {} data under /{DATA_DIR}", snapshot.engine),
    });
    new_layers.push(NewLayer {
        layer: meta_layer.clone(),
        created_by: format!("bakedb build: /{IMAGE_JSON}"),
    });
    let config = derive_config(
        base.as_ref().map(|(_, image)| &image.config),
        &changes,
        &new_layers,
        &created,
    );
    layers.push(data_layer);
    layers.push(meta_layer);
    annotations
        .entry("org.opencontainers.image.created".into())
        .or_insert_with(|| created.clone());
    if let Some(tag) = output_ref.tag() {
        annotations
            .entry("org.opencontainers.image.version".into())
            .or_insert_with(|| tag.rsplit(':').next().unwrap_or(tag).to_owned());
    }
    if let Some(src) = snapshot.provenance["source"].as_str() {
        annotations
            .entry("org.opencontainers.image.source".into())
            .or_insert_with(|| src.to_owned());
    }
    progress.phase("manifest", 0);
    let written = output
        .finish(&config, layers, &annotations, mtime)
        .stage(Code::Output, || format!("writing {output_ref}"))?;
    progress.done(&format!(
        "wrote {} {}",
        written.reference, written.manifest_digest
    ));

    let total: u64 = written.layers.iter().map(|l| l.size).sum::<u64>() + written.manifest_size;
    if args.json {
        let out = json!({
            "reference": written.reference,
            "manifest_digest": written.manifest_digest.to_string(),
            "manifest_size": written.manifest_size,
            "config_digest": written.config_digest.to_string(),
            "data_digest": data_digest.to_string(),
            "size": total,
            "layers": written.layers.iter().map(|l| json!({
                "digest": l.digest.to_string(), "size": l.size, "diff_id": l.diff_id.to_string(), "media_type": l.media_type,
            })).collect::<Vec<_>>(),
        });
        let mut stdout = crate::exit::stdout();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
        stdout.flush()?;
    } else if !quiet {
        // --quiet prints errors only; scripts that want the digest use --json.
        let mut stdout = crate::exit::stdout();
        writeln!(stdout, "{} {}", written.reference, written.manifest_digest)?;
        stdout.flush()?;
    }
    Ok(())
}
