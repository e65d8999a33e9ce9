//! Live MariaDB servers for the tests that bake one (and, next, `cargo xtask bench
//! mariadb`): `mariadb-install-db` into a directory of the caller's, `mariadbd` as a child
//! process the caller owns on a free 127.0.0.1 port and a private socket, with a binlog (so
//! a snapshot has a position), stopped by Drop (also on a panic); a seed database with every
//! kind of object bakedb must carry, and a write load that keeps committing while a snapshot
//! is taken.
//!
//! The tools come from Debian's mariadb-server and mariadb-client (PATH, /usr/sbin); missing
//! ones skip a test locally and fail it under CI=true. mariadbd refuses to run as root, and
//! CI runs as root: then the data directory belongs to the machine's `mysql` user, the server
//! switches to it itself (`--user=mysql`), and the test directory gets o+x so that user can
//! reach it. Clients run as this process: root on the socket (unix_socket authentication
//! is not needed: install-db gives root@localhost no password here), the others over TCP.
//!
//! One server per test, a local of the test function declared after the test directory.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Error;
use crate::error::or_panic;
use crate::pg::RunAs;
use crate::ports::free_port;
use crate::process::{checked, stop};
use crate::tools::{is_root, skip};

const START_DEADLINE: Duration = Duration::from_secs(60);
const STOP_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(25);

/// The account the seed creates for bakedb: exactly the privileges mariadb-backup needs.
pub const BACKUP_USER: &str = "bakedb";
pub const BACKUP_PASSWORD: &str = "bakedb-secret";
/// The application's account (mysql_native_password): SELECT, INSERT on `app`.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
/// An account with the ed25519 plugin (INSTALL SONAME 'auth_ed25519' in the seed).
pub const ED_USER: &str = "edu";
pub const ED_PASSWORD: &str = "ed-secret";
/// Rows of each seeded table.
pub const SEED_ROWS: i64 = 1000;

/// What a replica of the seed must answer exactly as the source did: the seeded tables
/// through each storage engine (every row in the MD5), the view, the procedure and the
/// trigger's count.
pub const SEED_CHECKS: [&str; 6] = [
    "SELECT COUNT(*), SUM(price), MD5(GROUP_CONCAT(id, name, price ORDER BY id)) FROM app.items_innodb",
    "SELECT COUNT(*), SUM(price), MD5(GROUP_CONCAT(id, name, price ORDER BY id)) FROM app.items_aria",
    "SELECT COUNT(*), SUM(price), MD5(GROUP_CONCAT(id, name, price ORDER BY id)) FROM app.items_myisam",
    "SELECT COUNT(*) FROM app.cheap",
    "CALL app.priced(100)",
    "SELECT n FROM app.counts WHERE name = 'innodb'",
];

/// Where the MariaDB tools are.
#[derive(Clone, Debug)]
pub struct MariaTools {
    pub server: PathBuf,
    pub install_db: PathBuf,
    pub client: PathBuf,
}

