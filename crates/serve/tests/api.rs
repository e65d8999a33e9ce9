//! bakedb-serve as a process on 127.0.0.1 with a generated database: the HTTP API, the
//! read-only guarantees, the limits, the drain on SIGTERM and a bounded load test. The same
//! binary in docker, podman and runc is tested in tests/e2e/serve.rs; what a hostile client
//! can try is in abuse.rs.

mod server;

use std::path::Path;
use std::time::{Duration, Instant};

use bakedb_testkit::{http, serve};
use serde_json::{Value, json};

use server::{RUNAWAY, query, start, start_on};

#[test]
fn health_schema_and_queries_with_parameters() {
    let s = start("basic", 100, &[("BAKEDB_DATA_DIGEST", "sha256:abc")]);
    let h = http::get(s.addr, "/healthz");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(h.json()["data_digest"], "sha256:abc");

    serve::assert_items_schema(&http::get(s.addr, "/v1/schema").json());

    // GET with positional parameters, as a JSON array in the query string.
    let body = serve::assert_items_3_and_4(s.addr);
    assert!(body["elapsed_ms"].as_f64().unwrap() >= 0.0);

    // POST with named parameters, with or without the colon.
    let r = query(
        s.addr,
        "SELECT count(*) AS n FROM items WHERE price >= :low AND name < :name",
        json!({":low": 10, "name": "item-00050"}),
    );
    assert_eq!(r.json()["rows"], json!([[10]]), "{}", r.text());
    // Views and read pragmas work.
    assert_eq!(
        query(s.addr, "SELECT count(*) FROM cheap", json!(null)).json()["rows"],
        json!([[39]])
    );
    let r = query(
        s.addr,
        "SELECT name FROM pragma_table_info('items') ORDER BY cid",
        json!([]),
    );
    assert_eq!(
        r.json()["rows"],
        json!([["id"], ["name"], ["price"], ["data"]])
    );
}

#[test]
fn ndjson_streams_every_row() {
    let s = start("ndjson", 5000, &[("BAKEDB_MAX_ROWS", "10")]);
    let r = http::request(
        s.addr,
        "POST",
        "/v1/query",
        &[
            ("Accept", "application/x-ndjson"),
            ("Content-Type", "application/json"),
        ],
        json!({"sql": "SELECT id, name FROM items ORDER BY id"})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Streaming is for large results: the JSON row limit does not apply.
    assert_eq!(lines.len(), 5002);
    assert_eq!(lines[0], json!({"columns": ["id", "name"]}));
    assert_eq!(lines[1], json!([1, "item-00001"]));
    assert_eq!(lines[5000], json!([5000, "item-05000"]));
    assert_eq!(lines[5001]["rows"], 5000);
    assert_eq!(lines[5001]["truncated"], false);
    // Errors before the first row keep their status code.
    let r = http::request(
        s.addr,
        "GET",
        &format!("/v1/query?sql={}", http::encode("SELEC 1")),
        &[("Accept", "application/x-ndjson")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 400);
}

#[test]
fn writes_are_refused_with_sqlites_reason_and_bad_sql_with_its_position() {
    let s = start("readonly", 10, &[]);
    for (sql, reason) in serve::WRITES.into_iter().chain([
        (
            "DROP TABLE items",
            "changing the schema (sqlite_master) is not allowed: the database is a read-only snapshot",
        ),
        // Every refusal is a sentence, never Rust's Debug text (`Analyze { table_name: .. }`).
        (
            "ANALYZE items",
            "ANALYZE items is not allowed: the database is a read-only snapshot",
        ),
        (
            "REINDEX items_name",
            "REINDEX items_name is not allowed: the database is a read-only snapshot",
        ),
        (
            "CREATE VIRTUAL TABLE v USING fts5(x)",
            "changing the schema (sqlite_master) is not allowed",
        ),
    ]) {
        let body = serve::assert_refused(&query(s.addr, sql, json!(null)), sql, reason);
        assert!(
            !body["reason"].as_str().unwrap_or("").contains('{'),
            "{sql}: {body}"
        );
    }
    // Reading still works afterwards on every connection.
    for _ in 0..4 {
        assert_eq!(
            query(s.addr, "SELECT count(*) FROM items", json!(null)).json()["rows"],
            json!([[10]])
        );
    }

    let r = query(s.addr, "SELECT * FROM items WHERE nme = 1", json!(null));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"], "no such column: nme");
    assert_eq!(r.json()["offset"], 26);
    let r = query(s.addr, "SELECT 1; SELECT 2", json!(null));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("one statement")
    );
    let r = query(s.addr, "SELECT ?1 + ?2", json!([1]));
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"],
        "the query takes 2 parameters, 1 were given"
    );
    let r = query(s.addr, "SELECT :a", json!({"b": 1}));
    assert_eq!(r.json()["error"], "the query has no parameter named :b");
    let r = query(s.addr, "SELECT ?1", json!([[1, 2]]));
    assert_eq!(r.status, 400);
    serve::assert_malformed_requests_refused(s.addr);
}

