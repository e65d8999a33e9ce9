//! The PostgreSQL part of `cargo xtask bench freshness`: a live pgbench master of about
//! `--pg-size-mib` (a server of the base image's major version, as `bench delta`'s PostgreSQL
//! part starts one) followed by `bakedb watch --engine postgres` pushing to a local
//! docker-registry. One commit at a time updates 1 % of pgbench_accounts (scenario "random":
//! aids drawn uniformly; "range": one run of consecutive aids), and each commit is timed to
//! the registry's tag naming a new manifest and to a fresh replica (`docker pull` of that
//! digest, `docker run` of the image: bakedb-init composes and verifies, then postgres starts)
//! answering a changed account with its new balance.
//!
//! A 1 % random update changes about half of the cluster's pages (61 accounts a page), so the
//! chain rule (base and patches at most twice the data) lets one such patch onto a base and
//! then writes a fresh base: the generations alternate. Each generation's kind is read from
//! the pushed image (`bakedb inspect`'s chain) and reported.
//!
//! Autovacuum is off on the master: its ANALYZE after enough updates is a transaction of its
//! own, which watch would bake as a generation no commit of the bench made. The bench checks
//! that watch wrote exactly one generation per commit.
//!
//! The peer: what a team without bakedb does for the same change: `pg_basebackup` of the
//! master (the data directory), `docker build` (classic builder) FROM the same base image with
//! the data directory COPYed in, and `docker push`, timed from the commit to the push done.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bakedb_testkit::containers::DockerImage;
use bakedb_testkit::registry::{Registry, RegistryOptions};

use super::{
    FreshnessOptions, PeerSample, Shared, Watch, build_and_push, digest_target, load_average,
    rss_target, wait_for_tag,
};
use crate::bench::data::{Rng, SEED};
use crate::bench::layers::dir_bytes;
use crate::bench::pg::{self, Client, DB, Source};
use crate::bench::timing::percentile;
use crate::bench::tools::{docker_load, fresh_dir};
use crate::bench::{self, fmt, mb, median, run_quiet, times};
use crate::bench_delta::Scenario;
use crate::bench_delta::postgres::update_accounts;

/// The repository the generations are pushed to, and the peer's.
const REPO: &str = "bench/freshness-pg";
const PEER_REPO: &str = "bench/peer-pg";
/// The base image fixture in docker, for the peer's FROM.
const PEER_BASE: &str = "bakedb-bench-freshness-pgbase:latest";

/// One commit followed through.
struct Sample {
    scenario: Scenario,
    /// The image's generation, as image.json counts them (0 was the first, whole push).
    generation: usize,
    /// "patch" or "base", as the pushed image's chain says.
    kind: String,
    to_digest_s: f64,
    /// None when docker is not there.
    to_replica_s: Option<f64>,
    registry_bytes: u64,
}

/// The PostgreSQL part; its markdown.
pub(super) fn part(options: &FreshnessOptions, shared: &Shared<'_>) -> Result<String> {
    let load_before = load_average();
    let fixture = pg::fixture()?;
    let dir = shared.scratch.join("pg");
    fresh_dir(&dir)?;
    let scale = pg::scale(options.pg_size_mib);
    let mut source = Source::pgbench(&fixture.pg_bin, &dir.join("source"), scale)?;
    let result = measure(options, shared, &fixture, &source, scale, &dir, load_before);
    // Stopped also when the measurement failed: a server left running holds its port and dir.
    source.server.stop()?;
    let _ = fs::remove_dir_all(&dir);
    result
}

