//! The image's side: what the base image has (the server, its release series, its `mysql`
//! user, its plugins), and the read-only profile bakedb-init applies.
//!
//! Users build on the official `mariadb` image copied with skopeo or on any image with a
//! distribution's server packages: the series comes from the official image's
//! MARIADB_VERSION or else from the version string compiled into `mariadbd` itself.

use std::collections::BTreeMap;

use super::DATADIR;
use crate::image_json::{Profile, ProfileFile};

/// Where a server package puts `mariadbd`, relative to the image root.
const SERVER_PATHS: [&str; 4] = [
    "usr/sbin/mariadbd",
    "usr/bin/mariadbd",
    "usr/local/mysql/bin/mariadbd",
    "opt/mariadb/bin/mariadbd",
];

/// Where plugins are (Debian, the official image, RHEL).
const PLUGIN_DIRS: [&str; 3] = [
    "usr/lib/mysql/plugin",
    "usr/lib64/mysql/plugin",
    "usr/lib/mariadb/plugin",
];

/// Bytes of `mariadbd` read for its version string: it sits in .rodata, 16 MiB into
/// Debian's 25 MiB 10.11 server.
const SERVER_READ: usize = 64 << 20;

/// Where the replica's socket is; clients in the container find it through
/// MYSQL_UNIX_PORT, which the image sets.
pub const SOCKET: &str = "/tmp/mysqld.sock";

/// The base image files MariaDB reads while the layers are scanned: /etc/passwd (the data
/// owner) and the server itself (its version string).
pub fn wants_base_file(path: &str) -> Option<usize> {
    if path == "etc/passwd" {
        Some(1 << 20)
    } else if SERVER_PATHS.contains(&path) {
        Some(SERVER_READ)
    } else {
        None
    }
}

/// A MariaDB base image, as far as baking on it goes.
#[derive(Clone, Debug)]
pub struct Base {
    /// The release series of its server ("10.11").
    pub series: String,
    /// Its full version, for messages and image.json.
    pub version: String,
    /// uid and gid of its `mysql` user, if it has one.
    pub mysql_user: Option<(u32, u32)>,
    /// Absolute path of `mariadbd`.
    pub server: String,
    /// Its plugin directory (relative), if it has one.
    plugin_dir: Option<String>,
    /// The healthcheck the base supports: the official image's script, or mariadb-admin.
    pub healthcheck: Vec<String>,
    paths: std::collections::BTreeSet<String>,
}

/// "10.11.19" out of "...10.11.19-MariaDB x86_64 debian-linux-gnu..." in a binary.
fn version_in_binary(bytes: &[u8]) -> Option<String> {
    let marker = b"-MariaDB";
    let mut from = 0;
    while let Some(i) = bytes[from..]
        .windows(marker.len())
        .position(|w| w == marker)
        .map(|i| from + i)
    {
        let start = bytes[..i]
            .iter()
            .rposition(|b| !(b.is_ascii_digit() || *b == b'.'))
            .map_or(0, |p| p + 1);
        let candidate = String::from_utf8_lossy(&bytes[start..i]).into_owned();
        if candidate.split('.').count() == 3 && candidate.split('.').all(|p| !p.is_empty()) {
            return Some(candidate);
        }
        from = i + marker.len();
    }
    None
}

impl Base {
    /// Read what matters from `image`; the error says what is missing and what to do.
    pub fn discover(image: &crate::BaseImage) -> Result<Base, String> {
        let paths = &image.paths;
        let Some(server) = SERVER_PATHS.iter().find(|p| paths.contains(**p)) else {
            return Err(format!(
                "it has no MariaDB server: no mariadbd in /{}; build on an image with the server, e.g. the official one (`skopeo copy docker://mariadb:10.11 oci:mariadb:10.11`)",
                SERVER_PATHS.join(", /")
            ));
        };
        let version = image
            .env_var("MARIADB_VERSION")
            .map(|v| {
                // "1:11.4.2+maria~ubu2404": the epoch and the packaging left out.
                let v = v.split_once(':').map_or(v, |(_, v)| v);
                v.split(['+', '-', '~']).next().unwrap_or(v).to_owned()
            })
            .or_else(|| image.files.get(*server).and_then(|b| version_in_binary(b)))
            .ok_or_else(|| {
                format!(
                    "its /{server} carries no version string bakedb can read, and its environment has no MARIADB_VERSION; set MARIADB_VERSION in its config"
                )
            })?;
        let series = super::parse_series(&version)
            .ok_or_else(|| format!("its server version {version:?} is not N.N.N"))?;
        let mysql_user = image
            .files
            .get("etc/passwd")
            .and_then(|p| crate::postgres::passwd_user(&String::from_utf8_lossy(p), "mysql"));
        let plugin_dir = PLUGIN_DIRS
            .iter()
            .find(|d| paths.iter().any(|p| p.starts_with(&format!("{d}/"))))
            .map(|d| (*d).to_owned());
        let has_bin = |name: &str| {
            ["usr/local/bin", "usr/bin", "bin"]
                .iter()
                .any(|d| paths.contains(&format!("{d}/{name}")))
        };
        // The official image's script passes when the server answers on TCP, even with
        // "access denied" (no credentials needed); mariadb-admin ping does the same on the
        // socket.
        let healthcheck = if has_bin("healthcheck.sh") {
            vec!["CMD".into(), "healthcheck.sh".into(), "--connect".into()]
        } else {
            let admin = if has_bin("mariadb-admin") {
                "mariadb-admin"
            } else {
                "mysqladmin"
            };
            vec![
                "CMD".into(),
                admin.into(),
                "--no-defaults".into(),
                format!("--socket={SOCKET}"),
                "ping".into(),
            ]
        };
        Ok(Base {
            series,
            version,
            mysql_user,
            server: format!("/{server}"),
            plugin_dir,
            healthcheck,
            paths: paths.clone(),
        })
    }

