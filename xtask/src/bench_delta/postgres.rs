//! The PostgreSQL part of `cargo xtask bench delta`: re-bakes of a live pgbench database
//! after 1 % of its accounts changed in one transaction (scenario "random": aids drawn
//! uniformly; "range": one run of consecutive aids), against the least that could ship and a
//! full build of the same state; then, for each scenario that has a patch generation,
//! `docker run` to the first answer of the last one, whose patches bakedb-init composes into
//! the data files before postgres starts, against that full build.
//!
//! A 1 % random update of pgbench_accounts touches about half of its pages (61 rows a page:
//! 1 − 0.99^61) and nearly every leaf of its primary key, so at 1 GiB bakedb writes a fresh
//! base rather than a patch (its patches would be more than half the base); the range scenario
//! is the one whose patches init composes there.
//!
//! The ideal is measured on the images themselves: generation 0's data layer is unpacked, and
//! each later generation's layer is applied to that tree as bakedb-init composes it (patch
//! files page by page per docs/patch-format.md, whole files replaced, whiteouts removed), every
//! page it writes compared with the page it replaces. So the ideal is exactly the 8 KiB pages
//! that differ between two generations' data files as bakedb baked them, and each composed
//! file is checked against the digest its patch header records.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use bakedb_testkit::dirs::{files_under, unique_name};
use bakedb_testkit::registry::{Registry, RegistryOptions};
use sha2::{Digest, Sha256};

use super::{
    Bakedb, Built, CHANGED_SHARE, DeltaOptions, Scenario, Shared, TARGET_PATCH_VS_IDEAL, timed,
};
use crate::bench::data::{Rng, SEED};
use crate::bench::layers::{pigz1_bytes, push};
use crate::bench::pg::{self, BAKED_MARKS, Client, DB, Source, marks, start, strip_timestamp};
use crate::bench::timing::{
    clock_ticks, cold_cache, drop_caches, nproc, server_cpu_ticks, sync, wait_until_quiet,
};
use crate::bench::tools::{docker_bin, docker_load, docker_version, fresh_dir};
use crate::bench::{
    self, Cache, Sample, Timer, fmt, fmt_pct, fmt_range, mb, median, range, ratio, run_quiet,
    times, yes_no,
};

/// PostgreSQL's page, at which the ideal compares files.
const PAGE: usize = 8192;
/// The image's data directory, and where a generation's patch files are under it.
const DATA_DIR: &str = "var/lib/bakedb";
const PATCH_DIR: &str = ".patches";
/// image.json's chunk of a large file, which a patch header's composed digest is made of.
const CHUNK: u64 = 16 << 20;
/// The repository the generations are pushed to.
const REPO: &str = "pgdelta";

/// The PostgreSQL part; its markdown.
pub(super) fn part(options: &DeltaOptions, shared: &Shared<'_>) -> Result<String> {
    let docker = docker_bin();
    let docker_version =
        docker_version(&docker).context("this part runs containers: is dockerd running?")?;
    let cold_unavailable = cold_cache().err();
    let fixture = pg::fixture()?;
    let dir = shared.scratch.join("pg");
    fresh_dir(&dir)?;
    fs::create_dir_all(shared.scratch.join("tmp"))?;

    let scale = pg::scale(options.pg_size_mib);
    let registry = Registry::start(RegistryOptions::default()).context(
        "docker-registry stores the pushed generations: apt-get install -y docker-registry",
    )?;
    let timer = Timer::new(dir.join("time.out"));
    let bakedb = Bakedb {
        program: shared.bakedb,
        scratch: shared.scratch,
        timer: &timer,
    };
    let mut report = Report {
        options,
        commit: shared.commit,
        versions: format!("{}; {docker_version}", shared.versions),
        pg_version: fixture.pg_version.clone(),
        scale,
        db_bytes: 0,
        tables: String::new(),
        relations: BTreeMap::new(),
        scenarios: Vec::new(),
        cold_unavailable,
    };
    for scenario in Scenario::ALL {
        let run = ScenarioRun {
            scenario,
            options,
            bakedb: &bakedb,
            fixture: &fixture,
            registry: &registry,
            dir: &dir.join(scenario.name()),
            ideal_path: &shared.scratch.join("tmp/changed-pages"),
        };
        let (mut result, source) = run.rebakes(scale)?;
        report.db_bytes = source.db_bytes;
        report.tables = source.tables;
        report.relations = source.relations;
        if let Some(image) = &result.patched {
            result.starts = Some(start_part(
                options,
                &docker,
                &fixture.pg_bin,
                run.dir,
                (&image.layout, &format!("g{}", image.generation)),
                (&image.full_layout, "full"),
                &scale.to_string(),
                report.cold_unavailable.is_none(),
            )?);
        }
        let _ = fs::remove_dir_all(run.dir);
        report.scenarios.push(result);
    }
    drop(registry);
    Ok(report.markdown())
}

/// One scenario's re-bakes, in `dir`.
struct ScenarioRun<'a> {
    scenario: Scenario,
    options: &'a DeltaOptions,
    bakedb: &'a Bakedb<'a>,
    fixture: &'a pg::Fixture,
    registry: &'a Registry,
    dir: &'a Path,
    /// Where the pages that differ are gathered before pigz.
    ideal_path: &'a Path,
}

/// What is left of a scenario's source once it is stopped.
struct SourceFacts {
    db_bytes: u64,
    tables: String,
    /// Relation files by path under the data directory, to name them.
    relations: BTreeMap<String, String>,
}

