//! `cargo xtask bench sqlite`: how bakedb-serve answers queries on a ~1 GiB database next to
//! `datasette serve -i`, what its read-only tuning is worth, and how long a baked image takes
//! from `docker run` to its first answer.
//!
//! The database is `bench build`'s generated event log (target/bench/app-<N>mib.db), taken
//! through `bakedb snapshot` once into target/bench/sqlite/, so every server reads the very
//! file the image holds. Load: wrk with a generated Lua script that draws a new parameter for
//! every request, the same threads, connections, duration and seeds for every server. Three
//! queries, the same SQL text with a named parameter on both servers: a point lookup by
//! primary key, a range scan over the secondary index and an aggregate over 10,000 rows.
//! A sample answer of every server to every query is checked against what rusqlite returns.
//!
//! Every server configuration (bakedb-serve tuned, with a default open, without mmap, with
//! mmap over the whole file, with SQLite's default cache; datasette) runs every query once per
//! round, each on a freshly started server after a short warm-up, so slow drift of the
//! machine hits every case alike.
//!
//! The start: `bakedb build` (timed) into an OCI layout, `skopeo copy` to a docker-archive,
//! `docker load`; then `docker run -d --network host` with and without verification, cold
//! (page cache dropped) and warm, timed from spawning `docker run` to the first 200 answer.
//! The result is printed and written between markers in docs/benchmarks.md.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bakedb_testkit::containers::{Container, docker_cli};
use bakedb_testkit::ports::free_port;
use bakedb_testkit::{http, process};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, ToSql};

use crate::bench::data::bench_database;
use crate::bench::timing::{
    NOISY, clock_ticks, cold_cache, drop_caches, first_answer, nproc, process_cpu_ticks, sync,
    until_quiet, wait_until_quiet, warm,
};
use crate::bench::tools::{
    build_layers, commit_measured, docker_bin, docker_load, docker_version, fresh_dir, image_size,
    json_u64, release_bakedb, skopeo_version, target_dir,
};
use crate::bench::{
    self, Cache, Sample, Timer, fmt, fmt_pct, fmt_range, mb, median, range, ratio, run_quiet,
    times, yes_no,
};
use crate::project_root;

/// Bump when the snapshot taken from the generated database changes.
const SNAPSHOT_VERSION: u32 = 1;

const WRK_THREADS: usize = 2;
/// wrk's own per-request timeout: long enough that a slow answer is latency, not an error.
const WRK_TIMEOUT_S: u64 = 10;
const WARMUP_S: u64 = 2;
/// Rows the range scan returns and the aggregate reads.
const RANGE_ROWS: i64 = 100;
const AGGREGATE_ROWS: i64 = 10_000;
const IMAGE: &str = "bakedb-bench-sqlite";
/// bakedb-serve's BAKEDB_SQLITE_MMAP_BYTES default before it mapped the whole file, kept as
/// a comparison.
const PARTIAL_MMAP_BYTES: u64 = 256 << 20;
/// How often the start measurement asks for its first answer.
const POLL: Duration = Duration::from_millis(5);
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Issue 5's targets.
const TARGET_POINT_SPEEDUP: f64 = 5.0;
const TARGET_FIRST_ANSWER_S: f64 = 1.5;
const TARGET_START_MIB: u64 = 1024;

pub struct SqliteOptions {
    pub size_mib: u64,
    pub duration_s: u64,
    pub connections: usize,
    pub rounds: usize,
    pub runs: usize,
}

impl SqliteOptions {
    pub fn parse(flags: &[&str]) -> Result<Self> {
        let mut options = SqliteOptions {
            size_mib: 1024,
            duration_s: 10,
            connections: 32,
            rounds: 3,
            runs: 5,
        };
        bench::flags::parse(
            "bench sqlite",
            "--size-mib N, --duration-s N, --connections N, --rounds N, --runs N",
            flags,
            |name, value| {
                match name {
                    "--size-mib" => options.size_mib = value.positive("database size in MiB")?,
                    "--duration-s" => {
                        options.duration_s = value.positive("seconds of load per case")?
                    }
                    "--connections" => {
                        options.connections = value.count("open connections of wrk")?
                    }
                    "--rounds" => options.rounds = value.count("rounds of every load case")?,
                    "--runs" => options.runs = value.count("image builds and container starts")?,
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        if options.connections < WRK_THREADS {
            bail!("--connections must be at least {WRK_THREADS} (one per wrk thread)");
        }
        Ok(options)
    }

    fn command(&self) -> String {
        format!(
            "cargo xtask bench sqlite --size-mib {} --duration-s {} --connections {} --rounds {} --runs {}",
            self.size_mib, self.duration_s, self.connections, self.rounds, self.runs
        )
    }
}

pub fn sqlite(options: &SqliteOptions) -> Result<()> {
    let root = project_root();
    let target = target_dir(&root);
    let bench_dir = target.join("bench");
    let sqlite_dir = bench_dir.join("sqlite");
    let scratch = sqlite_dir.join("run");
    fresh_dir(&scratch)?;

    let wrk = wrk_version()?;
    let datasette = Datasette::install(&bench_dir)?;

    let bakedb = release_bakedb(&root, &scratch)?;
    // A private copy, as of bakedb: a build running beside the benchmark could replace it.
    let serve = scratch.join("bakedb-serve");
    let built_serve = target
        .join("static-init")
        .join(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .join("release-serve/bakedb-serve");
    fs::copy(&built_serve, &serve).with_context(|| format!("copying {}", built_serve.display()))?;
    let commit = commit_measured(&root);

    let source = bench_database(&bench_dir, options.size_mib)?;
    let snapshot = snapshot(&bakedb, &source, &sqlite_dir, options.size_mib)?;
    let db = snapshot.db.clone();
    let workload = Workload::read(&db)?;
    eprintln!(
        "xtask: {} ({} bytes, {} rows)",
        db.display(),
        workload.db_bytes,
        workload.rows
    );
    // datasette names the database after the file: a link gives the short name /app.
    let datasette_db = scratch.join("app.db");
    fs::hard_link(&db, &datasette_db)
        .or_else(|_| std::os::unix::fs::symlink(&db, &datasette_db))
        .with_context(|| format!("linking {}", datasette_db.display()))?;

    let timer = Timer::new(scratch.join("time.out"));

    let start = match start_part(options, &bakedb, &snapshot, &workload, &scratch) {
        Ok(start) => start,
        Err(err) => {
            eprintln!("xtask: the start measurement failed: {err:#}");
            StartPart::unavailable(format!(
                "failed: {}",
                format!("{err:#}").lines().next().unwrap_or("")
            ))
        }
    };

    let configs = Config::all(&workload);
    let mut cells: Vec<Cell> = configs
        .iter()
        .enumerate()
        .flat_map(|(c, _)| {
            Query::ALL.iter().map(move |&query| Cell {
                config: c,
                query,
                samples: Vec::new(),
            })
        })
        .collect();
    let mut server_lines: Vec<Option<String>> = vec![None; configs.len()];
    let clk_tck = clock_ticks();
    // A fresh server for every query: bakedb-serve counts a request that gave up while queued
    // as waiting for good, so the requests wrk abandons when a run ends would pile up.
    for round in 1..=options.rounds {
        for (c, config) in configs.iter().enumerate() {
            for query in Query::ALL {
                eprintln!(
                    "xtask: round {round}/{}: {}: {}",
                    options.rounds,
                    config.label,
                    query.name()
                );
                // Another process took the cores during the run: take it again.
                let sample = until_quiet(
                    NOISY,
                    || {
                        warm(&db)?;
                        sync();
                        let server = if config.datasette {
                            datasette.start(&datasette_db, &scratch, config.id)?
                        } else {
                            start_serve(&serve, &db, config, &scratch)?
                        };
                        server_lines[c] = server.first_line();
                        check_sample(&server, config.datasette, query, &workload)?;
                        let sample = load(
                            &LoadRun {
                                server: &server,
                                datasette: config.datasette,
                                query,
                                workload: &workload,
                                options,
                                round,
                                clk_tck,
                            },
                            &timer,
                            &scratch,
                        )?;
                        server.stop();
                        Ok(sample)
                    },
                    |sample| sample.other_load,
                )?;
                eprintln!(
                    "xtask:   {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms{}",
                    sample.rps,
                    sample.p50_ms,
                    sample.p99_ms,
                    if sample.errors > 0 {
                        format!(", {} errors", sample.errors)
                    } else {
                        String::new()
                    }
                );
                cells
                    .iter_mut()
                    .find(|cell| cell.config == c && cell.query == query)
                    .expect("every config has every query")
                    .samples
                    .push(sample);
            }
        }
    }

    let report = Report {
        options,
        commit,
        wrk,
        datasette_version: datasette.version.clone(),
        workload: &workload,
        configs: &configs,
        cells: &cells,
        server_lines: &server_lines,
        start: &start,
        gnu_time: timer.gnu_time.is_some(),
    };
    bench::report::publish(&root, "sqlite", report.markdown(), &scratch)
}

// ---------------------------------------------------------------------------------------------
// Tools.

/// "wrk debian/4.1.0-3+b2 [epoll]", or the way to install it.
pub(crate) fn wrk_version() -> Result<String> {
    let out = Command::new("wrk")
        .arg("-v")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            anyhow!("wrk, the HTTP load generator, is missing ({e}): apt-get install wrk")
        })?;
    // `wrk -v` prints its version and usage, and exits 1.
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with("wrk "))
        .ok_or_else(|| {
            anyhow!("`wrk -v` printed no version:\n{text}\ninstall it: apt-get install wrk")
        })?;
    Ok(line
        .split(" Copyright")
        .next()
        .unwrap_or(line)
        .trim()
        .to_owned())
}

struct Datasette {
    program: PathBuf,
    version: String,
}

impl Datasette {
    /// datasette from PyPI in target/bench/venv, installed on first use.
    fn install(bench_dir: &Path) -> Result<Datasette> {
        let venv = bench_dir.join("venv");
        let program = venv.join("bin/datasette");
        if !program.is_file() {
            eprintln!(
                "xtask: installing datasette from PyPI into {}",
                venv.display()
            );
            fs::create_dir_all(bench_dir)?;
            run_quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv)).map_err(
                |e| anyhow!("{e:#}\ncreating a Python venv needs python3 and its venv module: apt-get install python3-venv"),
            )?;
            run_quiet(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "datasette"]))
                .context("pip install datasette")?;
        }
        // "datasette, version 0.65.5"
        let version = run_quiet(Command::new(&program).arg("--version"))?
            .trim()
            .replace(", version", "")
            .to_owned();
        Ok(Datasette { program, version })
    }

    fn start(&self, db: &Path, scratch: &Path, id: &str) -> Result<Server> {
        let port = free_port();
        let mut cmd = Command::new(&self.program);
        cmd.args(["serve", "-i"])
            .arg(db)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["--setting", "sql_time_limit_ms", "5000"]);
        Server::spawn(cmd, id, port, "/-/versions.json", scratch)
    }
}

