//! What the PostgreSQL benches share: the base image fixture and this machine's PostgreSQL of
//! its major version, a live pgbench source of about N MiB, and baked images started under
//! docker and timed from `docker run` to their first answered query.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use bakedb_testkit::containers::{Container, docker_cli};
use bakedb_testkit::dirs::unique_name;
use bakedb_testkit::pg::{PgOptions, PgServer, RunAs, pg_command};
use bakedb_testkit::ports::free_port;

use super::run_quiet;
use super::steps::time_of_day;
pub use super::steps::{Mark, logs, marks, strip_timestamp};
use super::timing::first_answer;

pub const DB: &str = "bench";
pub const ROLE: &str = "bench";
pub const PASSWORD: &str = "bench-secret";
/// The first query of every start, and its expected answer: the scale.
pub const FIRST_QUERY: &str = "SELECT count(*) FROM pgbench_branches";
/// Where bakedb puts the cluster in the image (and so in a container's writable layer).
pub const IMAGE_PGDATA: &str = "var/lib/bakedb/pgdata";

/// pgbench -i: one scale step is 100,000 accounts, about 14.7 MiB with its index; an empty
/// database is about 7 MiB.
const MIB_PER_SCALE: f64 = 14.7;
const EMPTY_DB_MIB: f64 = 7.0;

/// How often a start is asked for its first answer.
pub const POLL: Duration = Duration::from_millis(10);
/// A restore at start of a large dump takes minutes.
const START_TIMEOUT: Duration = Duration::from_secs(1800);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The pgbench scale whose database is about `size_mib`.
pub fn scale(size_mib: u64) -> u64 {
    (((size_mib as f64 - EMPTY_DB_MIB) / MIB_PER_SCALE).round() as u64).max(1)
}

/// The PostgreSQL base image fixture (target/fixtures/postgres) and this machine's server
/// tools of its major version.
pub struct Fixture {
    /// `oci:LAYOUT:latest`.
    pub base_ref: String,
    /// PG_VERSION of the image's Env.
    pub base_version: String,
    /// /usr/lib/postgresql/MAJOR/bin.
    pub pg_bin: PathBuf,
    /// `postgres --version` of that directory.
    pub pg_version: String,
    /// The digests of the fixture's layers, to tell them from the layers bakedb adds.
    pub layers: Vec<String>,
}

pub fn fixture() -> Result<Fixture> {
    eprintln!("xtask: the PostgreSQL base image fixture");
    let layout = crate::fixtures::postgres()?;
    let base_ref = format!("oci:{}:latest", layout.display());
    let base_config = run_quiet(Command::new("skopeo").args(["inspect", "--config", &base_ref]))?;
    let major = base_config
        .split('"')
        .find_map(|s| s.strip_prefix("PG_MAJOR="))
        .ok_or_else(|| anyhow!("{base_ref}: its config's Env has no PG_MAJOR"))?
        .to_owned();
    let base_version = base_config
        .split('"')
        .find_map(|s| s.strip_prefix("PG_VERSION="))
        .unwrap_or("?")
        .to_owned();
    let pg_bin = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    for tool in [
        "initdb",
        "postgres",
        "psql",
        "pg_isready",
        "pgbench",
        "pg_dump",
        "pg_basebackup",
    ] {
        if !pg_bin.join(tool).is_file() {
            bail!(
                "{} has no {tool}: the base image has PostgreSQL {major}, install postgresql-{major}",
                pg_bin.display()
            );
        }
    }
    let pg_version = run_quiet(Command::new(pg_bin.join("postgres")).arg("--version"))?
        .trim()
        .to_owned();
    let layers = manifest_layers(&layout)?;
    Ok(Fixture {
        base_ref,
        base_version,
        pg_bin,
        pg_version,
        layers,
    })
}

/// The digests of the layers of the first manifest in `layout`'s index.json.
fn manifest_layers(layout: &Path) -> Result<Vec<String>> {
    let index = fs::read_to_string(layout.join("index.json"))?;
    let digest = index
        .split('"')
        .find(|s| s.starts_with("sha256:"))
        .ok_or_else(|| anyhow!("{}: no manifest in index.json", layout.display()))?;
    let manifest = fs::read_to_string(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )?;
    let layers = &manifest[manifest.find("\"layers\"").unwrap_or(0)..];
    Ok(layers
        .split('"')
        .filter(|s| s.starts_with("sha256:"))
        .map(str::to_owned)
        .collect())
}