/// R*Tree and FTS5 tables (whose modules prepare INSERTs on their shadow tables when first
/// used), generated columns, and a virtual table of a module bakedb-serve does not have.
fn make_real_world_db(path: &Path) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE VIRTUAL TABLE places USING rtree(id, min_x, max_x, min_y, max_y);
         INSERT INTO places VALUES (1, 0, 1, 0, 1), (2, 10, 11, 10, 11);
         CREATE VIRTUAL TABLE docs USING fts5(title, body);
         INSERT INTO docs VALUES ('bakedb', 'read-only images'), ('sqlite', 'one file');
         CREATE TABLE prices(net REAL, gross REAL GENERATED ALWAYS AS (net * 1.2) STORED,
                             label TEXT GENERATED ALWAYS AS ('net ' || net) VIRTUAL);
         INSERT INTO prices(net) VALUES (10);
         PRAGMA writable_schema = ON;
         INSERT INTO sqlite_schema(type, name, tbl_name, rootpage, sql)
             VALUES ('table', 'fuzzy', 'fuzzy', 0, 'CREATE VIRTUAL TABLE fuzzy USING spellfix1');
         PRAGMA writable_schema = OFF;",
    )
    .unwrap();
}

#[test]
fn rtree_fts5_generated_columns_and_read_pragmas_are_served_and_writes_still_refused() {
    let s = start_on(
        "real-world",
        make_real_world_db,
        &[("BAKEDB_POOL_SIZE", "2")],
    );
    // Every connection of the pool answers, the first statement on each connects the
    // virtual tables.
    for _ in 0..3 {
        let r = query(
            s.addr,
            "SELECT id FROM places WHERE min_x >= ?1 ORDER BY id",
            json!([5]),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["rows"], json!([[2]]));
        let r = query(
            s.addr,
            "SELECT title FROM docs WHERE docs MATCH ?1",
            json!(["file"]),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["rows"], json!([["sqlite"]]));
    }
    let r = query(s.addr, "SELECT * FROM prices", json!(null));
    assert_eq!(r.json()["columns"], json!(["net", "gross", "label"]));
    assert_eq!(r.json()["rows"], json!([[10.0, 12.0, "net 10.0"]]));

    let r = http::get(s.addr, "/v1/schema");
    assert_eq!(r.status, 200, "{}", r.text());
    let schema = r.json();
    let table = |name: &str| {
        schema["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no {name}: {schema}"))
            .clone()
    };
    assert_eq!(table("places")["type"], "virtual");
    assert_eq!(table("places_node")["type"], "shadow");
    assert_eq!(table("docs")["type"], "virtual");
    assert_eq!(table("prices")["type"], "table");
    assert_eq!(
        table("prices")["columns"],
        json!([
            {"name": "net", "type": "REAL", "notnull": false, "default": null, "primary_key": 0,
             "hidden": false, "generated": null},
            {"name": "gross", "type": "REAL", "notnull": false, "default": null, "primary_key": 0,
             "hidden": false, "generated": "stored"},
            {"name": "label", "type": "TEXT", "notnull": false, "default": null, "primary_key": 0,
             "hidden": false, "generated": "virtual"},
        ])
    );
    assert!(
        table("fuzzy")["error"]
            .as_str()
            .is_some_and(|e| e.contains("no such module: spellfix1")),
        "{}",
        table("fuzzy")
    );

    for sql in [
        "PRAGMA integrity_check",
        "PRAGMA quick_check",
        "PRAGMA auto_vacuum",
        "PRAGMA freelist_count",
        "PRAGMA journal_mode",
        "PRAGMA cache_size",
        "PRAGMA query_only",
        "PRAGMA index_list(docs_data)",
        "PRAGMA table_xinfo(places)",
    ] {
        let r = query(s.addr, sql, json!(null));
        assert_eq!(r.status, 200, "{sql}: {}", r.text());
    }
    assert_eq!(
        query(s.addr, "PRAGMA integrity_check", json!(null)).json()["rows"],
        json!([["ok"]])
    );
    for (sql, reason) in [
        (
            "INSERT INTO places_node VALUES (7, x'00')",
            "INSERT into places_node is not allowed: the database is a read-only snapshot",
        ),
        (
            "DELETE FROM docs_data",
            "DELETE from docs_data is not allowed",
        ),
        (
            "INSERT INTO places VALUES (3, 0, 1, 0, 1)",
            "INSERT into places is not allowed",
        ),
        (
            "INSERT INTO docs(docs) VALUES ('optimize')",
            "INSERT into docs is not allowed",
        ),
        (
            "PRAGMA query_only = 0",
            "PRAGMA query_only = 0 is not allowed",
        ),
        (
            "PRAGMA cache_size = 5",
            "PRAGMA cache_size = 5 is not allowed",
        ),
        (
            "PRAGMA mmap_size = 0",
            "PRAGMA mmap_size = 0 is not allowed",
        ),
        ("PRAGMA optimize", "PRAGMA optimize is not allowed"),
    ] {
        let r = query(s.addr, sql, json!(null));
        assert_eq!(r.status, 403, "{sql}: {}", r.text());
        let body = r.json();
        assert!(
            body["reason"].as_str().unwrap_or("").contains(reason),
            "{sql}: {body}"
        );
    }
    // Still read-only on every connection after all that.
    for _ in 0..2 {
        assert_eq!(
            query(s.addr, "PRAGMA query_only", json!(null)).json()["rows"],
            json!([[1]])
        );
    }
}

