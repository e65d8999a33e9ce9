//! A live PostgreSQL server for the end-to-end tests that snapshot one: initdb into a test
//! directory, the postmaster as a child process this test owns (stopped by Drop, also on a
//! panic), a deterministic seed database, and a write load that keeps committing while a
//! snapshot is taken.
//!
//! The server tools come from BAKEDB_TEST_PG_BIN, else the newest /usr/lib/postgresql/N/bin
//! (Debian's postgresql-N). Missing tools skip a test locally and fail it under CI=true, like
//! any other missing tool. PostgreSQL refuses to run as root, and CI runs as root: then
//! initdb, postgres and pg_ctl run as the `postgres` user (uid and gid from /etc/passwd), the
//! data and socket directories are chowned to it, and the test directory gets o+x so that
//! user can reach them. Clients (psql, pg_isready, the write load) run as the test process and
//! connect over TCP to 127.0.0.1, where pg_hba.conf trusts everyone, replication included.
//!
//! One server per test, a local of the test function declared after the test directory (so it
//! is dropped, and stopped, before the directory is removed): a server kept in a static would
//! never be dropped and would outlive the test process.

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::{run, run_ok, stdout, test_dir, under_ci};

/// The tools a server directory must have; the client tools come from the same directory
/// (Debian's postgresql-N depends on postgresql-client-N, which installs them there).
const TOOLS: [&str; 5] = ["initdb", "postgres", "pg_ctl", "psql", "pg_isready"];

/// How long the server may take to accept connections after it was started.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before Drop kills the postmaster.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How long a write load may take to commit its first row.
const LOAD_DEADLINE: Duration = Duration::from_secs(30);
/// Between two readiness polls.
const POLL: Duration = Duration::from_millis(25);

/// The login role `seed` creates: SELECT on everything in the seeded database. pg_hba.conf
/// trusts 127.0.0.1, so this server does not check the password; it is there for the tests
/// that hand it on (to a replica, or to bakedb as a connection string).
pub const READER: &str = "reader";
pub const READER_PASSWORD: &str = "reader-secret";
/// Rows of `items` in a seeded database.
pub const SEED_ITEMS: i64 = 10_000;
/// The content of `items` as one value: compare a snapshot with its source, or with
/// SEED_ITEMS_MD5.
pub const ITEMS_MD5_SQL: &str = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM items t";
/// ITEMS_MD5_SQL on a freshly seeded database, the same on every machine and every run.
pub const SEED_ITEMS_MD5: &str = "abac077af2f27013cbb33e7c6ae49808";

