//! `cargo xtask bench mariadb`: a baked MariaDB image against the usual alternatives, on the
//! same sysbench database.
//!
//! The source: a MariaDB server (bakedb-testkit's, Debian's packages) under
//! target/bench/mariadb/run/source, `sysbench oltp_read_only prepare` with 8 tables sized to
//! about `--size-mib`, the backup account of the kit's seed. It serves the builds, a
//! `mariadb-dump` and a `bakedb snapshot`, and is stopped before anything is timed in docker.
//!
//! Ways to serve that data, all on the base image fixture (target/fixtures/mariadb, Debian's
//! MariaDB), all with host networking on a free port of 127.0.0.1:
//! - baked: `bakedb build --engine mariadb` into a docker-archive, `docker load`; bakedb-init
//!   verifies the data and execs mariadbd with the read-only profile;
//! - restore at start: the base image on an empty data directory, importing the dump before
//!   it serves, as the official image's /docker-entrypoint-initdb.d does (the empty data
//!   directory is made beforehand with the host's mariadb-install-db, which the official
//!   image runs at start too: the restore is measured without it, in its favour);
//! - volume: the base image, untuned (`--no-defaults`), on a bind-mounted copy of the
//!   snapshot; and the same with each setting of the read-only profile alone, then with all of
//!   them, so the paper's claim is tested setting by setting, and layered access (baked)
//!   against a volume with the same tuning; baked and volume once more with buffered reads
//!   (`innodb_flush_method=fsync`), InnoDB's O_DIRECT default being what decides where a
//!   buffer pool miss is read from.
//!
//! Measured: build time and data layer size against `docker build` of the same data
//! directory; `--runs` rounds of the serving cases, each started afresh and timed to its first
//! answer, then `sysbench oltp_point_select` and `oltp_read_only` transactions per second
//! once the volume's copy is synced and the cores went quiet; the bytes in the baked
//! container's writable layer after the workload; `docker run` to the first answer of the
//! baked image and of the restore, `--runs` times each, warm and cold (`sync; echo 3 >
//! /proc/sys/vm/drop_caches` right before the run, as root; the table says when it could not
//! be dropped), each start after the cores went quiet, the two taking turns so that a busy
//! spell of the machine does not land on one of them only, and where the baked start's time
//! goes from its log lines. Written between markers in docs/benchmarks.md.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use bakedb_testkit::containers::{Container, DockerImage, docker_cli};
use bakedb_testkit::dirs::unique_name;
use bakedb_testkit::mariadb::{MariaServer, maria_tools, run_as};
use bakedb_testkit::ports::free_port;

use crate::bench::report::fmt_range;
use crate::bench::steps::{Mark, logs, marks, time_of_day};
use crate::bench::timing::{cold_cache, first_answer, median, range, sync, wait_until_quiet};
use crate::bench::tools::{
    build_layers, commit_measured, docker_bin, docker_load, docker_version, fresh_dir,
    release_bakedb, target_dir,
};
use crate::bench::{self, fmt, mb, run_quiet};
use crate::project_root;

const TABLES: u64 = 8;
/// sysbench's rows with their primary key and secondary index, in InnoDB: about 230 bytes.
const BYTES_PER_ROW: u64 = 230;
const USER: &str = "bench";
const PASSWORD: &str = "bench-secret";
const FIRST_QUERY: &str = "SELECT COUNT(*) FROM sbtest.sbtest1";
const POLL: Duration = Duration::from_millis(10);
const START_TIMEOUT: Duration = Duration::from_secs(1800);

pub struct MariadbOptions {
    pub size_mib: u64,
    pub duration_s: u64,
    pub threads: usize,
    /// Timed starts of the baked image and of the restore, warm and cold each.
    pub runs: usize,
}

