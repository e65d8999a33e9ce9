//! bakedb-serve against a hostile client, on 127.0.0.1: requests built to exhaust memory,
//! slow clients holding connections (slowloris), clients that hang up, oversized requests,
//! requests that fail, values JSON cannot hold, SIGTERM with a statement still running, and
//! settings the machine cannot honour. Memory is the server's own: VmHWM of its process.
//!
//! No assertion is about speed: every wait is bounded only so that a hang fails the test.

mod server;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use bakedb_testkit::fixtures::items_db;
use bakedb_testkit::http;
use serde_json::{Value, json};

use server::{RUNAWAY, query, query_ndjson, start, start_on, start_with, wait_until};

const MIB: u64 = 1 << 20;
/// Far longer than anything here should take; only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(30);

/// A raw connection that has sent `head`, for requests the HTTP helper would not send.
fn send_raw(addr: SocketAddr, head: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.write_all(head).unwrap();
    c
}

/// The status code of the answer waiting on `c`, and its whole text (read to the end).
fn read_answer(c: &mut TcpStream) -> (u16, String) {
    let mut text = Vec::new();
    c.read_to_end(&mut text)
        .unwrap_or_else(|e| panic!("reading the answer: {e} (after {} bytes)", text.len()));
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

/// Reads one answer of a keep-alive connection (length-delimited): its status.
fn read_one_answer(c: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            c.read(&mut byte).unwrap(),
            1,
            "the connection closed mid-answer"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = vec![0; length];
    c.read_exact(&mut body).unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The server closed `c`: a read ends (EOF or reset) instead of waiting.
fn assert_closed_by_server(c: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return,
            // What the server answered before closing (e.g. a 408) is fine.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: the server did not close the connection: {e}"),
        }
    }
}

/// One query that should fail: its status and error message.
fn expect_error(addr: SocketAddr, sql: &str, status: u16, message: &str) {
    let r = query(addr, sql, json!(null));
    let short: String = sql.chars().take(80).collect();
    // The answer to a request that was not refused can be hundreds of megabytes.
    let text: String = r.text().chars().take(300).collect();
    assert_eq!(r.status, status, "{short}: {text}");
    let body = r.json();
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(message),
        "{short}: {error:?} lacks {message:?}"
    );
}

