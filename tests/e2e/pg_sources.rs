//! PostgreSQL sources shaped like production ones: a primary with TLS files, ALTER SYSTEM
//! settings (archiving, a replication password, a time zone), UNLOGGED relations, a foreign
//! table with a user mapping, a subscription to a publisher, a prepared transaction,
//! tablespaces, roles with md5 hashes and without passwords, a non-default WAL segment
//! size; a streaming standby as the source; base images without PG_MAJOR or without what the
//! data needs. Each either bakes into an image that starts and serves exactly the source's
//! data with none of its secrets in any layer, or is refused before any work with a clear
//! error, its exit code and nothing written.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::pg::{self, PgOptions, PgServer, SEED_ITEMS_MD5};
use crate::postgres::{Replica, base_ref, writes_in};
use crate::require;
use crate::util::{self, bakedb, run, run_ok, stderr, stdout, test_dir, unique_name};

/// Secrets of the source server: none may appear in any layer of an image.
const REPL_SECRET: &str = "REPL-SECRET-4f1c9a";
const SUB_SECRET: &str = "SUB-SECRET-8b2e71";
const FDW_SECRET: &str = "FDW-SECRET-6d03f5";
const API_SECRET: &str = "APIKEY-SECRET-93ab0c";
const URL_SECRET: &str = "URL-SECRET-27c4d8";
const HBA_MARKER: &str = "HBA-MARKER-a61e02";

/// A self-signed key and certificate, PEM: (key, cert).
fn tls_files(dir: &Path) -> (String, String) {
    let openssl = util::tool("openssl").expect("openssl");
    run_ok(Command::new(openssl).current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "tls.key",
        "-out",
        "tls.crt",
        "-days",
        "2",
        "-subj",
        "/CN=bakedb-e2e-source",
    ]));
    (
        std::fs::read_to_string(dir.join("tls.key")).unwrap(),
        std::fs::read_to_string(dir.join("tls.crt")).unwrap(),
    )
}

/// A directory of the server tools in which pg_basebackup and psql log their argv (one
/// NUL-separated line per run, into `log`) before running the real ones: what `ps` shows.
fn logging_tools(real: &Path, dir: &Path, log: &Path) -> PathBuf {
    let bin = dir.join("logging-bin");
    std::fs::create_dir(&bin).unwrap();
    for e in std::fs::read_dir(real).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let target = bin.join(&name);
        if name == "pg_basebackup" || name == "psql" {
            std::fs::write(
                &target,
                format!(
                    "#!/bin/sh\nprintf '%s\\0' \"$0\" \"$@\" >> '{}'\necho >> '{}'\nexec '{}' \"$@\"\n",
                    log.display(),
                    log.display(),
                    e.path().display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        } else {
            std::os::unix::fs::symlink(e.path(), &target).unwrap();
        }
    }
    bin
}

/// Every blob of an OCI layout, gzip layers decompressed: what a registry stores and a node
/// unpacks.
fn layout_bytes(layout: &Path) -> Vec<(String, Vec<u8>)> {
    let mut blobs = Vec::new();
    for e in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let raw = std::fs::read(e.path()).unwrap();
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&raw[..]), &mut out)
                .unwrap();
            out
        } else {
            raw
        };
        blobs.push((e.file_name().to_string_lossy().into_owned(), bytes));
    }
    blobs
}

/// Every regular file under `dir`, read as root.
fn tree_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Load an OCI layout's image into docker under a unique name.
fn to_docker(docker: &Path, dir: &Path, layout: &str) -> util::DockerImage {
    let name = format!("bakedb-e2e/{}:v1", unique_name("pgsrc"));
    run_ok(
        Command::new(util::tool("skopeo").unwrap())
            .current_dir(dir)
            .args(["copy", "--quiet", layout])
            .arg(format!("docker-archive:img.tar:{name}")),
    );
    run_ok(
        Command::new(docker)
            .current_dir(dir)
            .args(["load", "--input", "img.tar"]),
    );
    std::fs::remove_file(dir.join("img.tar")).unwrap();
    util::DockerImage {
        docker: docker.to_owned(),
        name,
    }
}