impl MariadbOptions {
    pub fn parse(flags: &[&str]) -> Result<Self> {
        let mut options = MariadbOptions {
            size_mib: 1024,
            duration_s: 30,
            threads: 8,
            runs: 3,
        };
        bench::flags::parse(
            "bench mariadb",
            "--size-mib N, --duration-s N, --threads N, --runs N",
            flags,
            |name, value| {
                match name {
                    "--size-mib" => options.size_mib = value.positive("database size in MiB")?,
                    "--duration-s" => {
                        options.duration_s = value.positive("seconds of each sysbench run")?
                    }
                    "--threads" => options.threads = value.count("sysbench threads")?,
                    "--runs" => {
                        options.runs = value.count("timed starts of each case, warm and cold")?
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        Ok(options)
    }

    fn command(&self) -> String {
        format!(
            "cargo xtask bench mariadb --size-mib {} --duration-s {} --threads {} --runs {}",
            self.size_mib, self.duration_s, self.threads, self.runs
        )
    }

    fn rows_per_table(&self) -> u64 {
        (self.size_mib << 20) / BYTES_PER_ROW / TABLES
    }
}

/// Where a serving case's data is: in the baked image's layers, or on a bind-mounted copy
/// of the snapshot (a volume).
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Baked,
    Volume,
}

/// A way of serving the data for sysbench: where it is, and the server options it adds.
struct Serving {
    label: &'static str,
    on: On,
    extra: &'static [&'static str],
}

/// InnoDB's default since 10.6 is O_DIRECT: a buffer pool miss reads from the disk, not from
/// the page cache. `fsync` reads through the page cache (there are no writes to flush); the
/// read-only profile sets it.
const BUFFERED: &str = "--innodb-flush-method=fsync";
const DIRECT: &str = "--innodb-flush-method=O_DIRECT";

/// The serving cases, the baked image first (the first answers start it as it is). The
/// volume untuned (`--no-defaults`), then with each setting of the read-only profile alone,
/// then with all of them, so that the paper's claim is tested setting by setting, and layered
/// access (baked) against a volume with the same tuning.
const SERVING: [Serving; 8] = [
    Serving {
        label: "baked (verified, read-only profile, in the image's layers)",
        on: On::Baked,
        extra: &[],
    },
    Serving {
        label: "baked, but O_DIRECT reads (innodb_flush_method=O_DIRECT, MariaDB's default)",
        on: On::Baked,
        extra: &[DIRECT],
    },
    Serving {
        label: "volume, defaults",
        on: On::Volume,
        extra: &[],
    },
    Serving {
        label: "volume + skip-external-locking",
        on: On::Volume,
        extra: &["--skip-external-locking"],
    },
    Serving {
        label: "volume + innodb_read_only",
        on: On::Volume,
        extra: &["--innodb-read-only"],
    },
    Serving {
        label: "volume + read_only",
        on: On::Volume,
        extra: &["--read-only"],
    },
    Serving {
        label: "volume + buffered reads (innodb_flush_method=fsync)",
        on: On::Volume,
        extra: &[BUFFERED],
    },
    Serving {
        label: "volume + the whole profile",
        on: On::Volume,
        extra: &[
            "--skip-external-locking",
            "--innodb-read-only",
            "--read-only",
            "--skip-log-bin",
            "--innodb-buffer-pool-dump-at-shutdown=OFF",
            "--innodb-buffer-pool-load-at-startup=OFF",
            BUFFERED,
        ],
    },
];

/// What one serving case measured, a value per round.
#[derive(Default)]
struct Served {
    first: Vec<f64>,
    point: Vec<f64>,
    read_only: Vec<f64>,
}

/// The steps of the baked image's start, from its log lines.
const BAKED_MARKS: [Mark; 4] = [
    Mark::at("bakedb-init verified", "bakedb-init: verified"),
    Mark::at("bakedb-init execs mariadbd", "bakedb-init: profile"),
    Mark::at("mariadbd starting", "Starting MariaDB"),
    Mark::at("mariadbd ready", "ready for connections"),
];

fn mariadb_client(port: u16, sql: &str) -> Command {
    let mut cmd = Command::new("mariadb");
    cmd.args(["--no-defaults", "--protocol=tcp", "-h", "127.0.0.1"])
        .arg(format!("-P{port}"))
        .args(["-u", USER, &format!("-p{PASSWORD}")])
        .args(["--batch", "--skip-column-names", "-e", sql])
        .stdin(Stdio::null());
    cmd
}

/// Add one start's seconds to `all`, or keep why a start could not be timed as it should
/// (the page cache could not be dropped): the case's cell then says so.
fn push(all: &mut Result<Vec<f64>, String>, one: Result<f64, String>) {
    match (all.as_mut(), one) {
        (Ok(secs), Ok(s)) => secs.push(s),
        (Ok(_), Err(why)) => *all = Err(why),
        (Err(_), _) => {}
    }
}

/// sysbench `workload` for `duration_s` against 127.0.0.1:`port`: transactions per second.
fn sysbench(options: &MariadbOptions, port: u16, workload: &str, rows: u64) -> Result<f64> {
    let out = run_quiet(Command::new("sysbench").arg(workload).args([
        "--db-driver=mysql",
        "--mysql-host=127.0.0.1",
        &format!("--mysql-port={port}"),
        &format!("--mysql-user={USER}"),
        &format!("--mysql-password={PASSWORD}"),
        "--mysql-db=sbtest",
        &format!("--tables={TABLES}"),
        &format!("--table-size={rows}"),
        &format!("--threads={}", options.threads),
        &format!("--time={}", options.duration_s),
        "--report-interval=0",
        "--db-ps-mode=auto",
        "run",
    ]))?;
    out.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("transactions:")
                .and_then(|rest| rest.split('(').nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
        })
        .ok_or_else(|| anyhow!("no transactions per second in sysbench's output:\n{out}"))
}

/// A container that answered its first query; removed when dropped.
struct Started {
    container: Container<bakedb_testkit::containers::Cli>,
    /// From spawning `docker run` to the first answer.
    secs: f64,
    /// When `docker run` was spawned, on the clock of docker's log timestamps.
    spawned_tod: f64,
}

/// A container serving on `port`, started by `docker run -d --network host ARGS`, timed to
/// its first answer to FIRST_QUERY, asked once the port accepts connections (a client
/// spawned every POLL would take CPU from the starting server).
fn start(docker: &Path, args: &[String], port: u16) -> Result<Started> {
    let name = unique_name("bakedb-bench-maria");
    let container = Container::new(docker_cli(docker), name.clone());
    let mut run = Command::new(docker);
    run.args(["run", "-d", "--network", "host", "--name", &name])
        .args(args);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let spawned_tod = time_of_day(SystemTime::now());
    let started = first_answer(
        &mut run,
        &name,
        POLL,
        START_TIMEOUT,
        |_| {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
                return Ok(None);
            }
            let out = mariadb_client(port, FIRST_QUERY).output()?;
            Ok(out.status.success().then_some(()))
        },
        || anyhow!("{name} gave no answer within {START_TIMEOUT:?}"),
    )?;
    Ok(Started {
        container,
        secs: started.secs,
        spawned_tod,
    })
}