fn find(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .collect();
    dirs.extend(["/usr/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The MariaDB server and client tools, or None (the test is skipped) locally; missing ones
/// fail the test under CI.
pub fn maria_tools() -> Option<MariaTools> {
    let (server, install_db, client) = (
        find("mariadbd"),
        find("mariadb-install-db"),
        find("mariadb"),
    );
    match (server, install_db, client) {
        (Some(server), Some(install_db), Some(client)) => Some(MariaTools {
            server,
            install_db,
            client,
        }),
        _ => {
            skip(
                "MariaDB is not installed (mariadbd, mariadb-install-db, mariadb)",
                ".ci/run must install mariadb-server and mariadb-client",
            );
            None
        }
    }
}

/// `client` (the `mariadb` program) running `sql` over TCP to 127.0.0.1:`port` as `user`
/// (with `password`, if any): no option files, batch output without column names, stdin
/// closed. The caller runs it (possibly in a container's network namespace).
pub fn tcp_client(
    client: &Path,
    port: u16,
    user: &str,
    password: Option<&str>,
    sql: &str,
) -> Command {
    let mut cmd = Command::new(client);
    cmd.args(["--no-defaults", "--protocol=tcp", "-h", "127.0.0.1"])
        .arg(format!("-P{port}"))
        .args(["-u", user]);
    if let Some(p) = password {
        cmd.arg(format!("-p{p}"));
    }
    cmd.args(["--batch", "--skip-column-names", "-e", sql])
        .stdin(Stdio::null());
    cmd
}

/// Who runs the server: this process, or (as root) the `mysql` user; None (skipped, or a
/// failure under CI) when root and the machine has no `mysql` user.
pub fn run_as() -> Option<RunAs> {
    if !is_root() {
        return Some(RunAs::Me);
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let user = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == "mysql").then(|| {
            Some(RunAs::User {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })?
    });
    if user.is_none() {
        skip(
            "running as root and /etc/passwd has no mysql user",
            ".ci/run must install mariadb-server, which creates it",
        );
    }
    user
}

/// A live MariaDB server: data in `dir/data`, socket `dir/run/s.sock`, log `dir/mariadb.log`,
/// 127.0.0.1:port() only, binlog on (server_id 1), so mariadb-backup records a position.
pub struct MariaServer {
    tools: MariaTools,
    data: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    port: u16,
    child: Child,
}

impl MariaServer {
    /// install-db and start a server in `dir` (which must exist), waiting until it accepts
    /// connections. None skips the test (no MariaDB locally); under CI a missing MariaDB
    /// panics, and so does a server that does not start, with its log.
    pub fn start(dir: &Path) -> Option<MariaServer> {
        let tools = maria_tools()?;
        let run_as = run_as()?;
        Some(or_panic(MariaServer::create(tools, run_as, dir)))
    }

    pub fn create(tools: MariaTools, run_as: RunAs, dir: &Path) -> Result<MariaServer, Error> {
        let dir = dir.canonicalize().map_err(Error::io(dir))?;
        run_as.reach(&dir)?;
        let data = dir.join("data");
        let run = dir.join("run");
        run_as.create_dir(&data, 0o750)?;
        run_as.create_dir(&run, 0o755)?;
        let mut install = Command::new(&tools.install_db);
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ])
            // Its own temporary tables beside its data: a bootstrap in the shared /tmp
            // failed once to delete its own #sql-temptable file while other tests ran.
            .arg(format!("--tmpdir={}", run.display()))
            .current_dir(&dir)
            .stdin(Stdio::null());
        if let RunAs::User { .. } = run_as {
            install.arg("--user=mysql");
        }
        checked(&mut install)?;
        MariaServer::launch(tools, run_as, &dir, &data)
    }

    fn launch(
        tools: MariaTools,
        run_as: RunAs,
        dir: &Path,
        data: &Path,
    ) -> Result<MariaServer, Error> {
        let socket = dir.join("run/s.sock");
        let log = dir.join("mariadb.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let mut cmd = Command::new(&tools.server);
            cmd.arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--port={port}"))
                .arg(format!("--log-error={}", log.display()))
                .arg(format!("--pid-file={}/run/mariadbd.pid", dir.display()))
                .arg(format!("--tmpdir={}/run", dir.display()))
                .args([
                    "--bind-address=127.0.0.1",
                    "--log-bin=binlog",
                    "--server-id=1",
                    "--innodb-flush-log-at-trx-commit=2",
                ])
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let RunAs::User { .. } = run_as {
                cmd.arg("--user=mysql");
            }
            let child = cmd.spawn().map_err(|source| Error::Spawn {
                program: format!("{cmd:?}"),
                source,
            })?;
            let mut server = MariaServer {
                tools: tools.clone(),
                data: data.to_owned(),
                socket: socket.clone(),
                log: log.clone(),
                port,
                child,
            };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(why) => {
                    let text = server.log();
                    drop(server);
                    if attempt < 3 && text.contains("Address already in use") {
                        continue;
                    }
                    return Err(Error::NotStarted { why, log, text });
                }
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("mariadbd exited with {status}"));
            }
            if self.socket.exists() && self.root_result("SELECT 1").status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not accepting connections after {START_DEADLINE:?}"
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `mysql://bakedb:…@127.0.0.1:PORT/`: the backup account the seed creates.
    pub fn url(&self) -> String {
        format!(
            "mysql://{BACKUP_USER}:{BACKUP_PASSWORD}@127.0.0.1:{}/",
            self.port
        )
    }

    /// The `mariadb` client as root on the socket, no option files, batch output.
    pub fn root_client(&self) -> Command {
        let mut cmd = Command::new(&self.tools.client);
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--user=root", "--batch", "--skip-column-names"])
            .stdin(Stdio::null());
        cmd
    }

    pub fn root_result(&self, sql: &str) -> Output {
        self.root_client()
            .args(["-e", sql])
            .output()
            .expect("running mariadb")
    }

    /// Run `sql` as root; its output, trimmed. Panics with the error if it fails.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.root_result(sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The client path, for tests that connect elsewhere (a replica) with it.
    pub fn client_path(&self) -> &Path {
        &self.tools.client
    }

    /// The seed: the backup account; database `app` with `items_innodb`, `items_aria` and
    /// `items_myisam` (SEED_ROWS each), a view, a trigger that counts inserts into a MyISAM
    /// table, a procedure, the `app` account with a mysql_native_password password and the
    /// `edu` account with an ed25519 one (the plugin installed from the server's plugin
    /// directory, so mysql.plugin names it).
    pub fn seed(&self) {
        let mut sql = format!(
            "CREATE USER '{BACKUP_USER}'@'127.0.0.1' IDENTIFIED BY '{BACKUP_PASSWORD}';
             GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO '{BACKUP_USER}'@'127.0.0.1';
             CREATE USER '{APP_USER}'@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{APP_PASSWORD}');
             INSTALL SONAME 'auth_ed25519';
             CREATE USER '{ED_USER}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASSWORD}');
             CREATE DATABASE app;
             GRANT SELECT, INSERT, UPDATE, DELETE, EXECUTE ON app.* TO '{APP_USER}'@'%';
             GRANT SELECT ON app.* TO '{ED_USER}'@'%';
             USE app;
             CREATE TABLE counts (name VARCHAR(32) PRIMARY KEY, n BIGINT NOT NULL) ENGINE=MyISAM;
             INSERT INTO counts VALUES ('innodb', 0);
            "
        );
        for engine in ["innodb", "aria", "myisam"] {
            sql.push_str(&format!(
                "CREATE TABLE items_{engine} (id INT PRIMARY KEY, name VARCHAR(40) NOT NULL, price DECIMAL(10,2), KEY (name)) ENGINE={engine};\n"
            ));
        }
        sql.push_str(
            "CREATE TRIGGER count_innodb AFTER INSERT ON items_innodb FOR EACH ROW UPDATE counts SET n = n + 1 WHERE name = 'innodb';
             INSERT INTO items_innodb SELECT seq, CONCAT('item-', LPAD(seq, 5, '0')), seq / 4 FROM seq_1_to_1000;
             INSERT INTO items_aria SELECT * FROM items_innodb;
             INSERT INTO items_myisam SELECT * FROM items_innodb;
             CREATE VIEW cheap AS SELECT id, name FROM items_innodb WHERE price < 10;
             CREATE PROCEDURE priced(IN below DECIMAL(10,2)) SELECT COUNT(*) FROM items_innodb WHERE price < below;
             CREATE TABLE load_innodb (id BIGINT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64)) ENGINE=InnoDB;
             CREATE TABLE load_aria (id BIGINT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64)) ENGINE=Aria;
            ",
        );
        self.sql(&sql);
    }

    /// One row into load_innodb and one into load_aria, again and again (autocommit, one
    /// binlog event group each), until stopped.
    pub fn write_load(&self) -> MariaWriteLoad {
        MariaWriteLoad::start(self)
    }

    /// Shut down (SIGTERM), waiting up to STOP_DEADLINE; then SIGKILL.
    pub fn stop(&mut self) -> bool {
        stop(&mut self.child, libc::SIGTERM, STOP_DEADLINE)
    }
}

