//! The image's side: what the base image has (read from its files, not only from the
//! official images' environment variables), whether it can run the snapshot, and the
//! read-only profile bakedb-init applies.
//!
//! Users build on the official image, on Debian or RHEL images with the distribution's
//! server packages, or on alpine: none of it is assumed. The major version comes from
//! PG_MAJOR/PG_VERSION or else from the image's `postgres.bki` ("# PostgreSQL 15"); the
//! server from the usual install locations; the `postgres` user from /etc/passwd. What would
//! make a replica fail at start or answer differently (a database locale, an installed
//! extension, the carried TimeZone) is refused at build time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde_json::json;

use super::snapshot::collect;
use super::source::list;
use super::{PGDATA, err, io, parse_major, settings};
use crate::image_json::{Profile, ProfileFile};
use crate::{BaseImage, Error, Result, Snapshot};

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

const LOCALE_ARCHIVE: &str = "usr/lib/locale/locale-archive";

/// Preload libraries that start background workers which replicate from or connect to
/// other servers, or run scheduled writes: never preloaded in an image, base or not.
const OUTWARD_LIBRARIES: [&str; 4] = ["pglogical", "pg_cron", "pg_partman_bgw", "pg_squeeze"];

fn library_name(library: &str) -> &str {
    let name = library.rsplit('/').next().unwrap_or(library);
    name.strip_suffix(".so").unwrap_or(name)
}

/// The base image files postgres reads while the layers are scanned, with how many bytes
/// of each: /etc/passwd (the data owner), postgres.bki (the major version, first line) and
/// glibc's locale archive (its name table is at the front; with every locale it is
/// 200+ MiB).
pub fn wants_base_file(path: &str) -> Option<usize> {
    if path == "etc/passwd" {
        Some(1 << 20)
    } else if path.ends_with("/postgres.bki") {
        Some(256)
    } else if path == LOCALE_ARCHIVE {
        Some(16 << 20)
    } else {
        None
    }
}

/// A PostgreSQL base image, as far as baking on it goes.
#[derive(Clone, Debug)]
pub struct Base {
    pub major: u32,
    /// uid and gid of its `postgres` user, if it has one.
    pub postgres_user: Option<(u32, u32)>,
    /// Where its `postgres` is, absolute ("/usr/lib/postgresql/15/bin").
    pub bin_dir: String,
    /// A PATH for the image when the base's own does not reach bin_dir (Debian's packages
    /// keep the server out of PATH; the official image adds it).
    pub path_env: Option<String>,
    share_dir: String,
    lib_dir: Option<String>,
    /// Locales glibc can load, normalised; None when any name works (musl).
    locales: Option<BTreeSet<String>>,
    paths: BTreeSet<String>,
}

/// glibc's form of a locale name: the codeset lower-cased without punctuation
/// ("en_US.UTF-8" and "en_US.utf8" are one locale).
fn normalize_locale(name: &str) -> String {
    let (main, modifier) = match name.split_once('@') {
        Some((m, r)) => (m, Some(r)),
        None => (name, None),
    };
    let mut out = match main.split_once('.') {
        Some((lang, codeset)) => {
            let cs: String = codeset
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .map(|c| c.to_ascii_lowercase())
                .collect();
            format!("{lang}.{cs}")
        }
        None => main.to_owned(),
    };
    if let Some(m) = modifier {
        out.push('@');
        out.push_str(m);
    }
    out
}

/// The locale names in (the front of) a glibc locale-archive.
fn archive_locales(bytes: &[u8]) -> Vec<String> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    const MAGIC: u32 = 0xde02_0109;
    if word(0) != Some(MAGIC) {
        return Vec::new();
    }
    let (Some(offset), Some(size)) = (word(8), word(16)) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for i in 0..size as usize {
        let entry = offset as usize + i * 12;
        let Some(name_offset) = word(entry + 4) else {
            break;
        };
        if name_offset == 0 {
            continue;
        }
        let start = name_offset as usize;
        if let Some(len) = bytes
            .get(start..)
            .and_then(|b| b.iter().position(|&c| c == 0))
        {
            names.push(String::from_utf8_lossy(&bytes[start..start + len]).into_owned());
        }
    }
    names
}

