//! bakedb-serve in the FROM-scratch image, in the real runtimes: docker (the image loaded from
//! bakedb's docker-archive), podman (the OCI layout) and runc (a bundle umoci unpacked as
//! root), each reached over host networking on 127.0.0.1 at a port chosen per test.
//!
//! What is proved: the image starts (init verifies, then execs bakedb-serve as the data
//! owner) and answers health, schema, queries with positional and named parameters, NDJSON
//! streaming; writes are refused (403 with the reason), malformed SQL is a 400 with its
//! position, a huge result is truncated at the row limit, a runaway recursive query ends in a
//! 504 at the time limit while other queries keep being answered (streamed or not, and
//! counted in the metrics); SIGTERM (docker stop, podman stop, runc kill) turns new requests
//! away, lets the query in flight finish, and the server exits 0; after a read
//! workload `docker diff` shows nothing changed in the container (nothing copied up from the
//! data layer); a bounded load test with many connections gets only 200s and the documented
//! 503s, every answer correct, with bounded RSS. With --base, the image has the same init and
//! data layers as the FROM-scratch image of the same database, the user's CMD, and no serve
//! layer. bakedb-serve as a host process is tested in crates/serve/tests/api.rs.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use bakedb_testkit::containers::{
    Cli, Container, Runc, RuncContainer, docker_cli, podman, podman_cli, runc_and_umoci_as_root,
};
use bakedb_testkit::fixtures::items_db;
use bakedb_testkit::ports::free_addr;
use bakedb_testkit::serve::{
    RUNAWAY, WRITES, assert_items_3_and_4, assert_items_schema, assert_malformed_requests_refused,
    assert_refused, get_query, metric, ndjson, ndjson_lines, query,
};

use crate::http;
use crate::require;
use crate::util::{
    self, assert_process_user, build_sqlite, busybox_base, run_ok, stdout, test_dir, unique_name,
};

const INIT: &str = "/bakedb/init";
const DATA_DIR: &str = "/var/lib/bakedb";
const DATA_FILE: &str = "/var/lib/bakedb/app.db";
/// The data owner, the image's default User.
const OWNER: (u32, u32) = (65532, 65532);

/// Rows of `items` in the test database.
const ROWS: i64 = 5000;

/// Seconds of work that then answers normally: the query in flight during a drain.
const SLOW_COUNT: i64 = 6_000_000;
fn slow_query() -> String {
    format!(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {SLOW_COUNT}) SELECT count(*) FROM c"
    )
}

/// Settings of a container that a drain is tested on: the slow query must neither hit the
/// time limit nor outlast the drain.
const DRAIN_ENV: [(&str, &str); 2] = [
    ("BAKEDB_QUERY_TIMEOUT_MS", "120000"),
    ("BAKEDB_DRAIN_MS", "120000"),
];

/// The longest a server may take to answer /healthz after its container started, or to exit
/// after SIGTERM, before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(90);

/// What bakedb-serve prints on SIGTERM and when it has drained.
const DRAINING: &str = "bakedb-serve: draining: no new connections, ";
const STOPPED: &str = "bakedb-serve: stopped";

/// `bakedb build --json` of app.db in `dir` (FROM scratch unless `extra` says otherwise).
fn build(dir: &Path, output: &str, extra: &[&str]) -> Value {
    build_sqlite(dir, "app.db", output, extra)
}

fn metrics(addr: SocketAddr) -> String {
    let r = http::get(addr, "/metrics");
    assert_eq!(r.status, 200, "/metrics: {}", r.text());
    r.text()
}

