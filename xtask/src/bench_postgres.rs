//! `cargo xtask bench postgres`: a baked PostgreSQL image against the usual alternatives, on
//! the same pgbench database.
//!
//! The source: a PostgreSQL server of the base image's major version started under
//! target/bench/postgres/run/source (as the `postgres` user when this runs as root), `pgbench
//! -i` at the scale that makes the database about `--size-mib`, a login role `bench` with a
//! password and SELECT on the pgbench tables. It serves the builds, a `pg_dump -Fc` and a
//! `bakedb snapshot`, and is stopped (also on an error) before anything is timed in docker.
//!
//! Three ways to serve that data, all on the base image fixture (target/fixtures/postgres,
//! Debian's PostgreSQL), all with host networking on a free port of 127.0.0.1:
//! - baked: `bakedb build --engine postgres --source postgresql://…` into a docker-archive,
//!   `docker load`; bakedb-init verifies the data and execs postgres with the read-only profile;
//! - restore at start: `docker build` (classic builder) FROM the base image with the dump and
//!   an entrypoint that does what the official image's /docker-entrypoint-initdb.d does on an
//!   empty volume: initdb, a socket-only server, `pg_restore -j 2`, stop, exec postgres;
//! - volume: the base image, untuned (fsync on, autovacuum on...), on a bind-mounted host copy
//!   of the same data (the `bakedb snapshot`, the data directory the image holds).
//!
//! Measured: build times and sizes; `docker run` to the first answered query (baked with and
//! without verification, cold and warm page cache; restore at start cold and warm); `pgbench
//! -S` TPS of the baked image and of the volume; the bytes overlayfs copied up into the baked
//! container's writable layer. The result is printed and written between markers in
//! docs/benchmarks.md.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use bakedb_testkit::containers::{Container, DockerImage};
use bakedb_testkit::dirs::files_under;

use crate::bench::pg::{
    self, BAKED_MARKS, Client, DB, FIRST_QUERY, IMAGE_PGDATA, Mark, PASSWORD, POLL, ROLE, Started,
    marks, run_container, start, stop, strip_timestamp,
};
use crate::bench::timing::{
    cold_cache, drop_caches, nproc, sync, until_quiet, wait_until_quiet, warm,
};
use crate::bench::tools::{
    build_layers, commit_measured, docker_bin, docker_load, docker_version, fresh_dir, image_size,
    release_bakedb, skopeo_version, target_dir,
};
use crate::bench::{
    self, Cache, Timer, fmt, fmt_pct, fmt_range, mb, median, range, ratio, run_quiet, times, yes_no,
};
use crate::project_root;

const BAKED_IMAGE: &str = "bakedb-bench-pg";
const RESTORE_IMAGE: &str = "bakedb-bench-pgrestore";
const BASE_IMAGE: &str = "bakedb-bench-pgbase:latest";
/// The base image's PGDATA (a VOLUME).
const BASE_PGDATA: &str = "/var/lib/postgresql/data";
/// The official image's postgres user.
const IMAGE_UID: u32 = 999;
/// The settings of bakedb's read-only profile that change how PostgreSQL works (the profile
/// in crates/engines/src/postgres.rs), for the cases that cross tuning and storage.
const TUNING: [&str; 5] = [
    "default_transaction_read_only=on",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "autovacuum=off",
];

const PGBENCH_THREADS: usize = 2;
/// Server and pgbench keep every core busy: another process's share comes straight off the
/// TPS, so a run is taken again above a smaller share than the harness's NOISY.
const NOISY: f64 = 0.05;
const WARMUP_S: u64 = 5;

/// The issue's target: the baked image answers at least this many times sooner than a restore
/// at start.
const TARGET_RESTORE_RATIO: f64 = 20.0;

pub struct PostgresOptions {
    pub size_mib: u64,
    pub runs: usize,
    pub duration_s: u64,
    pub clients: usize,
}

impl PostgresOptions {
    pub fn parse(flags: &[&str]) -> Result<Self> {
        let mut options = PostgresOptions {
            size_mib: 1024,
            runs: 1,
            duration_s: 30,
            clients: 8,
        };
        bench::flags::parse(
            "bench postgres",
            "--size-mib N, --runs N, --duration-s N, --clients N",
            flags,
            |name, value| {
                match name {
                    "--size-mib" => options.size_mib = value.positive("database size in MiB")?,
                    "--runs" => options.runs = value.count("builds, starts and pgbench rounds")?,
                    "--duration-s" => {
                        options.duration_s = value.positive("seconds of each pgbench run")?
                    }
                    "--clients" => options.clients = value.count("pgbench clients")?,
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        if options.clients < PGBENCH_THREADS {
            bail!("--clients must be at least {PGBENCH_THREADS} (one per pgbench thread)");
        }
        Ok(options)
    }

    fn command(&self) -> String {
        format!(
            "cargo xtask bench postgres --size-mib {} --runs {} --duration-s {} --clients {}",
            self.size_mib, self.runs, self.duration_s, self.clients
        )
    }

    /// The pgbench scale whose database is about `size_mib`.
    fn scale(&self) -> u64 {
        pg::scale(self.size_mib)
    }
}

pub fn postgres(options: &PostgresOptions) -> Result<()> {
    let root = project_root();
    let target = target_dir(&root);
    let pg_dir = target.join("bench/postgres");
    let scratch = pg_dir.join("run");
    fresh_dir(&scratch)?;

    let docker = docker_bin();
    let docker_version =
        docker_version(&docker).context("this benchmark runs containers: is dockerd running?")?;
    let skopeo = skopeo_version()?;
    let cold_unavailable = cold_cache().err();

    let fixture = pg::fixture()?;
    let base_ref = fixture.base_ref.clone();
    let base_layers = fixture.layers.clone();
    let pg_bin = fixture.pg_bin.clone();
    let client = Client {
        bin: pg_bin.clone(),
    };

    let bakedb = release_bakedb(&root, &scratch)?;
    let commit = commit_measured(&root);

    // 1. The source, and everything taken from it.
    let scale = options.scale();
    let mut data = DataPart {
        scale,
        pg_version: fixture.pg_version.clone(),
        base_version: fixture.base_version.clone(),
        ..DataPart::default()
    };
    let restore_ctx = scratch.join("restore");
    fs::create_dir_all(&restore_ctx)?;
    let dump = restore_ctx.join("bench.dump");
    let snapshot_dir = scratch.join("volume");
    let baked_archive = scratch.join("baked.tar");
    let baked_name = format!("{BAKED_IMAGE}:{}mib", options.size_mib);
    let lazy_archive = scratch.join("lazy.tar");
    let lazy_name = format!("{BAKED_IMAGE}:{}mib-lazy-copyup", options.size_mib);
    let mut build = BuildPart::default();
    {
        let mut source = pg::Source::pgbench(&pg_bin, &scratch.join("source"), scale)?;
        data.init_secs = source.init_secs;
        data.db_bytes = source.db_bytes;
        data.tables = source.tables.clone();
        // To name the files that get copied up.
        data.relations = source
            .psql(
                DB,
                "SELECT pg_relation_filepath(oid) || ' ' || relname FROM pg_class \
                 WHERE pg_relation_filepath(oid) IS NOT NULL",
            )?
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(path, name)| (path.to_owned(), name.to_owned()))
            .collect();
        let url = source.url();

        eprintln!("xtask: pg_dump -Fc");
        let started = Instant::now();
        run_quiet(
            source
                .server
                .client("pg_dump")
                .args(["-Fc", "-f"])
                .arg(&dump)
                .arg(DB),
        )?;
        data.dump_secs = started.elapsed().as_secs_f64();
        data.dump_bytes = fs::metadata(&dump)?.len();

        let build_image =
            |lazy: bool, archive: &Path, name: &str| -> Result<(f64, String, String)> {
                let _ = fs::remove_file(archive);
                sync();
                wait_until_quiet();
                let mut cmd = Command::new(&bakedb);
                cmd.args(["build", "--json", "--engine", "postgres", "--source", &url])
                    .arg("--pg-bin")
                    .arg(&pg_bin)
                    .args(["--base", &base_ref, "--output"])
                    .arg(format!("docker-archive:{}:{name}", archive.display()))
                    .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH)
                    .env("CI", "true")
                    .stdin(Stdio::null());
                if lazy {
                    cmd.arg("--pg-lazy-copyup");
                }
                let started = Instant::now();
                let out = cmd.output().context("running bakedb build")?;
                let secs = started.elapsed().as_secs_f64();
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                if !out.status.success() {
                    bail!("bakedb build failed ({}):\n{stderr}", out.status);
                }
                eprintln!("xtask:   {secs:.2} s");
                Ok((secs, stdout, stderr))
            };
        for run in 1..=options.runs {
            eprintln!(
                "xtask: build {run}/{}: bakedb build --engine postgres",
                options.runs
            );
            let (secs, stdout, stderr) = build_image(false, &baked_archive, &baked_name)?;
            build.secs.push(secs);
            build.layers = build_layers(&stdout);
            build.lines = stderr
                .lines()
                .filter_map(|l| l.strip_prefix("bakedb: "))
                .map(str::to_owned)
                .collect();
            eprintln!(
                "xtask: build {run}/{}: bakedb build --engine postgres --pg-lazy-copyup",
                options.runs
            );
            let (secs, stdout, _) = build_image(true, &lazy_archive, &lazy_name)?;
            build.lazy_secs.push(secs);
            build.lazy_layers = build_layers(&stdout);
        }
        build.archive_bytes = fs::metadata(&baked_archive)?.len();

        eprintln!("xtask: bakedb snapshot (the volume's data)");
        run_quiet(
            Command::new(&bakedb)
                .args([
                    "snapshot", "--quiet", "--engine", "postgres", "--source", &url,
                ])
                .arg("--pg-bin")
                .arg(&pg_bin)
                .arg("--out")
                .arg(&snapshot_dir)
                .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH),
        )?;
        source.server.stop()?;
    }
    let volume = prepare_volume(&snapshot_dir.join("pgdata"))?;

