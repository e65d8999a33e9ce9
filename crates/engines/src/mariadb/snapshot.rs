//! The pipeline: the probe of the source, `mariadb-backup --backup` and `--prepare`, the
//! copy stripped to MariaDB's own data, the scratch server (ANALYZE TABLE, slow shutdown),
//! `aria_chk --zerofill`, and the files and directories as they go into the image.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::conn::{Source, rows};
use super::{DATADIR, err, io, parse_series};
use crate::{DataDir, DataFile, Error, Result, Snapshot};

/// Modes in the image: the server's user may read and never write, so MyISAM and Aria,
/// which open O_RDWR first, fall back to O_RDONLY on EACCES, and a create in the data
/// directory fails before overlayfs copies anything up.
pub const FILE_MODE: u32 = 0o440;
pub const DIR_MODE: u32 = 0o550;

/// InnoDB's redo log size in the copy (the scratch server resizes it at its start): a
/// replica writes no redo, so it only has to hold a clean checkpoint.
pub const REDO_LOG_SIZE: &str = "8M";

/// The source's settings a replica carries because they change what queries answer.
const CARRIED: [&str; 9] = [
    "character_set_server",
    "collation_server",
    "lower_case_table_names",
    "sql_mode",
    "default_week_format",
    "div_precision_increment",
    "group_concat_max_len",
    "explicit_defaults_for_timestamp",
    "old_mode",
];

/// What backup-my.cnf records about the copy's InnoDB that a server must be started with.
const LAYOUT: [&str; 3] = [
    "innodb_page_size",
    "innodb_data_file_path",
    "innodb_undo_tablespaces",
];

const READY_DEADLINE: Duration = Duration::from_secs(120);
const STOP_DEADLINE: Duration = Duration::from_secs(600);

/// The MariaDB tools on this machine, all of one release series.
#[derive(Clone, Debug)]
pub struct Tools {
    pub backup: PathBuf,
    pub server: PathBuf,
    pub client: PathBuf,
    pub aria_chk: PathBuf,
    pub series: String,
    pub version: String,
}

fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .collect();
    // mariadbd lives in /usr/sbin, which an unprivileged user's PATH may lack.
    dirs.extend(["/usr/sbin", "/usr/bin", "/usr/local/mysql/bin"].map(PathBuf::from));
    names
        .iter()
        .find_map(|n| dirs.iter().map(|d| d.join(n)).find(|p| p.is_file()))
}

impl Tools {
    pub fn find() -> Result<Tools> {
        let usage = |detail: String| Error::Usage {
            step: "finding the MariaDB tools".into(),
            detail,
        };
        let mut missing = Vec::new();
        let mut get = |names: &[&str]| {
            let found = find_tool(names);
            if found.is_none() {
                missing.push(names[0].to_owned());
            }
            found.unwrap_or_default()
        };
        let backup = get(&["mariadb-backup", "mariabackup"]);
        let server = get(&["mariadbd"]);
        let client = get(&["mariadb", "mysql"]);
        let aria_chk = get(&["aria_chk"]);
        if !missing.is_empty() {
            return Err(usage(format!(
                "{} not found on PATH or in /usr/sbin: install the server, client and backup packages of the source's release series (Debian: apt-get install mariadb-server mariadb-client mariadb-backup)",
                missing.join(", ")
            )));
        }
        let version_of = |tool: &Path| -> Result<String> {
            let out = Command::new(tool)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .map_err(io("running", tool))?;
            // mariadb-backup prints its version on stderr.
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(text.lines().next().unwrap_or("").trim().to_owned())
        };
        let server_version = version_of(&server)?;
        let backup_version = version_of(&backup)?;
        let series = parse_series(&server_version)
            .ok_or_else(|| usage(format!("cannot read {server_version:?} as a version")))?;
        if parse_series(&backup_version).as_deref() != Some(series.as_str()) {
            return Err(usage(format!(
                "{} is {backup_version:?} and {} is {server_version:?}: install both of one release series",
                backup.display(),
                server.display()
            )));
        }
        Ok(Tools {
            backup,
            server,
            client,
            aria_chk,
            series,
            version: server_version,
        })
    }
}