#[test]
fn no_request_can_exhaust_memory_and_healthz_answers_throughout() {
    let s = start(
        "memory",
        20_000,
        &[
            ("BAKEDB_POOL_SIZE", "2"),
            ("BAKEDB_MAX_RESPONSE_BYTES", "4194304"),
            ("BAKEDB_SQLITE_CACHE_KIB", "8192"),
            ("BAKEDB_SQLITE_HEAP_BYTES", "67108864"),
            // Long enough that only the memory limits can stop these statements.
            ("BAKEDB_QUERY_TIMEOUT_MS", "60000"),
        ],
    );
    let addr = s.addr;
    let baseline = s.memory_kib("VmRSS");
    let too_big = "BAKEDB_MAX_RESPONSE_BYTES";
    // Forty values of 4 MB: each within the length limit, together past the heap limit.
    let many_values = format!("SELECT {}", vec!["randomblob(4000000)"; 40].join(", "));
    let attacks: Vec<(String, u16, &str)> = vec![
        ("SELECT hex(randomblob(1e8))".into(), 400, too_big),
        ("SELECT randomblob(1e9)".into(), 400, too_big),
        ("SELECT zeroblob(1e9)".into(), 400, too_big),
        ("SELECT length(zeroblob(1e9))".into(), 400, too_big),
        ("SELECT printf('%.*c', 1000000000, 'x')".into(), 400, too_big),
        (
            "SELECT group_concat(a.name) FROM items a, items b".into(),
            400,
            too_big,
        ),
        (
            "WITH RECURSIVE r(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM r) SELECT length(s) FROM r"
                .into(),
            400,
            too_big,
        ),
        (many_values, 503, "BAKEDB_SQLITE_HEAP_BYTES"),
        // 3.5 MB of bytes is 4.7 MB of base64: no part of that answer fits.
        ("SELECT randomblob(3500000)".into(), 400, "the first row"),
    ];
    // One at a time, each gets its own answer.
    for (sql, status, message) in &attacks {
        expect_error(addr, sql, *status, message);
    }
    // Then three clients at once, each trying every request, with health checks meanwhile.
    // SQLite's heap limit is shared: while one statement holds most of it, another may be
    // the one that runs out, and answers 503 instead of its own error.
    let attackers: Vec<_> = (0..3)
        .map(|_| {
            let attacks = attacks.clone();
            std::thread::spawn(move || {
                for (sql, status, message) in &attacks {
                    let r = query(addr, sql, json!(null));
                    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
                    let expected = r.status == *status && error.contains(message);
                    let out_of_memory =
                        r.status == 503 && error.contains("BAKEDB_SQLITE_HEAP_BYTES");
                    assert!(
                        expected || out_of_memory,
                        "{}: {} {error}",
                        r.status,
                        &sql[..40.min(sql.len())]
                    );
                }
            })
        })
        .collect();
    let mut health_checks = 0;
    while !attackers.iter().all(|a| a.is_finished()) {
        let h = http::get(addr, "/healthz");
        assert_eq!(h.status, 200, "{}", h.text());
        health_checks += 1;
        // Paced like a load balancer's checks, not a flood of connections of its own.
        std::thread::sleep(Duration::from_millis(10));
    }
    for a in attackers {
        a.join().unwrap();
    }

    // An answer of many rows stops at the byte limit, at a row boundary.
    let r = query(addr, "SELECT randomblob(1000000) FROM items", json!(null));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.len() as u64 <= 4 * MIB, "{} bytes", r.body.len());
    let body = r.json();
    assert_eq!(body["truncated"], true);
    assert_eq!(body["rows"].as_array().unwrap().len(), 3);
    // NDJSON: each line has the same limit; a row over it ends the stream with an error line
    // after the rows before it.
    let (status, lines) = query_ndjson(addr, "SELECT randomblob(3500000)");
    assert_eq!(status, 200, "{lines:?}");
    assert_eq!(lines.len(), 2, "the column names, the error");
    assert!(
        lines[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("largest NDJSON line")),
        "{}",
        lines[1]
    );
    let (status, lines) = query_ndjson(
        addr,
        "SELECT id, randomblob(CASE WHEN id < 3 THEN 10 ELSE 3500000 END) FROM items",
    );
    assert_eq!(status, 200);
    assert_eq!(lines.len(), 4, "the column names, two rows, the error");
    assert!(
        lines[3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("largest NDJSON line")),
        "{}",
        lines[3]
    );

    // Every read connection still answers.
    for _ in 0..4 {
        let r = query(addr, "SELECT count(*) FROM items", json!(null));
        assert_eq!(r.json()["rows"], json!([[20000]]));
    }
    let peak = s.memory_kib("VmHWM");
    eprintln!(
        "memory: RSS {} MiB at the start, peak {} MiB, {health_checks} health checks answered during the attack",
        baseline / 1024,
        peak / 1024
    );
    // 64 MiB for SQLite, 32 MiB of answers (4 x 4 MiB per read connection), the rest is
    // the program: a replica under a memory limit of 200 MiB survives all of the above.
    assert!(peak < 200 * 1024, "peak RSS {peak} KiB");
    let m = http::get(addr, "/metrics").text();
    assert!(
        m.contains("bakedb_query_errors_total{kind=\"too_large\"}"),
        "{m}"
    );
    assert!(
        s.metric("bakedb_query_errors_total{kind=\"memory\"}") >= 4,
        "{m}"
    );
    assert!(!m.contains("kind=\"failed\""), "{m}");
}