impl Drop for MariaServer {
    fn drop(&mut self) {
        if !self.stop() {
            eprintln!(
                "mariadbd (pid {}) ignored SIGTERM for {STOP_DEADLINE:?}; killed it ({})",
                self.child.id(),
                self.log.display()
            );
        }
    }
}

/// Rows committed one by one into app.load_innodb and app.load_aria by one long-lived
/// `mariadb` client in lockstep (each INSERT's LAST_INSERT_ID is read back before the next
/// is sent), so `committed()` is exact. Starts once the first pair is in.
pub struct MariaWriteLoad {
    committed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl MariaWriteLoad {
    fn start(server: &MariaServer) -> MariaWriteLoad {
        let mut cmd = server.root_client();
        cmd.args(["--unbuffered", "app"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting the write load's mariadb");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let committed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (committed, stop) = (committed.clone(), stop.clone());
            std::thread::spawn(move || run_load(child, stdin, stdout, &committed, &stop))
        };
        let load = MariaWriteLoad {
            committed,
            stop,
            thread: Some(thread),
        };
        let deadline = Instant::now() + START_DEADLINE;
        while load.committed() == 0 {
            assert!(
                Instant::now() < deadline,
                "the write load committed nothing"
            );
            std::thread::sleep(POLL);
        }
        load
    }

    /// Pairs committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Stop and return the number of pairs committed.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("write load thread")
                .unwrap_or_else(|e| panic!("write load: {e}"));
        }
        self.committed()
    }
}