fn measure(
    options: &FreshnessOptions,
    shared: &Shared<'_>,
    fixture: &pg::Fixture,
    source: &Source,
    scale: u64,
    dir: &Path,
    load_before: String,
) -> Result<String> {
    source.psql("postgres", "ALTER SYSTEM SET autovacuum = off")?;
    source.psql("postgres", "SELECT pg_reload_conf()")?;
    let registry = Registry::start(RegistryOptions::default())
        .context("docker-registry is needed: apt-get install -y docker-registry")?;
    let repo = format!("{}/{REPO}", registry.host());
    let live = format!("docker://{repo}:live");
    let engine_args: Vec<OsString> = vec![
        "--engine".into(),
        "postgres".into(),
        "--source".into(),
        source.url().into(),
        "--pg-bin".into(),
        fixture.pg_bin.clone().into(),
        "--base".into(),
        fixture.base_ref.clone().into(),
    ];
    let mut watch = Watch::start(shared.bakedb, &engine_args, &live, dir)?;
    eprintln!("xtask: postgres: waiting for the first generation (the whole cluster)");
    let first_bytes_before = dir_bytes(&registry.storage());
    let mut digest = wait_for_tag(registry.addr(), REPO, None, &mut watch)?;
    watch.wait_for_generation(1)?;
    let first_push_bytes = dir_bytes(&registry.storage()) - first_bytes_before;

    let docker = shared.docker;
    let client = Client {
        bin: fixture.pg_bin.clone(),
    };
    let accounts = scale * 100_000;
    let mut rng = Rng(SEED ^ 0x00f4_e59d);
    let sql = dir.join("update.sql");
    let mut samples = Vec::new();
    // The replica node keeps the image it ran last, as a node of a rolling update does.
    let mut pulled: Option<DockerImage> = None;
    let mut generation = 0;
    for scenario in Scenario::ALL {
        for i in 1..=options.pg_generations {
            generation += 1;
            let (_, probe) =
                update_accounts(source, scenario, accounts, generation, &mut rng, &sql)?;
            let committed = Instant::now();
            let bytes_before = dir_bytes(&registry.storage());
            let expected = source.psql(
                DB,
                &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {probe}"),
            )?;
            digest = wait_for_tag(registry.addr(), REPO, Some(&digest), &mut watch)?;
            let to_digest_s = committed.elapsed().as_secs_f64();
            watch.wait_for_generation(generation + 1)?;
            let image = format!("{repo}@{digest}");
            let to_replica_s = match &shared.docker_version {
                Some(_) => {
                    let secs = replica_answers(
                        docker, &client, &image, scale, probe, &expected, committed,
                    )?;
                    let now = DockerImage {
                        docker: docker.to_owned(),
                        name: image.clone(),
                    };
                    // Dropping the one before removes its name; layers the new one shares stay.
                    drop(pulled.replace(now));
                    Some(secs)
                }
                None => None,
            };
            let registry_bytes = dir_bytes(&registry.storage()) - bytes_before;
            let kind = chain_kind(&run_quiet(
                Command::new(shared.bakedb)
                    .args(["inspect", "--tls-verify=false"])
                    .arg(format!("docker://{image}")),
            )?)
            .with_context(|| format!("{image}: bakedb inspect shows no chain"))?;
            eprintln!(
                "xtask: postgres, {} {i}/{}: generation {generation} ({kind}): digest pullable {to_digest_s:.2} s after the commit, replica answering {}, {} MB stored",
                scenario.name(),
                options.pg_generations,
                to_replica_s.map_or("—".into(), |s| format!("{s:.2} s")),
                mb(registry_bytes),
            );
            samples.push(Sample {
                scenario,
                generation,
                kind: kind.to_owned(),
                to_digest_s,
                to_replica_s,
                registry_bytes,
            });
        }
    }
    drop(pulled);
    let peak_rss_mib = watch.peak_rss_kib().map(|k| k as f64 / 1024.0);
    watch.stop()?;

    let peer = match &shared.docker_version {
        Some(_) => Some(peer(
            docker,
            fixture,
            source,
            &format!("{}/{PEER_REPO}", registry.host()),
            &registry,
            options,
            accounts,
            &mut rng,
            dir,
        )?),
        None => None,
    };
    let report = Report {
        options,
        commit: shared.commit.to_owned(),
        pg_version: fixture.pg_version.clone(),
        scale,
        db_bytes: source.db_bytes,
        tables: source.tables.clone(),
        first_push_bytes,
        samples,
        peak_rss_mib,
        peer,
        docker: shared.docker_version.clone(),
        load: (load_before, load_average()),
    };
    Ok(report.markdown())
}

