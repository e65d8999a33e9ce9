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
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn pg_bin() -> Option<PathBuf> {
    let has_tools = |d: &Path| {
        ["initdb", "postgres", "psql"]
            .iter()
            .all(|t| d.join(t).is_file())
    };
    if let Some(dir) = std::env::var_os("BAKEDB_TEST_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            has_tools(&dir),
            "BAKEDB_TEST_PG_BIN={} lacks initdb, postgres or psql",
            dir.display()
        );
        return Some(dir);
    }
    let found = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((major, bin))
        })
        .max_by_key(|(m, _)| *m)
        .map(|(_, b)| b);
    if found.is_none() {
        assert!(
            !under_ci(),
            "PostgreSQL's server tools are not installed, and CI=true"
        );
        eprintln!("skipping: PostgreSQL is not installed");
    }
    found
}

/// uid and gid of the `postgres` user.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let found = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    });
    if found.is_none() {
        assert!(!under_ci(), "there is no postgres user, and CI=true");
        eprintln!("skipping: no postgres user to run PostgreSQL as");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn no_pg_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k_bytes = k.as_encoded_bytes();
        if k_bytes.starts_with(b"PG")
            || k_bytes.starts_with(b"BAKEDB_COPYUP_SHIM")
            || k_bytes == b"LD_PRELOAD"
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

struct Setup {
    dir: PathBuf,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    port: u16,
    mounts: Vec<PathBuf>,
}

/// A running postmaster, stopped (fast shutdown) on drop if still running.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Setup {
    fn as_postgres(&self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }

    fn mkdir_owned(&self, p: &Path, mode: u32) {
        fs::create_dir_all(p).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(p, Some(self.uid), Some(self.gid)).unwrap();
    }

    fn psql(&self, sql: &str) -> Result<String, String> {
        let out = no_pg_env(&mut Command::new(self.bin.join("psql")))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .arg("-h")
            .arg(self.dir.join("run"))
            .args(["-p", &self.port.to_string(), "-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn sql(&self, sql: &str) -> String {
        self.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Start postgres on `data`, with the library preloaded unless `shim` is None (else its
    /// extra environment), with bakedb's read-only settings unless `read_only` is false.
    fn start(
        &self,
        data: &Path,
        shim: Option<&[(&str, &str)]>,
        read_only: bool,
        log: &str,
    ) -> Server {
        let log = self.dir.join(log);
        let mut cmd = Command::new(self.bin.join("postgres"));
        no_pg_env(&mut cmd)
            .arg("-D")
            .arg(data)
            .arg("-k")
            .arg(self.dir.join("run"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses="])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        if read_only {
            for s in [
                "default_transaction_read_only=on",
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
                "autovacuum=off",
            ] {
                cmd.args(["-c", s]);
            }
        }
        if let Some(env) = shim {
            cmd.env("LD_PRELOAD", self.dir.join("copyup.so"));
            for (k, v) in env {
                cmd.env(k, v);
            }
        }
        self.as_postgres(&mut cmd);
        let child = cmd.spawn().unwrap();
        let mut server = Server { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.psql("SELECT 1").is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("postgres exited with {status}:\n{}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server {
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fast shutdown; the server must exit 0 having logged a clean shutdown.
    fn stop(mut self) -> String {
        // SAFETY: kill on our unreaped child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        let log = self.log_text();
        assert!(status.success(), "postgres exited with {status}:\n{log}");
        assert!(log.contains("database system is shut down"), "{log}");
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill on our unreaped child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let t = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
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
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let target = c(merged.to_str().unwrap());
    // SAFETY: NUL-terminated strings alive for the call.
    let r = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            target.as_ptr(),
            c"overlay".as_ptr(),
            0,
            c(&opts).as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mount overlay {opts}: {}",
        std::io::Error::last_os_error()
    );
    setup.mounts.push(merged.clone());
    (upper, merged)
}

/// Regular files under `dir`, relative, with their sizes.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, m.size()));
            }
        }
    }
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

fn run_reads(setup: &Setup) -> Vec<String> {
    READS.iter().map(|q| setup.sql(q)).collect()
}

#[test]
fn postgres_reads_copy_nothing_up_and_writes_survive_a_restart() {
    if !is_root() {
        assert!(
            !under_ci(),
            "this test mounts overlayfs and needs root, and CI=true"
        );
        eprintln!("skipping: not root");
        return;
    }
    let Some(bin) = pg_bin() else {
        return;
    };
    let Some((uid, gid)) = postgres_user() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("bakedb-copyup-shim-pg-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let mut setup = Setup {
        dir: dir.clone(),
        bin,
        uid,
        gid,
        port: free_port(),
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
    let mut initdb = Command::new(setup.bin.join("initdb"));
    no_pg_env(&mut initdb)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ])
        .stdout(Stdio::null());
    setup.as_postgres(&mut initdb);
    let out = initdb.output().unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let big = {
        let server = setup.start(&data, None, false, "seed.log");
        setup.sql(
            "CREATE TABLE big AS SELECT i, md5(i::text) AS t FROM generate_series(1, 100000) i; \
             CREATE INDEX big_t ON big (t); CREATE INDEX big_i ON big (i);",
        );
        setup.sql("VACUUM (FREEZE, ANALYZE)");
        setup.sql("CHECKPOINT");
        let big = setup.sql("SELECT pg_relation_filepath('big')");
        server.stop();
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
        let results = run_reads(&setup);
        server.stop();
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
        assert_eq!(run_reads(&setup), without);
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
        setup.sql(
            "BEGIN READ WRITE; \
             UPDATE big SET t = 'changed' WHERE i = 7; \
             CREATE TABLE x AS SELECT 1 AS one; \
             INSERT INTO x VALUES (2); \
             COMMIT;",
        );
        setup.sql("CHECKPOINT");
        server.stop()
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
    assert_eq!(setup.sql("SELECT t FROM big WHERE i = 7"), "changed");
    assert_eq!(
        setup.sql("SELECT count(*) FROM big WHERE t = 'changed'"),
        "1"
    );
    assert_eq!(setup.sql("SELECT sum(one) FROM x"), "3");
    assert_eq!(setup.sql(READS[1]), without[1]);
    assert_eq!(
        setup.sql("SELECT count(*), sum(i) FROM big"),
        without[0].rsplit_once('|').unwrap().0
    );
    server.stop();
}
