//! The scratch server bakedb runs on the copy: crash recovery to the backup's end point,
//! then the fix-ups, ANALYZE, VACUUM (FREEZE) and a clean shutdown.
//!
//! It must never reach outside: no TCP listener (a private socket directory), no
//! replication (no WAL senders, no logical replication workers, so the apply workers of
//! the copy's subscriptions cannot start before they are dropped), no archiving, no
//! preload libraries (a pg_cron or pglogical of the source would run), and no configuration
//! of the source (its files are not in the copy; the settings here are on the command line).
//! Settings the copy itself needs follow the copy: WAL sizes from its segment size (a
//! cluster made with `initdb --wal-segsize=64` refuses to start with the default
//! min_wal_size), and the lock and prepared-transaction limits its pg_control records.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::source::{Rows, query};
use super::tools::{Tools, checked};
use super::{err, io};
use crate::Result;

/// The user the scratch server runs as: postgres refuses to run as root, so a root bakedb
/// hands the copy to the `postgres` user (uid, gid); otherwise None (bakedb's own user).
pub(crate) fn scratch_user() -> Result<Option<(u32, u32)>> {
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
pub(crate) fn unreachable_ancestor(dir: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
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

pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
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
pub(crate) struct Scratch<'a> {
    pub tools: &'a Tools,
    pub pgdata: PathBuf,
    pub run_dir: PathBuf,
    pub user: Option<(u32, u32)>,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Scratch<'_> {
    pub fn as_user(&self, mut cmd: Command) -> Command {
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

    /// Start postgres on the copy with `copy_needs` (settings the copy's pg_control asks
    /// for, see `settings_for`) and wait until it accepts connections.
    pub fn start(&mut self, copy_needs: &[String]) -> Result<()> {
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
            // Nothing reaches outside: no replication of any kind, no archiving, no
            // libraries of the source that could start background workers.
            "archive_mode=off".into(),
            "wal_level=minimal".into(),
            "max_wal_senders=0".into(),
            "max_logical_replication_workers=0".into(),
            "primary_conninfo=".into(),
            "restore_command=".into(),
            "shared_preload_libraries=".into(),
            "session_preload_libraries=".into(),
            "local_preload_libraries=".into(),
            "ssl=off".into(),
            // Tablespaces are baked in place (directories under pg_tblspc, see snapshot.rs);
            // the end of the backup's recovery refuses them without this.
            "allow_in_place_tablespaces=on".into(),
            "logging_collector=off".into(),
            "log_destination=stderr".into(),
            "maintenance_work_mem=256MB".into(),
            format!("external_pid_file={run}/postgres.pid"),
        ]
        .into_iter()
        .chain(copy_needs.iter().cloned())
        {
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

    /// A client tool connected to the scratch server as `user`. Per-role and per-database
    /// settings of the source (ALTER ROLE ... SET statement_timeout, a database that defaults
    /// to read-only transactions) must not stop the maintenance: PGOPTIONS resets them.
    pub fn client(&self, tool: &str, user: &str) -> Command {
        let mut cmd = self.tools.cmd(tool);
        cmd.env(
            "PGOPTIONS",
            "-c default_transaction_read_only=off -c standard_conforming_strings=on -c statement_timeout=0 -c lock_timeout=0 \
             -c idle_in_transaction_session_timeout=0",
        );
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

    /// Rows of `sql` in database `db`.
    pub fn query(&self, user: &str, db: &str, sql: &str) -> Result<Rows> {
        let mut cmd = self.client("psql", user);
        cmd.args(["-d", db]);
        query(self.tools, cmd, &format!("querying {db} on the copy"), sql)
    }

    /// Each statement in its own transaction (VACUUM FULL, ROLLBACK PREPARED and DROP
    /// SUBSCRIPTION refuse to run inside one), stopping at the first error.
    pub fn exec(&self, user: &str, db: &str, statements: &[String]) -> Result<()> {
        if statements.is_empty() {
            return Ok(());
        }
        let mut cmd = self.client("psql", user);
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db]);
        for s in statements {
            cmd.arg("-c").arg(s);
        }
        checked(
            &format!("changing database {db} of the copy"),
            cmd.output(),
            &self.tools.bin.join("psql"),
        )
        .map(drop)
    }

    pub fn psql(&self, user: &str, db: &str, sql: &str) -> Result<String> {
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
    pub fn stop(&mut self) -> Result<()> {
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

pub(crate) fn check_shut_down(control: &[(String, String)]) -> Result<()> {
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
pub(crate) fn controldata(tools: &Tools, pgdata: &Path) -> Result<Vec<(String, String)>> {
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

pub(crate) fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Settings the copy needs to start, from its pg_control: WAL sizes that fit its segment
/// size (min_wal_size must be at least two segments), and the lock and prepared
/// transaction limits the source ran with, so that the prepared transactions the copy
/// restores (and their locks) fit until they are rolled back.
pub(crate) fn settings_for(control: &[(String, String)]) -> Vec<String> {
    let number = |key: &str| lookup(control, key).and_then(|v| v.parse::<u64>().ok());
    let mut settings = Vec::new();
    if let Some(segment) = number("Bytes per WAL segment") {
        let mib = segment.div_ceil(1 << 20);
        settings.push(format!("min_wal_size={}MB", (2 * mib).max(80)));
        settings.push(format!("max_wal_size={}MB", (4 * mib).max(1024)));
    }
    for (key, setting) in [
        ("max_prepared_xacts setting", "max_prepared_transactions"),
        ("max_locks_per_xact setting", "max_locks_per_transaction"),
        ("max_connections setting", "max_connections"),
    ] {
        if let Some(n) = number(key).filter(|n| *n > 0) {
            settings.push(format!("{setting}={n}"));
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_gets_what_its_pg_control_needs() {
        let control: Vec<(String, String)> = [
            ("Bytes per WAL segment", "67108864"),
            ("max_prepared_xacts setting", "5"),
            ("max_locks_per_xact setting", "64"),
            ("max_connections setting", "100"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            settings_for(&control),
            [
                "min_wal_size=128MB",
                "max_wal_size=1024MB",
                "max_prepared_transactions=5",
                "max_locks_per_transaction=64",
                "max_connections=100"
            ]
        );
        let small = vec![("Bytes per WAL segment".to_owned(), "1048576".to_owned())];
        assert_eq!(
            settings_for(&small),
            ["min_wal_size=80MB", "max_wal_size=1024MB"]
        );
    }
}
