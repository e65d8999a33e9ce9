//! bakedb-serve on a patched database (docs/patch-format.md), as a process: a base file and a
//! chain of real patches (updates, inserts, deletes, a dropped and a new table, VACUUM), each
//! the difference between two generations of a database written here. Every generation served
//! through its patches answers exactly what the real file of that generation answers, nothing
//! beside the files is created or changed, a damaged patch stops the start with exit 4 and a
//! sentence, and without BAKEDB_SQLITE_PATCHES the file is opened as it always was.

mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bakedb_testkit::http;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use server::{Server, TempDir, query, query_ndjson, temp_dir};

const CHUNK_BYTES: usize = 16 << 20;
/// How long a server that should refuse to start may take to exit: far above what it needs.
const PATIENCE: Duration = Duration::from_secs(60);

/// The database's page size, from its header.
fn page_size(db: &[u8]) -> usize {
    match u16::from_be_bytes([db[16], db[17]]) {
        1 => 65536,
        n => n as usize,
    }
}

/// docs/patch-format.md's composed digest: SHA-256 of the SHA-256 of each 16 MiB chunk.
fn composed_digest(bytes: &[u8]) -> [u8; 32] {
    let mut outer = Sha256::new();
    for chunk in bytes.chunks(CHUNK_BYTES) {
        outer.update(Sha256::digest(chunk));
    }
    if bytes.is_empty() {
        outer.update(Sha256::digest(b""));
    }
    outer.finalize().into()
}

/// A patch file in the documented format, from its parts.
fn patch_file(page_size: usize, len: u64, pages: &[(u64, &[u8])], digest: [u8; 32]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"BKDBPTCH");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(page_size as u32).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    out.extend_from_slice(&digest);
    for (number, _) in pages {
        out.extend_from_slice(&number.to_le_bytes());
    }
    for (_, page) in pages {
        out.extend_from_slice(page);
    }
    out
}

/// The patch that turns the database `old` into `new` (the same page size), as a builder
/// writes it: every page of `new` that differs from `old` or lies past its end, the new
/// length, the digest of `new`. Returns how many pages it holds.
fn write_patch(old: &Path, new: &Path, out: &Path) -> usize {
    let (old, new) = (std::fs::read(old).unwrap(), std::fs::read(new).unwrap());
    let size = page_size(&new);
    assert_eq!(page_size(&old), size, "a patch keeps the page size");
    assert_eq!(new.len() % size, 0);
    let pages: Vec<(u64, &[u8])> = new
        .chunks(size)
        .enumerate()
        .filter(|(p, page)| old.get(p * size..(p + 1) * size) != Some(*page))
        .map(|(p, page)| (p as u64, page))
        .collect();
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(
        out,
        patch_file(size, new.len() as u64, &pages, composed_digest(&new)),
    )
    .unwrap();
    pages.len()
}

/// The generations of one database: generation 0 is the base, each later one a transaction
/// on the one before.
const GENERATIONS: &[&str] = &[
    "PRAGMA page_size = 4096;
     CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT, price REAL, data BLOB);
     CREATE INDEX items_name ON items(name);
     CREATE INDEX items_kind ON items(kind, price);
     CREATE TABLE old_table(x INTEGER, y TEXT);
     CREATE VIRTUAL TABLE docs USING fts5(title, body);
     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
     INSERT INTO items SELECT i, printf('item-%05d', i), 'kind-' || (i % 7), i / 4.0,
                              randomblob(i % 400) FROM n;
     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
     INSERT INTO old_table SELECT i, hex(randomblob(20)) FROM n;
     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
     INSERT INTO docs SELECT 'title ' || i, 'body of document ' || i || ' about ' ||
                             CASE i % 3 WHEN 0 THEN 'apples' WHEN 1 THEN 'pears' ELSE 'plums' END FROM n;",
    // 1 % of the rows updated, scattered.
    "UPDATE items SET price = price * 2, name = name || '*' WHERE id % 97 = 0;",
    // The file grows.
    "WITH RECURSIVE n(i) AS (SELECT 5001 UNION ALL SELECT i + 1 FROM n WHERE i < 8000)
     INSERT INTO items SELECT i, printf('item-%05d', i), 'kind-' || (i % 5), i / 3.0,
                              randomblob(200 + i % 100) FROM n;",
    // Deletes leave free pages; the full-text index changes.
    "DELETE FROM items WHERE id BETWEEN 1000 AND 4000;
     DELETE FROM docs WHERE rowid % 4 = 0;
     INSERT INTO docs VALUES ('late', 'apples and plums, added late');",
    // A table dropped, a new one with its own index, a view.
    "DROP TABLE old_table;
     CREATE TABLE fresh(a INTEGER PRIMARY KEY, b TEXT UNIQUE);
     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
     INSERT INTO fresh SELECT i, 'fresh-' || i FROM n;
     CREATE VIEW expensive AS SELECT id, name FROM items WHERE price > 1000;",
    // VACUUM rewrites every page and shrinks the file.
    "VACUUM;",
    "UPDATE items SET data = zeroblob(10) WHERE id % 3 = 0;
     PRAGMA user_version = 7;",
];

