//! The snapshot pipeline: pg_basebackup of the live source (primary or standby), the copy
//! stripped to PostgreSQL's own data, a scratch server on it that makes it faithful and
//! quiet (prepared transactions rolled back, subscriptions and foreign credentials removed,
//! ANALYZE, VACUUM (FREEZE)), a clean shutdown and fresh WAL.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use serde_json::json;

use super::conn::Source;
use super::scratch::{
    Scratch, check_shut_down, chown_tree, controldata, lookup, scratch_user, settings_for,
    unreachable_ancestor,
};
use super::source::{Accept, Findings, SourceInfo, SourceSettings, list, look};
use super::tools::{Tools, checked};
use super::{PGDATA, err, io};
use crate::{DataDir, DataFile, Result, Snapshot};

/// PostgreSQL's block size (BLCKSZ), the page of its relation files.
const PAGE_SIZE: u64 = 8192;
/// pd_lsn (8 bytes) and pd_checksum (2) at the start of every relation page.
const PAGE_HEADER: u32 = 10;

/// A relation file: `<relfilenode>[_fsm|_vm|_init][.<segment>]` in a database directory
/// (base/<oid>/, global/, pg_tblspc/<oid>/<version>/<oid>/). SLRU pages (pg_xact...) and WAL
/// pages have other headers.
fn is_relation_file(rel: &str) -> bool {
    let mut parts = rel.split('/');
    let in_db = matches!(
        (parts.next(), parts.next()),
        (Some(PGDATA), Some("base" | "global" | "pg_tblspc"))
    );
    let name = rel.rsplit('/').next().unwrap_or("");
    let name = name.split_once('.').map_or(name, |(n, seg)| {
        if seg.chars().all(|c| c.is_ascii_digit()) {
            n
        } else {
            ""
        }
    });
    let name = ["_fsm", "_vm", "_init"]
        .iter()
        .find_map(|fork| name.strip_suffix(fork))
        .unwrap_or(name);
    in_db && !name.is_empty() && name.chars().all(|c| c.is_ascii_digit())
}

/// What a data directory holds of PostgreSQL's own. Anything else at its top (the source's
/// postgresql.conf, pg_hba.conf and pg_ident.conf, TLS keys and certificates,
/// standby.signal and recovery.signal, a log/ directory, a DBA's copies of config files)
/// stays out of the image: the image's configuration is bakedb's, and keys and credentials
/// of the source never go into a layer.
const DATA_DIRS: [&str; 17] = [
    "base",
    "global",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_logical",
    "pg_multixact",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_tblspc",
    "pg_twophase",
    "pg_wal",
    "pg_xact",
];
const DATA_FILES: [&str; 1] = ["PG_VERSION"];
/// Read by the recovery of the copy, then renamed .old by it and trimmed.
const RECOVERY_FILES: [&str; 2] = ["backup_label", "tablespace_map"];

/// ALTER SYSTEM's file: always read from the data directory, whatever config_file says, so
/// the source's (archive_mode, primary_conninfo with its password...) is replaced.
const AUTO_CONF: &str = "postgresql.auto.conf";
const AUTO_CONF_TEXT: &str = "# Written by bakedb. The source's ALTER SYSTEM settings are not baked: the image's\n\
# configuration is bakedb's own (profile postgres-readonly in /etc/bakedb/image.json).\n";

/// Where a connection to the copy can reach nothing: a subscription's connection string is
/// replaced by this before DROP SUBSCRIPTION, which otherwise connects to the publisher to
/// drop the slots of tables still being synchronised.
const UNREACHABLE_CONNINFO: &str = "host=/nonexistent/bakedb port=1 dbname=none connect_timeout=1";

fn remove_path(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("reading", path)(e)),
    };
    if meta.is_dir() {
        fs::remove_dir_all(path).map_err(io("removing", path))
    } else {
        fs::remove_file(path).map_err(io("removing", path))
    }
}

