//! The database side: read-only connections, the authorizer, limits, and running one
//! statement row by row. Nothing here knows HTTP.
//!
//! Read-only by construction, three times over: the file is opened `immutable=1&mode=ro`
//! (O_RDONLY, no locks, no -wal/-shm: on overlayfs nothing is copied up), `query_only` is on,
//! and an authorizer (authorizer.rs) denies every action that is not a read, before the
//! statement exists; the statement must then be read-only by `sqlite3_stmt_readonly`.
//! A patched database (BAKEDB_SQLITE_PATCHES) is opened the same way through the read-only
//! VFS of vfs.rs, which composes base and patches in place.
//!
//! Bounded, so one statement cannot take the process down: SQLITE_LIMIT_LENGTH caps every
//! string and blob SQLite builds (randomblob, zeroblob, group_concat, printf, ||), a hard heap
//! limit caps what all connections allocate together (a row of many large values, sorts,
//! temporary b-trees), and a progress handler stops a statement at its deadline or when its
//! client is gone or the server shuts down. Each of these fails the statement with a
//! sentence; none of them stops the server.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, ffi};
use serde_json::{Map, Value, json};

use crate::authorizer::{self, Policy};
use crate::config::Config;
use crate::encode;
use crate::vfs::{self, Patched};

/// What the authorizer noted about the statement being prepared (see authorizer.rs).
type AuthLog = Arc<Mutex<authorizer::Log>>;

pub struct Db {
    conn: Connection,
    control: Arc<Control>,
    log: AuthLog,
    /// SQLITE_LIMIT_LENGTH, for the message when a value exceeds it.
    max_value_bytes: usize,
    /// The composition a patched database is read through, held so the pool's connections
    /// share one (vfs::Patched::open finds it while it lives).
    _patched: Option<Patched>,
}

/// Why a statement was stopped before its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stop {
    /// The client hung up: nobody will read the answer.
    ClientGone = 1,
    /// SIGTERM's drain ran out: the process is about to exit.
    ShuttingDown = 2,
}

/// Shared between a connection's progress handler and whoever may stop its statement: the
/// deadline, and the job (one loan of the connection) with whether and why it was stopped.
#[derive(Default)]
pub struct Control {
    /// Nanoseconds since `epoch()`; u64::MAX when idle.
    deadline: AtomicU64,
    /// The job holding the connection shifted left by two, or'ed with the `Stop` that ended
    /// it; 0 when no job does. One word, so that stopping is a compare-and-swap against the
    /// job meant: a handle kept past its request cannot stop a later request's statement.
    job: AtomicU64,
}

impl Control {
    /// Checked by SQLite every 1000 virtual-machine steps and by `query` after every row.
    fn interrupted(&self) -> bool {
        nanos_since_epoch(Instant::now()) > self.deadline.load(Ordering::Relaxed)
            || self.stopped().is_some()
    }

    /// Why the current job was stopped, if it was stopped rather than timed out.
    fn stopped(&self) -> Option<Stop> {
        match self.job.load(Ordering::Acquire) & 3 {
            0 => None,
            1 => Some(Stop::ClientGone),
            _ => Some(Stop::ShuttingDown),
        }
    }

    fn stop_job(&self, job: u64, why: Stop) {
        // Fails, as it should, if the job has ended or was stopped already.
        let _ = self.job.compare_exchange(
            job << 2,
            job << 2 | why as u64,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Stops whatever job holds the connection now; false if none does.
    pub fn stop_current(&self, why: Stop) -> bool {
        let current = self.job.load(Ordering::Acquire);
        if current == 0 {
            return false;
        }
        self.stop_job(current >> 2, why);
        true
    }
}

/// One loan of a connection, as something another task can stop.
#[derive(Clone)]
pub struct Job {
    control: Arc<Control>,
    id: u64,
}

impl Job {
    pub fn stop(&self, why: Stop) {
        self.control.stop_job(self.id, why);
    }
}

/// Instants as nanoseconds since the process started, so one atomic can hold a deadline.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

/// `file:` URI of a path: '?', '#' and '%' would end or escape the path part.
fn file_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            '%' => uri.push_str("%25"),
            c => uri.push(c),
        }
    }
    uri + "?immutable=1&mode=ro"
}

/// Caps what SQLite allocates in the whole process: past `bytes` an allocation fails and its
/// statement ends with SQLITE_NOMEM (the connection stays usable). Above half of it, page
/// caches recycle pages and sorts spill to temporary files sooner, so ordinary queries rarely
/// reach the hard limit.
pub fn limit_heap(bytes: u64) {
    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    // SAFETY: both only set process-wide limits; no connection is open yet.
    unsafe {
        ffi::sqlite3_hard_heap_limit64(bytes);
        ffi::sqlite3_soft_heap_limit64(bytes / 2);
    }
}