/// The real file of every generation, in `real` (gen0.db, gen1.db, ...).
fn write_generations(real: &Path) -> Vec<PathBuf> {
    let work = real.join("work.db");
    let mut files = Vec::new();
    for (g, sql) in GENERATIONS.iter().enumerate() {
        let conn = rusqlite::Connection::open(&work).unwrap();
        conn.execute_batch(sql).unwrap();
        conn.close().unwrap();
        let file = real.join(format!("gen{g}.db"));
        std::fs::copy(&work, &file).unwrap();
        files.push(file);
    }
    files
}

/// A served directory: the base as app.db and the patch of generation g as
/// .patches/<g>/app.db, as an image lays them out.
struct Layout {
    dir: TempDir,
    base: PathBuf,
    patches: Vec<PathBuf>,
}

fn layout(name: &str, generations: &[PathBuf]) -> Layout {
    let dir = temp_dir(name);
    let base = dir.0.join("app.db");
    std::fs::copy(&generations[0], &base).unwrap();
    let mut patches = Vec::new();
    for g in 1..generations.len() {
        let patch = dir.0.join(format!(".patches/{g}/app.db"));
        let pages = write_patch(&generations[g - 1], &generations[g], &patch);
        assert!(pages > 0, "generation {g} changed nothing");
        patches.push(patch);
    }
    Layout { dir, base, patches }
}

fn joined(patches: &[PathBuf]) -> String {
    patches
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Every file and directory under `dir`: size, modification time and bytes.
fn state(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let bytes = if meta.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                todo.push(path.clone());
                Vec::new()
            };
            out.insert(path, (meta.len(), meta.modified().unwrap(), bytes));
        }
    }
    out
}

/// The answer without its timing, which is the only part allowed to differ.
fn without_timing(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        object.remove("elapsed_ms");
    }
    value
}

/// The questions asked of both servers: the schema, every table and shadow table whole (as
/// NDJSON, so nothing is truncated), scans through every index, aggregates, SQLite's own
/// checks and the page-by-page statistics of dbstat.
fn questions(real: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(real).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut sql: Vec<String> = tables
        .iter()
        .map(|t| format!("SELECT * FROM \"{t}\""))
        .collect();
    sql.extend(
        [
            "SELECT name, id FROM items WHERE name >= 'item-00900' ORDER BY name LIMIT 500",
            "SELECT kind, price, id FROM items INDEXED BY items_kind WHERE kind = 'kind-3' ORDER BY price",
            "SELECT count(*), sum(price), sum(length(data)), min(name), max(name), hex(max(data)) FROM items",
            "SELECT kind, count(*), avg(price) FROM items GROUP BY kind ORDER BY kind",
            "SELECT rowid, title FROM docs WHERE docs MATCH 'apples' ORDER BY rowid",
            "SELECT count(*), max(y) FROM old_table",
            "SELECT a, b FROM fresh WHERE b > 'fresh-4' ORDER BY b",
            "SELECT * FROM expensive",
            "SELECT name, path, pageno, pagetype, ncell, payload, unused, mx_payload FROM dbstat ORDER BY name, path",
            "PRAGMA integrity_check",
            "PRAGMA quick_check",
            "PRAGMA foreign_key_check",
            "PRAGMA journal_mode",
            "PRAGMA page_size",
            "PRAGMA encoding",
            "PRAGMA auto_vacuum",
            "PRAGMA application_id",
            "PRAGMA index_list(items)",
            "PRAGMA page_count",
            "PRAGMA freelist_count",
            "PRAGMA schema_version",
            "PRAGMA user_version",
            "SELECT * FROM sqlite_schema ORDER BY name",
        ]
        .map(String::from),
    );
    sql
}