/// Poll /healthz until it answers 200 (its JSON), failing if the server's container exits
/// first or PATIENCE runs out.
fn wait_ready(addr: SocketAddr, running: &dyn Fn() -> bool, logs: &dyn Fn() -> String) -> Value {
    let started = Instant::now();
    loop {
        let last = match http::request(addr, "GET", "/healthz", &[], b"") {
            Ok(r) if r.status == 200 => return r.json(),
            Ok(r) => format!("{} {}", r.status, r.text()),
            Err(e) => e.to_string(),
        };
        assert!(
            running(),
            "the server exited before it answered http://{addr}/healthz ({last}):\n{}",
            logs()
        );
        assert!(
            started.elapsed() < PATIENCE,
            "no 200 from http://{addr}/healthz after {PATIENCE:?} ({last}):\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until `n` requests are in flight (the metrics request that asks counts too), failing
/// if `done` says the one waited for has already ended.
fn wait_in_flight(addr: SocketAddr, n: u64, done: &dyn Fn() -> bool) {
    let started = Instant::now();
    loop {
        let m = metrics(addr);
        if metric(&m, "bakedb_in_flight") >= n {
            return;
        }
        assert!(
            !done(),
            "the query ended before {n} requests were seen in flight"
        );
        assert!(
            started.elapsed() < PATIENCE,
            "never {n} requests in flight:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// The API checks, shared by the runtimes

/// /healthz names the baked database and the data digest of the image.
fn check_health(health: &Value, built: &Value) {
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["database"], DATA_FILE, "{health}");
    assert_eq!(health["data_digest"], built["data_digest"], "{health}");
}

fn check_schema(addr: SocketAddr) {
    let r = http::get(addr, "/v1/schema");
    assert_eq!(r.status, 200, "{}", r.text());
    let schema = r.json();
    let tables = assert_items_schema(&schema);
    assert_eq!(tables[0]["type"], "view", "{schema}");
}

/// GET with positional parameters, POST with named and positional ones.
fn check_parameterised_queries(addr: SocketAddr) {
    let body = assert_items_3_and_4(addr);
    assert!(body["elapsed_ms"].as_f64().is_some(), "{body}");

    let r = query(
        addr,
        "SELECT count(*) AS n FROM items WHERE price >= :low AND name < :name",
        json!({":low": 10, "name": "item-00050"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["columns"], json!(["n"]), "{}", r.text());
    assert_eq!(r.json()["rows"], json!([[10]]), "{}", r.text());

    let r = query(
        addr,
        "SELECT id FROM items WHERE name = ?1",
        json!(["item-04242"]),
    );
    assert_eq!(r.json()["rows"], json!([[4242]]), "{}", r.text());
}

/// A streamed answer: the columns, one array per row, then the count.
fn check_ndjson(addr: SocketAddr) {
    let r = ndjson(addr, "SELECT id, name FROM items ORDER BY id");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines = ndjson_lines(&r);
    assert_eq!(lines.len(), ROWS as usize + 2);
    assert_eq!(lines[0], json!({"columns": ["id", "name"]}));
    for (i, line) in lines[1..=ROWS as usize].iter().enumerate() {
        let id = i as i64 + 1;
        assert_eq!(*line, json!([id, format!("item-{id:05}")]));
    }
    let last = &lines[ROWS as usize + 1];
    assert_eq!(last["rows"], ROWS, "{last}");
    assert_eq!(last["truncated"], false, "{last}");
}

/// A write is a 403 naming what was refused, and the data is unchanged afterwards.
fn check_write_refused(addr: SocketAddr) {
    for (sql, reason) in [
        ("INSERT INTO items(name) VALUES ('x')", "INSERT into items"),
        ("DELETE FROM items", "DELETE from items"),
    ] {
        assert_refused(&query(addr, sql, json!(null)), sql, reason);
    }
    let r = query(addr, "SELECT count(*) FROM items", json!(null));
    assert_eq!(r.json()["rows"], json!([[ROWS]]), "{}", r.text());
}

/// With a query in flight, `stop()` sends SIGTERM: from then on new requests are turned
/// away (the connection is refused, or a 503 while draining), yet the query in flight gets
/// its whole answer. The caller then checks the exit status and the log (`check_drained`).
fn check_drain(addr: SocketAddr, stop: &(dyn Fn() + Sync)) {
    std::thread::scope(|scope| {
        let slow = scope.spawn(move || query(addr, &slow_query(), json!(null)));
        // The slow query plus the metrics request asking.
        wait_in_flight(addr, 2, &|| slow.is_finished());
        let stopping = scope.spawn(stop);
        let mut turned_away = None;
        while !slow.is_finished() {
            match http::request(addr, "GET", "/healthz", &[], b"") {
                Err(e) => turned_away = Some(format!("connection failed: {e}")),
                Ok(r) if r.status == 503 => turned_away = Some(format!("503 {}", r.text())),
                // Not yet signalled.
                Ok(r) => assert_eq!(r.status, 200, "/healthz: {}", r.text()),
            }
            if turned_away.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = slow.join().unwrap();
        assert_eq!(
            r.status,
            200,
            "the query in flight at SIGTERM: {}",
            r.text()
        );
        assert_eq!(r.json()["rows"], json!([[SLOW_COUNT]]), "{}", r.text());
        stopping.join().unwrap();
        assert!(
            turned_away.is_some(),
            "after SIGTERM, new requests were still answered until the query in flight ended"
        );
        eprintln!("a new request after SIGTERM: {}", turned_away.unwrap());
    });
}

/// The server said it drained with the query in flight and stopped cleanly; nothing listens
/// on its address any more.
fn check_drained(addr: SocketAddr, log: &str) {
    eprintln!("the server's log:\n{log}");
    let in_flight: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix(DRAINING))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {DRAINING:?} line in the log:\n{log}"));
    assert!(
        in_flight >= 1,
        "SIGTERM came when no query was in flight, so the drain proved nothing:\n{log}"
    );
    assert!(
        log.lines().any(|l| l == STOPPED),
        "no {STOPPED:?} line in the log:\n{log}"
    );
    assert!(
        !log.contains("still in flight"),
        "the drain deadline cut queries off:\n{log}"
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "something still accepts on {addr} after the server stopped"
    );
}

/// `/proc/PID/status` of the host process `pid`, as `key -> value` lines.
fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
}

fn kib(status: &str, key: &str) -> u64 {
    status_field(status, key)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} is not in kB:\n{status}"))
}

/// init exec'd the server: the container's first process is bakedb-serve, running as the
/// data owner.
fn check_server_process(pid: u32) {
    let status = proc_status(pid);
    assert_eq!(status_field(&status, "Name"), "bakedb-serve", "{status}");
    let uids: Vec<&str> = status_field(&status, "Uid").split_whitespace().collect();
    let gids: Vec<&str> = status_field(&status, "Gid").split_whitespace().collect();
    let (uid, gid) = (OWNER.0.to_string(), OWNER.1.to_string());
    assert_eq!(uids, [uid.as_str(); 4], "{status}");
    assert_eq!(gids, [gid.as_str(); 4], "{status}");
}

// ---------------------------------------------------------------------------------------
// Containers of docker and podman

/// A container serving on `addr`, removed (killed if need be) when dropped.
struct Served {
    container: Container,
    addr: SocketAddr,
}

impl std::ops::Deref for Served {
    type Target = Container;

    fn deref(&self) -> &Container {
        &self.container
    }
}

impl Served {
    fn new(cli: Cli) -> Served {
        Served {
            container: Container::new(cli, unique_name("bakedb-e2e-serve")),
            addr: free_addr(),
        }
    }

    fn wait_ready(&self) -> Value {
        wait_ready(self.addr, &|| self.running(), &|| self.logs())
    }

    /// `stop` (the image's StopSignal, SIGTERM) with time enough that it is never a SIGKILL.
    fn stop(&self) {
        run_ok(&mut self.cmd(&["stop", "--time", "120", &self.name]));
    }
}

/// `bakedb build` of a ROWS-row items database into a docker-archive, loaded into docker.
fn docker_image(docker: &Path, dir: &Path) -> (crate::util::DockerImage, Value) {
    items_db(&dir.join("app.db"), ROWS, true);
    let name = format!("bakedb-e2e/{}:v1", unique_name("serve"));
    let built = build(dir, &format!("docker-archive:serve.docker.tar:{name}"), &[]);
    let image = crate::util::DockerImage {
        docker: docker.to_owned(),
        name,
    };
    let loaded =
        run_ok(
            Command::new(docker)
                .current_dir(dir)
                .args(["load", "--input", "serve.docker.tar"]),
        );
    assert!(
        stdout(&loaded).contains(&format!("Loaded image: {}", image.name)),
        "{}",
        stdout(&loaded)
    );
    (image, built)
}

/// `docker run --detach --network host` of the image with its own command, listening on a
/// free port of 127.0.0.1, plus `env`.
fn docker_serve(docker: &Path, image: &str, env: &[(&str, &str)]) -> Served {
    let container = Served::new(docker_cli(docker));
    let mut cmd = container.cmd(&[
        "run",
        "--detach",
        "--network",
        "host",
        "--name",
        &container.name,
        "--env",
        &format!("BAKEDB_LISTEN={}", container.addr),
    ]);
    for (k, v) in env {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    run_ok(cmd.arg(image).stdin(Stdio::null()));
    container
}

/// Nothing was written in the container: in particular nothing under the data directory
/// (an open that is not read-only, a -wal, -shm or -journal file, or a chown would copy the
/// database up or add files next to it), and nothing anywhere else either.
fn check_nothing_written(container: &Container) {
    let diff = container.diff();
    let under_data: Vec<&String> = diff
        .iter()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with(DATA_DIR))
        })
        .collect();
    assert!(
        under_data.is_empty(),
        "the container changed the data directory {DATA_DIR}:\n{}",
        diff.join("\n")
    );
    assert!(
        diff.is_empty(),
        "the container wrote to its filesystem:\n{}",
        diff.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// docker

#[test]
fn docker_serves_the_whole_api_on_the_host_network_and_drains_on_sigterm() {
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let (image, built) = docker_image(&docker, dir.path());
    let c = docker_serve(&docker, &image.name, &DRAIN_ENV);
    let addr = c.addr;
    check_health(&c.wait_ready(), &built);
    check_server_process(c.pid());

    check_schema(addr);
    check_parameterised_queries(addr);
    // Views and read pragmas are reads.
    let r = query(addr, "SELECT count(*) FROM cheap", json!(null));
    assert_eq!(r.json()["rows"], json!([[39]]), "{}", r.text());
    let r = query(
        addr,
        "SELECT name FROM pragma_table_info('items') ORDER BY cid",
        json!([]),
    );
    assert_eq!(
        r.json()["rows"],
        json!([["id"], ["name"], ["price"], ["data"]]),
        "{}",
        r.text()
    );
    check_ndjson(addr);

    // Writes of every kind, and what would write outside the database (ATTACH creates a
    // file, a temp table needs temporary storage): 403 with the reason.
    let drop = ("DROP TABLE items", "changing the schema (sqlite_master)");
    let writes: Vec<(&str, &str)> = WRITES.into_iter().chain([drop]).collect();
    for (sql, reason) in &writes {
        assert_refused(&query(addr, sql, json!(null)), sql, reason);
    }
    // By GET too.
    let r = get_query(addr, "DELETE FROM items WHERE id = ?1", "[1]");
    assert_eq!(r.status, 403, "{}", r.text());
    // Nothing changed, on any connection of the pool.
    for _ in 0..4 {
        let r = query(addr, "SELECT count(*), max(id) FROM items", json!(null));
        assert_eq!(r.json()["rows"], json!([[ROWS, ROWS]]), "{}", r.text());
    }

    // Malformed SQL: 400 with SQLite's message and the byte offset it points at; bad
    // parameters and bodies are 400s too.
    let r = query(addr, "SELECT * FROM items WHERE nme = 1", json!(null));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "no such column: nme", "{}", r.text());
    assert_eq!(r.json()["offset"], 26, "{}", r.text());
    let r = get_query(addr, "SELEC id FROM items", "[]");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("syntax error")),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["offset"], 0, "{}", r.text());
    let r = ndjson(addr, "SELECT FROM items");
    assert_eq!(r.status, 400, "NDJSON keeps the status code: {}", r.text());
    let r = query(addr, "SELECT 1; SELECT 2", json!(null));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = query(addr, "SELECT ?1 + ?2", json!([1]));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["error"],
        "the query takes 2 parameters, 1 were given",
        "{}",
        r.text()
    );
    let invalid_queries = 5;
    assert_malformed_requests_refused(addr);

    // A huge result: the JSON answer stops at the default row limit (10000) and says so;
    // NDJSON streams every row.
    let huge = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000) SELECT x FROM c";
    let r = query(addr, huge, json!(null));
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 10_000);
    assert_eq!(rows[0], json!([1]));
    assert_eq!(rows[9_999], json!([10_000]));
    assert_eq!(body["truncated"], true);
    // Exactly as many rows as the limit: all there, not truncated.
    let r = query(
        addr,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000) SELECT x FROM c",
        json!(null),
    );
    assert_eq!(r.json()["rows"].as_array().map(Vec::len), Some(10_000));
    assert_eq!(r.json()["truncated"], false, "{}", r.text());
    let streamed = ndjson(
        addr,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 25000) SELECT x FROM c",
    );
    assert_eq!(streamed.status, 200, "{}", streamed.text());
    let lines = ndjson_lines(&streamed);
    assert_eq!(lines.len(), 25_002);
    assert_eq!(lines[25_000], json!([25_000]));
    assert_eq!(lines[25_001]["rows"], 25_000);
    assert_eq!(lines[25_001]["truncated"], false);

    // The metrics counted what happened.
    let m = metrics(addr);
    assert_eq!(
        metric(&m, "bakedb_query_errors_total{kind=\"denied\"}"),
        writes.len() as u64 + 1,
        "{m}"
    );
    assert_eq!(
        metric(&m, "bakedb_query_errors_total{kind=\"invalid\"}"),
        invalid_queries,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "bakedb_requests_total{route=\"/v1/query\",code=\"403\"}"
        ),
        writes.len() as u64 + 1,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "bakedb_requests_total{route=\"/v1/schema\",code=\"200\"}"
        ),
        1,
        "{m}"
    );

    // All of that read the database in place.
    check_nothing_written(&c);

    check_drain(addr, &|| c.stop());
    let log = c.logs();
    assert_eq!(c.exit_code(), 0, "docker stop:\n{log}");
    check_drained(addr, &log);
}