pub fn mariadb(options: &MariadbOptions) -> Result<()> {
    let root = project_root();
    let target = target_dir(&root);
    let scratch = target.join("bench/mariadb/run");
    fresh_dir(&scratch)?;
    let docker = docker_bin();
    let docker_version =
        docker_version(&docker).context("this benchmark runs containers: is dockerd running?")?;
    for tool in [
        "sysbench",
        "skopeo",
        "mariadb",
        "mariadb-dump",
        "mariadb-install-db",
    ] {
        if bakedb_testkit::tools::tool(tool).is_none() {
            bail!(
                "{tool} is not installed (apt-get install sysbench skopeo mariadb-client mariadb-server)"
            );
        }
    }
    let fixture = crate::fixtures::mariadb()?;
    let base_ref = format!("oci:{}:latest", fixture.display());
    let bakedb = release_bakedb(&root, &scratch)?;
    let commit = commit_measured(&root);
    let rows = options.rows_per_table();
    let tools = maria_tools().ok_or_else(|| anyhow!("MariaDB is not installed"))?;
    let run_as = run_as().ok_or_else(|| anyhow!("no mysql user to run MariaDB as"))?;

    // 1. The source, and everything taken from it.
    let source_dir = scratch.join("source");
    fs::create_dir_all(&source_dir)?;
    let mut source = MariaServer::create(tools.clone(), run_as, &source_dir)?;
    source.seed();
    source.sql(&format!(
        "CREATE DATABASE sbtest; CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; GRANT SELECT ON sbtest.* TO '{USER}'@'%';"
    ));
    eprintln!(
        "xtask: sysbench prepare: {TABLES} tables of {rows} rows (about {} MiB)",
        options.size_mib
    );
    let started = Instant::now();
    run_quiet(Command::new("sysbench").args([
        "oltp_read_only",
        "--db-driver=mysql",
        &format!("--mysql-socket={}", source.socket().display()),
        "--mysql-user=root",
        "--mysql-db=sbtest",
        &format!("--tables={TABLES}"),
        &format!("--table-size={rows}"),
        "--threads=2",
        "prepare",
    ]))?;
    let prepare_secs = started.elapsed().as_secs_f64();
    let data_bytes: u64 = source
        .sql("SELECT SUM(DATA_LENGTH + INDEX_LENGTH) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'sbtest'")
        .parse()
        .context("the data size")?;

    let baked_name = format!("bakedb-bench-maria:{}mib", options.size_mib);
    let baked_archive = scratch.join("baked.tar");
    eprintln!("xtask: bakedb build");
    let started = Instant::now();
    let build_json = run_quiet(
        Command::new(&bakedb)
            .args(["build", "--engine", "mariadb", "--json", "--source"])
            .arg(source.url())
            .args(["--base", &base_ref, "--output"])
            .arg(format!(
                "docker-archive:{}:{baked_name}",
                baked_archive.display()
            ))
            .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH),
    )?;
    let bake_secs = started.elapsed().as_secs_f64();
    let data_layer = build_layers(&build_json)
        .into_iter()
        .map(|(_, size)| size)
        .max()
        .unwrap_or(0);
    let snapshot = scratch.join("snapshot");
    run_quiet(
        Command::new(&bakedb)
            .args(["snapshot", "--engine", "mariadb", "--source"])
            .arg(source.url())
            .arg("--out")
            .arg(&snapshot),
    )?;
    let datadir_bytes: u64 = bakedb_testkit::dirs::files_under(&snapshot.join("mysql"))
        .iter()
        .map(|(_, n)| n)
        .sum();
    let dump_dir = scratch.join("dump");
    fs::create_dir_all(&dump_dir)?;
    let dump_out = Command::new("mariadb-dump")
        .args(["--no-defaults", "--user=root"])
        .arg(format!("--socket={}", source.socket().display()))
        .args(["--single-transaction", "--databases", "sbtest"])
        .output()?;
    if !dump_out.status.success() {
        bail!(
            "mariadb-dump failed: {}",
            String::from_utf8_lossy(&dump_out.stderr)
        );
    }
    // The restore's own account, so the first query can be asked as in the other cases.
    let mut dump_sql = dump_out.stdout;
    dump_sql.extend_from_slice(
        format!("CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; GRANT SELECT ON sbtest.* TO '{USER}'@'%';\n")
            .as_bytes(),
    );
    fs::write(dump_dir.join("dump.sql"), &dump_sql)?;
    let dump_bytes = dump_sql.len() as u64;
    source.stop();
    drop(source);

    // 2. Images: the baked one; the base (for the volume and the restore); docker build of
    // the same data directory.
    let baked = docker_load(&docker, &baked_archive, &baked_name)?;
    let base_name = "bakedb-bench-mariabase:latest";
    let base_archive = scratch.join("base.tar");
    run_quiet(Command::new("skopeo").args([
        "copy",
        "-q",
        &base_ref,
        &format!("docker-archive:{}:{base_name}", base_archive.display()),
    ]))?;
    let base = docker_load(&docker, &base_archive, base_name)?;
    let context = scratch.join("docker-build");
    fs::create_dir_all(&context)?;
    run_quiet(
        Command::new("cp")
            .arg("-a")
            .arg(snapshot.join("mysql"))
            .arg(&context),
    )?;
    fs::write(
        context.join("Dockerfile"),
        format!("FROM {base_name}\nCOPY --chown=999:999 mysql /var/lib/mysql\n"),
    )?;
    let docker_built = DockerImage {
        docker: docker.clone(),
        name: "bakedb-bench-maria-dockerbuild:latest".into(),
    };
    let started = Instant::now();
    run_quiet(
        Command::new(&docker)
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &docker_built.name])
            .arg(&context),
    )?;
    let docker_build_secs = started.elapsed().as_secs_f64();
    let layer_of_docker_build: u64 = run_quiet(Command::new(&docker).args([
        "history",
        "--no-trunc",
        "--format",
        "{{.Size}}",
        "--human=false",
        &docker_built.name,
    ]))?
    .lines()
    .next()
    .and_then(|l| l.trim().parse().ok())
    .unwrap_or(0);

    // 3. First answers and sysbench.
    let mut md = bench::report::start("mariadb", &commit, &options.command());
    let _ = writeln!(
        md,
        "Docker {docker_version}; sysbench with {} threads, {} s per run; {TABLES} tables of {rows} rows: {} MB of data and indexes (sysbench prepare {:.1} s).\n",
        options.threads,
        options.duration_s,
        mb(data_bytes),
        prepare_secs
    );
    let _ = writeln!(md, "| build | time (s) | size |");
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(
        md,
        "| bakedb build (live snapshot, prepare, layer) | {} | data layer {} MB, gzip |",
        fmt(Some(bake_secs), 1),
        mb(data_layer)
    );
    let _ = writeln!(
        md,
        "| docker build, COPY of the same prepared data directory | {} | layer {} MB, uncompressed |",
        fmt(Some(docker_build_secs), 1),
        mb(layer_of_docker_build)
    );
    let _ = writeln!(
        md,
        "| mariadb-dump for the restore | — | {} MB of SQL |\n",
        mb(dump_bytes)
    );

    // Serving: every case `runs` times, the cases taking turns within a round so that a busy
    // spell of the machine does not land on one case only; each case started afresh, and its
    // sysbench runs only after `sync` and once the cores went quiet (the volume's copy and
    // docker's own layer writes would otherwise be flushed while it is timed).
    let volume = scratch.join("volume");
    let fresh_volume = || -> Result<()> {
        let _ = fs::remove_dir_all(&volume);
        run_quiet(
            Command::new("cp")
                .arg("-a")
                .arg(snapshot.join("mysql"))
                .arg(&volume),
        )?;
        run_quiet(Command::new("chown").args(["-R", "999:999"]).arg(&volume))?;
        run_quiet(Command::new("chmod").args(["-R", "u+w"]).arg(&volume))?;
        Ok(())
    };
    let serving_args = |case: &Serving, port: u16| -> Vec<String> {
        match case.on {
            On::Baked => [
                baked.name.clone(),
                "mariadbd".into(),
                format!("--port={port}"),
            ]
            .into_iter()
            .chain(case.extra.iter().map(|s| s.to_string()))
            .collect(),
            On::Volume => [
                "--user",
                "999:999",
                "-v",
                &format!("{}:/var/lib/mysql", volume.display()),
                "--entrypoint",
                "mariadbd",
                &base.name,
                "--no-defaults",
                "--datadir=/var/lib/mysql",
                "--socket=/tmp/mysqld.sock",
                &format!("--port={port}"),
                "--innodb-log-file-size=8M",
            ]
            .into_iter()
            .map(str::to_owned)
            .chain(case.extra.iter().map(|s| s.to_string()))
            .collect(),
        }
    };
    let mut served: Vec<Served> = SERVING.iter().map(|_| Served::default()).collect();
    let (mut copied_total, mut copied_data) = (0u64, 0u64);
    for round in 1..=options.runs {
        for (case, out) in SERVING.iter().zip(served.iter_mut()) {
            eprintln!("xtask: serving, round {round}: {}", case.label);
            if case.on == On::Volume {
                fresh_volume()?;
            }
            wait_until_quiet();
            let port = free_port();
            let started = start(&docker, &serving_args(case, port), port)?;
            sync();
            wait_until_quiet();
            out.first.push(started.secs);
            out.point
                .push(sysbench(options, port, "oltp_point_select", rows)?);
            out.read_only
                .push(sysbench(options, port, "oltp_read_only", rows)?);
            if round == 1 && case.on == On::Baked && case.extra.is_empty() {
                let c = &started.container;
                run_quiet(&mut c.cmd(&["stop", "--time", "10", &c.name]))?;
                let upper = c.inspect("{{.GraphDriver.Data.UpperDir}}");
                let upper_files = bakedb_testkit::dirs::files_under(Path::new(&upper));
                copied_total = upper_files.iter().map(|(_, n)| n).sum();
                copied_data = upper_files
                    .iter()
                    .filter(|(p, _)| p.starts_with(Path::new(&upper).join("var/lib/bakedb")))
                    .map(|(_, n)| n)
                    .sum();
            }
        }
    }

    // Restore at start, into a data directory the restore fills: a new one for each run.
    let empty = scratch.join("empty");
    let fresh_empty = || -> Result<()> {
        let _ = fs::remove_dir_all(&empty);
        fs::create_dir_all(&empty)?;
        run_quiet(
            Command::new(&tools.install_db)
                .args([
                    "--no-defaults",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ])
                .arg(format!("--datadir={}/data", empty.display())),
        )?;
        run_quiet(Command::new("chown").args(["-R", "999:999"]).arg(&empty))?;
        Ok(())
    };
    let restore_args = |port: u16| -> Vec<String> {
        let script = format!(
            "mariadbd --no-defaults --datadir=/empty/data --socket=/tmp/init.sock --skip-networking & \
         until mariadb --no-defaults -S /tmp/init.sock -uroot -e 'SELECT 1' >/dev/null 2>&1; do sleep 0.05; done; \
         mariadb --no-defaults -S /tmp/init.sock -uroot < /dump/dump.sql && \
         mariadb-admin --no-defaults -S /tmp/init.sock -uroot shutdown && wait && \
         exec mariadbd --no-defaults --datadir=/empty/data --socket=/tmp/mysqld.sock --port={port}"
        );
        vec![
            "--user".into(),
            "999:999".into(),
            "-v".into(),
            format!("{}:/empty", empty.display()),
            "-v".into(),
            format!("{}:/dump:ro", dump_dir.display()),
            "--entrypoint".into(),
            "sh".into(),
            base.name.clone(),
            "-c".into(),
            script,
        ]
    };

    // First answers, `runs` times each, warm and then cold: the baked image and the restore
    // take turns, each start after the cores went quiet (a compiler of someone else's would
    // otherwise be timed with it); a cold start right after the page cache was dropped.
    let timed = |args: &dyn Fn(u16) -> Vec<String>,
                 cold: bool,
                 steps: &mut Vec<Vec<(&'static str, f64)>>|
     -> Result<Result<f64, String>> {
        // Warm starts too wait for the writeback of what the previous case wrote (the
        // restore's import): measured without it, warm starts came out slower than cold ones.
        sync();
        wait_until_quiet();
        if cold && let Err(why) = cold_cache() {
            return Ok(Err(why));
        }
        let port = free_port();
        let started = start(&docker, &args(port), port)?;
        steps.push(marks(
            &logs(&started.container),
            started.spawned_tod,
            &BAKED_MARKS,
        ));
        Ok(Ok(started.secs))
    };
    let baked_args = |port: u16| serving_args(&SERVING[0], port);
    let mut first_answers = Vec::new();
    for cold in [false, true] {
        let state = if cold { "cold" } else { "warm" };
        if !cold {
            // Warm: after an untimed start of each, which read every byte it reads.
            let _ = timed(&baked_args, false, &mut Vec::new())?;
            fresh_empty()?;
            let _ = timed(&restore_args, false, &mut Vec::new())?;
        }
        let (mut baked_secs, mut restore_secs) = (Ok(Vec::new()), Ok(Vec::new()));
        let (mut baked_steps, mut unused) = (Vec::new(), Vec::new());
        for run in 1..=options.runs {
            eprintln!("xtask: first answers, {state} page cache, run {run}");
            push(&mut baked_secs, timed(&baked_args, cold, &mut baked_steps)?);
            fresh_empty()?;
            push(&mut restore_secs, timed(&restore_args, cold, &mut unused)?);
        }
        first_answers.push((state, baked_secs, restore_secs, baked_steps));
    }
    drop(base);
    drop(baked);

    let _ = writeln!(
        md,
        "Serving: each case started afresh, {} rounds, the cases taking turns within a round; sysbench after `sync` and once the cores went quiet. Medians (range) of transactions per second; × is the median against the untuned volume's.\n",
        options.runs
    );
    let _ = writeln!(
        md,
        "| serving | first answer, warm, median s | oltp_point_select TPS | × volume | oltp_read_only TPS | × volume |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let untuned = SERVING
        .iter()
        .position(|c| c.label == "volume, defaults")
        .map(|i| &served[i]);
    for (case, out) in SERVING.iter().zip(&served) {
        let tps = |v: &[f64]| {
            format!(
                "{} ({})",
                fmt(median(v.iter().copied()), 0),
                fmt_range(range(v.iter().copied()), 0)
            )
        };
        let against = |v: &[f64], of: fn(&Served) -> &[f64]| {
            bench::report::times(
                bench::timing::ratio(
                    median(v.iter().copied()),
                    untuned.and_then(|u| median(of(u).iter().copied())),
                ),
                2,
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            case.label,
            fmt(median(out.first.iter().copied()), 2),
            tps(&out.point),
            against(&out.point, |s| &s.point),
            tps(&out.read_only),
            against(&out.read_only, |s| &s.read_only),
        );
    }
    let _ = writeln!(
        md,
        "\n`docker run` to the first answer, {} starts each, the baked image and the restore taking turns, each after `sync` and once the cores went quiet; warm: after an untimed start of each; cold: `sync; echo 3 > /proc/sys/vm/drop_caches` right before `docker run` (the guest's page cache: a virtual machine's disk may still be cached by its host).\n\n| page cache | baked (verified, read-only profile): median s (range) | restore at start: median s (range) | restore / baked, medians |\n|---|---|---|---|",
        options.runs
    );
    for (state, baked_secs, restore_secs, _) in &first_answers {
        let cell = |r: &Result<Vec<f64>, String>| match r {
            Ok(secs) => format!(
                "{} ({})",
                fmt(median(secs.iter().copied()), 2),
                fmt_range(range(secs.iter().copied()), 2)
            ),
            Err(why) => why.clone(),
        };
        let of =
            |r: &Result<Vec<f64>, String>| r.as_ref().ok().and_then(|s| median(s.iter().copied()));
        let _ = writeln!(
            md,
            "| {state} | {} | {} | {} |",
            cell(baked_secs),
            cell(restore_secs),
            bench::report::times(bench::timing::ratio(of(restore_secs), of(baked_secs)), 1)
        );
    }
    let _ = writeln!(
        md,
        "\nWhere the baked image's start goes (docker's log timestamps, seconds after `docker run` was spawned, medians; init verifies the {} MB of the data directory before it starts mariadbd):\n\n| page cache | steps |\n|---|---|",
        mb(datadir_bytes)
    );
    for (state, baked_secs, _, steps) in &first_answers {
        let mut line: Vec<String> = BAKED_MARKS
            .iter()
            .filter_map(|m| {
                let at: Vec<f64> = steps
                    .iter()
                    .filter_map(|s| s.iter().find(|(l, _)| *l == m.label).map(|(_, t)| *t))
                    .collect();
                median(at).map(|t| format!("{} {t:.3}", m.label))
            })
            .collect();
        if let Some(t) = baked_secs
            .as_ref()
            .ok()
            .and_then(|s| median(s.iter().copied()))
        {
            line.push(format!("first answer {t:.3}"));
        }
        let _ = writeln!(md, "| {state} | {} |", line.join(" → "));
    }
    let _ = writeln!(
        md,
        "\nAfter the workload and a stop, the baked container's writable layer held {copied_total} bytes in all and {copied_data} bytes under /var/lib/bakedb: nothing was copied up (what it holds is the runtime files in /tmp: the profile's my.cnf, Aria's fresh control file and log, the DDL log).\n"
    );
    let _ = writeln!(
        md,
        "MariaDB's skip_external_locking is on by default, so the paper's \"disabling locking\" is already every MariaDB server's setting: its row is the untuned volume again. The restore at start excludes mariadb-install-db (made beforehand), which the official image runs at start too. Every case keeps MariaDB's default 128 MiB buffer pool, a tenth of the data: most point selects miss it, so the TPS columns measure how each case reads InnoDB pages as much as the settings."
    );
    bench::report::publish(&root, "mariadb", md, &scratch)
}
