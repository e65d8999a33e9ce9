//! Settings, all from the environment (so `docker run -e` changes them) with an optional
//! `--database PATH` / `--listen ADDR` on the command line for running outside an image.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub database: PathBuf,
    pub listen: SocketAddr,
    /// Longest a query may run before it is interrupted (504).
    pub query_timeout: Duration,
    /// Rows in one JSON answer; more and `truncated` is true.
    pub max_rows: usize,
    /// Largest request body accepted (413 beyond).
    pub max_request_bytes: usize,
    /// Read connections, each serving one query at a time.
    pub pool_size: usize,
    /// Requests that may wait for a connection; more get 503.
    pub queue: usize,
    /// How long SIGTERM waits for queries in flight before exiting anyway.
    pub drain: Duration,
    /// PRAGMA mmap_size for every connection (0 disables memory mapping); None: the whole
    /// file, which measured fastest (docs/benchmarks.md, sqlite).
    pub mmap_bytes: Option<u64>,
    /// PRAGMA cache_size for every connection, in KiB.
    pub cache_kib: u64,
    /// Open the file as most applications do (read-write, locking, default pragmas) instead
    /// of immutable and read-only: only to measure what the tuning is worth.
    pub default_open: bool,
}

pub const USAGE: &str = "usage: bakedb-serve [--database PATH] [--listen ADDR:PORT]

Serves one SQLite database read-only over HTTP/JSON. Started by bakedb-init in a bakedb image.

Environment (defaults in brackets):
  BAKEDB_DATABASE            the database file [set by the image's profile]
  BAKEDB_LISTEN              address to listen on [0.0.0.0:8080]
  BAKEDB_QUERY_TIMEOUT_MS    per-query time limit [5000]
  BAKEDB_MAX_ROWS            rows per JSON answer before `truncated` [10000]
  BAKEDB_MAX_REQUEST_BYTES   largest request body [65536]
  BAKEDB_POOL_SIZE           read connections [one per core]
  BAKEDB_QUEUE               requests that may wait for a connection [64 per connection]
  BAKEDB_DRAIN_MS            how long SIGTERM waits for queries in flight [10000]
  BAKEDB_SQLITE_MMAP_BYTES   PRAGMA mmap_size [the database's size: all of it mapped]
  BAKEDB_SQLITE_CACHE_KIB    PRAGMA cache_size, in KiB [65536]
  BAKEDB_SQLITE_OPEN         immutable (read-only, no locks, no copy-up) or default
                             (read-write open with SQLite's defaults, for comparison) [immutable]";

fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a valid number")),
        _ => Ok(default),
    }
}

impl Config {
    pub fn load(args: &[String]) -> Result<Config, String> {
        let mut database = std::env::var_os("BAKEDB_DATABASE").map(PathBuf::from);
        let mut listen = std::env::var("BAKEDB_LISTEN").unwrap_or_else(|_| "0.0.0.0:8080".into());
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--database" => {
                    database = Some(it.next().ok_or("--database needs a path")?.into());
                }
                "--listen" => listen = it.next().ok_or("--listen needs ADDR:PORT")?.clone(),
                "--help" | "-h" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                "--version" | "-V" => {
                    println!("bakedb-serve {}", env!("CARGO_PKG_VERSION"));
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        let database = database.ok_or(
            "no database: set BAKEDB_DATABASE (a bakedb image's profile does) or pass --database PATH",
        )?;
        let listen: SocketAddr = listen.parse().map_err(|_| {
            format!("BAKEDB_LISTEN={listen:?} is not ADDR:PORT (e.g. 0.0.0.0:8080 or [::]:8080)")
        })?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool_size = number("BAKEDB_POOL_SIZE", cores)?.max(1);
        Ok(Config {
            database,
            listen,
            query_timeout: Duration::from_millis(number("BAKEDB_QUERY_TIMEOUT_MS", 5000)?),
            max_rows: number("BAKEDB_MAX_ROWS", 10_000)?,
            max_request_bytes: number("BAKEDB_MAX_REQUEST_BYTES", 64 << 10)?,
            pool_size,
            queue: number("BAKEDB_QUEUE", 64 * pool_size)?,
            drain: Duration::from_millis(number("BAKEDB_DRAIN_MS", 10_000)?),
            mmap_bytes: match std::env::var("BAKEDB_SQLITE_MMAP_BYTES") {
                Ok(v) if !v.is_empty() => Some(number("BAKEDB_SQLITE_MMAP_BYTES", 0)?),
                _ => None,
            },
            cache_kib: number("BAKEDB_SQLITE_CACHE_KIB", 64 << 10)?,
            default_open: match std::env::var("BAKEDB_SQLITE_OPEN").as_deref() {
                Err(_) | Ok("" | "immutable") => false,
                Ok("default") => true,
                Ok(other) => {
                    return Err(format!(
                        "BAKEDB_SQLITE_OPEN={other:?}: expected immutable or default"
                    ));
                }
            },
        })
    }
}