// ---------------------------------------------------------------------------------------------
// The database and the queries.

struct Snapshot {
    dir: PathBuf,
    db: PathBuf,
}

/// `bakedb snapshot` of the generated database into target/bench/sqlite/app-<N>mib, reused
/// while its stamp names the same source.
fn snapshot(bakedb: &Path, source: &Path, sqlite_dir: &Path, size_mib: u64) -> Result<Snapshot> {
    let name = source.file_name().expect("a file name");
    let dir = sqlite_dir.join(format!("app-{size_mib}mib"));
    let stamp_path = sqlite_dir.join(format!("app-{size_mib}mib.stamp"));
    let source_stamp =
        fs::read_to_string(source.with_file_name(format!("{}.stamp", name.to_string_lossy())))
            .unwrap_or_default();
    let snap = Snapshot {
        db: dir.join(name),
        dir: dir.clone(),
    };
    let stamp = |bytes: u64| {
        format!(
            "snapshot {SNAPSHOT_VERSION} bytes {bytes} of {}",
            source_stamp.trim()
        )
    };
    if let (Ok(meta), Ok(found)) = (fs::metadata(&snap.db), fs::read_to_string(&stamp_path))
        && dir.join("snapshot.json").is_file()
        && found == stamp(meta.len())
    {
        eprintln!("xtask: reusing {}", snap.db.display());
        return Ok(snap);
    }
    let _ = fs::remove_file(&stamp_path);
    let partial = sqlite_dir.join(format!("app-{size_mib}mib.partial"));
    for d in [&partial, &dir] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    fs::create_dir_all(sqlite_dir)?;
    eprintln!(
        "xtask: bakedb snapshot {} → {}",
        source.display(),
        dir.display()
    );
    run_quiet(
        Command::new(bakedb)
            .args(["snapshot", "--quiet", "--engine", "sqlite", "--source"])
            .arg(source)
            .arg("--out")
            .arg(&partial)
            .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH),
    )?;
    fs::rename(&partial, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
    let bytes = fs::metadata(&snap.db)
        .with_context(|| format!("reading {}", snap.db.display()))?
        .len();
    fs::write(&stamp_path, stamp(bytes))
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(snap)
}

/// What the parameters may range over.
pub(crate) struct Workload {
    db_bytes: u64,
    /// Largest id (ids are 1..=rows, none deleted).
    rows: i64,
    /// Largest user_id with at least RANGE_ROWS index entries at or above it.
    user_max: i64,
    /// The queries' expected answers for their sample parameters, as compact JSON.
    expected: Vec<(Query, i64, String)>,
}

impl Workload {
    pub(crate) fn read(db: &Path) -> Result<Workload> {
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", db.display()))?;
        let rows: i64 = conn.query_row("SELECT max(id) FROM events", [], |r| r.get(0))?;
        let user_max: i64 = conn.query_row(
            &format!(
                "SELECT user_id FROM events ORDER BY user_id DESC LIMIT 1 OFFSET {}",
                RANGE_ROWS - 1
            ),
            [],
            |r| r.get(0),
        )?;
        if rows < AGGREGATE_ROWS {
            bail!(
                "{} has {rows} rows; the aggregate needs {AGGREGATE_ROWS}",
                db.display()
            );
        }
        let mut workload = Workload {
            db_bytes: fs::metadata(db)?.len(),
            rows,
            user_max,
            expected: Vec::new(),
        };
        for query in Query::ALL {
            let value = workload.sample(query);
            let expected = expected_rows(&conn, query, value)?;
            workload.expected.push((query, value, expected));
        }
        Ok(workload)
    }