#[test]
fn docker_stops_a_runaway_query_at_the_time_limit_while_others_are_served() {
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let (image, built) = docker_image(&docker, dir.path());
    let c = docker_serve(
        &docker,
        &image.name,
        &[
            ("BAKEDB_QUERY_TIMEOUT_MS", "1500"),
            ("BAKEDB_POOL_SIZE", "2"),
        ],
    );
    let addr = c.addr;
    check_health(&c.wait_ready(), &built);

    let runaway = std::thread::spawn(move || query(addr, RUNAWAY, json!(null)));
    wait_in_flight(addr, 2, &|| runaway.is_finished());
    // While it runs, the other connection keeps answering, correctly.
    let mut answered_meanwhile = 0;
    let mut i = 0;
    while !runaway.is_finished() {
        i += 1;
        let id = i % ROWS + 1;
        let r = query(addr, "SELECT name FROM items WHERE id = ?1", json!([id]));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["rows"], json!([[format!("item-{id:05}")]]));
        if !runaway.is_finished() {
            answered_meanwhile += 1;
        }
    }
    let r = runaway.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("longer than 1500 ms")),
        "{}",
        r.text()
    );
    assert!(
        answered_meanwhile > 0,
        "nothing was answered while the runaway query ran"
    );
    assert_eq!(http::get(addr, "/healthz").status, 200);
    // The interrupted connection serves again: both connections answer.
    for _ in 0..4 {
        let r = query(addr, "SELECT count(*) FROM items", json!(null));
        assert_eq!(r.json()["rows"], json!([[ROWS]]), "{}", r.text());
    }

    // A streamed runaway is stopped too: its columns went out, then the error line.
    let r = ndjson(addr, RUNAWAY);
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = ndjson_lines(&r);
    assert_eq!(
        lines.first(),
        Some(&json!({"columns": ["count(*)"]})),
        "{}",
        r.text()
    );
    assert!(
        lines
            .last()
            .and_then(|l| l["error"].as_str())
            .is_some_and(|e| e.contains("longer than 1500 ms")),
        "{}",
        r.text()
    );
    assert_eq!(lines.len(), 2, "{}", r.text());

    // Both were stopped by the time limit, and the metrics say so: operators watch this
    // counter to find runaway queries, streamed or not.
    let m = metrics(addr);
    assert_eq!(
        metric(&m, "bakedb_query_errors_total{kind=\"timeout\"}"),
        2,
        "two queries were stopped at the time limit (one JSON, one NDJSON):\n{m}"
    );
    assert!(c.running(), "{}", c.logs());
    check_nothing_written(&c);
    // The control: what is written in the container does show in `docker diff`.
    std::fs::write(dir.path().join("probe"), b"x").unwrap();
    run_ok(
        Command::new(&docker)
            .arg("cp")
            .arg(dir.path().join("probe"))
            .arg(format!("{}:/tmp/probe", c.name)),
    );
    assert!(
        c.diff().iter().any(|l| l == "A /tmp/probe"),
        "docker diff does not show a file copied into the container: {:?}",
        c.diff()
    );
}

