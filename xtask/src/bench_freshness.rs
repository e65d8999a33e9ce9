//! `cargo xtask bench freshness`: the update-propagation delay of the whole loop. A live
//! SQLite master (`bench build`'s generated event log, ~1 GiB) is followed by `bakedb watch`
//! pushing to a local docker-registry; a writer commits 1 % of the rows per transaction (at
//! random; in one key range), one commit at a time, and each commit is timed:
//!
//! - commit → digest pullable: from the end of the commit to the registry's tag naming a new
//!   manifest (the registry accepts a manifest only once all its blobs are there);
//! - commit → a freshly started replica answering with the new rows: `docker pull` of that
//!   digest and `docker run` of bakedb-serve (verification on), until a changed row answers
//!   with its new value;
//! - bytes the registry stored for the generation, against the changed pages alone compressed
//!   with gzip -1 (the ideal), and bakedb watch's peak RSS (VmHWM) over the whole run.
//!
//! The peer is what a team without bakedb does for the same change: `docker build` (FROM
//! scratch, COPY the database) and `docker push` to the same registry.
//!
//! PostgreSQL (bench_freshness/postgres.rs): the same loop on a live pgbench master of
//! `--pg-size-mib`, a writer updating 1 % of pgbench_accounts per commit, replicas under
//! docker asked for a changed account, and `pg_basebackup` + `docker build` + `docker push`
//! as the peer.
//!
//! `--engines sqlite,postgres` (the default) chooses the parts; each is written into
//! docs/benchmarks.md between markers of its own inside the freshness section, as soon as it
//! is measured. `--smoke` runs small sizes and few generations (a couple of minutes per part)
//! to try the code, and prints its report without writing docs/benchmarks.md.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bakedb_testkit::containers::DockerImage;
use bakedb_testkit::ports::free_port;
use bakedb_testkit::process;
use bakedb_testkit::registry::{Registry, RegistryOptions};
use rusqlite::Connection;

use crate::bench::data::{Rng, SEED, bench_database};
use crate::bench::layers::dir_bytes;
use crate::bench::timing::percentile;
use crate::bench::tools::{commit_measured, docker_bin, fresh_dir, release_bakedb, target_dir};
use crate::bench::{self, fmt, mb, median, run_quiet, times};
use crate::bench_delta::{Engine, Scenario, copy_master, ideal, page_hashes};
use crate::project_root;

mod postgres;

/// Issue 16's targets.
const TARGET_RANDOM_S: f64 = 5.0;
const TARGET_RANGE_S: f64 = 2.0;
const TARGET_BYTES_VS_IDEAL: f64 = 1.3;
const TARGET_RSS_MIB: f64 = 100.0;
const CHANGED_SHARE: f64 = 0.01;
const TABLE: &str = "events";
/// How long a generation may take before the bench gives up on it.
const PATIENCE: Duration = Duration::from_secs(300);

pub struct FreshnessOptions {
    pub engines: Vec<Engine>,
    /// The SQLite master's size and its commits (generations) per scenario.
    pub size_mib: u64,
    pub generations: usize,
    /// The PostgreSQL master's (pgbench) size and its commits per scenario.
    pub pg_size_mib: u64,
    pub pg_generations: usize,
    /// Generations of each part's docker build + push peer.
    pub peer_generations: usize,
    /// Small sizes to try the code: the report is printed, docs/benchmarks.md left alone.
    pub smoke: bool,
}

