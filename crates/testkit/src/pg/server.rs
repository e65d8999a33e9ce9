//! One PostgreSQL cluster and its postmaster.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Instant;

use super::{
    POLL, PSQL_ARGS, READER, READER_PASSWORD, RunAs, SEED_ITEMS, START_DEADLINE, STOP_DEADLINE,
    WriteLoad, pg_bin, pg_command, write_load::create_writes,
};
use crate::Error;
use crate::error::or_panic;
use crate::ports::free_port;
use crate::process::{checked, run, run_ok, stdout};

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
    /// How it was started: the `-c` settings after the harness's own, more environment.
    launch: Launch,
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

/// How [`PgServer::launch`] starts a postmaster on a data directory that exists.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// `name=value` settings after the harness's own (later ones win).
    pub settings: Vec<String>,
    /// More environment for the postmaster (a preload library, its switches).
    pub env: Vec<(String, String)>,
    /// The log's file name in the server's directory; `postgres.log` if None. Appended to.
    pub log: Option<String>,
}

/// `initdb` of a new cluster at `data` (which must not exist; its parent must be writable by
/// `run_as`): UTF-8, the C.UTF-8 locale, superuser `postgres`, trust, no fsync (nothing here
/// must survive a machine crash; it saves seconds), plus `more`.
pub fn initdb(bin: &Path, run_as: RunAs, data: &Path, more: &[String]) -> Result<(), Error> {
    let mut initdb = pg_command(&bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(data)
        .args([
            "--locale=C.UTF-8",
            "--encoding=UTF8",
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ])
        .args(more)
        .stdin(Stdio::null());
    if let Some(parent) = data.parent() {
        initdb.current_dir(parent);
    }
    run_as.apply(&mut initdb);
    checked(&mut initdb).map(drop)
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

    /// `start` with the server tools of `bin`, run as `run_as`; panics if it fails.
    pub fn start_with(bin: &Path, run_as: RunAs, dir: &Path, opts: &PgOptions) -> PgServer {
        or_panic(PgServer::create(bin, run_as, dir, opts))
    }

    /// initdb and start a server in `dir` (which must exist), as `start_with`, for a caller
    /// that reports errors instead of panicking.
    pub fn create(
        bin: &Path,
        run_as: RunAs,
        dir: &Path,
        opts: &PgOptions,
    ) -> Result<PgServer, Error> {
        let (dir, data) = PgServer::prepare_dir(run_as, dir)?;
        initdb(bin, run_as, &data, &opts.initdb)?;
        let hba = data.join("pg_hba.conf");
        fs::write(
            &hba,
            "# bakedb tests and benches: everyone trusted, over the socket and on 127.0.0.1 only.\n\
             # TYPE  DATABASE     USER  ADDRESS       METHOD\n\
             local   all          all                 trust\n\
             host    all          all   127.0.0.1/32  trust\n\
             local   replication  all                 trust\n\
             host    replication  all   127.0.0.1/32  trust\n",
        )
        .map_err(Error::io(&hba))?;
        fs::set_permissions(&hba, fs::Permissions::from_mode(0o600)).map_err(Error::io(&hba))?;
        run_as.own(&hba)?;
        for (name, text) in &opts.append {
            let path = data.join(name);
            File::options()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| file.write_all(text.as_bytes()))
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o600)))
                .map_err(Error::io(&path))?;
            run_as.own(&path)?;
        }
        let launch = Launch {
            settings: opts.settings.clone(),
            ..Launch::default()
        };
        PgServer::launch(bin, run_as, &dir, &data, &launch)
    }

    /// `dir` canonical and reachable by `run_as`, with `data` (0700) and `run` (0755) in it
    /// owned by `run_as`: (dir, data).
    fn prepare_dir(run_as: RunAs, dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
        let dir = dir.canonicalize().map_err(Error::io(dir))?;
        run_as.reach(&dir)?;
        let data = dir.join("data");
        let socket_dir = dir.join("run");
        run_as.create_dir(&data, 0o700)?;
        run_as.create_dir(&socket_dir, 0o755)?;
        // sun_path holds 107 bytes and a NUL; postgres names its socket .s.PGSQL.<port>.
        let len = socket_dir.join(".s.PGSQL.65535").as_os_str().len();
        if len > 107 {
            return Err(Error::SocketPath {
                path: socket_dir,
                len,
            });
        }
        Ok((dir, data))
    }

    /// A hot standby of `primary` in `dir` (which must exist): pg_basebackup -R as the server
    /// user, tablespaces mapped as `tablespaces` says (source location, standby location),
    /// started with the primary's settings and waited for until it accepts connections.
    pub fn standby_of(primary: &PgServer, dir: &Path, tablespaces: &[(&Path, &Path)]) -> PgServer {
        let run_as = primary.run_as;
        let (dir, data) = or_panic(PgServer::prepare_dir(run_as, dir));
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
            or_panic(run_as.own(to));
            backup
                .arg("-T")
                .arg(format!("{}={}", from.display(), to.display()));
        }
        run_as.apply(&mut backup);
        run_ok(&mut backup);
        let mut launch = primary.launch.clone();
        launch.settings.push("hot_standby=on".into());
        or_panic(PgServer::launch(&primary.bin, run_as, &dir, &data, &launch))
    }

    /// Fast shutdown, then the same data directory started again with the settings it was
    /// first started with plus `more` (on a new port). `more` holds for this start only.
    pub fn restart(&mut self, more: &[&str]) {
        let _ = self.stop();
        let mut launch = self.launch.clone();
        launch.settings.extend(more.iter().map(|s| s.to_string()));
        let mut fresh = or_panic(PgServer::launch(
            &self.bin,
            self.run_as,
            &self.dir,
            &self.data,
            &launch,
        ));
        fresh.launch = self.launch.clone();
        // The old child is reaped; Drop of the replaced value finds nothing to stop.
        let _ = std::mem::replace(self, fresh);
    }

    /// Give `path` (a tablespace directory, a file in the data directory) to the server's user.
    pub fn own(&self, path: &Path) {
        or_panic(self.run_as.own(path));
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

    /// Start a postmaster on `data` (an initialised cluster) with its socket in `dir/run`
    /// (which must exist) and its log in `dir`, listening on a free port of 127.0.0.1, and
    /// wait until it accepts connections.
    pub fn launch(
        bin: &Path,
        run_as: RunAs,
        dir: &Path,
        data: &Path,
        launch: &Launch,
    ) -> Result<PgServer, Error> {
        let socket_dir = dir.join("run");
        let log = dir.join(launch.log.as_deref().unwrap_or("postgres.log"));
        // A port taken between free_port() and the postmaster's bind is retried with another.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let log_file = File::options()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(Error::io(&log))?;
            let log_err = log_file.try_clone().map_err(Error::io(&log))?;
            let mut cmd = pg_command(&bin.join("postgres"));
            cmd.arg("-D")
                .arg(data)
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
                .args(launch.settings.iter().flat_map(|s| ["-c", s.as_str()]))
                .envs(launch.env.iter().map(|(k, v)| (k, v)))
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err);
            run_as.apply(&mut cmd);
            let child = cmd.spawn().map_err(|source| Error::Spawn {
                program: format!("{cmd:?}"),
                source,
            })?;
            let mut server = PgServer {
                bin: bin.to_owned(),
                dir: dir.to_owned(),
                data: data.to_owned(),
                socket_dir: socket_dir.clone(),
                log: log.clone(),
                port,
                run_as,
                launch: launch.clone(),
                child,
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(why) => {
                    let text = server.log();
                    // Drop stops (or reaps) the postmaster before the retry or the error.
                    drop(server);
                    if attempt < 3 && text.contains("Address already in use") {
                        eprintln!("port {port} was taken before postgres bound it; retrying");
                        continue;
                    }
                    return Err(Error::NotStarted { why, log, text });
                }
            }
        }
    }

    /// Poll pg_isready until the server accepts connections; fail early if it exits.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("postgres exited with {status}"));
            }
            let out = self
                .client("pg_isready")
                .args(["-q", "-d", "postgres", "-t", "5"])
                .output()
                .map_err(|e| format!("could not run pg_isready: {e}"))?;
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

    /// psql running `sql` in `db` as postgres over TCP (PSQL_ARGS).
    pub fn psql_command(&self, db: &str, sql: &str) -> Command {
        let mut cmd = self.client("psql");
        cmd.args(PSQL_ARGS).args(["-d", db, "-c", sql]);
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

    /// SIGINT (fast shutdown), then SIGKILL if it has not exited within STOP_DEADLINE: its
    /// exit status, or an error when it had to be killed.
    pub fn stop(&mut self) -> Result<ExitStatus, Error> {
        if !crate::process::stop(&mut self.child, libc::SIGINT, STOP_DEADLINE) {
            return Err(Error::StopTimedOut {
                pid: self.child.id(),
                patience: STOP_DEADLINE,
                log: self.log.clone(),
            });
        }
        self.child.wait().map_err(Error::io(&self.data))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;
    use crate::dirs::test_dir;
    use crate::pg::{ITEMS_MD5_SQL, SEED_ITEMS_MD5};
    use crate::process::stderr;

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
                !out.status.success() && stderr(&out).contains("permission denied"),
                "the reader could write: {out:?}"
            );
        }
        let failed = pg.psql_result("app", "SELECT * FROM no_such_table");
        assert!(!failed.status.success());
        assert!(stderr(&failed).contains("no_such_table"));
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
}