#[test]
fn slow_clients_cannot_take_the_server_off_line() {
    // A descriptor limit as low as some containers', far below the sockets of the attack;
    // the client timeout is long so that only the connection cap can keep the server up.
    let s = start_with(
        "slowloris",
        |db| items_db(db, 10, false),
        &[
            ("BAKEDB_POOL_SIZE", "2"),
            ("BAKEDB_CLIENT_TIMEOUT_MS", "120000"),
        ],
        Some(128),
    );
    let addr = s.addr;
    // What the descriptors leave after 2 read connections (4 each) and 32 for the server.
    assert_eq!(s.metric("bakedb_connections_max"), 128 - 2 * 4 - 32);
    let open = || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        c
    };
    let mut sockets: Vec<TcpStream> = (0..300).map(|_| open()).collect();
    for round in 0..20 {
        // One more header byte on every socket; a socket the server closed is replaced, so
        // the attack never lets up.
        for socket in sockets.iter_mut() {
            if socket.write_all(b"a").is_err() {
                *socket = open();
            }
        }
        let h = http::get(addr, "/healthz");
        assert_eq!(h.status, 200, "round {round}: {}", h.text());
        let m = http::get(addr, "/metrics");
        assert_eq!(m.status, 200, "round {round}");
        assert!(s.metric("bakedb_connections_open") <= 88, "round {round}");
    }
    assert!(s.metric("bakedb_connections_closed_total{reason=\"evicted\"}") > 0);
    let peak = s.memory_kib("VmHWM");
    eprintln!("slowloris: peak RSS {} MiB", peak / 1024);
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    // Queries too.
    drop(sockets);
    assert_eq!(query(addr, "SELECT 1", json!(null)).status, 200);
}