fn docker_cli(docker: &Path) -> Box<dyn Fn() -> Command> {
    let docker = docker.to_owned();
    Box::new(move || Command::new(&docker))
}

/// A directory the server user can write, for a tablespace.
fn tablespace_dir(server: &PgServer, path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    server.own(path);
    path.canonicalize().unwrap()
}

#[test]
fn production_shaped_primary_bakes_faithfully_without_its_secrets() {
    let Some(pg_bin) = pg::pg_bin() else { return };
    let Some(docker) = util::docker() else { return };
    require!("skopeo");
    require!("openssl");
    let dir = test_dir();
    let d = dir.path();

    // The publisher the source subscribes to.
    std::fs::create_dir(d.join("pub")).unwrap();
    let Some(publisher) = PgServer::start_opts(
        &d.join("pub"),
        &PgOptions::default().setting("wal_level=logical"),
    ) else {
        return;
    };
    publisher.psql("postgres", "CREATE DATABASE pub");
    publisher.psql(
        "pub",
        "CREATE TABLE feed (id int PRIMARY KEY, v text);
         INSERT INTO feed SELECT i, 'feed ' || i FROM generate_series(1, 100) i;
         CREATE PUBLICATION pubfeed FOR TABLE feed;",
    );

    // The source: 64 MiB WAL segments, TLS, a preload library, config files with secrets.
    let (key, cert) = tls_files(d);
    let opts = PgOptions {
        initdb: vec!["--wal-segsize=64".into()],
        settings: [
            "wal_level=logical",
            "max_prepared_transactions=5",
            "shared_preload_libraries=pg_stat_statements",
            "ssl=on",
        ]
        .map(String::from)
        .into(),
        append: vec![
            ("server.key".into(), key.clone()),
            ("server.crt".into(), cert),
            ("pg_hba.conf".into(), format!("# {HBA_MARKER}\n")),
            (
                "postgresql.conf".into(),
                format!("app.api_key = '{API_SECRET}'\n"),
            ),
        ],
    };
    std::fs::create_dir(d.join("src")).unwrap();
    let mut source = PgServer::start_opts(&d.join("src"), &opts).unwrap();
    source.seed("app");
    for sql in [
        "ALTER SYSTEM SET archive_mode = on".to_owned(),
        "ALTER SYSTEM SET archive_command = '/bin/true'".to_owned(),
        format!(
            "ALTER SYSTEM SET primary_conninfo = 'host=10.9.9.9 user=repl password={REPL_SECRET}'"
        ),
        "ALTER SYSTEM SET TimeZone = 'America/New_York'".to_owned(),
        "ALTER SYSTEM SET DateStyle = 'SQL, DMY'".to_owned(),
        "ALTER SYSTEM SET extra_float_digits = 0".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        source.psql("postgres", &sql);
    }
    let ts1 = tablespace_dir(&source, &d.join("ts1"));
    let ts2 = tablespace_dir(&source, &d.join("ts2"));
    source.psql(
        "postgres",
        &format!("CREATE TABLESPACE ts1 LOCATION '{}'", ts1.display()),
    );
    source.psql(
        "postgres",
        &format!("CREATE TABLESPACE ts_empty LOCATION '{}'", ts2.display()),
    );
    source.psql(
        "app",
        &format!(
            "CREATE TABLE archived (id int PRIMARY KEY) TABLESPACE ts1;
             INSERT INTO archived SELECT generate_series(1, 500);
             CREATE UNLOGGED TABLE cache_u (k int); INSERT INTO cache_u VALUES (1), (2);
             CREATE UNLOGGED SEQUENCE useq; SELECT nextval('useq'), nextval('useq');
             CREATE EXTENSION postgres_fdw; CREATE EXTENSION pg_trgm;
             CREATE SERVER upstream FOREIGN DATA WRAPPER postgres_fdw
               OPTIONS (host '127.0.0.1', port '{port}', dbname 'pub');
             CREATE USER MAPPING FOR postgres SERVER upstream
               OPTIONS (user 'postgres', password '{FDW_SECRET}');
             CREATE FOREIGN TABLE remote_feed (id int, v text) SERVER upstream
               OPTIONS (table_name 'feed');
             SET password_encryption = 'md5';
             CREATE ROLE legacy LOGIN PASSWORD 'legacy-pw';
             GRANT SELECT ON items TO legacy;
             CREATE ROLE nopass LOGIN;
             CREATE TABLE feed (id int PRIMARY KEY, v text);",
            port = publisher.port()
        ),
    );
    source.psql(
        "app",
        &format!(
            "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=pub password={SUB_SECRET}' PUBLICATION pubfeed",
            publisher.port()
        ),
    );
    source.wait_for("app", "SELECT count(*) FROM feed", "100");
    source.wait_for(
        "app",
        "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        "0",
    );
    // The subscription stays enabled in the catalog, but the source runs no apply worker
    // for now: the publisher's slot holds rows 101..150 for it, which a baked copy that
    // replicated would take (and advance the slot, so that the source never gets them).
    source.restart(&["max_logical_replication_workers=0"]);
    publisher.psql(
        "pub",
        "INSERT INTO feed SELECT i, 'feed ' || i FROM generate_series(101, 150) i",
    );
    let slot_sql = "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'sub'";
    let slot_before = publisher.psql("postgres", slot_sql);
    source.psql(
        "app",
        "BEGIN; INSERT INTO items VALUES (-1, 'pending', 0, '{}'); PREPARE TRANSACTION 'pending-1';",
    );
    // The control for the secrets scan below: the source's own files do hold each secret.
    let source_files = tree_bytes(source.data_dir());
    for secret in [REPL_SECRET, SUB_SECRET, FDW_SECRET, API_SECRET, HBA_MARKER] {
        assert!(
            source_files.iter().any(|(_, b)| contains(b, secret)),
            "the source's data directory does not hold {secret}: the scan below could not find it"
        );
    }
    let key_line = key.lines().nth(1).unwrap().to_owned();
    let base = base_ref();

    // Refused up front: UNLOGGED relations and a foreign table, named, exit 4, nothing written.
    let out = run(bakedb(d)
        .args(["build", "--engine", "postgres", "--base", &base, "--pg-bin"])
        .arg(&pg_bin)
        .args(["--output", "oci:refused:v1", "--source"])
        .arg(source.url("app")));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    for want in [
        "cannot be baked faithfully",
        "app: public.cache_u (table)",
        "app: public.useq (sequence)",
        "app: public.remote_feed (server upstream, postgres_fdw)",
        "--accept empty-unlogged",
        "--accept offline-foreign-tables",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!d.join("refused").exists());

    // Accepted, from a URL with a password, while the source takes writes.
    let argv_log = d.join("argv.log");
    let logging_bin = logging_tools(&pg_bin, d, &argv_log);
    let load = source.write_load("app", "writes");
    let before = load.committed();
    let url = format!(
        "postgresql://postgres:{URL_SECRET}@127.0.0.1:{}/app",
        source.port()
    );
    let out = run(bakedb(d)
        .args(["build", "--engine", "postgres", "--base", &base, "--pg-bin"])
        .arg(&logging_bin)
        .args([
            "--accept",
            "empty-unlogged",
            "--accept",
            "offline-foreign-tables",
            "--output",
            "oci:img:v1",
            "--source",
            &url,
        ]));
    let after = load.committed();
    load.stop();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    for want in [
        "warning: UNLOGGED relations are baked empty",
        "warning: foreign tables are baked offline",
        "user mapping",
        "subscriptions were dropped from the copy",
        "app: pending-1",
        "server.key",
        "pg_hba.conf",
        "primary_conninfo",
        "nopass",
        "ts1",
        "ts_empty",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(
        !err.contains(URL_SECRET) && !err.contains(REPL_SECRET),
        "{err}"
    );
    let argv = std::fs::read_to_string(&argv_log).unwrap();
    assert!(
        argv.contains("pg_basebackup") && argv.contains("psql"),
        "the tools were not run through the logging directory: {argv:?}"
    );
    assert!(
        !argv.contains(URL_SECRET),
        "a password on a command line: {argv:?}"
    );

    // No secret of the source in any blob of the image.
    let blobs = layout_bytes(&d.join("img"));
    for secret in [
        REPL_SECRET,
        SUB_SECRET,
        FDW_SECRET,
        API_SECRET,
        URL_SECRET,
        HBA_MARKER,
        key_line.as_str(),
    ] {
        for (digest, bytes) in &blobs {
            assert!(!contains(bytes, secret), "blob {digest} holds {secret}");
        }
    }

    let inspect: Value =
        serde_json::from_slice(&run_ok(bakedb(d).args(["inspect", "--json", "oci:img:v1"])).stdout)
            .unwrap();
    let image_json = &inspect["image_json"];
    assert_eq!(
        image_json["snapshot"]["server_role"], "primary",
        "{image_json}"
    );
    assert!(
        image_json["notes"].as_array().is_some_and(|n| n.len() >= 6),
        "{}",
        image_json["notes"]
    );
    let config_file = image_json["profile"]["files"][0]["content"]
        .as_str()
        .unwrap();
    assert!(
        config_file.contains("TimeZone = 'America/New_York'")
            && config_file.contains("shared_preload_libraries = 'pg_stat_statements'"),
        "{config_file}"
    );
    for absent in ["archive", "primary_conninfo", "ssl", "app.api_key"] {
        assert!(
            !config_file.contains(absent),
            "{absent} carried: {config_file}"
        );
    }

    // The replica: exactly the source's data at the snapshot point, the settings that
    // change answers, and nothing that reaches another server.
    let image = to_docker(&docker, d, "oci:img:v1");
    let replica = Replica::start(docker_cli(&docker), &image.name, &[], &pg_bin);
    replica.wait_ready();
    assert_eq!(replica.su("app", pg::ITEMS_MD5_SQL), SEED_ITEMS_MD5);
    let (rows, max_id) = writes_in(&replica);
    assert_eq!(rows, max_id, "not one consistent point");
    assert!(
        (before..=after).contains(&rows),
        "{before} <= {rows} <= {after}"
    );
    for (sql, want) in [
        ("SELECT count(*) FROM items WHERE id = -1", "0"),
        ("SELECT count(*) FROM pg_prepared_xacts", "0"),
        ("SELECT count(*) FROM archived", "500"),
        (
            "SELECT pg_tablespace_location(oid) LIKE 'pg_tblspc/%' FROM pg_tablespace WHERE spcname = 'ts1'",
            "t",
        ),
        ("SELECT count(*) FROM cache_u", "0"),
        ("SELECT last_value FROM useq", "1"),
        ("SELECT count(*) FROM feed", "100"),
        ("SELECT count(*) FROM pg_subscription", "0"),
        ("SELECT count(*) FROM pg_user_mappings", "0"),
        (
            "SELECT count(*) FROM pg_foreign_server WHERE srvoptions IS NOT NULL",
            "0",
        ),
        ("SHOW archive_mode", "off"),
        ("SHOW primary_conninfo", ""),
        ("SHOW ssl", "off"),
        ("SHOW max_logical_replication_workers", "0"),
        ("SHOW shared_preload_libraries", "pg_stat_statements"),
        ("SELECT current_setting('app.api_key', true) IS NULL", "t"),
    ] {
        assert_eq!(replica.su("app", sql), want, "{sql}");
    }
    // Settings that change answers: the same answer as on the source.
    for sql in [
        "SHOW TimeZone",
        "SHOW DateStyle",
        "SELECT '2024-03-01 12:00+00'::timestamptz::text",
        "SELECT (1.0 / 3)::float8::text",
    ] {
        assert_eq!(replica.su("app", sql), source.psql("app", sql), "{sql}");
    }
    let out = replica.exec_psql("app", "SELECT * FROM remote_feed");
    assert!(
        !out.status.success() && stderr(&out).contains("user mapping not found"),
        "{}",
        stderr(&out)
    );
    // A role with an md5 hash logs in over TCP.
    let legacy = run(Command::new(pg_bin.join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            "legacy",
            "-d",
            "app",
            "-p",
        ])
        .arg(replica.port.to_string())
        .args(["-c", "SELECT count(*) FROM items"])
        .env("PGPASSWORD", "legacy-pw"));
    assert!(legacy.status.success(), "{}", stderr(&legacy));
    assert_eq!(stdout(&legacy).trim(), pg::SEED_ITEMS.to_string());

    // Neither the bake nor the running replica touched the publisher's slot; the real
    // subscriber, given its apply worker back, receives every row.
    assert_eq!(publisher.psql("postgres", slot_sql), slot_before);
    replica.stop_cleanly();
    assert_eq!(publisher.psql("postgres", slot_sql), slot_before);
    source.restart(&[]);
    source.wait_for("app", "SELECT count(*) FROM feed", "150");
    drop(image);
}