    /// The parameter range every request draws from, uniformly.
    fn bounds(&self, query: Query) -> (i64, i64) {
        match query {
            Query::Point => (1, self.rows),
            Query::Range => (0, self.user_max),
            Query::Aggregate => (1, self.rows - AGGREGATE_ROWS + 1),
        }
    }

    /// The parameter of the checked sample answer: the middle of the range.
    fn sample(&self, query: Query) -> i64 {
        let (lo, hi) = self.bounds(query);
        lo + (hi - lo) / 2
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Query {
    Point,
    Range,
    Aggregate,
}

impl Query {
    pub(crate) const ALL: [Query; 3] = [Query::Point, Query::Range, Query::Aggregate];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Query::Point => "point lookup",
            Query::Range => "range scan",
            Query::Aggregate => "aggregate",
        }
    }

    fn param(self) -> &'static str {
        match self {
            Query::Point => "id",
            Query::Range => "user",
            Query::Aggregate => "lo",
        }
    }

    /// The same text goes to both servers. ORDER BY names the index's full order, rowid
    /// included, so the answer is one sequence whatever SQLite version plans it.
    fn sql(self) -> String {
        match self {
            Query::Point => {
                "SELECT id, user_id, kind, created_at, title, body FROM events WHERE id = :id"
                    .into()
            }
            Query::Range => format!(
                "SELECT id, user_id, created_at, kind, title FROM events WHERE user_id >= :user \
                 ORDER BY user_id, created_at, id LIMIT {RANGE_ROWS}"
            ),
            Query::Aggregate => format!(
                "SELECT kind, count(*) AS n, sum(length(body)) AS body_bytes, max(created_at) AS last \
                 FROM events WHERE id BETWEEN :lo AND :lo + {} GROUP BY kind ORDER BY kind",
                AGGREGATE_ROWS - 1
            ),
        }
    }

    fn describe(self) -> String {
        match self {
            Query::Point => "`:id` uniform over every id: one row of six columns".into(),
            Query::Range => format!(
                "`:user` uniform over 0..=the largest user_id with {RANGE_ROWS} entries above it: \
                 {RANGE_ROWS} rows through the index `events_by_user(user_id, created_at)`, each fetched from the table"
            ),
            Query::Aggregate => format!(
                "`:lo` uniform: {AGGREGATE_ROWS} consecutive rows read and grouped (8 groups)"
            ),
        }
    }
}