/// Remove everything at the top of `pgdata` that is not PostgreSQL's own data and put
/// bakedb's postgresql.auto.conf in place of the source's. Returns the names removed.
fn keep_only_data(pgdata: &Path, keep_recovery_files: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for e in fs::read_dir(pgdata).map_err(io("reading", pgdata))? {
        let e = e.map_err(io("reading", pgdata))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let keep = (is_dir && DATA_DIRS.contains(&name.as_str()))
            || (!is_dir && DATA_FILES.contains(&name.as_str()))
            || (!is_dir && keep_recovery_files && RECOVERY_FILES.contains(&name.as_str()));
        if !keep {
            remove_path(&e.path())?;
            if name != AUTO_CONF {
                removed.push(name);
            }
        }
    }
    let auto = pgdata.join(AUTO_CONF);
    fs::write(&auto, AUTO_CONF_TEXT).map_err(io("writing", &auto))?;
    fs::set_permissions(&auto, fs::Permissions::from_mode(0o600))
        .map_err(io("setting the mode of", &auto))?;
    removed.sort();
    Ok(removed)
}

/// Remove what a clean start does not read: files a running server recreates, and WAL
/// segments other than the one holding the shutdown checkpoint (recycled segments are up
/// to min_wal_size of preallocated garbage in every image).
fn trim(pgdata: &Path, redo_wal_file: &str) -> Result<()> {
    for f in [
        "postmaster.opts",
        "postmaster.pid",
        "backup_label.old",
        "tablespace_map.old",
        "backup_manifest",
        "global/pg_internal.init",
        "current_logfiles",
    ] {
        remove_path(&pgdata.join(f))?;
    }
    // Relcache init files of every database, in the default tablespace and in-place ones.
    let mut db_dirs = vec![pgdata.join("base")];
    if let Ok(spaces) = fs::read_dir(pgdata.join("pg_tblspc")) {
        for space in spaces.flatten() {
            for version_dir in fs::read_dir(space.path()).into_iter().flatten().flatten() {
                db_dirs.push(version_dir.path());
            }
        }
    }
    for dir in db_dirs {
        for db in fs::read_dir(&dir).map_err(io("reading", &dir))? {
            let db = db.map_err(io("reading", &dir))?;
            remove_path(&db.path().join("pg_internal.init"))?;
        }
    }
    for dir in ["pg_stat", "pg_stat_tmp", "pg_wal/archive_status"] {
        let d = pgdata.join(dir);
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries {
                remove_path(&e.map_err(io("reading", &d))?.path())?;
            }
        }
    }
    let wal = pgdata.join("pg_wal");
    for e in fs::read_dir(&wal).map_err(io("reading", &wal))? {
        let e = e.map_err(io("reading", &wal))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_segment = name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit());
        if is_segment && name != redo_wal_file {
            remove_path(&e.path())?;
        }
    }
    Ok(())
}

