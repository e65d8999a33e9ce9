//! Delta re-bakes (`bakedb build --from`): a SQLite database under a write load re-baked ten
//! times in a chain, with updates, inserts, deletes, a VACUUM, a dropped and a new table.
//! Every generation is checked by `bakedb verify` (which composes every patched file), its
//! patch holds exactly the pages that changed between the two composed databases, it
//! answers exactly the source's rows at its snapshot point under docker (bakedb-serve reads
//! base and patches in place), a registry receives only its new blobs, the chain starts a
//! fresh base at `--max-patches`, and a tampered patch or page index stops bakedb-init.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bakedb_engines::delta;
use serde_json::{Value, json};

use crate::http;
use crate::require;
use crate::util::{self, bakedb, run, run_ok, stderr, stdout, test_dir, unique_name};

const ITEMS: i64 = 100_000;
const DATA_DIR: &str = "var/lib/bakedb";

/// A file of an image, from the newest layer that has it (gzip layers of an OCI layout).
fn image_file(layout: &Path, tag: &str, path: &str) -> Option<Vec<u8>> {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag}"));
    let blob = |d: &Value| {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(d.as_str().unwrap().trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let manifest: Value = serde_json::from_slice(&blob(&desc["digest"])).unwrap();
    for layer in manifest["layers"].as_array().unwrap().iter().rev() {
        let bytes = blob(&layer["digest"]);
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&bytes[..]));
        for entry in archive.entries().unwrap() {
            let mut e = entry.unwrap();
            if e.path().unwrap().to_string_lossy() == path {
                let mut out = Vec::new();
                e.read_to_end(&mut out).unwrap();
                return Some(out);
            }
        }
    }
    None
}