    // 2. The images, in docker.
    let base_archive = scratch.join("base.tar");
    eprintln!("xtask: skopeo copy {base_ref} to docker as {BASE_IMAGE}");
    run_quiet(
        Command::new("skopeo")
            .args(["copy", "--quiet", &base_ref])
            .arg(format!(
                "docker-archive:{}:{BASE_IMAGE}",
                base_archive.display()
            )),
    )?;
    let _base_image = docker_load(&docker, &base_archive, BASE_IMAGE)?;
    let _ = fs::remove_file(&base_archive);

    eprintln!("xtask: docker load {baked_name}");
    let started = Instant::now();
    let _baked_image = docker_load(&docker, &baked_archive, &baked_name)?;
    build.load_secs = started.elapsed().as_secs_f64();
    let _ = fs::remove_file(&baked_archive);
    build.docker_size = image_size(&docker, &baked_name);
    eprintln!("xtask: docker load {lazy_name}");
    let _lazy_image = docker_load(&docker, &lazy_archive, &lazy_name)?;
    let _ = fs::remove_file(&lazy_archive);

    let restore_name = format!("{RESTORE_IMAGE}:{}mib", options.size_mib);
    write_restore_context(&restore_ctx)?;
    let mut restore = RestorePart::default();
    for run in 1..=options.runs {
        eprintln!(
            "xtask: build {run}/{}: docker build (restore at start)",
            options.runs
        );
        sync();
        wait_until_quiet();
        let started = Instant::now();
        run_quiet(
            Command::new(&docker)
                .args(["build", "--no-cache", "--force-rm", "-t", &restore_name])
                .arg(&restore_ctx)
                .env("DOCKER_BUILDKIT", "0"),
        )?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!("xtask:   {secs:.2} s");
        restore.build_secs.push(secs);
    }
    let _restore_image = DockerImage {
        docker: docker.clone(),
        name: restore_name.clone(),
    };
    restore.docker_size = image_size(&docker, &restore_name);

    // 3 and 4. From `docker run` to the first answer.
    let expected = scale.to_string();
    let mut starts = Vec::new();
    for run in 1..=options.runs {
        for cache in Cache::BOTH {
            if cache == Cache::Cold && cold_unavailable.is_some() {
                continue;
            }
            for kind in [
                StartKind::Baked { verify: true },
                StartKind::Baked { verify: false },
                StartKind::Restore,
            ] {
                let image = match kind {
                    StartKind::Restore => restore_name.as_str(),
                    StartKind::Baked { .. } => baked_name.as_str(),
                };
                match (cache, kind) {
                    (Cache::Cold, _) => {
                        drop_caches().map_err(|e| anyhow!("dropping the page cache: {e}"))?
                    }
                    // An untimed start with verification reads every byte of the data.
                    (Cache::Warm, StartKind::Baked { .. }) => {
                        let primed = start(&docker, &client, image, &[], &expected)?;
                        drop(primed);
                    }
                    // The cold restore just read the whole dump, and the image is small.
                    (Cache::Warm, StartKind::Restore) => {}
                }
                // Dirty pages of the previous case (a restore writes a whole cluster) are
                // written back before, not during, the timed start.
                sync();
                wait_until_quiet();
                let env: &[&str] = match kind {
                    StartKind::Baked { verify: false } => &["BAKEDB_VERIFY=off"],
                    _ => &[],
                };
                let started = start(&docker, &client, image, env, &expected)?;
                let logs = started.logs();
                eprintln!(
                    "xtask: start {run}/{}: {}, {} cache: first answer after {:.3} s (`docker run -d` returned after {})",
                    options.runs,
                    kind.label(),
                    cache.name(),
                    started.secs,
                    started.returned.map_or("?".into(), |s| format!("{s:.3} s"))
                );
                starts.push(StartSample {
                    kind,
                    cache,
                    secs: started.secs,
                    returned: started.returned,
                    marks: marks(&logs, started.spawned_tod, kind.marks()),
                    init_line: logs
                        .lines()
                        .filter_map(strip_timestamp)
                        .find(|l| l.starts_with("bakedb-init: verified"))
                        .map(str::to_owned),
                });
            }
        }
    }