/// "patch" or "base": what the last link of the chain `bakedb inspect` shows is, from its
/// line "Chain:       generation N, K patch generation(s) on its base".
fn chain_kind(inspect: &str) -> Option<&'static str> {
    let line = inspect.lines().find(|l| l.starts_with("Chain:"))?;
    let patches: u64 = line
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(if patches == 0 { "base" } else { "patch" })
}

/// `docker pull` the image and run it until account `aid` answers with `expected` as its
/// balance: seconds since `since`.
fn replica_answers(
    docker: &Path,
    client: &Client,
    image: &str,
    scale: u64,
    aid: u64,
    expected: &str,
    since: Instant,
) -> Result<f64> {
    run_quiet(Command::new(docker).args(["pull", "--quiet", image]))?;
    let started = pg::start(docker, client, image, &[], &scale.to_string())?;
    let answer = run_quiet(client.cmd("psql", started.port).args([
        "-X",
        "-A",
        "-t",
        "-c",
        &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"),
    ]))?;
    let secs = since.elapsed().as_secs_f64();
    if answer.trim() != expected {
        bail!(
            "the replica of {image} answered account {aid}'s balance with {:?}, the master with {expected:?}",
            answer.trim()
        );
    }
    Ok(secs)
}

/// pg_basebackup + docker build + docker push of the same kind of change (1 % of the accounts
/// at random), `options.peer_generations` times after a first round of the whole cluster.
#[allow(clippy::too_many_arguments)]
fn peer(
    docker: &Path,
    fixture: &pg::Fixture,
    source: &Source,
    repo: &str,
    registry: &Registry,
    options: &FreshnessOptions,
    accounts: u64,
    rng: &mut Rng,
    dir: &Path,
) -> Result<Vec<PeerSample>> {
    eprintln!("xtask: postgres peer: the base image fixture into docker as {PEER_BASE}");
    let archive = dir.join("base.tar");
    run_quiet(
        Command::new("skopeo")
            .args(["copy", "--quiet", &fixture.base_ref])
            .arg(format!("docker-archive:{}:{PEER_BASE}", archive.display())),
    )?;
    let _base = docker_load(docker, &archive, PEER_BASE)?;
    let _ = fs::remove_file(&archive);
    let context = dir.join("peer");
    fresh_dir(&context)?;
    // The base image's PGDATA is a VOLUME; the data goes beside it and PGDATA points there.
    fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {PEER_BASE}\nENV PGDATA=/var/lib/postgresql/pgdata\nCOPY --chown=postgres:postgres pgdata /var/lib/postgresql/pgdata\n"
        ),
    )?;
    let sql = dir.join("peer-update.sql");
    let mut samples = Vec::new();
    // Past the bench's own generations, so every balance the peer adds is new.
    let first = 2 * options.pg_generations + 1;
    for g in 0..=options.peer_generations {
        if g > 0 {
            update_accounts(source, Scenario::Random, accounts, first + g, rng, &sql)?;
        }
        let started = Instant::now();
        let pgdata = context.join("pgdata");
        let _ = fs::remove_dir_all(&pgdata);
        run_quiet(
            source
                .server
                .client("pg_basebackup")
                .args(["--checkpoint=fast", "--wal-method=fetch", "--no-sync", "-D"])
                .arg(&pgdata),
        )?;
        let sample = build_and_push(docker, &context, &format!("{repo}:g{g}"), registry, started)?;
        // Generation 0 pushes the base image's layers and the whole cluster, as bakedb's first.
        if g > 0 {
            samples.push(sample);
        }
    }
    Ok(samples)
}

struct Report<'a> {
    options: &'a FreshnessOptions,
    commit: String,
    pg_version: String,
    scale: u64,
    db_bytes: u64,
    tables: String,
    first_push_bytes: u64,
    samples: Vec<Sample>,
    peak_rss_mib: Option<f64>,
    peer: Option<Vec<PeerSample>>,
    docker: Option<String>,
    /// Load averages when the part started and when it ended.
    load: (String, String),
}

