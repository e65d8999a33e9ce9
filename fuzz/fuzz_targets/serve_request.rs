//! bakedb-serve's request handling, in process: method, path and query string, headers and
//! body from the input, through the real router (body limit, JSON and form decoding, SQL
//! parameters, the authorizer, encoding) on a small database with text, blobs, floats,
//! infinities and an R*Tree. What must hold for any request: an answer, and never a 500 (a
//! request can cause a 4xx, a busy 503 or a 504, but a 500 means bakedb-serve failed).
#![no_main]

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use bakedb_serve::{api, config, db};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Fixture {
    router: Router,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = bakedb_fuzz::scratch();
        let path = dir.path().join("app.db");
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, data BLOB);
             WITH RECURSIVE n(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM n WHERE v < 200)
             INSERT INTO items SELECT v, 'item ' || v, v / 7.0, randomblob(v % 17) FROM n;
             INSERT INTO items VALUES (1000, CAST(X'FF00' AS TEXT), 9e999, NULL);
             CREATE VIEW cheap AS SELECT * FROM items WHERE price < 3;
             CREATE VIRTUAL TABLE places USING rtree(id, minx, maxx, miny, maxy);
             INSERT INTO places VALUES (1, 0, 1, 0, 1);",
        )
        .unwrap();
        drop(c);
        let env = |name: &str| match name {
            "BAKEDB_DATABASE" => Some(path.display().to_string()),
            "BAKEDB_QUERY_TIMEOUT_MS" => Some("200".into()),
            "BAKEDB_POOL_SIZE" => Some("2".into()),
            _ => None,
        };
        let config = config::Config::load(&[], &env, 1024).unwrap();
        let dbs = (0..config.pool_size)
            .map(|_| db::Db::open(&config).unwrap())
            .collect();
        let app = api::App::new(config, dbs);
        Fixture {
            router: api::router(app),
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    // [method][content type][path and query, up to a NUL][body]
    let Some((&method, rest)) = data.split_first() else {
        return;
    };
    let Some((&content, rest)) = rest.split_first() else {
        return;
    };
    let (target, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    let method = match method % 4 {
        0 | 1 => "GET",
        2 => "POST",
        _ => "HEAD",
    };
    let content_type = match content % 4 {
        0 => "application/json",
        1 => "application/x-www-form-urlencoded",
        2 => "text/plain",
        _ => "application/json; charset=utf-8",
    };
    let Ok(request) = axum::http::Request::builder()
        .method(method)
        .uri(format!("/{}", target.trim_start_matches('/')))
        .header("content-type", content_type)
        .header(
            "accept",
            if content % 8 >= 4 {
                "application/x-ndjson"
            } else {
                "*/*"
            },
        )
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let f = fixture();
    let (status, text) = f.runtime.block_on(async {
        let response = f.router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes());
        (
            status,
            bytes.map(|b| String::from_utf8_lossy(&b).into_owned()),
        )
    });
    assert!(
        status != 500,
        "500 for {method} /{target} ({content_type}, {} body bytes): {text:?}",
        body.len()
    );
});