#[test]
fn docker_bounded_load_many_connections_only_200_and_503_and_bounded_memory() {
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let (image, built) = docker_image(&docker, dir.path());
    // A short queue, so that the load reaches the documented 503s.
    let c = docker_serve(&docker, &image.name, &[("BAKEDB_QUEUE", "16")]);
    let addr = c.addr;
    check_health(&c.wait_ready(), &built);
    let pid = c.pid();
    check_server_process(pid);

    let (clients, per_client) = (64usize, 50usize);
    // Bounded by count and by time: no client starts a request after the deadline.
    let deadline = Instant::now() + Duration::from_secs(180);
    let handles: Vec<_> = (0..clients)
        .map(|client| {
            std::thread::spawn(move || {
                let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                let mut failures = Vec::new();
                for i in 0..per_client {
                    if Instant::now() > deadline {
                        break;
                    }
                    let n = (client * per_client + i) as i64;
                    let id = n % ROWS + 1;
                    // Three point queries by POST, then a 50-row range by GET.
                    let (result, expected) = if i % 4 == 3 {
                        let low = n % (ROWS - 50) + 1;
                        (
                            http::request(
                                addr,
                                "GET",
                                &format!(
                                    "/v1/query?sql={}&params={}",
                                    http::encode(
                                        "SELECT id FROM items WHERE id BETWEEN ?1 AND ?1 + 49 ORDER BY id"
                                    ),
                                    http::encode(&format!("[{low}]"))
                                ),
                                &[],
                                b"",
                            ),
                            json!((low..low + 50).map(|i| [i]).collect::<Vec<_>>()),
                        )
                    } else {
                        (
                            http::request(
                                addr,
                                "POST",
                                "/v1/query",
                                &[("Content-Type", "application/json")],
                                json!({"sql": "SELECT id, name FROM items WHERE id = ?1", "params": [id]})
                                    .to_string()
                                    .as_bytes(),
                            ),
                            json!([[id, format!("item-{id:05}")]]),
                        )
                    };
                    match result {
                        Ok(r) => {
                            *statuses.entry(r.status).or_default() += 1;
                            match r.status {
                                200 => {
                                    if r.json()["rows"] != expected {
                                        failures.push(format!("wrong answer: {}", r.text()));
                                    }
                                }
                                503 => {
                                    if r.header("retry-after") != Some("1") {
                                        failures.push(format!("503 without Retry-After: 1: {r:?}"));
                                    }
                                }
                                _ => failures.push(format!("{}: {}", r.status, r.text())),
                            }
                        }
                        Err(e) => failures.push(format!("request failed: {e}")),
                    }
                }
                (statuses, failures)
            })
        })
        .collect();
    let mut totals = std::collections::BTreeMap::<u16, usize>::new();
    let mut failures = Vec::new();
    for h in handles {
        let (statuses, f) = h.join().unwrap();
        for (status, n) in statuses {
            *totals.entry(status).or_default() += n;
        }
        failures.extend(f);
    }
    failures.truncate(20);
    assert!(failures.is_empty(), "{totals:?}:\n{}", failures.join("\n"));
    let ok = totals.get(&200).copied().unwrap_or(0) as u64;
    let busy = totals.get(&503).copied().unwrap_or(0) as u64;
    let answered = ok + busy;
    assert!(ok > 0, "nothing answered: {totals:?}");

    // The server counted the same: every answer it gave reached a client.
    let m = metrics(addr);
    assert_eq!(
        metric(
            &m,
            "bakedb_requests_total{route=\"/v1/query\",code=\"200\"}"
        ),
        ok,
        "{totals:?}\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "bakedb_requests_total{route=\"/v1/query\",code=\"503\"}"
        ),
        busy,
        "{totals:?}\n{m}"
    );
    assert_eq!(
        metric(&m, "bakedb_rejected_total{reason=\"queue_full\"}"),
        busy,
        "{totals:?}\n{m}"
    );

    let status = proc_status(pid);
    let (hwm, rss) = (kib(&status, "VmHWM"), kib(&status, "VmRSS"));
    assert!(
        hwm < 200 << 10,
        "bakedb-serve's peak RSS is {hwm} KiB after {answered} requests from {clients} connections"
    );
    eprintln!(
        "load: {totals:?} ({answered} of {} requests), bakedb-serve RSS {} MiB, peak {} MiB, {} threads",
        clients * per_client,
        rss >> 10,
        hwm >> 10,
        status_field(&status, "Threads")
    );
    assert_eq!(http::get(addr, "/healthz").status, 200);
    assert!(c.running(), "{}", c.logs());
    check_nothing_written(&c);
}