/// What the probe of a live source found.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub version: String,
    pub series: String,
    /// Where the source keeps its data (mariadb-backup reads it there).
    pub datadir: PathBuf,
    /// Settings the replica carries, by name.
    pub carried: BTreeMap<String, String>,
    /// Plugin libraries the source has loaded, which the base must have.
    pub plugins: Vec<String>,
    pub notes: Vec<String>,
}

/// The grants of `SHOW GRANTS` on *.* that mariadb-backup needs: all there, or what lacks.
fn missing_privileges(grants: &[String]) -> Vec<&'static str> {
    let global: Vec<String> = grants
        .iter()
        .filter(|g| g.contains(" ON *.* TO "))
        .map(|g| g.to_uppercase())
        .collect();
    if global
        .iter()
        .any(|g| g.starts_with("GRANT ALL PRIVILEGES ON"))
    {
        return Vec::new();
    }
    let has = |p: &str| {
        global.iter().any(|g| {
            g.strip_prefix("GRANT ")
                .and_then(|g| g.split(" ON *.* TO ").next())
                .is_some_and(|list| list.split(',').any(|x| x.trim() == p))
        })
    };
    let mut missing = Vec::new();
    for p in ["RELOAD", "PROCESS", "LOCK TABLES"] {
        if !has(p) {
            missing.push(p);
        }
    }
    if !has("BINLOG MONITOR") && !has("REPLICATION CLIENT") {
        missing.push("BINLOG MONITOR");
    }
    missing
}

/// Look at the source before any work: its version, the user's privileges, whether its data
/// directory is on this machine, encryption, plugins and settings.
pub fn probe(tools: &Tools, source: &Source) -> Result<SourceInfo> {
    let step = format!("checking the source {}", source.redacted());
    let fail = |detail: String| err(step.clone(), detail);
    let mut names = vec!["VERSION()".to_owned(), "@@datadir".to_owned()];
    names.extend(CARRIED.iter().map(|s| format!("@@{s}")));
    names.extend(["@@time_zone".into(), "@@system_time_zone".into()]);
    let row = source
        .query(&tools.client, &format!("SELECT {}", names.join(", ")))?
        .into_iter()
        .next()
        .ok_or_else(|| fail("the server answered no row".into()))?;
    let version = row[0].clone();
    if !version.contains("MariaDB") {
        return Err(fail(format!(
            "it is not a MariaDB server (version {version:?}); bakedb's mariadb engine bakes MariaDB"
        )));
    }
    let series = parse_series(&version)
        .ok_or_else(|| fail(format!("cannot read {version:?} as a version")))?;
    if series != tools.series {
        return Err(fail(format!(
            "the server is MariaDB {series} and this machine's mariadb-backup and mariadbd are {}: a physical copy needs the tools of the server's release series",
            tools.series
        )));
    }
    let grants: Vec<String> = source
        .query(&tools.client, "SHOW GRANTS")?
        .into_iter()
        .filter_map(|r| r.into_iter().next())
        .collect();
    let missing = missing_privileges(&grants);
    if !missing.is_empty() {
        return Err(fail(format!(
            "the user lacks {} on *.*, which mariadb-backup needs: GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO the user",
            missing.join(", ")
        )));
    }
    let datadir = PathBuf::from(&row[1]);
    if fs::read_dir(&datadir).is_err() {
        return Err(fail(format!(
            "its data directory {} is not readable here: mariadb-backup copies the server's files directly, so run bakedb on the server's machine (or in its container), as a user that can read them",
            datadir.display()
        )));
    }
    let encrypted = source.query(
        &tools.client,
        "SELECT COUNT(*) FROM information_schema.INNODB_TABLESPACES_ENCRYPTION WHERE ENCRYPTION_SCHEME <> 0",
    )?;
    if encrypted
        .first()
        .and_then(|r| r.first())
        .is_some_and(|n| n != "0")
    {
        return Err(fail(
            "it has encrypted InnoDB tablespaces: a replica would need the source's keys, and bakedb never puts keys in an image; decrypt them (ALTER TABLE ... ENCRYPTED=NO) or bake another source".into(),
        ));
    }
    let plugins: Vec<String> = source
        .query(
            &tools.client,
            "SELECT DISTINCT PLUGIN_LIBRARY FROM information_schema.PLUGINS WHERE PLUGIN_LIBRARY IS NOT NULL AND PLUGIN_STATUS = 'ACTIVE' ORDER BY 1",
        )?
        .into_iter()
        .filter_map(|r| r.into_iter().next())
        .collect();
    let mut carried = BTreeMap::new();
    for (name, value) in CARRIED.iter().zip(&row[2..]) {
        carried.insert((*name).to_owned(), value.clone());
    }
    let mut notes = Vec::new();
    let (zone, system_zone) = (&row[2 + CARRIED.len()], &row[3 + CARRIED.len()]);
    if zone != "SYSTEM" {
        carried.insert("time_zone".into(), zone.clone());
    } else if system_zone != "UTC" {
        notes.push(format!(
            "time_zone: the source uses its machine's time zone ({system_zone}); the image runs in its container's (TZ, UTC by default)"
        ));
    }
    Ok(SourceInfo {
        version,
        series,
        datadir,
        carried,
        plugins,
        notes,
    })
}