impl ScenarioRun<'_> {
    /// A fresh pgbench source, generation 0, then each generation's update, re-bake, ideal,
    /// push and full build of the same state.
    fn rebakes(&self, scale: u64) -> Result<(ScenarioResult, SourceFacts)> {
        let name = self.scenario.name();
        fresh_dir(self.dir)?;
        let mut source = Source::pgbench(&self.fixture.pg_bin, &self.dir.join("source"), scale)?;
        let relations: BTreeMap<String, String> = source
            .psql(
                DB,
                "SELECT 'pgdata/' || pg_relation_filepath(oid) || ' ' || relname FROM pg_class \
                 WHERE pg_relation_filepath(oid) IS NOT NULL",
            )?
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(path, name)| (path.to_owned(), name.to_owned()))
            .collect();
        let build_source: Vec<std::ffi::OsString> = vec![
            "--engine".into(),
            "postgres".into(),
            "--source".into(),
            source.url().into(),
            "--pg-bin".into(),
            self.fixture.pg_bin.clone().into(),
            "--base".into(),
            self.fixture.base_ref.clone().into(),
        ];
        let (postmaster, clk_tck, cores) = (source.server.pid(), clock_ticks(), nproc() as f64);
        let build = |from: Option<&str>, layout: &Path, tag: &str| -> Result<Built> {
            let mut built = None;
            let sample = timed(None, || {
                if from.is_none() {
                    let _ = fs::remove_dir_all(layout);
                }
                let before = server_cpu_ticks(postmaster);
                let mut b = self.bakedb.run(&build_source, from, layout, tag)?;
                // The source server sending the base backup works for the build: it is not
                // another process disturbing it (about a tenth of the cores here).
                let server = before
                    .zip(server_cpu_ticks(postmaster))
                    .map(|(a, z)| z.saturating_sub(a) as f64 / clk_tck);
                b.sample.other_load = b
                    .sample
                    .other_load
                    .zip(server)
                    .map(|(load, server)| (load - server / (b.sample.secs * cores)).max(0.0));
                let sample = b.sample.clone();
                built = Some(b);
                Ok(sample)
            })?;
            let mut built = built.expect("timed ran the build");
            built.sample = sample;
            Ok(built)
        };

        let layout = self.dir.join("layout");
        let repo = format!("{REPO}-{name}");
        eprintln!("xtask: postgres, {name}: generation 0 (full build)");
        let g0 = build(None, &layout, "g0")?;
        let base_registry_bytes = push(self.registry, &layout, "g0", &repo)?;
        let tree = Tree::unpack(&layout, &g0.layer_digest, &self.dir.join("tree"))?;

        let accounts = scale * 100_000;
        let mut rng = Rng(SEED ^ 0x9d_e17a);
        let mut generations = Vec::new();
        let mut patched: Option<PatchedImage> = None;
        // The files that have patches on the current base: the ones init composes.
        let mut composed: BTreeSet<PathBuf> = BTreeSet::new();
        for g in 1..=self.options.pg_generations {
            let (changed_rows, _) = update_accounts(
                &source,
                self.scenario,
                accounts,
                g,
                &mut rng,
                &self.dir.join("update.sql"),
            )?;
            eprintln!(
                "xtask: postgres, {name}: generation {g}: {changed_rows} accounts updated; re-bake"
            );
            let rebake = build(Some(&format!("g{}", g - 1)), &layout, &format!("g{g}"))?;
            if let Some(why) = &rebake.fresh_base {
                eprintln!("xtask: postgres, {name}: generation {g} is a fresh base: {why}");
            }
            let shipped = {
                let mut ideal = BufWriter::new(File::create(self.ideal_path)?);
                let shipped = tree.apply(
                    &layout,
                    &rebake.layer_digest,
                    rebake.fresh_base.is_some(),
                    &self.dir.join("layer"),
                    &mut ideal,
                )?;
                ideal.flush()?;
                shipped
            };
            let ideal_bytes = pigz1_bytes(self.ideal_path)?;
            let _ = fs::remove_file(self.ideal_path);
            eprintln!(
                "xtask: postgres, {name}: generation {g}: {} pages differ; layer {} bytes, ideal {ideal_bytes}",
                shipped.changed_pages, rebake.layer_bytes
            );
            let registry_bytes = push(self.registry, &layout, &format!("g{g}"), &repo)?;

            eprintln!("xtask: postgres, {name}: generation {g}: full build of the same state");
            let full_layout = self.dir.join(format!("full-g{g}"));
            let full = build(None, &full_layout, "full")?;
            // Kept for the starts: the last patch generation's full build.
            if rebake.fresh_base.is_none() {
                // A file shipped whole or deleted since its last patch is not composed.
                for (path, _, _) in &shipped.whole {
                    composed.remove(Path::new(path));
                }
                composed.retain(|p| tree.data().join(p).exists());
                composed.extend(shipped.patched.iter().cloned());
                let image = PatchedImage {
                    generation: g,
                    layout: layout.clone(),
                    full_layout,
                    composed_files: composed.len(),
                    composed_bytes: composed
                        .iter()
                        .filter_map(|p| fs::metadata(tree.data().join(p)).ok())
                        .map(|m| m.len())
                        .sum(),
                };
                if let Some(previous) = patched.replace(image) {
                    let _ = fs::remove_dir_all(previous.full_layout);
                }
            } else {
                composed.clear();
                let _ = fs::remove_dir_all(&full_layout);
            }
            generations.push(Generation {
                number: g,
                changed_rows,
                rebake,
                shipped,
                ideal_bytes,
                registry_bytes,
                full,
            });
        }
        source.server.stop()?;
        let _ = fs::remove_dir_all(&tree.root);
        let _ = fs::remove_dir_all(self.dir.join("source"));
        Ok((
            ScenarioResult {
                scenario: self.scenario,
                g0,
                base_registry_bytes,
                generations,
                patched,
                starts: None,
            },
            SourceFacts {
                db_bytes: source.db_bytes,
                tables: source.tables.clone(),
                relations,
            },
        ))
    }
}

/// One scenario: its generations and, when one of them is a patch, the starts.
struct ScenarioResult {
    scenario: Scenario,
    g0: Built,
    base_registry_bytes: u64,
    generations: Vec<Generation>,
    patched: Option<PatchedImage>,
    starts: Option<Starts>,
}

/// The last patch generation of a scenario: the image whose start composes patches.
struct PatchedImage {
    generation: usize,
    layout: PathBuf,
    /// The full build of the same source state.
    full_layout: PathBuf,
    /// The files with patches on its base, which init composes, and their composed size:
    /// overlayfs copies each up whole.
    composed_files: usize,
    composed_bytes: u64,
}

/// One transaction that adds `generation` to the balance of 1 % of the `accounts` (distinct
/// aids drawn uniformly, or one run of consecutive aids), as pgbench's own updates do one
/// account at a time: the rows it updated and the first aid of them (a row a replica can be
/// asked for).
pub(crate) fn update_accounts(
    source: &Source,
    scenario: Scenario,
    accounts: u64,
    generation: usize,
    rng: &mut Rng,
    sql: &Path,
) -> Result<(u64, u64)> {
    let n = ((accounts as f64 * CHANGED_SHARE) as u64).max(1);
    let mut aids = BTreeSet::new();
    match scenario {
        Scenario::Random => {
            while (aids.len() as u64) < n {
                aids.insert(1 + rng.next() % accounts);
            }
        }
        Scenario::Range => {
            let first = 1 + rng.next() % (accounts - n + 1);
            aids.extend(first..first + n);
        }
    }
    let list: Vec<String> = aids.iter().map(u64::to_string).collect();
    // Tens of thousands of ids: a file, as one argument may not hold them.
    fs::write(
        sql,
        format!(
            "UPDATE pgbench_accounts SET abalance = abalance + {generation} WHERE aid = ANY('{{{}}}'::int[]);\n",
            list.join(",")
        ),
    )?;
    let out = run_quiet(
        source
            .server
            .client("psql")
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", DB, "-f"])
            .arg(sql),
    )?;
    if out.trim() != format!("UPDATE {n}") {
        bail!("the update of {n} accounts said {:?}", out.trim());
    }
    Ok((n, *aids.first().expect("at least one account")))
}