    // 5 and 6. pgbench -S on the baked image and on the volume; the copy-up.
    let timer = Timer::new(scratch.join("time.out"));
    let mut rounds = Vec::new();
    for round in 1..=options.runs {
        let mut pgbench = Vec::new();
        let mut copy_ups = Vec::new();
        let mut fresh_secs = None;
        let mut lazy_first_secs = None;
        for server in Server::ALL {
            eprintln!(
                "xtask: round {round}/{}: pgbench -S, {}",
                options.runs,
                server.label()
            );
            if matches!(server, Server::VolumeTuned | Server::VolumeDefaults) {
                volume.warm()?;
            }
            if server == Server::BakedLazy {
                // Docker keeps a layer per chain of parents: this image's data layer sits on
                // the shim's layer, so it is a second copy on disk, in the page cache only once
                // a start has verified (read) it.
                drop(start(&docker, &client, &lazy_name, &[], &expected)?);
            }
            sync();
            let started = match server {
                Server::Baked => start(&docker, &client, &baked_name, &[], &expected)?,
                Server::BakedLazy => start(&docker, &client, &lazy_name, &[], &expected)?,
                Server::LayersDefaults => {
                    start_layers_defaults(&docker, &client, &baked_name, &expected)?
                }
                Server::VolumeTuned => start_volume(&docker, &client, &volume, true, &expected)?,
                Server::VolumeDefaults => {
                    start_volume(&docker, &client, &volume, false, &expected)?
                }
            };
            if matches!(server, Server::Baked | Server::BakedLazy) {
                check_profile(&started.logs(), server == Server::BakedLazy)?;
            }
            if server == Server::BakedLazy {
                copy_ups.push((
                    CopyCase::LazyFirst,
                    copy_up(&docker, &started.container.name)?,
                ));
                lazy_first_secs = Some(started.secs);
            }
            let result = workload(&started.container, &client, started.port, options, &timer)?;
            pgbench.push((server, result));
            match server {
                Server::Baked => {
                    copy_ups.push((
                        CopyCase::BakedWorkload,
                        copy_up(&docker, &started.container.name)?,
                    ));
                    // A second replica, started beside the first, copies up for itself.
                    eprintln!("xtask:   a fresh replica beside it");
                    sync();
                    wait_until_quiet();
                    let fresh = start(&docker, &client, &baked_name, &[], &expected)?;
                    copy_ups.push((
                        CopyCase::BakedFirst,
                        copy_up(&docker, &fresh.container.name)?,
                    ));
                    eprintln!("xtask:   first answer after {:.3} s", fresh.secs);
                    fresh_secs = Some(fresh.secs);
                }
                Server::BakedLazy => copy_ups.push((
                    CopyCase::LazyWorkload,
                    copy_up(&docker, &started.container.name)?,
                )),
                _ => {}
            }
            stop(&started.container)?;
            match server {
                Server::Baked => copy_ups.push((
                    CopyCase::BakedStop,
                    copy_up(&docker, &started.container.name)?,
                )),
                Server::BakedLazy => copy_ups.push((
                    CopyCase::LazyStop,
                    copy_up(&docker, &started.container.name)?,
                )),
                _ => {}
            }
            drop(started);
        }
        rounds.push(Round {
            pgbench,
            copy_ups,
            fresh_secs,
            lazy_first_secs,
        });
    }

    let report = Report {
        options,
        commit,
        docker: docker_version,
        skopeo,
        cold_unavailable,
        data: &data,
        build: &build,
        base_layers: &base_layers,
        restore: &restore,
        starts: &starts,
        rounds: &rounds,
    };
    bench::report::publish(&root, "postgres", report.markdown(), &scratch)
}

// ---------------------------------------------------------------------------------------------
// Docker.