/// The user the scratch server and aria_chk run as: mariadbd refuses root, so a root bakedb
/// hands the copy to this machine's `mysql` user; otherwise None (bakedb's own user).
fn scratch_user() -> Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt;
    if !fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    crate::postgres::passwd_user(&passwd, "mysql")
        .map(Some)
        .ok_or_else(|| {
            err(
                "preparing the scratch server",
                "bakedb runs as root, mariadbd refuses to, and this machine has no `mysql` user to run it as; run bakedb as an unprivileged user",
            )
        })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(io("changing the owner of", path))?;
    if fs::symlink_metadata(path)
        .map_err(io("reading", path))?
        .is_dir()
    {
        for entry in fs::read_dir(path).map_err(io("reading", path))? {
            chown_tree(&entry.map_err(io("reading", path))?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run a tool with its output in `log`; an error quotes the log's end.
fn run_logged(mut cmd: Command, log: &Path, step: &str) -> Result<()> {
    let file = fs::File::create(log).map_err(io("creating", log))?;
    let file2 = file.try_clone().map_err(io("opening", log))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file2)
        .status()
        .map_err(io("running", Path::new(cmd.get_program())))?;
    if !status.success() {
        return Err(err(step, format!("{status}; it said:\n{}", tail(log, 12))));
    }
    Ok(())
}

/// `key=value` lines of an option file's text (backup-my.cnf).
fn options(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().replace('-', "_"), v.trim().to_owned()))
        .collect()
}

/// The binlog file, position and GTID in xtrabackup_binlog_info (absent: no binlog).
fn binlog_position(text: &str) -> serde_json::Value {
    let f: Vec<&str> = text.split_whitespace().collect();
    match f.as_slice() {
        [file, pos, rest @ ..] => json!({
            "binlog_file": file,
            "binlog_position": pos.parse::<u64>().ok(),
            "gtid": rest.first().copied().unwrap_or(""),
        }),
        _ => json!(null),
    }
}

/// Whether a top-level entry of the prepared copy is MariaDB's data: the backup's own
/// files, the Aria log, the buffer pool dump and anything else the server writes at run
/// time go; databases (directories), the InnoDB system and undo tablespaces and its redo log
/// stay.
fn is_data(name: &str, is_dir: bool) -> bool {
    if is_dir {
        return !name.starts_with('.') && name != "#sql_temp" && !name.starts_with("#innodb_");
    }
    name.starts_with("ibdata")
        || name == "ib_logfile0"
        || (name.starts_with("undo") && name[4..].bytes().all(|b| b.is_ascii_digit()))
}