/// One patch generation.
struct Generation {
    number: usize,
    changed_rows: u64,
    rebake: Built,
    shipped: Shipped,
    /// The pages that differ, concatenated and compressed with gzip -1.
    ideal_bytes: u64,
    /// What the registry's storage grew by when the generation was pushed.
    registry_bytes: u64,
    /// A full build of the same source state: its time and data layer.
    full: Built,
}

// ---------------------------------------------------------------------------------------------
// The data as baked, and what a generation's layer changed in it.

/// What a generation's layer did to the data, against what differed.
#[derive(Default)]
struct Shipped {
    /// 8 KiB pages that differ from the previous generation's composed files.
    changed_pages: u64,
    /// Of them, in relation files (under base/ and global/).
    relation_pages: u64,
    /// 8 KiB pages of all the data files after the layer.
    total_pages: u64,
    /// The files the layer patched, under the data directory.
    patched: Vec<PathBuf>,
    /// Pages the patch files hold.
    patch_pages: u64,
    /// Files shipped whole: path under the data directory, 8 KiB pages, pages that differ.
    whole: Vec<(String, u64, u64)>,
    deleted: usize,
}

/// The data directory as bakedb baked it, composed: `root/var/lib/bakedb`.
struct Tree {
    root: PathBuf,
}

impl Tree {
    /// Generation 0's data layer unpacked into `root`.
    fn unpack(layout: &Path, data_layer: &str, root: &Path) -> Result<Tree> {
        fresh_dir(root)?;
        crate::bench::layers::unpack_layer(layout, data_layer, root, &[DATA_DIR])?;
        Ok(Tree {
            root: root.to_owned(),
        })
    }

    fn data(&self) -> PathBuf {
        self.root.join(DATA_DIR)
    }

    /// Apply a generation's layer (`full`: a fresh base's data layer, which holds every file)
    /// to the tree, unpacked in `staging` first, and write every page it changes into `ideal`.
    fn apply(
        &self,
        layout: &Path,
        digest: &str,
        full: bool,
        staging: &Path,
        ideal: &mut impl Write,
    ) -> Result<Shipped> {
        fresh_dir(staging)?;
        crate::bench::layers::unpack_layer(layout, digest, staging, &[DATA_DIR])?;
        let layer = staging.join(DATA_DIR);
        let data = self.data();
        let mut files: Vec<PathBuf> = files_under(&layer).into_iter().map(|(p, _)| p).collect();
        files.sort();
        let relative = |p: &Path| p.strip_prefix(&layer).expect("under the layer").to_owned();
        let mut shipped = Shipped::default();
        // Whiteouts first: they remove what the layers below hold.
        for file in &files {
            let rel = relative(file);
            let Some(name) = rel
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(".wh."))
            else {
                continue;
            };
            let parent = data.join(rel.parent().unwrap_or(Path::new("")));
            if name == ".wh..opq" {
                for entry in fs::read_dir(&parent).into_iter().flatten().flatten() {
                    if !layer
                        .join(rel.parent().unwrap_or(Path::new("")))
                        .join(entry.file_name())
                        .exists()
                    {
                        remove(&entry.path())?;
                        shipped.deleted += 1;
                    }
                }
            } else {
                remove(&parent.join(name))?;
                shipped.deleted += 1;
            }
        }
        if full {
            for (path, _) in files_under(&data) {
                let rel = path.strip_prefix(&data).expect("under the data");
                if !layer.join(rel).exists() {
                    remove(&path)?;
                    shipped.deleted += 1;
                }
            }
        }
        for file in &files {
            let rel = relative(file);
            if rel
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".wh."))
            {
                continue;
            }
            if let Ok(patched) = rel.strip_prefix(PATCH_DIR) {
                // .patches/<generation>/<path>
                let path: PathBuf = patched.components().skip(1).collect();
                let (pages, changed) = apply_patch(&data.join(&path), file, ideal)?;
                shipped.patched.push(path.clone());
                shipped.patch_pages += pages;
                shipped.changed_pages += changed;
                if is_relation(&path) {
                    shipped.relation_pages += changed;
                }
            } else {
                let target = data.join(&rel);
                let changed = differing_pages(&target, file, ideal)?;
                shipped.changed_pages += changed;
                if is_relation(&rel) {
                    shipped.relation_pages += changed;
                }
                let pages = fs::metadata(file)?.len().div_ceil(PAGE as u64);
                shipped
                    .whole
                    .push((rel.display().to_string(), pages, changed));
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::rename(file, &target)
                    .with_context(|| format!("moving {} into the tree", rel.display()))?;
            }
        }
        let _ = fs::remove_dir_all(staging);
        shipped.total_pages = files_under(&data)
            .iter()
            .map(|(_, len)| len.div_ceil(PAGE as u64))
            .sum();
        Ok(shipped)
    }
}

fn remove(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("removing {}", path.display()))
}

/// A relation file: `pgdata/base/<database>/<number>…` or `pgdata/global/<number>…`.
fn is_relation(rel: &Path) -> bool {
    let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
    let numbered = |name: &str| name.starts_with(|c: char| c.is_ascii_digit());
    match parts.as_slice() {
        ["pgdata", "base", _, name] | ["pgdata", "global", name] => numbered(name),
        _ => false,
    }
}

/// Write every 8 KiB page of `new` that differs from the same page of `old` (a missing `old`:
/// every page) into `ideal`: how many.
fn differing_pages(old: &Path, new: &Path, ideal: &mut impl Write) -> Result<u64> {
    let old = File::open(old).ok();
    let old_len = old
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    let new = File::open(new).with_context(|| format!("opening {}", new.display()))?;
    let new_len = new.metadata()?.len();
    let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let mut changed = 0;
    let mut at = 0u64;
    while at < new_len {
        let n = (new_len - at).min(PAGE as u64) as usize;
        new.read_exact_at(&mut b[..n], at)?;
        let same = match &old {
            Some(old) if at + n as u64 <= old_len => {
                old.read_exact_at(&mut a[..n], at)?;
                a[..n] == b[..n]
            }
            _ => false,
        };
        if !same {
            ideal.write_all(&b[..n])?;
            changed += 1;
        }
        at += n as u64;
    }
    Ok(changed)
}

