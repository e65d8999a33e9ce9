//! What the source cluster holds that a physical copy cannot serve as it is, found before
//! anything is copied (on the live source, as far as its role may look) and again on the
//! copy (as its superuser, everywhere: the authoritative check).
//!
//! - UNLOGGED tables and sequences: a base backup copies only their init fork, so the copy
//!   would serve them empty (or reset). Refused unless the user accepts empty ones.
//! - Foreign tables: their rows live on another server, which a replica never talks to.
//!   Refused unless the user accepts them offline (their user mappings removed).
//! - User mappings hold other servers' credentials; foreign servers name other servers;
//!   subscriptions hold a connection string (often with a password) and would start
//!   replicating from the publisher inside every replica. All are removed from the copy.
//! - Prepared transactions were not committed at the snapshot point: rolled back in the copy.
//! - Extensions and database locales must exist in the base image (checked at build time).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use super::conn::Source;
use super::settings;
use super::tools::{Tools, checked};
use super::{err, parse_major};
use crate::Result;

/// Unit and record separators: psql's unaligned output split without ambiguity, whatever
/// the values hold (newlines, tabs, '|').
const FIELD_SEP: &str = "\u{1f}";
const RECORD_SEP: &str = "\u{1e}";

/// Run `sql` with `psql` (its connection options already set) and split the rows.
pub(crate) fn query(tools: &Tools, mut psql: Command, step: &str, sql: &str) -> Result<Rows> {
    psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-F", FIELD_SEP, "-R", RECORD_SEP, "-c", sql])
        .stdin(Stdio::null());
    let out = checked(step, psql.output(), &tools.bin.join("psql"))?;
    let out = out.strip_suffix('\n').unwrap_or(&out);
    Ok(if out.is_empty() {
        Vec::new()
    } else {
        out.split(RECORD_SEP)
            .map(|r| r.split(FIELD_SEP).map(str::to_owned).collect())
            .collect()
    })
}

pub(crate) type Rows = Vec<Vec<String>>;

/// A tablespace outside the data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: u32,
    pub name: String,
    pub location: String,
}

/// A database that accepts connections, with the locale it needs from the operating system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Database {
    pub name: String,
    pub collate: String,
    pub ctype: String,
}

/// What a look at the cluster found (see the module comment). Entries read
/// "database: object (detail)".
#[derive(Clone, Debug, Default)]
pub struct Findings {
    pub databases: Vec<Database>,
    pub unlogged: Vec<String>,
    pub foreign_tables: Vec<String>,
    pub foreign_servers: Vec<(String, String)>,
    pub user_mappings: Vec<(String, String, String)>,
    /// (database, subscription)
    pub subscriptions: Vec<(String, String)>,
    /// (database, gid)
    pub prepared: Vec<(String, String)>,
    /// extension name → (version, databases)
    pub extensions: BTreeMap<String, (String, BTreeSet<String>)>,
    /// Databases the probing role could not connect to (only up front; the copy is
    /// checked everywhere).
    pub unchecked: Vec<String>,
}

/// What the user accepts that cannot be baked faithfully (`--accept`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accept {
    pub empty_unlogged: bool,
    pub offline_foreign_tables: bool,
}

/// The values `--accept` takes for postgres.
pub const ACCEPT_VALUES: [(&str, &str); 2] = [
    (
        "empty-unlogged",
        "bake UNLOGGED tables and sequences empty (reset): a base backup does not copy their data",
    ),
    (
        "offline-foreign-tables",
        "bake foreign tables without their user mappings and server options: queries on them fail in the image",
    ),
];