/// The directory of the PostgreSQL server tools: BAKEDB_TEST_PG_BIN, else the highest
/// /usr/lib/postgresql/N/bin that has them all. None skips the test locally; under CI a
/// missing server fails it. A BAKEDB_TEST_PG_BIN without the tools always fails: it is a
/// mistake, not an absent tool.
pub fn pg_bin() -> Option<PathBuf> {
    let missing = |dir: &Path| -> Vec<&str> {
        TOOLS
            .into_iter()
            .filter(|t| !dir.join(t).is_file())
            .collect()
    };
    if let Some(dir) = std::env::var_os("BAKEDB_TEST_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let lacks = missing(&dir);
        assert!(
            lacks.is_empty(),
            "BAKEDB_TEST_PG_BIN={} has no {}",
            dir.display(),
            lacks.join(", ")
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
            missing(&bin).is_empty().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin);
    if found.is_none() {
        assert!(
            !under_ci(),
            "no PostgreSQL server tools ({}) in BAKEDB_TEST_PG_BIN or /usr/lib/postgresql/N/bin, \
             and CI=true: .ci/run must install postgresql-15",
            TOOLS.join(", ")
        );
        eprintln!(
            "skipping: PostgreSQL is not installed (set BAKEDB_TEST_PG_BIN or install postgresql-15)"
        );
    }
    found
}

/// A TCP port that was free a moment ago on 127.0.0.1: bound to port 0, read, released. Another
/// process may take it before the caller binds it; PgServer::start retries on that.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Who runs the server tools: this process, or (when it is root) the `postgres` user.
#[derive(Clone, Copy, Debug)]
enum RunAs {
    Me,
    User { uid: u32, gid: u32 },
}

impl RunAs {
    /// None skips locally (root, but no postgres user); under CI that fails.
    fn detect() -> Option<RunAs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some(RunAs::Me);
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        let user = passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 && f[0] == "postgres" {
                Some(RunAs::User {
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                })
            } else {
                None
            }
        });
        if user.is_none() {
            assert!(
                !under_ci(),
                "running as root, PostgreSQL refuses to, and /etc/passwd has no postgres user \
                 to run it as; CI=true: .ci/run must install postgresql-15, which creates it"
            );
            eprintln!(
                "skipping: running as root and there is no postgres user to run PostgreSQL as"
            );
        }
        user
    }

    /// Run `cmd` as this user.
    fn apply(self, cmd: &mut Command) {
        if let RunAs::User { uid, gid } = self {
            // std drops the supplementary groups too (setgroups(0)) when it sets the uid.
            cmd.uid(uid).gid(gid);
        }
    }

    /// Give `path` to this user.
    fn own(self, path: &Path) {
        if let RunAs::User { uid, gid } = self {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }

    /// Make `dir` reachable by this user: o+x on `dir` itself (a tempdir is 0700), and a clear
    /// failure when an ancestor this process does not own the mode of blocks it.
    fn reach(self, dir: &Path) {
        let RunAs::User { uid, gid } = self else {
            return;
        };
        let mode = fs::metadata(dir).unwrap().permissions().mode();
        fs::set_permissions(dir, fs::Permissions::from_mode((mode | 0o011) & 0o7777)).unwrap();
        for ancestor in dir.ancestors().skip(1) {
            let m = fs::metadata(ancestor).unwrap();
            let ok = m.mode() & 0o001 != 0
                || (m.uid() == uid && m.mode() & 0o100 != 0)
                || (m.gid() == gid && m.mode() & 0o010 != 0);
            assert!(
                ok,
                "{} (mode {:o}) is not traversable by the postgres user (uid {uid}), so the \
                 server cannot reach {}: put the test directory under /tmp (TMPDIR)",
                ancestor.display(),
                m.mode() & 0o7777,
                dir.display()
            );
        }
    }
}

/// A command for a PostgreSQL tool with no PG* variables from the environment (PGHOST,
/// PGDATABASE, PGSERVICE... would redirect it silently).
fn pg_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("PG")) {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A live PostgreSQL server: data in `dir/data`, its Unix socket in `dir/run`, its log in
/// `dir/postgres.log`, listening on 127.0.0.1:port() only, wal_level=replica with 5 WAL
/// senders (pg_basebackup works). Drop stops it: SIGINT (fast shutdown), then SIGKILL if it
/// has not exited within STOP_DEADLINE.
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    run_as: RunAs,
    /// The `-c` settings it was started with, after the harness's own.
    settings: Vec<String>,
    child: Child,
}

/// How a test server differs from the default one.
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// More initdb arguments, e.g. `--wal-segsize=64`.
    pub initdb: Vec<String>,
    /// More `name=value` settings on the postmaster's command line (later ones win).
    pub settings: Vec<String>,
    /// Text appended to files of the new data directory (created if need be, mode 0600,
    /// owned by the server's user) before the first start: TLS keys, pg_hba.conf lines,
    /// postgresql.conf settings.
    pub append: Vec<(String, String)>,
}

impl PgOptions {
    pub fn setting(mut self, s: &str) -> Self {
        self.settings.push(s.to_owned());
        self
    }
}