impl FreshnessOptions {
    pub fn parse(flags: &[&str]) -> Result<Self> {
        let mut options = FreshnessOptions {
            engines: Engine::ALL.to_vec(),
            size_mib: 1024,
            generations: 10,
            pg_size_mib: 1024,
            pg_generations: 10,
            peer_generations: 3,
            smoke: false,
        };
        let mut given = Vec::new();
        bench::flags::parse(
            "bench freshness",
            "--engines sqlite,postgres, --size-mib N, --generations N, --pg-size-mib N, --pg-generations N, --peer-generations N, --smoke",
            flags,
            |name, value| {
                match name {
                    "--engines" => options.engines = Engine::chosen(value)?,
                    "--size-mib" => options.size_mib = value.positive("database size in MiB")?,
                    "--generations" => options.generations = value.count("commits per scenario")?,
                    "--pg-size-mib" => {
                        options.pg_size_mib = value.positive("pgbench database size in MiB")?
                    }
                    "--pg-generations" => {
                        options.pg_generations = value.count("PostgreSQL commits per scenario")?
                    }
                    "--peer-generations" => {
                        options.peer_generations = value.count("docker build + push rounds")?
                    }
                    "--smoke" if value.is_switch() => options.smoke = true,
                    _ => return Ok(false),
                }
                given.push(name.to_owned());
                Ok(true)
            },
        )?;
        if options.smoke {
            // What was not given explicitly shrinks: 64 MiB, two commits, one peer round.
            let unless_given = |flag: &str| !given.iter().any(|g| g == flag);
            for (flag, size) in [
                ("--size-mib", &mut options.size_mib),
                ("--pg-size-mib", &mut options.pg_size_mib),
            ] {
                if unless_given(flag) {
                    *size = 64;
                }
            }
            for (flag, count, small) in [
                ("--generations", &mut options.generations, 2),
                ("--pg-generations", &mut options.pg_generations, 2),
                ("--peer-generations", &mut options.peer_generations, 1),
            ] {
                if unless_given(flag) {
                    *count = small;
                }
            }
        }
        Ok(options)
    }

    /// The command that measures the SQLite part alone.
    fn sqlite_command(&self) -> String {
        format!(
            "cargo xtask bench freshness --engines sqlite --size-mib {} --generations {} --peer-generations {}",
            self.size_mib, self.generations, self.peer_generations
        )
    }

    /// The command that measures the PostgreSQL part alone.
    fn postgres_command(&self) -> String {
        format!(
            "cargo xtask bench freshness --engines postgres --pg-size-mib {} --pg-generations {} --peer-generations {}",
            self.pg_size_mib, self.pg_generations, self.peer_generations
        )
    }
}

/// One commit followed through.
struct Sample {
    pages_changed: usize,
    ideal_bytes: u64,
    registry_bytes: u64,
    to_digest_s: f64,
    /// None when docker is not there.
    to_replica_s: Option<f64>,
}

struct ScenarioRun {
    scenario: Scenario,
    samples: Vec<Sample>,
}

struct PeerSample {
    secs: f64,
    registry_bytes: u64,
}

