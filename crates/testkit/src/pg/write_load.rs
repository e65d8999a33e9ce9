//! Rows committed one by one while a test does something else.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{PSQL_ARGS, PgServer};

/// How long a write load may take to commit its first row.
const LOAD_DEADLINE: Duration = Duration::from_secs(30);

/// `CREATE TABLE IF NOT EXISTS` for a WriteLoad table.
pub(super) fn create_writes(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
           id bigserial PRIMARY KEY,
           v text,
           at timestamptz DEFAULT now()
         );"
    )
}

/// Rows committed one by one into a table while a test does something else (takes a
/// snapshot). One long-lived psql, fed through its stdin by a background thread in lockstep:
/// one `INSERT ... RETURNING id` (its own transaction, autocommit) at a time, the next only
/// after psql printed the id, i.e. after the commit. So the count is exact: every row counted
/// is committed, and no statement is in flight once the thread stopped.
///
/// `start` returns once the first row is committed, so a snapshot taken after it is taken
/// under write load. The rows are `v = 'load <n> row <i>'`, n unique per WriteLoad in this
/// process. Stopped by `stop` (or Drop, which ignores errors).
pub struct WriteLoad {
    committed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
    tag: String,
}

impl WriteLoad {
    pub(super) fn start(server: &PgServer, db: &str, table: &str) -> WriteLoad {
        use std::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("load {}", NEXT.fetch_add(1, Ordering::Relaxed));
        server.psql(db, &create_writes(table));

        let mut cmd = server.client("psql");
        cmd.args(PSQL_ARGS)
            .args(["-d", db])
            .env("PGAPPNAME", format!("bakedb-test {tag}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
        let committed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (committed, stop) = (committed.clone(), stop.clone());
            let (table, tag) = (table.to_owned(), tag.clone());
            std::thread::Builder::new()
                .name(format!("pg {tag}"))
                .spawn(move || write_rows(child, &table, &tag, &committed, &stop))
                .unwrap()
        };
        let mut load = WriteLoad {
            committed,
            stop,
            thread: Some(thread),
            tag,
        };

        let deadline = Instant::now() + LOAD_DEADLINE;
        while load.committed() == 0 {
            if load.thread.as_ref().unwrap().is_finished() {
                let why = load.join().err().unwrap_or_default();
                panic!("the write load on {db}.{table} stopped before its first commit: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "the write load on {db}.{table} committed nothing in {LOAD_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        load
    }

    /// Rows committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// `v` of this load's rows starts with this and a space: `WHERE v LIKE '<tag> %'`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Stop after the statement in flight and return how many rows were committed. Panics if
    /// the load failed before it was stopped (psql's stderr in the message).
    pub fn stop(mut self) -> u64 {
        if let Err(why) = self.join() {
            panic!("the write load failed: {why}");
        }
        self.committed()
    }

    fn join(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err("the write load thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for WriteLoad {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// The WriteLoad thread: one INSERT per round trip until `stop`, then psql's stdin closed.
fn write_rows(
    mut child: Child,
    table: &str,
    tag: &str,
    committed: &AtomicU64,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut stdin: ChildStdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut result = Ok(());
    let mut row: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        row += 1;
        let sql = format!("INSERT INTO {table} (v) VALUES ('{tag} row {row}') RETURNING id;\n");
        if let Err(e) = stdin.write_all(sql.as_bytes()).and_then(|()| stdin.flush()) {
            result = Err(format!("writing to psql: {e}"));
            break;
        }
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => {
                result = Err("psql exited".into());
                break;
            }
            Ok(_) if line.trim().parse::<i64>().is_ok() => {
                committed.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {
                result = Err(format!("psql printed {line:?} instead of an id"));
                break;
            }
            Err(e) => {
                result = Err(format!("reading from psql: {e}"));
                break;
            }
        }
    }
    // EOF on stdin ends psql once it finished what it read.
    drop(stdin);
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    match result {
        Ok(()) if status.success() => Ok(()),
        Ok(()) => Err(format!("psql exited with {status}: {err}")),
        Err(why) => Err(format!("{why} ({status}): {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirs::test_dir;
    use crate::pg::POLL;

    #[test]
    fn write_load_commits_while_a_reader_sees_rows_grow() {
        let dir = test_dir();
        let Some(pg) = PgServer::start(dir.path()) else {
            return;
        };
        pg.psql("postgres", "CREATE DATABASE app");
        let load = pg.write_load("app", "writes");
        // start() returned, so at least one row is committed and visible to another session.
        let count = || -> u64 {
            pg.psql("app", "SELECT count(*) FROM writes")
                .parse()
                .unwrap()
        };
        let first = count();
        assert!(first >= 1, "start returned before a commit was visible");
        let deadline = Instant::now() + LOAD_DEADLINE;
        let mut seen = first;
        // Growth seen three times by a concurrent reader, not just once.
        for _ in 0..3 {
            let before = seen;
            while seen <= before {
                assert!(Instant::now() < deadline, "writes stuck at {seen} rows");
                std::thread::sleep(POLL);
                seen = count();
            }
        }
        let tag = load.tag().to_owned();
        let committed = load.stop();
        assert!(
            committed >= seen,
            "stop() says {committed}, a reader saw {seen}"
        );
        // Exact: nothing in flight after stop(), and the thread counted only committed rows.
        assert_eq!(count(), committed);
        assert_eq!(
            pg.psql(
                "app",
                &format!("SELECT count(*) FROM writes WHERE v LIKE '{tag} row %'")
            ),
            committed.to_string()
        );
        // Stopped means stopped.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(count(), committed);
        eprintln!("write load: {committed} rows committed");
    }
}