impl Db {
    pub fn open(config: &Config) -> Result<Db, String> {
        let path = &config.database;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        let patched = match config.patches.as_slice() {
            [] => None,
            patches => Some(Patched::open(path, patches)?),
        };
        let file_len = patched
            .as_ref()
            .map_or(meta.len(), |p| p.composition().len());
        let mut conn = connect(config, patched.as_ref())?;
        // No string or blob beyond the largest answer: such a value could not be sent anyway,
        // and without the limit `randomblob(1e9)` or a group_concat over a big table builds it
        // in one function call, where neither the deadline nor anything else can stop it.
        let max_value_bytes = config.max_response_bytes;
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, max_value_bytes as i32)
            .and_then(|_| {
                let sql = config.max_request_bytes.clamp(4096, i32::MAX as usize);
                conn.set_limit(Limit::SQLITE_LIMIT_SQL_LENGTH, sql as i32)
            })
            .map_err(|e| format!("setting the limits of {}: {e}", path.display()))?;
        // No `temp_store = MEMORY`: with it the aggregate of `cargo xtask bench sqlite`
        // (GROUP BY over 10,000 rows) ran 0.90x a default open, without it 1.36x
        // (docs/benchmarks.md); temporary files go to SQLITE_TMPDIR (/tmp, from the
        // profile) when a sort outgrows memory.
        // Mapping the whole immutable file lets a page read be a memory access into the
        // shared page cache instead of a copy into each connection's cache: range scans
        // ran 1.6x faster on 1 GiB than with 256 MiB mapped (docs/benchmarks.md).
        let mmap = config
            .mmap_bytes
            .unwrap_or(file_len.next_multiple_of(1 << 20));
        let tuning = if config.default_open {
            String::new()
        } else {
            format!(
                "PRAGMA mmap_size = {mmap}; PRAGMA cache_size = -{};",
                config.cache_kib
            )
        };
        conn.execute_batch(&format!("PRAGMA query_only = 1; {tuning}"))
            .map_err(|e| format!("tuning {}: {e}", path.display()))?;
        // Reading the schema proves the file is a database before the port opens.
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(|e| format!("reading the schema of {}: {e}", path.display()))?;

        // Shadow tables are told apart by SQLite's `PRAGMA table_list` (type 'shadow'), read
        // on a connection of its own: table_list connects every virtual table, and this
        // connection must connect them under the authorizer (which lets their modules' own
        // statements through, see authorizer.rs), so that every query takes the path the
        // tests exercise rather than one that only a reconnection would reveal.
        let shadow_tables: Vec<(String, String)> = {
            let probe = connect(config, patched.as_ref())?;
            let mut stmt = probe
                .prepare("SELECT schema, name FROM pragma_table_list WHERE type = 'shadow'")
                .map_err(|e| format!("listing the tables of {}: {e}", path.display()))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(|e| format!("listing the tables of {}: {e}", path.display()))?
        };
        let log: AuthLog = Arc::default();
        let record = Arc::clone(&log);
        let policy = Policy::new(shadow_tables);
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            let mut log = record.lock().unwrap_or_else(|e| e.into_inner());
            match policy.check(&ctx, &mut log) {
                Ok(()) => Authorization::Allow,
                Err(_) => Authorization::Deny,
            }
        }))
        .map_err(|e| format!("installing the authorizer: {e}"))?;
        let control = Arc::new(Control {
            deadline: AtomicU64::new(u64::MAX),
            ..Control::default()
        });
        let watch = Arc::clone(&control);
        // Every 1000 virtual-machine steps: cheap, and a runaway query stops within
        // microseconds of its deadline or of being stopped.
        conn.progress_handler(1000, Some(move || watch.interrupted()))
            .map_err(|e| format!("installing the time limit: {e}"))?;
        Ok(Db {
            conn,
            control,
            log,
            max_value_bytes,
            _patched: patched,
        })
    }

    /// What stops this connection's statements, for the drain.
    pub fn control(&self) -> Arc<Control> {
        Arc::clone(&self.control)
    }

    /// A new loan of the connection: statements from now on can be stopped through the
    /// returned job, and only until `end_job`.
    pub fn begin_job(&mut self) -> Job {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        self.control.job.store(id << 2, Ordering::Release);
        Job {
            control: Arc::clone(&self.control),
            id,
        }
    }

    pub fn end_job(&mut self) {
        self.control.job.store(0, Ordering::Release);
    }
}

