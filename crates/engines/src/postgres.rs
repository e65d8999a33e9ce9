//! PostgreSQL: a consistent physical snapshot of a live server, prepared so that the image
//! starts without recovery and without writing hint bits.
//!
//! `pg_basebackup` copies the cluster while the source keeps taking writes, with the WAL
//! needed to make the copy consistent at one point (the backup's end LSN). A scratch server
//! of the same major version then starts on the copy (crash recovery up to that point, on a
//! private socket, no TCP), runs `VACUUM (FREEZE, ANALYZE)` in every database so that no
//! query in the image ever has to set a hint bit or look up a transaction's status, takes a
//! CHECKPOINT and shuts down cleanly. What the server only needs while running (its pid and
//! options files, relcache init files, statistics, recycled WAL segments) is removed, so
//! the data directory holds exactly what a clean start reads.
//!
//! Physical backups only work between servers of one major version: the source, the tools
//! and the base image must agree, which is checked before anything is copied.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{DataDir, DataFile, Error, Result, Snapshot};

/// The cluster's directory under the image's data directory.
pub const PGDATA: &str = "pgdata";

fn err(step: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::Postgres {
        step: step.into(),
        detail: detail.into(),
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// A source connection string with any password replaced, fit for messages and image.json.
pub fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..].find(['/', '?']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest + colon + 1..rest + at, "***");
            }
        }
    }
    // password=... as a query parameter.
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k == "password" => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// Whether `source` is a PostgreSQL connection URI (what `--source` takes for a live server).
pub fn is_url(source: &str) -> bool {
    source.starts_with("postgresql://") || source.starts_with("postgres://")
}

/// The server tools bakedb runs: pg_basebackup, pg_resetwal, postgres, pg_ctl, pg_isready,
/// psql, vacuumdb and pg_controldata, all from one directory so their versions agree.
#[derive(Clone, Debug)]
pub struct Tools {
    pub bin: PathBuf,
    pub major: u32,
    /// `postgres --version`, e.g. "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    pub version: String,
}

const TOOLS: [&str; 8] = [
    "pg_basebackup",
    "pg_resetwal",
    "postgres",
    "pg_ctl",
    "pg_isready",
    "psql",
    "vacuumdb",
    "pg_controldata",
];

/// The major version in "postgres (PostgreSQL) 15.18 ..." or "16devel" or "9.6.24".
pub fn parse_major(version: &str) -> Option<u32> {
    let number = version
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = number.chars().take_while(char::is_ascii_digit).collect();
    let major: u32 = digits.parse().ok()?;
    if major < 10 {
        // 9.6: the first two numbers were the major version.
        let minor: String = number[digits.len()..]
            .trim_start_matches('.')
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return Some(major * 100 + minor.parse::<u32>().ok()?);
    }
    Some(major)
}