/// A live pgbench database to bake.
pub struct Source {
    pub server: PgServer,
    /// `pg_database_size` right after `pgbench -i`.
    pub db_bytes: u64,
    /// "pgbench_accounts 1082 MB, …": each table with its indexes.
    pub tables: String,
    pub init_secs: f64,
}

impl Source {
    /// A server of `pg_bin` under `dir` (as the `postgres` user when this runs as root:
    /// PostgreSQL refuses to run as root) with database DB, `pgbench -i -s SCALE` in it and
    /// the login role ROLE (password PASSWORD, SELECT on the pgbench tables).
    pub fn pgbench(pg_bin: &Path, dir: &Path, scale: u64) -> Result<Source> {
        let run_as = RunAs::postgres()?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        eprintln!("xtask: initdb {}", dir.join("data").display());
        let server = PgServer::create(pg_bin, run_as, dir, &PgOptions::default())?;
        let mut source = Source {
            server,
            db_bytes: 0,
            tables: String::new(),
            init_secs: 0.0,
        };
        source.psql("postgres", &format!("CREATE DATABASE {DB}"))?;
        eprintln!("xtask: pgbench -i -s {scale}");
        let started = Instant::now();
        run_quiet(source.server.client("pgbench").args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            DB,
        ]))?;
        source.init_secs = started.elapsed().as_secs_f64();
        source.psql(
            DB,
            &format!(
                "CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';
                 GRANT CONNECT ON DATABASE {DB} TO {ROLE};
                 GRANT USAGE ON SCHEMA public TO {ROLE};
                 GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ROLE};"
            ),
        )?;
        source.db_bytes = source
            .psql(DB, &format!("SELECT pg_database_size('{DB}')"))?
            .parse()
            .context("pg_database_size")?;
        source.tables = source.psql(
            DB,
            "SELECT string_agg(format('%s %s MB', relname, round(pg_total_relation_size(oid) / 1e6)), ', ' ORDER BY relname) \
                 FROM pg_class WHERE relname LIKE 'pgbench_%' AND relkind = 'r'",
        )?;
        let branches = source.psql(DB, FIRST_QUERY)?;
        if branches != scale.to_string() {
            bail!("{FIRST_QUERY} answers {branches}, expected {scale}");
        }
        eprintln!(
            "xtask: database {DB}: {} bytes ({:.0} MiB) in {:.1} s; {}",
            source.db_bytes,
            source.db_bytes as f64 / (1u64 << 20) as f64,
            source.init_secs,
            source.tables
        );
        Ok(source)
    }

    /// `sql` in `db`, as postgres over TCP: psql's answer, trimmed.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        Ok(run_quiet(&mut self.server.psql_command(db, sql))?
            .trim()
            .to_owned())
    }

    /// The superuser's URL of DB, for `bakedb build --source`.
    pub fn url(&self) -> String {
        self.server.url(DB)
    }
}

/// psql and pgbench from the host, as the benchmark role over TCP.
pub struct Client {
    pub bin: PathBuf,
}

impl Client {
    pub fn cmd(&self, tool: &str, port: u16) -> Command {
        let mut cmd = pg_command(&self.bin.join(tool));
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", ROLE)
            .env("PGPASSWORD", PASSWORD)
            .env("PGDATABASE", DB)
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    }