impl Base {
    /// Read what matters from `image`; the error says what is missing and what to do.
    pub fn discover(image: &BaseImage) -> std::result::Result<Base, String> {
        let paths = &image.paths;
        let env_major = image
            .env_var("PG_MAJOR")
            .and_then(|v| v.trim().parse::<u32>().ok())
            .or_else(|| image.env_var("PG_VERSION").and_then(parse_major));
        let bki: Vec<(u32, String)> = image
            .files
            .iter()
            .filter(|(p, _)| p.ends_with("/postgres.bki"))
            .filter_map(|(p, bytes)| {
                let first = String::from_utf8_lossy(bytes);
                let major = first
                    .lines()
                    .next()?
                    .strip_prefix("# PostgreSQL ")
                    .and_then(parse_major)?;
                Some((major, p.rsplit_once('/')?.0.to_owned()))
            })
            .collect();
        let (major, share_dir) = match (env_major, &bki[..]) {
            (_, []) => {
                return Err(
                    "it has no PostgreSQL server: no postgres.bki anywhere in it (the server package installs it in its share directory); build on an image with the server, e.g. the official one (`skopeo copy docker://postgres:15 oci:postgres:15`)"
                        .into(),
                );
            }
            (Some(m), found) => match found.iter().find(|(major, _)| *major == m) {
                Some((_, share)) => (m, share.clone()),
                None => {
                    return Err(format!(
                        "its environment says PostgreSQL {m}, but its server files are PostgreSQL {}",
                        found
                            .iter()
                            .map(|(m, _)| m.to_string())
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ));
                }
            },
            (None, [(m, share)]) => (*m, share.clone()),
            (None, found) => {
                return Err(format!(
                    "it has the servers of PostgreSQL {} and no PG_MAJOR in its environment to say which one runs; set PG_MAJOR in its config",
                    found
                        .iter()
                        .map(|(m, _)| m.to_string())
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
            }
        };
        let candidates = [
            format!("usr/lib/postgresql/{major}/bin"),
            format!("usr/pgsql-{major}/bin"),
            "usr/local/pgsql/bin".to_owned(),
            "usr/local/bin".to_owned(),
            "usr/bin".to_owned(),
        ];
        let bin_dir = candidates
            .iter()
            .find(|d| paths.contains(&format!("{d}/postgres")))
            .map(|d| format!("/{d}"))
            .ok_or_else(|| {
                format!(
                    "it has PostgreSQL {major}'s share directory (/{share_dir}) but no postgres executable in /{}",
                    candidates.join(", /")
                )
            })?;
        let lib_dirs: Vec<&str> = paths
            .iter()
            .filter_map(|p| p.strip_suffix("/plpgsql.so"))
            .collect();
        let lib_dir = lib_dirs
            .iter()
            .find(|d| {
                d.split('/')
                    .any(|c| c == major.to_string() || c == format!("pgsql-{major}"))
            })
            .or(lib_dirs.first())
            .map(|d| (*d).to_owned());
        let path = image.env_var("PATH").unwrap_or("");
        let path_env = (!path.split(':').any(|d| d == bin_dir)).then(|| {
            if path.is_empty() {
                format!("{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            } else {
                format!("{bin_dir}:{path}")
            }
        });
        let musl = paths.iter().any(|p| p.starts_with("lib/ld-musl-"));
        let locales = if musl && !paths.iter().any(|p| p.starts_with("usr/lib/locale/")) {
            None
        } else {
            let mut names: BTreeSet<String> = ["C", "POSIX"].map(String::from).into();
            if let Some(archive) = image.files.get(LOCALE_ARCHIVE) {
                names.extend(archive_locales(archive).iter().map(|n| normalize_locale(n)));
            }
            names.extend(
                paths
                    .iter()
                    .filter_map(|p| p.strip_prefix("usr/lib/locale/")?.strip_suffix("/LC_CTYPE"))
                    .filter(|n| !n.contains('/'))
                    .map(normalize_locale),
            );
            Some(names)
        };
        let postgres_user = image
            .files
            .get("etc/passwd")
            .and_then(|p| passwd_user(&String::from_utf8_lossy(p), "postgres"));
        Ok(Base {
            major,
            postgres_user,
            bin_dir,
            path_env,
            share_dir,
            lib_dir,
            locales,
            paths: paths.clone(),
        })
    }

    fn has_locale(&self, name: &str) -> bool {
        match &self.locales {
            None => true,
            Some(set) => set.contains(&normalize_locale(name)),
        }
    }

    fn has_library(&self, library: &str) -> bool {
        let name = library.strip_prefix("$libdir/").unwrap_or(library);
        if let Some(abs) = name.strip_prefix('/') {
            return self.paths.contains(abs) || self.paths.contains(&format!("{abs}.so"));
        }
        self.lib_dir.as_ref().is_some_and(|dir| {
            self.paths.contains(&format!("{dir}/{name}"))
                || self.paths.contains(&format!("{dir}/{name}.so"))
        })
    }

    /// Whether the snapshot (its `provenance`) can run on this base: every locale its
    /// databases use, every extension installed in them and the carried time zone must be
    /// there. Preload libraries the base lacks are left out of the carried settings (a
    /// replica would not start with them), with a note. Snapshots from before bakedb
    /// recorded these needs are not checked.
    pub fn fit(&self, provenance: &serde_json::Value) -> std::result::Result<Fit, String> {
        let requires = &provenance["requires"];
        let mut missing = Vec::new();
        let locales: Vec<&str> = requires["locales"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .filter(|l| !self.has_locale(l))
            .collect();
        if !locales.is_empty() {
            missing.push(format!(
                "locale {} (used by the source's databases or settings; add it to the base image, e.g. `localedef -i en_US -f UTF-8 en_US.UTF-8` in a Dockerfile FROM it, as the official image's documentation shows)",
                locales.join(", ")
            ));
        }
        let extensions: Vec<String> = requires["extensions"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(name, _)| {
                !self
                    .paths
                    .contains(&format!("{}/extension/{name}.control", self.share_dir))
            })
            .map(|(name, version)| format!("{name} {}", version.as_str().unwrap_or("?")))
            .collect();
        if !extensions.is_empty() {
            missing.push(format!(
                "extension {} (installed in the source's databases; /{}/extension has no control file for it: use a base image with the extension's package)",
                extensions.join(", "),
                self.share_dir
            ));
        }
        let mut carried: BTreeMap<String, String> =
            serde_json::from_value(provenance["settings"].clone()).unwrap_or_default();
        if let Some(zone) = carried.get("TimeZone").filter(|z| z.contains('/')) {
            let in_share = format!("{}/timezone/{zone}", self.share_dir);
            let system = format!("usr/share/zoneinfo/{zone}");
            if !self.paths.contains(&in_share) && !self.paths.contains(&system) {
                missing.push(format!(
                    "time zone {zone} (the source's TimeZone; neither /{in_share} nor /{system} is there: install the tzdata package in the base image)"
                ));
            }
        }
        if !missing.is_empty() {
            return Err(format!(
                "it lacks what the snapshot needs, so a replica would not start or would answer differently: {}",
                missing.join("; ")
            ));
        }
        let mut notes = Vec::new();
        for setting in settings::PRELOAD_SETTINGS {
            let Some(value) = carried.get(setting) else {
                continue;
            };
            let (outward, rest): (Vec<String>, Vec<String>) = settings::libraries(value)
                .into_iter()
                .partition(|l| OUTWARD_LIBRARIES.contains(&library_name(l)));
            let (kept, missing): (Vec<String>, Vec<String>) =
                rest.into_iter().partition(|l| self.has_library(l));
            if !outward.is_empty() {
                notes.push(format!(
                    "{setting}: {} not preloaded in the image (its background workers replicate, connect to other servers or run scheduled writes)",
                    list(&outward, 10)
                ));
            }
            if !missing.is_empty() {
                notes.push(format!(
                    "{setting}: the base image lacks {}, so the image does not preload it",
                    list(&missing, 10)
                ));
            }
            if !outward.is_empty() || !missing.is_empty() {
                carried.insert(setting.to_owned(), kept.join(","));
            }
        }
        Ok(Fit { carried, notes })
    }
}

/// What the image runs with on a base that fits the snapshot.
#[derive(Clone, Debug, Default)]
pub struct Fit {
    /// The source's settings the image's configuration file carries.
    pub carried: BTreeMap<String, String>,
    /// What was left out, one sentence each.
    pub notes: Vec<String>,
}

/// The read-only profile bakedb-init applies when the image runs `postgres`:
///
/// - on the command line, so neither the config file nor postgresql.auto.conf in the data
///   directory can undo them (a later `-c` in the container's own command still can):
///   default_transaction_read_only, no fsync, no synchronous commit, no full-page writes, no
///   autovacuum, no replication, archiving or logical replication workers; socket and extra
///   pid file in /tmp, listen on all addresses, log to stderr;
/// - config, hba and ident files generated into the runtime directory, never the data
///   directory: the config file holds the source's settings that change query results
///   (`carried`); local connections are trusted (inside the container only, as in the
///   official image), TCP connections need the role's password from the source (`md5`,
///   which PostgreSQL upgrades to SCRAM for roles with a SCRAM secret, so roles with md5
///   hashes log in too);
/// - `verify` "first-start": PostgreSQL writes into its data directory (pg_control, WAL,
///   postmaster.pid) even when nothing else changes, so a restart of the same container
///   would no longer match image.json; init verifies at the container's first start only.
///
/// `preload`: the lazy copy-up library to put in LD_PRELOAD (see crates/copyup-shim).
pub fn profile(carried: &BTreeMap<String, String>, preload: Option<&str>) -> Profile {
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
        "archive_mode=off",
        "max_logical_replication_workers=0",
        // Tablespaces are baked in place, which only a recovery checks for.
        "allow_in_place_tablespaces=on",
        "listen_addresses=*",
        "unix_socket_directories=/tmp",
        "external_pid_file=/tmp/postgresql.pid",
        "logging_collector=off",
        "log_destination=stderr",
    ] {
        args.push("-c".into());
        args.push(setting.into());
    }
    let file = |name: &str, content: String| ProfileFile {
        name: name.into(),
        mode: "0600".into(),
        content,
    };
    Profile {
        name: "postgres-readonly".into(),
        command: Some("postgres".into()),
        args,
        env: preload
            .map(|library| ("LD_PRELOAD".to_owned(), library.to_owned()))
            .into_iter()
            .collect(),
        verify: Some("first-start".into()),
        files: vec![
            file("postgresql.conf", settings::config_file(carried)),
            file(
                "pg_hba.conf",
                "# bakedb read-only replica. Roles and passwords are the source's; md5 also accepts\n\
                 # roles with SCRAM secrets (with SCRAM).\n\
                 local all all trust\n\
                 host all all all md5\n"
                    .into(),
            ),
            file("pg_ident.conf", String::new()),
        ],
        supervise: None,
        patches: None,
    }
}

/// Read `snapshot.json` and the data directory of a directory written by `bakedb snapshot`.
pub fn load_snapshot_dir(dir: &Path) -> Result<(Snapshot, u32)> {
    let meta_path = dir.join("snapshot.json");
    let bytes = match fs::read(&meta_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = if dir.join("PG_VERSION").is_file() {
                " (it looks like a data directory itself: bakedb bakes a live server, so that its copy is consistent and prepared, not a data directory taken some other way)"
            } else {
                ""
            };
            return Err(Error::Source {
                path: dir.to_owned(),
                reason: format!(
                    "is not a directory written by `bakedb snapshot` (it has no snapshot.json){hint}; pass a postgresql:// URI of the live server, or a directory written by `bakedb snapshot --engine postgres --source URI --out DIR`"
                ),
            });
        }
        Err(e) => return Err(io("reading", &meta_path)(e)),
    };
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
            hashed: Default::default(),
            partial: false,
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

/// uid and gid of `name` in an /etc/passwd.
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

    /// A locale-archive with the given names, laid out as localedef writes it.
    fn archive(names: &[&str]) -> Vec<u8> {
        let header = 14 * 4;
        let size = names.len() + 3;
        let strings = header + size * 12;
        let mut bytes = vec![0u8; strings];
        let put =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut bytes, 0, 0xde02_0109);
        put(&mut bytes, 8, header as u32);
        put(&mut bytes, 12, names.len() as u32);
        put(&mut bytes, 16, size as u32);
        for (i, n) in names.iter().enumerate() {
            let at = bytes.len() as u32;
            bytes.extend_from_slice(n.as_bytes());
            bytes.push(0);
            put(&mut bytes, header + (i + 1) * 12 + 4, at);
        }
        bytes
    }

    const DEBIAN: &[&str] = &[
        "usr/lib/postgresql/15/bin/postgres",
        "usr/lib/postgresql/15/lib/plpgsql.so",
        "usr/lib/postgresql/15/lib/pg_stat_statements.so",
        "usr/share/postgresql/15/postgres.bki",
        "usr/share/postgresql/15/extension/plpgsql.control",
        "usr/share/postgresql/15/extension/pg_trgm.control",
        "usr/share/zoneinfo/Europe/Berlin",
        "usr/lib/locale/C.utf8/LC_CTYPE",
    ];

    #[test]
    fn discovers_a_debian_base_without_pg_major() {
        let passwd =
            b"root:x:0:0::/root:/bin/sh\npostgres:x:101:104::/var/lib/postgresql:/bin/sh\n";
        let arch = archive(&["de_DE.utf8", "en_US.utf8"]);
        let img = image(
            &["PATH=/usr/local/bin:/usr/bin:/bin"],
            DEBIAN,
            &[
                (
                    "usr/share/postgresql/15/postgres.bki",
                    b"# PostgreSQL 15\ncreate",
                ),
                ("etc/passwd", passwd),
                (LOCALE_ARCHIVE, &arch),
            ],
        );
        let base = Base::discover(&img).unwrap();
        assert_eq!(base.major, 15);
        assert_eq!(base.postgres_user, Some((101, 104)));
        assert_eq!(base.bin_dir, "/usr/lib/postgresql/15/bin");
        assert_eq!(
            base.path_env.as_deref(),
            Some("/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin")
        );
        for ok in ["C", "POSIX", "C.UTF-8", "de_DE.UTF-8", "en_US.utf8"] {
            assert!(base.has_locale(ok), "{ok}");
        }
        assert!(!base.has_locale("fr_FR.UTF-8"));

        let provenance = json!({
            "settings": {"TimeZone": "Europe/Berlin", "shared_preload_libraries": "pg_stat_statements,timescaledb,$libdir/pg_cron"},
            "requires": {"locales": ["C.UTF-8", "de_DE.UTF-8"], "extensions": {"plpgsql": "1.0", "pg_trgm": "1.6"}},
        });
        let fit = base.fit(&provenance).unwrap();
        assert_eq!(
            fit.carried["shared_preload_libraries"],
            "pg_stat_statements"
        );
        assert!(fit.notes[0].contains("pg_cron"), "{:?}", fit.notes);
        assert!(fit.notes[1].contains("timescaledb"), "{:?}", fit.notes);

        let needs_more = json!({
            "settings": {"TimeZone": "Asia/Tokyo"},
            "requires": {"locales": ["fr_FR.UTF-8"], "extensions": {"postgis": "3.3.2"}},
        });
        let why = base.fit(&needs_more).unwrap_err();
        for want in ["fr_FR.UTF-8", "postgis 3.3.2", "Asia/Tokyo"] {
            assert!(why.contains(want), "{want}: {why}");
        }
        assert!(
            base.fit(&json!({})).is_ok(),
            "old snapshots are not checked"
        );
    }

    #[test]
    fn discovery_errors() {
        let e = Base::discover(&image(&[], &["bin/sh"], &[])).unwrap_err();
        assert!(e.contains("no PostgreSQL server"), "{e}");
        let bki14: &[u8] = b"# PostgreSQL 14\n";
        let bki15: &[u8] = b"# PostgreSQL 15\n";
        let two = image(
            &[],
            &[],
            &[
                ("usr/share/postgresql/14/postgres.bki", bki14),
                ("usr/share/postgresql/15/postgres.bki", bki15),
            ],
        );
        let e = Base::discover(&two).unwrap_err();
        assert!(e.contains("14 and 15") && e.contains("PG_MAJOR"), "{e}");
        let mut official = two.clone();
        official.env.push("PG_MAJOR=15".into());
        official
            .paths
            .insert("usr/lib/postgresql/15/bin/postgres".into());
        official
            .env
            .push("PATH=/usr/lib/postgresql/15/bin:/usr/bin".into());
        let base = Base::discover(&official).unwrap();
        assert_eq!((base.major, base.path_env), (15, None));
        let mut wrong = two;
        wrong.env.push("PG_MAJOR=16".into());
        assert!(
            Base::discover(&wrong)
                .unwrap_err()
                .contains("says PostgreSQL 16")
        );
        let no_server = image(&[], &[], &[("usr/share/pgsql/postgres.bki", bki15)]);
        let e = Base::discover(&no_server).unwrap_err();
        assert!(e.contains("no postgres executable"), "{e}");
    }

    #[test]
    fn locale_names_normalise_like_glibc() {
        assert_eq!(normalize_locale("en_US.UTF-8"), "en_US.utf8");
        assert_eq!(
            normalize_locale("de_DE.ISO-8859-15@euro"),
            "de_DE.iso885915@euro"
        );
        assert_eq!(normalize_locale("C"), "C");
        assert_eq!(archive_locales(&archive(&["a.utf8", "b"])), ["a.utf8", "b"]);
        assert!(archive_locales(b"not an archive").is_empty());
    }

    #[test]
    fn passwd_lookup() {
        let p = "root:x:0:0::/root:/bin/sh\npostgres:x:999:998::/var/lib/postgresql:/bin/sh\n";
        assert_eq!(passwd_user(p, "postgres"), Some((999, 998)));
        assert_eq!(passwd_user(p, "mysql"), None);
    }

    #[test]
    fn a_directory_that_is_not_a_snapshot_says_what_it_should_be() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_snapshot_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("not a directory written by `bakedb snapshot`")
                && e.contains("postgresql://"),
            "{e}"
        );
        fs::write(dir.path().join("PG_VERSION"), "15\n").unwrap();
        let e = load_snapshot_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("looks like a data directory itself"), "{e}");
    }
}