// ---------------------------------------------------------------------------------------
// podman

#[test]
fn podman_serves_the_oci_layout_on_the_host_network_and_drains_on_sigterm() {
    let Some(podman) = podman() else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    items_db(&d.join("app.db"), ROWS, true);
    let built = build(d, "oci:img:v1", &[]);
    let c = Served::new(podman_cli(&podman, d));
    let mut cmd = c.cmd(&[
        "run",
        "--detach",
        "--network",
        "host",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--name",
        &c.name,
        "--env",
        &format!("BAKEDB_LISTEN={}", c.addr),
    ]);
    for (k, v) in DRAIN_ENV {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    // podman names the image after the (relative, lower-case) path.
    run_ok(cmd.arg("oci:img:v1").stdin(Stdio::null()));
    let addr = c.addr;
    check_health(&c.wait_ready(), &built);
    check_server_process(c.pid());
    check_parameterised_queries(addr);
    check_write_refused(addr);
    check_ndjson(addr);

    check_drain(addr, &|| c.stop());
    let log = c.logs();
    assert_eq!(c.exit_code(), 0, "podman stop:\n{log}");
    check_drained(addr, &log);
}

// ---------------------------------------------------------------------------------------
// runc

#[test]
fn runc_serves_a_umoci_bundle_on_the_host_network_and_drains_on_sigterm() {
    let Some((runc, umoci)) = runc_and_umoci_as_root() else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    items_db(&d.join("app.db"), ROWS, true);
    let built = build(d, "oci:img:v1", &[]);
    // As root, umoci applies the tar headers' ownership for real.
    run_ok(
        Command::new(&umoci)
            .current_dir(d)
            .args(["unpack", "--image", "img:v1", "bundle"]),
    );
    let config_path = d.join("bundle/config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    // The image's own command and user, as umoci carried them over.
    assert_eq!(
        config["process"]["args"],
        json!([INIT, "bakedb-serve"]),
        "{}",
        config["process"]
    );
    assert_process_user(&config, OWNER.0, OWNER.1);
    // Host networking: no network namespace of its own.
    let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
    let before = namespaces.len();
    namespaces.retain(|ns| ns["type"] != "network");
    let after = namespaces.len();
    assert_eq!(after, before - 1, "{}", config["linux"]);
    let addr = free_addr();
    config["process"]["terminal"] = Value::Bool(false);
    let env = config["process"]["env"].as_array_mut().unwrap();
    env.push(format!("BAKEDB_LISTEN={addr}").into());
    for (k, v) in DRAIN_ENV {
        env.push(format!("{k}={v}").into());
    }
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let c = RuncContainer::start(
        Runc::new(&runc, &d.join("runc-state")),
        &d.join("bundle"),
        unique_name("bakedb-e2e-serve"),
    );
    check_health(&wait_ready(addr, &|| c.running(), &|| c.log()), &built);
    check_server_process(c.pid());
    check_parameterised_queries(addr);
    check_write_refused(addr);
    check_ndjson(addr);

    check_drain(addr, &|| {
        run_ok(&mut c.cmd(&["kill", &c.name, "TERM"]));
    });
    let status = c.wait(PATIENCE);
    let log = c.log();
    assert_eq!(status.code(), Some(0), "runc kill TERM: {status}:\n{log}");
    check_drained(addr, &log);
}

// ---------------------------------------------------------------------------------------
// --base

/// The paths in a gzip layer blob of a layout.
fn layer_paths(layout: &Path, digest: &Value) -> Vec<String> {
    let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
    let blob = std::fs::File::open(layout.join("blobs/sha256").join(hex)).unwrap();
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            e.path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_owned()
        })
        .collect()
}

