//! bakedb-serve's HTTP API as its clients see it. bakedb-serve's own tests and the e2e tests of
//! its image ask through these and expect the same answers from the same database
//! (`fixtures::items_db`).

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::http::{self, Response};

/// A query that never ends on its own: counts forever.
pub const RUNAWAY: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";

/// Writes of every kind, and what would write outside the database (ATTACH creates a file, a
/// temp table needs temporary storage), on the items database: (SQL, what the refusal's
/// reason says).
pub const WRITES: [(&str, &str); 12] = [
    ("INSERT INTO items(name) VALUES ('x')", "INSERT into items"),
    ("UPDATE items SET name = 'x'", "UPDATE of items"),
    ("DELETE FROM items", "DELETE from items"),
    ("CREATE TABLE t(x)", "changing the schema (sqlite_master)"),
    (
        "CREATE TEMP TABLE t(x)",
        "changing the schema (sqlite_temp_master)",
    ),
    (
        "CREATE INDEX i ON items(price)",
        "changing the schema (sqlite_master)",
    ),
    (
        "PRAGMA journal_mode = WAL",
        "PRAGMA journal_mode = WAL is not allowed",
    ),
    (
        "PRAGMA user_version = 7",
        "PRAGMA user_version = 7 is not allowed",
    ),
    ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH"),
    (
        "SELECT load_extension('/tmp/evil')",
        "function load_extension() is not allowed",
    ),
    ("BEGIN", "transactions are not needed"),
    ("VACUUM", ""),
];

/// /v1/schema of the items database: the view `cheap` and the table `items` (its columns and
/// types, `name` NOT NULL, the index on name), in that order. The tables.
pub fn assert_items_schema(schema: &Value) -> &Vec<Value> {
    let tables = schema["tables"].as_array().unwrap();
    let names: Vec<&str> = tables.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cheap", "items"], "{schema}");
    let items = &tables[1];
    assert_eq!(items["type"], "table", "{schema}");
    let columns: Vec<(&str, &str)> = items["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", "INTEGER"),
            ("name", "TEXT"),
            ("price", "REAL"),
            ("data", "BLOB")
        ],
        "{schema}"
    );
    assert_eq!(items["columns"][1]["notnull"], true, "{schema}");
    assert_eq!(items["indexes"][0]["name"], "items_name", "{schema}");
    assert_eq!(items["indexes"][0]["columns"], json!(["name"]), "{schema}");
    tables
}

/// Items 3 and 4 of the items database by `GET /v1/query` with positional parameters: both
/// rows, the blobs as base64, nothing truncated. The answer's JSON.
pub fn assert_items_3_and_4(addr: SocketAddr) -> Value {
    let r = get_query(
        addr,
        "SELECT id, name, price, data FROM items WHERE id = ?1 OR id = ?2 ORDER BY id",
        "[3, 4]",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(
        body["columns"],
        json!(["id", "name", "price", "data"]),
        "{body}"
    );
    assert_eq!(
        body["rows"],
        json!([
            [3, "item-00003", 0.75, {"$base64": true, "encoded": "A/8="}],
            [4, "item-00004", 1.0, {"$base64": true, "encoded": "BP8="}]
        ]),
        "{body}"
    );
    assert_eq!(body["truncated"], false, "{body}");
    body
}

/// Requests that are no query: a body that is not JSON, a GET without `sql`. Both 400.
pub fn assert_malformed_requests_refused(addr: SocketAddr) {
    let r = http::request(
        addr,
        "POST",
        "/v1/query",
        &[("Content-Type", "application/json")],
        b"{not json",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let r = http::get(addr, "/v1/query");
    assert_eq!(r.status, 400, "{}", r.text());
}

/// `POST /v1/query` with a JSON body.
pub fn query(addr: SocketAddr, sql: &str, params: Value) -> Response {
    http::post_json(addr, "/v1/query", &json!({"sql": sql, "params": params}))
}

/// `GET /v1/query?sql=…&params=…`.
pub fn get_query(addr: SocketAddr, sql: &str, params: &str) -> Response {
    http::get(
        addr,
        &format!(
            "/v1/query?sql={}&params={}",
            http::encode(sql),
            http::encode(params)
        ),
    )
}

/// `POST /v1/query` asking for NDJSON.
pub fn ndjson(addr: SocketAddr, sql: &str) -> Response {
    http::request(
        addr,
        "POST",
        "/v1/query",
        &[
            ("Accept", "application/x-ndjson"),
            ("Content-Type", "application/json"),
        ],
        json!({ "sql": sql }).to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("NDJSON {sql}: {e}"))
}

/// The lines of an NDJSON answer, parsed.
pub fn ndjson_lines(r: &Response) -> Vec<Value> {
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// `sql` was refused: a 403 whose JSON has an error and a reason that says `reason`. The body.
pub fn assert_refused(r: &Response, sql: &str, reason: &str) -> Value {
    assert_eq!(r.status, 403, "{sql}: {}", r.text());
    let body = r.json();
    assert!(
        body["reason"].as_str().unwrap_or("").contains(reason),
        "{sql}: {body}"
    );
    assert!(body["error"].is_string(), "{sql}: {body}");
    body
}

/// The value of an unlabelled or labelled metric line `name value` in /metrics' text (0 when
/// absent: counters appear at their first increment).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{name} {v:?}: {e}"))
        })
}