#[test]
fn a_runaway_query_is_stopped_at_the_time_limit_while_others_are_served() {
    let s = start(
        "timeout",
        10,
        &[
            ("BAKEDB_QUERY_TIMEOUT_MS", "1500"),
            ("BAKEDB_POOL_SIZE", "2"),
        ],
    );
    let addr = s.addr;
    let runaway = std::thread::spawn(move || query(addr, RUNAWAY, json!(null)));
    // While it runs, the other connection keeps answering.
    let mut answered = 0;
    while !runaway.is_finished() {
        let r = query(s.addr, "SELECT count(*) FROM items", json!(null));
        assert_eq!(r.status, 200, "{}", r.text());
        answered += 1;
    }
    let r = runaway.join().unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("longer than 1500 ms")
    );
    assert!(
        answered > 0,
        "nothing was answered while the runaway query ran"
    );
    assert_eq!(http::get(s.addr, "/healthz").status, 200);
    // The interrupted connection is usable again.
    for _ in 0..4 {
        assert_eq!(query(s.addr, "SELECT 1", json!(null)).status, 200);
    }
    let metrics = http::get(s.addr, "/metrics").text();
    assert!(
        metrics.contains("bakedb_query_errors_total{kind=\"timeout\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_huge_result_is_truncated() {
    let s = start("truncate", 1000, &[("BAKEDB_MAX_ROWS", "100")]);
    let r = query(s.addr, "SELECT * FROM items", json!(null));
    let body = r.json();
    assert_eq!(body["rows"].as_array().unwrap().len(), 100);
    assert_eq!(body["truncated"], true);
    let r = query(s.addr, "SELECT * FROM items LIMIT 100", json!(null));
    assert_eq!(r.json()["truncated"], false);
}

#[test]
fn a_full_queue_answers_503_at_once() {
    let s = start(
        "queue",
        10,
        &[
            ("BAKEDB_POOL_SIZE", "1"),
            ("BAKEDB_QUEUE", "1"),
            ("BAKEDB_QUERY_TIMEOUT_MS", "3000"),
        ],
    );
    let addr = s.addr;
    // In flight counts the metrics request that asks, too.
    let wait_for_in_flight = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = http::get(addr, "/metrics").text();
            if m.contains(&format!("bakedb_in_flight {n}")) {
                return;
            }
            assert!(Instant::now() < deadline, "never {n} in flight:\n{m}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let running = std::thread::spawn(move || query(addr, RUNAWAY, json!(null)));
    wait_for_in_flight(2);
    let waiting = std::thread::spawn(move || query(addr, "SELECT 1", json!(null)));
    wait_for_in_flight(3);
    let r = query(s.addr, "SELECT 1", json!(null));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(running.join().unwrap().status, 504);
    assert_eq!(waiting.join().unwrap().status, 200);
    let m = http::get(s.addr, "/metrics").text();
    assert!(
        m.contains("bakedb_rejected_total{reason=\"queue_full\"} 1"),
        "{m}"
    );
}

#[test]
fn sigterm_lets_the_query_in_flight_finish_then_exits_0() {
    let mut s = start("drain", 10, &[("BAKEDB_QUERY_TIMEOUT_MS", "60000")]);
    let addr = s.addr;
    // About a second of work that then answers normally.
    let slow = std::thread::spawn(move || {
        query(
            addr,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c",
            json!(null),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http::get(s.addr, "/metrics")
        .text()
        .contains("bakedb_in_flight 2")
    {
        assert!(Instant::now() < deadline, "the slow query never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling the server this test started.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["rows"], json!([[3000000]]));
    let status = s.child.wait().unwrap();
    let log = s.exited_log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("bakedb-serve: draining"), "{log}");
    assert!(log.contains("bakedb-serve: stopped"), "{log}");
    assert!(
        std::net::TcpStream::connect(s.addr).is_err(),
        "still accepting after the drain"
    );
}

#[test]
fn the_database_directory_is_never_written() {
    let s = start("nowrite", 50, &[]);
    let dir = s.dir.0.clone();
    let before: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mtime = std::fs::metadata(dir.join("app.db"))
        .unwrap()
        .modified()
        .unwrap();
    for _ in 0..20 {
        assert_eq!(
            query(
                s.addr,
                "SELECT * FROM items ORDER BY price DESC",
                json!(null)
            )
            .status,
            200
        );
    }
    let after: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "no -journal, -wal or -shm files");
    assert_eq!(
        std::fs::metadata(dir.join("app.db"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
}

#[test]
fn bounded_load_many_connections_no_unexpected_errors_and_bounded_memory() {
    let s = start("load", 20_000, &[("BAKEDB_QUEUE", "32")]);
    let addr = s.addr;
    let (clients, per_client) = (64, 40);
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                let mut counts = std::collections::BTreeMap::<u16, usize>::new();
                for i in 0..per_client {
                    let id = (c * per_client + i) % 20_000 + 1;
                    // A full queue answers 503 at once; a client that retries gets its row.
                    // How many are turned away depends on the machine's load, so the test
                    // asserts only what must hold: every answer is a 200 with the right row
                    // or a 503, and every request is answered in the end.
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        let r = query(
                            addr,
                            "SELECT id, name, price FROM items WHERE id = ?1",
                            json!([id]),
                        );
                        *counts.entry(r.status).or_default() += 1;
                        if r.status == 200 {
                            assert_eq!(r.json()["rows"][0][0], id, "wrong row");
                            break;
                        }
                        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
                        assert!(attempts < 100_000, "request {id} never answered");
                    }
                }
                counts
            })
        })
        .collect();
    let mut totals = std::collections::BTreeMap::<u16, usize>::new();
    for h in handles {
        for (status, n) in h.join().unwrap() {
            *totals.entry(status).or_default() += n;
        }
    }
    assert_eq!(
        totals.get(&200).copied().unwrap_or(0),
        clients * per_client,
        "{totals:?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(hwm_kib < 200 * 1024, "peak RSS {hwm_kib} KiB");
    eprintln!(
        "load: {totals:?} in {:.2} s, peak RSS {} MiB",
        started.elapsed().as_secs_f64(),
        hwm_kib / 1024
    );
}

#[test]
fn a_stream_stopped_at_the_time_limit_ends_with_an_error_line_and_is_counted() {
    let s = start("streamtimeout", 10, &[("BAKEDB_QUERY_TIMEOUT_MS", "500")]);
    let r = http::request(
        s.addr,
        "POST",
        "/v1/query",
        &[("Accept", "application/x-ndjson"), ("Content-Type", "application/json")],
        json!({"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "the first rows were already sent");
    let text = r.text();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0], json!({"columns": ["x"]}));
    assert_eq!(lines[1], json!([1]));
    let last = lines.last().unwrap();
    assert_eq!(
        last["error"],
        "the query ran longer than 500 ms and was interrupted (BAKEDB_QUERY_TIMEOUT_MS)",
        "{last}"
    );
    let m = http::get(s.addr, "/metrics").text();
    assert!(
        m.contains("bakedb_query_errors_total{kind=\"timeout\"} 1"),
        "{m}"
    );
}

#[test]
fn clients_that_give_up_while_queued_leave_no_trace() {
    let s = start(
        "abandon",
        10,
        &[
            ("BAKEDB_POOL_SIZE", "1"),
            ("BAKEDB_QUEUE", "3"),
            ("BAKEDB_QUERY_TIMEOUT_MS", "1500"),
        ],
    );
    let addr = s.addr;
    let metric = |name: &str| -> u64 {
        let m = http::get(addr, "/metrics").text();
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    let wait_until = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let running = std::thread::spawn(move || query(addr, RUNAWAY, json!(null)));
    wait_until("the runaway query runs", &|| {
        metric("bakedb_in_flight") == 2
    });
    // Three clients queue behind it, then hang up.
    let body = json!({"sql": "SELECT 1"}).to_string();
    let mut sockets = Vec::new();
    for _ in 0..3 {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        sockets.push(c);
    }
    wait_until("three queued", &|| metric("bakedb_in_flight") == 5);
    drop(sockets);
    wait_until("the queued requests are gone", &|| {
        metric("bakedb_in_flight") == 2
    });
    assert_eq!(running.join().unwrap().status, 504);
    // With their places in the queue given back, three new clients can wait again.
    let running = std::thread::spawn(move || query(addr, RUNAWAY, json!(null)));
    wait_until("the second runaway runs", &|| {
        metric("bakedb_in_flight") == 2
    });
    let waiting: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || query(addr, "SELECT 1", json!(null)).status))
        .collect();
    for w in waiting {
        assert_eq!(w.join().unwrap(), 200);
    }
    assert_eq!(running.join().unwrap().status, 504);
    assert_eq!(metric("bakedb_in_flight"), 1);
}