fn config_in_layout(layout: &Path, built: &Value) -> Value {
    let hex = built["config_digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

#[test]
fn with_base_the_image_has_the_same_init_and_data_layers_the_users_cmd_and_no_serve_layer() {
    require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    items_db(&d.join("app.db"), ROWS, true);
    let scratch = build(d, "oci:scratch:v1", &[]);
    let cmd = r#"["sh","-c","echo user command"]"#;
    let base_ref = format!("oci:{}:latest", busybox_base().display());
    let based = build(d, "oci:based:v1", &["--base", &base_ref, "--cmd", cmd]);

    let layers = |b: &Value| b["layers"].as_array().unwrap().clone();
    let (scratch_layers, based_layers) = (layers(&scratch), layers(&based));
    // FROM scratch: init, serve, data, image.json.
    assert_eq!(scratch_layers.len(), 4, "{scratch}");
    let (init, serve, data, meta) = (
        &scratch_layers[0],
        &scratch_layers[1],
        &scratch_layers[2],
        &scratch_layers[3],
    );
    assert_eq!(
        layer_paths(&d.join("scratch"), &serve["digest"]),
        [
            "usr",
            "usr/local",
            "usr/local/bin",
            "usr/local/bin/bakedb-serve"
        ]
    );
    // On busybox: the base's layers, then the same init, data and image.json layers,
    // byte for byte (same digest, diff_id and size).
    let n = based_layers.len();
    assert!(n >= 4, "{based}");
    assert_eq!(&based_layers[n - 3], init, "the init layer differs");
    assert_eq!(&based_layers[n - 2], data, "the data layer differs");
    assert_eq!(&based_layers[n - 1], meta, "the image.json layer differs");
    assert_eq!(based["data_digest"], scratch["data_digest"]);
    // No serve layer, and no bakedb-serve in any layer.
    for layer in &based_layers {
        assert_ne!(layer["diff_id"], serve["diff_id"], "{based}");
        let paths = layer_paths(&d.join("based"), &layer["digest"]);
        assert!(
            !paths.iter().any(|p| p.ends_with("bakedb-serve")),
            "layer {} has bakedb-serve: {paths:?}",
            layer["digest"]
        );
    }

    // The user's CMD after init; the FROM-scratch image's own CMD is bakedb-serve.
    let based_config = config_in_layout(&d.join("based"), &based);
    let c = &based_config["config"];
    assert_eq!(c["Entrypoint"], json!([INIT]), "{c}");
    assert_eq!(c["Cmd"], json!(["sh", "-c", "echo user command"]), "{c}");
    assert_eq!(c["User"], "65532:65532", "{c}");
    assert!(
        based_config["history"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| !h["created_by"]
                .as_str()
                .unwrap_or("")
                .contains("bakedb-serve")),
        "{based_config}"
    );
    let scratch_config = config_in_layout(&d.join("scratch"), &scratch);
    let c = &scratch_config["config"];
    assert_eq!(c["Entrypoint"], json!([INIT]), "{c}");
    assert_eq!(c["Cmd"], json!(["bakedb-serve"]), "{c}");
    assert_eq!(c["User"], "65532:65532", "{c}");
    assert_eq!(c["ExposedPorts"], json!({"8080/tcp": {}}), "{c}");
    assert_eq!(c["StopSignal"], "SIGTERM", "{c}");
    assert!(
        c["Env"]
            .as_array()
            .unwrap()
            .contains(&json!("PATH=/usr/local/bin:/usr/bin:/bin")),
        "{c}"
    );
}
