//! bakedb-serve as a child process on 127.0.0.1 with a generated database (bakedb-testkit's
//! items database, the one the e2e tests of the image query too), for the crate's test
//! files: start it, wait for its address, query it, read its metrics and its memory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use bakedb_testkit::dirs::test_dir_for;
use bakedb_testkit::fixtures::items_db;
use bakedb_testkit::{http, serve};

// What the test files ask through, as they did when it was written here.
#[allow(unused_imports)]
pub use bakedb_testkit::serve::{RUNAWAY, query};

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// What the server wrote to stderr so far (a thread appends each line as it comes).
    pub log: Arc<Mutex<String>>,
    pub dir: TempDir,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// A directory of one test (bakedb-testkit's), removed when dropped: `.0` is its path.
pub struct TempDir(pub PathBuf, tempfile::TempDir);

/// A fresh directory named after the test.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = test_dir_for(&format!("serve-{name}"));
    TempDir(dir.path().to_owned(), dir)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(name: &str, rows: i64, env: &[(&str, &str)]) -> Server {
    start_on(name, |db| items_db(db, rows, false), env)
}

/// bakedb-serve on the database `make` writes at the path it is given.
pub fn start_on(name: &str, make: impl FnOnce(&Path), env: &[(&str, &str)]) -> Server {
    start_with(name, make, env, None)
}

/// The same, with the descriptor limit (soft and hard, so the server cannot raise it) set to
/// `fd_limit` in the child.
pub fn start_with(
    name: &str,
    make: impl FnOnce(&Path),
    env: &[(&str, &str)],
    fd_limit: Option<u64>,
) -> Server {
    let dir = temp_dir(name);
    let db = dir.0.join("app.db");
    make(&db);
    spawn(dir, &db, env, fd_limit)
}

/// bakedb-serve on `db`, which the caller put in `dir` with whatever else it needs (patches);
/// `dir` goes when the server does.
pub fn spawn(dir: TempDir, db: &Path, env: &[(&str, &str)], fd_limit: Option<u64>) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bakedb-serve"));
    command
        .env_clear()
        .env("BAKEDB_DATABASE", db)
        .env("BAKEDB_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(limit) = fd_limit {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    // "bakedb-serve: serving PATH read-only on http://127.0.0.1:PORT (...)"
    let addr: SocketAddr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    let log = Arc::new(Mutex::new(first));
    let sink = Arc::clone(&log);
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap_or(0) > 0 {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    Server {
        child,
        addr,
        log,
        dir,
        reader: Some(reader),
    }
}

impl Server {
    /// Everything the server wrote to stderr, once it has exited: the reader thread is
    /// joined (it ends at the pipe's end), so the last lines are in, not still on their way.
    pub fn exited_log(&mut self) -> String {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "exited_log: the server is still running"
        );
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.log.lock().unwrap().clone()
    }

    /// One line of /proc/PID/status in KiB, e.g. "VmHWM" (peak RSS) or "VmRSS".
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in\n{status}"))
    }

    /// Descriptors the server has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// The value of one metric line, e.g. `bakedb_in_flight` or
    /// `bakedb_query_errors_total{kind="timeout"}`; 0 when the server has not printed it yet
    /// (Prometheus counters by label appear with their first increment).
    pub fn metric(&self, name: &str) -> u64 {
        serve::metric(&http::get(self.addr, "/metrics").text(), name)
    }

    /// Waits until the process exits, for at most `patience`; its status, or None if it is
    /// still running then.
    pub fn wait_exit(&mut self, patience: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Polls `cond` until it holds; fails the test with `what` after `patience`. The limit only
/// turns a hang into a failure: it is far above how long the condition should take.
pub fn wait_until(what: &str, patience: Duration, cond: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The same as NDJSON: status and the parsed lines (or the error's JSON).
pub fn query_ndjson(addr: SocketAddr, sql: &str) -> (u16, Vec<Value>) {
    let r = serve::ndjson(addr, sql);
    let lines = if r.status == 200 {
        serve::ndjson_lines(&r)
    } else {
        vec![r.json()]
    };
    (r.status, lines)
}
