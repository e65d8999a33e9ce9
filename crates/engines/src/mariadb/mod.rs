//! MariaDB: a consistent physical snapshot of a live server, prepared so that the image
//! starts strictly read-only and writes nothing under its data directory.
//!
//! `mariadb-backup --backup` copies the server's data directory while it keeps taking
//! writes (InnoDB pages plus the redo written meanwhile; Aria, MyISAM and the .frm files
//! under a short BACKUP STAGE lock), and records the binlog file, position and GTID of that
//! point; `--prepare` applies the redo so the copy is consistent there. A scratch server of
//! the same release series then starts on the copy (a private socket, no TCP, no binlog, no
//! replication, no event scheduler), runs `ANALYZE TABLE` on every table and shuts down
//! slowly (`innodb_fast_shutdown=0`), so that no redo, undo purge or change-buffer merge is
//! left for the replicas, whose InnoDB is `innodb_read_only`. Every Aria table is then
//! zero-filled with `aria_chk --zerofill`: its LSNs are reset and it is marked movable, so
//! the fresh Aria control file a replica creates in /tmp accepts it without writing to it.
//!
//! Physical copies only start under a server of the same release series (10.11 data on a
//! 10.11 server): the source, the tools on this machine and the base image must agree, which
//! is checked before anything is copied.

mod conn;
mod engine;
mod image;
mod snapshot;

use std::path::Path;

pub use conn::{Source, is_url, redact};
pub use engine::Mariadb;
pub use image::{Base, profile, wants_base_file};
pub use snapshot::collect;

use crate::Error;

/// The copy's directory under the image's data directory (the server's datadir).
pub const DATADIR: &str = "mysql";

pub(crate) fn err(step: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::Mariadb {
        step: step.into(),
        detail: detail.into(),
    }
}

pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// The release series ("10.11") of a version string: "10.11.19-MariaDB-0+deb12u1-log",
/// "mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu", Debian's
/// "1:10.11.19-0+deb12u1" or the official image's "1:11.4.2+maria~ubu2404".
pub fn parse_series(version: &str) -> Option<String> {
    version.split_whitespace().find_map(|word| {
        let word = word.split_once(':').map_or(word, |(_, v)| v);
        let mut parts = word.split(['.', '-', '+', '~']);
        let major = parts.next()?;
        let minor = parts.next()?;
        let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        (ok(major) && ok(minor)).then(|| format!("{major}.{minor}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series() {
        for (text, want) in [
            ("10.11.19-MariaDB-0+deb12u1-log", Some("10.11")),
            (
                "mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu on x86_64",
                Some("10.11"),
            ),
            (
                "mariadb-backup based on MariaDB server 11.4.2-MariaDB Linux (x86_64)",
                Some("11.4"),
            ),
            ("1:10.11.19-0+deb12u1", Some("10.11")),
            ("1:11.4.2+maria~ubu2404", Some("11.4")),
            ("no version here", None),
            ("8", None),
        ] {
            assert_eq!(parse_series(text).as_deref(), want, "{text}");
        }
    }
}
