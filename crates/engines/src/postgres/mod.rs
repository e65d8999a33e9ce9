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

mod conn;
mod engine;
mod image;
mod scratch;
mod settings;
mod snapshot;
mod source;
mod tools;

use std::path::Path;

pub use conn::{Source, is_url, redact};
pub use engine::Postgres;
pub(crate) use image::passwd_user;
pub use image::{
    Base, Fit, data_major, load_snapshot_dir, profile, wants_base_file, write_snapshot_meta,
};
pub(crate) use scratch::unreachable_ancestor;
pub use snapshot::{Request, collect, snapshot};
pub use source::{ACCEPT_VALUES, Accept, Findings, SourceInfo, probe_source};
pub use tools::Tools;

use crate::Error;

/// The cluster's directory under the image's data directory.
pub const PGDATA: &str = "pgdata";

pub(crate) fn err(step: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::Postgres {
        step: step.into(),
        detail: detail.into(),
    }
}

pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

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
    }
}