pub fn freshness(options: &FreshnessOptions) -> Result<()> {
    let root = project_root();
    let bench_dir = target_dir(&root).join("bench");
    let scratch = bench_dir.join("freshness");
    fresh_dir(&scratch.join("tmp"))?;
    let bakedb = release_bakedb(&root, &scratch)?;
    let commit = commit_measured(&root);
    let docker = docker_bin();
    let docker_ok =
        run_quiet(Command::new(&docker).args(["info", "--format", "{{.ServerVersion}}"]))
            .map(|v| v.trim().to_owned())
            .ok()
            .filter(|v| !v.is_empty());
    let shared = Shared {
        bench_dir: &bench_dir,
        scratch: &scratch,
        bakedb: &bakedb,
        commit: &commit,
        docker: &docker,
        docker_version: docker_ok,
    };
    // Each part is written as soon as it is measured: a later part that fails leaves it.
    for engine in &options.engines {
        let md = match engine {
            Engine::Sqlite => sqlite_part(options, &shared)?,
            Engine::Postgres => postgres::part(options, &shared)?,
        };
        if options.smoke {
            println!("{md}");
            eprintln!(
                "xtask: a smoke run: docs/benchmarks.md is left as it was (run without --smoke to write it)"
            );
        } else {
            bench::report::publish_part(&root, "freshness", engine.name(), &md)?;
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// What every part of the bench shares.
struct Shared<'a> {
    /// target/bench, where the generated SQLite database is kept between runs.
    bench_dir: &'a Path,
    scratch: &'a Path,
    /// A private copy of the release build.
    bakedb: &'a Path,
    commit: &'a str,
    docker: &'a Path,
    /// dockerd's version; None when there is no Docker daemon (no replicas, no peer).
    docker_version: Option<String>,
}

/// "0.42, 0.80, 1.10": the load averages over 1, 5 and 15 minutes, to say how busy the
/// machine was around a part.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The SQLite part: its markdown.
fn sqlite_part(options: &FreshnessOptions, shared: &Shared<'_>) -> Result<String> {
    let (bench_dir, scratch, docker) = (shared.bench_dir, shared.scratch, shared.docker);
    let docker_ok = shared.docker_version.clone();
    let generated = bench_database(bench_dir, options.size_mib)?;
    let master_dir = scratch.join("master");
    fresh_dir(&master_dir)?;
    let master = master_dir.join("app.db");
    copy_master(&generated, &master)?;
    let registry = Registry::start(RegistryOptions::default())
        .context("docker-registry is needed: apt-get install -y docker-registry")?;
    let host = registry.host();
    let repo = format!("{host}/bench/freshness");
    let live = format!("docker://{repo}:live");

    let engine_args: Vec<std::ffi::OsString> = vec![
        "--engine".into(),
        "sqlite".into(),
        "--source".into(),
        master.clone().into(),
    ];
    let mut watch = Watch::start(shared.bakedb, &engine_args, &live, scratch)?;
    eprintln!("xtask: waiting for the first generation (the whole database)");
    let first_bytes_before = dir_bytes(&registry.storage());
    let mut digest = wait_for_tag(registry.addr(), "bench/freshness", None, &mut watch)?;
    let first_push_bytes = dir_bytes(&registry.storage()) - first_bytes_before;

    let rows: i64 =
        Connection::open(&master)?
            .query_row(&format!("SELECT max(id) FROM {TABLE}"), [], |r| r.get(0))?;
    let changed_rows = ((rows as f64 * CHANGED_SHARE) as i64).max(1);
    let mut rng = Rng(SEED ^ 0xf4e5);
    let mut pages = page_hashes(&master)?;
    let mut runs = Vec::new();
    // The replica node keeps the image it ran last, as a node of a rolling update does.
    let mut pulled: Option<DockerImage> = None;
    let mut generation = 0;
    for scenario in Scenario::ALL {
        let mut samples = Vec::new();
        for i in 1..=options.generations {
            generation += 1;
            let marker = format!("g{generation}");
            let probe_id = update(&master, scenario, rows, changed_rows, &marker, &mut rng)?;
            let committed = Instant::now();
            let bytes_before = dir_bytes(&registry.storage());
            digest = wait_for_tag(
                registry.addr(),
                "bench/freshness",
                Some(&digest),
                &mut watch,
            )?;
            let to_digest_s = committed.elapsed().as_secs_f64();
            let to_replica_s = match &docker_ok {
                Some(_) => {
                    let image = format!("{repo}@{digest}");
                    let secs = replica_answers(docker, &image, probe_id, &marker, committed)?;
                    let now = DockerImage {
                        docker: docker.to_owned(),
                        name: image,
                    };
                    // Dropping the one before removes its name; layers the new one shares stay.
                    drop(pulled.replace(now));
                    Some(secs)
                }
                None => None,
            };
            let registry_bytes = dir_bytes(&registry.storage()) - bytes_before;
            let after = page_hashes(&master)?;
            let changed: Vec<usize> = (0..after.len())
                .filter(|&p| pages.get(p) != Some(&after[p]))
                .collect();
            pages = after;
            let ideal_bytes = ideal(&master, &changed, scratch)?;
            eprintln!(
                "xtask: {} {i}/{}: digest pullable {to_digest_s:.2} s after the commit, replica answering {}, {} MB stored ({} pages changed, ideal {} MB)",
                scenario.name(),
                options.generations,
                to_replica_s.map_or("—".into(), |s| format!("{s:.2} s")),
                mb(registry_bytes),
                changed.len(),
                mb(ideal_bytes),
            );
            samples.push(Sample {
                pages_changed: changed.len(),
                ideal_bytes,
                registry_bytes,
                to_digest_s,
                to_replica_s,
            });
        }
        runs.push(ScenarioRun { scenario, samples });
    }
    let peak_rss_mib = watch.peak_rss_kib().map(|k| k as f64 / 1024.0);
    watch.stop()?;

    let peer = match &docker_ok {
        Some(_) => Some(peer(
            docker,
            &master,
            &format!("{host}/bench/peer"),
            &registry,
            options,
            rows,
            changed_rows,
            &mut rng,
            scratch,
        )?),
        None => None,
    };
    let _ = fs::remove_dir_all(&master_dir);

    let report = Report {
        options,
        commit: shared.commit.to_owned(),
        db_bytes: fs::metadata(&generated)?.len(),
        first_push_bytes,
        runs,
        peak_rss_mib,
        peer,
        docker: docker_ok,
    };
    Ok(report.markdown())
}

/// Update `changed` rows with `kind = marker` in one transaction: the id of one changed row.
fn update(
    master: &Path,
    scenario: Scenario,
    rows: i64,
    changed: i64,
    marker: &str,
    rng: &mut Rng,
) -> Result<i64> {
    let conn = Connection::open(master)?;
    let tx = conn.unchecked_transaction()?;
    let first = 1 + (rng.next() % (rows - changed).max(1) as u64) as i64;
    let mut probe = first;
    {
        let mut stmt = tx.prepare(&format!(
            "UPDATE {TABLE} SET kind = ?1, payload = ?2 WHERE id = ?3"
        ))?;
        for i in 0..changed {
            let id = match scenario {
                Scenario::Random => 1 + (rng.next() % rows as u64) as i64,
                Scenario::Range => first + i,
            };
            if i == 0 {
                probe = id;
            }
            let payload: Vec<u8> = (0..4).flat_map(|_| rng.next().to_le_bytes()).collect();
            stmt.execute(rusqlite::params![marker, payload, id])?;
        }
    }
    tx.commit()?;
    Ok(probe)
}

/// `bakedb watch` pushing to the registry, its log in the scratch directory.
struct Watch {
    child: Child,
    log: PathBuf,
}

impl Watch {
    /// `bakedb watch ENGINE_ARGS --output LIVE`, its log and its temporary files in `scratch`.
    fn start(
        bakedb: &Path,
        engine_args: &[std::ffi::OsString],
        live: &str,
        scratch: &Path,
    ) -> Result<Watch> {
        let log = scratch.join("watch.log");
        fs::create_dir_all(scratch.join("tmp"))?;
        let child = Command::new(bakedb)
            .arg("watch")
            .args(engine_args)
            .args(["--output", live, "--tls-verify=false", "--poll", "50ms"])
            .env("TMPDIR", scratch.join("tmp"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting bakedb watch")?;
        Ok(Watch { child, log })
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "bakedb watch exited with {status}:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Wait until the log names generation `n` (its line comes right after the tag moved):
    /// fails if watch wrote more generations than that, i.e. one the bench's commits did not
    /// make, which the timing would take for one of them.
    fn wait_for_generation(&mut self, n: usize) -> Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let written = log
                .lines()
                .filter(|l| l.starts_with("bakedb watch: generation "))
                .count();
            if written > n {
                bail!("bakedb watch wrote {written} generations where the bench made {n}:\n{log}");
            }
            if written == n {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "bakedb watch logged no generation {n} within {} s",
                    PATIENCE.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// VmHWM of the running watch.
    fn peak_rss_kib(&self) -> Option<u64> {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    fn stop(mut self) -> Result<()> {
        process::stop(&mut self.child, process::SIGTERM, Duration::from_secs(60));
        let status = self.child.wait()?;
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        if !status.success() {
            bail!("bakedb watch exited with {status} on SIGTERM:\n{log}");
        }
        if log.contains("failed") {
            bail!("bakedb watch logged a failure:\n{log}");
        }
        Ok(())
    }
}

/// The digest `REPO:live` names in the registry, once it differs from `old`.
fn wait_for_tag(
    registry: SocketAddr,
    repo: &str,
    old: Option<&str>,
    watch: &mut Watch,
) -> Result<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = bakedb_testkit::http::request_within(
            registry,
            "HEAD",
            &format!("/v2/{repo}/manifests/live"),
            &[(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )],
            Duration::from_secs(5),
        );
        if let Ok(r) = r
            && r.status == 200
            && let Some(digest) = r.header("Docker-Content-Digest")
            && Some(digest) != old
        {
            return Ok(digest.to_owned());
        }
        watch.check_running()?;
        if Instant::now() > deadline {
            bail!("the tag did not move within {} s", PATIENCE.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `docker pull` the image and run it (bakedb-serve, verification on) until row `id` answers
/// with `marker`: seconds since `since`.
fn replica_answers(
    docker: &Path,
    image: &str,
    id: i64,
    marker: &str,
    since: Instant,
) -> Result<f64> {
    run_quiet(Command::new(docker).args(["pull", "--quiet", image]))?;
    let port = free_port();
    let name = format!("bakedb-bench-freshness-{port}");
    run_quiet(Command::new(docker).args([
        "run",
        "--detach",
        "--network",
        "host",
        "--name",
        &name,
        "--env",
        &format!("BAKEDB_LISTEN=127.0.0.1:{port}"),
        image,
    ]))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let path = format!("/v1/query?sql=SELECT%20kind%20FROM%20{TABLE}%20WHERE%20id%3D{id}");
    let deadline = Instant::now() + PATIENCE;
    let mut polls = 0u64;
    let result = loop {
        let r =
            bakedb_testkit::http::request_within(addr, "GET", &path, &[], Duration::from_secs(5));
        if let Ok(r) = r
            && r.status == 200
        {
            if r.text().contains(&format!("\"{marker}\"")) {
                break Ok(since.elapsed().as_secs_f64());
            }
            break Err(anyhow::anyhow!(
                "the replica of {image} answered without the new rows: {}",
                r.text()
            ));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("the replica of {image} did not answer"));
        }
        polls += 1;
        if polls.is_multiple_of(50) {
            let running = run_quiet(Command::new(docker).args([
                "inspect",
                "--format",
                "{{.State.Running}}",
                &name,
            ]))
            .unwrap_or_default();
            if running.trim() != "true" {
                let logs = Command::new(docker)
                    .args(["logs", &name])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                break Err(anyhow::anyhow!(
                    "the replica of {image} stopped before answering: {logs}"
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = Command::new(docker)
        .args(["rm", "--force", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    result
}

/// docker build + docker push of the same kind of change, `options.peer_generations` times.
#[allow(clippy::too_many_arguments)]
fn peer(
    docker: &Path,
    master: &Path,
    repo: &str,
    registry: &Registry,
    options: &FreshnessOptions,
    rows: i64,
    changed_rows: i64,
    rng: &mut Rng,
    scratch: &Path,
) -> Result<Vec<PeerSample>> {
    let context = scratch.join("peer");
    fresh_dir(&context)?;
    fs::write(
        context.join("Dockerfile"),
        "FROM scratch\nCOPY app.db /var/lib/bakedb/app.db\n",
    )?;
    let mut samples = Vec::new();
    for g in 0..=options.peer_generations {
        if g > 0 {
            update(
                master,
                Scenario::Random,
                rows,
                changed_rows,
                &format!("peer{g}"),
                rng,
            )?;
        }
        let started = Instant::now();
        let _ = fs::remove_file(context.join("app.db"));
        fs::hard_link(master, context.join("app.db"))
            .or_else(|_| fs::copy(master, context.join("app.db")).map(|_| ()))?;
        let sample = build_and_push(docker, &context, &format!("{repo}:g{g}"), registry, started)?;
        // Generation 0 is the first push of the whole database, as bakedb's first generation.
        if g > 0 {
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// The peer's `docker build` (classic builder) of `context` as `tag` and `docker push` to
/// `registry`, timed from `started`; the local image is removed after.
fn build_and_push(
    docker: &Path,
    context: &Path,
    tag: &str,
    registry: &Registry,
    started: Instant,
) -> Result<PeerSample> {
    let before = dir_bytes(&registry.storage());
    run_quiet(
        Command::new(docker)
            .args(["build", "--quiet", "--tag", tag])
            .arg(context)
            .env("DOCKER_BUILDKIT", "0"),
    )?;
    run_quiet(Command::new(docker).args(["push", "--quiet", tag]))?;
    let secs = started.elapsed().as_secs_f64();
    let registry_bytes = dir_bytes(&registry.storage()) - before;
    let _ = Command::new(docker)
        .args(["rmi", "--force", tag])
        .stdout(Stdio::null())
        .status();
    eprintln!(
        "xtask: docker build + push {tag}: {secs:.2} s, {} MB stored",
        mb(registry_bytes)
    );
    Ok(PeerSample {
        secs,
        registry_bytes,
    })
}

struct Report<'a> {
    options: &'a FreshnessOptions,
    commit: String,
    db_bytes: u64,
    first_push_bytes: u64,
    runs: Vec<ScenarioRun>,
    peak_rss_mib: Option<f64>,
    peer: Option<Vec<PeerSample>>,
    docker: Option<String>,
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let mut md = bench::report::part_start(&self.commit, &self.options.sqlite_command());
        let _ = writeln!(
            md,
            "### SQLite\n\nA live SQLite master of {} MB (`bench build`'s event log) followed by `bakedb watch --output docker://127.0.0.1:PORT/bench/freshness:live --tls-verify=false --poll 50ms` (gzip, a local docker-registry). One commit at a time updates 1 % of the rows ({} per scenario); each is timed from the end of its commit to the registry's `live` tag naming the new manifest (pullable: the registry takes a manifest only once its blobs are there), and to a fresh replica (`docker pull` of that digest, `docker run` of bakedb-serve with verification) answering a changed row with its new value. The first generation pushed the whole image: {} MB. Docker: {}.\n",
            mb(self.db_bytes),
            self.options.generations,
            mb(self.first_push_bytes),
            self.docker.as_deref().unwrap_or("not available")
        );
        let _ = writeln!(
            md,
            "| scenario | commit → digest pullable, p50 / p99 s | commit → replica answering, p50 / p99 s | pages changed, median | registry MB per generation, median | ideal MB, median | registry / ideal, median |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
        for run in &self.runs {
            let s = &run.samples;
            let digest: Vec<f64> = s.iter().map(|x| x.to_digest_s).collect();
            let replica: Vec<f64> = s.iter().filter_map(|x| x.to_replica_s).collect();
            let _ = writeln!(
                md,
                "| {} | {} / {} | {} / {} | {} | {} | {} | {} |",
                run.scenario.name(),
                fmt(median(digest.iter().copied()), 2),
                fmt(percentile(digest.iter().copied(), 0.99), 2),
                fmt(median(replica.iter().copied()), 2),
                fmt(percentile(replica.iter().copied(), 0.99), 2),
                fmt(median(s.iter().map(|x| x.pages_changed as f64)), 0),
                fmt(median(s.iter().map(|x| x.registry_bytes as f64 / 1e6)), 2),
                fmt(median(s.iter().map(|x| x.ideal_bytes as f64 / 1e6)), 2),
                times(
                    median(
                        s.iter()
                            .map(|x| x.registry_bytes as f64 / x.ideal_bytes.max(1) as f64)
                    ),
                    2
                ),
            );
        }
        match &self.peer {
            Some(peer) => {
                let secs = median(peer.iter().map(|p| p.secs));
                let bytes = median(peer.iter().map(|p| p.registry_bytes as f64 / 1e6));
                let _ = writeln!(
                    md,
                    "\nThe peer, `docker build` (FROM scratch, COPY app.db, classic builder) + `docker push` of the same kind of change (1 % of the rows at random), {} times: {} s from the commit to the push done (median), {} MB stored per generation. bakedb's random-scenario digest was pullable {} sooner.\n",
                    peer.len(),
                    fmt(secs, 2),
                    fmt(bytes, 1),
                    times(
                        crate::bench::ratio(
                            secs,
                            self.runs
                                .iter()
                                .find(|r| r.scenario == Scenario::Random)
                                .and_then(|r| median(r.samples.iter().map(|x| x.to_digest_s)))
                        ),
                        1
                    )
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "\nThe docker build + push peer was not measured: no Docker daemon.\n"
                );
            }
        }
        let _ = writeln!(
            md,
            "bakedb watch's peak RSS over the whole run (VmHWM, builds and pushes in process): {} MiB.\n",
            fmt(self.peak_rss_mib, 1)
        );
        let _ = writeln!(
            md,
            "#### Targets\n\n| target | measured | met |\n|---|---|---|"
        );
        for run in &self.runs {
            digest_target(
                &mut md,
                run.scenario,
                median(run.samples.iter().map(|x| x.to_digest_s)),
            );
            let ratio = median(
                run.samples
                    .iter()
                    .map(|x| x.registry_bytes as f64 / x.ideal_bytes.max(1) as f64),
            );
            let _ = writeln!(
                md,
                "| {}: bytes pushed ≤ {TARGET_BYTES_VS_IDEAL}× the changed pages compressed | {} | {} |",
                run.scenario.name(),
                times(ratio, 2),
                bench::yes_no(ratio.map(|v| v <= TARGET_BYTES_VS_IDEAL))
            );
        }
        rss_target(&mut md, self.peak_rss_mib);
        md
    }
}

/// The targets table's row for a scenario's commit → digest pullable, p50.
fn digest_target(md: &mut String, scenario: Scenario, p50: Option<f64>) {
    let target = match scenario {
        Scenario::Random => TARGET_RANDOM_S,
        Scenario::Range => TARGET_RANGE_S,
    };
    let _ = writeln!(
        md,
        "| {}: commit → digest < {target} s (p50) | {} s | {} |",
        scenario.name(),
        fmt(p50, 2),
        bench::yes_no(p50.map(|v| v < target))
    );
}

/// The targets table's row for watch's peak RSS.
fn rss_target(md: &mut String, peak_rss_mib: Option<f64>) {
    let _ = writeln!(
        md,
        "| peak RSS < {TARGET_RSS_MIB} MiB | {} MiB | {} |",
        fmt(peak_rss_mib, 1),
        bench::yes_no(peak_rss_mib.map(|v| v < TARGET_RSS_MIB))
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let o = FreshnessOptions::parse(&["--size-mib", "64", "--generations=2"]).unwrap();
        assert_eq!((o.size_mib, o.generations, o.peer_generations), (64, 2, 3));
        assert_eq!(o.engines, [Engine::Sqlite, Engine::Postgres]);
        assert!(!o.smoke);
        let o = FreshnessOptions::parse(&[]).unwrap();
        assert_eq!(
            o.sqlite_command(),
            "cargo xtask bench freshness --engines sqlite --size-mib 1024 --generations 10 --peer-generations 3"
        );
        assert_eq!(
            o.postgres_command(),
            "cargo xtask bench freshness --engines postgres --pg-size-mib 1024 --pg-generations 10 --peer-generations 3"
        );
        let o = FreshnessOptions::parse(&["--engines", "postgres", "--pg-size-mib=128"]).unwrap();
        assert_eq!(
            (o.engines.as_slice(), o.pg_size_mib, o.pg_generations),
            (&[Engine::Postgres][..], 128, 10)
        );
        let o = FreshnessOptions::parse(&["--engines=postgres,sqlite"]).unwrap();
        assert_eq!(o.engines, [Engine::Sqlite, Engine::Postgres]);
        assert!(FreshnessOptions::parse(&["--engines", "mysql"]).is_err());
        assert!(FreshnessOptions::parse(&["--fast"]).is_err());
        assert!(FreshnessOptions::parse(&["--smoke=1"]).is_err());
    }

    /// --smoke shrinks what was not given, wherever it stands among the flags.
    #[test]
    fn smoke_shrinks_what_was_not_given() {
        let o = FreshnessOptions::parse(&["--pg-generations", "3", "--smoke"]).unwrap();
        assert!(o.smoke);
        assert_eq!(
            (
                o.size_mib,
                o.generations,
                o.pg_size_mib,
                o.pg_generations,
                o.peer_generations
            ),
            (64, 2, 64, 3, 1)
        );
        let o = FreshnessOptions::parse(&["--smoke", "--pg-size-mib", "200"]).unwrap();
        assert_eq!((o.pg_size_mib, o.size_mib), (200, 64));
    }

    /// The report renders from samples (a p99 once panicked on its argument's scale).
    #[test]
    fn renders_the_report() {
        let options = FreshnessOptions::parse(&[]).unwrap();
        let sample = |to_digest_s| Sample {
            pages_changed: 10,
            ideal_bytes: 1000,
            registry_bytes: 900,
            to_digest_s,
            to_replica_s: Some(to_digest_s + 1.0),
        };
        let report = Report {
            options: &options,
            commit: "abc".into(),
            db_bytes: 1 << 30,
            first_push_bytes: 5 << 20,
            runs: vec![ScenarioRun {
                scenario: Scenario::Random,
                samples: (1..=10).map(|i| sample(f64::from(i))).collect(),
            }],
            peak_rss_mib: Some(50.0),
            peer: Some(vec![PeerSample {
                secs: 55.0,
                registry_bytes: 1 << 29,
            }]),
            docker: Some("20.10".into()),
        };
        let md = report.markdown();
        assert!(
            md.contains("| random | 5.50 / 10.00 | 6.50 / 11.00 | 10 |"),
            "{md}"
        );
        assert!(
            md.contains("| random: commit → digest < 5 s (p50) | 5.50 s | **no** |"),
            "{md}"
        );
        assert!(
            md.contains("| peak RSS < 100 MiB | 50.0 MiB | yes |"),
            "{md}"
        );
    }
}