/// `"rows":[[…],[…]]` as both servers write it once whitespace is squeezed out.
fn expected_rows(conn: &Connection, query: Query, value: i64) -> Result<String> {
    let mut stmt = conn.prepare(&query.sql())?;
    let n = stmt.column_count();
    let name = format!(":{}", query.param());
    let params: &[(&str, &dyn ToSql)] = &[(name.as_str(), &value)];
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(match row.get_ref(i)? {
                ValueRef::Null => "null".to_owned(),
                ValueRef::Integer(v) => v.to_string(),
                ValueRef::Text(t) => json_string(&String::from_utf8_lossy(t)),
                other => bail!("{}: unexpected value {other:?}", query.name()),
            });
        }
        out.push(format!("[{}]", values.join(",")));
    }
    if out.is_empty() {
        bail!("{} with {value} returns no rows", query.name());
    }
    Ok(format!("\"rows\":[{}]", out.join(",")))
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// JSON without the whitespace between tokens: Python's `", "` and serde's `","` compare equal.
fn compact_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in s.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The request path around the parameter's value: bakedb-serve takes named parameters as a
/// JSON object, datasette as query-string fields (bound as text; SQLite applies the column's
/// integer affinity, so the plans and rows are the same).
fn request_path(datasette: bool, query: Query) -> (String, &'static str) {
    let sql = http::encode(&query.sql());
    if datasette {
        (
            format!("/app.json?sql={sql}&_shape=arrays&{}=", query.param()),
            "",
        )
    } else {
        (
            format!("/v1/query?sql={sql}&params=%7B%22{}%22%3A", query.param()),
            "%7D",
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Servers and HTTP.

/// A server started for the benchmark; stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Server {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    fn spawn(
        mut cmd: Command,
        id: &str,
        port: u16,
        ready_path: &str,
        dir: &Path,
    ) -> Result<Server> {
        let log = dir.join(format!("{id}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let mut server = Server {
            child: Some(child),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if get(server.addr, ready_path, Duration::from_secs(5)).is_ok_and(|r| r.status == 200) {
                return Ok(server);
            }
            let child = server.child.as_mut().expect("running");
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{:?} exited with {status} before answering:\n{}",
                    cmd.get_program(),
                    fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{:?} did not answer {ready_path} within a minute:\n{}",
                    cmd.get_program(),
                    fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's first log line (bakedb-serve says how it serves).
    pub(crate) fn first_line(&self) -> Option<String> {
        fs::read_to_string(&self.log)
            .ok()?
            .lines()
            .find(|l| l.starts_with("bakedb-serve: serving"))
            .map(str::to_owned)
    }

    pub(crate) fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::stop(&mut child, process::SIGTERM, Duration::from_secs(15));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

pub(crate) fn start_serve(
    serve: &Path,
    db: &Path,
    config: &Config,
    scratch: &Path,
) -> Result<Server> {
    let port = free_port();
    let mut cmd = Command::new(serve);
    // Only the settings of the configuration: nothing inherited changes what is measured.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BAKEDB_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("BAKEDB_DATABASE", db)
        .env("BAKEDB_LISTEN", format!("127.0.0.1:{port}"))
        .envs(config.env.iter().map(|(k, v)| (k, v)));
    Server::spawn(cmd, config.id, port, "/healthz", scratch)
}

/// One GET on a fresh connection, asking for JSON.
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<http::Response> {
    http::request_within(
        addr,
        "GET",
        path,
        &[("Accept", "application/json")],
        timeout,
    )
}

/// The sample answer holds exactly the rows rusqlite returns.
fn check_answer(body: &str, expected: &str, what: &str) -> Result<()> {
    if compact_json(body).contains(expected) {
        Ok(())
    } else {
        let excerpt: String = body.chars().take(600).collect();
        bail!("{what}: the answer lacks the expected rows {expected:.300}…; it was: {excerpt}")
    }
}

fn expected_for(workload: &Workload, query: Query) -> (i64, &str) {
    let (_, value, expected) = workload
        .expected
        .iter()
        .find(|(q, _, _)| *q == query)
        .expect("every query has a sample");
    (*value, expected)
}

pub(crate) fn check_sample(
    server: &Server,
    datasette: bool,
    query: Query,
    workload: &Workload,
) -> Result<()> {
    let (value, expected) = expected_for(workload, query);
    let (prefix, suffix) = request_path(datasette, query);
    let answer = get(
        server.addr,
        &format!("{prefix}{value}{suffix}"),
        Duration::from_secs(30),
    )
    .with_context(|| format!("asking {} for a {}", server.addr, query.name()))?;
    let (status, body) = (answer.status, answer.text());
    let who = if datasette {
        "datasette"
    } else {
        "bakedb-serve"
    };
    if status != 200 {
        bail!("{who} answered a {} with {status}: {body}", query.name());
    }
    check_answer(&body, expected, &format!("{who}, {}", query.name()))
}

// ---------------------------------------------------------------------------------------------
// Load.

/// A server configuration measured under load.
pub(crate) struct Config {
    pub(crate) id: &'static str,
    pub(crate) label: String,
    /// What is different from the shipped defaults.
    pub(crate) what: String,
    pub(crate) env: Vec<(&'static str, String)>,
    pub(crate) datasette: bool,
}

impl Config {
    fn all(workload: &Workload) -> Vec<Config> {
        let file_mmap = workload.db_bytes.div_ceil(1 << 20) << 20;
        let serve = |id, label: &str, what: &str, env: Vec<(&'static str, String)>| Config {
            id,
            label: label.into(),
            what: what.into(),
            env,
            datasette: false,
        };
        vec![
            serve(
                "serve-tuned",
                "bakedb-serve",
                "the image's defaults: `immutable=1&mode=ro`, query_only, the whole file memory-mapped, cache 64 MiB per connection",
                Vec::new(),
            ),
            serve(
                "serve-default-open",
                "bakedb-serve, default open",
                "`BAKEDB_SQLITE_OPEN=default`: read-write open with locking and SQLite's defaults (no mmap, 2000 KiB cache)",
                vec![("BAKEDB_SQLITE_OPEN", "default".into())],
            ),
            serve(
                "serve-mmap-0",
                "bakedb-serve, mmap off",
                "`BAKEDB_SQLITE_MMAP_BYTES=0`: every page read with pread into SQLite's cache",
                vec![("BAKEDB_SQLITE_MMAP_BYTES", "0".into())],
            ),
            serve(
                "serve-mmap-256",
                "bakedb-serve, mmap 256 MiB",
                &format!(
                    "`BAKEDB_SQLITE_MMAP_BYTES={PARTIAL_MMAP_BYTES}`: only the first 256 MiB mapped (the default before this was measured){}",
                    if file_mmap <= PARTIAL_MMAP_BYTES {
                        "; for a file this small that maps all of it, as the defaults do, so this only shows the noise"
                    } else {
                        ""
                    }
                ),
                vec![("BAKEDB_SQLITE_MMAP_BYTES", PARTIAL_MMAP_BYTES.to_string())],
            ),
            serve(
                "serve-cache-2000",
                "bakedb-serve, cache 2000 KiB",
                "`BAKEDB_SQLITE_CACHE_KIB=2000`: SQLite's default cache size",
                vec![("BAKEDB_SQLITE_CACHE_KIB", "2000".into())],
            ),
            Config {
                id: "datasette",
                label: "datasette".into(),
                what: String::new(),
                env: Vec::new(),
                datasette: true,
            },
        ]
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct LoadSample {
    /// 2xx answers per second.
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Non-2xx answers and socket errors (connect, read, write, timeout).
    errors: u64,
    /// The server's user+sys CPU time per answer.
    server_cpu_ms: Option<f64>,
    /// Share of all cores other processes (not wrk, not the server) used.
    pub(crate) other_load: Option<f64>,
}

pub(crate) struct Cell {
    pub(crate) config: usize,
    pub(crate) query: Query,
    pub(crate) samples: Vec<LoadSample>,
}

impl Cell {
    fn median(&self, f: impl Fn(&LoadSample) -> Option<f64>) -> Option<f64> {
        median(self.samples.iter().filter_map(f))
    }

    pub(crate) fn rps(&self) -> Option<f64> {
        self.median(|s| Some(s.rps))
    }

    pub(crate) fn p50(&self) -> Option<f64> {
        self.median(|s| Some(s.p50_ms))
    }

    pub(crate) fn p99(&self) -> Option<f64> {
        self.median(|s| Some(s.p99_ms))
    }

    pub(crate) fn errors(&self) -> u64 {
        self.samples.iter().map(|s| s.errors).sum()
    }

    pub(crate) fn others(&self) -> Option<f64> {
        self.samples
            .iter()
            .filter_map(|s| s.other_load)
            .max_by(f64::total_cmp)
    }
}

pub(crate) struct LoadRun<'a> {
    pub(crate) server: &'a Server,
    pub(crate) datasette: bool,
    pub(crate) query: Query,
    pub(crate) workload: &'a Workload,
    pub(crate) options: &'a SqliteOptions,
    pub(crate) round: usize,
    pub(crate) clk_tck: f64,
}

/// A warm-up, then the timed wrk run.
pub(crate) fn load(run: &LoadRun<'_>, timer: &Timer, scratch: &Path) -> Result<LoadSample> {
    let (prefix, suffix) = request_path(run.datasette, run.query);
    let (lo, hi) = run.workload.bounds(run.query);
    let script = |name: &str, seed: u64| -> Result<PathBuf> {
        let path = scratch.join(name);
        fs::write(&path, wrk_script(&prefix, suffix, lo, hi, seed))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    // The timed run's seed depends on the round only: every server gets the same requests.
    let timed = script("timed.lua", run.round as u64 * 1000)?;
    let warmup = script("warmup.lua", 1_000_000 + run.round as u64 * 1000)?;
    let nproc = nproc() as f64;
    wait_until_quiet();
    wrk(
        timer,
        &warmup,
        run.server.addr,
        WARMUP_S.min(run.options.duration_s),
        run.options.connections,
    )?;
    let cpu_before = run.server.pid().and_then(process_cpu_ticks);
    let (result, wrk_sample) = wrk(
        timer,
        &timed,
        run.server.addr,
        run.options.duration_s,
        run.options.connections,
    )?;
    let cpu_after = run.server.pid().and_then(process_cpu_ticks);
    let server_cpu_s = cpu_before
        .zip(cpu_after)
        .map(|(a, b)| b.saturating_sub(a) as f64 / run.clk_tck);
    let ok = result.requests.saturating_sub(result.status_errors);
    Ok(LoadSample {
        rps: ok as f64 / result.duration_s,
        p50_ms: result.p50_ms,
        p99_ms: result.p99_ms,
        errors: result.status_errors + result.socket_errors,
        server_cpu_ms: server_cpu_s
            .filter(|_| result.requests > 0)
            .map(|s| s * 1e3 / result.requests as f64),
        other_load: wrk_sample
            .other_load
            .zip(server_cpu_s)
            .map(|(o, s)| (o - s / (wrk_sample.secs * nproc)).max(0.0)),
    })
}

fn wrk_script(prefix: &str, suffix: &str, lo: i64, hi: i64, seed: u64) -> String {
    format!(
        r#"-- generated by `cargo xtask bench sqlite`: a new uniform parameter for every request
local prefix = "{prefix}"
local suffix = "{suffix}"
local lo, hi = {lo}, {hi}
local threads = 0

function setup(thread)
  thread:set("seed", {seed} + threads)
  threads = threads + 1
end

function init(args)
  math.randomseed(seed)
end

function request()
  return wrk.format("GET", prefix .. math.random(lo, hi) .. suffix)
end

function done(summary, latency, requests)
  io.write(string.format(
    "xtask-wrk requests=%.0f duration_us=%.0f status=%.0f connect=%.0f read=%.0f write=%.0f timeout=%.0f p50_us=%.0f p99_us=%.0f\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#
    )
}

#[derive(Debug, PartialEq)]
struct WrkResult {
    requests: u64,
    duration_s: f64,
    status_errors: u64,
    socket_errors: u64,
    p50_ms: f64,
    p99_ms: f64,
}

fn wrk(
    timer: &Timer,
    script: &Path,
    addr: SocketAddr,
    duration_s: u64,
    connections: usize,
) -> Result<(WrkResult, Sample)> {
    let done = timer.run(
        Command::new("wrk")
            .arg(format!("-t{WRK_THREADS}"))
            .arg(format!("-c{connections}"))
            .arg(format!("-d{duration_s}s"))
            .arg(format!("--timeout={WRK_TIMEOUT_S}s"))
            .arg("--latency")
            .arg("-s")
            .arg(script)
            .arg(format!("http://{addr}")),
        false,
    )?;
    let result = parse_wrk(&done.stdout)
        .ok_or_else(|| anyhow!("wrk printed no summary:\n{}\n{}", done.stdout, done.stderr))?;
    if result.requests == 0 {
        bail!("wrk got no answer at all:\n{}", done.stdout);
    }
    Ok((result, done.sample))
}

fn parse_wrk(stdout: &str) -> Option<WrkResult> {
    let line = stdout.lines().find(|l| l.starts_with("xtask-wrk "))?;
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let count = |name: &str| field(name).map(|v| v as u64);
    Some(WrkResult {
        requests: count("requests")?,
        duration_s: field("duration_us")? / 1e6,
        status_errors: count("status")?,
        socket_errors: count("connect")? + count("read")? + count("write")? + count("timeout")?,
        p50_ms: field("p50_us")? / 1e3,
        p99_ms: field("p99_us")? / 1e3,
    })
}

// ---------------------------------------------------------------------------------------------
// The image and its start.

struct StartSample {
    cache: Cache,
    verify: bool,
    /// From spawning `docker run` to the first 200 answer.
    secs: f64,
    /// From spawning `docker run -d` to its exit (the container was started).
    returned_secs: Option<f64>,
}

#[derive(Default)]
struct StartPart {
    /// Why nothing (or not everything) was measured.
    unavailable: Option<String>,
    cold_unavailable: Option<String>,
    docker: String,
    skopeo: String,
    build_secs: Vec<f64>,
    /// Compressed layer sizes from `bakedb build --json`.
    layers: Vec<u64>,
    manifest_bytes: Option<u64>,
    docker_size: Option<u64>,
    load_secs: Option<f64>,
    samples: Vec<StartSample>,
    init_line: Option<String>,
    serve_line: Option<String>,
}

impl StartPart {
    fn unavailable(why: String) -> StartPart {
        StartPart {
            unavailable: Some(why),
            ..StartPart::default()
        }
    }

    fn samples(&self, cache: Cache, verify: bool) -> impl Iterator<Item = &StartSample> {
        self.samples
            .iter()
            .filter(move |s| s.cache == cache && s.verify == verify)
    }

    fn median(
        &self,
        cache: Cache,
        verify: bool,
        f: impl Fn(&StartSample) -> Option<f64>,
    ) -> Option<f64> {
        median(self.samples(cache, verify).filter_map(f))
    }

    fn range(&self, cache: Cache, verify: bool) -> Option<(f64, f64)> {
        range(self.samples(cache, verify).map(|s| s.secs))
    }
}

fn start_part(
    options: &SqliteOptions,
    bakedb: &Path,
    snapshot: &Snapshot,
    workload: &Workload,
    scratch: &Path,
) -> Result<StartPart> {
    let docker = docker_bin();
    let mut part = StartPart::default();
    match docker_version(&docker) {
        Ok(v) => part.docker = v,
        Err(e) => {
            let first = format!("{e:#}").lines().next().unwrap_or("").to_owned();
            return Ok(StartPart::unavailable(format!(
                "not measured: dockerd is not answering ({first})"
            )));
        }
    }
    match skopeo_version() {
        Ok(v) => part.skopeo = v,
        Err(_) => {
            return Ok(StartPart::unavailable(
                "not measured: skopeo is missing (apt-get install skopeo)".into(),
            ));
        }
    }
    part.cold_unavailable = cold_cache().err();

    // Build the image (timed), then hand it to docker.
    let layout = scratch.join("image");
    let reference = format!("oci:{}:bench", layout.display());
    for run in 1..=options.runs {
        eprintln!(
            "xtask: build {run}/{}: bakedb build --engine sqlite",
            options.runs
        );
        if layout.exists() {
            fs::remove_dir_all(&layout)?;
        }
        warm(&snapshot.db)?;
        sync();
        wait_until_quiet();
        let started = Instant::now();
        let json = run_quiet(
            Command::new(bakedb)
                .args(["build", "--json", "--engine", "sqlite", "--source"])
                .arg(&snapshot.dir)
                .args(["--output", &reference])
                .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH)
                .env("CI", "true"),
        )?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!("xtask:   {secs:.2} s");
        part.build_secs.push(secs);
        part.layers = build_layers(&json).into_iter().map(|(_, n)| n).collect();
        part.manifest_bytes = json_u64(&json, "manifest_size");
        sync();
    }
    let name = format!("{IMAGE}:{}mib", options.size_mib);
    let archive = scratch.join("image.tar");
    eprintln!("xtask: skopeo copy {reference} docker-archive, docker load");
    run_quiet(
        Command::new("skopeo")
            .arg("copy")
            .arg("--quiet")
            .arg(&reference)
            .arg(format!("docker-archive:{}:{name}", archive.display())),
    )?;
    let started = Instant::now();
    let _image = docker_load(&docker, &archive, &name)?;
    part.load_secs = Some(started.elapsed().as_secs_f64());
    let _ = fs::remove_file(&archive);
    part.docker_size = image_size(&docker, &name);

    let mut n = 0;
    for run in 1..=options.runs {
        for cache in Cache::BOTH {
            if cache == Cache::Cold && part.cold_unavailable.is_some() {
                continue;
            }
            for verify in [true, false] {
                n += 1;
                match cache {
                    Cache::Cold => {
                        drop_caches().map_err(|e| anyhow!("dropping the page cache: {e}"))?
                    }
                    // The previous start read every byte of the data (verification does).
                    Cache::Warm => {
                        start_once(&docker, &name, true, workload, &format!("prime-{n}"))?;
                    }
                }
                wait_until_quiet();
                let (secs, returned_secs, logs) =
                    start_once(&docker, &name, verify, workload, &n.to_string())?;
                eprintln!(
                    "xtask: start {run}/{}: {} cache, verification {}: first answer after {secs:.3} s (`docker run -d` returned after {})",
                    options.runs,
                    cache.name(),
                    if verify { "on" } else { "off" },
                    returned_secs.map_or("?".into(), |s| format!("{s:.3} s"))
                );
                let line = |prefix: &str| {
                    logs.lines()
                        .find(|l| l.starts_with(prefix))
                        .map(str::to_owned)
                };
                if verify {
                    part.init_line = line("bakedb-init: verified").or(part.init_line.take());
                }
                part.serve_line = line("bakedb-serve: serving").or(part.serve_line.take());
                part.samples.push(StartSample {
                    cache,
                    verify,
                    secs,
                    returned_secs,
                });
            }
        }
    }
    Ok(part)
}

/// One `docker run -d`, timed to the first 200 answer to a point lookup (checked): seconds to
/// that answer, seconds until `docker run -d` returned, and the container's logs. The
/// container is removed.
fn start_once(
    docker: &Path,
    image: &str,
    verify: bool,
    workload: &Workload,
    tag: &str,
) -> Result<(f64, Option<f64>, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let container = Container::new(
        docker_cli(docker),
        format!("{IMAGE}-{}-{tag}", std::process::id()),
    );
    let (value, expected) = expected_for(workload, Query::Point);
    let (prefix, suffix) = request_path(false, Query::Point);
    let path = format!("{prefix}{value}{suffix}");
    let mut cmd = Command::new(docker);
    cmd.args(["run", "-d", "--pull", "never", "--name", &container.name])
        .args(["--network", "host"])
        .args(["-e", &format!("BAKEDB_LISTEN={addr}")]);
    if !verify {
        cmd.args(["-e", "BAKEDB_VERIFY=off"]);
    }
    cmd.arg(image);
    let started = first_answer(
        &mut cmd,
        image,
        POLL,
        START_TIMEOUT,
        |_| match get(addr, &path, Duration::from_secs(30)) {
            Ok(r) if r.status == 200 => Ok(Some(r.text())),
            Ok(r) => bail!(
                "the container answered {}: {}\n{}",
                r.status,
                r.text(),
                container.logs()
            ),
            Err(_) => Ok(None),
        },
        || {
            anyhow!(
                "the container did not answer within {} s:\n{}",
                START_TIMEOUT.as_secs(),
                container.logs()
            )
        },
    )?;
    check_answer(&started.answer, expected, "the container's first answer")?;
    let logs = container.logs();
    drop(container);
    Ok((started.secs, started.returned, logs))
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report<'a> {
    options: &'a SqliteOptions,
    commit: String,
    wrk: String,
    datasette_version: String,
    workload: &'a Workload,
    configs: &'a [Config],
    cells: &'a [Cell],
    server_lines: &'a [Option<String>],
    start: &'a StartPart,
    gnu_time: bool,
}

impl Report<'_> {
    fn cell(&self, config_id: &str, query: Query) -> Option<&Cell> {
        let c = self.configs.iter().position(|c| c.id == config_id)?;
        self.cells
            .iter()
            .find(|cell| cell.config == c && cell.query == query && !cell.samples.is_empty())
    }

    fn markdown(&self) -> String {
        let nproc = nproc();
        let w = self.workload;
        let o = self.options;
        let mut md = bench::report::start("sqlite", &self.commit, &o.command());
        let _ = writeln!(
            md,
            "Input: `bakedb snapshot` of `bench build`'s generated database ({} bytes, {:.2} GiB, rollback journal): \
             table `events` with {} rows (id INTEGER PRIMARY KEY, user_id, kind, created_at, title, body, payload BLOB) \
             and the index `events_by_user(user_id, created_at)`. Every server reads that same file on 127.0.0.1, \
             its page cache warm (the file is read before every server start).\n",
            w.db_bytes,
            w.db_bytes as f64 / (1u64 << 30) as f64,
            w.rows,
        );
        let _ = writeln!(
            md,
            "Load: {} with {WRK_THREADS} threads and {} connections, {} s per case after a {} s warm-up, on the same \
             {nproc} cores as the server; every request draws a new parameter (seeded, the same sequence for every \
             server in a round); every case runs on a freshly started server. Medians of {} rounds, each case once per round; req/s counts 2xx answers only, \
             p50 and p99 are wrk's latency percentiles; \"errors\" sums non-2xx answers and socket errors over all \
             rounds. \"server CPU\" is the server process's user+sys time per answer (/proc). \"others\" is the largest share \
             of all cores that processes other than wrk and the server used during a timed run{}.\n",
            self.wrk,
            o.connections,
            o.duration_s,
            WARMUP_S.min(o.duration_s),
            o.rounds,
            if self.gnu_time {
                ""
            } else {
                " (not measured: GNU time is missing, apt-get install time)"
            },
        );
        let _ = writeln!(
            md,
            "Servers: bakedb-serve is the static binary the image carries, run directly \
             (`BAKEDB_DATABASE=… BAKEDB_LISTEN=… bakedb-serve`, one connection per core); {} is installed from PyPI \
             into target/bench/venv and runs as `datasette serve -i app.db --setting sql_time_limit_ms 5000` \
             (otherwise its defaults: 3 SQL threads, `_shape=arrays`, uvicorn's access log to a file). Both get \
             the same SQL text with a named parameter: bakedb-serve as `GET /v1/query?sql=…&params={{\"id\":N}}`, \
             datasette as `GET /app.json?sql=…&_shape=arrays&id=N` (bound as text; the column's integer affinity \
             makes it the same lookup). Before each server's runs, one answer per query was checked to hold exactly \
             the rows rusqlite returns.\n",
            self.datasette_version
        );
        let _ = writeln!(md, "| query | SQL | parameter |");
        let _ = writeln!(md, "|---|---|---|");
        for q in Query::ALL {
            let _ = writeln!(md, "| {} | `{}` | {} |", q.name(), q.sql(), q.describe());
        }

        // bakedb-serve against datasette.
        let _ = writeln!(md, "\n### bakedb-serve against datasette\n");
        let _ = writeln!(
            md,
            "| query | server | req/s | p50 ms | p99 ms | errors | server CPU ms/answer | others |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for q in Query::ALL {
            for id in ["serve-tuned", "datasette"] {
                let label = if id == "datasette" {
                    self.datasette_version.as_str()
                } else {
                    "bakedb-serve"
                };
                match self.cell(id, q) {
                    Some(cell) => {
                        let _ = writeln!(
                            md,
                            "| {} | {label} | {} | {} | {} | {} | {} | {} |",
                            q.name(),
                            fmt(cell.rps(), 0),
                            fmt(cell.p50(), 2),
                            fmt(cell.p99(), 2),
                            cell.errors(),
                            fmt(cell.median(|s| s.server_cpu_ms), 3),
                            fmt_pct(cell.others()),
                        );
                    }
                    None => {
                        let _ = writeln!(md, "| {} | {label} | not measured | | | | | |", q.name());
                    }
                }
            }
            let serve = self.cell("serve-tuned", q);
            let ds = self.cell("datasette", q);
            let _ = writeln!(
                md,
                "| {} | bakedb-serve ÷ datasette | {} | {} | {} | | {} | |",
                q.name(),
                times(ratio(serve.and_then(Cell::rps), ds.and_then(Cell::rps)), 2),
                times(ratio(serve.and_then(Cell::p50), ds.and_then(Cell::p50)), 2),
                times(ratio(serve.and_then(Cell::p99), ds.and_then(Cell::p99)), 2),
                times(
                    ratio(
                        serve.and_then(|c| c.median(|s| s.server_cpu_ms)),
                        ds.and_then(|c| c.median(|s| s.server_cpu_ms))
                    ),
                    2
                ),
            );
        }

        // Tuning.
        let _ = writeln!(md, "\n### bakedb-serve's read-only tuning\n");
        let _ = writeln!(
            md,
            "The same runs, bakedb-serve in each configuration; \"× defaults\" is the median req/s over the image's \
             defaults' median req/s for the same query{}.\n",
            if self.options.rounds > 1 {
                ", in brackets the lowest and highest ratio within one round: differences inside that range are noise"
            } else {
                ""
            }
        );
        let _ = writeln!(md, "| configuration | what differs |");
        let _ = writeln!(md, "|---|---|");
        for config in self.configs.iter().filter(|c| !c.datasette) {
            let _ = writeln!(md, "| {} | {} |", config.label, config.what);
        }
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "| query | configuration | req/s | × defaults | p50 ms | p99 ms | errors | server CPU ms/answer | others |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for q in Query::ALL {
            let tuned = self.cell("serve-tuned", q);
            for config in self.configs.iter().filter(|c| !c.datasette) {
                let Some(cell) = self.cell(config.id, q) else {
                    let _ = writeln!(
                        md,
                        "| {} | {} | not measured | | | | | | |",
                        q.name(),
                        config.label
                    );
                    continue;
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    q.name(),
                    config.label,
                    fmt(cell.rps(), 0),
                    rps_ratio(Some(cell), tuned),
                    fmt(cell.p50(), 2),
                    fmt(cell.p99(), 2),
                    cell.errors(),
                    fmt(cell.median(|s| s.server_cpu_ms), 3),
                    fmt_pct(cell.others()),
                );
            }
        }
        let _ = writeln!(md);
        for q in Query::ALL {
            let best = self
                .configs
                .iter()
                .filter(|c| !c.datasette)
                .filter_map(|c| Some((c, self.cell(c.id, q)?.rps()?)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let tuned = self.cell("serve-tuned", q).and_then(Cell::rps);
            if let (Some((config, rps)), Some(tuned)) = (best, tuned) {
                let _ = writeln!(
                    md,
                    "- {}: fastest is {} ({rps:.0} req/s, {:.2}× the defaults)",
                    q.name(),
                    if config.id == "serve-tuned" {
                        "the image's defaults".to_owned()
                    } else {
                        format!("\"{}\"", config.label)
                    },
                    rps / tuned
                );
            }
        }
        if let Some(lines) = self.serve_line() {
            let _ = writeln!(md, "\nbakedb-serve said: `{lines}`");
        }

        self.start_markdown(&mut md);
        self.targets_markdown(&mut md);
        md
    }

    fn serve_line(&self) -> Option<&str> {
        let c = self.configs.iter().position(|c| c.id == "serve-tuned")?;
        self.server_lines.get(c)?.as_deref()
    }

    fn start_markdown(&self, md: &mut String) {
        let s = self.start;
        let _ = writeln!(md, "\n### From `docker run` to the first answer\n");
        if let Some(why) = &s.unavailable {
            let _ = writeln!(md, "{why}.");
            return;
        }
        let layers: u64 = s.layers.iter().sum();
        let _ = writeln!(
            md,
            "Image: `bakedb build --engine sqlite --source <snapshot dir> --output oci:…` (gzip, FROM scratch), \
             {} layers, {} MB in all (the sum of the compressed layer sizes `bakedb build --json` prints; largest \
             {} MB; manifest {} bytes); docker reports {} MB unpacked. Build time: median {} s of {} builds, the \
             source in the page cache. Loaded with `skopeo copy` to a docker-archive ({}) and `docker load` ({} s), {}.\n",
            s.layers.len(),
            mb(layers),
            s.layers.iter().max().map_or("—".into(), |b| mb(*b)),
            s.manifest_bytes.map_or("—".into(), |b| b.to_string()),
            s.docker_size.map_or("—".into(), mb),
            fmt(median(s.build_secs.iter().copied()), 2),
            s.build_secs.len(),
            s.skopeo,
            fmt(s.load_secs, 2),
            s.docker,
        );
        let cold = match &s.cold_unavailable {
            Some(why) => format!("Cold cache: {why}."),
            None => "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` right before the run, so the data, the image's \
                     other files and docker's own programs come from the disk."
                .into(),
        };
        let _ = writeln!(
            md,
            "Each start: `docker run -d --network host -e BAKEDB_LISTEN=127.0.0.1:PORT [-e BAKEDB_VERIFY=off] IMAGE`; \
             the clock starts right before `docker run` is spawned and stops at the first 200 answer to a point \
             lookup, asked every {} ms on a new connection (the answer is checked); then the container is removed. \
             {cold} Warm: right after an untimed start with verification, which read every byte of the data. \
             Medians of {} runs, the cases alternated.\n",
            POLL.as_millis(),
            self.options.runs,
        );
        let _ = writeln!(
            md,
            "| cache | verification | first answer, median s | min–max s | `docker run -d` returned, median s |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        for cache in Cache::BOTH {
            for verify in [true, false] {
                let on = if verify {
                    "on"
                } else {
                    "off (`BAKEDB_VERIFY=off`)"
                };
                if cache == Cache::Cold
                    && let Some(why) = &s.cold_unavailable
                {
                    let _ = writeln!(md, "| {} | {on} | {why} | | |", cache.name());
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| {} | {on} | {} | {} | {} |",
                    cache.name(),
                    fmt(s.median(cache, verify, |x| Some(x.secs)), 3),
                    fmt_range(s.range(cache, verify), 3),
                    fmt(s.median(cache, verify, |x| x.returned_secs), 3),
                );
            }
        }
        if let Some(line) = &s.init_line {
            let _ = writeln!(md, "\nThe last start with verification logged: `{line}`");
        }
        if let Some(line) = &s.serve_line {
            let _ = writeln!(md, "and its bakedb-serve: `{line}`");
        }
    }

    fn targets_markdown(&self, md: &mut String) {
        let _ = writeln!(md, "\n### Targets\n");
        let _ = writeln!(md, "| target | measured | met |");
        let _ = writeln!(md, "|---|---:|---|");
        let mut notes = Vec::new();

        let serve = self.cell("serve-tuned", Query::Point);
        let ds = self.cell("datasette", Query::Point);
        let speedup = ratio(serve.and_then(Cell::rps), ds.and_then(Cell::rps));
        let met = speedup.map(|s| s >= TARGET_POINT_SPEEDUP);
        let _ = writeln!(
            md,
            "| point lookups: ≥ {TARGET_POINT_SPEEDUP:.0}× datasette's req/s | {} ({} vs {} req/s) | {} |",
            rps_ratio(serve, ds),
            fmt(serve.and_then(Cell::rps), 0),
            fmt(ds.and_then(Cell::rps), 0),
            yes_no(met)
        );
        if met == Some(false) {
            notes.push(format!(
                "point lookups: {TARGET_POINT_SPEEDUP:.0}× datasette's {} req/s is {} req/s; bakedb-serve answers {} req/s \
                 using {} ms of CPU per answer (datasette {} ms), and wrk shares the same {} cores",
                fmt(ds.and_then(Cell::rps), 0),
                fmt(ds.and_then(Cell::rps).map(|r| r * TARGET_POINT_SPEEDUP), 0),
                fmt(serve.and_then(Cell::rps), 0),
                fmt(serve.and_then(|c| c.median(|s| s.server_cpu_ms)), 3),
                fmt(ds.and_then(|c| c.median(|s| s.server_cpu_ms)), 3),
                std::thread::available_parallelism().map_or(1, usize::from),
            ));
        }
        let (p99_serve, p99_ds) = (serve.and_then(Cell::p99), ds.and_then(Cell::p99));
        let met = p99_serve.zip(p99_ds).map(|(a, b)| a < b);
        let _ = writeln!(
            md,
            "| point lookups: p99 below datasette's | {} ms vs {} ms | {} |",
            fmt(p99_serve, 2),
            fmt(p99_ds, 2),
            yes_no(met)
        );
        // Anything datasette does better is worth a line, target or not.
        for q in Query::ALL {
            let (a, b) = (self.cell("serve-tuned", q), self.cell("datasette", q));
            if let (Some(a), Some(b)) = (a.and_then(Cell::rps), b.and_then(Cell::rps))
                && b > a
            {
                notes.push(format!(
                    "{}: datasette answers more requests per second than bakedb-serve ({b:.0} vs {a:.0})",
                    q.name()
                ));
            }
            if let (Some(a), Some(b)) = (a.and_then(Cell::p99), b.and_then(Cell::p99))
                && b < a
            {
                notes.push(format!(
                    "{}: datasette's p99 is below bakedb-serve's ({b:.2} vs {a:.2} ms)",
                    q.name()
                ));
            }
        }
        for q in Query::ALL {
            let (tuned_cell, default_cell) = (
                self.cell("serve-tuned", q),
                self.cell("serve-default-open", q),
            );
            let tuned = tuned_cell.and_then(Cell::rps);
            let default = default_cell.and_then(Cell::rps);
            let met = ratio(tuned, default).map(|r| r > 1.0);
            let every_round = tuned_cell
                .zip(default_cell)
                .and_then(|(a, b)| round_ratios(a, b))
                .is_none_or(|(lo, _)| lo > 1.0);
            let _ = writeln!(
                md,
                "| {}: tuned open faster than a default open | {} ({} vs {} req/s) | {}{} |",
                q.name(),
                rps_ratio(tuned_cell, default_cell),
                fmt(tuned, 0),
                fmt(default, 0),
                yes_no(met),
                if met == Some(true) && !every_round {
                    ", but not in every round"
                } else {
                    ""
                }
            );
            if met == Some(false) {
                notes.push(format!(
                    "{}: the default open answers {} req/s, the tuned one {} req/s",
                    q.name(),
                    fmt(default, 0),
                    fmt(tuned, 0)
                ));
            }
        }
        let s = self.start;
        let size_mib = self.workload.db_bytes as f64 / (1u64 << 20) as f64;
        for cache in Cache::BOTH {
            let value = s.median(cache, true, |x| Some(x.secs));
            let why_not = s.unavailable.as_ref().or(if cache == Cache::Cold {
                s.cold_unavailable.as_ref()
            } else {
                None
            });
            let (measured, met) = match (value, why_not) {
                (Some(v), _) if (size_mib + 0.5) < TARGET_START_MIB as f64 => (
                    format!("{v:.3} s"),
                    format!(
                        "not judged: the image holds {size_mib:.0} MiB, the target is for {TARGET_START_MIB} MiB"
                    ),
                ),
                (Some(v), _) => {
                    let met = v <= TARGET_FIRST_ANSWER_S;
                    if !met {
                        notes.push(self.explain_start(cache));
                    }
                    (format!("{v:.3} s"), yes_no(Some(met)).to_owned())
                }
                (None, Some(why)) => (why.clone(), yes_no(None).to_owned()),
                (None, None) => ("—".into(), yes_no(None).to_owned()),
            };
            let _ = writeln!(
                md,
                "| first answer ≤ {TARGET_FIRST_ANSWER_S} s after `docker run`, {TARGET_START_MIB} MiB image, verification on, {} cache | {measured} | {met} |",
                cache.name()
            );
        }
        let errors: u64 = self
            .cells
            .iter()
            .filter(|c| !self.configs[c.config].datasette)
            .map(Cell::errors)
            .sum();
        if errors > 0 {
            notes.push(format!(
                "bakedb-serve: {errors} answers were not 2xx or failed on the socket"
            ));
        }
        if notes.is_empty() {
            let _ = writeln!(md, "\nEvery target is met.");
        } else {
            let _ = writeln!(md);
            for note in notes {
                let _ = writeln!(md, "- {note}");
            }
        }
    }

    fn explain_start(&self, cache: Cache) -> String {
        let s = self.start;
        format!(
            "first answer, {} cache: {} s with verification, {} s without; `docker run -d` itself returned after {} s{}",
            cache.name(),
            fmt(s.median(cache, true, |x| Some(x.secs)), 3),
            fmt(s.median(cache, false, |x| Some(x.secs)), 3),
            fmt(s.median(cache, true, |x| x.returned_secs), 3),
            s.init_line
                .as_ref()
                .map_or(String::new(), |l| format!("; init logged `{l}`")),
        )
    }
}

/// The ratio of the medians of req/s, and with several rounds the lowest and highest ratio
/// of one round (both cells run in the same rounds): "1.04× (0.98–1.10)".
pub(crate) fn rps_ratio(a: Option<&Cell>, b: Option<&Cell>) -> String {
    let (Some(a), Some(b)) = (a, b) else {
        return "—".into();
    };
    let text = times(ratio(a.rps(), b.rps()), 2);
    match round_ratios(a, b) {
        Some((lo, hi)) => format!("{text} ({lo:.2}–{hi:.2})"),
        None => text,
    }
}

/// The lowest and highest ratio of req/s within one round, with at least two rounds.
fn round_ratios(a: &Cell, b: &Cell) -> Option<(f64, f64)> {
    let per_round: Vec<f64> = a
        .samples
        .iter()
        .zip(&b.samples)
        .filter_map(|(x, y)| ratio(Some(x.rps), Some(y.rps)))
        .collect();
    if per_round.len() < 2 {
        return None;
    }
    range(per_round)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let o =
            SqliteOptions::parse(&["--size-mib", "64", "--duration-s=3", "--rounds", "1"]).unwrap();
        assert_eq!((o.size_mib, o.duration_s, o.rounds), (64, 3, 1));
        let o = SqliteOptions::parse(&[]).unwrap();
        assert_eq!(
            o.command(),
            "cargo xtask bench sqlite --size-mib 1024 --duration-s 10 --connections 32 --rounds 3 --runs 5"
        );
        assert!(SqliteOptions::parse(&["--connections", "1"]).is_err());
        assert!(SqliteOptions::parse(&["--runs", "0"]).is_err());
        assert!(SqliteOptions::parse(&["--fast"]).is_err());
    }

    #[test]
    fn reads_wrk_summary() {
        let out = "Running 3s test @ http://127.0.0.1:1\n\
                   xtask-wrk requests=1200 duration_us=3000000 status=2 connect=0 read=1 write=0 timeout=3 p50_us=1500 p99_us=8250\n";
        assert_eq!(
            parse_wrk(out),
            Some(WrkResult {
                requests: 1200,
                duration_s: 3.0,
                status_errors: 2,
                socket_errors: 4,
                p50_ms: 1.5,
                p99_ms: 8.25,
            })
        );
        assert_eq!(parse_wrk("Running 3s test"), None);
    }

    #[test]
    fn compares_answers_of_both_servers() {
        let expected = r#""rows":[[5,"ka lo, mi."]]"#;
        let python = r#"{"ok": true, "rows": [[5, "ka lo, mi."]], "truncated": false}"#;
        let serde = r#"{"columns":["id","title"],"rows":[[5,"ka lo, mi."]],"truncated":false}"#;
        assert!(check_answer(python, expected, "datasette").is_ok());
        assert!(check_answer(serde, expected, "serve").is_ok());
        assert!(check_answer(r#"{"rows": [[5, "ka lo,  mi."]]}"#, expected, "x").is_err());
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\n""#);
    }

    #[test]
    fn datasette_and_serve_get_the_same_sql() {
        let (serve, suffix) = request_path(false, Query::Point);
        let (datasette, none) = request_path(true, Query::Point);
        let sql = http::encode(&Query::Point.sql());
        assert!(serve.starts_with("/v1/query?sql=") && serve.contains(&sql));
        assert!(datasette.starts_with("/app.json?sql=") && datasette.contains(&sql));
        assert_eq!((suffix, none), ("%7D", ""));
        assert!(datasette.ends_with("&id="));
    }
}