impl PgServer {
    /// initdb and start a server in `dir` (which must exist, e.g. a `test_dir()`), waiting
    /// until it accepts connections. None skips the test (no PostgreSQL locally); under CI a
    /// missing PostgreSQL panics, and so does a server that does not start, with its log.
    pub fn start(dir: &Path) -> Option<PgServer> {
        PgServer::start_opts(dir, &PgOptions::default())
    }

    /// `start` with other initdb arguments and settings.
    pub fn start_opts(dir: &Path, opts: &PgOptions) -> Option<PgServer> {
        let bin = pg_bin()?;
        let run_as = RunAs::detect()?;
        Some(PgServer::start_with(&bin, run_as, dir, opts))
    }

    fn start_with(bin: &Path, run_as: RunAs, dir: &Path, opts: &PgOptions) -> PgServer {
        let dir = dir
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        run_as.reach(&dir);
        let data = dir.join("data");
        let socket_dir = dir.join("run");
        for (d, mode) in [(&data, 0o700), (&socket_dir, 0o755)] {
            fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            fs::set_permissions(d, fs::Permissions::from_mode(mode)).unwrap();
            run_as.own(d);
        }
        // sun_path holds 107 bytes and a NUL; postgres names its socket .s.PGSQL.<port>.
        let socket_len = socket_dir.join(".s.PGSQL.65535").as_os_str().len();
        assert!(
            socket_len <= 107,
            "{} is too long a path for PostgreSQL's Unix socket ({socket_len} > 107 bytes): \
             use a shorter TMPDIR",
            socket_dir.display()
        );

        let mut initdb = pg_command(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "--locale=C.UTF-8",
                "--encoding=UTF8",
                "-U",
                "postgres",
                "--auth=trust",
                // Nothing here must survive a machine crash; saves seconds of fsync.
                "--no-sync",
            ])
            .args(&opts.initdb)
            .current_dir(&dir);
        run_as.apply(&mut initdb);
        run_ok(&mut initdb);

        let hba = data.join("pg_hba.conf");
        fs::write(
            &hba,
            "# bakedb e2e tests: everyone trusted, over the socket and on 127.0.0.1 only.\n\
             # TYPE  DATABASE     USER  ADDRESS       METHOD\n\
             local   all          all                 trust\n\
             host    all          all   127.0.0.1/32  trust\n\
             local   replication  all                 trust\n\
             host    replication  all   127.0.0.1/32  trust\n",
        )
        .unwrap();
        fs::set_permissions(&hba, fs::Permissions::from_mode(0o600)).unwrap();
        run_as.own(&hba);
        for (name, text) in &opts.append {
            let path = data.join(name);
            let mut file = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            file.write_all(text.as_bytes()).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            run_as.own(&path);
        }