#[test]
fn a_streaming_standby_is_a_source() {
    let Some(pg_bin) = pg::pg_bin() else { return };
    let podman = require!("podman");
    require!("runc");
    let dir = test_dir();
    let d = dir.path();
    std::fs::create_dir(d.join("primary")).unwrap();
    let Some(primary) = PgServer::start(&d.join("primary")) else {
        return;
    };
    primary.seed("app");
    let ts = tablespace_dir(&primary, &d.join("ts"));
    primary.psql(
        "postgres",
        &format!("CREATE TABLESPACE ts LOCATION '{}'", ts.display()),
    );
    primary.psql(
        "app",
        "CREATE TABLE archived (id int) TABLESPACE ts; INSERT INTO archived SELECT generate_series(1, 300)",
    );
    std::fs::create_dir(d.join("standby")).unwrap();
    let standby = PgServer::standby_of(
        &primary,
        &d.join("standby"),
        &[(&ts, &d.join("standby-ts"))],
    );
    assert_eq!(standby.psql("app", "SELECT pg_is_in_recovery()"), "t");
    let load = primary.write_load("app", "writes");
    standby.wait_for("app", "SELECT count(*) > 0 FROM writes", "t");

    run_ok(
        bakedb(d)
            .args([
                "snapshot", "--engine", "postgres", "--out", "snap", "--pg-bin",
            ])
            .arg(&pg_bin)
            .arg("--source")
            .arg(standby.url("app")),
    );
    let total = load.stop();
    // The standby is still a standby, following its primary.
    assert_eq!(standby.psql("app", "SELECT pg_is_in_recovery()"), "t");
    standby.wait_for("app", "SELECT count(*) FROM writes", &total.to_string());

    let meta: Value =
        serde_json::from_slice(&std::fs::read(d.join("snap/snapshot.json")).unwrap()).unwrap();
    let provenance = &meta["provenance"];
    assert_eq!(provenance["server_role"], "standby", "{provenance}");
    assert_eq!(
        provenance["position"]["backup_from"], "standby",
        "{provenance}"
    );
    assert!(
        !d.join("snap/pgdata/standby.signal").exists()
            && !d.join("snap/pgdata/postgresql.conf").exists(),
        "the standby's signal and config files were baked"
    );
    run_ok(bakedb(d).args([
        "build",
        "--engine",
        "postgres",
        "--source",
        "snap",
        "--base",
        &base_ref(),
        "--output",
        "oci:img:v1",
    ]));
    let cli = {
        let (podman, d) = (podman.clone(), d.to_owned());
        move || util::podman_in(&podman, &d)
    };
    let replica = Replica::start(
        Box::new(cli),
        "oci:img:v1",
        &[
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ],
        &pg_bin,
    );
    replica.wait_ready();
    assert_eq!(replica.su("app", pg::ITEMS_MD5_SQL), SEED_ITEMS_MD5);
    assert_eq!(replica.su("app", "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(replica.su("app", "SELECT count(*) FROM archived"), "300");
    let (rows, max_id) = writes_in(&replica);
    assert_eq!(rows, max_id, "not one consistent point");
    assert!(rows >= 1 && rows <= total, "1 <= {rows} <= {total}");
    replica.stop_cleanly();
}

/// A copy of the PostgreSQL base fixture under `dir`, with tags made from `latest` by umoci:
/// `nomajor` (config Env cleared to a PATH without the server: no PG_MAJOR, no PG_VERSION,
/// as in images with the distribution's packages), `nolocale` (C.UTF-8 whited out) and
/// `noext` (pg_trgm's control file whited out).
fn derived_bases(dir: &Path) -> PathBuf {
    let umoci = util::tool("umoci").expect("umoci");
    let layout = dir.join("bases");
    util::copy_dir(&util::postgres_base(), &layout);
    let image = |tag: &str| format!("{}:{tag}", layout.display());
    run_ok(Command::new(&umoci).args([
        "config",
        "--image",
        &image("latest"),
        "--tag",
        "nomajor",
        "--clear=config.env",
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]));
    for (tag, whiteout) in [
        ("nolocale", "usr/lib/locale/.wh.C.utf8"),
        (
            "noext",
            "usr/share/postgresql/15/extension/.wh.pg_trgm.control",
        ),
    ] {
        let tar_path = dir.join(format!("{tag}.tar"));
        let mut tar = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        let mut header = tar::Header::new_ustar();
        header.set_size(0);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, whiteout, std::io::empty())
            .unwrap();
        tar.finish().unwrap();
        drop(tar);
        run_ok(
            Command::new(&umoci)
                .args([
                    "raw",
                    "add-layer",
                    "--image",
                    &image("latest"),
                    "--tag",
                    tag,
                ])
                .arg(&tar_path),
        );
    }
    layout
}

#[test]
fn base_images_are_read_from_their_files_and_refused_when_they_lack_what_the_data_needs() {
    let Some(pg_bin) = pg::pg_bin() else { return };
    let Some(docker) = util::docker() else { return };
    require!("umoci");
    require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    let layout = derived_bases(d);
    std::fs::create_dir(d.join("src")).unwrap();
    let Some(source) = PgServer::start(&d.join("src")) else {
        return;
    };
    source.seed("app");
    source.psql("app", "CREATE EXTENSION pg_trgm");

    for (tag, want) in [
        ("nolocale", "locale C.UTF-8"),
        ("noext", "extension pg_trgm"),
    ] {
        let out = run(bakedb(d)
            .args(["build", "--engine", "postgres", "--pg-bin"])
            .arg(&pg_bin)
            .arg("--base")
            .arg(format!("oci:{}:{tag}", layout.display()))
            .args(["--output", "oci:refused:v1", "--source"])
            .arg(source.url("app")));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(5), "{tag}: {err}");
        assert!(err.contains(want) && err.contains("lacks"), "{tag}: {err}");
        assert!(!d.join("refused").exists(), "{tag} wrote the output");
    }

    // No PG_MAJOR, no server on PATH: the version from postgres.bki, the server's directory
    // put on the image's PATH, and the image starts.
    run_ok(
        bakedb(d)
            .args(["build", "--engine", "postgres", "--pg-bin"])
            .arg(&pg_bin)
            .arg("--base")
            .arg(format!("oci:{}:nomajor", layout.display()))
            .args(["--output", "oci:img:v1", "--source"])
            .arg(source.url("app")),
    );
    let inspect: Value =
        serde_json::from_slice(&run_ok(bakedb(d).args(["inspect", "--json", "oci:img:v1"])).stdout)
            .unwrap();
    let env = inspect["config"]["Env"].to_string();
    assert!(
        env.contains("PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin"),
        "{env}"
    );
    let image = to_docker(&docker, d, "oci:img:v1");
    let replica = Replica::start(docker_cli(&docker), &image.name, &[], &pg_bin);
    replica.wait_ready();
    assert_eq!(replica.su("app", pg::ITEMS_MD5_SQL), SEED_ITEMS_MD5);
    assert_eq!(
        replica.su("app", "SELECT similarity('abc', 'abd') > 0"),
        "t"
    );
    replica.stop_cleanly();
    drop(image);
}