/// The cross-over cases copy the profile's settings: they must be what init applies. A lazy
/// copy-up image must preload the shim.
fn check_profile(logs: &str, lazy: bool) -> Result<()> {
    let profile = logs
        .lines()
        .filter_map(strip_timestamp)
        .find(|l| l.starts_with("bakedb-init: profile"))
        .ok_or_else(|| anyhow!("the baked container logged no profile line:\n{logs}"))?;
    for setting in TUNING {
        if !profile.contains(&format!("-c {setting}")) {
            bail!("bakedb-init no longer applies `{setting}` (TUNING is out of date): {profile}");
        }
    }
    if lazy != profile.contains("copyup.so") {
        bail!(
            "the image built {} --pg-lazy-copyup {} the copy-up shim: {profile}",
            if lazy { "with" } else { "without" },
            if lazy { "does not preload" } else { "preloads" }
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The restore at start.

/// The official image's /docker-entrypoint-initdb.d path on an empty volume, as one script:
/// initdb (synced, as the official image does), the role and the database, a server on the
/// socket only, `pg_restore -j 2`, a fast stop, then postgres listening on all addresses.
/// Each step echoes a marker, so `docker logs -t` tells where the time went.
const RESTORE_SCRIPT: &str = r#"#!/bin/sh
# Restore at start: what the official postgres image's entrypoint does on an empty volume
# with /docker-entrypoint-initdb.d holding a dump (here /restore/bench.dump).
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "restore: initdb"
    initdb -D "$PGDATA" --username=postgres --auth-local=trust --auth-host=scram-sha-256
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "restore: start"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p ${PGPORT:-5432}" -w start
    echo "restore: roles"
    psql -X -q -v ON_ERROR_STOP=1 -U postgres -d postgres -f /restore/roles.sql
    echo "restore: pg_restore"
    pg_restore -j 2 -U postgres -d bench /restore/bench.dump
    echo "restore: stop"
    pg_ctl -D "$PGDATA" -m fast -w stop
fi
echo "restore: exec postgres"
exec "$@"
"#;

fn write_restore_context(dir: &Path) -> Result<()> {
    fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {BASE_IMAGE}\n\
             COPY --chown={IMAGE_UID}:{IMAGE_UID} bench.dump roles.sql /restore/\n\
             COPY --chown={IMAGE_UID}:{IMAGE_UID} restore.sh /usr/local/bin/restore.sh\n\
             USER {IMAGE_UID}:{IMAGE_UID}\n\
             ENTRYPOINT [\"/bin/sh\", \"/usr/local/bin/restore.sh\"]\n\
             CMD [\"postgres\"]\n"
        ),
    )?;
    fs::write(
        dir.join("roles.sql"),
        format!(
            "CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';\nCREATE DATABASE {DB};\n\
             GRANT CONNECT ON DATABASE {DB} TO {ROLE};\n"
        ),
    )?;
    fs::write(dir.join("restore.sh"), RESTORE_SCRIPT)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The volume.

/// The snapshot's data directory, owned by the image's postgres user, with a default
/// postgresql.conf that listens on every address and a pg_hba.conf that wants passwords over
/// TCP: what a user mounts into the official image.
struct Volume {
    dir: PathBuf,
}

fn prepare_volume(pgdata: &Path) -> Result<Volume> {
    let conf = pgdata.join("postgresql.conf");
    let mut text =
        fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    if text
        .lines()
        .any(|l| l.trim_start().starts_with("listen_addresses"))
    {
        bail!(
            "{} already sets listen_addresses: expected initdb's default file",
            conf.display()
        );
    }
    text.push_str("\n# bakedb bench: the volume case\nlisten_addresses = '*'\n");
    fs::write(&conf, text)?;
    fs::write(
        pgdata.join("pg_hba.conf"),
        "local all all trust\nhost all all all scram-sha-256\n",
    )?;
    run_quiet(
        Command::new("chown")
            .args(["-R", &format!("{IMAGE_UID}:{IMAGE_UID}")])
            .arg(pgdata),
    )?;
    fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700))?;
    Ok(Volume {
        dir: pgdata.to_owned(),
    })
}

impl Volume {
    /// Read every file once, as verification does for the baked image.
    fn warm(&self) -> Result<()> {
        for (path, _) in files_under(&self.dir) {
            warm(&path)?;
        }
        Ok(())
    }
}

/// The base image on the volume: its own command (`postgres`, PGDATA from its Env), with the
/// read-only profile's settings added when `tuned`.
fn start_volume(
    docker: &Path,
    client: &Client,
    volume: &Volume,
    tuned: bool,
    expected: &str,
) -> Result<Started> {
    let extra = vec![
        "--user".to_owned(),
        format!("{IMAGE_UID}:{IMAGE_UID}"),
        "-v".to_owned(),
        format!("{}:{BASE_PGDATA}", volume.dir.display()),
    ];
    let mut args = Vec::new();
    if tuned {
        args.push("postgres".to_owned());
        for setting in TUNING {
            args.push("-c".to_owned());
            args.push(setting.to_owned());
        }
    }
    run_container(docker, client, BASE_IMAGE, &[], &extra, &args, expected)
}

/// The baked image with bakedb-init and its profile left out: `postgres -D` on the data in
/// the image's layers, with the data directory's own postgresql.conf and pg_hba.conf (the
/// source's: defaults, trust on 127.0.0.1) and every address to listen on.
fn start_layers_defaults(
    docker: &Path,
    client: &Client,
    image: &str,
    expected: &str,
) -> Result<Started> {
    let extra = [
        "--user",
        &format!("{IMAGE_UID}:{IMAGE_UID}"),
        "--entrypoint",
        "postgres",
    ]
    .map(str::to_owned);
    let args = [
        "-D",
        &format!("/{IMAGE_PGDATA}"),
        "-c",
        "listen_addresses=*",
    ]
    .map(str::to_owned);
    run_container(docker, client, image, &[], &extra, &args, expected)
}

// ---------------------------------------------------------------------------------------------
// pgbench and the copy-up.

#[derive(Clone, Debug, Default, PartialEq)]
struct Pgbench {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    failed: u64,
    /// CPU time of the container's processes (the server) per transaction.
    server_cpu_ms: Option<f64>,
    /// CPU time of pgbench per transaction.
    client_cpu_ms: Option<f64>,
    /// Share of all cores that processes other than pgbench and the container used.
    others: Option<f64>,
}

/// `pgbench -S -c C -j 2 -T D -n` against `container`: a warm-up of WARMUP_S seconds,
/// discarded, then the timed run, taken again when other processes used the cores meanwhile.
fn workload(
    container: &Container,
    client: &Client,
    port: u16,
    options: &PostgresOptions,
    timer: &Timer,
) -> Result<Pgbench> {
    let cgroup = container_cpu(container)?;
    let run = |secs: u64| -> Result<Pgbench> {
        let mut cmd = client.cmd("pgbench", port);
        cmd.args([
            "-S",
            "-c",
            &options.clients.to_string(),
            "-j",
            &PGBENCH_THREADS.to_string(),
            "-T",
            &secs.to_string(),
            "-n",
        ]);
        let server_before = cgroup.read();
        let finished = timer.run(&mut cmd, false)?;
        let server_cpu = server_before
            .zip(cgroup.read())
            .map(|(a, b)| b.saturating_sub(a) as f64 / 1e9);
        let mut result = parse_pgbench(&finished.stdout)
            .ok_or_else(|| anyhow!("pgbench printed no result:\n{}", finished.stdout))?;
        let nproc = nproc() as f64;
        let wall = finished.sample.secs;
        // Timer's share of the cores used by others counts the server as other: take it out.
        result.others = finished
            .sample
            .other_load
            .zip(server_cpu)
            .map(|(load, server)| (load - server / (wall * nproc)).max(0.0));
        result.server_cpu_ms = server_cpu
            .filter(|_| result.transactions > 0)
            .map(|s| s * 1e3 / result.transactions as f64);
        result.client_cpu_ms = finished
            .sample
            .cpu_secs
            .filter(|_| result.transactions > 0)
            .map(|s| s * 1e3 / result.transactions as f64);
        Ok(result)
    };
    let warmup = run(WARMUP_S.min(options.duration_s))?;
    eprintln!(
        "xtask:   warm-up: {:.0} tps, {:.3} ms",
        warmup.tps, warmup.latency_ms
    );
    let result = until_quiet(
        NOISY,
        || {
            wait_until_quiet();
            let result = run(options.duration_s)?;
            eprintln!(
                "xtask:   {:.0} tps, latency average {:.3} ms, {} transactions, {} failed; server {} ms, pgbench {} ms of CPU per transaction; others {}",
                result.tps,
                result.latency_ms,
                result.transactions,
                result.failed,
                fmt(result.server_cpu_ms, 3),
                fmt(result.client_cpu_ms, 3),
                fmt_pct(result.others),
            );
            Ok(result)
        },
        |result| result.others,
    )?;
    if result.failed > 0 {
        bail!("pgbench: {} transactions failed", result.failed);
    }
    Ok(result)
}

/// Where the kernel counts a container's CPU time: cgroup v1's cpuacct.usage (ns) or
/// cgroup v2's cpu.stat usage_usec.
struct ContainerCpu {
    path: Option<PathBuf>,
}

impl ContainerCpu {
    /// Nanoseconds of CPU the container's processes used so far.
    fn read(&self) -> Option<u64> {
        let path = self.path.as_ref()?;
        let text = fs::read_to_string(path).ok()?;
        if path.ends_with("cpu.stat") {
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse::<u64>()
                .ok()
                .map(|us| us * 1000)
        } else {
            text.trim().parse().ok()
        }
    }
}

fn container_cpu(container: &Container) -> Result<ContainerCpu> {
    let id = run_quiet(&mut container.cmd(&["inspect", "-f", "{{.Id}}", &container.name]))?;
    let id = id.trim();
    let path = [
        format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage"),
        format!("/sys/fs/cgroup/cpu,cpuacct/docker/{id}/cpuacct.usage"),
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat"),
        format!("/sys/fs/cgroup/docker/{id}/cpu.stat"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    if path.is_none() {
        eprintln!(
            "xtask:   cannot find the cgroup of {}: server CPU not measured",
            container.name
        );
    }
    Ok(ContainerCpu { path })
}

fn parse_pgbench(out: &str) -> Option<Pgbench> {
    let field = |prefix: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let first_word = |s: &str| s.split_whitespace().next().map(str::to_owned);
    Some(Pgbench {
        tps: first_word(field("tps = ")?)?.parse().ok()?,
        latency_ms: first_word(field("latency average = ")?)?.parse().ok()?,
        transactions: first_word(field("number of transactions actually processed:")?)?
            .parse()
            .ok()?,
        failed: field("number of failed transactions:")
            .and_then(first_word)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        ..Pgbench::default()
    })
}

/// Bytes in a container's writable layer (apparent sizes of its regular files).
#[derive(Clone, Debug, Default)]
struct CopyUp {
    bytes: u64,
    files: usize,
    pgdata_bytes: u64,
    /// The biggest files under the data directory, relative to it.
    biggest: Vec<(String, u64)>,
}

fn copy_up(docker: &Path, container: &str) -> Result<CopyUp> {
    let upper = run_quiet(Command::new(docker).args([
        "inspect",
        "-f",
        "{{.GraphDriver.Data.UpperDir}}",
        container,
    ]))?;
    let upper = PathBuf::from(upper.trim());
    if !upper.is_dir() {
        bail!(
            "{container}'s writable layer {} is not a directory (the overlay2 storage driver?)",
            upper.display()
        );
    }
    let files = files_under(&upper);
    let pgdata = upper.join(IMAGE_PGDATA);
    let mut under: Vec<(String, u64)> = files
        .iter()
        .filter_map(|(p, n)| {
            Some((
                p.strip_prefix(&pgdata).ok()?.to_string_lossy().into_owned(),
                *n,
            ))
        })
        .collect();
    under.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(CopyUp {
        bytes: files.iter().map(|(_, n)| n).sum(),
        files: files.len(),
        pgdata_bytes: under.iter().map(|(_, n)| n).sum(),
        biggest: under.into_iter().take(5).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Results and the report.

#[derive(Default)]
struct DataPart {
    scale: u64,
    db_bytes: u64,
    tables: String,
    pg_version: String,
    base_version: String,
    init_secs: f64,
    dump_secs: f64,
    dump_bytes: u64,
    /// (path under the data directory, relation name) of every relation in the database.
    relations: Vec<(String, String)>,
}

#[derive(Default)]
struct BuildPart {
    secs: Vec<f64>,
    layers: Vec<(String, u64)>,
    /// The same build with --pg-lazy-copyup.
    lazy_secs: Vec<f64>,
    lazy_layers: Vec<(String, u64)>,
    lines: Vec<String>,
    archive_bytes: u64,
    load_secs: f64,
    docker_size: Option<u64>,
}

#[derive(Default)]
struct RestorePart {
    build_secs: Vec<f64>,
    docker_size: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StartKind {
    Baked { verify: bool },
    Restore,
}

impl StartKind {
    fn label(self) -> &'static str {
        match self {
            StartKind::Baked { verify: true } => "baked, verification on",
            StartKind::Baked { verify: false } => "baked, verification off (`BAKEDB_VERIFY=off`)",
            StartKind::Restore => "restore at start (`pg_restore -j 2`)",
        }
    }

    /// The log lines that mark the steps of its start.
    fn marks(self) -> &'static [Mark] {
        match self {
            StartKind::Baked { .. } => &BAKED_MARKS,
            StartKind::Restore => &RESTORE_MARKS,
        }
    }
}

/// The restore script's markers; its temporary server is ready too, before the real one.
const RESTORE_MARKS: [Mark; 7] = [
    Mark::at("initdb", "restore: initdb"),
    Mark::at("socket-only server", "restore: start"),
    Mark::at("role and database", "restore: roles"),
    Mark::at("pg_restore", "restore: pg_restore"),
    Mark::at("stop", "restore: stop"),
    Mark::at("exec postgres", "restore: exec postgres"),
    Mark {
        label: "postgres ready",
        text: "ready to accept connections",
        after: Some("restore: exec postgres"),
    },
];

struct StartSample {
    kind: StartKind,
    cache: Cache,
    secs: f64,
    returned: Option<f64>,
    marks: Vec<(&'static str, f64)>,
    init_line: Option<String>,
}

/// Where the data lives and how PostgreSQL is set up, for pgbench.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    /// The baked image as it is: data in image layers, bakedb's read-only profile.
    Baked,
    /// The same, built with --pg-lazy-copyup.
    BakedLazy,
    /// The baked image's data in its layers, PostgreSQL started directly with its defaults.
    LayersDefaults,
    /// The base image on the bind-mounted host copy, with the read-only profile's settings.
    VolumeTuned,
    /// The base image on the bind-mounted host copy, PostgreSQL's defaults.
    VolumeDefaults,
}

impl Server {
    const ALL: [Server; 5] = [
        Server::Baked,
        Server::BakedLazy,
        Server::LayersDefaults,
        Server::VolumeTuned,
        Server::VolumeDefaults,
    ];

    fn label(self) -> &'static str {
        match self {
            Server::Baked => "baked: image layers, read-only profile",
            Server::BakedLazy => "baked with `--pg-lazy-copyup`",
            Server::LayersDefaults => "image layers, defaults",
            Server::VolumeTuned => "volume, read-only profile's settings",
            Server::VolumeDefaults => "volume: bind mount, defaults",
        }
    }
}

/// When a baked container's writable layer was measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CopyCase {
    BakedFirst,
    BakedWorkload,
    BakedStop,
    LazyFirst,
    LazyWorkload,
    LazyStop,
}

impl CopyCase {
    const ALL: [CopyCase; 6] = [
        CopyCase::BakedFirst,
        CopyCase::BakedWorkload,
        CopyCase::BakedStop,
        CopyCase::LazyFirst,
        CopyCase::LazyWorkload,
        CopyCase::LazyStop,
    ];

    fn label(self) -> &'static str {
        match self {
            CopyCase::BakedFirst => "baked: a fresh replica, right after its first answer",
            CopyCase::BakedWorkload => "baked: after the pgbench runs (warm-up and timed)",
            CopyCase::BakedStop => "baked: after `docker stop` (a fast shutdown: a checkpoint)",
            CopyCase::LazyFirst => "`--pg-lazy-copyup`: right after its first answer",
            CopyCase::LazyWorkload => "`--pg-lazy-copyup`: after the pgbench runs",
            CopyCase::LazyStop => "`--pg-lazy-copyup`: after `docker stop`",
        }
    }
}

struct Round {
    pgbench: Vec<(Server, Pgbench)>,
    copy_ups: Vec<(CopyCase, CopyUp)>,
    /// First answer of a fresh baked replica started beside the worked one.
    fresh_secs: Option<f64>,
    /// First answer of the --pg-lazy-copyup container (warm cache, verification on).
    lazy_first_secs: Option<f64>,
}

struct Report<'a> {
    options: &'a PostgresOptions,
    commit: String,
    docker: String,
    skopeo: String,
    cold_unavailable: Option<String>,
    data: &'a DataPart,
    build: &'a BuildPart,
    base_layers: &'a [String],
    restore: &'a RestorePart,
    starts: &'a [StartSample],
    rounds: &'a [Round],
}

impl Report<'_> {
    fn starts(&self, kind: StartKind, cache: Cache) -> impl Iterator<Item = &StartSample> {
        self.starts
            .iter()
            .filter(move |s| s.kind == kind && s.cache == cache)
    }

    fn start_median(
        &self,
        kind: StartKind,
        cache: Cache,
        f: impl Fn(&StartSample) -> Option<f64>,
    ) -> Option<f64> {
        median(self.starts(kind, cache).filter_map(f))
    }

    fn start_range(&self, kind: StartKind, cache: Cache) -> Option<(f64, f64)> {
        range(self.starts(kind, cache).map(|s| s.secs))
    }

    fn round_median(&self, f: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
        median(self.rounds.iter().filter_map(f))
    }

    fn markdown(&self) -> String {
        let o = self.options;
        let d = self.data;
        let b = self.build;
        let nproc = nproc();
        let mut md = bench::report::start("postgres", &self.commit, &o.command());
        let _ = writeln!(
            md,
            "Source: {} on 127.0.0.1, `pgbench -i -s {}` (in {:.0} s), database `{DB}` of {} bytes ({:.0} MiB by \
             `pg_database_size`; {}), a login role `{ROLE}` with a password and SELECT on the pgbench tables. \
             Every image is built on the base image fixture (target/fixtures/postgres: Debian's PostgreSQL {}, \
             standing in for the official `postgres:15`) and runs under {} with `--network host` on a free port \
             of 127.0.0.1; psql and pgbench connect from the host over TCP as `{ROLE}` with scram-sha-256. \
             The source server is stopped before anything runs in docker.\n",
            d.pg_version,
            d.scale,
            d.init_secs,
            d.db_bytes,
            d.db_bytes as f64 / (1u64 << 20) as f64,
            d.tables,
            d.base_version,
            self.docker,
        );

        // Images.
        let _ = writeln!(md, "### Images\n");
        let added: Vec<&(String, u64)> = b
            .layers
            .iter()
            .filter(|(digest, _)| !self.base_layers.contains(digest))
            .collect();
        let base_bytes: u64 = b
            .layers
            .iter()
            .filter(|(digest, _)| self.base_layers.contains(digest))
            .map(|(_, n)| n)
            .sum();
        let data_layer = added.iter().map(|(_, n)| *n).max();
        let _ = writeln!(
            md,
            "| image | how | build, median s | layers | docker's size MB |"
        );
        let _ = writeln!(md, "|---|---|---:|---|---:|");
        let _ = writeln!(
            md,
            "| baked | `bakedb build --engine postgres --source postgresql://postgres@127.0.0.1:PORT/{DB} --pg-bin … --base oci:target/fixtures/postgres:latest --output docker-archive:…` (gzip; pg_basebackup, ANALYZE, VACUUM (FREEZE), clean shutdown, data layer, image.json) | {} | base {} MB + {} layers bakedb wrote: {} MB (data layer {} MB) | {} |",
            fmt(median(b.secs.iter().copied()), 2),
            mb(base_bytes),
            added.len(),
            added
                .iter()
                .map(|(_, n)| mb(*n))
                .collect::<Vec<_>>()
                .join(" + "),
            data_layer.map_or("—".into(), mb),
            b.docker_size.map_or("—".into(), mb),
        );
        let lazy_added: Vec<u64> = b
            .lazy_layers
            .iter()
            .filter(|(digest, _)| !self.base_layers.contains(digest))
            .map(|(_, n)| *n)
            .collect();
        let _ = writeln!(
            md,
            "| baked, lazy copy-up | the same with `--pg-lazy-copyup` | {} | base + {} layers bakedb wrote: {} MB | |",
            fmt(median(b.lazy_secs.iter().copied()), 2),
            lazy_added.len(),
            lazy_added
                .iter()
                .map(|n| mb(*n))
                .collect::<Vec<_>>()
                .join(" + "),
        );
        let _ = writeln!(
            md,
            "| restore at start | `pg_dump -Fc` ({:.1} s, {} MB), then `docker build` (classic builder, `--no-cache`) FROM the base image with the dump and an entrypoint script | {} (the build only) | base + dump + script | {} |",
            d.dump_secs,
            mb(d.dump_bytes),
            fmt(median(self.restore.build_secs.iter().copied()), 2),
            self.restore.docker_size.map_or("—".into(), mb),
        );
        let _ = writeln!(
            md,
            "\nBuild times are medians of {} builds from the live source. The baked archive is {} MB; `docker load` took {:.2} s ({}). \
             bakedb's phases in the last build:\n",
            b.secs.len(),
            mb(b.archive_bytes),
            b.load_secs,
            self.skopeo,
        );
        for line in &b.lines {
            let _ = writeln!(md, "- `{line}`");
        }

        self.start_markdown(&mut md);
        self.pgbench_markdown(&mut md, nproc);
        self.copy_up_markdown(&mut md);
        self.targets_markdown(&mut md);
        md
    }

    fn start_markdown(&self, md: &mut String) {
        let _ = writeln!(md, "\n### From `docker run` to the first answer\n");
        let cold = match &self.cold_unavailable {
            Some(why) => format!("Cold cache: {why}."),
            None => "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` right before `docker run`, so the data, the \
                     image's other files and docker's own programs come from the disk."
                .into(),
        };
        let _ = writeln!(
            md,
            "Each start: `docker run -d --network host -e PGPORT=PORT [-e BAKEDB_VERIFY=off] IMAGE`; the clock starts \
             right before `docker run` is spawned and stops when `psql -c '{FIRST_QUERY}'` (as `{ROLE}`, over TCP) \
             first returns the right count: every {} ms the port is tried, and once it accepts, psql asks. \
             The baked image's start includes bakedb-init's verification, which reads and hashes every byte of the \
             data (the first start of a container only); `BAKEDB_VERIFY=off` shows the start without it. The restore \
             at start is the official image's recipe, on an empty anonymous volume: `initdb` (synced, as there), \
             a server on the socket only, the role and database, `pg_restore -j 2` of the dump, a fast stop, \
             then `postgres` on every address. {cold} Warm: the baked image right after an untimed start with \
             verification (which read every byte), the restore right after its cold run (which read the whole \
             dump). Medians of {} runs; every container is removed (with its volume) after its first answer.\n",
            POLL.as_millis(),
            self.options.runs,
        );
        let _ = writeln!(
            md,
            "| image | cache | first answer, median s | min–max s | `docker run -d` returned, median s |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        let kinds = [
            StartKind::Baked { verify: true },
            StartKind::Baked { verify: false },
            StartKind::Restore,
        ];
        for cache in Cache::BOTH {
            for kind in kinds {
                if cache == Cache::Cold
                    && let Some(why) = &self.cold_unavailable
                {
                    let _ = writeln!(md, "| {} | {} | {why} | | |", kind.label(), cache.name());
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    kind.label(),
                    cache.name(),
                    fmt(self.start_median(kind, cache, |s| Some(s.secs)), 3),
                    fmt_range(self.start_range(kind, cache), 3),
                    fmt(self.start_median(kind, cache, |s| s.returned), 3),
                );
            }
        }
        let _ = writeln!(
            md,
            "\nWhere the time goes: when the container logged each step (docker's log timestamps), in seconds after `docker run` was spawned, medians:\n"
        );
        let _ = writeln!(md, "| image | cache | steps |");
        let _ = writeln!(md, "|---|---|---|");
        for cache in Cache::BOTH {
            for kind in kinds {
                let samples: Vec<&StartSample> = self
                    .starts
                    .iter()
                    .filter(|s| s.kind == kind && s.cache == cache)
                    .collect();
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
                        fmt(self.start_median(kind, cache, |s| Some(s.secs)), 3)
                    )))
                    .collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} |",
                    kind.label(),
                    cache.name(),
                    steps.join(" → ")
                );
            }
        }
        for cache in Cache::BOTH {
            if let Some(line) = self
                .starts
                .iter()
                .rev()
                .filter(|s| s.cache == cache)
                .find_map(|s| s.init_line.as_deref())
            {
                let _ = writeln!(md, "\nbakedb-init, {} cache: `{line}`", cache.name());
            }
        }
    }

    /// The median of `f` over the rounds' runs of `server`.
    fn pgbench(&self, server: Server, f: impl Fn(&Pgbench) -> Option<f64>) -> Option<f64> {
        self.round_median(|r| {
            r.pgbench
                .iter()
                .find(|(s, _)| *s == server)
                .and_then(|(_, p)| f(p))
        })
    }

    fn pgbench_markdown(&self, md: &mut String, nproc: usize) {
        let o = self.options;
        let _ = writeln!(
            md,
            "\n### pgbench -S: the tuned read-only image against a default server on a volume\n"
        );
        let _ = writeln!(
            md,
            "`pgbench -S -c {} -j {PGBENCH_THREADS} -T {} -n` (select-only: one primary-key lookup in pgbench_accounts \
             per transaction) as `{ROLE}` from the host over 127.0.0.1, on the same {nproc} cores as the server, after a \
             {} s warm-up run that is discarded; a fresh container per case. The comparison asked for is the first \
             row against the last; the second is the baked image with lazy copy-up, the third and fourth cross the \
             tuning with the storage to tell their effects apart.\n",
            o.clients,
            o.duration_s,
            WARMUP_S.min(o.duration_s),
        );
        let _ = writeln!(md, "| server | how it runs |");
        let _ = writeln!(md, "|---|---|");
        let tuning = TUNING.join(", ");
        for server in Server::ALL {
            let how = match server {
                Server::Baked => format!(
                    "the image above as it starts (bakedb-init verifies, which reads all the data into the page cache, \
                     then execs postgres with the read-only profile: {tuning}; config, pg_hba and socket in /tmp)"
                ),
                Server::BakedLazy => "the same data built with `bakedb build … --pg-lazy-copyup`: bakedb-init \
                     also preloads /bakedb/copyup.so into postgres, which opens relation files read-only and \
                     reopens them read-write only on a first write (so overlayfs copies up only what is written)"
                    .to_owned(),
                Server::LayersDefaults => format!(
                    "the same image with `--entrypoint postgres`, `-D /{IMAGE_PGDATA} -c listen_addresses=*`: \
                     the data directory's own postgresql.conf (initdb's defaults) and pg_hba.conf (the source's: trust on 127.0.0.1)"
                ),
                Server::VolumeTuned => format!(
                    "as below, with the profile's settings on the command line: `postgres -c …` for {tuning}"
                ),
                Server::VolumeDefaults => format!(
                    "the base image's own command (`postgres`, PGDATA {BASE_PGDATA}), `--user {IMAGE_UID}:{IMAGE_UID}`, \
                     on a bind mount of a host directory with the same data directory (a `bakedb snapshot` of the \
                     source, owned by {IMAGE_UID}, mode 0700), PostgreSQL's defaults (fsync on, autovacuum on...) but \
                     `listen_addresses = '*'` and scram-sha-256 in pg_hba.conf; every file read just before the start"
                ),
            };
            let _ = writeln!(md, "| {} | {how} |", server.label());
        }
        let _ = writeln!(
            md,
            "\nEvery case has shared_buffers at the default 128 MB, so most lookups are served from the \
             page cache through the file system: through overlayfs for the image's layers, directly for the volume. \
             \"server CPU\" is the container's CPU time (its cgroup) per transaction, \"pgbench CPU\" the client's; \
             \"others\" is the share of all cores that other processes used during the timed run (a run above {:.0} % \
             is taken again). Medians of {} rounds, each case once per round.\n",
            NOISY * 100.0,
            o.runs,
        );
        let _ = writeln!(
            md,
            "| server | TPS | × volume, defaults | latency average ms | transactions | failed | server CPU ms/tx | pgbench CPU ms/tx | others |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let volume_tps = self.pgbench(Server::VolumeDefaults, |p| Some(p.tps));
        for server in Server::ALL {
            let runs: Vec<&Pgbench> = self
                .rounds
                .iter()
                .flat_map(|r| r.pgbench.iter())
                .filter(|(s, _)| *s == server)
                .map(|(_, p)| p)
                .collect();
            let others = runs.iter().filter_map(|p| p.others).max_by(f64::total_cmp);
            let tps = self.pgbench(server, |p| Some(p.tps));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                server.label(),
                fmt(tps, 0),
                fmt(ratio(tps, volume_tps), 3),
                fmt(self.pgbench(server, |p| Some(p.latency_ms)), 3),
                fmt(self.pgbench(server, |p| Some(p.transactions as f64)), 0),
                runs.iter().map(|p| p.failed).sum::<u64>(),
                fmt(self.pgbench(server, |p| p.server_cpu_ms), 4),
                fmt(self.pgbench(server, |p| p.client_cpu_ms), 4),
                fmt_pct(others),
            );
        }
        let tps = |s: Server| self.pgbench(s, |p| Some(p.tps));
        let _ = writeln!(md);
        for (what, a, b) in [
            (
                "lazy copy-up, data in image layers, read-only profile",
                Server::BakedLazy,
                Server::Baked,
            ),
            (
                "the read-only profile, data in image layers",
                Server::Baked,
                Server::LayersDefaults,
            ),
            (
                "the read-only profile, data on the volume",
                Server::VolumeTuned,
                Server::VolumeDefaults,
            ),
            (
                "image layers instead of the volume, defaults",
                Server::LayersDefaults,
                Server::VolumeDefaults,
            ),
            (
                "image layers instead of the volume, read-only profile",
                Server::Baked,
                Server::VolumeTuned,
            ),
        ] {
            let _ = writeln!(
                md,
                "- {what}: {} TPS ({} ÷ {})",
                times(ratio(tps(a), tps(b)), 3),
                a.label(),
                b.label()
            );
        }
    }

    fn copy_up(&self, case: CopyCase, f: impl Fn(&CopyUp) -> f64) -> Option<f64> {
        self.round_median(|r| {
            r.copy_ups
                .iter()
                .find(|(c, _)| *c == case)
                .map(|(_, x)| f(x))
        })
    }

    fn copy_up_markdown(&self, md: &mut String) {
        let _ = writeln!(md, "\n### Copy-up\n");
        let _ = writeln!(
            md,
            "Bytes in a baked container's writable layer (`docker inspect -f '{{{{.GraphDriver.Data.UpperDir}}}}'`, \
             apparent sizes of the regular files), medians of {} rounds. PostgreSQL opens relation files read-write, \
             so overlayfs copies every file a backend opens up in full, in every replica; an image built with \
             `--pg-lazy-copyup` preloads bakedb's shim, which opens them read-only until the first write.\n",
            self.options.runs
        );
        let _ = writeln!(
            md,
            "| container | writable layer MB | files | of it under {IMAGE_PGDATA} MB |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for case in CopyCase::ALL {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                case.label(),
                fmt(self.copy_up(case, |c| c.bytes as f64 / 1e6), 1),
                fmt(self.copy_up(case, |c| c.files as f64), 0),
                fmt(self.copy_up(case, |c| c.pgdata_bytes as f64 / 1e6), 1),
            );
        }
        if let Some(last) = self.rounds.last() {
            for case in [CopyCase::BakedWorkload, CopyCase::LazyWorkload] {
                let Some((_, copy)) = last.copy_ups.iter().find(|(c, _)| *c == case) else {
                    continue;
                };
                let _ = writeln!(
                    md,
                    "\nThe biggest files under {IMAGE_PGDATA} in \"{}\" (last round):\n",
                    case.label()
                );
                let _ = writeln!(md, "| file | relation | MB |");
                let _ = writeln!(md, "|---|---|---:|");
                for (name, bytes) in &copy.biggest {
                    let relation = self
                        .data
                        .relations
                        .iter()
                        .find(|(path, _)| path == name)
                        .map(|(_, rel)| rel.clone())
                        .or_else(|| catalog_name(&self.data.relations, name))
                        .unwrap_or_default();
                    let _ = writeln!(md, "| {name} | {relation} | {} |", mb(*bytes));
                }
            }
        }
        let _ = writeln!(
            md,
            "\nA fresh baked replica started beside the worked one (its copy-up starts from nothing again) answered \
             its first query after {} s; the `--pg-lazy-copyup` container after {} s (medians; verification included, \
             page cache warm: the lazy image's data layer is a copy of its own on disk, since docker stores a layer per \
             chain of parents, so an untimed start reads it first).",
            fmt(self.round_median(|r| r.fresh_secs), 3),
            fmt(self.round_median(|r| r.lazy_first_secs), 3),
        );
    }

    fn targets_markdown(&self, md: &mut String) {
        let _ = writeln!(md, "\n### Targets\n");
        let _ = writeln!(md, "| target | measured | met |");
        let _ = writeln!(md, "|---|---:|---|");
        for cache in Cache::BOTH {
            let baked =
                self.start_median(StartKind::Baked { verify: true }, cache, |s| Some(s.secs));
            let restore = self.start_median(StartKind::Restore, cache, |s| Some(s.secs));
            let r = ratio(restore, baked);
            let measured = match (&self.cold_unavailable, cache) {
                (Some(why), Cache::Cold) => why.clone(),
                _ => format!(
                    "{} ({} s vs {} s)",
                    times(r, 1),
                    fmt(baked, 3),
                    fmt(restore, 3)
                ),
            };
            let _ = writeln!(
                md,
                "| first answer ≥ {TARGET_RESTORE_RATIO:.0}× sooner than a restore at start, verification on, {} cache | {measured} | {} |",
                cache.name(),
                yes_no(r.map(|r| r >= TARGET_RESTORE_RATIO)),
            );
        }
        let baked = self.pgbench(Server::Baked, |p| Some(p.tps));
        let volume = self.pgbench(Server::VolumeDefaults, |p| Some(p.tps));
        let _ = writeln!(
            md,
            "| pgbench -S: the tuned read-only image gains more than it loses to layered file access (TPS above the volume's) | {} ({} vs {} TPS) | {} |",
            fmt(ratio(baked, volume), 3),
            fmt(baked, 0),
            fmt(volume, 0),
            yes_no(ratio(baked, volume).map(|r| r > 1.0)),
        );
    }
}

