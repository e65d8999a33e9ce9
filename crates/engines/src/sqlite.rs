//! SQLite: a consistent snapshot with the online backup API.
//!
//! The backup copies every page in a single step, inside one read transaction on the source,
//! so a database that another process keeps writing (WAL or rollback journal) is captured at
//! exactly one committed point. The copy is switched to the rollback journal so the image
//! never needs -wal/-shm files, and checked with `PRAGMA quick_check` so a corrupt source is
//! refused instead of baked.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde_json::json;

use crate::{DataFile, Error, Result, Snapshot};

const HEADER: &[u8; 16] = b"SQLite format 3\0";

fn source_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Source {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Cheap checks that need no SQLite: exists, regular file, SQLite header.
pub fn check_source(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| {
        source_err(
            path,
            format!("cannot be read ({e}); pass the path of a SQLite database file"),
        )
    })?;
    if !meta.is_file() {
        return Err(source_err(
            path,
            "is not a regular file; pass the path of a SQLite database file",
        ));
    }
    let mut header = [0u8; 16];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut header))
        .map_err(|e| source_err(path, format!("cannot be read ({e})")))?;
    if n == 0 {
        return Err(source_err(path, "is empty; there is nothing to bake"));
    }
    if n < 16 || &header != HEADER {
        return Err(source_err(
            path,
            "is not a SQLite database (no \"SQLite format 3\" header); if it is encrypted (e.g. SQLCipher), export a plain copy first",
        ));
    }
    Ok(())
}

/// Name of the database file inside the image: the source's file name, made safe.
pub fn image_file_name(source: &Path) -> String {
    let name: String = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("db{name}")
    } else {
        name
    }
}

/// Copy `source` consistently into `out_dir`; `taken_at` is recorded as the snapshot time.
/// `durable` fsyncs the copy: wanted for a snapshot directory that outlives the command, a
/// waste of a full disk write for the scratch copy a build reads once and deletes.
pub fn snapshot(source: &Path, out_dir: &Path, taken_at: &str, durable: bool) -> Result<Snapshot> {
    check_source(source)?;
    let sql = |what: &str| {
        let what = what.to_owned();
        let path = source.to_owned();
        move |e: rusqlite::Error| Error::Sqlite {
            path,
            what,
            source: e,
        }
    };
    let name = image_file_name(source);
    fs::create_dir_all(out_dir).map_err(|e| Error::Io {
        op: "creating",
        path: out_dir.to_owned(),
        source: e,
    })?;
    let dest = out_dir.join(&name);
    let tmp = out_dir.join(format!(".{name}.partial"));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let src = Connection::open_with_flags(
            source,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("opening"))?;
        // Fail early, with SQLite's own words, on a file SQLite cannot read (e.g. encrypted).
        let (page_size, schema_version): (i64, i64) = src
            .query_row("SELECT (SELECT page_size FROM pragma_page_size), (SELECT schema_version FROM pragma_schema_version)", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| match e.sqlite_error().map(|f| f.extended_code) {
                // SQLITE_READONLY_DIRECTORY: a WAL database needs its -shm file next to it.
                Some(1544) => source_err(
                    source,
                    "is in WAL mode and SQLite cannot create its -shm file because the directory is not writable; make the directory writable for this user, or copy the database somewhere writable",
                ),
                _ => Error::Sqlite { path: source.to_owned(), what: "reading the schema (is it encrypted or corrupt?)".into(), source: e },
            })?;
        let mut dst = Connection::open(&tmp).map_err(sql("creating the snapshot file"))?;
        // The copy is private until it is renamed into place: no journal and no syncs while
        // the backup writes it (it is synced once at the end when it must be durable).
        dst.execute_batch("PRAGMA synchronous=OFF; PRAGMA journal_mode=OFF;")
            .map_err(sql("preparing the snapshot file"))?;
        {
            let backup = rusqlite::backup::Backup::new(&src, &mut dst)
                .map_err(sql("starting the online backup"))?;
            // All pages in one step (-1): one read transaction, one committed point. A writer
            // holding an exclusive lock (rollback journal) makes the step busy: retry briefly.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                match backup
                    .step(-1)
                    .map_err(sql("copying with the online backup API"))?
                {
                    rusqlite::backup::StepResult::Done => break,
                    _ if std::time::Instant::now() > deadline => {
                        return Err(source_err(
                            source,
                            "stayed locked by a writer for 30 s; retry when it commits",
                        ));
                    }
                    _ => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
        let mode: String = dst
            .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
            .map_err(sql("switching the copy to rollback journal"))?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Err(source_err(
                source,
                format!("the copy stayed in journal mode {mode}"),
            ));
        }
        let check: String = dst
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(sql("checking the copy"))?;
        if check != "ok" {
            return Err(source_err(
                source,
                format!(
                    "is corrupt: PRAGMA quick_check says {check:?}; repair it (e.g. sqlite3 .recover) before baking"
                ),
            ));
        }
        let (page_count, user_version): (i64, i64) = dst
            .query_row("SELECT (SELECT page_count FROM pragma_page_count), (SELECT user_version FROM pragma_user_version)", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql("reading the copy"))?;
        drop(dst);
        if durable {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::Io {
                    op: "syncing",
                    path: tmp.clone(),
                    source: e,
                })?;
        }
        fs::rename(&tmp, &dest).map_err(|e| Error::Io {
            op: "renaming",
            path: dest.clone(),
            source: e,
        })?;
        Ok(json!({
            "source": source.to_string_lossy(),
            "taken_at": taken_at,
            "method": "sqlite online backup",
            "position": {"page_size": page_size, "page_count": page_count, "schema_version": schema_version, "user_version": user_version},
        }))
    })();
    let provenance = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    Ok(Snapshot {
        engine: "sqlite",
        files: vec![DataFile {
            rel_path: name,
            host_path: dest,
            mode: 0o644,
        }],
        dirs: Vec::new(),
        provenance,
    })
}