/// `served` answers every question as `real`, which serves the real file.
fn assert_same_answers(served: &Server, real: &Server, questions: &[String], what: &str) {
    let schema = http::get(served.addr, "/v1/schema");
    assert_eq!(schema.status, 200, "{what}: {}", schema.text());
    assert_eq!(
        schema.json(),
        http::get(real.addr, "/v1/schema").json(),
        "{what}: /v1/schema"
    );
    let mut answered = 0;
    for sql in questions {
        let (status, lines) = query_ndjson(served.addr, sql);
        let (want_status, want_lines) = query_ndjson(real.addr, sql);
        assert_eq!(status, want_status, "{what}: {sql}: {lines:?}");
        let strip = |lines: Vec<Value>| lines.into_iter().map(without_timing).collect::<Vec<_>>();
        assert_eq!(strip(lines), strip(want_lines), "{what}: {sql}");
        let json = query(served.addr, sql, json!([]));
        let want = query(real.addr, sql, json!([]));
        assert_eq!(json.status, want.status, "{what}: {sql}");
        assert_eq!(
            without_timing(json.json()),
            without_timing(want.json()),
            "{what}: {sql}"
        );
        answered += usize::from(status == 200);
    }
    // Most questions have answers (a few name the table that a generation dropped or has
    // not created yet, and must fail alike).
    assert!(
        answered + 3 >= questions.len(),
        "{what}: {answered} answered"
    );
}

/// The paths the server process has open as descriptors, and the files it has mapped.
fn open_and_mapped(server: &Server) -> (Vec<PathBuf>, String) {
    let pid = server.child.id();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    (
        fds,
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(),
    )
}

#[test]
fn every_generation_served_through_its_patches_answers_as_its_real_file() {
    let real_dir = temp_dir("patched-real");
    let generations = write_generations(&real_dir.0);
    let len = |g: usize| std::fs::metadata(&generations[g]).unwrap().len();
    assert!(len(2) > len(1), "generation 2 grows the file");
    assert!(len(5) < len(4), "VACUUM shrinks it");
    let layout = layout("patched", &generations);
    let before = state(&layout.dir.0);

    for (g, generation) in generations.iter().enumerate().skip(1) {
        let patches = joined(&layout.patches[..g]);
        let name = format!("patched-gen{g}");
        let served = server::spawn(
            temp_dir(&name),
            &layout.base,
            &[
                ("BAKEDB_SQLITE_PATCHES", patches.as_str()),
                ("BAKEDB_POOL_SIZE", "2"),
            ],
            None,
        );
        let first_line = served.log.lock().unwrap().clone();
        let patch_word = if g == 1 { "patch" } else { "patches" };
        assert!(
            first_line.contains(&format!(
                "serving {} with {g} {patch_word} read-only",
                layout.base.display()
            )),
            "{first_line}"
        );
        let real = server::start_on(
            &format!("patched-real-gen{g}"),
            |db| {
                std::fs::copy(generation, db).unwrap();
            },
            &[("BAKEDB_POOL_SIZE", "2")],
        );
        let what = format!("generation {g}");
        let questions = questions(generation);
        assert_same_answers(&served, &real, &questions, &what);
        // The same without SQLite's memory mapping: every page through xRead.
        let unmapped = server::spawn(
            temp_dir(&format!("{name}-unmapped")),
            &layout.base,
            &[
                ("BAKEDB_SQLITE_PATCHES", patches.as_str()),
                ("BAKEDB_SQLITE_MMAP_BYTES", "0"),
            ],
            None,
        );
        assert_same_answers(&unmapped, &real, &questions, &format!("{what} unmapped"));
        // SQLite's mmap_size reads back through the VFS: the whole composed file by default
        // as for the real file, 0 when it is off.
        let mmap_size =
            |s: &Server| query(s.addr, "PRAGMA mmap_size", json!([])).json()["rows"][0][0].clone();
        assert_eq!(mmap_size(&served), mmap_size(&real), "{what}");
        assert_eq!(mmap_size(&unmapped), json!(0), "{what}");

        // Base and patches are mapped, then closed: no descriptor holds them.
        let (fds, maps) = open_and_mapped(&served);
        for file in std::iter::once(&layout.base).chain(&layout.patches[..g]) {
            assert!(
                maps.contains(&file.display().to_string()),
                "{what}: {} is not mapped:\n{maps}",
                file.display()
            );
            assert!(!fds.contains(file), "{what}: {} is open", file.display());
        }
        drop(served);
        drop(unmapped);
        assert_eq!(
            state(&layout.dir.0),
            before,
            "{what}: a file beside the database was created, changed or touched"
        );
    }
}

