//! Consistency of the snapshot while the source keeps changing, and concurrent builds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use crate::util::{bakedb, make_db, make_rollback_db, run_ok, sqlite_build, test_dir};

const BATCH: i64 = 250;

/// Read the baked database back out of a layout through bakedb's own snapshot of it.
fn count_rows_in_image(dir: &std::path::Path, reference: &str) -> (i64, String) {
    let out = run_ok(bakedb(dir).args(["inspect", "--json", reference]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = &v["image_json"]["files"][0];
    let name = file["path"].as_str().unwrap();
    // Extract the data file from the data layer (the second-to-last layer).
    let layers = v["layers"].as_array().unwrap();
    let data_layer = &layers[layers.len() - 2];
    let digest = data_layer["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let layout = reference
        .trim_start_matches("oci:")
        .rsplit_once(':')
        .unwrap()
        .0;
    let blob = std::fs::File::open(dir.join(layout).join("blobs/sha256").join(digest)).unwrap();
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    let extracted = dir.join("extracted.db");
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_string_lossy() == format!("var/lib/bakedb/{name}") {
            entry.unpack(&extracted).unwrap();
        }
    }
    let c = rusqlite::Connection::open_with_flags(
        &extracted,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    (n, check)
}

#[test]
fn live_wal_source_is_captured_at_one_committed_point() {
    let dir = test_dir();
    let db = dir.path().join("live.db");
    make_db(&db, BATCH);
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(1));
    let writer = {
        let (db, stop, committed) = (db.clone(), Arc::clone(&stop), Arc::clone(&committed));
        std::thread::spawn(move || {
            let c = rusqlite::Connection::open(&db).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
            // Each transaction adds exactly BATCH rows, so any committed state has a multiple.
            while !stop.load(Ordering::Relaxed) {
                let tx = c.unchecked_transaction().unwrap();
                for i in 0..BATCH {
                    tx.execute(
                        "INSERT INTO t(v) VALUES (?1)",
                        [format!("live {i} {}", "x".repeat(200))],
                    )
                    .unwrap();
                }
                tx.commit().unwrap();
                committed.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Build while the writer commits; several builds so some land mid-transaction.
    let mut counts = Vec::new();
    for i in 0..4 {
        while committed.load(Ordering::Relaxed) < 2 + i * 3 {
            std::thread::yield_now();
        }
        let reference = format!("oci:out:v{i}");
        run_ok(bakedb(dir.path()).args([
            "build", "--engine", "sqlite", "--source", "live.db", "--output", &reference,
        ]));
        let (n, check) = count_rows_in_image(dir.path(), &reference);
        assert_eq!(check, "ok", "baked copy {i} fails integrity_check");
        assert_eq!(
            n % BATCH,
            0,
            "baked copy {i} has {n} rows: not a committed state (batches of {BATCH})"
        );
        counts.push(n);

        // `bakedb snapshot` takes the same kind of copy into a directory.
        let out = format!("snap{i}");
        run_ok(bakedb(dir.path()).args([
            "snapshot", "--engine", "sqlite", "--source", "live.db", "--out", &out,
        ]));
        let c = rusqlite::Connection::open_with_flags(
            dir.path().join(&out).join("live.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let check: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "snapshot {i} fails integrity_check");
        assert_eq!(
            n % BATCH,
            0,
            "snapshot {i} has {n} rows: not a committed state"
        );
        assert!(
            n >= counts[i as usize],
            "snapshot {i} is older than the build before it"
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "row counts go backwards: {counts:?}"
    );
    assert!(
        counts.last() > counts.first(),
        "the writer made no progress between builds: {counts:?}"
    );
}

#[test]
fn concurrent_builds_into_one_layout_keep_every_tag() {
    let dir = test_dir();
    make_db(&dir.path().join("app.db"), 20_000);
    let children: Vec<_> = (0..4)
        .map(|i| {
            bakedb(dir.path())
                .args(sqlite_build("app.db", &format!("oci:out:t{i}")))
                .args(["--label", &format!("n={i}")])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..4 {
        run_ok(bakedb(dir.path()).args(["verify", &format!("oci:out:t{i}")]));
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 4, "{index}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out/blobs/sha256"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// Whether process `pid` has `path` open and its main thread is asleep: the state of a build
/// whose SQLite connection waits in its busy handler for a writer's lock.
fn waits_on(pid: u32, path: &std::path::Path) -> bool {
    let has_open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path));
    // /proc/PID/stat: "PID (comm) STATE ..."; comm may hold spaces, so split after ')'.
    let asleep = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('S'))
        })
        .unwrap_or(false);
    has_open && asleep
}

/// A writer holds its lock (rollback journal, BEGIN EXCLUSIVE) when the build starts and
/// commits once the build is seen waiting for it: with a long enough --busy-timeout the
/// build waits and bakes the committed state, the writer's row included. (errors.rs: with a
/// short one it fails as busy.)
#[test]
fn build_waits_for_a_writer_within_the_busy_timeout() {
    let dir = test_dir();
    let db = dir.path().join("locked.db");
    make_rollback_db(&db, BATCH);
    let writer = rusqlite::Connection::open(&db).unwrap();
    writer
        .execute_batch(
            "BEGIN EXCLUSIVE; INSERT INTO t(v) VALUES ('committed while the build waited');",
        )
        .unwrap();
    let mut child = bakedb(dir.path())
        .args(sqlite_build("locked.db", "oci:out:v1"))
        .args(["--quiet", "--busy-timeout", "5m"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let db = db.canonicalize().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !waits_on(child.id(), &db) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the build ended ({status}) instead of waiting for the lock: {err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the build was never seen waiting for the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    writer.execute_batch("COMMIT").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (n, check) = count_rows_in_image(dir.path(), "oci:out:v1");
    assert_eq!(check, "ok");
    assert_eq!(
        n,
        BATCH + 1,
        "the image lacks the row committed while the build waited"
    );
}