/// A system catalog's file in another database (base/5/1249): catalogs keep the file number
/// of the template every database is copied from, so the benchmark database's name for it.
fn catalog_name(relations: &[(String, String)], path: &str) -> Option<String> {
    let (dir, file) = path.rsplit_once('/')?;
    if !dir.starts_with("base/") || file.parse::<u32>().ok()? >= 16384 {
        return None;
    }
    relations
        .iter()
        .find(|(p, _)| p.starts_with("base/") && p.rsplit_once('/').map(|(_, f)| f) == Some(file))
        .map(|(_, rel)| format!("{rel} (database {})", &dir["base/".len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let o = PostgresOptions::parse(&["--size-mib", "128", "--duration-s=5", "--clients", "4"])
            .unwrap();
        assert_eq!(
            (o.size_mib, o.duration_s, o.clients, o.runs),
            (128, 5, 4, 1)
        );
        let o = PostgresOptions::parse(&[]).unwrap();
        assert_eq!(
            o.command(),
            "cargo xtask bench postgres --size-mib 1024 --runs 1 --duration-s 30 --clients 8"
        );
        assert_eq!(o.scale(), 69);
        assert!(PostgresOptions::parse(&["--clients", "1"]).is_err());
        assert!(PostgresOptions::parse(&["--runs", "0"]).is_err());
        assert!(PostgresOptions::parse(&["--fast"]).is_err());
    }

    #[test]
    fn reads_pgbench_output() {
        let out = "pgbench (15.18 (Debian 15.18-0+deb12u1))\n\
                   transaction type: <builtin: select only>\n\
                   scaling factor: 8\n\
                   query mode: simple\n\
                   number of clients: 8\n\
                   number of threads: 2\n\
                   maximum number of tries: 1\n\
                   duration: 5 s\n\
                   number of transactions actually processed: 81234\n\
                   number of failed transactions: 0 (0.000%)\n\
                   latency average = 0.492 ms\n\
                   initial connection time = 25.120 ms\n\
                   tps = 16251.853240 (without initial connection time)\n";
        assert_eq!(
            parse_pgbench(out),
            Some(Pgbench {
                tps: 16251.853240,
                latency_ms: 0.492,
                transactions: 81234,
                failed: 0,
                ..Pgbench::default()
            })
        );
        assert_eq!(parse_pgbench("pgbench: error: connection refused"), None);
    }

    #[test]
    fn names_copied_up_files() {
        let relations = [
            ("base/16384/16397".to_owned(), "pgbench_accounts".to_owned()),
            ("base/16384/1249".to_owned(), "pg_attribute".to_owned()),
            ("global/1262".to_owned(), "pg_database".to_owned()),
        ];
        assert_eq!(
            catalog_name(&relations, "base/5/1249").as_deref(),
            Some("pg_attribute (database 5)")
        );
        assert_eq!(catalog_name(&relations, "base/5/16397"), None);
        assert_eq!(
            catalog_name(&relations, "pg_wal/000000010000000000000001"),
            None
        );
    }
}
