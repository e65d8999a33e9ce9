//! Finding the PostgreSQL server tools and running them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{io, parse_major};
use crate::Error;

/// The tools are bakedb's own prerequisites, named by --pg-bin: a usage error.
fn err(step: impl Into<String>, detail: impl Into<String>) -> Error {
    let step = step.into();
    Error::Usage {
        step: if step.is_empty() {
            "finding the PostgreSQL server tools".into()
        } else {
            step
        },
        detail: detail.into(),
    }
}
use crate::Result;

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
                            "",
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
                    "",
                    format!(
                        "{} has no {tool}; pass --pg-bin with the directory that holds postgres, pg_basebackup, pg_ctl, pg_isready, psql, vacuumdb, pg_controldata and pg_resetwal of one version",
                        dir.display()
                    ),
                ));
            }
        }
        let version = version_of(&dir.join("postgres"))?;
        let major = parse_major(&version)
            .ok_or_else(|| err("", format!("cannot read a version in {version:?}")))?;
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

    pub(crate) fn cmd(&self, tool: &str) -> Command {
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

pub(crate) fn checked(step: &str, out: std::io::Result<Output>, program: &Path) -> Result<String> {
    let out = out.map_err(io("running", program))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(super::err(step, stderr.trim().to_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