/// Compose `target` with the patch file `patch` (docs/patch-format.md) in place, writing each
/// of its pages that differs from the page it replaces into `ideal`; then check the composed
/// file against the digest the patch header records. (pages in the patch, pages that
/// differed)
fn apply_patch(target: &Path, patch: &Path, ideal: &mut impl Write) -> Result<(u64, u64)> {
    let mut input = std::io::BufReader::with_capacity(
        1 << 20,
        File::open(patch).with_context(|| format!("opening {}", patch.display()))?,
    );
    let mut header = [0u8; 64];
    input.read_exact(&mut header)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if &header[..8] != b"BKDBPTCH" || u32_at(8) != 1 {
        bail!("{} is not a version 1 bakedb patch", patch.display());
    }
    let (page_size, length, count) = (u64::from(u32_at(12)), u64_at(16), u64_at(24));
    let mut numbers = vec![0u8; count as usize * 8];
    input.read_exact(&mut numbers)?;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .with_context(|| format!("opening {} to compose it", target.display()))?;
    let old_len = out.metadata()?.len();
    let (mut old, mut new) = (vec![0u8; page_size as usize], vec![0u8; page_size as usize]);
    let mut changed = 0;
    // The pages of a patch are distinct: comparing and writing one at a time, then setting the
    // length, composes what setting the length first would.
    for number in numbers.chunks_exact(8) {
        let at = u64::from_le_bytes(number.try_into().expect("8 bytes")) * page_size;
        input.read_exact(&mut new)?;
        let same = at + page_size <= old_len && {
            out.read_exact_at(&mut old, at)?;
            old == new
        };
        if !same {
            ideal.write_all(&new)?;
            changed += 1;
        }
        out.write_all_at(&new, at)?;
    }
    out.set_len(length)?;
    drop(out);
    if composed_digest(target)? != header[32..64] {
        bail!(
            "{} composed with {} is not the file the patch header describes",
            target.display(),
            patch.display()
        );
    }
    Ok((count, changed))
}

/// SHA-256 of the concatenated SHA-256 digests of the file's 16 MiB chunks (one for a file of
/// at most 16 MiB): the composed digest of a patch header.
fn composed_digest(path: &Path) -> Result<[u8; 32]> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut outer = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut chunks = 0;
    loop {
        let mut chunk = Sha256::new();
        let mut in_chunk = 0u64;
        while in_chunk < CHUNK {
            let want = (CHUNK - in_chunk).min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            chunk.update(&buf[..n]);
            in_chunk += n as u64;
        }
        if in_chunk == 0 && chunks > 0 {
            break;
        }
        outer.update(chunk.finalize());
        chunks += 1;
        if in_chunk < CHUNK {
            break;
        }
    }
    Ok(outer.finalize().into())
}

// ---------------------------------------------------------------------------------------------
// `docker run` to the first answer.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Image {
    /// The last patch generation: bakedb-init composes its patches before postgres starts.
    Patched,
    /// A full build of the same source state.
    Plain,
}

impl Image {
    const BOTH: [Image; 2] = [Image::Patched, Image::Plain];
}

struct StartSample {
    image: Image,
    verify: bool,
    cache: Cache,
    secs: f64,
    /// bakedb-init's own figures: composing, and verifying (its "verified" line's time, which
    /// leaves composing out).
    composed_secs: Option<f64>,
    verified_secs: Option<f64>,
    marks: Vec<(&'static str, f64)>,
    init_lines: Vec<String>,
}

struct Starts {
    samples: Vec<StartSample>,
    patched_size: Option<u64>,
}

/// Both images into docker, then `--runs` rounds of starts: cold (when the page cache can be
/// dropped) and warm, verification on and off, the patched image and the plain one in turn.
#[allow(clippy::too_many_arguments)]
fn start_part(
    options: &DeltaOptions,
    docker: &Path,
    pg_bin: &Path,
    dir: &Path,
    (patched_layout, patched_tag): (&Path, &str),
    (plain_layout, plain_tag): (&Path, &str),
    expected: &str,
    cold: bool,
) -> Result<Starts> {
    let name = unique_name("bakedb-bench-pgdelta");
    let load = |layout: &Path, tag: &str, which: &str| {
        let archive = dir.join(format!("{which}.tar"));
        let image = format!("{name}:{which}");
        eprintln!("xtask: postgres: docker load {image} (oci:…:{tag})");
        run_quiet(
            Command::new("skopeo")
                .args(["copy", "--quiet"])
                .arg(format!("oci:{}:{tag}", layout.display()))
                .arg(format!("docker-archive:{}:{image}", archive.display())),
        )?;
        let loaded = docker_load(docker, &archive, &image);
        let _ = fs::remove_file(&archive);
        loaded
    };
    let patched = load(patched_layout, patched_tag, "patched")?;
    let plain = load(plain_layout, plain_tag, "plain")?;
    let client = Client {
        bin: pg_bin.to_owned(),
    };
    let mut samples = Vec::new();
    for run in 1..=options.runs {
        for cache in Cache::BOTH {
            if cache == Cache::Cold && !cold {
                continue;
            }
            for verify in [true, false] {
                for image in Image::BOTH {
                    let name = match image {
                        Image::Patched => &patched.name,
                        Image::Plain => &plain.name,
                    };
                    match cache {
                        Cache::Cold => drop_caches()
                            .map_err(|e| anyhow::anyhow!("dropping the page cache: {e}"))?,
                        // An untimed start with verification reads every byte of the data.
                        Cache::Warm => drop(start(docker, &client, name, &[], expected)?),
                    }
                    // Dirty pages of the previous start (a composed file copied up) are
                    // written back before, not during, the timed start.
                    sync();
                    wait_until_quiet();
                    let env: &[&str] = if verify { &[] } else { &["BAKEDB_VERIFY=off"] };
                    let started = start(docker, &client, name, env, expected)?;
                    let logs = started.logs();
                    let init_lines: Vec<String> = logs
                        .lines()
                        .filter_map(strip_timestamp)
                        .filter(|l| {
                            l.starts_with("bakedb-init: composed")
                                || l.starts_with("bakedb-init: verified")
                        })
                        .map(str::to_owned)
                        .collect();
                    let secs_of = |prefix: &str| {
                        init_lines
                            .iter()
                            .find(|l| l.starts_with(prefix))
                            .and_then(|l| seconds_in(l))
                    };
                    let sample = StartSample {
                        image,
                        verify,
                        cache,
                        secs: started.secs,
                        composed_secs: secs_of("bakedb-init: composed"),
                        verified_secs: secs_of("bakedb-init: verified"),
                        marks: marks(&logs, started.spawned_tod, &BAKED_MARKS),
                        init_lines,
                    };
                    if image == Image::Patched && sample.composed_secs.is_none() {
                        bail!("the patched image composed nothing at its start:\n{logs}");
                    }
                    eprintln!(
                        "xtask: start {run}/{}: {}, verification {}, {} cache: first answer after {:.3} s",
                        options.runs,
                        image.label(),
                        if verify { "on" } else { "off" },
                        cache.name(),
                        sample.secs
                    );
                    samples.push(sample);
                }
            }
        }
    }
    Ok(Starts {
        samples,
        patched_size: bench::tools::image_size(docker, &patched.name),
    })
}

impl Image {
    fn label(self) -> &'static str {
        match self {
            Image::Patched => "patched",
            Image::Plain => "plain",
        }
    }
}

