//! What can go wrong in a harness that a bench reports instead of panicking.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// A program ran and failed; `output` holds its stderr (and stdout, when it said more).
    #[error("{command} failed ({status}):\n{output}")]
    Failed {
        command: String,
        status: ExitStatus,
        output: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "running as root, PostgreSQL refuses to, and /etc/passwd has no postgres user to run it as (installing postgresql-15 creates it)"
    )]
    NoPostgresUser,
    #[error(
        "{} (mode {mode:o}) is not traversable by the postgres user (uid {uid}), so the server cannot reach {}: use a directory below one it can search (TMPDIR for the tests, CARGO_TARGET_DIR for the benches)",
        ancestor.display(),
        dir.display()
    )]
    Unreachable {
        ancestor: PathBuf,
        mode: u32,
        uid: u32,
        dir: PathBuf,
    },
    #[error(
        "{} is too long a path for PostgreSQL's Unix socket ({len} > 107 bytes): use a shorter directory",
        path.display()
    )]
    SocketPath { path: PathBuf, len: usize },
    #[error("PostgreSQL did not start: {why}\n--- {}:\n{text}", log.display())]
    NotStarted {
        why: String,
        log: PathBuf,
        text: String,
    },
    #[error("postgres (pid {pid}) ignored a fast shutdown for {patience:?}; killed it ({})", log.display())]
    StopTimedOut {
        pid: u32,
        patience: Duration,
        log: PathBuf,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// The value, or a panic with the error: the tests' side of a harness that benches share.
pub(crate) fn or_panic<T>(result: Result<T, Error>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}