#[test]
fn clients_too_slow_to_send_or_to_read_are_disconnected() {
    let s = start(
        "slow",
        10,
        &[
            ("BAKEDB_CLIENT_TIMEOUT_MS", "300"),
            ("BAKEDB_QUERY_TIMEOUT_MS", "120000"),
        ],
    );
    let addr = s.addr;
    // A head that never ends.
    let mut c = send_raw(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a");
    assert_closed_by_server(&mut c, "an unfinished head");
    // A keep-alive connection left idle after its answer.
    let mut c = send_raw(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(read_one_answer(&mut c), 200);
    assert_closed_by_server(&mut c, "an idle keep-alive connection");
    // A body that stops arriving.
    let mut c = send_raw(
        addr,
        b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sql\"",
    );
    let (status, text) = read_answer(&mut c);
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("BAKEDB_CLIENT_TIMEOUT_MS"), "{text}");
    // A client that asks for an endless stream and reads none of it: once the socket's
    // buffers are full the server gives up on it, and the statement stops with it (long
    // before its own time limit).
    let body = json!({ "sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x, randomblob(1000) FROM c" }).to_string();
    let c = send_raw(
        addr,
        format!(
            "POST /v1/query HTTP/1.1\r\nHost: x\r\nAccept: application/x-ndjson\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    wait_until("the stalled stream is dropped", PATIENCE, &mut || {
        s.metric("bakedb_query_errors_total{kind=\"cancelled\"}") == 1
    });
    assert!(s.metric("bakedb_connections_closed_total{reason=\"timeout\"}") >= 3);
    drop(c);
    assert_eq!(query(addr, "SELECT 1", json!(null)).status, 200);
}

#[test]
fn a_client_that_hangs_up_stops_its_query_and_is_counted() {
    let s = start(
        "hangup",
        10,
        &[
            ("BAKEDB_POOL_SIZE", "1"),
            ("BAKEDB_QUERY_TIMEOUT_MS", "120000"),
        ],
    );
    let addr = s.addr;
    let body = json!({ "sql": RUNAWAY }).to_string();
    let post = |accept: &str| {
        send_raw(
            addr,
            format!(
                "POST /v1/query HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    // A buffered JSON query: nothing is sent until it ends, so only the hang-up can end it.
    let c = post("application/json");
    wait_until("the query runs", PATIENCE, &mut || {
        s.metric("bakedb_in_flight") == 2
    });
    drop(c);
    wait_until(
        "the query of a client that hung up is stopped and counted",
        PATIENCE,
        &mut || s.metric("bakedb_query_errors_total{kind=\"cancelled\"}") == 1,
    );
    assert_eq!(
        s.metric("bakedb_requests_total{route=\"/v1/query\",code=\"499\"}"),
        1
    );
    // The pool's only connection is free again.
    assert_eq!(query(addr, "SELECT 1", json!(null)).status, 200);

    // A stream, hung up after its first rows.
    let runaway_rows =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c";
    let body = json!({ "sql": runaway_rows }).to_string();
    let mut c = send_raw(
        addr,
        format!(
            "POST /v1/query HTTP/1.1\r\nHost: x\r\nAccept: application/x-ndjson\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let mut first = [0u8; 4096];
    assert!(c.read(&mut first).unwrap() > 0);
    drop(c);
    wait_until("the stream's query is stopped", PATIENCE, &mut || {
        s.metric("bakedb_query_errors_total{kind=\"cancelled\"}") == 2
    });
    assert_eq!(query(addr, "SELECT 1", json!(null)).status, 200);
}

#[test]
fn oversized_requests_get_an_answer_not_a_reset() {
    let s = start("oversized", 10, &[]);
    let addr = s.addr;
    // A body announced at 10 GB is refused before any of it is read.
    let mut c = send_raw(
        addr,
        b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
    );
    let (status, text) = read_answer(&mut c);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("BAKEDB_MAX_REQUEST_BYTES"), "{text}");
    // A body over the limit sent in full.
    let big = json!({ "sql": format!("SELECT '{}'", "x".repeat(1 << 20)) }).to_string();
    let r = http::request(
        addr,
        "POST",
        "/v1/query",
        &[("Content-Type", "application/json")],
        big.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    // A 10 MB request line: the head does not fit the server's buffer.
    let mut line = b"GET /v1/query?sql=".to_vec();
    line.resize(10 << 20, b'A');
    line.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut c = send_raw(addr, &line);
    let (status, text) = read_answer(&mut c);
    assert!(status == 414 || status == 431, "{text}");
    // A URI over 64 KiB that fits: 414.
    let mut c = send_raw(
        addr,
        format!(
            "GET /v1/query?sql={} HTTP/1.1\r\nHost: x\r\n\r\n",
            "A".repeat(70_000)
        )
        .as_bytes(),
    );
    assert_eq!(read_answer(&mut c).0, 414);
    // Too many headers: 431.
    let headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let mut c = send_raw(
        addr,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes(),
    );
    assert_eq!(read_answer(&mut c).0, 431);
    assert_eq!(http::get(addr, "/healthz").status, 200);
}

#[test]
fn errors_caused_by_the_request_are_4xx_with_sqlites_message() {
    let s = start("clienterrors", 10, &[]);
    for (sql, message) in [
        ("SELECT * FROM nope", "no such table: nope"),
        ("", "the query is empty"),
        ("   ", "the query is empty"),
        ("-- only a comment", "the query is empty"),
        ("/* a comment */", "the query is empty"),
        ("SELECT nope()", "no such function: nope"),
        ("SELECT * FROM items WHERE nme = 1", "no such column: nme"),
        ("SELECT json('{')", "malformed JSON"),
        ("SELECT abs(-9223372036854775808)", "integer overflow"),
        (
            "SELECT 1 UNION SELECT 1, 2",
            "SELECTs to the left and right of UNION",
        ),
    ] {
        expect_error(s.addr, sql, 400, message);
    }
    let r = http::get(s.addr, "/v1/query?sql=");
    assert_eq!(r.status, 400, "{}", r.text());
    let m = http::get(s.addr, "/metrics").text();
    assert!(!m.contains("code=\"500\""), "{m}");
    assert!(!m.contains("kind=\"failed\""), "{m}");
}

#[test]
fn infinities_and_invalid_utf8_come_back_faithfully_alike_in_json_and_ndjson() {
    let s = start_on(
        "faithful",
        |db| {
            rusqlite::Connection::open(db)
                .unwrap()
                .execute_batch(
                    "CREATE TABLE v(id INTEGER PRIMARY KEY, x);
                     INSERT INTO v(x) VALUES (1e999), (-1e999), (CAST(x'ff61' AS TEXT)),
                                             (x'ff61'), ('ok'), (1.5), (NULL);",
                )
                .unwrap();
        },
        &[],
    );
    let want = json!([
        [{"$float": "Infinity"}],
        [{"$float": "-Infinity"}],
        [{"$base64": true, "encoded": "/2E=", "type": "text"}],
        [{"$base64": true, "encoded": "/2E="}],
        ["ok"],
        [1.5],
        [null]
    ]);
    let sql = "SELECT x FROM v ORDER BY id";
    let r = query(s.addr, sql, json!(null));
    assert_eq!(r.json()["rows"], want, "{}", r.text());
    let (status, lines) = query_ndjson(s.addr, sql);
    assert_eq!(status, 200);
    assert_eq!(Value::from(&lines[1..8]), want);
    assert_eq!(lines[8]["rows"], 7);
    // Computed values take the same forms.
    let r = query(
        s.addr,
        "SELECT 1e999 * -1, CAST(x'80' AS TEXT)",
        json!(null),
    );
    assert_eq!(
        r.json()["rows"],
        json!([[{"$float": "-Infinity"}, {"$base64": true, "encoded": "gA==", "type": "text"}]])
    );
}

#[test]
fn sigterm_interrupts_what_still_runs_at_the_drain_limit_and_exits() {
    let mut s = start(
        "drainlimit",
        10,
        &[
            ("BAKEDB_DRAIN_MS", "1000"),
            ("BAKEDB_QUERY_TIMEOUT_MS", "120000"),
        ],
    );
    let addr = s.addr;
    let runaway = std::thread::spawn(move || query(addr, RUNAWAY, json!(null)));
    wait_until("the runaway query runs", PATIENCE, &mut || {
        s.metric("bakedb_in_flight") == 2
    });
    let signalled = Instant::now();
    // SAFETY: signalling the server this test started.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    // Its client is told why instead of losing the connection.
    let r = runaway.join().unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{}",
        r.text()
    );
    // The process is gone at the drain limit, long before the statement's own time limit.
    let status = s
        .wait_exit(PATIENCE)
        .expect("still running 30 s after SIGTERM with BAKEDB_DRAIN_MS=1000");
    assert_eq!(status.code(), Some(0));
    let log = s.exited_log();
    assert!(log.contains("1 query interrupted"), "{log}");
    eprintln!(
        "drain: exited {} ms after SIGTERM\n{log}",
        signalled.elapsed().as_millis()
    );
}

#[test]
fn settings_the_machine_cannot_honour_are_refused_by_name() {
    let dir = server::temp_dir("settings");
    let db = dir.0.join("app.db");
    items_db(&db, 1, false);
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bakedb-serve"))
            .env_clear()
            .env("BAKEDB_DATABASE", &db)
            .env("BAKEDB_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[("BAKEDB_POOL_SIZE", "100000")], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("BAKEDB_POOL_SIZE=100000"), "{err}");
    assert!(err.contains("RLIMIT_NOFILE"), "{err}");
    let (code, err) = run(&[], &["--listen", "nonsense"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--listen \"nonsense\" is not ADDR:PORT"),
        "{err}"
    );
    assert!(!err.contains("BAKEDB_LISTEN"), "{err}");
    let (code, err) = run(&[("BAKEDB_MAX_CONNECTIONS", "100000000")], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("BAKEDB_MAX_CONNECTIONS=100000000"), "{err}");
}