impl Accept {
    pub fn parse(values: &[String]) -> std::result::Result<Accept, String> {
        let mut accept = Accept::default();
        for v in values {
            match v.as_str() {
                "empty-unlogged" => accept.empty_unlogged = true,
                "offline-foreign-tables" => accept.offline_foreign_tables = true,
                other => {
                    return Err(format!(
                        "{other:?} is not something postgres can accept; one of: {}",
                        ACCEPT_VALUES
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        Ok(accept)
    }
}

/// At most `n` items, then "and K more".
pub(crate) fn list(items: &[String], n: usize) -> String {
    let mut text = items.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        text.push_str(&format!(" and {} more", items.len() - n));
    }
    text
}

const PER_DATABASE_SQL: &str = "\
SELECT 'unlogged', format('%I.%I', n.nspname, c.relname), \
       CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'm' THEN 'materialized view' ELSE 'table' END, '' \
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p', 'S', 'm') \
UNION ALL \
SELECT 'foreign table', format('%I.%I', n.nspname, c.relname), s.srvname, w.fdwname \
  FROM pg_foreign_table ft JOIN pg_class c ON c.oid = ft.ftrelid \
  JOIN pg_namespace n ON n.oid = c.relnamespace \
  JOIN pg_foreign_server s ON s.oid = ft.ftserver JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw \
UNION ALL \
SELECT 'foreign server', s.srvname, w.fdwname, '' \
  FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw \
UNION ALL \
SELECT 'user mapping', srvname, usename, '' FROM pg_user_mappings \
UNION ALL \
SELECT 'extension', extname, extversion, '' FROM pg_extension";

const CLUSTER_SQL: &str = "\
SELECT 'database', datname, datcollate, datctype FROM pg_database WHERE datallowconn \
UNION ALL \
SELECT 'prepared', database, gid, '' FROM pg_prepared_xacts \
UNION ALL \
SELECT 'subscription', d.datname, s.subname, '' \
  FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid";

/// Look at the cluster through `run(database, sql)` (None: the connection's own database).
/// A database `run` cannot reach is listed in `unchecked` when `strict` is false, an error
/// otherwise.
pub(crate) fn look(
    run: &dyn Fn(Option<&str>, &str) -> Result<Rows>,
    strict: bool,
) -> Result<Findings> {
    let mut f = Findings::default();
    for row in run(None, CLUSTER_SQL)? {
        let [tag, a, b, c] = &row[..] else { continue };
        match tag.as_str() {
            "database" => f.databases.push(Database {
                name: a.clone(),
                collate: b.clone(),
                ctype: c.clone(),
            }),
            "prepared" => f.prepared.push((a.clone(), b.clone())),
            "subscription" => f.subscriptions.push((a.clone(), b.clone())),
            _ => {}
        }
    }
    f.databases.sort_by(|x, y| x.name.cmp(&y.name));
    for db in f.databases.clone() {
        let rows = match run(Some(&db.name), PER_DATABASE_SQL) {
            Ok(rows) => rows,
            Err(e) if !strict => {
                f.unchecked.push(format!("{} ({e})", db.name));
                continue;
            }
            Err(e) => return Err(e),
        };
        let d = &db.name;
        for row in rows {
            let [tag, a, b, c] = &row[..] else { continue };
            match tag.as_str() {
                "unlogged" => f.unlogged.push(format!("{d}: {a} ({b})")),
                "foreign table" => f.foreign_tables.push(format!("{d}: {a} (server {b}, {c})")),
                "foreign server" => f.foreign_servers.push((d.clone(), a.clone())),
                "user mapping" => f.user_mappings.push((d.clone(), a.clone(), b.clone())),
                "extension" => {
                    f.extensions
                        .entry(a.clone())
                        .or_insert_with(|| (b.clone(), BTreeSet::new()))
                        .1
                        .insert(d.clone());
                }
                _ => {}
            }
        }
    }
    Ok(f)
}

impl Findings {
    /// Why the cluster cannot be baked faithfully with what the user accepts, if it cannot.
    pub fn refusal(&self, accept: Accept) -> Option<String> {
        let mut why = Vec::new();
        if !self.unlogged.is_empty() && !accept.empty_unlogged {
            why.push(format!(
                "it has UNLOGGED relations, whose contents a base backup does not copy, so the image would serve them empty: {}; make them logged (ALTER TABLE ... SET LOGGED, ALTER SEQUENCE ... SET LOGGED) or pass --accept empty-unlogged to bake them empty",
                list(&self.unlogged, 10)
            ));
        }
        if !self.foreign_tables.is_empty() && !accept.offline_foreign_tables {
            why.push(format!(
                "it has foreign tables, whose rows live on another server, which a baked replica never talks to: {}; drop them, or pass --accept offline-foreign-tables to bake them without their user mappings (queries on them then fail in the image)",
                list(&self.foreign_tables, 10)
            ));
        }
        (!why.is_empty()).then(|| why.join("; and "))
    }

    /// What the copy lost or had removed, for stderr and image.json: one sentence each.
    pub fn notes(&self, accept: Accept) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.unlogged.is_empty() && accept.empty_unlogged {
            notes.push(format!(
                "UNLOGGED relations are baked empty (reset), as accepted with --accept empty-unlogged: {}",
                list(&self.unlogged, 20)
            ));
        }
        if !self.foreign_tables.is_empty() && accept.offline_foreign_tables {
            notes.push(format!(
                "foreign tables are baked offline, as accepted with --accept offline-foreign-tables (queries on them fail): {}",
                list(&self.foreign_tables, 20)
            ));
        }
        if !self.user_mappings.is_empty() || !self.foreign_servers.is_empty() {
            let servers: Vec<String> = self
                .foreign_servers
                .iter()
                .map(|(d, s)| format!("{d}: {s}"))
                .collect();
            notes.push(format!(
                "foreign servers lost their options and their {} user mapping(s) in the image (they name other servers and hold their credentials; a replica never talks to another server): {}",
                self.user_mappings.len(),
                list(&servers, 20)
            ));
        }
        if !self.subscriptions.is_empty() {
            let subs: Vec<String> = self
                .subscriptions
                .iter()
                .map(|(d, s)| format!("{d}: {s}"))
                .collect();
            notes.push(format!(
                "subscriptions were dropped from the copy, with their connection strings (a replica never replicates; the source keeps them, and its replication slots on the publisher are untouched): {}",
                list(&subs, 20)
            ));
        }
        if !self.prepared.is_empty() {
            let gids: Vec<String> = self
                .prepared
                .iter()
                .map(|(d, g)| format!("{d}: {g}"))
                .collect();
            notes.push(format!(
                "prepared transactions pending on the source were not committed at the snapshot point and were rolled back in the copy: {}",
                list(&gids, 20)
            ));
        }
        notes
    }
}

/// The source server's configuration as the image keeps it.
#[derive(Clone, Debug, Default)]
pub struct SourceSettings {
    /// Carried into the image's configuration file (name → value as PostgreSQL shows it).
    pub carried: BTreeMap<String, String>,
    /// Set on the source and deliberately left out (names only: values may be secrets).
    pub not_carried: BTreeSet<String>,
}

/// What the live source says about itself, read before anything is copied.
#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub major: u32,
    pub server_version: String,
    /// The bootstrap superuser (OID 10): VACUUM FREEZE of every table needs it.
    pub superuser: String,
    /// A standby (hot or streaming): the snapshot comes from it, not from its primary.
    pub in_recovery: bool,
    pub tablespaces: Vec<Tablespace>,
    pub settings: SourceSettings,
    pub findings: Findings,
}

const SERVER_SQL: &str = "\
SELECT 'version', current_setting('server_version_num'), current_setting('server_version'), '' \
UNION ALL SELECT 'superuser', rolname, '', '' FROM pg_roles WHERE oid = 10 \
UNION ALL SELECT 'recovery', pg_is_in_recovery()::text, '', '' \
UNION ALL SELECT 'tablespace', oid::text, spcname, pg_tablespace_location(oid) \
  FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') \
UNION ALL SELECT 'setting', name, source || '\u{1d}' || category, setting FROM pg_settings";

impl SourceInfo {
    /// What the snapshot will need from the base image, known before anything is copied
    /// (the same shape as image.json's, for `Base::fit`).
    pub fn needs(&self) -> serde_json::Value {
        serde_json::Value::Object(super::snapshot::needs(&self.findings, &self.settings))
    }
}

/// Where the source stands, for `bakedb watch`: its current snapshot (`xmin:xmax:xip…`). A
/// transaction that writes takes a new transaction id (xmax moves) and its commit or abort
/// leaves the in-progress list, so any commit changes it; WAL a checkpoint or a base backup
/// writes does not (`pg_current_wal_lsn` would move after every bake and start another).
pub(crate) fn position(tools: &Tools, source: &Source) -> Result<String> {
    let rows = query(
        tools,
        source_psql(tools, source, None),
        &format!("following {}", source.redacted()),
        "SELECT pg_current_snapshot()::text",
    )?;
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next())
        .ok_or_else(|| {
            err(
                format!("following {}", source.redacted()),
                "pg_current_snapshot() returned no row",
            )
        })
}

/// psql connected to `source` (database `db`, or the URI's own).
fn source_psql(tools: &Tools, source: &Source, db: Option<&str>) -> Command {
    let mut cmd = tools.cmd("psql");
    source.apply(&mut cmd);
    cmd.env("PGCONNECT_TIMEOUT", "30").arg("-d").arg(match db {
        Some(db) => source.url_for(db),
        None => source.url().to_owned(),
    });
    cmd
}

/// Connect to the source and check it can be backed up by `tools` and baked faithfully
/// with what the user accepts.
pub fn probe_source(tools: &Tools, source: &Source, accept: Accept) -> Result<SourceInfo> {
    let where_ = source.redacted().to_owned();
    let rows = query(
        tools,
        source_psql(tools, source, None),
        &format!("connecting to {where_}"),
        SERVER_SQL,
    )?;
    let mut version = None;
    let mut superuser = String::new();
    let mut in_recovery = false;
    let mut tablespaces = Vec::new();
    let mut settings = SourceSettings::default();
    let mut masked = Vec::new();
    for row in &rows {
        let [tag, a, b, c] = &row[..] else { continue };
        match tag.as_str() {
            "version" => version = Some((a.clone(), b.clone())),
            "superuser" => superuser = a.clone(),
            "recovery" => in_recovery = a == "true",
            "tablespace" => tablespaces.push(Tablespace {
                oid: a.parse().unwrap_or(0),
                name: b.clone(),
                location: c.clone(),
            }),
            "setting" => {
                let (src, category) = b.split_once('\u{1d}').unwrap_or((b, ""));
                let carried = settings::is_carried(a, category);
                if settings::is_server_source(src) {
                    if carried {
                        settings.carried.insert(a.clone(), c.clone());
                    } else {
                        settings.not_carried.insert(a.clone());
                    }
                } else if carried && !matches!(src, "default" | "override" | "client") {
                    // A per-role or per-database value of the probing role hides the
                    // server's own: the configuration files tell.
                    masked.push(a.clone());
                }
            }
            _ => {}
        }
    }
    if !masked.is_empty()
        && let Ok(files) = query(
            tools,
            source_psql(tools, source, None),
            "reading pg_file_settings",
            "SELECT name, setting FROM pg_file_settings WHERE applied AND error IS NULL",
        )
    {
        for row in files {
            if let [name, value] = &row[..]
                && let Some(m) = masked.iter().find(|m| m.eq_ignore_ascii_case(name))
            {
                settings.carried.insert(m.clone(), value.clone());
            }
        }
    }
    let (num, server_version) = version.ok_or_else(|| {
        err(
            format!("querying {where_}"),
            "no server version in the answer",
        )
    })?;
    let num: u32 = num.parse().map_err(|_| {
        err(
            format!("querying {where_}"),
            format!("server_version_num {num:?}"),
        )
    })?;
    let major = if num >= 100_000 {
        num / 10_000
    } else {
        parse_major(&server_version).unwrap_or(num / 100)
    };
    if major != tools.major {
        return Err(err(
            "checking versions",
            format!(
                "the source runs PostgreSQL {major} ({server_version}), the tools in {} are PostgreSQL {}; a physical base backup needs the tools, and a base image, of the source's major version",
                tools.bin.display(),
                tools.major
            ),
        ));
    }
    if !tablespaces.is_empty() && major < 15 {
        let names: Vec<String> = tablespaces.iter().map(|t| t.name.clone()).collect();
        return Err(err(
            where_,
            format!(
                "it uses tablespaces outside the data directory ({}); bakedb bakes them as in-place tablespaces, which PostgreSQL runs from version 15 on: move their tables to pg_default (ALTER TABLE ... SET TABLESPACE pg_default) and drop them, or bake from PostgreSQL 15 or later",
                list(&names, 10)
            ),
        ));
    }
    let findings = look(
        &|db, sql| {
            query(
                tools,
                source_psql(tools, source, db),
                &format!("querying {}", db.unwrap_or("the source")),
                sql,
            )
        },
        false,
    )?;
    if let Some(why) = findings.refusal(accept) {
        return Err(err(format!("{where_} cannot be baked faithfully"), why));
    }
    Ok(SourceInfo {
        major,
        server_version,
        superuser,
        in_recovery,
        tablespaces,
        settings,
        findings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(
        cluster: Rows,
        per_db: BTreeMap<&'static str, Option<Rows>>,
    ) -> impl Fn(Option<&str>, &str) -> Result<Rows> {
        move |db, _sql| match db {
            None => Ok(cluster.clone()),
            Some(d) => per_db
                .get(d)
                .cloned()
                .flatten()
                .ok_or_else(|| err("connecting", format!("no access to {d}"))),
        }
    }

    fn row(items: [&str; 4]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn findings_refusals_and_notes() {
        let run = fake(
            vec![
                row(["database", "app", "C.UTF-8", "C.UTF-8"]),
                row(["database", "secret", "C", "C"]),
                row(["prepared", "app", "tx-1", ""]),
                row(["subscription", "app", "sub1", ""]),
            ],
            BTreeMap::from([
                (
                    "app",
                    Some(vec![
                        row(["unlogged", "public.cache", "table", ""]),
                        row(["foreign table", "public.remote", "up", "postgres_fdw"]),
                        row(["foreign server", "up", "postgres_fdw", ""]),
                        row(["user mapping", "up", "app", ""]),
                        row(["extension", "plpgsql", "1.0", ""]),
                    ]),
                ),
                ("secret", None),
            ]),
        );
        let f = look(&run, false).unwrap();
        assert_eq!(f.unchecked.len(), 1);
        assert!(f.unchecked[0].starts_with("secret"));
        assert!(
            look(&run, true).is_err(),
            "strict: every database is checked"
        );
        let why = f.refusal(Accept::default()).unwrap();
        assert!(why.contains("app: public.cache (table)"), "{why}");
        assert!(why.contains("--accept empty-unlogged"), "{why}");
        assert!(
            why.contains("app: public.remote (server up, postgres_fdw)"),
            "{why}"
        );
        let only_unlogged = Accept {
            offline_foreign_tables: true,
            ..Accept::default()
        };
        let why = f.refusal(only_unlogged).unwrap();
        assert!(!why.contains("foreign"), "{why}");
        let all = Accept {
            empty_unlogged: true,
            offline_foreign_tables: true,
        };
        assert!(f.refusal(all).is_none());
        let notes = f.notes(all).join("\n");
        for want in ["baked empty", "offline", "user mapping", "sub1", "tx-1"] {
            assert!(notes.contains(want), "{want}: {notes}");
        }
        assert_eq!(
            Accept::parse(&["empty-unlogged".into()]).unwrap(),
            Accept {
                empty_unlogged: true,
                offline_foreign_tables: false
            }
        );
        assert!(Accept::parse(&["everything".into()]).is_err());
        assert_eq!(
            list(&["a".into(), "b".into(), "c".into()], 2),
            "a, b and 1 more"
        );
    }
}
