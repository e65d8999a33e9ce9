//! A real PostgreSQL server on overlayfs with the library preloaded, as in a container: a
//! frozen, cleanly shut down cluster in the lower layer, started read-only (the settings of
//! bakedb's postgres profile). Reads must copy no relation file up; writes (a superuser
//! turning read-only off) must work through the promotion, survive a checkpoint, a clean
//! shutdown and a restart; the same reads without the shim copy the table up, which shows
//! the test can tell the difference.
//!
//! Needs root (mounts, and running the server as the `postgres` user) and PostgreSQL's
//! server tools (/usr/lib/postgresql/N/bin or BAKEDB_TEST_PG_BIN): skipped locally without
//! them, failed under CI=true.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bakedb_testkit::dirs::files_under;
use bakedb_testkit::pg::{Launch, PgServer, RunAs, initdb, pg_bin};
use bakedb_testkit::tools::require_root;
use common::*;

/// The settings of bakedb's read-only postgres profile that change how PostgreSQL writes.
const READ_ONLY: [&str; 5] = [
    "default_transaction_read_only=on",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "autovacuum=off",
];

/// The test's directory (the library, the servers' socket directory and logs, the layers)
/// and its mounts, unmounted and removed when dropped.
struct Setup {
    dir: PathBuf,
    bin: PathBuf,
    run_as: RunAs,
    mounts: Vec<PathBuf>,
}

impl Setup {
    fn mkdir_owned(&self, p: &Path, mode: u32) {
        fs::create_dir_all(p).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        self.run_as.own(p).unwrap();
    }

