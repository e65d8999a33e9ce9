//! `cargo xtask bench delta`: what a re-bake onto the previous image (`bakedb build --from`)
//! costs and ships when a live database (SQLite, PostgreSQL) changes a little, next to a full
//! re-bake and to the least that could ship.
//!
//! The master is a copy of `bench build`'s generated event log (~1 GiB, rollback journal). One
//! full build is generation 0; then each generation updates 1 % of the rows in one transaction
//! (scenario "random": ids drawn uniformly; scenario "range": one run of consecutive ids) and
//! re-bakes from the live file onto the previous generation. Per generation: the re-bake's
//! time and peak RSS, the patch layer's compressed bytes, the **ideal** (the pages that differ
//! between the master before and after, concatenated and compressed with gzip -1 as bakedb's
//! layers are) and the bytes a local docker-registry stores when the generation is pushed to it
//! with skopeo (the earlier generations are already there). At the end a full re-bake of the
//! same master says what shipping the whole database again would cost.
//!
//! Then bakedb-serve answers the `bench sqlite` queries (wrk, the same Lua scripts) on the image's
//! base file with 0, 1 and 8 patch generations applied through its read-only VFS, against the same
//! database as one plain file; each server's sample answer is checked against rusqlite first.
//! The full build from the live file is also timed against `pigz -1` on the same file.
//!
//! PostgreSQL (bench_delta/postgres.rs): a live pgbench database of `--pg-size-mib` per
//! scenario, one full build, then `--pg-generations` generations that each update 1 % of the
//! accounts in one transaction (random aids; one aid range) and re-bake onto the previous one,
//! beside a full build of the same state; the ideal there is the pages that differ between the
//! generations' data files as baked. Then `docker run` to the first answer of the last patch
//! generation, whose patches bakedb-init composes before postgres starts, against that full
//! build (cold and warm, verification on and off).
//!
//! `--engines sqlite,postgres` (the default) chooses the parts. Each part is written into
//! docs/benchmarks.md between markers of its own inside the delta section, as soon as it is
//! measured: a run of one part leaves the other's numbers in place.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use bakedb_testkit::registry::{Registry, RegistryOptions};
use rusqlite::Connection;

use crate::bench::data::{Rng, SEED, bench_database};
use crate::bench::layers::{pigz1_bytes_of, push, tag_layers, unpack_layer};
use crate::bench::timing::{NOISY, clock_ticks, sync, until_quiet, wait_until_quiet, warm};
use crate::bench::tools::{
    build_layers, commit_measured, fresh_dir, json_str, release_bakedb, target_dir,
};
use crate::bench::{self, Sample, Timer, fmt, fmt_pct, mb, median, ratio, run_quiet, times};
use crate::bench_sqlite::{
    Cell, Config, LoadRun, Query, SqliteOptions, Workload, check_sample, load, rps_ratio,
    start_serve, wrk_version,
};
use crate::project_root;

pub(crate) mod postgres;

/// The table's name in the generated database and its page size.
const TABLE: &str = "events";
const PAGE: usize = 4096;
/// Share of the rows a generation updates.
const CHANGED_SHARE: f64 = 0.01;
/// Patch generations the serve comparison applies.
const SERVE_GENERATIONS: [usize; 2] = [1, 8];

/// Issue 15's targets.
const TARGET_PATCH_VS_IDEAL: f64 = 1.3;
const TARGET_REBAKE_RANDOM_S: f64 = 3.0;
const TARGET_REBAKE_RANGE_S: f64 = 1.0;
const TARGET_FULL_VS_PIGZ: f64 = 1.2;
const TARGET_SERVE_RATIO: f64 = 0.9;

/// The engines `bench delta` measures, each a part of its section of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub(crate) const ALL: [Engine; 2] = [Engine::Sqlite, Engine::Postgres];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }

    /// The value of `--engines`: the engines it names, in the order of ALL.
    pub(crate) fn chosen(value: &mut bench::flags::Value) -> Result<Vec<Engine>> {
        let names = Engine::ALL.map(Engine::name);
        let chosen = value.names("the engines to measure", &names)?;
        Ok(Engine::ALL
            .into_iter()
            .filter(|e| chosen.contains(&e.name()))
            .collect())
    }
}

pub struct DeltaOptions {
    pub engines: Vec<Engine>,
    pub size_mib: u64,
    /// Patch generations per scenario (at least the largest of SERVE_GENERATIONS).
    pub generations: usize,
    /// Timed full builds and pigz runs; PostgreSQL's starts of each kind and cache state.
    pub runs: usize,
    /// Rounds of every serve load case, and its wrk settings.
    pub rounds: usize,
    pub duration_s: u64,
    pub connections: usize,
    /// The PostgreSQL part: the pgbench database's size and its patch generations.
    pub pg_size_mib: u64,
    pub pg_generations: usize,
}