/// One connection to the configured database: immutable and read-only, through the patched
/// VFS when there are patches, or (only to measure what that is worth) as most programs open
/// it.
fn connect(config: &Config, patched: Option<&Patched>) -> Result<Connection, String> {
    let path = &config.database;
    let read_only = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if let Some(patched) = patched {
        let uri = format!("{}&{}", file_uri(path), patched.uri_parameter());
        return Connection::open_with_flags_and_vfs(uri, read_only, vfs::VFS_NAME).map_err(|e| {
            format!(
                "opening {} with its {} patches: {e}",
                path.display(),
                patched.composition().patch_count()
            )
        });
    }
    if config.default_open {
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    } else {
        Connection::open_with_flags(file_uri(path), read_only)
    }
    .map_err(|e| format!("opening {}: {e}", path.display()))
}

#[derive(Debug)]
pub enum QueryError {
    /// The statement is wrong: malformed SQL, an unknown table or function, bad parameters,
    /// or an error while running it (malformed JSON, integer overflow): 400.
    Invalid {
        message: String,
        offset: Option<usize>,
    },
    /// A value or a row larger than BAKEDB_MAX_RESPONSE_BYTES: 400.
    TooLarge { message: String },
    /// A write or anything else that is not a read: 403.
    Denied { message: String, reason: String },
    /// The time limit: 504.
    Timeout { limit: Duration },
    /// The client went away; nobody sees the answer (499 in the metrics).
    ClientGone,
    /// Interrupted by the end of SIGTERM's drain: 503.
    ShuttingDown,
    /// SQLite's share of memory (BAKEDB_SQLITE_HEAP_BYTES) ran out: 503.
    OutOfMemory { message: String },
    /// No room for the answer in memory before the deadline: 503.
    Busy { message: String },
    /// The server's fault (I/O, a corrupt file, no descriptors, a bug): 500.
    Failed { message: String },
}

/// One line for a table that /v1/schema could not describe.
impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Invalid { message, .. }
            | QueryError::TooLarge { message }
            | QueryError::OutOfMemory { message }
            | QueryError::Busy { message }
            | QueryError::Failed { message } => f.write_str(message),
            QueryError::Denied { message, reason } => write!(f, "{message}: {reason}"),
            QueryError::Timeout { limit } => {
                write!(f, "reading it took longer than {} ms", limit.as_millis())
            }
            QueryError::ClientGone => f.write_str("the client went away"),
            QueryError::ShuttingDown => f.write_str("the server is shutting down"),
        }
    }
}

/// Parameters as sent: a JSON array (positional, ?1...) or an object (named, :name).
pub enum Params {
    None,
    Positional(Vec<Value>),
    Named(Map<String, Value>),
}

impl Params {
    pub fn from_json(value: Option<Value>) -> Result<Params, QueryError> {
        match value {
            None | Some(Value::Null) => Ok(Params::None),
            Some(Value::Array(items)) => Ok(Params::Positional(items)),
            Some(Value::Object(map)) => Ok(Params::Named(map)),
            Some(other) => Err(QueryError::Invalid {
                message: format!(
                    "params must be an array (positional) or an object (named), not {other}"
                ),
                offset: None,
            }),
        }
    }
}

fn to_sql(value: &Value, which: &str) -> Result<SqlValue, QueryError> {
    Ok(match value {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(*b as i64),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        _ => {
            return Err(QueryError::Invalid {
                message: format!(
                    "parameter {which} is {value}: pass a number, string, boolean or null"
                ),
                offset: None,
            });
        }
    })
}

/// What a query produced, after `on_prepared` was called once and `on_row` per row until it
/// returned Ok(false) (the consumer has enough) or an error.
pub struct Outcome {
    /// The statement's column names (also `row.as_ref().column_names()` on each row).
    pub columns: Vec<String>,
    pub rows: usize,
    /// Stopped by the consumer with rows left.
    pub truncated: bool,
}