/// Every directory and regular file under `pgdata`, as they go into the image under
/// `pgdata/`. A symbolic link (a tablespace not baked in place, a relocated pg_wal) is
/// refused.
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
                // Relation files, SLRUs and WAL are 8 KiB pages; anything else (PG_VERSION,
                // pg_filenode.map) is one unit.
                let page_size = if meta.len() > 0 && meta.len().is_multiple_of(PAGE_SIZE) {
                    PAGE_SIZE as u32
                } else {
                    0
                };
                // Relation pages start with pd_lsn and pd_checksum, which the copy's VACUUM
                // rewrites on every page it touches, changed tuples or not.
                let page_header = if page_size > 0 && is_relation_file(&child_rel) {
                    PAGE_HEADER
                } else {
                    0
                };
                files.push(DataFile {
                    rel_path: child_rel,
                    host_path: path,
                    mode: meta.permissions().mode() & 0o7777,
                    page_size,
                    page_header,
                });
            } else {
                return Err(err(
                    "collecting the data directory",
                    format!(
                        "{} is not a regular file or directory (a relocated pg_wal, or a tablespace created after the backup started?); bakedb bakes self-contained data directories only",
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

/// An SQL identifier, quoted.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings is on in the scratch sessions).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A `-T OLDDIR=NEWDIR` value for pg_basebackup: '=' in either directory is escaped.
fn tablespace_mapping(old: &str, new: &Path) -> String {
    let esc = |s: &str| s.replace('=', "\\=");
    format!("{}={}", esc(old), esc(&new.to_string_lossy()))
}

/// What `bakedb snapshot` and `bakedb build` ask of the snapshot.
pub struct Request<'a> {
    pub tools: &'a Tools,
    pub source: &'a Source,
    pub info: &'a SourceInfo,
    pub accept: Accept,
    /// Existing directory; the data directory appears there, as `pgdata`, only once complete.
    pub out_dir: &'a Path,
    /// bakedb's clock when the snapshot was taken, recorded in image.json.
    pub taken_at: &'a str,
    /// fsync the copy: wanted for a snapshot directory that outlives the command.
    pub durable: bool,
    /// A re-bake's REF checkpoint LSN ("X/Y"): the copy's new WAL starts after it, because
    /// the re-bake writes REF's page headers (LSNs of REF's WAL) back into unchanged pages.
    pub wal_after: Option<&'a str>,
}

/// Snapshot the live server into `out_dir/pgdata`, ready to bake.
pub fn snapshot(req: &Request, progress: &mut dyn FnMut(&str)) -> Result<Snapshot> {
    let Request {
        tools,
        source,
        info,
        accept,
        out_dir,
        taken_at,
        durable,
        wal_after,
    } = *req;
    // pg_basebackup maps tablespaces to absolute directories only.
    let out_dir = &fs::canonicalize(out_dir).map_err(io("resolving", out_dir))?;
    let partial = out_dir.join(".pgdata.partial");
    let spaces = out_dir.join(".tblspc.partial");
    for dir in [&partial, &spaces] {
        remove_path(dir)?;
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
        use std::os::unix::fs::MetadataExt;
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
        source.apply(&mut cmd);
        cmd.arg("-d")
            .arg(source.url())
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
        // Tablespaces land beside the copy and become in-place tablespaces below.
        for ts in &info.tablespaces {
            cmd.arg("-T").arg(tablespace_mapping(
                &ts.location,
                &spaces.join(ts.oid.to_string()),
            ));
        }
        if !durable {
            cmd.arg("--no-sync");
        }
        let out = cmd.output().map_err(io("running", &basebackup))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            let why = log
                .lines()
                .map(|l| l.strip_prefix("pg_basebackup: error: ").unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n");
            let hint = if why.contains("replication") || why.contains("pg_hba.conf") {
                " (the user in the URL needs the REPLICATION attribute and a `replication` line in the source's pg_hba.conf)"
            } else {
                ""
            };
            return Err(err("pg_basebackup", format!("{}{hint}", why.trim())));
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
        // The source's own clock when the backup started, and whether it ran on a standby
        // (backup_label is renamed by the recovery below).
        let label = fs::read_to_string(partial.join("backup_label")).unwrap_or_default();
        let label_field = |key: &str| {
            label
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|t| t.trim().to_owned())
        };
        let source_time = label_field("START TIME:");
        let backup_from = label_field("BACKUP FROM:");

        // In-place tablespaces: the directory itself under pg_tblspc instead of a link to
        // a path of this machine (PostgreSQL 15 runs them; pg_tablespace_location then
        // answers pg_tblspc/OID).
        let tblspc = partial.join("pg_tblspc");
        for ts in &info.tablespaces {
            let link = tblspc.join(ts.oid.to_string());
            remove_path(&link)?;
            let moved = spaces.join(ts.oid.to_string());
            fs::rename(&moved, &link).map_err(io("moving the tablespace into", &link))?;
        }
        remove_path(&spaces)?;
        let excluded = keep_only_data(&partial, true)?;

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
        let copy_needs = settings_for(&controldata(tools, &partial)?);
        let mut server = Scratch {
            tools,
            pgdata: partial.clone(),
            run_dir: run_dir.clone(),
            user,
            child: None,
            log: run_dir.join("postgres.log"),
        };
        progress("recovery to the backup's end point");
        server.start(&copy_needs)?;
        let su = info.superuser.as_str();
        // Any database that allows connections will do for cluster-wide statements; template1
        // is the one every cluster has.
        let maint = "template1";
        if server.psql(su, maint, "SELECT pg_is_in_recovery()")?.trim() != "f" {
            return Err(err(
                "checking the copy",
                "the scratch server is still in recovery after the backup's end point",
            ));
        }

        // The authoritative look: as the superuser, in every database, at the snapshot point.
        progress("checking the copy");
        let found = look(&|db, sql| server.query(su, db.unwrap_or(maint), sql), true)?;
        if let Some(why) = found.refusal(accept) {
            return Err(err(
                format!("{} cannot be baked faithfully", source.redacted()),
                why,
            ));
        }
        for (db, gid) in &found.prepared {
            server.exec(su, db, &[format!("ROLLBACK PREPARED {}", literal(gid))])?;
        }
        for (db, name) in &found.subscriptions {
            let sub = ident(name);
            server.exec(
                su,
                db,
                &[
                    format!("ALTER SUBSCRIPTION {sub} DISABLE"),
                    format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)"),
                    format!(
                        "ALTER SUBSCRIPTION {sub} CONNECTION {}",
                        literal(UNREACHABLE_CONNINFO)
                    ),
                    format!("DROP SUBSCRIPTION {sub}"),
                ],
            )?;
        }
        if !found.subscriptions.is_empty() {
            // The connection strings' bytes leave the shared catalog's pages with a rewrite.
            server.exec(
                su,
                maint,
                &["VACUUM FULL pg_catalog.pg_subscription".to_owned()],
            )?;
        }
        let foreign_dbs: BTreeSet<&String> = found
            .foreign_servers
            .iter()
            .map(|(d, _)| d)
            .chain(found.user_mappings.iter().map(|(d, _, _)| d))
            .collect();
        for db in foreign_dbs {
            server.exec(
                su,
                db,
                &[
                    "DO $bakedb$ DECLARE r record; BEGIN \
                       FOR r IN SELECT srvname, usename FROM pg_catalog.pg_user_mappings LOOP \
                         EXECUTE format('DROP USER MAPPING FOR %s SERVER %I', \
                           CASE WHEN r.usename = 'public' THEN 'PUBLIC' ELSE quote_ident(r.usename) END, \
                           r.srvname); \
                       END LOOP; END $bakedb$"
                        .to_owned(),
                    // No validator runs on a direct update: an FDW that insists on an
                    // option cannot stop its removal.
                    "UPDATE pg_catalog.pg_foreign_server SET srvoptions = NULL WHERE srvoptions IS NOT NULL"
                        .to_owned(),
                    "VACUUM FULL pg_catalog.pg_user_mapping".to_owned(),
                    "VACUUM FULL pg_catalog.pg_foreign_server".to_owned(),
                ],
            )?;
        }
        let passwordless: Vec<String> = server
            .query(
                su,
                maint,
                "SELECT rolname FROM pg_catalog.pg_authid WHERE rolcanlogin AND rolpassword IS NULL ORDER BY 1",
            )?
            .into_iter()
            .filter_map(|r| r.into_iter().next())
            .collect();

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
                    .client("vacuumdb", su)
                    .args(["--all", flag, "--quiet"])
                    .arg(format!("--jobs={jobs}"))
                    .output(),
                &tools.bin.join("vacuumdb"),
            )?;
        }
        server.psql(su, maint, "CHECKPOINT")?;
        progress("clean shutdown");
        server.stop()?;

        check_shut_down(&controldata(tools, &partial)?)?;
        // Fresh WAL, always: a clean start reads one segment, the one with the shutdown
        // checkpoint, and opens it read-write (16 MiB in every image and, on overlayfs,
        // copied up in every replica: 1 MiB segments instead), and the old WAL holds
        // records of the backup window and of the fix-ups above (a dropped subscription's
        // connection string, a removed user mapping). pg_resetwal on a cleanly shut down
        // cluster needs nothing from the old WAL.
        progress("pg_resetwal --wal-segsize=1");
        let mut resetwal = server.as_user(tools.cmd("pg_resetwal"));
        resetwal.args(["--wal-segsize=1"]);
        if let Some(name) = wal_after.and_then(wal_file_after) {
            // pg_resetwal starts at the later of this and what the copy needs.
            resetwal.arg("-l").arg(name);
        }
        checked(
            "writing fresh WAL for the copy",
            resetwal
                .arg("-D")
                .arg(&partial)
                .stdin(Stdio::null())
                .output(),
            &tools.bin.join("pg_resetwal"),
        )?;
        let control = controldata(tools, &partial)?;
        check_shut_down(&control)?;
        let redo_file = lookup(&control, "Latest checkpoint's REDO WAL file")
            .ok_or_else(|| err("checking the copy", "pg_controldata shows no REDO WAL file"))?
            .to_owned();
        trim(&partial, &redo_file)?;
        keep_only_data(&partial, false)?;
        if durable {
            crate::datafiles::sync_tree(&partial)?;
        }
        let final_dir = out_dir.join(PGDATA);
        remove_path(&final_dir)?;
        fs::rename(&partial, &final_dir).map_err(io("renaming", &final_dir))?;
        let (dirs, files) = collect(&final_dir)?;

        let mut notes = found.notes(accept);
        if !excluded.is_empty() {
            notes.push(format!(
                "not baked from the source's data directory (the image runs bakedb's configuration; keys and credentials stay out): {}",
                list(&excluded, 30)
            ));
        }
        if !info.settings.not_carried.is_empty() {
            let names: Vec<String> = info.settings.not_carried.iter().cloned().collect();
            notes.push(format!(
                "settings of the source not carried into the image (replication, archiving, TLS, paths, resources, logging, custom settings): {}",
                list(&names, 40)
            ));
        }
        if !passwordless.is_empty() {
            notes.push(format!(
                "login roles without a password can log in to the image only over its Unix socket, inside the container: {}",
                list(&passwordless, 20)
            ));
        }
        if !info.tablespaces.is_empty() {
            let names: Vec<String> = info.tablespaces.iter().map(|t| t.name.clone()).collect();
            notes.push(format!(
                "tablespaces are baked in place, under pg_tblspc in the data directory (pg_tablespace_location answers pg_tblspc/OID): {}",
                list(&names, 20)
            ));
        }
        let databases: Vec<&String> = found.databases.iter().map(|d| &d.name).collect();
        let mut provenance = json!({
            "source": source.redacted(),
            "server_role": if info.in_recovery { "standby" } else { "primary" },
            "taken_at": taken_at,
            "method": "pg_basebackup, then ANALYZE, VACUUM (FREEZE), CHECKPOINT, a clean shutdown and fresh WAL",
            "server_version": info.server_version,
            "major": info.major,
            "databases": databases,
            "position": {
                "lsn": end_lsn,
                "start_lsn": start_lsn,
                "start_time": source_time,
                "backup_from": backup_from,
                "timeline": timeline,
                "system_identifier": lookup(&control, "Database system identifier"),
                "checkpoint_lsn": lookup(&control, "Latest checkpoint location"),
            },
            "notes": notes,
        });
        for (key, value) in needs(&found, &info.settings) {
            provenance[key] = value;
        }
        Ok(Snapshot {
            engine: "postgres",
            files,
            dirs,
            hashed: Default::default(),
            partial: false,
            provenance,
        })
    })();
    let _ = fs::remove_dir_all(&run_dir);
    if result.is_err() {
        let _ = remove_path(&partial);
        let _ = remove_path(&spaces);
    }
    result
}