    /// Start postgres on `data`, with the library preloaded unless `shim` is None (else its
    /// extra environment), with bakedb's read-only settings unless `read_only` is false,
    /// logging into `log`.
    fn start(
        &self,
        data: &Path,
        shim: Option<&[(&str, &str)]>,
        read_only: bool,
        log: &str,
    ) -> PgServer {
        let mut launch = Launch {
            log: Some(log.to_owned()),
            ..Launch::default()
        };
        if read_only {
            launch.settings = READ_ONLY.map(String::from).into();
        }
        if let Some(env) = shim {
            let library = self.dir.join("copyup.so").display().to_string();
            launch.env.push(("LD_PRELOAD".into(), library));
            launch
                .env
                .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        }
        PgServer::launch(&self.bin, self.run_as, &self.dir, data, &launch)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Fast shutdown; the server must exit 0 having logged a clean shutdown. Its log.
fn stop(mut server: PgServer) -> String {
    let status = server.stop().unwrap_or_else(|e| panic!("{e}"));
    let log = server.log();
    assert!(status.success(), "postgres exited with {status}:\n{log}");
    assert!(log.contains("database system is shut down"), "{log}");
    log
}

impl Drop for Setup {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            umount(m);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Mount a fresh overlay of `lower` at dir/<name>/merged; returns (upper, merged).
fn overlay(setup: &mut Setup, lower: &Path, name: &str) -> (PathBuf, PathBuf) {
    let top = setup.dir.join(name);
    let (upper, work, merged) = (top.join("upper"), top.join("work"), top.join("merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", &merged, "overlay", &opts)
        .unwrap_or_else(|e| panic!("mount overlay {opts}: {e}"));
    setup.mounts.push(merged.clone());
    (upper, merged)
}

/// Regular files under `dir`, relative, with their sizes.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = files_under(dir)
        .into_iter()
        .map(|(p, n)| (p.strip_prefix(dir).unwrap().display().to_string(), n))
        .collect();
    out.sort();
    out
}

const READS: &[&str] = &[
    "SELECT count(*), sum(i), md5(string_agg(t, ',' ORDER BY i)) FROM big",
    "SELECT t FROM big WHERE i = 12345",
    "SELECT count(*) FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid \
     JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_description d ON d.objoid = c.oid",
    "SELECT relname, relpages > 0 FROM pg_class WHERE relname IN ('big', 'big_t') ORDER BY 1",
    "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace",
];

fn run_reads(server: &PgServer) -> Vec<String> {
    READS.iter().map(|q| server.psql("postgres", q)).collect()
}

#[test]
fn postgres_reads_copy_nothing_up_and_writes_survive_a_restart() {
    // Mounts need root, and PostgreSQL then runs as the postgres user.
    if !require_root() {
        return;
    }
    let Some(bin) = pg_bin() else {
        return;
    };
    let Some(run_as) = RunAs::detect() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("bakedb-copyup-shim-pg-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let mut setup = Setup {
        dir: dir.clone(),
        bin,
        run_as,
        mounts: Vec::new(),
    };
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    setup.mkdir_owned(&dir.join("run"), 0o755);
    fs::copy(shim_path(), dir.join("copyup.so")).unwrap();
    fs::set_permissions(dir.join("copyup.so"), fs::Permissions::from_mode(0o755)).unwrap();

    // The lower layer: a frozen cluster, shut down cleanly (what bakedb bakes).
    let lower = dir.join("lower");
    setup.mkdir_owned(&lower, 0o755);
    let data = lower.join("data");
    initdb(&setup.bin, run_as, &data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let big = {
        let server = setup.start(&data, None, false, "seed.log");
        server.psql(
            "postgres",
            "CREATE TABLE big AS SELECT i, md5(i::text) AS t FROM generate_series(1, 100000) i; \
             CREATE INDEX big_t ON big (t); CREATE INDEX big_i ON big (i);",
        );
        server.psql("postgres", "VACUUM (FREEZE, ANALYZE)");
        server.psql("postgres", "CHECKPOINT");
        let big = server.psql("postgres", "SELECT pg_relation_filepath('big')");
        stop(server);
        big
    };

    // Without the shim: the table is copied up by a read.
    let (upper_off, merged_off) = overlay(&mut setup, &lower, "off");
    let without = {
        let server = setup.start(
            &merged_off.join("data"),
            Some(&[("BAKEDB_COPYUP_SHIM", "off")]),
            true,
            "off.log",
        );
        let results = run_reads(&server);
        stop(server);
        results
    };
    assert!(
        upper_off.join("data").join(&big).is_file(),
        "without the shim, reading {big} did not copy it up: the test cannot see the shim work"
    );

    // With the shim: the same reads, the same results, no relation file copied up.
    let (upper, merged) = overlay(&mut setup, &lower, "on");
    let merged_data = merged.join("data");
    let log = {
        let server = setup.start(
            &merged_data,
            Some(&[("BAKEDB_COPYUP_SHIM_LOG", "1")]),
            true,
            "on.log",
        );
        assert_eq!(run_reads(&server), without);
        eprintln!(
            "copied up by reads with the shim: {:?}",
            files(&upper.join("data"))
        );
        let copied: Vec<(String, u64)> = files(&upper.join("data"))
            .into_iter()
            .filter(|(rel, _)| rel.starts_with("base/") || rel.starts_with("global/"))
            // Written at every start (state "in production"), and new files.
            .filter(|(rel, _)| rel != "global/pg_control" && !rel.ends_with("/pg_internal.init"))
            .collect();
        assert!(
            copied.is_empty(),
            "relation files copied up by reads: {copied:?}"
        );
        // A superuser may still write: the promotion makes it work, through a checkpoint.
        server.psql(
            "postgres",
            "BEGIN READ WRITE; \
             UPDATE big SET t = 'changed' WHERE i = 7; \
             CREATE TABLE x AS SELECT 1 AS one; \
             INSERT INTO x VALUES (2); \
             COMMIT;",
        );
        server.psql("postgres", "CHECKPOINT");
        stop(server)
    };
    assert!(
        log.contains("reopened read-write: "),
        "no promotion logged:\n{log}"
    );
    assert!(!log.contains("failed (errno"), "{log}");
    assert!(
        upper.join("data").join(&big).is_file(),
        "the updated table was not copied up"
    );

    // A restart (with the shim) sees the writes and the unchanged rest.
    let server = setup.start(&merged_data, Some(&[]), true, "restart.log");
    assert_eq!(
        server.psql("postgres", "SELECT t FROM big WHERE i = 7"),
        "changed"
    );
    assert_eq!(
        server.psql("postgres", "SELECT count(*) FROM big WHERE t = 'changed'"),
        "1"
    );
    assert_eq!(server.psql("postgres", "SELECT sum(one) FROM x"), "3");
    assert_eq!(server.psql("postgres", READS[1]), without[1]);
    assert_eq!(
        server.psql("postgres", "SELECT count(*), sum(i) FROM big"),
        without[0].rsplit_once('|').unwrap().0
    );
    stop(server);
}