/// "… in 1.32 s (…)" → 1.32: the time bakedb-init's line reports.
fn seconds_in(line: &str) -> Option<f64> {
    let after = &line[line.rfind(" in ")? + 4..];
    after.split_once(" s")?.0.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report<'a> {
    options: &'a DeltaOptions,
    commit: &'a str,
    versions: String,
    pg_version: String,
    scale: u64,
    db_bytes: u64,
    tables: String,
    /// Relation files by path under the data directory, to name them.
    relations: BTreeMap<String, String>,
    scenarios: Vec<ScenarioResult>,
    cold_unavailable: Option<String>,
}

impl ScenarioResult {
    /// The generations that came out as a patch (not a fresh base).
    fn patches(&self) -> impl Iterator<Item = &Generation> {
        self.generations
            .iter()
            .filter(|g| g.rebake.fresh_base.is_none())
    }

    /// Over the patch generations: a fresh base is not a patch layer.
    fn patch_ratio(&self) -> Option<f64> {
        median(
            self.patches()
                .map(|g| g.rebake.layer_bytes as f64 / g.ideal_bytes.max(1) as f64),
        )
    }

    /// Over every generation: a fresh base is what the registry stores for it.
    fn registry_ratio(&self) -> Option<f64> {
        median(
            self.generations
                .iter()
                .map(|g| g.registry_bytes as f64 / g.ideal_bytes.max(1) as f64),
        )
    }

    fn fresh_bases(&self) -> Vec<String> {
        self.generations
            .iter()
            .filter(|g| g.rebake.fresh_base.is_some())
            .map(|g| g.number.to_string())
            .collect()
    }
}