/// What the snapshot needs from the base image and carries into its configuration, as
/// image.json records it: `settings` (the source's settings the image keeps) and
/// `requires` (locales of the databases and of the carried lc_* settings, installed
/// extensions with their versions). `Base::fit` checks it.
pub(crate) fn needs(
    found: &Findings,
    settings: &SourceSettings,
) -> serde_json::Map<String, serde_json::Value> {
    let mut locales: BTreeSet<&String> = found
        .databases
        .iter()
        .flat_map(|d| [&d.collate, &d.ctype])
        .collect();
    locales.extend(
        settings
            .carried
            .iter()
            .filter(|(name, _)| name.starts_with("lc_"))
            .map(|(_, value)| value),
    );
    let extensions: serde_json::Map<String, serde_json::Value> = found
        .extensions
        .iter()
        .map(|(name, (version, _))| (name.clone(), json!(version)))
        .collect();
    let mut map = serde_json::Map::new();
    map.insert("settings".into(), json!(settings.carried));
    map.insert(
        "requires".into(),
        json!({"locales": locales, "extensions": extensions}),
    );
    map
}

/// The name of the 1 MiB WAL segment after the one holding `lsn` ("X/Y"), on timeline 1
/// (pg_resetwal takes its segment number; the copy keeps its own timeline).
fn wal_file_after(lsn: &str) -> Option<String> {
    let (hi, lo) = lsn.split_once('/')?;
    let lsn = (u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?;
    let segment = (lsn >> 20) + 1;
    // 4096 segments of 1 MiB per "xlogid" (4 GiB).
    Some(format!(
        "{:08X}{:08X}{:08X}",
        1,
        segment >> 12,
        segment & 0xfff
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(d: &Path, files: &[&str]) {
        for f in files {
            let p = d.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
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
            "pg_tblspc/16390/PG_15_202209061/5",
        ] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        touch(
            d,
            &[
                "postmaster.opts",
                "global/pg_internal.init",
                "global/pg_control",
                "base/5/pg_internal.init",
                "base/5/1259",
                "pg_tblspc/16390/PG_15_202209061/5/pg_internal.init",
                "pg_tblspc/16390/PG_15_202209061/5/16391",
                "pg_stat/pgstat.stat",
                "pg_wal/000000010000000000000003",
                "pg_wal/000000010000000000000004",
                "pg_wal/00000002.history",
                "pg_wal/archive_status/000000010000000000000003.done",
            ],
        );
        trim(d, "000000010000000000000003").unwrap();
        let (dirs, files) = collect(d).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.rel_path.as_str()).collect();
        assert_eq!(
            names,
            [
                "pgdata/base/5/1259",
                "pgdata/global/pg_control",
                "pgdata/pg_tblspc/16390/PG_15_202209061/5/16391",
                "pgdata/pg_wal/000000010000000000000003",
                "pgdata/pg_wal/00000002.history",
            ]
        );
        assert!(
            dirs.iter().any(|d| d.rel_path == "pgdata/pg_stat"),
            "empty dirs are kept"
        );
        assert!(dirs.iter().any(|d| d.rel_path == "pgdata"));
        std::os::unix::fs::symlink("/elsewhere", d.join("pg_tblspc/16400")).unwrap();
        let e = collect(d).unwrap_err().to_string();
        assert!(e.contains("tablespace"), "{e}");
    }

    #[test]
    fn only_postgresql_data_stays() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        touch(
            d,
            &[
                "PG_VERSION",
                "base/5/1259",
                "global/pg_control",
                "postgresql.conf",
                "pg_hba.conf",
                "pg_ident.conf",
                "server.key",
                "server.crt",
                "standby.signal",
                "postgresql.auto.conf",
                "backup_label",
                "log/postgresql-Mon.log",
            ],
        );
        fs::create_dir(d.join("pg_wal")).unwrap();
        let removed = keep_only_data(d, true).unwrap();
        assert_eq!(
            removed,
            [
                "log",
                "pg_hba.conf",
                "pg_ident.conf",
                "postgresql.conf",
                "server.crt",
                "server.key",
                "standby.signal"
            ]
        );
        assert!(d.join("backup_label").exists());
        let auto = fs::read_to_string(d.join(AUTO_CONF)).unwrap();
        assert!(auto.starts_with("# Written by bakedb"), "{auto}");
        let removed = keep_only_data(d, false).unwrap();
        assert_eq!(removed, ["backup_label"]);
        let mut left: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "PG_VERSION",
                "base",
                "global",
                "pg_wal",
                "postgresql.auto.conf"
            ]
        );
    }

    #[test]
    fn the_wal_starts_after_refs() {
        assert_eq!(
            wal_file_after("0/370001E8").unwrap(),
            "000000010000000000000371"
        );
        assert_eq!(
            wal_file_after("1/FFF00000").unwrap(),
            "000000010000000200000000"
        );
        assert!(wal_file_after("nonsense").is_none());
    }

    #[test]
    fn relation_files() {
        for yes in [
            "pgdata/base/5/1259",
            "pgdata/base/16384/16385_fsm",
            "pgdata/base/16384/16385_vm",
            "pgdata/base/16384/16385.1",
            "pgdata/global/1262",
            "pgdata/pg_tblspc/16390/PG_15_202209061/5/16391",
        ] {
            assert!(is_relation_file(yes), "{yes}");
        }
        for no in [
            "pgdata/global/pg_control",
            "pgdata/global/pg_filenode.map",
            "pgdata/pg_xact/0000",
            "pgdata/pg_wal/000000010000000000000003",
            "pgdata/base/5/PG_VERSION",
            "pgdata/base/5/1259.x",
        ] {
            assert!(!is_relation_file(no), "{no}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(
            tablespace_mapping("/srv/a=b", Path::new("/tmp/x")),
            "/srv/a\\=b=/tmp/x"
        );
    }
}