/// The read-only profile bakedb-init applies at start (the mechanism is in crates/init):
/// SQLite's temporary files (large sorts, GROUP BY, temp tables) go to /tmp rather than
/// beside the data, and BAKEDB_DATABASE names the baked file for whatever command the image
/// runs (sqlite3, datasette, bakedb-serve).
pub fn profile(snapshot: &Snapshot) -> serde_json::Value {
    let file = snapshot.files.first().map_or("", |f| f.rel_path.as_str());
    json!({
        "name": "sqlite-readonly",
        "env": {
            "SQLITE_TMPDIR": "/tmp",
            "BAKEDB_DATABASE": format!("{{data_dir}}/{file}"),
        },
    })
}

/// Files of a directory written by `bakedb snapshot`, with its recorded provenance.
pub fn load_snapshot_dir(dir: &Path) -> Result<Snapshot> {
    let meta_path = dir.join("snapshot.json");
    let bytes = fs::read(&meta_path).map_err(|e| Error::Io {
        op: "reading",
        path: meta_path.clone(),
        source: e,
    })?;
    let meta: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| source_err(&meta_path, format!("is not valid JSON: {e}")))?;
    if meta["engine"] != "sqlite" {
        return Err(source_err(
            &meta_path,
            format!("records engine {}, not sqlite", meta["engine"]),
        ));
    }
    let name = meta["file"]
        .as_str()
        .ok_or_else(|| source_err(&meta_path, "has no \"file\""))?;
    if name.contains('/') || name.starts_with('.') {
        return Err(source_err(
            &meta_path,
            "names a file outside the snapshot directory",
        ));
    }
    let host_path: PathBuf = dir.join(name);
    check_source(&host_path)?;
    Ok(Snapshot {
        engine: "sqlite",
        files: vec![DataFile {
            rel_path: name.to_owned(),
            host_path,
            mode: 0o644,
        }],
        dirs: Vec::new(),
        provenance: meta["provenance"].clone(),
    })
}

/// Record a snapshot directory's metadata so `build --source DIR` can use it as it is.
pub fn write_snapshot_meta(dir: &Path, snapshot: &Snapshot) -> Result<()> {
    let meta = json!({"engine": "sqlite", "file": snapshot.files[0].rel_path, "provenance": snapshot.provenance});
    let path = dir.join("snapshot.json");
    fs::write(&path, serde_json::to_vec_pretty(&meta).expect("json")).map_err(|e| Error::Io {
        op: "writing",
        path,
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_db(path: &Path, rows: i64) {
        let c = Connection::open(path).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
            .unwrap();
        for i in 0..rows {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
                .unwrap();
        }
    }

    #[test]
    fn snapshot_of_wal_database_is_self_contained() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        make_db(&src, 100);
        let keep_open = Connection::open(&src).unwrap(); // keeps the WAL un-checkpointed
        let snap = snapshot(&src, &dir.path().join("out"), "t", true).unwrap();
        drop(keep_open);
        let f = &snap.files[0];
        assert_eq!(f.rel_path, "app.db");
        let uri = format!("file:{}?immutable=1", f.host_path.display());
        let c = Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
        .unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100);
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_ne!(mode.to_lowercase(), "wal");
        assert!(!dir.path().join("out/app.db-wal").exists());
    }

    #[test]
    fn refuses_missing_empty_and_non_sqlite_sources() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let e = snapshot(&dir.path().join("nope.db"), &out, "t", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be read"), "{e}");
        std::fs::write(dir.path().join("empty.db"), b"").unwrap();
        let e = snapshot(&dir.path().join("empty.db"), &out, "t", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        std::fs::write(dir.path().join("text.db"), vec![b'x'; 4096]).unwrap();
        let e = snapshot(&dir.path().join("text.db"), &out, "t", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a SQLite database"), "{e}");
    }

    #[test]
    fn refuses_corrupt_database() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.db");
        {
            let c = Connection::open(&src).unwrap();
            c.execute_batch("PRAGMA page_size=4096; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX iv ON t(v);").unwrap();
            let tx = c.unchecked_transaction().unwrap();
            for i in 0..2000 {
                tx.execute(
                    "INSERT INTO t(v) VALUES (?1)",
                    [format!("value {i} {}", "x".repeat(50))],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        // Scribble over the middle of the file, leaving the header intact.
        let mut bytes = std::fs::read(&src).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 8192] {
            *b = 0xA5;
        }
        std::fs::write(&src, &bytes).unwrap();
        let e = snapshot(&src, &dir.path().join("out"), "t", true).unwrap_err();
        let msg = format!(
            "{e}: {:?}",
            std::error::Error::source(&e).map(|s| s.to_string())
        );
        assert!(
            msg.contains("corrupt") || msg.contains("malformed"),
            "{msg}"
        );
        assert!(!dir.path().join("out/bad.db").exists());
    }
}