    /// The first query's answer, or why there is none yet.
    fn first_query(&self, port: u16) -> std::result::Result<String, String> {
        let out = self
            .cmd("psql", port)
            .args(["-X", "-A", "-t", "-c", FIRST_QUERY])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

/// `docker stop` (the base image's stop signal, SIGINT: a fast shutdown), which must end in
/// exit code 0.
pub fn stop(container: &Container) -> Result<()> {
    let name = &container.name;
    let patience = STOP_TIMEOUT.as_secs().to_string();
    run_quiet(&mut container.cmd(&["stop", "-t", &patience, name]))?;
    let code = run_quiet(&mut container.cmd(&["inspect", "-f", "{{.State.ExitCode}}", name]))?;
    if code.trim() != "0" {
        bail!(
            "{name} exited with {} after `docker stop`:\n{}",
            code.trim(),
            logs(container)
        );
    }
    Ok(())
}

/// A container that answered its first query.
pub struct Started {
    pub container: Container,
    pub port: u16,
    /// From spawning `docker run` to the first answer.
    pub secs: f64,
    /// From spawning `docker run -d` to its exit.
    pub returned: Option<f64>,
    /// Seconds since midnight UTC when `docker run` was spawned, to place docker's log
    /// timestamps on the same clock.
    pub spawned_tod: f64,
}

impl Started {
    pub fn logs(&self) -> String {
        logs(&self.container)
    }
}

/// `docker run -d --network host -e PGPORT=p [-e ENV...] IMAGE`, timed to the first answer
/// to FIRST_QUERY (checked against `expected`), asked every POLL once the port accepts
/// connections.
pub fn start(
    docker: &Path,
    client: &Client,
    image: &str,
    env: &[&str],
    expected: &str,
) -> Result<Started> {
    run_container(docker, client, image, env, &[], &[], expected)
}

/// `start` with more `docker run` options (`extra`) and the command's `args`.
pub fn run_container(
    docker: &Path,
    client: &Client,
    image: &str,
    env: &[&str],
    extra: &[String],
    args: &[String],
    expected: &str,
) -> Result<Started> {
    let port = free_port();
    let container = Container::new(docker_cli(docker), unique_name("bakedb-bench-pg"));
    let mut cmd = Command::new(docker);
    cmd.args(["run", "-d", "--pull", "never", "--name", &container.name])
        .args(["--network", "host", "-e", &format!("PGPORT={port}")]);
    for e in env {
        cmd.args(["-e", e]);
    }
    cmd.args(extra).arg(image).args(args);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let last_error = std::cell::RefCell::new(String::new());
    let mut polls = 0u64;
    let spawned_tod = time_of_day(SystemTime::now());
    let started = first_answer(
        &mut cmd,
        image,
        POLL,
        START_TIMEOUT,
        |returned| {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                match client.first_query(port) {
                    Ok(answer) => return Ok(Some(answer)),
                    Err(why) => *last_error.borrow_mut() = why,
                }
            }
            polls += 1;
            // About once a second: a container that exited will never answer.
            if returned && polls.is_multiple_of(50) && status(&container) == "exited" {
                bail!(
                    "{image} exited before it answered (last psql error: {}):\n{}",
                    last_error.borrow(),
                    logs(&container)
                );
            }
            Ok(None)
        },
        || {
            anyhow!(
                "{image} did not answer within {} s (last psql error: {}):\n{}",
                START_TIMEOUT.as_secs(),
                last_error.borrow(),
                logs(&container)
            )
        },
    )?;
    if started.answer != expected {
        bail!(
            "{image} answered {FIRST_QUERY:?} with {:?}, expected {expected}",
            started.answer
        );
    }
    Ok(Started {
        container,
        port,
        secs: started.secs,
        returned: started.returned,
        spawned_tod,
    })
}

/// `running`, `exited`...: docker's state of the container ("" when it cannot tell).
fn status(container: &Container) -> String {
    run_quiet(&mut container.cmd(&["inspect", "-f", "{{.State.Status}}", &container.name]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The steps of a baked image's start: bakedb-init's lines, then postgres's. (init says what
/// it composed and verified at the same moment, once both are done.)
pub const BAKED_MARKS: [Mark; 4] = [
    Mark::at("bakedb-init verified", "bakedb-init: verified"),
    Mark::at("bakedb-init execs postgres", "bakedb-init: profile"),
    Mark::at("postgres starting", "starting PostgreSQL"),
    Mark::at("postgres ready", "ready to accept connections"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_to_the_size() {
        assert_eq!(scale(1024), 69);
        assert_eq!(scale(64), 4);
        assert_eq!(scale(1), 1);
    }
}