/// Remove what is not data from the top of `datadir`; the names removed.
fn keep_only_data(datadir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for e in fs::read_dir(datadir).map_err(io("reading", datadir))? {
        let e = e.map_err(io("reading", datadir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = fs::symlink_metadata(e.path()).map_err(io("reading", &e.path()))?;
        if is_data(&name, meta.is_dir()) {
            continue;
        }
        if meta.is_dir() {
            fs::remove_dir_all(e.path()).map_err(io("removing", &e.path()))?;
        } else {
            fs::remove_file(e.path()).map_err(io("removing", &e.path()))?;
        }
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// Every directory and regular file under `datadir`, as they go into the image under
/// `mysql/`, with the image's read-only modes. A symbolic link (a table with DATA
/// DIRECTORY elsewhere) is refused.
pub fn collect(datadir: &Path) -> Result<(Vec<DataDir>, Vec<DataFile>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![(datadir.to_owned(), DATADIR.to_owned())];
    while let Some((dir, rel)) = stack.pop() {
        dirs.push(DataDir {
            rel_path: rel.clone(),
            mode: DIR_MODE,
        });
        for e in fs::read_dir(&dir).map_err(io("reading", &dir))? {
            let e = e.map_err(io("reading", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let child_rel = format!("{rel}/{name}");
            let meta = fs::symlink_metadata(&path).map_err(io("reading", &path))?;
            if meta.is_dir() {
                stack.push((path, child_rel));
            } else if meta.is_file() {
                // InnoDB files are pages of innodb_page_size; the rest is one unit. 16 KiB,
                // the default, is what a delta re-bake would compare.
                let page_size = if (name.ends_with(".ibd") || name.starts_with("ibdata"))
                    && meta.len().is_multiple_of(16384)
                {
                    16384
                } else {
                    0
                };
                files.push(DataFile {
                    rel_path: child_rel,
                    host_path: path,
                    mode: FILE_MODE,
                    page_size,
                    page_header: 0,
                });
            } else {
                return Err(err(
                    "collecting the data directory",
                    format!(
                        "{} is not a regular file or directory (a table with DATA DIRECTORY or INDEX DIRECTORY elsewhere?); bakedb bakes self-contained data directories only",
                        path.display()
                    ),
                ));
            }
        }
    }
    dirs.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    files.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    Ok((dirs, files))
}

/// The scratch server on the copy, killed if dropped while running.
struct Scratch {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    client: PathBuf,
}

impl Scratch {
    fn start(
        tools: &Tools,
        datadir: &Path,
        run_dir: &Path,
        layout: &BTreeMap<String, String>,
        user: Option<(u32, u32)>,
    ) -> Result<Scratch> {
        let socket = run_dir.join("s.sock");
        let log = run_dir.join("scratch.err");
        let run = run_dir.display();
        let mut cmd = Command::new(&tools.server);
        // --no-defaults first: nothing of this machine's /etc/mysql, and nothing of the
        // source's configuration; the options the copy needs are all here.
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .args([
                format!("--socket={}", socket.display()),
                "--skip-networking".into(),
                "--skip-log-bin".into(),
                "--skip-slave-start".into(),
                "--event-scheduler=DISABLED".into(),
                // No plugins of mysql.plugin (an audit log, a federated engine) and no
                // accounts: root on the private socket runs ANALYZE, nobody else connects.
                "--skip-grant-tables".into(),
                format!("--innodb-log-file-size={REDO_LOG_SIZE}"),
                "--innodb-buffer-pool-dump-at-shutdown=OFF".into(),
                "--innodb-buffer-pool-load-at-startup=OFF".into(),
                format!("--pid-file={run}/scratch.pid"),
                format!("--tmpdir={run}"),
                format!("--log-error={}", log.display()),
                format!("--master-info-file={run}/master.info"),
                format!("--relay-log-info-file={run}/relay-log.info"),
                format!("--log-ddl-recovery={run}/ddl_recovery.log"),
                format!("--log-tc={run}/tc.log"),
            ])
            .args(layout.iter().map(|(k, v)| format!("--{k}={v}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().map_err(io("running", &tools.server))?;
        let mut scratch = Scratch {
            child: Some(child),
            socket,
            log,
            client: tools.client.clone(),
        };
        scratch.wait_ready()?;
        Ok(scratch)
    }

    fn client(&self, sql: &str) -> Command {
        let mut cmd = Command::new(&self.client);
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args([
                "--user=root",
                "--batch",
                "--skip-column-names",
                "--raw",
                "-e",
                sql,
            ])
            .stdin(Stdio::null());
        cmd
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().map_err(io("waiting for", &self.log))? {
                self.child = None;
                return Err(err(
                    "starting the scratch server on the copy",
                    format!("mariadbd exited with {status}:\n{}", tail(&self.log, 15)),
                ));
            }
            if self.socket.exists()
                && self
                    .client("SELECT 1")
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(
                    "starting the scratch server on the copy",
                    format!(
                        "not ready after {READY_DEADLINE:?}:\n{}",
                        tail(&self.log, 15)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn query(&self, sql: &str, step: &str) -> Result<Vec<Vec<String>>> {
        let out = self
            .client(sql)
            .output()
            .map_err(io("running", &self.client))?;
        rows(&out).map_err(|why| err(step, why))
    }

    /// SET GLOBAL innodb_fast_shutdown=0 and SHUTDOWN: purge, change buffer merge and a
    /// clean redo log, then wait for the exit.
    fn slow_shutdown(mut self) -> Result<()> {
        self.query(
            "SET GLOBAL innodb_fast_shutdown = 0; SHUTDOWN",
            "shutting the scratch server down",
        )?;
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for", &self.log))? {
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                if !status.success() || !log.contains("Shutdown complete") {
                    return Err(err(
                        "shutting the scratch server down",
                        format!("mariadbd exited with {status}:\n{}", tail(&self.log, 15)),
                    ));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(
                    "shutting the scratch server down",
                    format!("no clean shutdown within {STOP_DEADLINE:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A backquoted identifier.
fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `aria_chk --zerofill` every Aria table (LSNs reset, marked movable): a replica's fresh
/// Aria control file accepts them without a write. Returns the tables that had to be
/// rebuilt first.
///
/// Why a zero-fill can stop (aria_chk error 176, HA_ERR_WRONG_CRC): it reads every page of
/// the data file through the page checksum, and Aria forgives an all-zero page only where a
/// bitmap page belongs. A data page the bitmap marks empty and that was never written (a
/// hole, all zeros) fails it, though nothing reads it. The mysql.proc that
/// mariadb-install-db of 10.11.19 makes has one (page 56, in the source server's own file):
/// it stops the zero-fill with the backup's Aria log applied or not, and with
/// --zerofill-keep-lsn, --quick or --check first. Such a table is rebuilt from its rows
/// (`--recover`, whose scan skips unallocated zero pages) and zero-filled again, and only
/// if that provably kept every row: `--extend-check` passes before (every allocated page
/// and row is sound, so the stopping page held none) and after, and the row count is the
/// same. Anything else is refused: a table with damaged rows is not baked as if it were
/// the source's.
fn zerofill(
    tools: &Tools,
    datadir: &Path,
    control_dir: &Path,
    user: Option<(u32, u32)>,
) -> Result<Vec<String>> {
    let mut tables = Vec::new();
    for db in fs::read_dir(datadir).map_err(io("reading", datadir))? {
        let db = db.map_err(io("reading", datadir))?;
        if !db.file_type().map_err(io("reading", &db.path()))?.is_dir() {
            continue;
        }
        for f in fs::read_dir(db.path()).map_err(io("reading", &db.path()))? {
            let f = f.map_err(io("reading", &db.path()))?;
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(table) = name.strip_suffix(".MAI") {
                tables.push(format!("{}/{table}", db.file_name().to_string_lossy()));
            }
        }
    }
    tables.sort();
    let run = |args: &[&str], table: &str| -> Result<std::process::Output> {
        let mut cmd = Command::new(&tools.aria_chk);
        // --datadir: where its control file is; never the copy, which takes no Aria log.
        cmd.arg(format!("--datadir={}", control_dir.display()))
            .args(args)
            .arg(format!("{table}.MAI"))
            .current_dir(datadir)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        cmd.output().map_err(io("running", &tools.aria_chk))
    };
    let text = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let records = |table: &str| -> Result<u64> {
        let out = run(&["--description", "--verbose"], table)?;
        data_records(&text(&out)).ok_or_else(|| {
            err(
                format!("zero-filling the Aria table {table}"),
                format!("aria_chk --description gave no row count:\n{}", text(&out)),
            )
        })
    };
    let mut repaired = Vec::new();
    for table in &tables {
        let first = run(&["--zerofill"], table)?;
        if first.status.success() {
            continue;
        }
        let failed = |why: &str, out: &std::process::Output| {
            err(
                format!("zero-filling the Aria table {table}"),
                format!(
                    "{why}; aria_chk --zerofill said:\n{}\nthen:\n{}",
                    text(&first).trim(),
                    text(out).trim()
                ),
            )
        };
        let before = run(&["--extend-check"], table)?;
        if !before.status.success() {
            return Err(failed(
                "the table is damaged in the copy (aria_chk --extend-check fails), so it is not rebuilt: rows could be lost",
                &before,
            ));
        }
        let rows_before = records(table)?;
        for step in [&["--recover"][..], &["--zerofill"], &["--extend-check"]] {
            let out = run(step, table)?;
            if !out.status.success() {
                return Err(failed(&format!("aria_chk {} failed", step[0]), &out));
            }
        }
        let rows_after = records(table)?;
        if rows_after != rows_before {
            return Err(err(
                format!("zero-filling the Aria table {table}"),
                format!(
                    "rebuilding it kept {rows_after} of its {rows_before} rows; aria_chk --zerofill had said:\n{}",
                    text(&first).trim()
                ),
            ));
        }
        repaired.push(table.clone());
    }
    Ok(repaired)
}

/// The errors in ANALYZE TABLE's result (Table, Op, Msg_type, Msg_text), one per line.
fn analyze_errors(report: &[Vec<String>]) -> Option<String> {
    let errors: Vec<String> = report
        .iter()
        .filter(|r| r.get(2).is_some_and(|t| t.eq_ignore_ascii_case("error")))
        .map(|r| format!("{}: {}", r[0], r.get(3).map_or("", String::as_str)))
        .collect();
    (!errors.is_empty()).then(|| errors.join("\n"))
}

/// The row count in `aria_chk --description --verbose` output ("Data records:   53 ...").
fn data_records(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("Data records:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Where and how to take a snapshot.
pub struct Request<'a> {
    pub tools: &'a Tools,
    pub source: &'a Source,
    pub info: &'a SourceInfo,
    /// An existing private directory; the copy goes to `out_dir/mysql`.
    pub out_dir: &'a Path,
    pub taken_at: &'a str,
    pub durable: bool,
}

pub fn snapshot(req: &Request, progress: &mut dyn FnMut(&str)) -> Result<Snapshot> {
    let out_dir = &fs::canonicalize(req.out_dir).map_err(io("resolving", req.out_dir))?;
    let partial = out_dir.join(".mysql.partial");
    let _ = fs::remove_dir_all(&partial);
    // Socket, logs and Aria control file of the scratch server: a short private path (a
    // socket path has at most 107 bytes), removed at the end.
    let run_dir = std::env::temp_dir().join(format!(
        "bakedb-myrun.{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    let user = scratch_user()?;
    if let Some((uid, gid)) = user
        && let Some(blocked) = crate::postgres::unreachable_ancestor(out_dir, uid, gid)
    {
        use std::os::unix::fs::MetadataExt;
        return Err(err(
            "preparing the scratch server",
            format!(
                "bakedb runs as root, so the scratch server runs as the mysql user ({uid}:{gid}), which cannot enter {} (mode {:04o}); choose a directory it can reach, e.g. under /tmp or /var/tmp",
                blocked.display(),
                fs::metadata(&blocked).map_or(0, |m| m.mode() & 0o7777)
            ),
        ));
    }
    let result = (|| {
        fs::create_dir(&run_dir).map_err(io("creating", &run_dir))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&run_dir, Some(uid), Some(gid))
                .map_err(io("changing the owner of", &run_dir))?;
        }
        progress("mariadb-backup --backup");
        let mut backup = Command::new(&req.tools.backup);
        backup
            .arg(req.source.defaults_arg())
            .arg("--backup")
            .arg(format!("--target-dir={}", partial.display()));
        run_logged(
            backup,
            &run_dir.join("backup.log"),
            &format!("copying {} with mariadb-backup", req.source.redacted()),
        )?;
        let binlog_info = partial.join("xtrabackup_binlog_info");
        let position = match fs::read_to_string(&binlog_info) {
            Ok(text) => binlog_position(&text),
            Err(_) => json!(null),
        };
        let backup_cnf = partial.join("backup-my.cnf");
        progress("mariadb-backup --prepare");
        let mut prepare = Command::new(&req.tools.backup);
        prepare
            .arg(format!("--defaults-file={}", backup_cnf.display()))
            .arg("--prepare")
            .arg(format!("--target-dir={}", partial.display()));
        run_logged(
            prepare,
            &run_dir.join("prepare.log"),
            "preparing the copy with mariadb-backup",
        )?;
        let backup_options =
            options(&fs::read_to_string(&backup_cnf).map_err(io("reading", &backup_cnf))?);
        let layout: BTreeMap<String, String> = LAYOUT
            .iter()
            .filter_map(|k| Some(((*k).to_owned(), backup_options.get(*k)?.clone())))
            .collect();
        let removed = keep_only_data(&partial)?;
        if let Some((uid, gid)) = user {
            chown_tree(&partial, uid, gid)?;
        }

        // Zero-filled before the scratch server as well: the copy's Aria tables carry the
        // source's LSNs, which the scratch server's fresh Aria log takes for another system's,
        // and it would repair them as it opens them (aria_recover_options), unasked.
        progress("aria_chk --zerofill");
        let mut repaired = zerofill(req.tools, &partial, &run_dir, user)?;
        keep_only_data(&partial)?;

        progress("scratch server: ANALYZE TABLE");
        let scratch = Scratch::start(req.tools, &partial, &run_dir, &layout, user)?;
        let tables = scratch.query(
            "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN ('information_schema', 'performance_schema') ORDER BY 1, 2",
            "listing the copy's tables",
        )?;
        for chunk in tables.chunks(50) {
            let list: Vec<String> = chunk
                .iter()
                .map(|r| format!("{}.{}", ident(&r[0]), ident(&r[1])))
                .collect();
            let report = scratch.query(
                &format!("ANALYZE TABLE {}", list.join(", ")),
                "analyzing the copy's tables",
            )?;
            // The statement succeeds even when a table cannot be opened (marked as crashed,
            // say): its error is a row of the result, and such a table is not baked.
            if let Some(why) = analyze_errors(&report) {
                return Err(err(
                    "analyzing the copy's tables",
                    format!(
                        "{why}\nthe copy is the source's as mariadb-backup took it: check and repair the table on the source (CHECK TABLE, REPAIR TABLE, or mariadb-check --auto-repair), then bake again"
                    ),
                ));
            }
        }
        progress("scratch server: slow shutdown");
        scratch.slow_shutdown()?;
        keep_only_data(&partial)?;
        // ANALYZE wrote the scratch server's LSNs into the Aria tables it updated.
        progress("aria_chk --zerofill");
        repaired.extend(zerofill(req.tools, &partial, &run_dir, user)?);
        repaired.sort();
        repaired.dedup();
        // aria_chk must not have left a log or control file in the copy.
        keep_only_data(&partial)?;
        if req.durable {
            crate::datafiles::sync_tree(&partial)?;
        }
        let datadir = out_dir.join(DATADIR);
        fs::rename(&partial, &datadir).map_err(io("renaming", &partial))?;
        let (dirs, files) = collect(&datadir)?;
        let mut notes = req.info.notes.clone();
        if !repaired.is_empty() {
            notes.push(format!(
                "Aria tables {} were rebuilt by aria_chk --recover before their zero-fill, which an unallocated, never written (all-zero) data page stopped with a checksum error; every row was kept (aria_chk --extend-check before and after, the same row count)",
                repaired.join(", ")
            ));
        }
        let mut carried = req.info.carried.clone();
        carried.extend(layout.clone());
        carried.insert("innodb_log_file_size".into(), REDO_LOG_SIZE.into());
        let databases: Vec<String> = {
            let mut d: Vec<String> = tables.iter().map(|r| r[0].clone()).collect();
            d.dedup();
            d
        };
        Ok(Snapshot {
            engine: "mariadb",
            files,
            dirs,
            hashed: Default::default(),
            partial: false,
            provenance: json!({
                "source": req.source.redacted(),
                "taken_at": req.taken_at,
                "method": "mariadb-backup --backup and --prepare, then ANALYZE TABLE, a slow shutdown (innodb_fast_shutdown=0) and aria_chk --zerofill",
                "server_version": req.info.version,
                "series": req.info.series,
                "tools_version": req.tools.version,
                "source_datadir": req.info.datadir,
                "databases": databases,
                "position": position,
                "settings": carried,
                "requires": {"plugins": req.info.plugins},
                "removed": removed,
                "notes": notes,
            }),
        })
    })();
    let _ = fs::remove_dir_all(&run_dir);
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aria_row_count() {
        let described = "Aria file:           proc.MAI\nStatus:              changed\nPage checksums are used\nData records:                      53  Deleted blocks:                      0\nDatafile parts:                     0  Deleted data:                        0\n";
        assert_eq!(data_records(described), Some(53));
        assert_eq!(data_records("Data records:\n"), None);
        assert_eq!(data_records("aria_chk: error: 176"), None);
    }

    #[test]
    fn analyze_errors_name_the_table() {
        let row = |t: &str, kind: &str, text: &str| {
            [t, "analyze", kind, text].map(str::to_owned).to_vec()
        };
        let fine = [
            row("app.items", "status", "OK"),
            row(
                "app.log",
                "note",
                "The storage engine for the table doesn't support analyze",
            ),
        ];
        assert_eq!(analyze_errors(&fine), None);
        let crashed = [
            row("app.items", "status", "OK"),
            row(
                "app.hits",
                "Error",
                "Table './app/hits' is marked as crashed and should be repaired",
            ),
            row("app.hits", "error", "Corrupt"),
        ];
        assert_eq!(
            analyze_errors(&crashed).as_deref(),
            Some(
                "app.hits: Table './app/hits' is marked as crashed and should be repaired\napp.hits: Corrupt"
            )
        );
    }

    #[test]
    fn privileges() {
        let all =
            ["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION".to_owned()];
        assert!(missing_privileges(&all).is_empty());
        let enough = [
            "GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO `bak`@`%` IDENTIFIED BY PASSWORD '*X'".to_owned(),
        ];
        assert!(missing_privileges(&enough).is_empty());
        let select_only = [
            "GRANT USAGE ON *.* TO `app`@`%`".to_owned(),
            "GRANT ALL PRIVILEGES ON `app`.* TO `app`@`%`".to_owned(),
        ];
        assert_eq!(
            missing_privileges(&select_only),
            ["RELOAD", "PROCESS", "LOCK TABLES", "BINLOG MONITOR"]
        );
    }

    #[test]
    fn binlog_info_and_backup_options() {
        assert_eq!(
            binlog_position("binlog.000001\t1885\t0-1-9\n"),
            json!({"binlog_file": "binlog.000001", "binlog_position": 1885, "gtid": "0-1-9"})
        );
        assert_eq!(binlog_position(""), json!(null));
        let cnf = "# generated\n[mysqld]\ninnodb_page_size=16384\ninnodb_data_file_path=ibdata1:12M:autoextend\n";
        let o = options(cnf);
        assert_eq!(o["innodb_page_size"], "16384");
        assert_eq!(o["innodb_data_file_path"], "ibdata1:12M:autoextend");
    }

    #[test]
    fn only_data_stays() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "ibdata1",
            "ib_logfile0",
            "undo001",
            "aria_log.00000001",
            "aria_log_control",
            "backup-my.cnf",
            "xtrabackup_info",
            "xtrabackup_binlog_info",
            "ib_buffer_pool",
            "multi-master.info",
            "server-key.pem",
            "host.err",
        ] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        fs::create_dir(dir.path().join("app")).unwrap();
        fs::write(dir.path().join("app/t.ibd"), vec![0u8; 16384]).unwrap();
        fs::write(dir.path().join("app/t.frm"), b"frm").unwrap();
        let removed = keep_only_data(dir.path()).unwrap();
        assert_eq!(removed.len(), 9, "{removed:?}");
        let (dirs, files) = collect(dir.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.rel_path.as_str()).collect();
        assert_eq!(
            names,
            [
                "mysql/app/t.frm",
                "mysql/app/t.ibd",
                "mysql/ib_logfile0",
                "mysql/ibdata1",
                "mysql/undo001"
            ]
        );
        assert!(files.iter().all(|f| f.mode == FILE_MODE));
        assert_eq!(files[1].page_size, 16384);
        assert_eq!(dirs.len(), 2);
        assert!(dirs.iter().all(|d| d.mode == DIR_MODE));
    }
}