    /// The plugin libraries (file names) the base lacks among `libraries`.
    pub fn missing_plugins(&self, libraries: &[String]) -> Vec<String> {
        libraries
            .iter()
            .filter(|lib| {
                self.plugin_dir
                    .as_ref()
                    .is_none_or(|d| !self.paths.contains(&format!("{d}/{lib}")))
            })
            .cloned()
            .collect()
    }
}

/// The read-only profile bakedb-init applies when the image runs `mariadbd`:
///
/// - `--defaults-file` first (mariadbd only honours it there), so the base's /etc/mysql
///   configuration is not read and options on the container's command line, which init puts
///   after it, win (`docker run IMAGE mariadbd --port=3307`);
/// - InnoDB `innodb_read_only` and the server `read_only`; `skip-external-locking` (the
///   paper's "disabling locking"); no binlog, no general or slow log (errors go to stderr);
/// - everything the server would otherwise create in its data directory moved to the
///   runtime directory: the pid file, tmpdir, the Aria control file and log
///   (`aria_log_dir_path`), the DDL recovery log, the replication info files
///   (`multi-master.info` is created at every start), the TC log; the buffer pool is neither
///   dumped nor loaded (ib_buffer_pool); the event scheduler is off for good (it would open
///   mysql.event for writing);
/// - InnoDB reads through the page cache (`innodb_flush_method=fsync`; from 11.0
///   `innodb_data_file_buffering=ON`) instead of O_DIRECT, the default since 10.6: a replica
///   writes nothing, so O_DIRECT's reasons (no double buffering of writes, their durability)
///   do not apply, and a buffer pool miss is served by the page cache, which holds the image
///   layer's files once for every container of the image on the node and survives a
///   restart. Measured (docs/benchmarks.md, mariadb): 1.23× the oltp_point_select and 1.22×
///   the oltp_read_only TPS of the same image with O_DIRECT (17,635 against 14,316; 945
///   against 774), on data ten times the buffer pool;
/// - the InnoDB layout the copy was made with (`carried`: page size, system tablespace,
///   undo tablespaces, redo log size) and the source's settings that change query results.
///
/// The data files are 0440 and their directories 0550 in the image, so MyISAM and Aria,
/// which try O_RDWR first, fall back to O_RDONLY (EACCES), and nothing under the data
/// directory is opened for writing: nothing is copied up.
pub fn profile(carried: &BTreeMap<String, String>, series: &str) -> Profile {
    let mut config = String::from(
        "# bakedb: read-only MariaDB replica. Options on mariadbd's command line win.\n\
         [mariadbd]\n",
    );
    let fixed = [
        format!("datadir={{data_dir}}/{DATADIR}"),
        "innodb_read_only=ON".into(),
        "read_only=ON".into(),
        "skip_external_locking".into(),
        "skip_log_bin".into(),
        "general_log=OFF".into(),
        "slow_query_log=OFF".into(),
        "skip_slave_start".into(),
        "event_scheduler=DISABLED".into(),
        "innodb_buffer_pool_dump_at_shutdown=OFF".into(),
        "innodb_buffer_pool_load_at_startup=OFF".into(),
        buffered_reads(series).into(),
        "port=3306".into(),
        format!("socket={SOCKET}"),
        "pid_file={runtime_dir}/mariadbd.pid".into(),
        "tmpdir={runtime_dir}".into(),
        "aria_log_dir_path={runtime_dir}".into(),
        "log_ddl_recovery={runtime_dir}/ddl_recovery.log".into(),
        "log_tc={runtime_dir}/tc.log".into(),
        "master_info_file={runtime_dir}/master.info".into(),
        "relay_log_info_file={runtime_dir}/relay-log.info".into(),
        "relay_log={runtime_dir}/relay-bin".into(),
    ];
    for line in fixed.iter().map(String::as_str).chain(
        carried
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    ) {
        config.push_str(line);
        config.push('\n');
    }
    Profile {
        name: "mariadb-readonly".into(),
        command: Some("mariadbd".into()),
        args: vec!["--defaults-file={runtime_dir}/my.cnf".into()],
        env: BTreeMap::new(),
        verify: None,
        files: vec![ProfileFile {
            name: "my.cnf".into(),
            mode: "0600".into(),
            content: config,
        }],
        supervise: None,
        patches: None,
    }
}

