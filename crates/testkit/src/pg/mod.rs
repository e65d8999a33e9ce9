//! Live PostgreSQL servers for the tests that snapshot one and for `cargo xtask bench
//! postgres`: initdb into a directory of the caller's, the postmaster as a child process the
//! caller owns (stopped by Drop, also on a panic), a deterministic seed database, standbys,
//! restarts with other settings, and a write load that keeps committing while a snapshot is
//! taken.
//!
//! The server tools come from BAKEDB_TEST_PG_BIN, else the newest /usr/lib/postgresql/N/bin
//! (Debian's postgresql-N); a bench names the directory of the major version it needs.
//! Missing tools skip a test locally and fail it under CI=true, like any other missing tool.
//! PostgreSQL refuses to run as root, and CI runs as root: then initdb, postgres and
//! pg_basebackup run as the `postgres` user (uid and gid from /etc/passwd), the data and
//! socket directories are chowned to it, and the directory gets o+x so that user can reach
//! them. Clients (psql, pg_isready, the write load) run as this process and connect over TCP
//! to 127.0.0.1, where pg_hba.conf trusts everyone, replication included.
//!
//! One server per test, a local of the test function declared after the test directory (so it
//! is dropped, and stopped, before the directory is removed): a server kept in a static would
//! never be dropped and would outlive the test process.

mod server;
mod write_load;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use server::{Launch, PgOptions, PgServer, initdb};
pub use write_load::WriteLoad;

/// For the servers' clients: a port that was free a moment ago.
pub use crate::ports::free_port;

use crate::Error;
use crate::tools::{is_root, skip};

/// The tools a server directory must have; the client tools come from the same directory
/// (Debian's postgresql-N depends on postgresql-client-N, which installs them there).
const TOOLS: [&str; 5] = ["initdb", "postgres", "pg_ctl", "psql", "pg_isready"];

/// How long the server may take to accept connections after it was started.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the postmaster is killed: a bench's source holds
/// a large database, whose shutdown checkpoint takes a while.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// Between two readiness polls.
const POLL: Duration = Duration::from_millis(25);

/// psql's arguments for a script's answer: no psqlrc, quiet, unaligned tuples only, stop at
/// the first error.
pub const PSQL_ARGS: [&str; 6] = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"];

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
        skip(
            &format!(
                "PostgreSQL is not installed: no server tools ({}) in BAKEDB_TEST_PG_BIN or /usr/lib/postgresql/N/bin",
                TOOLS.join(", ")
            ),
            ".ci/run must install postgresql-15",
        );
    }
    found
}

/// A command for a PostgreSQL tool with none of the variables that would change what it does
/// silently: PG* (PGHOST, PGDATABASE, PGSERVICE...), a preload library, the copy-up shim's
/// switches. The caller sets what it means.
pub fn pg_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let name = k.as_encoded_bytes();
        if name.starts_with(b"PG")
            || name.starts_with(b"BAKEDB_COPYUP_SHIM")
            || name == b"LD_PRELOAD"
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Who runs the server tools: this process, or (when it is root) the `postgres` user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunAs {
    Me,
    User { uid: u32, gid: u32 },
}

impl RunAs {
    /// This process, unless it is root: then the `postgres` user of /etc/passwd.
    pub fn postgres() -> Result<RunAs, Error> {
        if !is_root() {
            return Ok(RunAs::Me);
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        passwd
            .lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() >= 4 && f[0] == "postgres" {
                    Some(RunAs::User {
                        uid: f[2].parse().ok()?,
                        gid: f[3].parse().ok()?,
                    })
                } else {
                    None
                }
            })
            .ok_or(Error::NoPostgresUser)
    }

    /// As `postgres`, for a test: None skips it locally (root, but no postgres user); under
    /// CI that fails.
    pub fn detect() -> Option<RunAs> {
        match RunAs::postgres() {
            Ok(run_as) => Some(run_as),
            Err(e) => {
                skip(
                    &e.to_string(),
                    ".ci/run must install postgresql-15, which creates it",
                );
                None
            }
        }
    }

    /// Run `cmd` as this user.
    pub fn apply(self, cmd: &mut Command) {
        if let RunAs::User { uid, gid } = self {
            // std drops the supplementary groups too (setgroups(0)) when it sets the uid.
            cmd.uid(uid).gid(gid);
        }
    }

    /// Give `path` to this user.
    pub fn own(self, path: &Path) -> Result<(), Error> {
        if let RunAs::User { uid, gid } = self {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(Error::io(path))?;
        }
        Ok(())
    }

    /// Make `dir` reachable by this user: o+x on `dir` itself (a tempdir is 0700), and an
    /// error naming the ancestor this process does not own the mode of that blocks it.
    pub fn reach(self, dir: &Path) -> Result<(), Error> {
        let RunAs::User { uid, gid } = self else {
            return Ok(());
        };
        let mode = fs::metadata(dir)
            .map_err(Error::io(dir))?
            .permissions()
            .mode();
        fs::set_permissions(dir, fs::Permissions::from_mode((mode | 0o011) & 0o7777))
            .map_err(Error::io(dir))?;
        for ancestor in dir.ancestors().skip(1) {
            let m = fs::metadata(ancestor).map_err(Error::io(ancestor))?;
            let ok = m.mode() & 0o001 != 0
                || (m.uid() == uid && m.mode() & 0o100 != 0)
                || (m.gid() == gid && m.mode() & 0o010 != 0);
            if !ok {
                return Err(Error::Unreachable {
                    ancestor: ancestor.to_owned(),
                    mode: m.mode() & 0o7777,
                    uid,
                    dir: dir.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// A directory for the server: created with `mode` and given to this user.
    pub fn create_dir(self, dir: &Path, mode: u32) -> Result<(), Error> {
        fs::create_dir(dir).map_err(Error::io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(Error::io(dir))?;
        self.own(dir)
    }
}