impl Tools {
    /// Find the tools: `--pg-bin DIR`, else the directory of `postgres` on PATH, else the
    /// Debian/Ubuntu (/usr/lib/postgresql/N/bin) and PGDG (/usr/pgsql-N/bin) locations of
    /// the wanted major version, whose server binaries are not on PATH.
    pub fn find(pg_bin: Option<&Path>, want_major: Option<u32>) -> Result<Tools> {
        let dir = match pg_bin {
            Some(dir) => dir.to_owned(),
            None => {
                let on_path = std::env::var_os("PATH")
                    .into_iter()
                    .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .map(|d| d.join("postgres"))
                    .find(|p| p.is_file())
                    .and_then(|p| fs::canonicalize(p).ok())
                    .and_then(|p| p.parent().map(Path::to_owned));
                let known = want_major.into_iter().flat_map(|m| {
                    [
                        PathBuf::from(format!("/usr/lib/postgresql/{m}/bin")),
                        PathBuf::from(format!("/usr/pgsql-{m}/bin")),
                    ]
                });
                let mut candidates: Vec<PathBuf> = on_path.into_iter().collect();
                // A postgres of the wrong major on PATH should not hide the right one.
                candidates.extend(known);
                let found = candidates.iter().find(|d| {
                    d.join("postgres").is_file()
                        && want_major.is_none_or(|m| {
                            version_of(&d.join("postgres"))
                                .ok()
                                .and_then(|v| parse_major(&v))
                                == Some(m)
                        })
                });
                match found.or(candidates.first()) {
                    Some(d) => d.clone(),
                    None => {
                        return Err(err(
                            "finding the PostgreSQL server tools",
                            format!(
                                "no `postgres` on PATH{}; install the server package of the base image's major version or pass --pg-bin DIR (e.g. /usr/lib/postgresql/15/bin)",
                                want_major
                                    .map(|m| format!(
                                        " nor in /usr/lib/postgresql/{m}/bin or /usr/pgsql-{m}/bin"
                                    ))
                                    .unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
        };
        for tool in TOOLS {
            if !dir.join(tool).is_file() {
                return Err(err(
                    "finding the PostgreSQL server tools",
                    format!(
                        "{} has no {tool}; pass --pg-bin with the directory that holds postgres, pg_basebackup, pg_ctl, pg_isready, psql, vacuumdb, pg_controldata and pg_resetwal of one version",
                        dir.display()
                    ),
                ));
            }
        }
        let version = version_of(&dir.join("postgres"))?;
        let major = parse_major(&version).ok_or_else(|| {
            err(
                "finding the PostgreSQL server tools",
                format!("cannot read a version in {version:?}"),
            )
        })?;
        if let Some(want) = want_major
            && want != major
        {
            return Err(err(
                "checking versions",
                format!(
                    "the server tools in {} are PostgreSQL {major}, the base image has PostgreSQL {want}; a data directory only starts under the major version that wrote it: pass --pg-bin with PostgreSQL {want}'s tools",
                    dir.display()
                ),
            ));
        }
        Ok(Tools {
            bin: dir,
            major,
            version,
        })
    }

    fn cmd(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        // Never let a user's service file, PGOPTIONS or the like change what the scratch
        // server or the backup does; the source's own settings come from the URL.
        cmd.env("PGAPPNAME", "bakedb").env_remove("PGOPTIONS");
        cmd
    }
}

fn version_of(postgres: &Path) -> Result<String> {
    let out = Command::new(postgres)
        .arg("--version")
        .output()
        .map_err(io("running", postgres))?;
    if !out.status.success() {
        return Err(err(
            format!("running {} --version", postgres.display()),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn checked(step: &str, out: std::io::Result<Output>, program: &Path) -> Result<String> {
    let out = out.map_err(io("running", program))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(err(step, stderr.trim().to_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the live source says about itself, read before anything is copied.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub major: u32,
    pub server_version: String,
    /// The bootstrap superuser (OID 10): VACUUM FREEZE of every table needs it.
    pub superuser: String,
}

/// Connect to the source and check it can be backed up by `tools`.
pub fn probe_source(tools: &Tools, url: &str) -> Result<SourceInfo> {
    if !is_url(url) {
        return Err(err(
            "checking --source",
            format!(
                "{:?} is not a PostgreSQL connection URI; pass postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (the user needs the REPLICATION attribute) or a directory written by `bakedb snapshot --engine postgres`",
                redact(url)
            ),
        ));
    }
    let psql = tools.bin.join("psql");
    let sql = "SELECT current_setting('server_version_num'), current_setting('server_version'), \
               (SELECT rolname FROM pg_roles WHERE oid = 10), \
               (SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global'))";
    let out = checked(
        &format!("connecting to {}", redact(url)),
        tools
            .cmd("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-F",
                "\t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output(),
        &psql,
    )?;
    let fields: Vec<&str> = out.trim().split('\t').collect();
    let [num, version, superuser, tablespaces] = fields[..] else {
        return Err(err(
            format!("querying {}", redact(url)),
            format!("unexpected answer {out:?}"),
        ));
    };
    let num: u32 = num
        .parse()
        .map_err(|_| err("querying the source", format!("server_version_num {num:?}")))?;
    let major = if num >= 100_000 {
        num / 10_000
    } else {
        num / 100
    };
    if major != tools.major {
        return Err(err(
            "checking versions",
            format!(
                "the source runs PostgreSQL {major} ({version}), the tools in {} are PostgreSQL {}; a physical base backup needs the tools, and a base image, of the source's major version",
                tools.bin.display(),
                tools.major
            ),
        ));
    }
    if tablespaces != "0" {
        return Err(err(
            "checking the source",
            format!(
                "{} uses {tablespaces} tablespace(s) outside the data directory; bakedb cannot bake tablespaces yet: move their tables to pg_default",
                redact(url)
            ),
        ));
    }
    Ok(SourceInfo {
        major,
        server_version: version.to_owned(),
        superuser: superuser.to_owned(),
    })
}

/// The user the scratch server runs as: postgres refuses to run as root, so a root bakedb
/// hands the copy to the `postgres` user (uid, gid); otherwise None (bakedb's own user).
fn scratch_user() -> Result<Option<(u32, u32)>> {
    let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == "postgres")
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .map(Some)
        .ok_or_else(|| {
            err(
                "preparing the scratch server",
                "bakedb runs as root, PostgreSQL refuses to, and this machine has no `postgres` user to run it as; run bakedb as an unprivileged user",
            )
        })
}

/// The first directory on the way to `dir` that `uid`:`gid` may not enter, if any.
fn unreachable_ancestor(dir: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    let dir = fs::canonicalize(dir).ok()?;
    dir.ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find_map(|d| {
            let m = fs::metadata(d).ok()?;
            let mode = m.mode();
            let ok = if m.uid() == uid {
                mode & 0o100 != 0
            } else if m.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            (!ok).then(|| d.to_owned())
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

/// A scratch server on the copy: no TCP, a private socket directory, killed if dropped
/// while running (a failed snapshot must not leave a postmaster behind).
struct Scratch<'a> {
    tools: &'a Tools,
    pgdata: PathBuf,
    run_dir: PathBuf,
    user: Option<(u32, u32)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Scratch<'_> {
    fn as_user(&self, mut cmd: Command) -> Command {
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid).env("HOME", &self.run_dir);
        }
        cmd
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn start(&mut self) -> Result<()> {
        let log = fs::File::create(&self.log).map_err(io("creating", &self.log))?;
        let mut cmd = self.as_user(self.tools.cmd("postgres"));
        let run = self.run_dir.display().to_string();
        cmd.arg("-D").arg(&self.pgdata);
        for setting in [
            format!("config_file={run}/postgresql.conf"),
            format!("hba_file={run}/pg_hba.conf"),
            format!("ident_file={run}/pg_ident.conf"),
            "listen_addresses=".into(),
            format!("unix_socket_directories={run}"),
            "port=5432".into(),
            // The copy is private until the snapshot is complete and is synced at the end
            // if it has to be durable: no need for PostgreSQL's own fsyncs meanwhile.
            "fsync=off".into(),
            "full_page_writes=off".into(),
            "autovacuum=off".into(),
            "archive_mode=off".into(),
            "logging_collector=off".into(),
            "log_destination=stderr".into(),
            "maintenance_work_mem=256MB".into(),
            format!("external_pid_file={run}/postgres.pid"),
        ] {
            cmd.arg("-c").arg(setting);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("opening", &self.log))?)
            .stderr(log)
            .spawn()
            .map_err(io("starting", &self.tools.bin.join("postgres")))?;
        self.child = Some(child);
        // Crash recovery replays the WAL the backup streamed: seconds for a quiet source,
        // longer for a busy one. Readiness is PostgreSQL's own answer, not a guess.
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("started")
                .try_wait()
                .map_err(io("waiting for", &self.tools.bin.join("postgres")))?
            {
                self.child = None;
                return Err(err(
                    "starting a scratch server on the copy",
                    format!("postgres exited with {status}:\n{}", self.log_tail()),
                ));
            }
            let ready = self
                .tools
                .cmd("pg_isready")
                .args(["-q", "-h", &run, "-p", "5432"])
                .status()
                .map_err(io("running", &self.tools.bin.join("pg_isready")))?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(
                    "starting a scratch server on the copy",
                    format!("not ready after an hour:\n{}", self.log_tail()),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn client(&self, tool: &str, user: &str) -> Command {
        let mut cmd = self.tools.cmd(tool);
        cmd.args([
            "-h",
            &self.run_dir.display().to_string(),
            "-p",
            "5432",
            "-U",
            user,
        ])
        .env("PGCONNECT_TIMEOUT", "30")
        .stdin(Stdio::null());
        cmd
    }

    fn psql(&self, user: &str, db: &str, sql: &str) -> Result<String> {
        checked(
            &format!("running {sql:?} on the copy"),
            self.client("psql", user)
                .args([
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    db,
                    "-c",
                    sql,
                ])
                .output(),
            &self.tools.bin.join("psql"),
        )
    }

    /// Fast shutdown (a shutdown checkpoint, then exit), waiting for it.
    fn stop(&mut self) -> Result<()> {
        let out = self
            .as_user(self.tools.cmd("pg_ctl"))
            .args(["stop", "-m", "fast", "-w", "-t", "600", "-D"])
            .arg(&self.pgdata)
            .stdin(Stdio::null())
            .output();
        checked(
            "stopping the scratch server",
            out,
            &self.tools.bin.join("pg_ctl"),
        )
        .map_err(|e| {
            err(
                "stopping the scratch server",
                format!("{e}\n{}", self.log_tail()),
            )
        })?;
        if let Some(mut child) = self.child.take() {
            child
                .wait()
                .map_err(io("waiting for", &self.tools.bin.join("postgres")))?;
        }
        Ok(())
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn check_shut_down(control: &[(String, String)]) -> Result<()> {
    let state = lookup(control, "Database cluster state").unwrap_or("?");
    if state != "shut down" {
        return Err(err(
            "checking the copy",
            format!("pg_control says the cluster is {state:?}, not \"shut down\""),
        ));
    }
    Ok(())
}

/// `pg_controldata`'s "key: value" lines.
fn controldata(tools: &Tools, pgdata: &Path) -> Result<Vec<(String, String)>> {
    let out = checked(
        "reading the copy's pg_control",
        tools
            .cmd("pg_controldata")
            .arg(pgdata)
            .env("LC_ALL", "C")
            .output(),
        &tools.bin.join("pg_controldata"),
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Remove what a clean start does not read: files a running server recreates, and WAL
/// segments other than the one holding the shutdown checkpoint (recycled segments are up
/// to min_wal_size of preallocated garbage in every image).
fn trim(pgdata: &Path, redo_wal_file: &str) -> Result<()> {
    let remove = |p: PathBuf| -> Result<()> {
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &p)(e)),
        }
    };
    for f in [
        "postmaster.opts",
        "postmaster.pid",
        "backup_label.old",
        "tablespace_map.old",
        "backup_manifest",
        "global/pg_internal.init",
        "current_logfiles",
    ] {
        remove(pgdata.join(f))?;
    }
    let base = pgdata.join("base");
    for db in fs::read_dir(&base).map_err(io("reading", &base))? {
        remove(
            db.map_err(io("reading", &base))?
                .path()
                .join("pg_internal.init"),
        )?;
    }
    for dir in ["pg_stat", "pg_stat_tmp", "pg_wal/archive_status"] {
        let d = pgdata.join(dir);
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries {
                remove(e.map_err(io("reading", &d))?.path())?;
            }
        }
    }
    let wal = pgdata.join("pg_wal");
    for e in fs::read_dir(&wal).map_err(io("reading", &wal))? {
        let e = e.map_err(io("reading", &wal))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_segment = name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit());
        if is_segment && name != redo_wal_file {
            remove(e.path())?;
        }
    }
    Ok(())
}

/// Every directory and regular file under `pgdata`, as they go into the image under
/// `pgdata/`. A symbolic link (a tablespace, a relocated pg_wal) is refused.
pub fn collect(pgdata: &Path) -> Result<(Vec<DataDir>, Vec<DataFile>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![(pgdata.to_owned(), PGDATA.to_owned())];
    while let Some((dir, rel)) = stack.pop() {
        let meta = fs::symlink_metadata(&dir).map_err(io("reading", &dir))?;
        dirs.push(DataDir {
            rel_path: rel.clone(),
            mode: meta.permissions().mode() & 0o7777,
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
                files.push(DataFile {
                    rel_path: child_rel,
                    host_path: path,
                    mode: meta.permissions().mode() & 0o7777,
                });
            } else {
                return Err(err(
                    "collecting the data directory",
                    format!(
                        "{} is not a regular file or directory (a tablespace or a relocated pg_wal?); bakedb bakes self-contained data directories only",
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

/// Snapshot the live server at `url` into `out_dir/pgdata`, ready to bake. `out_dir` must
/// exist; the data directory appears there only once it is complete.
pub fn snapshot(
    tools: &Tools,
    source: &SourceInfo,
    url: &str,
    out_dir: &Path,
    taken_at: &str,
    durable: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Snapshot> {
    let partial = out_dir.join(".pgdata.partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io("removing", &partial))?;
    }
    // Sockets, config and log of the scratch server: short path (a socket path has at most
    // 107 bytes), private, removed at the end.
    let run_dir = std::env::temp_dir().join(format!(
        "bakedb-pgrun.{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    let user = scratch_user()?;
    if let Some((uid, gid)) = user
        && let Some(blocked) = unreachable_ancestor(out_dir, uid, gid)
    {
        return Err(err(
            "preparing the scratch server",
            format!(
                "bakedb runs as root, so the scratch server runs as the postgres user ({uid}:{gid}), which cannot enter {} (mode {:04o}); choose a directory it can reach, e.g. under /tmp or /var/tmp",
                blocked.display(),
                fs::metadata(&blocked).map_or(0, |m| m.mode() & 0o7777)
            ),
        ));
    }
    let result = (|| {
        fs::create_dir(&run_dir).map_err(io("creating", &run_dir))?;
        fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700))
            .map_err(io("setting the mode of", &run_dir))?;

        progress("pg_basebackup");
        let basebackup = tools.bin.join("pg_basebackup");
        let mut cmd = tools.cmd("pg_basebackup");
        cmd.arg("-d")
            .arg(url)
            .arg("-D")
            .arg(&partial)
            .args([
                "-F",
                "p",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-manifest",
                "-v",
            ])
            .args(["-l", "bakedb snapshot"])
            .stdin(Stdio::null());
        if !durable {
            cmd.arg("--no-sync");
        }
        let out = cmd.output().map_err(io("running", &basebackup))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(err(
                format!("pg_basebackup from {}", redact(url)),
                format!(
                    "{}\n(the user in the URL needs the REPLICATION attribute and a `replication` line in the source's pg_hba.conf)",
                    log.trim()
                ),
            ));
        }
        let point = |what: &str| {
            log.lines()
                .find_map(|l| l.split_once(what).map(|(_, r)| r.trim().to_owned()))
        };
        let start = point("write-ahead log start point:").unwrap_or_default();
        let end_lsn = point("write-ahead log end point:").ok_or_else(|| {
            err(
                "pg_basebackup",
                format!("no end point in its output:\n{log}"),
            )
        })?;
        let (start_lsn, timeline) = match start.split_once(" on timeline ") {
            Some((lsn, tl)) => (lsn.to_owned(), tl.trim().parse::<u64>().ok()),
            None => (start, None),
        };

        // The source's own clock when the backup started (backup_label is renamed by the
        // recovery below).
        let label = fs::read_to_string(partial.join("backup_label")).unwrap_or_default();
        let source_time = label
            .lines()
            .find_map(|l| l.strip_prefix("START TIME:"))
            .map(|t| t.trim().to_owned());
        for (name, content) in [
            (
                "postgresql.conf",
                "# bakedb scratch server: settings are on the command line\n",
            ),
            ("pg_hba.conf", "local all all trust\n"),
            ("pg_ident.conf", ""),
        ] {
            let p = run_dir.join(name);
            fs::write(&p, content).map_err(io("writing", &p))?;
        }
        if let Some((uid, gid)) = user {
            chown_tree(&partial, uid, gid)?;
            chown_tree(&run_dir, uid, gid)?;
        }
        let mut server = Scratch {
            tools,
            pgdata: partial.clone(),
            run_dir: run_dir.clone(),
            user,
            child: None,
            log: run_dir.join("postgres.log"),
        };
        progress("recovery to the backup's end point");
        server.start()?;
        // ANALYZE everything first, then VACUUM (FREEZE) everything: `VACUUM (FREEZE,
        // ANALYZE)` analyses each table after vacuuming it, so the pg_statistic rows it
        // writes stay unfrozen and the first query planned in every replica sets their hint
        // bits, dirtying catalog pages that are written back at shutdown.
        let jobs = std::thread::available_parallelism().map_or(1, usize::from);
        for (step, flag) in [
            ("ANALYZE", "--analyze-only"),
            ("VACUUM (FREEZE)", "--freeze"),
        ] {
            progress(step);
            checked(
                &format!("{step} on the copy"),
                server
                    .client("vacuumdb", &source.superuser)
                    .args(["--all", flag, "--quiet"])
                    .arg(format!("--jobs={jobs}"))
                    .output(),
                &tools.bin.join("vacuumdb"),
            )?;
        }
        let databases = server.psql(
            &source.superuser,
            "postgres",
            "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database WHERE datallowconn",
        );
        // The maintenance database may have been dropped; the list is only informational.
        let databases: Vec<String> = databases
            .map(|s| {
                s.trim()
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        server.psql(&source.superuser, "template1", "CHECKPOINT")?;
        progress("clean shutdown");
        server.stop()?;

        let mut control = controldata(tools, &partial)?;
        check_shut_down(&control)?;
        // A clean start reads one WAL segment, the one with the shutdown checkpoint, and
        // opens it read-write: 16 MiB in every image and, on overlayfs, copied up in every
        // replica. pg_resetwal on a cleanly shut down cluster rewrites the WAL in 1 MiB
        // segments (its documented use of --wal-segsize); it needs nothing from the old WAL.
        if lookup(&control, "Bytes per WAL segment") != Some("1048576") {
            progress("pg_resetwal --wal-segsize=1");
            checked(
                "rewriting the copy's WAL in 1 MiB segments",
                server
                    .as_user(tools.cmd("pg_resetwal"))
                    .args(["--wal-segsize=1", "-D"])
                    .arg(&partial)
                    .stdin(Stdio::null())
                    .output(),
                &tools.bin.join("pg_resetwal"),
            )?;
            control = controldata(tools, &partial)?;
            check_shut_down(&control)?;
        }
        let redo_file = lookup(&control, "Latest checkpoint's REDO WAL file")
            .ok_or_else(|| err("checking the copy", "pg_controldata shows no REDO WAL file"))?
            .to_owned();
        trim(&partial, &redo_file)?;
        if durable {
            sync_tree(&partial)?;
        }
        let final_dir = out_dir.join(PGDATA);
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(io("removing", &final_dir))?;
        }
        fs::rename(&partial, &final_dir).map_err(io("renaming", &final_dir))?;
        let (dirs, files) = collect(&final_dir)?;
        Ok(Snapshot {
            engine: "postgres",
            files,
            dirs,
            provenance: json!({
                "source": redact(url),
                "taken_at": taken_at,
                "method": "pg_basebackup, then ANALYZE, VACUUM (FREEZE), CHECKPOINT and a clean shutdown",
                "server_version": source.server_version,
                "major": source.major,
                "databases": databases,
                "position": {
                    "lsn": end_lsn,
                    "start_lsn": start_lsn,
                    "start_time": source_time,
                    "timeline": timeline,
                    "system_identifier": lookup(&control, "Database system identifier"),
                    "checkpoint_lsn": lookup(&control, "Latest checkpoint location"),
                },
            }),
        })
    })();
    let _ = fs::remove_dir_all(&run_dir);
    if result.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    result
}

fn sync_tree(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(io("reading", path))?;
    if meta.is_dir() {
        for e in fs::read_dir(path).map_err(io("reading", path))? {
            sync_tree(&e.map_err(io("reading", path))?.path())?;
        }
    }
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("syncing", path))
}

/// The major version a data directory was written by (its PG_VERSION file).
pub fn data_major(pgdata: &Path) -> Result<u32> {
    let p = pgdata.join("PG_VERSION");
    let text = fs::read_to_string(&p).map_err(io("reading", &p))?;
    parse_major(text.trim()).ok_or_else(|| {
        err(
            format!("reading {}", p.display()),
            format!("{text:?} is not a version"),
        )
    })
}

/// The read-only profile bakedb-init applies when the image runs `postgres`:
///
/// - on the command line, so neither the config file nor postgresql.auto.conf in the data
///   directory can undo them (a later `-c` in the container's own command still can):
///   default_transaction_read_only, no fsync, no synchronous commit, no full-page writes, no
///   autovacuum; socket and extra pid file in /tmp, listen on all addresses, log to stderr;
/// - config, hba and ident files generated into the runtime directory, never the data
///   directory: local connections are trusted (inside the container only, as in the
///   official image), TCP connections need the role's password from the source;
/// - `verify` "first-start": PostgreSQL writes into its data directory (pg_control, WAL,
///   postmaster.pid) even when nothing else changes, so a restart of the same container
///   would no longer match image.json; init verifies at the container's first start only.
///
/// `preload`: the lazy copy-up library to put in LD_PRELOAD (see crates/copyup-shim).
pub fn profile(preload: Option<&str>) -> serde_json::Value {
    let mut args = vec!["-D".to_owned(), format!("{{data_dir}}/{PGDATA}")];
    for setting in [
        "config_file={runtime_dir}/postgresql.conf",
        "hba_file={runtime_dir}/pg_hba.conf",
        "ident_file={runtime_dir}/pg_ident.conf",
        "default_transaction_read_only=on",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        "autovacuum=off",
        // A replica never streams or archives; at wal_level=replica the first start would
        // log a parameter change (pg_resetwal leaves "minimal" in pg_control) and so write,
        // and copy up, the WAL segment at start rather than only at shutdown.
        "wal_level=minimal",
        "max_wal_senders=0",
        "listen_addresses=*",
        "unix_socket_directories=/tmp",
        "external_pid_file=/tmp/postgresql.pid",
        "logging_collector=off",
        "log_destination=stderr",
    ] {
        args.push("-c".into());
        args.push(setting.into());
    }
    let mut env = serde_json::Map::new();
    if let Some(library) = preload {
        env.insert("LD_PRELOAD".into(), json!(library));
    }
    json!({
        "name": "postgres-readonly",
        "command": "postgres",
        "args": args,
        "env": env,
        "verify": "first-start",
        "files": [
            {"name": "postgresql.conf", "mode": "0600", "content":
                "# Written by bakedb-init from /etc/bakedb/image.json (profile postgres-readonly).\n\
                 # The read-only settings are on postgres's command line, where neither this file nor\n\
                 # postgresql.auto.conf can undo them; `postgres -c name=value` in the container's\n\
                 # command adds or overrides settings.\n"},
            {"name": "pg_hba.conf", "mode": "0600", "content":
                "# bakedb read-only replica. Roles and passwords are the source's.\n\
                 local all all trust\n\
                 host all all all scram-sha-256\n"},
            {"name": "pg_ident.conf", "mode": "0600", "content": ""},
        ],
    })
}

/// Read `snapshot.json` and the data directory of a directory written by `bakedb snapshot`.
pub fn load_snapshot_dir(dir: &Path) -> Result<(Snapshot, u32)> {
    let meta_path = dir.join("snapshot.json");
    let bytes = fs::read(&meta_path).map_err(io("reading", &meta_path))?;
    let meta: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Source {
        path: meta_path.clone(),
        reason: format!("is not valid JSON: {e}"),
    })?;
    if meta["engine"] != "postgres" {
        return Err(Error::Source {
            path: meta_path,
            reason: format!("records engine {}, not postgres", meta["engine"]),
        });
    }
    let pgdata = dir.join(PGDATA);
    let major = data_major(&pgdata)?;
    if pgdata.join("postmaster.pid").exists() {
        return Err(Error::Source {
            path: pgdata,
            reason: "has a postmaster.pid: a server is running on it or it was not shut down cleanly; take a new snapshot".into(),
        });
    }
    let (dirs, files) = collect(&pgdata)?;
    Ok((
        Snapshot {
            engine: "postgres",
            files,
            dirs,
            provenance: meta["provenance"].clone(),
        },
        major,
    ))
}

pub fn write_snapshot_meta(dir: &Path, snapshot: &Snapshot) -> Result<()> {
    let meta = json!({"engine": "postgres", "data": PGDATA, "provenance": snapshot.provenance});
    let path = dir.join("snapshot.json");
    let tmp = dir.join(".snapshot.json.partial");
    fs::write(&tmp, serde_json::to_vec_pretty(&meta).expect("json"))
        .map_err(io("writing", &tmp))?;
    fs::rename(&tmp, &path).map_err(io("renaming", &path))
}

/// The base image's PostgreSQL major version, from the PG_MAJOR (or PG_VERSION) variable
/// that the official images set in their config.
pub fn base_major(config: &serde_json::Value) -> Option<u32> {
    let env = config.get("config")?.get("Env")?.as_array()?;
    let var = |name: &str| {
        env.iter().filter_map(|v| v.as_str()).find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        })
    };
    var("PG_MAJOR")
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| var("PG_VERSION").and_then(|v| parse_major(&v)))
}

/// uid and gid of `postgres` in an /etc/passwd.
pub fn passwd_user(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("15.18-0+deb12u1"), Some(15));
        assert_eq!(parse_major("16devel"), Some(16));
        assert_eq!(parse_major("postgres (PostgreSQL) 9.6.24"), Some(906));
        assert_eq!(parse_major("15"), Some(15));
        assert_eq!(parse_major("no digits"), None);
        let cfg =
            json!({"config": {"Env": ["PATH=/bin", "PG_MAJOR=16", "PG_VERSION=16.4-1.pgdg120+1"]}});
        assert_eq!(base_major(&cfg), Some(16));
        let cfg = json!({"config": {"Env": ["PG_VERSION=14.2"]}});
        assert_eq!(base_major(&cfg), Some(14));
        assert_eq!(base_major(&json!({"config": {}})), None);
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgresql://app:s3cr@t@db.example:5432/app?sslmode=require"),
            "postgresql://app:***@db.example:5432/app?sslmode=require"
        );
        assert_eq!(
            redact("postgresql://app@host/db"),
            "postgresql://app@host/db"
        );
        assert_eq!(
            redact("postgres://host/db?user=a&password=b&x=1"),
            "postgres://host/db?user=a&password=***&x=1"
        );
        assert!(is_url("postgres://h/d") && !is_url("/var/lib/x"));
    }

    #[test]
    fn passwd_lookup() {
        let p = "root:x:0:0::/root:/bin/sh\npostgres:x:999:998::/var/lib/postgresql:/bin/sh\n";
        assert_eq!(passwd_user(p, "postgres"), Some((999, 998)));
        assert_eq!(passwd_user(p, "mysql"), None);
    }

    #[test]
    fn trim_keeps_the_redo_segment_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in [
            "base/1",
            "base/5",
            "global",
            "pg_stat",
            "pg_wal/archive_status",
        ] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        for f in [
            "postmaster.opts",
            "global/pg_internal.init",
            "global/pg_control",
            "base/5/pg_internal.init",
            "base/5/1259",
            "pg_stat/pgstat.stat",
            "pg_wal/000000010000000000000003",
            "pg_wal/000000010000000000000004",
            "pg_wal/00000002.history",
            "pg_wal/archive_status/000000010000000000000003.done",
        ] {
            fs::write(d.join(f), b"x").unwrap();
        }
        trim(d, "000000010000000000000003").unwrap();
        let (dirs, files) = collect(d).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.rel_path.as_str()).collect();
        assert_eq!(
            names,
            [
                "pgdata/base/5/1259",
                "pgdata/global/pg_control",
                "pgdata/pg_wal/000000010000000000000003",
                "pgdata/pg_wal/00000002.history",
            ]
        );
        assert!(
            dirs.iter().any(|d| d.rel_path == "pgdata/pg_stat"),
            "empty dirs are kept"
        );
        assert!(dirs.iter().any(|d| d.rel_path == "pgdata"));
        std::os::unix::fs::symlink("/elsewhere", d.join("pg_tblspc")).unwrap();
        let e = collect(d).unwrap_err().to_string();
        assert!(e.contains("tablespace"), "{e}");
    }
}