impl DeltaOptions {
    pub fn parse(flags: &[&str]) -> Result<Self> {
        let mut options = DeltaOptions {
            engines: Engine::ALL.to_vec(),
            size_mib: 1024,
            generations: 8,
            runs: 3,
            rounds: 3,
            duration_s: 5,
            connections: 32,
            pg_size_mib: 1024,
            pg_generations: 3,
        };
        bench::flags::parse(
            "bench delta",
            "--engines sqlite,postgres, --size-mib N, --generations N, --runs N, --rounds N, --duration-s N, --connections N, --pg-size-mib N, --pg-generations N",
            flags,
            |name, value| {
                match name {
                    "--engines" => options.engines = Engine::chosen(value)?,
                    "--size-mib" => options.size_mib = value.positive("database size in MiB")?,
                    "--generations" => {
                        options.generations = value.count("patch generations per scenario")?
                    }
                    "--runs" => options.runs = value.count("timed full builds")?,
                    "--rounds" => options.rounds = value.count("rounds of every serve case")?,
                    "--duration-s" => {
                        options.duration_s = value.positive("seconds of load per case")?
                    }
                    "--connections" => {
                        options.connections = value.count("open connections of wrk")?
                    }
                    "--pg-size-mib" => {
                        options.pg_size_mib = value.positive("pgbench database size in MiB")?
                    }
                    "--pg-generations" => {
                        options.pg_generations = value.count("PostgreSQL patch generations")?
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        let most = SERVE_GENERATIONS[SERVE_GENERATIONS.len() - 1];
        if options.generations < most {
            bail!("--generations must be at least {most}: the serve comparison applies {most}");
        }
        if options.generations > 8 {
            bail!(
                "--generations must be at most 8: bakedb's --max-patches 8 writes a fresh base after that"
            );
        }
        Ok(options)
    }

    /// The command that measures the SQLite part alone.
    fn sqlite_command(&self) -> String {
        format!(
            "cargo xtask bench delta --engines sqlite --size-mib {} --generations {} --runs {} --rounds {} --duration-s {} --connections {}",
            self.size_mib,
            self.generations,
            self.runs,
            self.rounds,
            self.duration_s,
            self.connections
        )
    }

    /// The command that measures the PostgreSQL part alone.
    fn postgres_command(&self) -> String {
        format!(
            "cargo xtask bench delta --engines postgres --pg-size-mib {} --pg-generations {} --runs {}",
            self.pg_size_mib, self.pg_generations, self.runs
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Random,
    Range,
}

impl Scenario {
    pub(crate) const ALL: [Scenario; 2] = [Scenario::Random, Scenario::Range];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Random => "random",
            Scenario::Range => "range",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Scenario::Random => "1 % of the rows, ids drawn uniformly",
            Scenario::Range => "1 % of the rows, one run of consecutive ids",
        }
    }

    fn target_s(self) -> f64 {
        match self {
            Scenario::Random => TARGET_REBAKE_RANDOM_S,
            Scenario::Range => TARGET_REBAKE_RANGE_S,
        }
    }
}

/// One patch generation.
struct Generation {
    rebake: Sample,
    pages_changed: usize,
    /// The changed pages, concatenated and compressed with gzip -1.
    ideal_bytes: u64,
    patch_bytes: u64,
    /// What the registry's storage grew by when the generation was pushed.
    registry_bytes: u64,
}

struct ScenarioResult {
    scenario: Scenario,
    base_registry_bytes: u64,
    generations: Vec<Generation>,
    /// A full build of the last generation's master: its data layer and time.
    full_layer_bytes: u64,
    full: Sample,
}

pub fn delta(options: &DeltaOptions) -> Result<()> {
    let root = project_root();
    let scratch = target_dir(&root).join("bench/delta");
    fresh_dir(&scratch.join("tmp"))?;
    let bakedb = release_bakedb(&root, &scratch)?;
    let commit = commit_measured(&root);
    let pigz = run_quiet(Command::new("pigz").arg("--version"))
        .map(|v| v.trim().to_owned())
        .context("pigz is needed for the ideal patch size: apt-get install -y pigz")?;
    let skopeo = run_quiet(Command::new("skopeo").arg("--version"))
        .map(|v| v.trim().to_owned())
        .context("skopeo pushes the generations: apt-get install -y skopeo")?;
    let shared = Shared {
        root: &root,
        bakedb: &bakedb,
        scratch: &scratch,
        commit: &commit,
        versions: format!("{pigz}; {skopeo}"),
    };
    // Each part is written as soon as it is measured: a later part that fails leaves it.
    for engine in &options.engines {
        let md = match engine {
            Engine::Sqlite => sqlite_part(options, &shared)?,
            Engine::Postgres => postgres::part(options, &shared)?,
        };
        bench::report::publish_part(&root, "delta", engine.name(), &md)?;
    }
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// What every part of the bench shares.
struct Shared<'a> {
    root: &'a Path,
    /// A private copy of the release build.
    bakedb: &'a Path,
    scratch: &'a Path,
    commit: &'a str,
    /// pigz's and skopeo's versions.
    versions: String,
}

/// The SQLite part: the re-bakes of both scenarios, the full build against pigz -1, and
/// bakedb-serve on patch generations; its markdown.
fn sqlite_part(options: &DeltaOptions, shared: &Shared<'_>) -> Result<String> {
    let scratch = shared.scratch;
    let target = target_dir(shared.root);
    let wrk = wrk_version()?;
    let serve = scratch.join("bakedb-serve");
    let built_serve = target
        .join("static-init")
        .join(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .join("release-serve/bakedb-serve");
    fs::copy(&built_serve, &serve).with_context(|| format!("copying {}", built_serve.display()))?;
    let generated = bench_database(&target.join("bench"), options.size_mib)?;
    let timer = Timer::new(scratch.join("time.out"));
    let registry = Registry::start(RegistryOptions::default()).context(
        "docker-registry stores the pushed generations: apt-get install -y docker-registry",
    )?;
    let bakedb = Bakedb {
        program: shared.bakedb,
        scratch,
        timer: &timer,
    };

    let master_dir = scratch.join("master");
    fresh_dir(&master_dir)?;
    let master = master_dir.join("app.db");

    // The full build from the live file against pigz -1 on the same file, alternating.
    copy_master(&generated, &master)?;
    let (mut full_builds, mut pigz_runs) = (Vec::new(), Vec::new());
    for run in 1..=options.runs {
        eprintln!("xtask: run {run}/{}: full build, pigz -1", options.runs);
        let layout = scratch.join("full");
        full_builds.push(timed(Some(&master), || {
            let _ = fs::remove_dir_all(&layout);
            Ok(bakedb.build(&master, None, &layout, "g0")?.0)
        })?);
        pigz_runs.push(timed(Some(&master), || {
            Ok(timer
                .run(
                    Command::new("sh")
                        .arg("-c")
                        .arg("exec pigz -1 -c \"$1\" > /dev/null")
                        .arg("pigz")
                        .arg(&master),
                    true,
                )?
                .sample)
        })?);
    }
    let _ = fs::remove_dir_all(scratch.join("full"));

    let mut results = Vec::new();
    let mut serve_dbs = None;
    for scenario in Scenario::ALL {
        copy_master(&generated, &master)?;
        let keep = (scenario == Scenario::Random).then_some(&master_dir);
        let (result, kept) = run_scenario(
            scenario, options, &bakedb, &registry, &master, keep, scratch,
        )?;
        if let Some(kept) = kept {
            serve_dbs = Some(kept);
        }
        results.push(result);
    }
    drop(registry);

    let serve_dbs = serve_dbs.expect("the random scenario keeps its databases");
    let serve_rows = serve_part(options, &serve, &serve_dbs, scratch)?;

    let report = Report {
        options,
        commit: shared.commit.to_owned(),
        versions: format!("{}; {wrk}", shared.versions),
        db_bytes: fs::metadata(&generated)?.len(),
        full_builds,
        pigz_runs,
        results,
        serve_rows,
    };
    Ok(report.markdown())
}

/// A fresh master: a copy of the generated database, in rollback-journal mode.
pub(crate) fn copy_master(generated: &Path, master: &Path) -> Result<()> {
    for suffix in ["-journal", "-wal", "-shm"] {
        let _ = fs::remove_file(master.with_extension(format!("db{suffix}")));
    }
    fs::copy(generated, master)
        .with_context(|| format!("copying {} to {}", generated.display(), master.display()))?;
    // The generated file is in WAL mode; in rollback mode every commit is in the file itself,
    // so comparing its pages before and after a commit finds exactly what the commit changed.
    let mode: String =
        Connection::open(master)?.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
    if mode != "delete" {
        bail!("{}: journal_mode stayed {mode}", master.display());
    }
    Ok(())
}

/// One timed run with `warm_file`'s pages in the cache (when given), taken again when the
/// machine was busy.
fn timed(warm_file: Option<&Path>, mut run: impl FnMut() -> Result<Sample>) -> Result<Sample> {
    let sample = until_quiet(
        NOISY,
        || {
            if let Some(file) = warm_file {
                warm(file)?;
            }
            sync();
            wait_until_quiet();
            run()
        },
        |s| s.other_load,
    )?;
    eprintln!("xtask:   {:.2} s", sample.secs);
    Ok(sample)
}

struct Bakedb<'a> {
    program: &'a Path,
    scratch: &'a Path,
    timer: &'a Timer,
}

/// One `bakedb build`.
struct Built {
    sample: Sample,
    /// The data layer of a full build (or a fresh base), else the patch layer.
    layer_digest: String,
    /// Its compressed size.
    layer_bytes: u64,
    /// Why bakedb wrote a fresh base instead of the patch `--from` asked for.
    fresh_base: Option<String>,
}

impl Bakedb<'_> {
    /// `bakedb build` of the live file `master` into `oci:LAYOUT:TAG`, onto `from` (a tag of
    /// the same layout) when given: the run, and the compressed size of the data or patch
    /// layer it wrote.
    fn build(
        &self,
        master: &Path,
        from: Option<&str>,
        layout: &Path,
        tag: &str,
    ) -> Result<(Sample, u64)> {
        let source = [
            "--engine".into(),
            "sqlite".into(),
            "--source".into(),
            master.into(),
        ];
        let built = self.run(&source, from, layout, tag)?;
        if let Some(why) = built.fresh_base {
            bail!("bakedb wrote a fresh base instead of a patch: {why}");
        }
        Ok((built.sample, built.layer_bytes))
    }

    /// `bakedb build --json SOURCE… --output oci:LAYOUT:TAG [--from oci:LAYOUT:FROM]`, timed.
    fn run(
        &self,
        source: &[std::ffi::OsString],
        from: Option<&str>,
        layout: &Path,
        tag: &str,
    ) -> Result<Built> {
        let mut cmd = Command::new(self.program);
        cmd.args(["build", "--json"])
            .args(source)
            .arg("--output")
            .arg(format!("oci:{}:{tag}", layout.display()))
            .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH)
            .env("TMPDIR", self.scratch.join("tmp"));
        if let Some(from) = from {
            cmd.arg("--from")
                .arg(format!("oci:{}:{from}", layout.display()));
        }
        let done = self.timer.run(&mut cmd, false)?;
        let fresh_base = done.stderr.lines().find_map(|l| {
            let why = l[l.find("a fresh base, not a patch: ")? + 27..].trim();
            // Without the phase's time at the end: "… (the image would hold twice its data) (0.18 s)".
            let why = match why.rsplit_once(" (") {
                Some((why, time)) if time.ends_with(" s)") => why,
                _ => why,
            };
            Some(why.to_owned())
        });
        let written = if from.is_some() && fresh_base.is_none() {
            "patch layer "
        } else {
            "data layer "
        };
        let layer_digest = done
            .stderr
            .lines()
            .find_map(|l| {
                let rest = &l[l.find(written)? + written.len()..];
                rest.split_whitespace().next().map(str::to_owned)
            })
            .with_context(|| format!("bakedb build named no {written}:\n{}", done.stderr))?;
        let layer_bytes = build_layers(&done.stdout)
            .into_iter()
            .find(|(d, _)| *d == layer_digest)
            .map(|(_, size)| size)
            .with_context(|| format!("{layer_digest} is not among the layers:\n{}", done.stdout))?;
        if json_str(&done.stdout, "manifest_digest").is_none() {
            bail!(
                "bakedb build --json printed no manifest digest:\n{}",
                done.stdout
            );
        }
        Ok(Built {
            sample: done.sample,
            layer_digest,
            layer_bytes,
            fresh_base,
        })
    }
}

/// Generation 0, then `options.generations` patch generations of `scenario`. With `keep`, the
/// master is copied there after each generation the serve comparison needs (`plain-<g>.db`)
/// and the last generation's data layers are unpacked into `keep/rootfs`.
fn run_scenario(
    scenario: Scenario,
    options: &DeltaOptions,
    bakedb: &Bakedb<'_>,
    registry: &Registry,
    master: &Path,
    keep: Option<&PathBuf>,
    scratch: &Path,
) -> Result<(ScenarioResult, Option<ServeDbs>)> {
    let name = scenario.name();
    let layout = scratch.join(format!("layout-{name}"));
    let _ = fs::remove_dir_all(&layout);
    eprintln!("xtask: {name}: generation 0 (full build)");
    bakedb.build(master, None, &layout, "g0")?;
    let base_registry_bytes = push(registry, &layout, "g0", name)?;

    let rows: i64 =
        Connection::open(master)?
            .query_row(&format!("SELECT max(id) FROM {TABLE}"), [], |r| r.get(0))?;
    let changed_rows = ((rows as f64 * CHANGED_SHARE) as i64).max(1);
    let mut rng = Rng(SEED ^ 0xde17a);
    let mut pages = page_hashes(master)?;
    let mut generations = Vec::new();
    let mut plain = Vec::new();
    for g in 1..=options.generations {
        update_rows(master, scenario, rows, changed_rows, g, &mut rng)?;
        let after = page_hashes(master)?;
        let changed: Vec<usize> = (0..after.len())
            .filter(|&p| pages.get(p) != Some(&after[p]))
            .collect();
        pages = after;
        let ideal_bytes = ideal(master, &changed, scratch)?;
        eprintln!(
            "xtask: {name}: generation {g}: {} pages changed",
            changed.len()
        );
        let (rebake, patch_bytes) = {
            let mut layer = 0;
            let sample = timed(Some(master), || {
                let (sample, bytes) = bakedb.build(
                    master,
                    Some(&format!("g{}", g - 1)),
                    &layout,
                    &format!("g{g}"),
                )?;
                layer = bytes;
                Ok(sample)
            })?;
            (sample, layer)
        };
        let registry_bytes = push(registry, &layout, &format!("g{g}"), name)?;
        generations.push(Generation {
            rebake,
            pages_changed: changed.len(),
            ideal_bytes,
            patch_bytes,
            registry_bytes,
        });
        if let Some(keep) = keep
            && SERVE_GENERATIONS.contains(&g)
        {
            let copy = keep.join(format!("plain-{g}.db"));
            fs::copy(master, &copy).with_context(|| format!("copying to {}", copy.display()))?;
            plain.push((g, copy));
        }
    }

    let full_layout = scratch.join(format!("full-{name}"));
    let _ = fs::remove_dir_all(&full_layout);
    eprintln!("xtask: {name}: full re-bake of the last generation");
    let (full, full_layer_bytes) = {
        let mut layer = 0;
        let sample = timed(Some(master), || {
            let _ = fs::remove_dir_all(&full_layout);
            let (sample, bytes) = bakedb.build(master, None, &full_layout, "full")?;
            layer = bytes;
            Ok(sample)
        })?;
        (sample, layer)
    };
    let _ = fs::remove_dir_all(&full_layout);

    let kept = match keep {
        Some(keep) => {
            let rootfs = keep.join("rootfs");
            unpack(&layout, &format!("g{}", options.generations), &rootfs)?;
            Some(ServeDbs { rootfs, plain })
        }
        None => None,
    };
    let _ = fs::remove_dir_all(&layout);
    Ok((
        ScenarioResult {
            scenario,
            base_registry_bytes,
            generations,
            full_layer_bytes,
            full,
        },
        kept,
    ))
}

/// Update `changed` rows of `rows` in one transaction, as an application would: a new kind and
/// a new content hash for each.
fn update_rows(
    master: &Path,
    scenario: Scenario,
    rows: i64,
    changed: i64,
    generation: usize,
    rng: &mut Rng,
) -> Result<()> {
    const KINDS: [&str; 4] = ["refund", "review", "upgrade", "archive"];
    let conn = Connection::open(master)?;
    let tx = conn.unchecked_transaction()?;
    {
        let mut update = tx.prepare(&format!(
            "UPDATE {TABLE} SET kind = ?1, payload = ?2 WHERE id = ?3"
        ))?;
        let first = 1 + (rng.next() % (rows - changed).max(1) as u64) as i64;
        for i in 0..changed {
            let id = match scenario {
                Scenario::Random => 1 + (rng.next() % rows as u64) as i64,
                Scenario::Range => first + i,
            };
            let payload: Vec<u8> = (0..4).flat_map(|_| rng.next().to_le_bytes()).collect();
            update.execute(rusqlite::params![
                KINDS[(generation + i as usize) % KINDS.len()],
                payload,
                id
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// A hash of every page of `db`: enough to tell which pages a generation changed.
pub(crate) fn page_hashes(db: &Path) -> Result<Vec<u64>> {
    use std::hash::{DefaultHasher, Hasher};
    use std::io::Read;
    let mut file = File::open(db).with_context(|| format!("opening {}", db.display()))?;
    let mut hashes = Vec::new();
    let mut page = vec![0u8; PAGE];
    loop {
        match file.read_exact(&mut page) {
            Ok(()) => {
                let mut h = DefaultHasher::new();
                h.write(&page);
                hashes.push(h.finish());
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(hashes),
            Err(e) => return Err(e).with_context(|| format!("reading {}", db.display())),
        }
    }
}

/// The least a patch could ship: the changed pages of `db`, concatenated, compressed with
/// gzip -1 (the level of bakedb's gzip layers).
pub(crate) fn ideal(db: &Path, changed: &[usize], scratch: &Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = File::open(db)?;
    pigz1_bytes_of(&scratch.join("tmp/changed-pages"), |file| {
        let mut out = std::io::BufWriter::new(file);
        let mut page = vec![0u8; PAGE];
        for &p in changed {
            src.seek(SeekFrom::Start((p * PAGE) as u64))?;
            src.read_exact(&mut page)?;
            out.write_all(&page)?;
        }
        out.flush()?;
        Ok(())
    })
}

/// The data directory of `oci:LAYOUT:TAG` unpacked into `rootfs` (its layers in order; the
/// generations this bench makes delete nothing, so whiteouts do not arise).
fn unpack(layout: &Path, tag: &str, rootfs: &Path) -> Result<()> {
    fresh_dir(rootfs)?;
    for digest in tag_layers(layout, tag)? {
        unpack_layer(layout, &digest, rootfs, &["var/lib/bakedb"])?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bakedb-serve on patch generations.

struct ServeDbs {
    /// The last generation's data directory: `var/lib/bakedb/app.db` and its patches.
    rootfs: PathBuf,
    /// (generation, the master as one plain file after it).
    plain: Vec<(usize, PathBuf)>,
}

/// One comparison: bakedb-serve on the base file with `generations` patches against the same
/// data as one plain file (for 0 generations, the base file itself).
struct ServeRow {
    generations: usize,
    patched: Vec<Cell>,
    plain: Vec<Cell>,
}

fn serve_part(
    options: &DeltaOptions,
    serve: &Path,
    dbs: &ServeDbs,
    scratch: &Path,
) -> Result<Vec<ServeRow>> {
    let data = dbs.rootfs.join("var/lib/bakedb");
    let base = data.join("app.db");
    let patch = |g: usize| data.join(".patches").join(g.to_string()).join("app.db");
    let sqlite_options = SqliteOptions {
        size_mib: options.size_mib,
        duration_s: options.duration_s,
        connections: options.connections,
        rounds: options.rounds,
        runs: 1,
    };
    let clk_tck = clock_ticks();
    let timer = Timer::new(scratch.join("time.out"));
    let mut rows = vec![ServeRow {
        generations: 0,
        patched: Vec::new(),
        plain: Vec::new(),
    }];
    rows.extend(SERVE_GENERATIONS.iter().map(|&g| ServeRow {
        generations: g,
        patched: Vec::new(),
        plain: Vec::new(),
    }));
    for row in &mut rows {
        let g = row.generations;
        let plain_db = match g {
            0 => base.clone(),
            g => dbs
                .plain
                .iter()
                .find(|(n, _)| *n == g)
                .map(|(_, p)| p.clone())
                .context("a plain copy of every served generation")?,
        };
        let workload = Workload::read(&plain_db)?;
        let patches: Vec<String> = (1..=g).map(|n| patch(n).display().to_string()).collect();
        let patched = Config {
            id: "serve-patched",
            label: format!("{g} patch generations"),
            what: String::new(),
            env: if g == 0 {
                Vec::new()
            } else {
                vec![("BAKEDB_SQLITE_PATCHES", patches.join(":"))]
            },
            datasette: false,
        };
        let plain = Config {
            id: "serve-plain",
            label: "plain file".into(),
            what: String::new(),
            env: Vec::new(),
            datasette: false,
        };
        let cells = || -> Vec<Cell> {
            Query::ALL
                .into_iter()
                .map(|query| Cell {
                    config: 0,
                    query,
                    samples: Vec::new(),
                })
                .collect()
        };
        row.patched = cells();
        row.plain = cells();
        for round in 1..=options.rounds {
            for (config, db, is_patched) in [(&patched, &base, true), (&plain, &plain_db, false)] {
                for (q, query) in Query::ALL.into_iter().enumerate() {
                    eprintln!(
                        "xtask: round {round}/{}: {g} generations, {}: {}",
                        options.rounds,
                        if is_patched { "patched" } else { "plain file" },
                        query.name()
                    );
                    let sample = until_quiet(
                        NOISY,
                        || {
                            warm(db)?;
                            for p in 1..=g {
                                warm(&patch(p))?;
                            }
                            sync();
                            let server = start_serve(serve, db, config, scratch)?;
                            check_sample(&server, false, query, &workload)?;
                            let sample = load(
                                &LoadRun {
                                    server: &server,
                                    datasette: false,
                                    query,
                                    workload: &workload,
                                    options: &sqlite_options,
                                    round,
                                    clk_tck,
                                },
                                &timer,
                                scratch,
                            )?;
                            server.stop();
                            Ok(sample)
                        },
                        |s| s.other_load,
                    )?;
                    let cells = if is_patched {
                        &mut row.patched
                    } else {
                        &mut row.plain
                    };
                    cells[q].samples.push(sample);
                }
            }
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report<'a> {
    options: &'a DeltaOptions,
    commit: String,
    versions: String,
    db_bytes: u64,
    full_builds: Vec<Sample>,
    pigz_runs: Vec<Sample>,
    results: Vec<ScenarioResult>,
    serve_rows: Vec<ServeRow>,
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let mut md = bench::report::part_start(&self.commit, &self.options.sqlite_command());
        let _ = writeln!(
            md,
            "A live SQLite master of {} MB (`bench build`'s event log, rollback journal), {} patch generations per scenario, each one transaction that updates 1 % of the rows (a new `kind` and a new 32-byte `payload`), re-baked with `bakedb build --source app.db --from oci:…:g<N-1>` (gzip). The **ideal** is the pages that differ between the master before and after, concatenated and compressed with `pigz -1`; the registry column is what a local docker-registry's storage grew by when skopeo pushed the generation (the earlier ones already there). Tools: {}.\n",
            mb(self.db_bytes),
            self.options.generations,
            self.versions
        );
        let _ = writeln!(md, "### Re-bakes\n");
        let _ = writeln!(
            md,
            "| scenario | pages changed, median | re-bake, median s (range) | peak RSS MiB | patch layer MB, median | ideal MB, median | patch / ideal | registry MB per generation, median | registry / ideal | full re-bake: data layer MB, s |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.results {
            let gens = &r.generations;
            let med = |f: &dyn Fn(&Generation) -> f64| median(gens.iter().map(f));
            let patch_ratio = median(
                gens.iter()
                    .map(|g| g.patch_bytes as f64 / g.ideal_bytes.max(1) as f64),
            );
            let registry_ratio = median(
                gens.iter()
                    .map(|g| g.registry_bytes as f64 / g.ideal_bytes.max(1) as f64),
            );
            let secs: Vec<f64> = gens.iter().map(|g| g.rebake.secs).collect();
            let rebake_samples: Vec<Sample> = gens.iter().map(|g| g.rebake.clone()).collect();
            let _ = writeln!(
                md,
                "| {} ({}) | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} MB, {} s |",
                r.scenario.name(),
                r.scenario.describe(),
                fmt(med(&|g| g.pages_changed as f64), 0),
                fmt(median(secs.iter().copied()), 2),
                bench::fmt_range(bench::range(secs.iter().copied()), 2),
                fmt(Sample::peak_rss_mib(&rebake_samples), 1),
                fmt(med(&|g| g.patch_bytes as f64 / 1e6), 2),
                fmt(med(&|g| g.ideal_bytes as f64 / 1e6), 2),
                times(patch_ratio, 2),
                fmt(med(&|g| g.registry_bytes as f64 / 1e6), 2),
                times(registry_ratio, 2),
                mb(r.full_layer_bytes),
                fmt(Some(r.full.secs), 2),
            );
        }
        let _ = writeln!(
            md,
            "\nThe first push of each scenario (generation 0, the whole image) stored {} in the registry.\n",
            self.results
                .iter()
                .map(|r| format!("{} MB ({})", mb(r.base_registry_bytes), r.scenario.name()))
                .collect::<Vec<_>>()
                .join(" and ")
        );
        let others = self
            .results
            .iter()
            .flat_map(|r| r.generations.iter().map(|g| g.rebake.clone()))
            .chain(self.full_builds.iter().cloned())
            .collect::<Vec<_>>();
        let _ = writeln!(
            md,
            "Other processes took at most {} of the cores during a timed run.\n",
            fmt_pct(Sample::most_other_load(&others))
        );

        let _ = writeln!(md, "### The full build against pigz -1\n");
        let full = median(self.full_builds.iter().map(|s| s.secs));
        let pigz = median(self.pigz_runs.iter().map(|s| s.secs));
        let _ = writeln!(md, "| case | median s | peak RSS MiB |\n|---|---:|---:|");
        let _ = writeln!(
            md,
            "| `bakedb build --source app.db` (live file, gzip, from scratch) | {} | {} |",
            fmt(full, 2),
            fmt(Sample::peak_rss_mib(&self.full_builds), 1)
        );
        let _ = writeln!(
            md,
            "| `pigz -1 -c app.db > /dev/null` | {} | {} |\n",
            fmt(pigz, 2),
            fmt(Sample::peak_rss_mib(&self.pigz_runs), 1)
        );

        let _ = writeln!(md, "### bakedb-serve on patch generations\n");
        let _ = writeln!(
            md,
            "req/s (median of {} rounds of {} s, {} connections) of bakedb-serve on the image's base file with N patch generations of the random scenario applied through its read-only VFS (`BAKEDB_SQLITE_PATCHES`), against the same data as one plain file; the ratio's range is the lowest and highest ratio within one round.\n",
            self.options.rounds, self.options.duration_s, self.options.connections
        );
        let _ = writeln!(
            md,
            "| generations | query | patched req/s | plain file req/s | patched / plain |\n|---:|---|---:|---:|---:|"
        );
        for row in &self.serve_rows {
            for (patched, plain) in row.patched.iter().zip(&row.plain) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    row.generations,
                    patched.query.name(),
                    fmt(patched.rps(), 0),
                    fmt(plain.rps(), 0),
                    if row.generations == 0 {
                        "— (the same file)".into()
                    } else {
                        rps_ratio(Some(patched), Some(plain))
                    }
                );
            }
        }

        let _ = writeln!(md, "\n### Targets\n");
        let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
        for r in &self.results {
            let patch_ratio = median(
                r.generations
                    .iter()
                    .map(|g| g.patch_bytes as f64 / g.ideal_bytes.max(1) as f64),
            );
            let registry_ratio = median(
                r.generations
                    .iter()
                    .map(|g| g.registry_bytes as f64 / g.ideal_bytes.max(1) as f64),
            );
            let secs = median(r.generations.iter().map(|g| g.rebake.secs));
            let _ = writeln!(
                md,
                "| {}: patch layer ≤ {TARGET_PATCH_VS_IDEAL}× the ideal | {} | {} |",
                r.scenario.name(),
                times(patch_ratio, 2),
                bench::yes_no(patch_ratio.map(|v| v <= TARGET_PATCH_VS_IDEAL))
            );
            let _ = writeln!(
                md,
                "| {}: registry bytes per generation ≤ {TARGET_PATCH_VS_IDEAL}× the ideal | {} | {} |",
                r.scenario.name(),
                times(registry_ratio, 2),
                bench::yes_no(registry_ratio.map(|v| v <= TARGET_PATCH_VS_IDEAL))
            );
            let _ = writeln!(
                md,
                "| {}: re-bake from the live file < {} s | {} s | {} |",
                r.scenario.name(),
                r.scenario.target_s(),
                fmt(secs, 2),
                bench::yes_no(secs.map(|s| s < r.scenario.target_s()))
            );
        }
        let speedup = ratio(pigz, full);
        let _ = writeln!(
            md,
            "| full build (gzip) ≥ {TARGET_FULL_VS_PIGZ}× as fast as pigz -1 | {} | {} |",
            times(speedup, 2),
            bench::yes_no(speedup.map(|v| v >= TARGET_FULL_VS_PIGZ))
        );
        for row in self.serve_rows.iter().filter(|r| r.generations > 0) {
            for (patched, plain) in row.patched.iter().zip(&row.plain) {
                let r = ratio(patched.rps(), plain.rps());
                let _ = writeln!(
                    md,
                    "| serve, {} generations, {}: ≥ {TARGET_SERVE_RATIO}× the plain file | {} | {} |",
                    row.generations,
                    patched.query.name(),
                    times(r, 2),
                    bench::yes_no(r.map(|v| v >= TARGET_SERVE_RATIO))
                );
            }
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let o = DeltaOptions::parse(&["--size-mib", "64", "--rounds=1"]).unwrap();
        assert_eq!((o.size_mib, o.rounds, o.generations), (64, 1, 8));
        assert_eq!(o.engines, [Engine::Sqlite, Engine::Postgres]);
        let o = DeltaOptions::parse(&[]).unwrap();
        assert_eq!(
            o.sqlite_command(),
            "cargo xtask bench delta --engines sqlite --size-mib 1024 --generations 8 --runs 3 --rounds 3 --duration-s 5 --connections 32"
        );
        assert_eq!(
            o.postgres_command(),
            "cargo xtask bench delta --engines postgres --pg-size-mib 1024 --pg-generations 3 --runs 3"
        );
        let o = DeltaOptions::parse(&["--engines", "postgres", "--pg-size-mib=64"]).unwrap();
        assert_eq!(
            (o.engines.as_slice(), o.pg_size_mib),
            (&[Engine::Postgres][..], 64)
        );
        let o = DeltaOptions::parse(&["--engines=postgres,sqlite"]).unwrap();
        assert_eq!(o.engines, [Engine::Sqlite, Engine::Postgres]);
        assert!(DeltaOptions::parse(&["--engines", "mysql"]).is_err());
        assert!(DeltaOptions::parse(&["--pg-generations", "0"]).is_err());
        assert!(DeltaOptions::parse(&["--generations", "7"]).is_err());
        assert!(DeltaOptions::parse(&["--generations", "9"]).is_err());
        assert!(DeltaOptions::parse(&["--fast"]).is_err());
    }

    #[test]
    fn finds_the_pages_a_transaction_changed() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "PRAGMA page_size = 4096; CREATE TABLE events(id INTEGER PRIMARY KEY, kind TEXT, payload BLOB);
             WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 20000)
             INSERT INTO events SELECT x, 'k', randomblob(32) FROM n;",
        )
        .unwrap();
        drop(c);
        let before = page_hashes(&db).unwrap();
        assert_eq!(before.len() as u64 * 4096, fs::metadata(&db).unwrap().len());
        update_rows(&db, Scenario::Range, 20000, 200, 1, &mut Rng(1)).unwrap();
        let after = page_hashes(&db).unwrap();
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Page 1 (the change counter) and the few leaves that hold 200 consecutive rows.
        assert!((2..=20).contains(&changed), "{changed} pages changed");
    }
}