#[test]
fn without_patches_the_file_is_opened_as_before() {
    let real_dir = temp_dir("unpatched-real");
    let generations = write_generations(&real_dir.0);
    let layout = layout("unpatched", &generations);
    let before = state(&layout.dir.0);
    let real = server::start_on(
        "unpatched-real-gen0",
        |db| {
            std::fs::copy(&generations[0], db).unwrap();
        },
        &[],
    );
    // The variable unset and set empty both mean: no patches, the base is the database.
    for env in [&[][..], &[("BAKEDB_SQLITE_PATCHES", "")][..]] {
        let served = server::spawn(temp_dir("unpatched-served"), &layout.base, env, None);
        let first_line = served.log.lock().unwrap().clone();
        assert!(
            first_line.contains(&format!("serving {} read-only", layout.base.display())),
            "{first_line}"
        );
        // SQLite's own open: the file stays open on a descriptor of every connection.
        let (fds, _) = open_and_mapped(&served);
        assert!(fds.contains(&layout.base), "{fds:?}");
        assert_same_answers(
            &served,
            &real,
            &questions(&generations[0]),
            "the base alone",
        );
    }
    assert_eq!(state(&layout.dir.0), before);
}

/// Starts bakedb-serve and waits for it to exit on its own: its exit code and stderr.
fn refused(base: &Path, patches: &str) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bakedb-serve"))
        .env_clear()
        .env("BAKEDB_DATABASE", base)
        .env("BAKEDB_SQLITE_PATCHES", patches)
        .env("BAKEDB_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bakedb-serve did not exit with patches {patches}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

#[test]
fn a_damaged_patch_stops_the_start_with_exit_4_and_says_what_is_wrong() {
    let real_dir = temp_dir("damaged-real");
    let generations = write_generations(&real_dir.0);
    let layout = layout("damaged", &generations[..3]);
    let good = std::fs::read(&layout.patches[1]).unwrap();
    let damaged = layout.dir.0.join(".patches/damaged/app.db");
    std::fs::create_dir_all(damaged.parent().unwrap()).unwrap();
    let chain = format!("{}:{}", layout.patches[0].display(), damaged.display());
    let name = format!(
        "patch {} (2 of 2 in BAKEDB_SQLITE_PATCHES)",
        damaged.display()
    );
    let pages = u64::from_le_bytes(good[16..24].try_into().unwrap()) / 4096;
    let with = |at: usize, value: &[u8]| {
        let mut bytes = good.clone();
        bytes[at..at + value.len()].copy_from_slice(value);
        bytes
    };
    // A patch of 8192-byte pages that is well formed in itself: page 0 of generation 2.
    let gen2 = std::fs::read(&generations[2]).unwrap();
    let other_page_size = patch_file(
        8192,
        gen2.len().next_multiple_of(8192) as u64,
        &[(0, &gen2[..8192])],
        [0; 32],
    );
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            with(0, b"SQLite f"),
            format!("{name} is not a bakedb patch: it starts with \"SQLite f\", not \"BKDBPTCH\""),
        ),
        (
            with(8, &2u32.to_le_bytes()),
            format!("{name} is patch format version 2; this bakedb-serve reads version 1"),
        ),
        (
            with(64, &pages.to_le_bytes()),
            format!(
                "{name} has page number {pages} (entry 0), out of range: the composed file has {pages} pages"
            ),
        ),
        (
            good[..good.len() - 100].to_vec(),
            format!(
                "{name} is truncated: {} bytes, its header says {}",
                good.len() - 100,
                good.len()
            ),
        ),
        (
            other_page_size,
            format!("{name} has page size 8192, the patches before it 4096"),
        ),
    ];
    for (bytes, message) in cases {
        std::fs::write(&damaged, bytes).unwrap();
        let (code, stderr) = refused(&layout.base, &chain);
        assert_eq!(code, Some(4), "{message}\n{stderr}");
        assert!(
            stderr.starts_with(&format!("bakedb-serve: {message}")),
            "expected {message:?}, got:\n{stderr}"
        );
    }
    // Alone, the 8192-byte patch meets the database's own page size.
    let only = layout.dir.0.join(".patches/only/app.db");
    std::fs::create_dir_all(only.parent().unwrap()).unwrap();
    std::fs::write(
        &only,
        patch_file(8192, 8192, &[(0, &gen2[..8192])], [0; 32]),
    )
    .unwrap();
    let (code, stderr) = refused(&layout.base, &only.display().to_string());
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("the database's page size is 4096, the patches' 8192"),
        "{stderr}"
    );
    // A patch that is not there.
    let missing = layout.dir.0.join(".patches/9/app.db");
    let (code, stderr) = refused(
        &layout.base,
        &format!("{}:{}", layout.patches[0].display(), missing.display()),
    );
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "bakedb-serve: patch {} (2 of 2 in BAKEDB_SQLITE_PATCHES): No such file or directory",
            missing.display()
        )),
        "{stderr}"
    );
    // An empty entry is a bad setting, not a bad patch.
    let (code, stderr) = refused(&layout.base, &format!("{}:", layout.patches[0].display()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("has an empty entry"), "{stderr}");
}
