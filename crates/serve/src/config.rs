//! Settings, all from the environment (so `docker run -e` changes them) with an optional
//! `--database PATH` / `--listen ADDR` on the command line for running outside an image.
//!
//! Every limit that protects the process (descriptors, memory, time) is checked here, before
//! anything is opened, so a setting the machine cannot honour is refused with its name and
//! the limit it runs into instead of failing later with SQLite's `unable to open database
//! file`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub database: PathBuf,
    /// Patch files of the database, oldest first (BAKEDB_SQLITE_PATCHES): when there are
    /// any, `database` is the base file and the connections read base and patches composed
    /// through the read-only VFS (vfs.rs).
    pub patches: Vec<PathBuf>,
    pub listen: SocketAddr,
    /// Longest a query may run before it is interrupted (504).
    pub query_timeout: Duration,
    /// Rows in one JSON answer; more and `truncated` is true.
    pub max_rows: usize,
    /// Largest request body accepted (413 beyond).
    pub max_request_bytes: usize,
    /// Largest JSON answer, NDJSON line and single value (SQLite's SQLITE_LIMIT_LENGTH).
    pub max_response_bytes: usize,
    /// SQLite's hard heap limit for all connections together (sqlite3_hard_heap_limit64).
    pub sqlite_heap_bytes: u64,
    /// Read connections, each serving one query at a time.
    pub pool_size: usize,
    /// Requests that may wait for a connection; more get 503.
    pub queue: usize,
    /// Client connections open at once.
    pub max_connections: usize,
    /// How long a client may take to send a request head or body, stay idle between
    /// requests, or leave a write of its answer without progress.
    pub client_timeout: Duration,
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
  BAKEDB_SQLITE_PATCHES      patch files of the database, ':'-separated, oldest first:
                             BAKEDB_DATABASE is then their base [set by the image's
                             profile when the database is patched]
  BAKEDB_LISTEN              address to listen on [0.0.0.0:8080]
  BAKEDB_QUERY_TIMEOUT_MS    per-query time limit [5000]
  BAKEDB_MAX_ROWS            rows per JSON answer before `truncated` [10000]
  BAKEDB_MAX_REQUEST_BYTES   largest request body [65536]
  BAKEDB_MAX_RESPONSE_BYTES  largest JSON answer, NDJSON line and single value [16777216]
  BAKEDB_SQLITE_HEAP_BYTES   memory SQLite may allocate, all connections together
                             [pool size x (cache + 2 x largest answer) + 32 MiB]
  BAKEDB_POOL_SIZE           read connections [one per core]
  BAKEDB_QUEUE               requests that may wait for a connection [64 per connection]
  BAKEDB_MAX_CONNECTIONS     client connections open at once [1024, fewer if the
                             descriptor limit (ulimit -n) does not allow that many]
  BAKEDB_CLIENT_TIMEOUT_MS   time to send a request, stay idle between requests, or stall
                             while reading an answer [10000]
  BAKEDB_DRAIN_MS            how long SIGTERM waits for queries in flight [10000]
  BAKEDB_SQLITE_MMAP_BYTES   PRAGMA mmap_size [the database's size: all of it mapped]
  BAKEDB_SQLITE_CACHE_KIB    PRAGMA cache_size, in KiB [65536]
  BAKEDB_SQLITE_OPEN         immutable (read-only, no locks, no copy-up) or default
                             (read-write open with SQLite's defaults, for comparison) [immutable]";

/// Descriptors one read connection may hold: the database file and the temporary files
/// SQLite opens when a sort or a temporary b-tree outgrows its cache.
pub const FDS_PER_READ_CONNECTION: u64 = 4;
/// Descriptors the process needs besides its read and client connections: standard streams,
/// the listener, the runtime's epoll and wakers, the signal pipe, /proc reads.
pub const FDS_RESERVED: u64 = 32;
/// Fewest client connections worth starting with.
const MIN_CONNECTIONS: u64 = 8;
const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
/// SQLite's own ceiling for SQLITE_LIMIT_LENGTH (SQLITE_MAX_LENGTH in the bundled build).
const SQLITE_MAX_LENGTH: usize = 1_000_000_000;

/// Reads one setting; a seam so tests do not touch the process environment.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn number<T: std::str::FromStr>(env: Lookup<'_>, name: &str, default: T) -> Result<T, String> {
    match env(name) {
        Some(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a valid number")),
        _ => Ok(default),
    }
}

impl Config {
    /// The settings from `args` and `env`, checked against `fd_limit`, the number of
    /// descriptors the process may open (RLIMIT_NOFILE).
    pub fn load(args: &[String], env: Lookup<'_>, fd_limit: u64) -> Result<Config, String> {
        let mut database = env("BAKEDB_DATABASE").map(PathBuf::from);
        // Where the address came from, so an error names what the user actually wrote.
        let mut listen = (
            "BAKEDB_LISTEN",
            env("BAKEDB_LISTEN").unwrap_or_else(|| "0.0.0.0:8080".into()),
        );
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--database" => {
                    database = Some(it.next().ok_or("--database needs a path")?.into());
                }
                "--listen" => {
                    listen = (
                        "--listen",
                        it.next().ok_or("--listen needs ADDR:PORT")?.clone(),
                    )
                }
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
        let (listen_source, listen) = listen;
        let separator = if listen_source.starts_with("--") {
            " "
        } else {
            "="
        };
        let listen: SocketAddr = listen.parse().map_err(|_| {
            format!(
                "{listen_source}{separator}{listen:?} is not ADDR:PORT (e.g. 0.0.0.0:8080 or [::]:8080)"
            )
        })?;

        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool_size = number(env, "BAKEDB_POOL_SIZE", cores)?.max(1);
        // Each read connection holds descriptors for as long as the server runs; what is left
        // is for clients. Refused rather than clamped: a pool smaller than asked for would
        // serve, slower, with nothing saying why.
        let pool_fds = (pool_size as u64).saturating_mul(FDS_PER_READ_CONNECTION);
        let needed = pool_fds
            .saturating_add(FDS_RESERVED)
            .saturating_add(MIN_CONNECTIONS);
        if needed > fd_limit {
            return Err(format!(
                "BAKEDB_POOL_SIZE={pool_size}: {pool_size} read connections need about {needed} file descriptors \
                 ({FDS_PER_READ_CONNECTION} each, plus {} for the server and its first clients), \
                 and this process may open {fd_limit} (RLIMIT_NOFILE): lower BAKEDB_POOL_SIZE \
                 or raise the limit (docker run --ulimit nofile=N)",
                FDS_RESERVED + MIN_CONNECTIONS
            ));
        }
        let for_clients = fd_limit - pool_fds - FDS_RESERVED;
        let max_connections = match env("BAKEDB_MAX_CONNECTIONS").filter(|v| !v.is_empty()) {
            None => DEFAULT_MAX_CONNECTIONS.min(for_clients),
            Some(_) => {
                let asked: u64 = number(env, "BAKEDB_MAX_CONNECTIONS", 0)?;
                if asked == 0 {
                    return Err(
                        "BAKEDB_MAX_CONNECTIONS=0: at least one connection is needed".into(),
                    );
                }
                if asked > for_clients {
                    return Err(format!(
                        "BAKEDB_MAX_CONNECTIONS={asked}: this process may open {fd_limit} file descriptors \
                         (RLIMIT_NOFILE), and {pool_size} read connections and the server need {}, \
                         which leaves {for_clients} for clients: lower BAKEDB_MAX_CONNECTIONS \
                         or raise the limit (docker run --ulimit nofile=N)",
                        pool_fds + FDS_RESERVED
                    ));
                }
                asked
            }
        } as usize;

        let max_request_bytes = number(env, "BAKEDB_MAX_REQUEST_BYTES", 64 << 10)?;
        let max_response_bytes: usize = number(env, "BAKEDB_MAX_RESPONSE_BYTES", 16 << 20)?;
        if !(1024..=SQLITE_MAX_LENGTH).contains(&max_response_bytes) {
            return Err(format!(
                "BAKEDB_MAX_RESPONSE_BYTES={max_response_bytes}: expected 1024 to {SQLITE_MAX_LENGTH} \
                 (it is also SQLite's largest value, which SQLite caps at {SQLITE_MAX_LENGTH})"
            ));
        }
        let cache_kib: u64 = number(env, "BAKEDB_SQLITE_CACHE_KIB", 64 << 10)?;
        // Each connection may fill its page cache and hold a value of the largest size twice
        // (an operand and its result); the rest is schemas and statements.
        let default_heap = (pool_size as u64).saturating_mul(
            cache_kib
                .saturating_mul(1024)
                .saturating_add(2 * max_response_bytes as u64),
        ) + (32 << 20);
        let sqlite_heap_bytes = number(env, "BAKEDB_SQLITE_HEAP_BYTES", default_heap)?;
        if sqlite_heap_bytes < 8 << 20 {
            return Err(format!(
                "BAKEDB_SQLITE_HEAP_BYTES={sqlite_heap_bytes}: at least 8 MiB (8388608) is needed to \
                 open the connections and read the schema"
            ));
        }
        let client_timeout =
            Duration::from_millis(number(env, "BAKEDB_CLIENT_TIMEOUT_MS", 10_000)?);
        if client_timeout.is_zero() {
            return Err(
                "BAKEDB_CLIENT_TIMEOUT_MS=0: a client needs some time to send its request".into(),
            );
        }
        // ':' separates paths as in PATH; an empty entry is a mistake, not "no patch".
        let patches: Vec<PathBuf> = match env("BAKEDB_SQLITE_PATCHES") {
            Some(v) if !v.is_empty() => {
                if v.split(':').any(str::is_empty) {
                    return Err(format!(
                        "BAKEDB_SQLITE_PATCHES={v:?} has an empty entry: expected patch file paths separated by ':'"
                    ));
                }
                v.split(':').map(PathBuf::from).collect()
            }
            _ => Vec::new(),
        };
        let default_open = match env("BAKEDB_SQLITE_OPEN").as_deref() {
            None | Some("" | "immutable") => false,
            Some("default") => true,
            Some(other) => {
                return Err(format!(
                    "BAKEDB_SQLITE_OPEN={other:?}: expected immutable or default"
                ));
            }
        };
        if default_open && !patches.is_empty() {
            return Err(
                "BAKEDB_SQLITE_OPEN=default cannot read a patched database (BAKEDB_SQLITE_PATCHES is set): \
                 SQLite's default open would read the base file alone"
                    .into(),
            );
        }
        Ok(Config {
            database,
            patches,
            listen,
            query_timeout: Duration::from_millis(number(env, "BAKEDB_QUERY_TIMEOUT_MS", 5000)?),
            max_rows: number(env, "BAKEDB_MAX_ROWS", 10_000)?,
            max_request_bytes,
            max_response_bytes,
            sqlite_heap_bytes,
            pool_size,
            queue: number(env, "BAKEDB_QUEUE", 64 * pool_size)?,
            max_connections,
            client_timeout,
            drain: Duration::from_millis(number(env, "BAKEDB_DRAIN_MS", 10_000)?),
            mmap_bytes: match env("BAKEDB_SQLITE_MMAP_BYTES") {
                Some(v) if !v.is_empty() => Some(number(env, "BAKEDB_SQLITE_MMAP_BYTES", 0)?),
                _ => None,
            },
            cache_kib,
            default_open,
        })
    }
}

/// Raises the soft descriptor limit to the hard one, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: docker's default soft limit is often 1024 while the hard limit
/// is far higher, and nothing here uses select(2), the reason soft limits stay low. Returns
/// the limit now in force.
pub fn raise_fd_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write or read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)], args: &[&str], fd_limit: u64) -> Result<Config, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("BAKEDB_DATABASE".to_string(), "/x.db".to_string())])
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Config::load(&args, &|name| env.get(name).cloned(), fd_limit)
    }

    #[test]
    fn a_bad_address_is_reported_under_the_name_it_was_given() {
        let e = load(&[], &["--listen", "localhost"], 1024).unwrap_err();
        assert!(
            e.starts_with("--listen \"localhost\" is not ADDR:PORT"),
            "{e}"
        );
        let e = load(&[("BAKEDB_LISTEN", "8080")], &[], 1024).unwrap_err();
        assert!(
            e.starts_with("BAKEDB_LISTEN=\"8080\" is not ADDR:PORT"),
            "{e}"
        );
        // The flag wins over the environment, and a good flag hides a bad variable.
        let c = load(
            &[("BAKEDB_LISTEN", "8080")],
            &["--listen", "127.0.0.1:1"],
            1024,
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn a_pool_the_descriptor_limit_cannot_hold_is_refused_with_both_numbers() {
        let e = load(&[("BAKEDB_POOL_SIZE", "100000")], &[], 1024).unwrap_err();
        assert!(e.starts_with("BAKEDB_POOL_SIZE=100000: "), "{e}");
        assert!(e.contains("may open 1024 (RLIMIT_NOFILE)"), "{e}");
        let e = load(
            &[("BAKEDB_POOL_SIZE", "18446744073709551615")],
            &[],
            1 << 20,
        )
        .unwrap_err();
        assert!(e.contains("RLIMIT_NOFILE"), "{e}");
        load(&[("BAKEDB_POOL_SIZE", "200")], &[], 1024).unwrap();
    }

    #[test]
    fn client_connections_get_what_the_descriptor_limit_leaves() {
        let c = load(&[("BAKEDB_POOL_SIZE", "4")], &[], 1 << 20).unwrap();
        assert_eq!(c.max_connections, 1024);
        let c = load(&[("BAKEDB_POOL_SIZE", "4")], &[], 256).unwrap();
        assert_eq!(c.max_connections, 256 - 4 * 4 - 32);
        let e = load(
            &[
                ("BAKEDB_POOL_SIZE", "4"),
                ("BAKEDB_MAX_CONNECTIONS", "5000"),
            ],
            &[],
            1024,
        )
        .unwrap_err();
        assert!(e.starts_with("BAKEDB_MAX_CONNECTIONS=5000: "), "{e}");
        assert!(e.contains("1024 file descriptors (RLIMIT_NOFILE)"), "{e}");
        assert!(e.contains("leaves 976 for clients"), "{e}");
        let c = load(&[("BAKEDB_MAX_CONNECTIONS", "10")], &[], 1024).unwrap();
        assert_eq!(c.max_connections, 10);
    }

    #[test]
    fn patches_are_a_colon_separated_list_oldest_first() {
        let c = load(&[], &[], 1024).unwrap();
        assert!(c.patches.is_empty());
        let c = load(&[("BAKEDB_SQLITE_PATCHES", "")], &[], 1024).unwrap();
        assert!(c.patches.is_empty());
        let c = load(
            &[(
                "BAKEDB_SQLITE_PATCHES",
                "/var/lib/bakedb/.patches/1/app.db:/var/lib/bakedb/.patches/3/app.db",
            )],
            &[],
            1024,
        )
        .unwrap();
        assert_eq!(
            c.patches,
            [
                PathBuf::from("/var/lib/bakedb/.patches/1/app.db"),
                PathBuf::from("/var/lib/bakedb/.patches/3/app.db")
            ]
        );
        for bad in ["/a:", ":/a", "/a::/b"] {
            let e = load(&[("BAKEDB_SQLITE_PATCHES", bad)], &[], 1024).unwrap_err();
            assert!(e.contains("has an empty entry"), "{bad}: {e}");
        }
        let e = load(
            &[
                ("BAKEDB_SQLITE_PATCHES", "/p/1"),
                ("BAKEDB_SQLITE_OPEN", "default"),
            ],
            &[],
            1024,
        )
        .unwrap_err();
        assert!(
            e.starts_with("BAKEDB_SQLITE_OPEN=default cannot read a patched database"),
            "{e}"
        );
    }

    #[test]
    fn memory_limits_have_derived_defaults_and_sane_bounds() {
        let c = load(
            &[
                ("BAKEDB_POOL_SIZE", "2"),
                ("BAKEDB_SQLITE_CACHE_KIB", "1024"),
                ("BAKEDB_MAX_RESPONSE_BYTES", "1048576"),
            ],
            &[],
            1024,
        )
        .unwrap();
        assert_eq!(
            c.sqlite_heap_bytes,
            2 * (1 << 20) + 2 * 2 * (1 << 20) + (32 << 20)
        );
        for (name, value) in [
            ("BAKEDB_MAX_RESPONSE_BYTES", "10"),
            ("BAKEDB_MAX_RESPONSE_BYTES", "2000000000"),
            ("BAKEDB_SQLITE_HEAP_BYTES", "1000"),
            ("BAKEDB_CLIENT_TIMEOUT_MS", "0"),
        ] {
            let e = load(&[(name, value)], &[], 1024).unwrap_err();
            assert!(e.starts_with(&format!("{name}={value}")), "{e}");
        }
    }
}