fn run_load(
    mut child: Child,
    mut stdin: ChildStdin,
    mut stdout: BufReader<std::process::ChildStdout>,
    committed: &AtomicU64,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut line = String::new();
    let mut i = 0u64;
    let result = loop {
        if stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        i += 1;
        let sql = format!(
            "INSERT INTO load_innodb (v) VALUES ('row {i}'); INSERT INTO load_aria (v) VALUES ('row {i}'); SELECT LAST_INSERT_ID();\n"
        );
        if let Err(e) = stdin.write_all(sql.as_bytes()) {
            break Err(format!("writing to mariadb: {e}"));
        }
        line.clear();
        match stdout.read_line(&mut line) {
            Ok(0) => break Err("mariadb exited".into()),
            Ok(_) if line.trim() == i.to_string() => {
                committed.store(i, Ordering::SeqCst);
            }
            Ok(_) => break Err(format!("expected {i}, mariadb said {line:?}")),
            Err(e) => break Err(format!("reading from mariadb: {e}")),
        }
    };
    drop(stdin);
    let _ = child.wait();
    result
}

impl Drop for MariaWriteLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirs::test_dir;

    #[test]
    fn server_starts_seeds_and_takes_writes() {
        let dir = test_dir();
        let Some(server) = MariaServer::start(dir.path()) else {
            return;
        };
        server.seed();
        assert_eq!(
            server.sql("SELECT COUNT(*) FROM app.items_innodb; SELECT n FROM app.counts"),
            "1000\n1000"
        );
        let load = server.write_load();
        let n = load.stop();
        assert!(n >= 1);
        assert_eq!(
            server.sql("SELECT COUNT(*) FROM app.load_innodb; SELECT COUNT(*) FROM app.load_aria"),
            format!("{n}\n{n}")
        );
        // The backup account works over TCP with its password, and only with it.
        let tcp = |password| {
            tcp_client(
                server.client_path(),
                server.port(),
                BACKUP_USER,
                Some(password),
                "SELECT 1",
            )
            .output()
            .unwrap()
        };
        let out = tcp(BACKUP_PASSWORD);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
        assert!(!tcp("wrong").status.success());
    }
}
