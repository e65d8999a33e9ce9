//! Inputs the tests and benches build rather than commit: the base image fixtures (OCI
//! layouts made by xtask/scripts/NAME-base.sh under target/fixtures) and SQLite databases.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::Error;
use crate::dirs::workspace_root;
use crate::error::or_panic;
use crate::process::checked;

/// target/fixtures/NAME (an OCI layout), built by xtask/scripts/NAME-base.sh unless it is
/// there: the script builds beside it, renames at the end and is a no-op once the layout has
/// its tag. A file lock orders the processes that want it at once (test binaries, `cargo
/// xtask fixtures`), so whichever comes first builds it and the others find it; all run the
/// script the same way (without SOURCE_DATE_EPOCH), so it is the same bytes. `show_output`
/// lets the script's progress through to this process's stdout and stderr.
pub fn base_image(name: &str, show_output: bool) -> Result<PathBuf, Error> {
    let root = workspace_root();
    let fixtures = root.join("target/fixtures");
    fs::create_dir_all(&fixtures).map_err(Error::io(&fixtures))?;
    let out = fixtures.join(name);
    let lock_path = fixtures.join(format!("{name}.lock"));
    let lock = File::create(&lock_path).map_err(Error::io(&lock_path))?;
    lock.lock().map_err(Error::io(&lock_path))?;
    let mut cmd = Command::new("bash");
    cmd.arg(root.join(format!("xtask/scripts/{name}-base.sh")))
        .arg(&out)
        .env_remove("SOURCE_DATE_EPOCH")
        .current_dir(&root);
    if show_output {
        cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    }
    checked(&mut cmd)?;
    drop(lock);
    Ok(out)
}

/// The busybox base image fixture (tag `latest`), built once per test process. Callers
/// `require!("umoci")` first: the script uses it.
pub fn busybox_base() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| or_panic(base_image("busybox", false)))
        .clone()
}

/// The PostgreSQL base image fixture (tags `latest` and the major version), built from
/// Debian's postgresql packages: the stand-in for the official postgres image.
pub fn postgres_base() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| or_panic(base_image("postgres", false)))
        .clone()
}

/// The MariaDB base image fixture (tags `latest` and the release series), built from
/// Debian's mariadb packages: the stand-in for the official mariadb image.
pub fn mariadb_base() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| or_panic(base_image("mariadb", false)))
        .clone()
}

/// items(id, name, price, data): `rows` rows, an index on name, a view `cheap` (the database
/// bakedb-serve's tests and the e2e tests of its image both query, so both expect the same
/// answers). In WAL mode, like a live application's, when `wal`.
pub fn items_db(path: &Path, rows: i64, wal: bool) {
    let c = rusqlite::Connection::open(path).unwrap();
    if wal {
        c.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
    }
    c.execute_batch(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL, data BLOB);
         CREATE INDEX items_name ON items(name);
         CREATE VIEW cheap AS SELECT id, name FROM items WHERE price < 10;",
    )
    .unwrap();
    let tx = c.unchecked_transaction().unwrap();
    {
        let mut stmt = tx
            .prepare("INSERT INTO items VALUES (?1, ?2, ?3, ?4)")
            .unwrap();
        for i in 1..=rows {
            stmt.execute(rusqlite::params![
                i,
                format!("item-{i:05}"),
                i as f64 / 4.0,
                vec![i as u8, 0xff]
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// A database of 4 KiB pages, `t(id, v)` with an index on v and `rows` rows of 60-odd
/// bytes: the material of the corruption tests.
pub fn indexed_db(path: &Path, rows: i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA page_size=4096; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX iv ON t(v);",
    )
    .unwrap();
    let tx = c.unchecked_transaction().unwrap();
    for i in 0..rows {
        tx.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("value {i} {}", "x".repeat(50))],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// Break the page type of every other 4 KiB page after the first few: one problem per page
/// for SQLite's quick_check, dozens in all; the header stays intact.
pub fn break_page_types(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    for page in (4..bytes.len() / 4096).step_by(2) {
        bytes[page * 4096] = 0x42;
    }
    fs::write(path, &bytes).unwrap();
}