/// Called with each row; Ok(false) ends the statement early (the answer is full).
pub type OnRow<'a> = &'a mut dyn FnMut(&rusqlite::Row<'_>) -> Result<bool, QueryError>;
/// Called once the statement is prepared and bound, with its column names, before it runs.
pub type OnPrepared<'a> = &'a mut dyn FnMut(&[String]) -> Result<(), QueryError>;

impl Db {
    fn log(&self) -> std::sync::MutexGuard<'_, authorizer::Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error for an interrupted statement: stopped, or out of time.
    fn interruption(&self, limit: Duration) -> QueryError {
        match self.control.stopped() {
            Some(Stop::ClientGone) => QueryError::ClientGone,
            Some(Stop::ShuttingDown) => QueryError::ShuttingDown,
            None => QueryError::Timeout { limit },
        }
    }

    /// Sorts SQLite's errors into the request's fault (4xx) and the server's (5xx) by the
    /// primary result code: SQLITE_ERROR is what SQLite reports for a statement that is wrong
    /// (a syntax error, `no such table`, `malformed JSON`, `integer overflow`), whether found
    /// while preparing or while running.
    fn classify(&self, e: rusqlite::Error, limit: Duration) -> QueryError {
        let denied = self.log().denied.take();
        // The authorizer's record decides: SQLite reports some denials (functions) as
        // plain errors.
        if let Some(reason) = denied {
            return QueryError::Denied {
                message: e.to_string(),
                reason,
            };
        }
        let (code, message, offset) = match e {
            rusqlite::Error::SqlInputError {
                error, msg, offset, ..
            } => (error.extended_code, msg, usize::try_from(offset).ok()),
            rusqlite::Error::SqliteFailure(error, msg) => (
                error.extended_code,
                msg.unwrap_or_else(|| error.to_string()),
                None,
            ),
            rusqlite::Error::Empty => {
                return QueryError::Invalid {
                    message: "the query is empty: no SQL statement, or only comments".into(),
                    offset: None,
                };
            }
            rusqlite::Error::NulError(_) => {
                return QueryError::Invalid {
                    message: "the query contains a NUL character".into(),
                    offset: None,
                };
            }
            rusqlite::Error::MultipleStatement => {
                return QueryError::Invalid {
                    message: "only one statement per query".into(),
                    offset: None,
                };
            }
            rusqlite::Error::InvalidParameterName(name) => {
                return QueryError::Invalid {
                    message: format!("the query has no parameter named {name}"),
                    offset: None,
                };
            }
            rusqlite::Error::InvalidParameterCount(given, wanted) => {
                return QueryError::Invalid {
                    message: format!("the query takes {wanted} parameters, {given} were given"),
                    offset: None,
                };
            }
            e => {
                return QueryError::Failed {
                    message: e.to_string(),
                };
            }
        };
        match code & 0xff {
            ffi::SQLITE_INTERRUPT => self.interruption(limit),
            ffi::SQLITE_AUTH | ffi::SQLITE_READONLY => QueryError::Denied {
                message,
                reason: "the database is read-only".into(),
            },
            ffi::SQLITE_TOOBIG => QueryError::TooLarge {
                message: format!(
                    "{message}: a value would be larger than {} bytes, the largest value and answer (BAKEDB_MAX_RESPONSE_BYTES)",
                    self.max_value_bytes
                ),
            },
            ffi::SQLITE_NOMEM => QueryError::OutOfMemory {
                message: format!(
                    "{message}: the query needed more memory than SQLite may use \
                     (BAKEDB_SQLITE_HEAP_BYTES, shared by the queries running at the same time)"
                ),
            },
            ffi::SQLITE_ERROR | ffi::SQLITE_RANGE | ffi::SQLITE_MISMATCH => {
                QueryError::Invalid { message, offset }
            }
            _ => QueryError::Failed { message },
        }
    }

    /// Run one read-only statement within `limit`, streaming rows to the callbacks.
    pub fn query(
        &mut self,
        sql: &str,
        params: &Params,
        limit: Duration,
        on_prepared: OnPrepared<'_>,
        on_row: OnRow<'_>,
    ) -> Result<Outcome, QueryError> {
        *self.log() = authorizer::Log::default();
        self.control
            .deadline
            .store(nanos_since_epoch(Instant::now() + limit), Ordering::Relaxed);
        let result = self.query_inner(sql, params, limit, on_prepared, on_row);
        self.control.deadline.store(u64::MAX, Ordering::Relaxed);
        result
    }

    fn query_inner(
        &mut self,
        sql: &str,
        params: &Params,
        limit: Duration,
        on_prepared: OnPrepared<'_>,
        on_row: OnRow<'_>,
    ) -> Result<Outcome, QueryError> {
        // A job stopped while it waited (its client left, the drain ended) runs nothing.
        if self.control.interrupted() {
            return Err(self.interruption(limit));
        }
        let mut stmt = match self.conn.prepare(sql) {
            Ok(stmt) => stmt,
            Err(e) => return Err(self.classify(e, limit)),
        };
        if !stmt.readonly() {
            let log = self.log();
            let reads = log.shadow_write.is_none()
                && log
                    .first_pragma_read
                    .as_deref()
                    .is_some_and(|name| authorizer::READS_THOUGH_NOT_STMT_READONLY.contains(&name));
            if !reads {
                return Err(QueryError::Denied {
                    message: "not a read-only statement".into(),
                    // A write to a shadow table passed the authorizer (see authorizer.rs):
                    // name it rather than say something vaguer.
                    reason: log.shadow_write.clone().unwrap_or_else(|| {
                        "bakedb-serve only reads: the database is an immutable snapshot".into()
                    }),
                });
            }
        }
        let bind = |stmt: &mut rusqlite::Statement<'_>| -> Result<(), QueryError> {
            match params {
                Params::None => Ok(()),
                Params::Positional(values) => {
                    let wanted = stmt.parameter_count();
                    if values.len() != wanted {
                        return Err(QueryError::Invalid {
                            message: format!(
                                "the query takes {wanted} parameters, {} were given",
                                values.len()
                            ),
                            offset: None,
                        });
                    }
                    for (i, v) in values.iter().enumerate() {
                        let v = to_sql(v, &(i + 1).to_string())?;
                        stmt.raw_bind_parameter(i + 1, v)
                            .map_err(|e| QueryError::Invalid {
                                message: e.to_string(),
                                offset: None,
                            })?;
                    }
                    Ok(())
                }
                Params::Named(map) => {
                    for (k, v) in map {
                        let name = if k.starts_with([':', '@', '$']) {
                            k.clone()
                        } else {
                            format!(":{k}")
                        };
                        let index =
                            stmt.parameter_index(&name).ok().flatten().ok_or_else(|| {
                                QueryError::Invalid {
                                    message: format!("the query has no parameter named {name}"),
                                    offset: None,
                                }
                            })?;
                        let v = to_sql(v, &name)?;
                        stmt.raw_bind_parameter(index, v)
                            .map_err(|e| QueryError::Invalid {
                                message: e.to_string(),
                                offset: None,
                            })?;
                    }
                    Ok(())
                }
            }
        };
        bind(&mut stmt)?;
        let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        on_prepared(&columns)?;
        let mut rows = stmt.raw_query();
        let mut count = 0;
        let failure = loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => {
                    return Ok(Outcome {
                        columns,
                        rows: count,
                        truncated: false,
                    });
                }
                Err(e) => break e,
            };
            match on_row(row) {
                Ok(true) => {}
                Ok(false) => {
                    return Ok(Outcome {
                        columns,
                        rows: count,
                        truncated: true,
                    });
                }
                Err(e) => return Err(e),
            }
            count += 1;
            // The progress handler only runs inside SQLite; encoding a row and handing it
            // on happen outside, and count against the same deadline.
            if self.control.interrupted() {
                return Err(self.interruption(limit));
            }
        };
        drop(rows);
        drop(stmt);
        Err(self.classify(failure, limit))
    }

    /// Rows as serde_json Values, for the small answers built in memory (the schema).
    fn query_values(
        &mut self,
        sql: &str,
        params: &Params,
        limit: Duration,
        on_row: &mut dyn FnMut(Vec<Value>) -> bool,
    ) -> Result<Outcome, QueryError> {
        self.query(sql, params, limit, &mut |_| Ok(()), &mut |row| {
            let n = row.as_ref().column_count();
            let values = (0..n)
                .map(|i| row.get_ref(i).map_or(Value::Null, encode::to_json))
                .collect();
            Ok(on_row(values))
        })
    }

    /// Tables, views, virtual tables and their shadow tables, with their columns and
    /// indexes. A table that cannot be described (a virtual table whose module this SQLite
    /// does not have, say) gets an "error" instead of breaking the whole answer.
    pub fn schema(&mut self) -> Result<Value, QueryError> {
        let limit = Duration::from_secs(10);
        let mut objects = Vec::new();
        self.query_values(
            "SELECT name, type, sql FROM sqlite_schema \
             WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
            &Params::None,
            limit,
            &mut |row| {
                objects.push(row);
                true
            },
        )?;
        let mut tables = Vec::new();
        for object in objects {
            let (name, sql) = (&object[0], &object[2]);
            // SQLite's own kind: table, view, virtual (R*Tree, FTS5, ...) or shadow (a virtual
            // table's storage); sqlite_schema says "table" for the last two.
            let kind = match self.table_kind(name, limit) {
                Ok(Some(kind)) => kind,
                // table_list does not fail on a table it cannot connect (spellfix1 without the
                // extension); should it ever, describe_table below reports the error.
                Ok(None) | Err(_) => object[1].clone(),
            };
            let table = match self.describe_table(name, limit) {
                Ok((columns, indexes)) => json!({
                    "name": name, "type": kind, "sql": sql, "columns": columns, "indexes": indexes,
                }),
                Err(e) => json!({
                    "name": name, "type": kind, "sql": sql, "columns": [], "indexes": [],
                    "error": e.to_string(),
                }),
            };
            tables.push(table);
        }
        Ok(json!({ "tables": tables }))
    }

    /// `PRAGMA table_list`'s type of one table.
    fn table_kind(&mut self, name: &Value, limit: Duration) -> Result<Option<Value>, QueryError> {
        let mut kind = None;
        self.query_values(
            "SELECT type FROM pragma_table_list(?1) WHERE schema = 'main'",
            &Params::Positional(vec![name.clone()]),
            limit,
            &mut |row| {
                kind = Some(row[0].clone());
                false
            },
        )?;
        Ok(kind)
    }

    /// The columns and indexes of one table.
    fn describe_table(
        &mut self,
        name: &Value,
        limit: Duration,
    ) -> Result<(Vec<Value>, Vec<Value>), QueryError> {
        let by_name = Params::Positional(vec![name.clone()]);
        let mut columns = Vec::new();
        self.query_values(
            "SELECT name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo(?1)",
            &by_name,
            limit,
            &mut |row| {
                // table_xinfo's hidden: 1 a virtual table's hidden column (not in SELECT *),
                // 2 a generated VIRTUAL column, 3 a generated STORED one (both in SELECT *).
                let generated = match row[5].as_i64() {
                    Some(2) => json!("virtual"),
                    Some(3) => json!("stored"),
                    _ => Value::Null,
                };
                columns.push(json!({
                    "name": row[0], "type": row[1], "notnull": row[2] == json!(1),
                    "default": row[3], "primary_key": row[4], "hidden": row[5] == json!(1),
                    "generated": generated,
                }));
                true
            },
        )?;
        let mut index_names = Vec::new();
        self.query_values(
            "SELECT name, \"unique\", origin FROM pragma_index_list(?1) ORDER BY name",
            &by_name,
            limit,
            &mut |row| {
                index_names.push(row);
                true
            },
        )?;
        let mut indexes = Vec::new();
        for row in index_names {
            let mut cols = Vec::new();
            self.query_values(
                "SELECT name FROM pragma_index_info(?1) ORDER BY seqno",
                &Params::Positional(vec![row[0].clone()]),
                limit,
                &mut |c| {
                    cols.push(c[0].clone());
                    true
                },
            )?;
            indexes.push(json!({
                "name": row[0], "unique": row[1] == json!(1), "origin": row[2], "columns": cols,
            }));
        }
        Ok((columns, indexes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_keeps_odd_paths_inside_the_path() {
        assert_eq!(
            file_uri(Path::new("/d/a?b#c%d.db")),
            "file:/d/a%3fb%23c%25d.db?immutable=1&mode=ro"
        );
    }

    /// A database as real applications make them: a plain table with an index, R*Tree,
    /// FTS5 and FTS4 tables (with their shadow tables), generated columns, and a virtual table
    /// of a module this SQLite does not have (spellfix1, an extension the writer had loaded).
    fn make_db(path: &Path) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL);
             CREATE INDEX items_name ON items(name);
             INSERT INTO items(name) VALUES ('a'), ('b');
             CREATE VIRTUAL TABLE rt USING rtree(id, x0, x1, y0, y1);
             INSERT INTO rt VALUES (1, 0, 1, 0, 1), (2, 5, 6, 5, 6);
             CREATE VIRTUAL TABLE ft USING fts5(title, body);
             INSERT INTO ft VALUES ('hello', 'world'), ('other', 'words');
             CREATE VIRTUAL TABLE f4 USING fts4(a);
             INSERT INTO f4 VALUES ('x y');
             CREATE TABLE g(a INTEGER, b INTEGER GENERATED ALWAYS AS (a * 2) VIRTUAL,
                            c INTEGER GENERATED ALWAYS AS (a * 3) STORED);
             INSERT INTO g(a) VALUES (7);
             PRAGMA writable_schema = ON;
             INSERT INTO sqlite_schema(type, name, tbl_name, rootpage, sql)
                 VALUES ('table', 'spell', 'spell', 0, 'CREATE VIRTUAL TABLE spell USING spellfix1');
             PRAGMA writable_schema = OFF;",
        )
        .unwrap();
    }

    fn open(path: &Path) -> Db {
        Db::open(&Config {
            database: path.to_owned(),
            patches: Vec::new(),
            listen: "127.0.0.1:0".parse().unwrap(),
            query_timeout: Duration::from_secs(5),
            max_rows: 1000,
            max_request_bytes: 1 << 16,
            max_response_bytes: 1 << 20,
            sqlite_heap_bytes: 64 << 20,
            pool_size: 1,
            queue: 1,
            max_connections: 8,
            client_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(1),
            mmap_bytes: None,
            cache_kib: 1024,
            default_open: false,
        })
        .unwrap()
    }

    fn run(db: &mut Db, sql: &str) -> Result<Vec<Vec<Value>>, QueryError> {
        let mut rows = Vec::new();
        db.query_values(sql, &Params::None, Duration::from_secs(5), &mut |row| {
            rows.push(row);
            true
        })?;
        Ok(rows)
    }

    fn reason(result: Result<Vec<Vec<Value>>, QueryError>, sql: &str) -> String {
        match result {
            Err(QueryError::Denied { reason, .. }) => reason,
            other => panic!("{sql}: expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn every_pragma_of_sqlites_list_reads_or_is_refused_as_classified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        make_db(&path);
        let listed: Vec<String> = Connection::open_in_memory()
            .unwrap()
            .prepare("SELECT name FROM pragma_pragma_list ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let classified: Vec<&str> = authorizer::PRAGMAS.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            listed, classified,
            "authorizer::PRAGMAS must classify exactly the bundled SQLite's pragma_list"
        );
        let mut db = open(&path);
        for name in &listed {
            let bare = format!("PRAGMA {name}");
            let valued = format!("PRAGMA {name}(1)");
            match authorizer::pragma_kind(name).unwrap() {
                authorizer::PragmaKind::Reads => {
                    run(&mut db, &bare).unwrap_or_else(|e| panic!("{bare}: {e}"));
                    if let Err(e @ QueryError::Denied { .. }) = run(&mut db, &valued) {
                        panic!("{valued}: {e}");
                    }
                }
                authorizer::PragmaKind::Setting => {
                    run(&mut db, &bare).unwrap_or_else(|e| panic!("{bare}: {e}"));
                    let why = reason(run(&mut db, &valued), &valued);
                    assert!(
                        why.contains(&format!(
                            "PRAGMA {name} = 1 is not allowed: it changes a setting"
                        )),
                        "{valued}: {why}"
                    );
                }
                authorizer::PragmaKind::Acts => {
                    for sql in [&bare, &valued] {
                        let why = reason(run(&mut db, sql), sql);
                        assert!(why.contains("is not allowed"), "{sql}: {why}");
                    }
                }
            }
        }
        // Nothing was changed on the way: the connection is as Db::open tuned it.
        assert_eq!(run(&mut db, "PRAGMA query_only").unwrap(), [[json!(1)]]);
        assert_eq!(run(&mut db, "PRAGMA cache_size").unwrap(), [[json!(-1024)]]);
        assert_eq!(
            run(&mut db, "PRAGMA integrity_check(5)").unwrap(),
            [[json!("ok")]]
        );
        assert_eq!(
            run(&mut db, "PRAGMA quick_check(items)").unwrap(),
            [[json!("ok")]]
        );
        assert_eq!(
            run(&mut db, "PRAGMA journal_mode").unwrap(),
            [[json!("delete")]]
        );
        for (sql, want) in [
            (
                "PRAGMA query_only = 0",
                "PRAGMA query_only = 0 is not allowed",
            ),
            (
                "PRAGMA cache_size = 5",
                "PRAGMA cache_size = 5 is not allowed",
            ),
            (
                "PRAGMA main.mmap_size = 0",
                "PRAGMA mmap_size = 0 is not allowed",
            ),
            (
                "PRAGMA journal_mode = WAL",
                "PRAGMA journal_mode = WAL is not allowed",
            ),
            (
                "PRAGMA wal_checkpoint(TRUNCATE)",
                "PRAGMA wal_checkpoint = TRUNCATE is not allowed",
            ),
            (
                "PRAGMA no_such_pragma",
                "SQLite's pragma list does not have it",
            ),
            ("SELECT * FROM pragma_user_version", ""),
        ] {
            match run(&mut db, sql) {
                Ok(_) if want.is_empty() => {}
                result => assert!(reason(result, sql).contains(want), "{sql}"),
            }
        }
    }

    #[test]
    fn virtual_tables_with_shadow_tables_are_read_and_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        make_db(&path);
        let before = std::fs::read(&path).unwrap();
        // A fresh connection per case: a virtual table is connected (and its module prepares
        // its statements on the shadow tables) by the first statement that touches it.
        for (sql, want) in [
            ("SELECT id FROM rt WHERE x0 >= 5", json!([[2]])),
            (
                "SELECT title FROM ft WHERE ft MATCH 'world'",
                json!([["hello"]]),
            ),
            ("SELECT a FROM f4 WHERE f4 MATCH 'y'", json!([["x y"]])),
            ("SELECT count(*) FROM rt_node", json!([[1]])),
            ("SELECT * FROM g", json!([[7, 14, 21]])),
            ("PRAGMA integrity_check", json!([["ok"]])),
        ] {
            let rows = run(&mut open(&path), sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(json!(rows), want, "{sql}");
        }
        let mut db = open(&path);
        for (sql, want) in [
            (
                "INSERT INTO rt_node VALUES (9, x'00')",
                "INSERT into rt_node is not allowed: the database is a read-only snapshot",
            ),
            (
                "DELETE FROM rt_parent",
                "DELETE from rt_parent is not allowed",
            ),
            (
                "UPDATE ft_data SET block = NULL",
                "UPDATE of ft_data is not allowed",
            ),
            (
                "INSERT INTO f4_content SELECT * FROM f4_content",
                "INSERT into f4_content is not allowed",
            ),
            (
                "INSERT INTO rt VALUES (3, 0, 1, 0, 1)",
                "INSERT into rt is not allowed",
            ),
            (
                "INSERT INTO ft(ft) VALUES ('optimize')",
                "INSERT into ft is not allowed",
            ),
            ("DELETE FROM ft", "DELETE from ft is not allowed"),
            ("DROP TABLE rt", "changing the schema"),
            ("DROP TABLE rt_node", "changing the schema"),
        ] {
            // First on a connection that has not connected the virtual tables yet, then on
            // one that has.
            let why = reason(run(&mut open(&path), sql), sql);
            assert!(why.contains(want), "{sql} (fresh connection): {why}");
            let why = reason(run(&mut db, sql), sql);
            assert!(why.contains(want), "{sql}: {why}");
            run(&mut db, "SELECT id FROM rt WHERE x0 >= 5").unwrap();
        }
        assert_eq!(
            run(&mut db, "SELECT count(*) FROM rt").unwrap(),
            [[json!(2)]]
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn schema_describes_virtual_shadow_and_generated_and_survives_an_odd_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        make_db(&path);
        let schema = open(&path).schema().unwrap();
        let tables = schema["tables"].as_array().unwrap();
        let table = |name: &str| {
            tables
                .iter()
                .find(|t| t["name"] == name)
                .unwrap_or_else(|| panic!("no {name} in {schema}"))
        };
        for (name, kind) in [
            ("items", "table"),
            ("g", "table"),
            ("rt", "virtual"),
            ("rt_node", "shadow"),
            ("ft", "virtual"),
            ("ft_data", "shadow"),
            ("f4", "virtual"),
            ("f4_content", "shadow"),
            ("spell", "virtual"),
        ] {
            assert_eq!(table(name)["type"], kind, "{name}: {}", table(name));
            if name != "spell" {
                assert!(table(name).get("error").is_none(), "{}", table(name));
            }
        }
        assert_eq!(table("items")["indexes"][0]["columns"], json!(["name"]));
        let rt_columns: Vec<&Value> = table("rt")["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["name"])
            .collect();
        assert_eq!(rt_columns, ["id", "x0", "x1", "y0", "y1"]);
        // The one table this SQLite cannot describe says why; the others are all there.
        assert!(
            table("spell")["error"]
                .as_str()
                .unwrap()
                .contains("no such module: spellfix1"),
            "{}",
            table("spell")
        );
        let columns = |name: &str| table(name)["columns"].as_array().unwrap().clone();
        let g: Vec<(Value, Value, Value)> = columns("g")
            .iter()
            .map(|c| {
                (
                    c["name"].clone(),
                    c["hidden"].clone(),
                    c["generated"].clone(),
                )
            })
            .collect();
        assert_eq!(
            g,
            [
                (json!("a"), json!(false), Value::Null),
                (json!("b"), json!(false), json!("virtual")),
                (json!("c"), json!(false), json!("stored")),
            ]
        );
        // FTS5's own columns (the table's name and rank) are hidden: not in SELECT *.
        let ft: Vec<(Value, Value)> = columns("ft")
            .iter()
            .map(|c| (c["name"].clone(), c["hidden"].clone()))
            .collect();
        assert_eq!(
            ft,
            [
                (json!("title"), json!(false)),
                (json!("body"), json!(false)),
                (json!("ft"), json!(true)),
                (json!("rank"), json!(true)),
            ]
        );
    }
}