impl Report<'_> {
    fn of<'s>(
        &'s self,
        scenario: Scenario,
        kind: Option<&'s str>,
    ) -> impl Iterator<Item = &'s Sample> + 's {
        self.samples
            .iter()
            .filter(move |s| s.scenario == scenario && kind.is_none_or(|k| s.kind == k))
    }

    fn markdown(&self) -> String {
        let mut md = bench::report::part_start(&self.commit, &self.options.postgres_command());
        let smoke = if self.options.pg_size_mib < 1024 || self.options.pg_generations < 10 {
            " **A smoke run: smaller than the issue's 1 GiB and 10 generations per scenario.**"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "### PostgreSQL\n\nA live pgbench master ({}, scale {}: database {} MB; {}), autovacuum off, followed by `bakedb watch --engine postgres --source postgresql://… --base oci:target/fixtures/postgres:latest --output docker://127.0.0.1:PORT/{REPO}:live --tls-verify=false --poll 50ms` (gzip, a local docker-registry). One commit at a time adds to the balance of 1 % of pgbench_accounts ({} per scenario); each is timed from the end of its commit to the registry's `live` tag naming the new manifest, and to a fresh replica (`docker pull` of that digest, `docker run`: bakedb-init composes the patches and verifies, postgres starts) answering a changed account with its new balance. The first generation pushed the whole image: {} MB. Docker: {}. Load average (1, 5, 15 min) {} at the start, {} at the end.{smoke}\n",
            self.pg_version,
            self.scale,
            mb(self.db_bytes),
            self.tables,
            self.options.pg_generations,
            mb(self.first_push_bytes),
            self.docker.as_deref().unwrap_or("not available"),
            self.load.0,
            self.load.1,
        );
        let _ = writeln!(
            md,
            "| scenario | generations | commit → digest pullable, p50 / p99 s | commit → replica answering, p50 / p99 s | registry MB per generation, median |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for scenario in Scenario::ALL {
            for (label, kind) in [
                ("all", None),
                ("patches", Some("patch")),
                ("fresh bases", Some("base")),
            ] {
                let of: Vec<&Sample> = self.of(scenario, kind).collect();
                if of.is_empty() {
                    continue;
                }
                let digest = || of.iter().map(|s| s.to_digest_s);
                let replica = || of.iter().filter_map(|s| s.to_replica_s);
                let _ = writeln!(
                    md,
                    "| {}: {label} | {} | {} / {} | {} / {} | {} |",
                    scenario.name(),
                    of.len(),
                    fmt(median(digest()), 2),
                    fmt(percentile(digest(), 0.99), 2),
                    fmt(median(replica()), 2),
                    fmt(percentile(replica(), 0.99), 2),
                    fmt(median(of.iter().map(|s| s.registry_bytes as f64 / 1e6)), 1),
                );
            }
        }
        let _ = writeln!(
            md,
            "\nEach generation (the image's number, as image.json counts them; 0 was the first, whole push):\n\n| scenario | generation | kind | commit → digest s | commit → replica s | registry MB |\n|---|---:|---|---:|---:|---:|"
        );
        for s in &self.samples {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} | {} | {} |",
                s.scenario.name(),
                s.generation,
                s.kind,
                s.to_digest_s,
                fmt(s.to_replica_s, 2),
                mb(s.registry_bytes),
            );
        }
        match &self.peer {
            Some(peer) => {
                let secs = median(peer.iter().map(|p| p.secs));
                let bytes = median(peer.iter().map(|p| p.registry_bytes as f64 / 1e6));
                let _ = writeln!(
                    md,
                    "\nThe peer, `pg_basebackup` + `docker build` (FROM the same base image, COPY the data directory, classic builder) + `docker push` of the same kind of change (1 % of the accounts at random), {} times: {} s from the commit to the push done (median), {} MB stored per generation. bakedb's random-scenario digest was pullable {} sooner (median of all its generations, patches and fresh bases).\n",
                    peer.len(),
                    fmt(secs, 2),
                    fmt(bytes, 1),
                    times(
                        bench::ratio(
                            secs,
                            median(self.of(Scenario::Random, None).map(|s| s.to_digest_s))
                        ),
                        1
                    )
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "\nNo Docker daemon: no replicas and no docker build + push peer.\n"
                );
            }
        }
        let _ = writeln!(
            md,
            "bakedb watch's peak RSS over the whole run (VmHWM of its process: builds and pushes run in it; pg_basebackup and the scratch server it starts are processes of their own, not counted): {} MiB.\n",
            fmt(self.peak_rss_mib, 1)
        );
        let _ = writeln!(
            md,
            "#### Targets\n\nThe issue sets them for SQLite; here they are for reference.\n\n| target | measured | met |\n|---|---|---|"
        );
        for scenario in Scenario::ALL {
            digest_target(
                &mut md,
                scenario,
                median(self.of(scenario, None).map(|s| s.to_digest_s)),
            );
        }
        rss_target(&mut md, self.peak_rss_mib);
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kind_of_the_chains_last_link() {
        let base = "Data:        engine postgres, profile postgres\nChain:       generation 2, 0 patch generation(s) on its base\n     2 sha256:ab     512 MiB base: 1400 files\n";
        assert_eq!(chain_kind(base), Some("base"));
        let patch = "Chain:       generation 3, 1 patch generation(s) on its base\n";
        assert_eq!(chain_kind(patch), Some("patch"));
        assert_eq!(chain_kind("Data:        no /etc/bakedb/image.json"), None);
    }

    #[test]
    fn renders_the_report() {
        let options = FreshnessOptions::parse(&[]).unwrap();
        let sample = |scenario, generation: usize, kind: &str| Sample {
            scenario,
            generation,
            kind: kind.into(),
            to_digest_s: generation as f64,
            to_replica_s: Some(generation as f64 + 10.0),
            registry_bytes: if kind == "base" {
                400_000_000
            } else {
                8_000_000
            },
        };
        let mut samples = Vec::new();
        for g in 1..=4 {
            let kind = if g % 2 == 1 { "patch" } else { "base" };
            samples.push(sample(Scenario::Random, g, kind));
        }
        samples.push(sample(Scenario::Range, 5, "patch"));
        let report = Report {
            options: &options,
            commit: "abc".into(),
            pg_version: "postgres (PostgreSQL) 15.14".into(),
            scale: 69,
            db_bytes: 1 << 30,
            tables: "pgbench_accounts 1082 MB".into(),
            first_push_bytes: 300_000_000,
            samples,
            peak_rss_mib: Some(60.0),
            peer: Some(vec![PeerSample {
                secs: 50.0,
                registry_bytes: 400_000_000,
            }]),
            docker: Some("20.10".into()),
            load: ("0.10, 0.20, 0.30".into(), "1.00, 0.90, 0.80".into()),
        };
        let md = report.markdown();
        for line in [
            "| random: all | 4 | 2.50 / 4.00 | 12.50 / 14.00 | 204.0 |",
            "| random: patches | 2 | 2.00 / 3.00 | 12.00 / 13.00 | 8.0 |",
            "| random: fresh bases | 2 | 3.00 / 4.00 | 13.00 / 14.00 | 400.0 |",
            "| range: all | 1 | 5.00 / 5.00 | 15.00 / 15.00 | 8.0 |",
            "| random | 2 | base | 2.00 | 12.00 | 400.0 |",
            "| random: commit → digest < 5 s (p50) | 2.50 s | yes |",
            "| range: commit → digest < 2 s (p50) | 5.00 s | **no** |",
            "| peak RSS < 100 MiB | 60.0 MiB | yes |",
        ] {
            assert!(md.lines().any(|l| l == line), "{line:?} not in\n{md}");
        }
        assert!(!md.contains("fresh bases | 0"), "{md}");
        assert!(md.contains("pullable 20.0× sooner"), "{md}");
        assert!(md.contains("0.10, 0.20, 0.30 at the start"), "{md}");
        assert!(!md.contains("smoke"), "{md}");
    }
}