impl Report<'_> {
    fn name(&self, path: &str) -> String {
        self.relations
            .get(path)
            .map_or_else(String::new, |r| format!(" ({r})"))
    }

    fn markdown(&self) -> String {
        let mut md = String::from("### PostgreSQL\n\n");
        md.push_str(&bench::report::part_start(
            self.commit,
            &self.options.postgres_command(),
        ));
        let rows = self
            .scenarios
            .first()
            .and_then(|s| s.generations.first())
            .map_or(0, |g| g.changed_rows);
        let _ = writeln!(
            md,
            "A live {} on 127.0.0.1, `pgbench -i -s {}`: database `{DB}` of {} MB ({}), made afresh for each scenario. \
             Generation 0 is a full build (`bakedb build --engine postgres --source postgresql://postgres@127.0.0.1:PORT/{DB} \
             --pg-bin … --base oci:target/fixtures/postgres:latest --output oci:…:g0`, gzip); then each generation is **one \
             transaction** that adds N to `abalance` of 1 % of pgbench_accounts ({rows} accounts: in the scenario \"random\" \
             distinct aids drawn uniformly, in \"range\" one run of consecutive aids; seeded; `UPDATE pgbench_accounts … \
             WHERE aid = ANY(…)`), re-baked from the live server with `--from oci:…:g<N-1>`, and the same source state is \
             then built in full as well (no `--from`). The **ideal** is the 8 KiB pages that differ between the data files \
             of generation N-1 and N as bakedb baked them: generation 0's data layer with each later layer applied as \
             bakedb-init composes it (every composed file checked against its patch header's digest), every file under \
             /var/lib/bakedb compared page by page (a new file: all its pages), concatenated and compressed with `pigz -1`. \
             The registry column is what a local docker-registry's storage grew by when skopeo pushed the generation \
             (generation 0 of the first scenario brings the base image's layers too). \
             Peak RSS is GNU time's, the largest process of the build (bakedb itself, pg_basebackup or the scratch \
             postgres); the source server's CPU while it serves a build is the build's, not other processes'. \
             Tools: {}.\n",
            self.pg_version,
            self.scale,
            mb(self.db_bytes),
            self.tables,
            self.versions,
        );
        for scenario in &self.scenarios {
            self.rebake_markdown(&mut md, scenario);
        }
        for scenario in &self.scenarios {
            self.start_markdown(&mut md, scenario);
        }
        self.targets_markdown(&mut md);
        md
    }

    fn rebake_markdown(&self, md: &mut String, r: &ScenarioResult) {
        let _ = writeln!(
            md,
            "#### Re-bakes, {} ({})\n",
            r.scenario.name(),
            r.scenario.describe()
        );
        let _ = writeln!(
            md,
            "| generation | pages that differ (in relation files), of all | the layer holds | re-bake s | peak RSS MiB | layer MB | ideal MB | layer / ideal | registry MB | registry / ideal | full build of the same state: data layer MB, s |"
        );
        let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            md,
            "| 0 (full build) | | the data layer | {} | {} | {} | | | {} | | |",
            fmt(Some(r.g0.sample.secs), 2),
            fmt(Sample::peak_rss_mib(std::slice::from_ref(&r.g0.sample)), 1),
            mb(r.g0.layer_bytes),
            mb(r.base_registry_bytes),
        );
        for g in &r.generations {
            let s = &g.shipped;
            let holds = match &g.rebake.fresh_base {
                Some(why) => format!("**a fresh base**, not a patch: {why}"),
                None => format!(
                    "{} files patched in {} pages, {} whole ({} pages), {} deleted",
                    s.patched.len(),
                    s.patch_pages,
                    s.whole.len(),
                    s.whole.iter().map(|(_, pages, _)| pages).sum::<u64>(),
                    s.deleted
                ),
            };
            let _ = writeln!(
                md,
                "| {} | {} ({}), {} of {} | {holds} | {} | {} | {} | {} | {} | {} | {} | {} MB, {} s |",
                g.number,
                s.changed_pages,
                s.relation_pages,
                fmt_pct(ratio(
                    Some(s.changed_pages as f64),
                    Some(s.total_pages as f64)
                )),
                s.total_pages,
                fmt(Some(g.rebake.sample.secs), 2),
                fmt(
                    Sample::peak_rss_mib(std::slice::from_ref(&g.rebake.sample)),
                    1
                ),
                mb(g.rebake.layer_bytes),
                mb(g.ideal_bytes),
                times(
                    ratio(
                        Some(g.rebake.layer_bytes as f64),
                        Some(g.ideal_bytes as f64)
                    ),
                    2
                ),
                mb(g.registry_bytes),
                times(
                    ratio(Some(g.registry_bytes as f64), Some(g.ideal_bytes as f64)),
                    2
                ),
                mb(g.full.layer_bytes),
                fmt(Some(g.full.sample.secs), 2),
            );
        }
        let gens = &r.generations;
        let med = |f: &dyn Fn(&Generation) -> f64| median(gens.iter().map(f));
        let rebakes: Vec<Sample> = gens.iter().map(|g| g.rebake.sample.clone()).collect();
        let _ = writeln!(
            md,
            "| median | {} | | {} | {} | {} (patches) | {} | {} (patches) | {} | {} | {} MB, {} s |\n",
            fmt(med(&|g| g.shipped.changed_pages as f64), 0),
            fmt(med(&|g| g.rebake.sample.secs), 2),
            fmt(Sample::peak_rss_mib(&rebakes), 1),
            fmt(
                median(r.patches().map(|g| g.rebake.layer_bytes as f64 / 1e6)),
                2
            ),
            fmt(med(&|g| g.ideal_bytes as f64 / 1e6), 2),
            times(r.patch_ratio(), 2),
            fmt(med(&|g| g.registry_bytes as f64 / 1e6), 2),
            times(r.registry_ratio(), 2),
            fmt(med(&|g| g.full.layer_bytes as f64 / 1e6), 1),
            fmt(med(&|g| g.full.sample.secs), 2),
        );
        let mut whole: Vec<(usize, &(String, u64, u64))> = r
            .patches()
            .flat_map(|g| g.shipped.whole.iter().map(move |w| (g.number, w)))
            .collect();
        whole.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(a.0.cmp(&b.0)));
        if !whole.is_empty() {
            let _ = writeln!(
                md,
                "Files the patch layers shipped whole (new, or changed in more than half their pages), the biggest:\n"
            );
            let _ = writeln!(
                md,
                "| generation | file | MB | its pages that differ |\n|---:|---|---:|---:|"
            );
            for (g, (path, pages, changed)) in whole.iter().take(5) {
                let _ = writeln!(
                    md,
                    "| {g} | `{path}`{} | {} | {} of {pages} ({}) |",
                    self.name(path),
                    mb(pages * PAGE as u64),
                    changed,
                    fmt_pct(ratio(Some(*changed as f64), Some((*pages).max(1) as f64))),
                );
            }
            let _ = writeln!(md);
        }
        let others: Vec<Sample> = std::iter::once(r.g0.sample.clone())
            .chain(
                gens.iter()
                    .flat_map(|g| [g.rebake.sample.clone(), g.full.sample.clone()]),
            )
            .collect();
        let _ = writeln!(
            md,
            "Other processes took at most {} of the cores during a timed build.\n",
            fmt_pct(Sample::most_other_load(&others))
        );
    }

    fn start_markdown(&self, md: &mut String, r: &ScenarioResult) {
        let _ = writeln!(
            md,
            "#### `docker run` to the first answer, patches composed by bakedb-init, {}\n",
            r.scenario.name()
        );
        let (Some(starts), Some(image)) = (&r.starts, &r.patched) else {
            let _ = writeln!(
                md,
                "Not measured: no generation of this scenario came out as a patch (each was a fresh base).\n"
            );
            return;
        };
        let cold = match &self.cold_unavailable {
            Some(why) => format!("Cold cache: {why}."),
            None => {
                "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` right before `docker run`.".into()
            }
        };
        let g = image.generation;
        let chain = r
            .generations
            .iter()
            .rev()
            .skip_while(|x| x.number > g)
            .take_while(|x| x.rebake.fresh_base.is_none())
            .count();
        let _ = writeln!(
            md,
            "**patched**: generation {g} ({chain} patch layer{} on its base; {} MB in docker), whose patches bakedb-init \
             composes into {} data files of {} MB in all (in the container's writable layer: overlayfs copies each of \
             them up whole) and verifies before it execs postgres; **plain**: the full build of the same source state. Each \
             start: `docker run -d --network host -e PGPORT=PORT [-e BAKEDB_VERIFY=off] IMAGE`, timed from spawning \
             `docker run` to the first right answer of `psql -c 'SELECT count(*) FROM pgbench_branches'` over TCP, as \
             in the postgres section. {cold} Warm: right after an untimed start of the same image with verification \
             (which read every byte). With `BAKEDB_VERIFY=off` init still composes, but verifies nothing. \"init: \
             composed\" and \"init: verified\" are the times bakedb-init's own lines report (verifying leaves composing \
             out). Medians of {} runs.\n",
            if chain == 1 { "" } else { "s" },
            starts.patched_size.map_or("—".into(), mb),
            image.composed_files,
            mb(image.composed_bytes),
            self.options.runs,
        );
        let _ = writeln!(
            md,
            "| image | verification | cache | first answer, median s | min–max s | init: composed, median s | init: verified, median s |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|");
        for cache in Cache::BOTH {
            for verify in [true, false] {
                for image in Image::BOTH {
                    if cache == Cache::Cold
                        && let Some(why) = &self.cold_unavailable
                    {
                        let _ = writeln!(
                            md,
                            "| {} | {} | cold | {why} | | | |",
                            image.label(),
                            on_off(verify)
                        );
                        continue;
                    }
                    let select = || starts.select(image, verify, cache);
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {} |",
                        image.label(),
                        on_off(verify),
                        cache.name(),
                        fmt(median(select().map(|s| s.secs)), 3),
                        fmt_range(range(select().map(|s| s.secs)), 3),
                        fmt(median(select().filter_map(|s| s.composed_secs)), 2),
                        fmt(median(select().filter_map(|s| s.verified_secs)), 2),
                    );
                }
            }
        }
        let _ = writeln!(md, "\n| case | patched / plain, first answer |\n|---|---:|");
        for cache in Cache::BOTH {
            for verify in [true, false] {
                if let Some(r) = starts.ratio(verify, cache) {
                    let _ = writeln!(
                        md,
                        "| verification {}, {} cache | {} |",
                        on_off(verify),
                        cache.name(),
                        times(Some(r), 2)
                    );
                }
            }
        }
        let _ = writeln!(
            md,
            "\nWhere the time goes (docker's log timestamps, seconds after `docker run` was spawned, medians):\n"
        );
        let _ = writeln!(
            md,
            "| image | verification | cache | steps |\n|---|---|---|---|"
        );
        for cache in Cache::BOTH {
            for verify in [true, false] {
                for image in Image::BOTH {
                    let samples: Vec<&StartSample> = starts.select(image, verify, cache).collect();
                    let Some(first) = samples.first() else {
                        continue;
                    };
                    let steps: Vec<String> = first
                        .marks
                        .iter()
                        .map(|(label, _)| {
                            let at = median(
                                samples
                                    .iter()
                                    .filter_map(|s| s.marks.iter().find(|(l, _)| l == label))
                                    .map(|(_, at)| *at),
                            );
                            format!("{label} {}", fmt(at, 3))
                        })
                        .chain(std::iter::once(format!(
                            "first answer {}",
                            fmt(median(samples.iter().map(|s| s.secs)), 3)
                        )))
                        .collect();
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} |",
                        image.label(),
                        on_off(verify),
                        cache.name(),
                        steps.join(" → ")
                    );
                }
            }
        }
        if let Some(last) = starts
            .samples
            .iter()
            .rev()
            .find(|s| s.image == Image::Patched && s.verify)
        {
            let _ = writeln!(
                md,
                "\nbakedb-init in the last patched start ({} cache):\n",
                last.cache.name()
            );
            for line in &last.init_lines {
                let _ = writeln!(md, "- `{line}`");
            }
        }
        let _ = writeln!(md);
    }

    fn targets_markdown(&self, md: &mut String) {
        let _ = writeln!(md, "#### Targets\n");
        let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
        for r in &self.scenarios {
            let name = r.scenario.name();
            let patch = r.patch_ratio();
            let _ = match r.patches().count() {
                0 => writeln!(
                    md,
                    "| postgres, {name}: patch layer ≤ {TARGET_PATCH_VS_IDEAL}× the ideal | no patch: every generation was a fresh base | not measured |"
                ),
                n => writeln!(
                    md,
                    "| postgres, {name}: patch layer ≤ {TARGET_PATCH_VS_IDEAL}× the ideal (median of the {n} patch generations) | {} | {} |",
                    times(patch, 2),
                    yes_no(patch.map(|v| v <= TARGET_PATCH_VS_IDEAL))
                ),
            };
            let registry = r.registry_ratio();
            let fresh = r.fresh_bases();
            let _ = writeln!(
                md,
                "| postgres, {name}: registry bytes per generation ≤ {TARGET_PATCH_VS_IDEAL}× the ideal (median of all {} generations{}) | {} | {} |",
                r.generations.len(),
                match fresh.len() {
                    0 => String::new(),
                    1 => format!(", generation {} a fresh base", fresh[0]),
                    _ => format!(", generations {} fresh bases", fresh.join(", ")),
                },
                times(registry, 2),
                yes_no(registry.map(|v| v <= TARGET_PATCH_VS_IDEAL))
            );
        }
    }
}