        PgServer::launch(bin, run_as, &dir, &data, &opts.settings)
    }

    /// A hot standby of `primary` in `dir` (which must exist): pg_basebackup -R as the server
    /// user, tablespaces mapped as `tablespaces` says (source location, standby location),
    /// started with the primary's settings and waited for until it accepts connections.
    pub fn standby_of(primary: &PgServer, dir: &Path, tablespaces: &[(&Path, &Path)]) -> PgServer {
        let dir = dir
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let run_as = primary.run_as;
        run_as.reach(&dir);
        let data = dir.join("data");
        let socket_dir = dir.join("run");
        for (d, mode) in [(&data, 0o700), (&socket_dir, 0o755)] {
            fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            fs::set_permissions(d, fs::Permissions::from_mode(mode)).unwrap();
            run_as.own(d);
        }
        let mut backup = pg_command(&primary.bin.join("pg_basebackup"));
        backup
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .current_dir(&dir);
        for (from, to) in tablespaces {
            fs::create_dir_all(to).unwrap();
            run_as.own(to);
            backup
                .arg("-T")
                .arg(format!("{}={}", from.display(), to.display()));
        }
        run_as.apply(&mut backup);
        run_ok(&mut backup);
        let mut settings = primary.settings.clone();
        settings.push("hot_standby=on".into());
        PgServer::launch(&primary.bin, run_as, &dir, &data, &settings)
    }

    /// Fast shutdown, then the same data directory started again with the settings it was
    /// first started with plus `more` (on a new port). `more` holds for this start only.
    pub fn restart(&mut self, more: &[&str]) {
        self.stop_now();
        let mut settings = self.settings.clone();
        settings.extend(more.iter().map(|s| s.to_string()));
        let mut fresh = PgServer::launch(&self.bin, self.run_as, &self.dir, &self.data, &settings);
        fresh.settings = std::mem::take(&mut self.settings);
        // The old child is reaped; Drop of the replaced value finds nothing to stop.
        let _ = std::mem::replace(self, fresh);
    }

    /// Give `path` (a tablespace directory, a file in the data directory) to the server's user.
    pub fn own(&self, path: &Path) {
        self.run_as.own(path);
    }

    /// Poll `sql` in `db` until it answers `want`; panics after START_DEADLINE with what it
    /// answered last.
    pub fn wait_for(&self, db: &str, sql: &str, want: &str) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let got = self.psql(db, sql);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sql} still answers {got:?}, not {want:?}, after {START_DEADLINE:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Start the postmaster on `data` and wait until it accepts connections.
    fn launch(bin: &Path, run_as: RunAs, dir: &Path, data: &Path, settings: &[String]) -> PgServer {
        let dir = dir.to_owned();
        let data = data.to_owned();
        let socket_dir = dir.join("run");
        let log = dir.join("postgres.log");
        // A port taken between free_port() and the postmaster's bind is retried with another.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let log_file = File::options()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            let mut cmd = pg_command(&bin.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&socket_dir)
                .arg("-p")
                .arg(port.to_string())
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "wal_level=replica",
                    "-c",
                    "max_wal_senders=5",
                ])
                .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file);
            run_as.apply(&mut cmd);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
            let mut server = PgServer {
                bin: bin.to_owned(),
                dir: dir.clone(),
                data: data.clone(),
                socket_dir: socket_dir.clone(),
                log: log.clone(),
                port,
                run_as,
                settings: settings.to_vec(),
                child,
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(why) => {
                    let log_text = server.log();
                    // Drop stops (or reaps) the postmaster before the retry or the panic.
                    drop(server);
                    if attempt < 3 && log_text.contains("Address already in use") {
                        eprintln!("port {port} was taken before postgres bound it; retrying");
                        continue;
                    }
                    panic!(
                        "PostgreSQL did not start: {why}\n--- {}:\n{log_text}",
                        log.display()
                    );
                }
            }
        }
    }

    /// Poll pg_isready until the server accepts connections; fail early if it exits.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("postgres exited with {status}"));
            }
            let out = run(self
                .client("pg_isready")
                .args(["-q", "-d", "postgres", "-t", "5"]));
            // 0: accepting; 1: rejecting (starting up); 2: no answer yet; 3: bad invocation.
            match out.status.code() {
                Some(0) => return Ok(()),
                Some(1 | 2) => {}
                _ => return Err(format!("pg_isready failed: {out:?}")),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not accepting connections on 127.0.0.1:{} after {START_DEADLINE:?}",
                    self.port
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory of the server and client tools this server runs from.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// PGDATA.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory holding the Unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log so far (empty when it cannot be read).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `postgresql://postgres@127.0.0.1:PORT/DB`, the superuser over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The seeded read-only role's URL, password included.
    pub fn reader_url(&self, db: &str) -> String {
        format!(
            "postgresql://{READER}:{READER_PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// A client tool of this server's version (psql, pg_basebackup, pg_dump...) run as this
    /// process, with PGHOST=127.0.0.1, PGPORT and PGUSER=postgres and no other PG* variables.
    pub fn client(&self, tool: &str) -> Command {
        let mut cmd = pg_command(&self.bin.join(tool));
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .stdin(Stdio::null());
        cmd
    }

    fn psql_command(&self, db: &str, sql: &str) -> Command {
        let mut cmd = self.client("psql");
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]);
        cmd
    }

    /// Run `sql` in `db` as postgres over TCP; the unaligned, tuples-only output, trimmed.
    /// Panics with psql's stderr on failure. One -c string is one implicit transaction: run
    /// CREATE DATABASE (or VACUUM...) in a call of its own.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        stdout(&run_ok(&mut self.psql_command(db, sql)))
            .trim()
            .to_owned()
    }

    /// As `psql`, for a statement expected to fail: the whole Output, whatever the status.
    pub fn psql_result(&self, db: &str, sql: &str) -> Output {
        run(&mut self.psql_command(db, sql))
    }

    /// Create database `db` with a representative schema and deterministic content:
    /// `items(id int primary key, name text, price numeric(10,2), tags text[])` with SEED_ITEMS
    /// rows and an index on name, a view `cheap_items`, a sequence `order_no` (next value
    /// 1000), the `writes` table a WriteLoad inserts into, and the login role READER
    /// (password READER_PASSWORD) with SELECT on all of it. The role is cluster-wide: seeding
    /// a second database reuses it.
    pub fn seed(&self, db: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\""));
        self.psql(
            db,
            &format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER}') THEN
                     CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASSWORD}';
                   END IF;
                 END $$;
                 CREATE TABLE items (
                   id int PRIMARY KEY,
                   name text NOT NULL,
                   price numeric(10,2) NOT NULL,
                   tags text[] NOT NULL
                 );
                 INSERT INTO items
                   SELECT i, 'item ' || i, (i * 7919 % 100000) / 100.0,
                          ARRAY['t' || i % 7, 't' || i % 11]
                   FROM generate_series(1, {SEED_ITEMS}) i;
                 CREATE INDEX items_name ON items (name);
                 CREATE VIEW cheap_items AS SELECT id, name, price FROM items WHERE price < 10;
                 CREATE SEQUENCE order_no START 1000;
                 {writes}
                 GRANT CONNECT ON DATABASE \"{db}\" TO {READER};
                 GRANT USAGE ON SCHEMA public TO {READER};
                 GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READER};
                 GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {READER};
                 ANALYZE;",
                writes = create_writes("writes"),
            ),
        );
    }

    /// Start a WriteLoad on `table` in `db`, creating the table if needed (see WriteLoad).
    pub fn write_load(&self, db: &str, table: &str) -> WriteLoad {
        WriteLoad::start(self, db, table)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

impl PgServer {
    /// SIGINT (fast shutdown), then SIGKILL if it has not exited within STOP_DEADLINE.
    fn stop_now(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; pid is our unreaped child, so it
        // cannot have been reused by another process.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(POLL),
            }
        }
        eprintln!("postgres (pid {pid}) ignored a fast shutdown for {STOP_DEADLINE:?}; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `CREATE TABLE IF NOT EXISTS` for a WriteLoad table.
fn create_writes(table: &str) -> String {
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
    fn start(server: &PgServer, db: &str, table: &str) -> WriteLoad {
        use std::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("load {}", NEXT.fetch_add(1, Ordering::Relaxed));
        server.psql(db, &create_writes(table));

        let mut cmd = server.client("psql");
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db])
            .env("PGAPPNAME", format!("bakedb-e2e {tag}"))
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

// --- the harness's own tests ----------------------------------------------------------------

/// Whether anything accepts TCP connections on 127.0.0.1:port.
fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_ok()
}

#[test]
fn server_starts_answers_and_seeds_deterministically() {
    let dir = test_dir();
    let Some(pg) = PgServer::start(dir.path()) else {
        return;
    };
    assert_eq!(pg.psql("postgres", "SELECT 1"), "1");
    assert_eq!(pg.psql("postgres", "SHOW wal_level"), "replica");
    assert_eq!(pg.psql("postgres", "SHOW max_wal_senders"), "5");
    assert_eq!(pg.psql("postgres", "SHOW listen_addresses"), "127.0.0.1");
    assert_eq!(
        pg.psql("postgres", "SELECT pg_encoding_to_char(encoding) || ' ' || datcollate FROM pg_database WHERE datname = 'postgres'"),
        "UTF8 C.UTF-8"
    );
    // The same server over its URL, and over a replication connection (pg_hba trusts both).
    let out = run_ok(pg.client("psql").args([
        "-X",
        "-A",
        "-t",
        "-c",
        "SELECT current_user",
        &pg.url("postgres"),
    ]));
    assert_eq!(stdout(&out).trim(), "postgres");
    let out = run_ok(pg.client("psql").args([
        "-X",
        "-A",
        "-t",
        "-d",
        "dbname=replication replication=true",
        "-c",
        "IDENTIFY_SYSTEM",
    ]));
    assert!(
        stdout(&out).contains('|'),
        "IDENTIFY_SYSTEM: {}",
        stdout(&out)
    );
    // The postmaster runs as the postgres user when the test runs as root.
    let status = fs::read_to_string(format!("/proc/{}/status", pg.pid())).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap();
    match RunAs::detect().unwrap() {
        RunAs::User { uid: want, .. } => assert_eq!(uid, want, "postmaster's effective uid"),
        // SAFETY: geteuid has no preconditions and cannot fail.
        RunAs::Me => assert_eq!(uid, unsafe { libc::geteuid() }),
    }

    pg.seed("app");
    pg.seed("app2");
    for db in ["app", "app2"] {
        assert_eq!(
            pg.psql(db, "SELECT count(*) FROM items"),
            SEED_ITEMS.to_string()
        );
        assert_eq!(
            pg.psql(db, ITEMS_MD5_SQL),
            SEED_ITEMS_MD5,
            "{db}: seed is not deterministic"
        );
        assert_eq!(pg.psql(db, "SELECT count(*) FROM writes"), "0");
        // The reader, with its password, over TCP: reads everything, writes nothing.
        let read = |sql: &str| {
            run(pg
                .client("psql")
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .arg(pg.reader_url(db)))
        };
        let out = read("SELECT count(*) FROM cheap_items");
        assert!(out.status.success(), "{out:?}");
        // 101 of the 10,000 prices are under 10.
        assert_eq!(stdout(&out).trim(), "101");
        let out = read("SELECT last_value FROM order_no");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout(&out).trim(), "1000");
        let out = read("INSERT INTO items VALUES (0, 'x', 0, '{}')");
        assert!(
            !out.status.success() && crate::util::stderr(&out).contains("permission denied"),
            "the reader could write: {out:?}"
        );
    }
    let failed = pg.psql_result("app", "SELECT * FROM no_such_table");
    assert!(!failed.status.success());
    assert!(crate::util::stderr(&failed).contains("no_such_table"));
}

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

#[test]
fn drop_stops_the_server_even_on_a_panic() {
    let dir = test_dir();
    let Some(bin) = pg_bin() else {
        return;
    };
    let Some(run_as) = RunAs::detect() else {
        return;
    };
    let mut seen = None;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pg = PgServer::start_with(&bin, run_as, dir.path(), &PgOptions::default());
        assert!(port_open(pg.port()));
        seen = Some((pg.port(), pg.pid(), pg.data_dir().to_owned()));
        panic!("a deliberate panic with a live server");
    }));
    assert!(panicked.is_err());
    let (port, pid, data) = seen.expect("the server started");
    assert!(!port_open(port), "port {port} still accepts connections");
    // Reaped by Drop: no such process (nor a zombie).
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the postmaster (pid {pid}) is still there"
    );
    // A fast shutdown, not a kill: the postmaster removed its pid file and logged it.
    assert!(!data.join("postmaster.pid").exists());
    let log = fs::read_to_string(dir.path().join("postgres.log")).unwrap();
    assert!(log.contains("database system is shut down"), "{log}");
}