pub(crate) fn inspect(dir: &Path, reference: &str) -> Value {
    let out = run_ok(bakedb(dir).args(["inspect", "--json", reference]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The database of generation `tag`, composed from its base and patches as the docs say.
pub(crate) fn composed(layout: &Path, tag: &str, image_json: &Value) -> Vec<u8> {
    let entry = image_json["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "app.db")
        .unwrap();
    let base = image_file(layout, tag, &format!("{DATA_DIR}/app.db")).unwrap();
    let patches: Vec<Vec<u8>> = entry["patches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| image_file(layout, tag, &format!("{DATA_DIR}/{}", p.as_str().unwrap())).unwrap())
        .collect();
    let refs: Vec<&[u8]> = patches.iter().map(Vec::as_slice).collect();
    delta::compose(&base, &refs).unwrap()
}

/// Pages that differ between two versions of a file (pages past the old end count).
fn changed_pages(old: &[u8], new: &[u8], page: usize) -> usize {
    new.chunks(page)
        .enumerate()
        .filter(|(i, p)| old.get(i * page..(i + 1) * page) != Some(*p))
        .count()
}

/// The md5 of a table's rows, as SQL sees them, on a composed database or the source.
fn table_sum(db: &rusqlite::Connection, table: &str) -> String {
    db.query_row(
        &format!("SELECT count(*) || ':' || total(id) || ':' || total(length(name)) || ':' || total(price) FROM {table}"),
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// A writer that keeps committing rows into `writes` from its own connection.
pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub(crate) fn start(path: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let db = rusqlite::Connection::open(path).unwrap();
        db.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
        let thread = {
            let (stop, committed) = (stop.clone(), committed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    db.execute("INSERT INTO writes (v) VALUES (randomblob(16))", [])
                        .unwrap();
                    committed.fetch_add(1, Ordering::SeqCst);
                    // A steady load, not a flood: each generation's patch then holds the
                    // few pages these rows fill, beside the mutation's.
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        while committed.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        Writer {
            stop,
            committed,
            thread: Some(thread),
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The mutation that makes generation `g`, on the items and side tables (the writer only
/// touches `writes`).
fn mutate(db: &rusqlite::Connection, g: u32) {
    let sql = match g {
        1 => "UPDATE items SET price = price + 1 WHERE id % 997 = 3".to_owned(),
        2 => format!(
            "INSERT INTO items SELECT id + {ITEMS}, 'new ' || id, id / 3.0 FROM items WHERE id <= 500"
        ),
        3 => "DELETE FROM items WHERE id BETWEEN 4000 AND 4300".to_owned(),
        4 => "DROP TABLE doomed".to_owned(),
        // A fresh base anyway (the fifth generation): VACUUM rewrites every page.
        5 => "VACUUM".to_owned(),
        6 => "CREATE TABLE fresh (id INTEGER PRIMARY KEY, name TEXT, price REAL);
              INSERT INTO fresh SELECT id, name, price FROM items WHERE id <= 1000"
            .to_owned(),
        7 => "UPDATE items SET name = name || '!' WHERE id BETWEEN 10000 AND 10200".to_owned(),
        8 => "SELECT 1".to_owned(),
        9 => "UPDATE items SET price = price * 2 WHERE id % 1301 = 0".to_owned(),
        _ => "DELETE FROM fresh WHERE id % 2 = 0".to_owned(),
    };
    db.execute_batch(&sql).unwrap();
}

/// A FROM-scratch image served by docker on a free port of 127.0.0.1.
struct Served {
    docker: std::path::PathBuf,
    name: String,
    addr: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = Command::new(&self.docker)
            .args(["rm", "--force", &self.name])
            .output();
    }
}

impl Served {
    fn start(docker: &Path, image: &str) -> Served {
        let addr: SocketAddr = format!("127.0.0.1:{}", crate::pg::free_port())
            .parse()
            .unwrap();
        let served = Served {
            docker: docker.to_owned(),
            name: unique_name("bakedb-e2e-delta"),
            addr,
        };
        run_ok(
            Command::new(docker)
                .args([
                    "run",
                    "--detach",
                    "--network",
                    "host",
                    "--name",
                    &served.name,
                ])
                .args(["--env", &format!("BAKEDB_LISTEN={addr}")])
                .arg(image)
                .stdin(Stdio::null()),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if http::request(addr, "GET", "/healthz", &[], b"").is_ok_and(|r| r.status == 200) {
                return served;
            }
            let running = run(Command::new(docker).args([
                "inspect",
                "--format",
                "{{.State.Running}}",
                &served.name,
            ]));
            assert!(
                stdout(&running).trim() == "true",
                "the replica stopped: {}",
                served.logs()
            );
            assert!(std::time::Instant::now() < deadline, "{}", served.logs());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        let out = run(Command::new(&self.docker).args(["logs", &self.name]));
        format!("{}{}", stdout(&out), stderr(&out))
    }

    fn one(&self, sql: &str) -> Value {
        let r = http::post_json(self.addr, "/v1/query", &json!({"sql": sql}));
        assert_eq!(r.status, 200, "{sql}: {}", r.text());
        r.json()["rows"][0][0].clone()
    }
}

/// The blobs the test registry stores (layers, configs and manifests alike), counted in its
/// storage directory (BAKEDB_TEST_REGISTRY_STORAGE, which .ci/run sets).
fn registry_blobs() -> usize {
    let root = std::env::var("BAKEDB_TEST_REGISTRY_STORAGE")
        .expect("BAKEDB_TEST_REGISTRY_STORAGE: the registry's storage directory");
    bakedb_testkit::registry::blob_count(Path::new(&root))
}

/// `skopeo copy` to the registry; how many blobs the registry gained.
fn push(dir: &Path, registry: &str, reference: &str, tag: &str) -> usize {
    let before = registry_blobs();
    run_ok(
        Command::new(util::tool("skopeo").unwrap())
            .current_dir(dir)
            .args(["copy", "--quiet", "--dest-tls-verify=false", reference])
            .arg(format!("docker://{registry}/{}:{tag}", repository())),
    );
    registry_blobs() - before
}

/// This test run's repository in the shared registry.
fn repository() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| unique_name("bakedb-e2e-delta").to_lowercase())
}

pub(crate) fn to_docker(docker: &Path, dir: &Path, reference: &str) -> util::DockerImage {
    let name = format!("bakedb-e2e/{}:v1", unique_name("delta"));
    run_ok(
        Command::new(util::tool("skopeo").unwrap())
            .current_dir(dir)
            .args(["copy", "--quiet", reference])
            .arg(format!("docker-archive:img.tar:{name}")),
    );
    run_ok(
        Command::new(docker)
            .current_dir(dir)
            .args(["load", "--input", "img.tar"]),
    );
    std::fs::remove_file(dir.join("img.tar")).unwrap();
    util::DockerImage {
        docker: docker.to_owned(),
        name,
    }
}

#[test]
fn sqlite_chain_of_ten_generations_under_write_load() {
    let Some(docker) = util::docker() else { return };
    require!("skopeo");
    let Some(registry) = util::registry() else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    let source = d.join("app.db");
    let db = rusqlite::Connection::open(&source).unwrap();
    db.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ITEMS})
         INSERT INTO items SELECT i, 'item ' || i || ' ' || hex(randomblob(8)), i / 7.0 FROM n;
         CREATE TABLE doomed AS SELECT * FROM items WHERE id <= 2000;
         CREATE TABLE writes (id INTEGER PRIMARY KEY, v BLOB);"
    ))
    .unwrap();
    db.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
    let writer = Writer::start(&source);
    let layout = d.join("chain");
    let tag = |g: u32| format!("g{g}");
    let mut previous_db: Option<Vec<u8>> = None;
    for g in 0..=10u32 {
        if g > 0 {
            mutate(&db, g);
        }
        let expected = table_sum(&db, "items");
        let before = writer.committed();
        let mut cmd = bakedb(d);
        cmd.args([
            "build",
            "--engine",
            "sqlite",
            "--source",
            "app.db",
            "--max-patches",
            "4",
        ])
        .arg("--output")
        .arg(format!("oci:{}:{}", layout.display(), tag(g)));
        if g > 0 {
            cmd.arg("--from")
                .arg(format!("oci:{}:{}", layout.display(), tag(g - 1)));
        }
        let out = run_ok(&mut cmd);
        let after = writer.committed();
        let reference = format!("oci:{}:{}", layout.display(), tag(g));
        run_ok(bakedb(d).args(["verify", &reference]));
        let ij = inspect(d, &reference)["image_json"].clone();
        assert_eq!(ij["generation"].as_u64().unwrap_or(0), u64::from(g), "{ij}");
        let chain = ij["chain"].as_array().unwrap();
        let last = chain.last().unwrap();
        // A fresh base every fifth generation: REF then has 4 patch generations.
        let fresh = g % 5 == 0;
        assert_eq!(
            last["kind"],
            if fresh { "base" } else { "patch" },
            "g{g}: {ij}\n{}",
            stderr(&out)
        );
        if g > 0 && fresh {
            assert!(
                stderr(&out).contains("a fresh base") && stderr(&out).contains("--max-patches 4"),
                "{}",
                stderr(&out)
            );
        }
        // The patch holds exactly the pages that changed between the composed databases.
        let now_db = composed(&layout, &tag(g), &ij);
        if let (Some(old), false) = (&previous_db, fresh) {
            let page =
                usize::try_from(ij["snapshot"]["position"]["page_size"].as_u64().unwrap()).unwrap();
            let entry = ij["files"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["path"] == "app.db")
                .unwrap();
            let patch_path = entry["patches"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .as_str()
                .unwrap();
            assert_eq!(patch_path, format!(".patches/{g}/app.db"), "{entry}");
            let patch = ij["files"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["path"] == patch_path)
                .unwrap();
            let pages = changed_pages(old, &now_db, page);
            assert_eq!(
                patch["size"].as_u64().unwrap(),
                delta::PATCH_HEADER + (pages * (8 + page)) as u64,
                "g{g}: the patch is not the {pages} changed pages"
            );
            assert!(
                pages * 4 < now_db.len() / page,
                "g{g}: {pages} pages changed"
            );
        }
        // The composed database is the source at one point: items exactly, writes whole.
        let file = d.join(format!("g{g}.db"));
        std::fs::write(&file, &now_db).unwrap();
        let check = rusqlite::Connection::open(&file).unwrap();
        assert_eq!(table_sum(&check, "items"), expected, "g{g}");
        let (n, max): (i64, i64) = check
            .query_row("SELECT count(*), max(id) FROM writes", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(n, max, "g{g}: not one committed point");
        let n = n as u64;
        assert!(
            (before..=after).contains(&n),
            "g{g}: {before} <= {n} <= {after}"
        );
        drop(check);
        previous_db = Some(now_db);

        // What a registry receives: after the first push, a patch generation adds only its
        // patch and image.json layers, its config and its manifest.
        let stored = push(d, &registry, &reference, &tag(g));
        if g > 0 && !fresh {
            assert_eq!(stored, 4, "g{g}: blobs the registry gained");
        }

        // The replica answers as the source did at the snapshot point.
        if [1, 6, 10].contains(&g) {
            let image = to_docker(&docker, d, &reference);
            let served = Served::start(&docker, &image.name);
            let sum = served.one(
                "SELECT count(*) || ':' || total(id) || ':' || total(length(name)) || ':' || total(price) FROM items",
            );
            assert_eq!(sum, json!(expected), "g{g}: {}", served.logs());
            assert_eq!(served.one("SELECT count(*) FROM writes"), json!(n), "g{g}");
            assert!(
                served.logs().contains("bakedb-init: verified"),
                "{}",
                served.logs()
            );
        }
    }
    drop(writer);
}

#[test]
fn a_tampered_patch_or_page_index_stops_init() {
    let Some(docker) = util::docker() else { return };
    require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    let source = d.join("app.db");
    let db = rusqlite::Connection::open(&source).unwrap();
    db.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000)
         INSERT INTO items SELECT i, 'item ' || i FROM n;",
    )
    .unwrap();
    run_ok(bakedb(d).args([
        "build", "--engine", "sqlite", "--source", "app.db", "--output", "oci:l:g0",
    ]));
    // A few rows: a patch of a few pages, not the whole file.
    db.execute_batch("UPDATE items SET name = 'x' WHERE id % 5000 = 0")
        .unwrap();
    let built = run_ok(bakedb(d).args([
        "build", "--engine", "sqlite", "--source", "app.db", "--from", "oci:l:g0", "--output",
        "oci:l:g1",
    ]));
    assert!(
        stderr(&built).contains("generation 1: patch layer"),
        "{}",
        stderr(&built)
    );
    let chain = stdout(&run_ok(bakedb(d).args(["inspect", "oci:l:g1"])));
    assert!(chain.contains(".patches/1/app.db"), "{chain}");
    let image = to_docker(&docker, d, "oci:l:g1");
    let cases: BTreeMap<&str, String> = BTreeMap::from([
        ("patch", format!("/{DATA_DIR}/.patches/1/app.db")),
        ("index", "/etc/bakedb/pages/1.idx".to_owned()),
        ("base", format!("/{DATA_DIR}/app.db")),
    ]);
    for (what, path) in cases {
        let name = unique_name("bakedb-e2e-tamper");
        run_ok(Command::new(&docker).args([
            "create",
            "--network",
            "none",
            "--name",
            &name,
            &image.name,
        ]));
        let _guard = scopeguard(&docker, &name);
        let local = d.join("victim");
        run_ok(
            Command::new(&docker)
                .args(["cp", &format!("{name}:{path}")])
                .arg(&local),
        );
        let mut bytes = std::fs::read(&local).unwrap();
        let at = bytes.len() - 1;
        bytes[at] ^= 0x01;
        let upper = stdout(&run_ok(Command::new(&docker).args([
            "inspect",
            "--format",
            "{{.GraphDriver.Data.UpperDir}}",
            &name,
        ])))
        .trim()
        .to_owned();
        let target = Path::new(&upper).join(path.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, &bytes).unwrap();
        run_ok(Command::new(&docker).args(["start", &name]));
        let code = stdout(&run_ok(Command::new(&docker).args(["wait", &name])));
        let logs = run(Command::new(&docker).args(["logs", &name]));
        let logs = format!("{}{}", stdout(&logs), stderr(&logs));
        assert_eq!(code.trim(), "3", "{what}: {logs}");
        assert!(
            logs.contains(&path) || logs.contains(path.trim_start_matches('/')),
            "{what}: {logs}"
        );
    }
}

/// Removes a container when dropped.
fn scopeguard(docker: &Path, name: &str) -> impl Drop {
    struct Guard(std::path::PathBuf, String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = Command::new(&self.0)
                .args(["rm", "--force", &self.1])
                .output();
        }
    }
    Guard(docker.to_owned(), name.to_owned())
}

/// A PostgreSQL cluster under write load, re-baked ten times with updates, inserts,
/// deletes, a VACUUM, a dropped and a new table, a new and a dropped database: every
/// generation verifies (composition included), holds a patch of a few pages, and the
/// replicas bakedb-init composes answer exactly the source's rows.
#[test]
fn postgres_chain_of_ten_generations_under_write_load() {
    use crate::pg::{self, PgServer, SEED_ITEMS_MD5};
    use crate::postgres::{Replica, base_ref, writes_in};
    let Some(pg_bin) = pg::pg_bin() else { return };
    let Some(docker) = util::docker() else { return };
    require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    std::fs::create_dir(d.join("src")).unwrap();
    let Some(source) = PgServer::start(&d.join("src")) else {
        return;
    };
    source.seed("app");
    source.psql(
        "app",
        "CREATE TABLE doomed AS SELECT * FROM items WHERE id <= 2000",
    );
    // Every PostgreSQL re-bake ships ~4 MiB whatever changed (the catalogs ANALYZE and VACUUM
    // rewrite in each database, a fresh WAL segment): ~32 MiB that never change keep four
    // patch generations under half the base, so the chain cuts at --max-patches, not at the
    // size rule (without them it cut at generation 4 about one run in two).
    source.psql(
        "app",
        "CREATE TABLE ballast AS SELECT g AS id, repeat(md5(g::text), 16) AS pad FROM generate_series(1, 60000) g",
    );
    let load = source.write_load("app", "writes");
    let base = base_ref();
    let layout = d.join("chain");
    let mut expected_md5 = SEED_ITEMS_MD5.to_owned();
    for g in 0..=10u32 {
        // (database, statement); a new database's catalogs ship whole, so it comes with the
        // fifth generation, a fresh base anyway.
        let mutations: &[(&str, &str)] = match g {
            1 => &[(
                "app",
                "UPDATE items SET price = price + 1 WHERE id BETWEEN 1 AND 100",
            )],
            2 => &[(
                "app",
                "INSERT INTO items SELECT id + 100000, name || ' again', price, tags FROM items WHERE id <= 300",
            )],
            3 => &[("app", "DELETE FROM items WHERE id BETWEEN 500 AND 700")],
            4 => &[("app", "VACUUM items")],
            5 => &[
                ("app", "DROP TABLE doomed"),
                ("postgres", "CREATE DATABASE other"),
            ],
            6 => &[(
                "app",
                "CREATE TABLE fresh AS SELECT id, name FROM items WHERE id <= 1000",
            )],
            7 => &[(
                "app",
                "UPDATE items SET name = name || '?' WHERE id BETWEEN 3000 AND 3050",
            )],
            8 => &[(
                "app",
                "UPDATE items SET name = name || '!' WHERE id BETWEEN 2000 AND 2100",
            )],
            9 => &[("postgres", "DROP DATABASE other")],
            _ => &[("app", "UPDATE items SET price = 0 WHERE id % 997 = 1")],
        };
        if g > 0 {
            for (db, sql) in mutations {
                source.psql(db, sql);
            }
            expected_md5 = source.psql("app", pg::ITEMS_MD5_SQL);
        }
        let reference = format!("oci:{}:g{g}", layout.display());
        let mut cmd = bakedb(d);
        cmd.args([
            "build",
            "--engine",
            "postgres",
            "--base",
            &base,
            "--max-patches",
            "4",
        ])
        .arg("--pg-bin")
        .arg(&pg_bin)
        .arg("--source")
        .arg(source.url("app"))
        .args(["--output", &reference]);
        if g > 0 {
            cmd.arg("--from")
                .arg(format!("oci:{}:g{}", layout.display(), g - 1));
        }
        let out = run_ok(&mut cmd);
        run_ok(bakedb(d).args(["verify", &reference]));
        let ij = inspect(d, &reference)["image_json"].clone();
        assert_eq!(ij["generation"].as_u64().unwrap_or(0), u64::from(g));
        let last = ij["chain"].as_array().unwrap().last().unwrap().clone();
        let fresh = g % 5 == 0;
        assert_eq!(
            last["kind"],
            if fresh { "base" } else { "patch" },
            "g{g}: {}",
            stderr(&out)
        );
        if !fresh {
            // A patch, not the cluster: the pages that changed, the catalogs the copy's
            // ANALYZE and VACUUM rewrite in each database (pg_class, pg_statistic) and the
            // fresh 1 MiB WAL segment.
            let total: u64 = ij["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["size"].as_u64().unwrap())
                .sum();
            assert!(
                last["raw_bytes"].as_u64().unwrap() * 4 < total,
                "g{g}: a patch of {} bytes for a cluster of {total}",
                last["raw_bytes"]
            );
            assert!(last["patched"].as_u64().unwrap() > 0, "g{g}: {last}");
            if g == 1 {
                // items itself ships as the pages its 100 updated rows touched: the two that
                // held them, and the few their new versions went to, of its ~115.
                let heap = format!(
                    "pgdata/{}",
                    source.psql("app", "SELECT pg_relation_filepath('items')")
                );
                let entry = ij["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|f| f["path"] == heap)
                    .unwrap_or_else(|| panic!("no {heap}"));
                let patch = entry["patches"][0]
                    .as_str()
                    .unwrap_or_else(|| panic!("{heap} is not patched: {entry}"));
                let size = ij["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|f| f["path"] == patch)
                    .unwrap()["size"]
                    .as_u64()
                    .unwrap();
                let pages = (size - delta::PATCH_HEADER) / (8 + 8192);
                assert!(
                    pages > 0 && pages <= 2 * 100,
                    "{heap}: {pages} pages patched"
                );
            }
            if g == 9 {
                assert!(
                    last["deleted"].as_u64().unwrap() > 0,
                    "g{g}: the dropped database: {last}"
                );
            }
        }
        if [4, 9].contains(&g) {
            let image = to_docker(&docker, d, &reference);
            let replica = Replica::start(
                Box::new({
                    let docker = docker.clone();
                    move || Command::new(&docker)
                }),
                &image.name,
                &[],
                &pg_bin,
            );
            replica.wait_ready();
            assert_eq!(replica.su("app", pg::ITEMS_MD5_SQL), expected_md5, "g{g}");
            let (rows, max_id) = writes_in(&replica);
            assert_eq!(rows, max_id, "g{g}: not one consistent point");
            if g >= 6 {
                assert_eq!(
                    replica.su("app", "SELECT count(*) FROM fresh"),
                    source.psql("app", "SELECT count(*) FROM fresh")
                );
            }
            let logs = replica.logs();
            assert!(logs.contains("bakedb-init: verified"), "{logs}");
            replica.stop_cleanly();
        }
    }
    load.stop();
}

/// A patch larger than one 16 MiB chunk is listed in image.json chunk by chunk, as any large
/// file: bakedb-init verifies it (it refuses a file over a chunk with one sha256, which is how
/// a 1 GiB database with 1 % of its rows updated at random once failed to start) and finds a
/// flipped byte in it.
#[test]
fn a_patch_larger_than_a_chunk_is_verified_chunk_by_chunk() {
    let umoci = require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    util::make_big_db(&d.join("app.db"), 48);
    run_ok(bakedb(d).args(util::sqlite_build("app.db", "oci:l:g0")));
    // 18 of the 48 one-MiB blobs rewritten: their overflow pages, well over a chunk, well
    // under the half of the file that would make a fresh base.
    rusqlite::Connection::open(d.join("app.db"))
        .unwrap()
        .execute_batch("UPDATE b SET data = randomblob(1048576) WHERE id <= 18")
        .unwrap();
    let built = run_ok(bakedb(d).args([
        "build", "--json", "--engine", "sqlite", "--source", "app.db", "--from", "oci:l:g0",
        "--output", "oci:l:g1",
    ]));
    assert!(
        stderr(&built).contains("generation 1: patch layer"),
        "{}",
        stderr(&built)
    );
    let data_digest = util::build_json(&built)["data_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let ij = inspect(d, "oci:l:g1")["image_json"].clone();
    let patch = ij["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == ".patches/1/app.db")
        .unwrap_or_else(|| panic!("no patch in {ij}"))
        .clone();
    assert!(patch["size"].as_u64().unwrap() > 16 << 20, "{patch}");
    assert!(patch["sha256"].is_null(), "{patch}");
    assert_eq!(
        patch["chunks"].as_array().unwrap().len() as u64,
        patch["size"].as_u64().unwrap().div_ceil(16 << 20),
        "{patch}"
    );
    run_ok(bakedb(d).args(["verify", "oci:l:g1"]));
    run_ok(Command::new(&umoci).current_dir(d).args([
        "unpack",
        "--rootless",
        "--image",
        "l:g1",
        "bundle",
    ]));
    let rootfs = d.join("bundle/rootfs");
    let init = || {
        run(Command::new(rootfs.join("bakedb/init"))
            .arg("--root")
            .arg(&rootfs)
            .arg("--verify-only")
            .env_clear()
            .env("BAKEDB_DATA_DIGEST", &data_digest)
            .stdin(Stdio::null()))
    };
    let out = init();
    assert!(out.status.success(), "{}", stderr(&out));
    let patch_file = rootfs.join(DATA_DIR).join(".patches/1/app.db");
    let mut bytes = std::fs::read(&patch_file).unwrap();
    let at = (20 << 20).min(bytes.len() - 1);
    bytes[at] ^= 1;
    std::fs::write(&patch_file, &bytes).unwrap();
    let out = init();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(".patches/1/app.db"),
        "{}",
        stderr(&out)
    );
}

/// An 8 MiB SQLite source baked as g0, changed by `sql`, re-baked from g0 as g1: the
/// re-bake's output.
fn rebake_big_db(d: &Path, sql: &str) -> std::process::Output {
    util::make_big_db(&d.join("app.db"), 8);
    run_ok(bakedb(d).args(util::sqlite_build("app.db", "oci:l:g0")));
    rusqlite::Connection::open(d.join("app.db"))
        .unwrap()
        .execute_batch(sql)
        .unwrap();
    run_ok(bakedb(d).args([
        "build", "--engine", "sqlite", "--source", "app.db", "--from", "oci:l:g0", "--output",
        "oci:l:g1",
    ]))
}

/// g1 verifies, its last chain link is of `kind`, and its database is the source's, byte
/// for byte.
fn assert_g1_is_the_source(d: &Path, kind: &str) {
    let ij = inspect(d, "oci:l:g1")["image_json"].clone();
    assert_eq!(
        ij["chain"].as_array().unwrap().last().unwrap()["kind"],
        kind,
        "{ij}"
    );
    run_ok(bakedb(d).args(["verify", "oci:l:g1"]));
    let baked = image_file(&d.join("l"), "g1", &format!("{DATA_DIR}/app.db")).unwrap();
    assert!(baked == std::fs::read(d.join("app.db")).unwrap());
}

/// A re-bake reads only the changed pages of a live SQLite source; when nearly every page
/// changed, the file would ship whole on a base as big as it, so the build takes a whole
/// snapshot after all (streamed into the layer) and writes a fresh base whose database is
/// the source's, byte for byte.
#[test]
fn a_rebake_that_changed_most_pages_takes_a_whole_snapshot_for_a_fresh_base() {
    let dir = test_dir();
    let d = dir.path();
    let out = rebake_big_db(d, "UPDATE b SET data = randomblob(1048576)");
    let err = stderr(&out);
    assert!(
        err.contains("generation 1: a fresh base, not a patch: its patches would be")
            && err.contains("twice its data"),
        "{err}"
    );
    // Two snapshots: the changed pages, then the whole file.
    assert_eq!(err.matches("snapshot of app.db").count(), 2, "{err}");
    let ij = inspect(d, "oci:l:g1")["image_json"].clone();
    assert!(
        ij["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["patches"].is_null()),
        "{ij}"
    );
    assert_g1_is_the_source(d, "base");
}

/// A file that changed in most of its pages ships whole in the patch layer when the data grew
/// enough that base and patch stay under twice the data: the partial snapshot (changed pages
/// only) cannot give the whole file, so the build takes a whole one, and the composed image
/// is the source byte for byte.
#[test]
fn a_file_that_changed_most_pages_and_grew_ships_whole_in_a_patch() {
    let dir = test_dir();
    let d = dir.path();
    let out = rebake_big_db(
        d,
        "UPDATE b SET data = randomblob(1048576);
         INSERT INTO b(data) SELECT randomblob(1048576) FROM b;
         INSERT INTO b(data) SELECT randomblob(1048576) FROM b;",
    );
    let err = stderr(&out);
    assert!(
        err.contains(
            "app.db changed in more than half of its pages and ships whole: taking a whole snapshot"
        ) && err.contains("generation 1: patch layer")
            && err.contains("1 whole, 0 patched"),
        "{err}"
    );
    assert_g1_is_the_source(d, "patch");
}