impl Starts {
    fn select(
        &self,
        image: Image,
        verify: bool,
        cache: Cache,
    ) -> impl Iterator<Item = &StartSample> {
        self.samples
            .iter()
            .filter(move |s| s.image == image && s.verify == verify && s.cache == cache)
    }

    /// Patched against plain: the medians' ratio.
    fn ratio(&self, verify: bool, cache: Cache) -> Option<f64> {
        ratio(
            median(self.select(Image::Patched, verify, cache).map(|s| s.secs)),
            median(self.select(Image::Plain, verify, cache).map(|s| s.secs)),
        )
    }
}

fn on_off(verify: bool) -> &'static str {
    if verify { "on" } else { "off" }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A patch file of `pages` (number, fill byte) for a file of `length` bytes composed to
    /// `composed` (its digest goes into the header).
    fn patch(length: u64, pages: &[(u64, u8)], composed: &Path) -> Vec<u8> {
        let mut out = b"BKDBPTCH".to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(PAGE as u32).to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&composed_digest(composed).unwrap());
        for (n, _) in pages {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for (_, fill) in pages {
            out.extend_from_slice(&[*fill; PAGE]);
        }
        out
    }

    #[test]
    fn composes_patches_and_finds_the_pages_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("16397");
        let page = |fill: u8| vec![fill; PAGE];
        fs::write(&target, [page(1), page(2), page(3)].concat()).unwrap();
        // Page 1 rewritten as it was, page 2 changed, page 3 added.
        let expected = dir.path().join("expected");
        fs::write(&expected, [page(1), page(2), page(9), page(4)].concat()).unwrap();
        let patch_file = dir.path().join("patch");
        fs::write(
            &patch_file,
            patch(4 * PAGE as u64, &[(1, 2), (2, 9), (3, 4)], &expected),
        )
        .unwrap();
        let mut ideal = Vec::new();
        assert_eq!(
            apply_patch(&target, &patch_file, &mut ideal).unwrap(),
            (3, 2)
        );
        assert_eq!(fs::read(&target).unwrap(), fs::read(&expected).unwrap());
        assert_eq!(ideal, [page(9), page(4)].concat());
        // Shrinking: the length goes, no page differs.
        fs::write(&expected, page(1)).unwrap();
        fs::write(&patch_file, patch(PAGE as u64, &[], &expected)).unwrap();
        ideal.clear();
        assert_eq!(
            apply_patch(&target, &patch_file, &mut ideal).unwrap(),
            (0, 0)
        );
        assert_eq!(fs::read(&target).unwrap(), page(1));
        // A patch whose composed digest is another file's is refused.
        fs::write(&patch_file, patch(PAGE as u64, &[(0, 7)], &expected)).unwrap();
        assert!(apply_patch(&target, &patch_file, &mut ideal).is_err());
    }

    #[test]
    fn compares_whole_files_page_by_page() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        fs::write(&old, [vec![1u8; PAGE], vec![2u8; PAGE]].concat()).unwrap();
        fs::write(
            &new,
            [vec![1u8; PAGE], vec![3u8; PAGE], vec![4u8; 100]].concat(),
        )
        .unwrap();
        let mut ideal = Vec::new();
        assert_eq!(differing_pages(&old, &new, &mut ideal).unwrap(), 2);
        assert_eq!(ideal, [vec![3u8; PAGE], vec![4u8; 100]].concat());
        ideal.clear();
        assert_eq!(
            differing_pages(&dir.path().join("none"), &old, &mut ideal).unwrap(),
            2
        );
    }

    #[test]
    fn digests_chunks_as_image_json_does() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        fs::write(&small, b"abc").unwrap();
        let inner: [u8; 32] = Sha256::digest(b"abc").into();
        let outer: [u8; 32] = Sha256::digest(inner).into();
        assert_eq!(composed_digest(&small).unwrap(), outer);
        let big = dir.path().join("big");
        let bytes: Vec<u8> = (0..CHUNK + 5).map(|i| (i % 251) as u8).collect();
        fs::write(&big, &bytes).unwrap();
        let mut outer = Sha256::new();
        outer.update(Sha256::digest(&bytes[..CHUNK as usize]));
        outer.update(Sha256::digest(&bytes[CHUNK as usize..]));
        assert_eq!(
            composed_digest(&big).unwrap(),
            <[u8; 32]>::from(outer.finalize())
        );
    }

    #[test]
    fn tells_relation_files() {
        assert!(is_relation(Path::new("pgdata/base/16384/16397")));
        assert!(is_relation(Path::new("pgdata/base/16384/16397_fsm")));
        assert!(is_relation(Path::new("pgdata/global/1262")));
        assert!(!is_relation(Path::new("pgdata/global/pg_control")));
        assert!(!is_relation(Path::new("pgdata/base/16384/pg_filenode.map")));
        assert!(!is_relation(Path::new(
            "pgdata/pg_wal/000000010000000000000002"
        )));
    }

    fn built(secs: f64, layer_bytes: u64, fresh_base: Option<&str>) -> Built {
        Built {
            sample: Sample {
                secs,
                peak_rss_kib: Some(30 << 10),
                ..Sample::default()
            },
            layer_digest: "sha256:ab".into(),
            layer_bytes,
            fresh_base: fresh_base.map(str::to_owned),
        }
    }

    #[test]
    fn renders_the_report() {
        let options =
            DeltaOptions::parse(&["--engines", "postgres", "--pg-generations", "2"]).unwrap();
        let generation = |number, layer, fresh| Generation {
            number,
            changed_rows: 69_000,
            rebake: built(9.0, layer, fresh),
            shipped: Shipped {
                changed_pages: 60_000,
                relation_pages: 59_000,
                total_pages: 120_000,
                patched: vec!["a".into(), "b".into(), "c".into()],
                patch_pages: 50_000,
                whole: vec![("pgdata/base/16384/16405".into(), 19_000, 18_000)],
                deleted: 1,
            },
            ideal_bytes: 30_000_000,
            registry_bytes: layer + 100_000,
            full: built(10.0, 64_000_000, None),
        };
        let start = |image, verify, cache, secs| StartSample {
            image,
            verify,
            cache,
            secs,
            composed_secs: (image == Image::Patched).then_some(0.5),
            verified_secs: verify.then_some(1.0),
            marks: vec![("postgres ready", secs - 0.1)],
            init_lines: vec!["bakedb-init: composed 2 files … in 0.50 s".into()],
        };
        let mut samples = Vec::new();
        for cache in Cache::BOTH {
            for verify in [true, false] {
                samples.push(start(Image::Patched, verify, cache, 3.0));
                samples.push(start(Image::Plain, verify, cache, 2.0));
            }
        }
        let report = Report {
            options: &options,
            commit: "abc",
            versions: "pigz 2.6".into(),
            pg_version: "postgres (PostgreSQL) 15.18".into(),
            scale: 69,
            db_bytes: 1_089_000_000,
            tables: "pgbench_accounts 1082 MB".into(),
            relations: BTreeMap::from([(
                "pgdata/base/16384/16405".to_owned(),
                "pgbench_accounts_pkey".to_owned(),
            )]),
            scenarios: vec![
                ScenarioResult {
                    scenario: Scenario::Random,
                    g0: built(9.0, 64_000_000, None),
                    base_registry_bytes: 163_000_000,
                    generations: vec![
                        generation(1, 27_000_000, None),
                        generation(2, 66_000_000, Some("its patches would be 1 GiB")),
                    ],
                    patched: None,
                    starts: None,
                },
                ScenarioResult {
                    scenario: Scenario::Range,
                    g0: built(9.0, 64_000_000, None),
                    base_registry_bytes: 64_000_000,
                    generations: vec![
                        generation(1, 27_000_000, None),
                        generation(2, 27_000_000, None),
                    ],
                    patched: Some(PatchedImage {
                        generation: 2,
                        layout: PathBuf::new(),
                        full_layout: PathBuf::new(),
                        composed_files: 9,
                        composed_bytes: 1_080_000_000,
                    }),
                    starts: Some(Starts {
                        samples,
                        patched_size: Some(1_300_000_000),
                    }),
                },
            ],
            cold_unavailable: None,
        };
        let md = report.markdown();
        for expected in [
            "### PostgreSQL\n\nMeasured ",
            "cargo xtask bench delta --engines postgres --pg-size-mib 1024 --pg-generations 2 --runs 3",
            "#### Re-bakes, random (1 % of the rows, ids drawn uniformly)",
            "| 1 | 60000 (59000), 50 % of 120000 | 3 files patched in 50000 pages, 1 whole (19000 pages), 1 deleted | 9.00 | 30.0 | 27.0 | 30.0 | 0.90× |",
            "| 2 | 60000 (59000), 50 % of 120000 | **a fresh base**, not a patch: its patches would be 1 GiB |",
            "| 1 | `pgdata/base/16384/16405` (pgbench_accounts_pkey) | 155.6 | 18000 of 19000 (95 %) |",
            "Not measured: no generation of this scenario came out as a patch",
            "**patched**: generation 2 (2 patch layers on its base; 1300.0 MB in docker), whose patches bakedb-init composes into 9 data files of 1080.0 MB in all",
            "| patched | on | cold | 3.000 | 3.000–3.000 | 0.50 | 1.00 |",
            "| verification off, warm cache | 1.50× |",
            "| postgres, random: patch layer ≤ 1.3× the ideal (median of the 1 patch generations) | 0.90× | yes |",
            "(median of all 2 generations, generation 2 a fresh base) | 1.55× | **no** |",
            "| postgres, range: registry bytes per generation ≤ 1.3× the ideal (median of all 2 generations) | 0.90× | yes |",
        ] {
            assert!(md.contains(expected), "{expected:?} not in:\n{md}");
        }
        let mut report = report;
        report.scenarios[0].generations[0].rebake.fresh_base = Some("too big".into());
        let md = report.markdown();
        assert!(
            md.contains("| postgres, random: patch layer ≤ 1.3× the ideal | no patch: every generation was a fresh base | not measured |"),
            "{md}"
        );
    }

    #[test]
    fn reads_init_times() {
        assert_eq!(
            seconds_in(
                "bakedb-init: verified 1278 files, 1.04 GiB under /var/lib/bakedb in 1.32 s (846 MB/s, 2 threads)"
            ),
            Some(1.32)
        );
        assert_eq!(
            seconds_in(
                "bakedb-init: composed 3 files under /var/lib/bakedb from 5 patches (123 pages, 1.00 MiB written) in 2.10 s"
            ),
            Some(2.1)
        );
    }
}