/// The setting that makes InnoDB read its data files through the page cache, in the
/// server's release `series` ("10.11"): 11.0 split innodb_flush_method into separate
/// switches and deprecated it.
fn buffered_reads(series: &str) -> &'static str {
    let major: u32 = series
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major >= 11 {
        "innodb_data_file_buffering=ON"
    } else {
        "innodb_flush_method=fsync"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BaseImage;

    fn image(env: &[&str], paths: &[&str], files: &[(&str, &[u8])]) -> BaseImage {
        BaseImage {
            location: "oci:test:latest".into(),
            env: env.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
            files: files
                .iter()
                .map(|(p, b)| (p.to_string(), b.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn discovers_debian_and_official_bases() {
        let mut binary = vec![0u8; 1000];
        binary.extend_from_slice(b"5.5.5-\0garbage 10.11.19-MariaDB x86_64 debian-linux-gnu %s");
        let passwd = b"root:x:0:0::/root:/bin/sh\nmysql:x:999:999::/nonexistent:/bin/false\n";
        let debian = image(
            &[],
            &[
                "usr/sbin/mariadbd",
                "usr/bin/mariadb-admin",
                "usr/lib/mysql/plugin/auth_ed25519.so",
            ],
            &[("usr/sbin/mariadbd", &binary), ("etc/passwd", passwd)],
        );
        let base = Base::discover(&debian).unwrap();
        assert_eq!(
            (base.series.as_str(), base.version.as_str()),
            ("10.11", "10.11.19")
        );
        assert_eq!(base.mysql_user, Some((999, 999)));
        assert_eq!(base.healthcheck[1], "mariadb-admin");
        assert!(
            base.missing_plugins(&["auth_ed25519.so".into(), "ha_rocksdb.so".into()])
                == ["ha_rocksdb.so"]
        );

        let official = image(
            &["MARIADB_VERSION=1:11.4.2+maria~ubu2404"],
            &["usr/sbin/mariadbd", "usr/local/bin/healthcheck.sh"],
            &[],
        );
        let base = Base::discover(&official).unwrap();
        assert_eq!(base.series, "11.4");
        assert_eq!(base.healthcheck, ["CMD", "healthcheck.sh", "--connect"]);
        assert_eq!(base.mysql_user, None);
    }

    #[test]
    fn discovery_errors() {
        let e = Base::discover(&image(&[], &["bin/sh"], &[])).unwrap_err();
        assert!(e.contains("no MariaDB server"), "{e}");
        let e = Base::discover(&image(
            &[],
            &["usr/sbin/mariadbd"],
            &[("usr/sbin/mariadbd", b"\x7fELF")],
        ))
        .unwrap_err();
        assert!(e.contains("MARIADB_VERSION"), "{e}");
    }

    #[test]
    fn the_profile_moves_every_runtime_file_out_of_the_data_directory() {
        let carried = BTreeMap::from([("innodb_page_size".to_owned(), "16384".to_owned())]);
        let p = profile(&carried, "10.11");
        assert_eq!(p.command.as_deref(), Some("mariadbd"));
        assert_eq!(p.args, ["--defaults-file={runtime_dir}/my.cnf"]);
        let config = &p.files[0].content;
        for want in [
            "innodb_read_only=ON\n",
            "read_only=ON\n",
            "skip_external_locking\n",
            "skip_log_bin\n",
            "aria_log_dir_path={runtime_dir}\n",
            "master_info_file={runtime_dir}/master.info\n",
            "innodb_page_size=16384\n",
            "innodb_flush_method=fsync\n",
        ] {
            assert!(config.contains(want), "{want}: {config}");
        }
        let eleven = &profile(&carried, "11.4").files[0].content;
        assert!(
            eleven.contains("innodb_data_file_buffering=ON\n"),
            "{eleven}"
        );
        assert!(!eleven.contains("innodb_flush_method"), "{eleven}");
        // Every path the server writes is in the runtime directory or /tmp.
        for line in config.lines().filter(|l| l.contains('/')) {
            assert!(
                line.starts_with("datadir=")
                    || line.contains("{runtime_dir}")
                    || line.contains("=/tmp/"),
                "{line}"
            );
        }
    }
}
