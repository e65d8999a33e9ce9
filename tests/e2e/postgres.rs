//! PostgreSQL end to end: a live server (Debian's packages, started by the test) kept under
//! write load while bakedb snapshots it, the image built on the PostgreSQL base fixture and
//! run under docker and podman with host networking on a free port of 127.0.0.1: psql reads
//! return exactly the snapshot's rows, writes fail with SQLSTATE 25006, `stop -t 5` ends in
//! a clean shutdown (exit 0; a SIGKILL after the 5 s would make it 137), a restart of the
//! same container serves again, and a tampered relation file makes bakedb-init exit 3.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use bakedb_testkit::containers::{Container, docker_cli, podman, podman_cli};
use bakedb_testkit::ports::free_port;

use crate::pg::{self, PgServer, READER, READER_PASSWORD, SEED_ITEMS_MD5};
use crate::require;
use crate::util::{self, bakedb, run, run_ok, stderr, stdout, test_dir, unique_name};

/// Where the cluster lives in every postgres image bakedb builds.
pub(crate) const PGDATA: &str = "/var/lib/bakedb/pgdata";
/// psql's arguments for an answer: no psqlrc, unaligned tuples only, stop at the first error.
const PSQL_ANSWER: [&str; 5] = ["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"];

/// A replica container, removed (killed if need be) when dropped.
pub(crate) struct Replica {
    pub container: Container<Box<dyn Fn() -> Command>>,
    pub port: u16,
    pub pg_bin: PathBuf,
}

impl std::ops::Deref for Replica {
    type Target = Container<Box<dyn Fn() -> Command>>;

    fn deref(&self) -> &Self::Target {
        &self.container
    }
}

impl Replica {
    /// `run --detach --network host --env PGPORT=PORT IMAGE`: the image's own command. PGPORT
    /// is the port postgres listens on and the one psql and pg_isready (the healthcheck) use
    /// inside the container.
    pub(crate) fn start(
        cli: Box<dyn Fn() -> Command>,
        image: &str,
        extra: &[&str],
        pg_bin: &Path,
    ) -> Self {
        let replica = Replica {
            container: Container::new(cli, unique_name("bakedb-e2e-pg")),
            port: free_port(),
            pg_bin: pg_bin.to_owned(),
        };
        let port = format!("PGPORT={}", replica.port);
        let mut cmd = replica.cmd(&["run", "--detach", "--network", "host", "--env", &port]);
        cmd.arg("--name").arg(&replica.name).args(extra).arg(image);
        run_ok(&mut cmd);
        replica
    }

    /// Until the server accepts connections on its port (pg_isready), failing at once if
    /// the container stops, and after a minute.
    pub(crate) fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = run(Command::new(self.pg_bin.join("pg_isready")).args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ]));
            if ready.status.success() {
                return;
            }
            if self.inspect("{{.State.Running}}") != "true" {
                panic!(
                    "the replica stopped with {} before it was ready:\n{}",
                    self.exit_code(),
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the replica was not ready after a minute:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// psql over TCP as the seeded read-only role, with its password (scram-sha-256).
    pub(crate) fn reader(&self, db: &str, sql: &str) -> Output {
        run(Command::new(self.pg_bin.join("psql"))
            .args(PSQL_ANSWER)
            .args(["-v", "VERBOSITY=verbose"])
            .arg(format!(
                "postgresql://{READER}:{READER_PASSWORD}@127.0.0.1:{}/{db}",
                self.port
            ))
            .args(["-c", sql])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null()))
    }

    pub(crate) fn read(&self, db: &str, sql: &str) -> String {
        self.answer(sql, &self.reader(db, sql))
    }

    /// psql inside the container over the local socket as the superuser (trusted there).
    pub(crate) fn exec_psql(&self, db: &str, sql: &str) -> Output {
        run(&mut self.cmd(&[
            "exec",
            &self.name,
            "psql",
            "-X",
            "-U",
            "postgres",
            "-v",
            "VERBOSITY=verbose",
            "-d",
            db,
            "-c",
            sql,
        ]))
    }

    /// psql inside the container as the superuser, unaligned and tuples only: the answer,
    /// trimmed; panics with psql's stderr and the container's log on failure.
    pub(crate) fn su(&self, db: &str, sql: &str) -> String {
        let mut cmd = self.cmd(&["exec", &self.name, "psql"]);
        cmd.args(PSQL_ANSWER)
            .args(["-U", "postgres", "-d", db, "-c", sql]);
        self.answer(sql, &run(&mut cmd))
    }

    /// psql's answer to `sql`, trimmed; a failure panics with psql's stderr and the log.
    fn answer(&self, sql: &str, out: &Output) -> String {
        assert!(
            out.status.success(),
            "{sql}: {}\n{}",
            stderr(out),
            self.logs()
        );
        stdout(out).trim().to_owned()
    }

    /// `stop -t 5`: the image's STOPSIGNAL (SIGINT, fast shutdown) and SIGKILL after 5 s.
    /// Exit 0 with "database system is shut down" means PostgreSQL shut down cleanly within
    /// the 5 s; a kill would be 137 and leave no such line.
    pub(crate) fn stop_cleanly(&self) {
        run_ok(&mut self.cmd(&["stop", "--time", "5", &self.name]));
        let logs = self.logs();
        assert_eq!(self.exit_code(), 0, "stop -t 5:\n{logs}");
        assert!(
            logs.trim_end().ends_with("database system is shut down"),
            "no clean shutdown at the end of the log:\n{logs}"
        );
    }
}

/// What the image holds of the write load: (rows, highest id). One writer inserting rows
/// one commit at a time, so a consistent snapshot has no holes: rows == highest id.
pub(crate) fn writes_in(replica: &Replica) -> (u64, u64) {
    let line = replica.read("app", "SELECT count(*), coalesce(max(id), 0) FROM writes");
    let (n, max) = line.split_once('|').expect("count|max");
    (n.parse().unwrap(), max.parse().unwrap())
}

/// The checks every replica passes: exact rows, 25006 on writes (even for the superuser),
/// the read-only settings in force.
fn check_replica(replica: &Replica, committed_before: u64, committed_after: u64) -> u64 {
    replica.wait_ready();
    assert_eq!(
        replica.read("app", pg::ITEMS_MD5_SQL),
        SEED_ITEMS_MD5,
        "items differ from the source"
    );
    assert_eq!(
        replica.read("app", "SELECT count(*) FROM cheap_items"),
        replica.read("app", "SELECT count(*) FROM items WHERE price < 10"),
    );
    let (rows, max_id) = writes_in(replica);
    assert_eq!(
        rows, max_id,
        "the snapshot of a single writer's table has holes: not one consistent point"
    );
    assert!(
        (committed_before..=committed_after).contains(&rows),
        "the image holds {rows} rows of the write load, which had committed {committed_before} when the snapshot started and {committed_after} when it ended"
    );

    for sql in [
        "INSERT INTO items VALUES (0, 'x', 1, '{}')",
        "UPDATE items SET price = 0 WHERE id = 1",
        "CREATE TABLE t (x int)",
    ] {
        let out = replica.exec_psql("app", sql);
        assert!(!out.status.success(), "{sql} succeeded on the replica");
        assert!(
            stderr(&out).contains("25006"),
            "{sql}: expected SQLSTATE 25006 (read-only transaction):\n{}",
            stderr(&out)
        );
    }
    let out = replica.reader("app", "DELETE FROM items");
    assert!(
        !out.status.success() && stderr(&out).contains("25006"),
        "{}",
        stderr(&out)
    );
    let settings = replica.read(
        "app",
        "SELECT string_agg(name || '=' || setting, ',' ORDER BY name) FROM pg_settings WHERE name IN ('default_transaction_read_only', 'fsync', 'synchronous_commit', 'full_page_writes', 'autovacuum')",
    );
    assert_eq!(
        settings,
        format!(
            "autovacuum=off,default_transaction_read_only=on,fsync=off,full_page_writes=off,synchronous_commit=off"
        )
    );
    // Only a superuser may see where the data lives.
    let out = replica.exec_psql("app", "SHOW data_directory");
    assert!(
        stdout(&out).contains(PGDATA),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    rows
}

/// The source, seeded, with a write load running (at least one commit made).
fn live_source(dir: &Path) -> Option<(PgServer, pg::WriteLoad)> {
    std::fs::create_dir_all(dir).unwrap();
    let server = PgServer::start(dir)?;
    server.seed("app");
    let load = server.write_load("app", "writes");
    Some((server, load))
}

pub(crate) fn base_ref() -> String {
    format!("oci:{}:latest", util::postgres_base().display())
}

#[test]
fn docker_replica_of_a_live_server_under_write_load() {
    let Some(pg_bin) = pg::pg_bin() else { return };
    let Some(docker) = util::docker() else { return };
    require!("umoci");
    require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    let base = base_ref();
    let Some((server, load)) = live_source(&d.join("source")) else {
        return;
    };
    let items_file = server.psql("app", "SELECT pg_relation_filepath('items')");

    let name = format!("bakedb-e2e/{}:v1", unique_name("pg"));
    let before = load.committed();
    let out = run_ok(
        bakedb(d)
            .args(["build", "--engine", "postgres", "--json", "--source"])
            .arg(server.url("postgres"))
            .arg("--pg-bin")
            .arg(&pg_bin)
            .args(["--base", &base, "--pg-lazy-copyup", "--output"])
            .arg(format!("docker-archive:pg.tar:{name}")),
    );
    let after = load.committed();
    let total = load.stop();
    assert!(total > after, "the load kept committing after the build");
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        built["data_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    let image = util::DockerImage {
        docker: docker.clone(),
        name: name.clone(),
    };
    run_ok(
        Command::new(&docker)
            .current_dir(d)
            .args(["load", "--input", "pg.tar"]),
    );
    let config: Value = serde_json::from_str(&stdout(&run_ok(Command::new(&docker).args([
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &image.name,
    ]))))
    .unwrap();
    assert_eq!(config["StopSignal"], "SIGINT");
    assert_eq!(config["Healthcheck"]["Test"][1], "pg_isready", "{config}");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/bakedb/init"]));
    assert_eq!(config["Cmd"], serde_json::json!(["postgres"]));
    assert_eq!(config["User"], "999:999");

    let replica = Replica::start(docker_cli(&docker), &image.name, &[], &pg_bin);
    let rows = check_replica(&replica, before, after);
    let logs = replica.logs();
    assert!(logs.contains("bakedb-init: verified"), "{logs}");
    assert!(logs.contains("LD_PRELOAD=/bakedb/copyup.so"), "{logs}");
    // The reads went through the whole items table and its index, yet with the lazy copy-up
    // library neither was copied up into the container's writable layer.
    let items_in_image = format!("{PGDATA}/{items_file}");
    // Looked up in the container's upper directory itself: `docker diff` does not list a
    // file that was copied up but not changed.
    let copied_up = |replica: &Replica| {
        let upper = replica.inspect("{{.GraphDriver.Data.UpperDir}}");
        Path::new(&upper)
            .join(items_in_image.trim_start_matches('/'))
            .exists()
    };
    assert!(
        !copied_up(&replica),
        "{items_in_image} was copied up despite the shim"
    );
    assert!(
        run(&mut replica.cmd(&["exec", &replica.name, "pg_isready"]))
            .status
            .success()
    );

    replica.stop_cleanly();
    // The same container again: PostgreSQL wrote pg_control and WAL at its shutdown, init
    // knows it verified this container's data at the first start.
    run_ok(&mut replica.cmd(&["start", &replica.name]));
    replica.wait_ready();
    assert_eq!(replica.read("app", pg::ITEMS_MD5_SQL), SEED_ITEMS_MD5);
    assert_eq!(writes_in(&replica), (rows, rows));
    let logs = replica.logs();
    assert!(logs.contains("not verified again"), "{logs}");
    replica.stop_cleanly();

    // The control: the same image with the library switched off copies items up on reading
    // it, so the check above can tell.
    let control = Replica::start(
        docker_cli(&docker),
        &image.name,
        &["--env", "BAKEDB_COPYUP_SHIM=off"],
        &pg_bin,
    );
    control.wait_ready();
    assert_eq!(control.read("app", pg::ITEMS_MD5_SQL), SEED_ITEMS_MD5);
    assert!(
        copied_up(&control),
        "the control run did not copy {items_in_image} up"
    );
    control.stop_cleanly();

    // A new container of the same image with one byte of a relation file changed: init
    // names the file and exits 3; PostgreSQL never starts.
    let tampered = Container::new(docker_cli(&docker), unique_name("bakedb-e2e-pg-tampered"));
    run_ok(&mut tampered.cmd(&[
        "create",
        "--network",
        "none",
        "--name",
        &tampered.name,
        &image.name,
    ]));
    let in_image = items_in_image;
    let local = d.join("relation");
    tampered.copy_out(&in_image, &local);
    let mut bytes = std::fs::read(&local).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    // As a bit flip on the node's disk would: straight into the container's writable layer
    // with the owner and mode the image gives the file (`docker cp --archive` cannot name
    // uid 999, which has no passwd entry on the host side of docker's lookup).
    let upper = tampered.inspect("{{.GraphDriver.Data.UpperDir}}");
    let target = Path::new(&upper).join(in_image.trim_start_matches('/'));
    let mut parent = Path::new(&upper).to_owned();
    for part in Path::new(&in_image).parent().unwrap().components().skip(1) {
        parent.push(part);
        if !parent.exists() {
            std::fs::create_dir(&parent).unwrap();
            let pgdata_part =
                parent.starts_with(Path::new(&upper).join(PGDATA.trim_start_matches('/')));
            let mode = if pgdata_part { 0o700 } else { 0o755 };
            std::fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
            let owner = if parent.starts_with(Path::new(&upper).join("var/lib/bakedb")) {
                999
            } else {
                0
            };
            std::os::unix::fs::chown(&parent, Some(owner), Some(owner)).unwrap();
        }
    }
    std::fs::write(&target, &bytes).unwrap();
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&target, Some(999), Some(999)).unwrap();
    run_ok(&mut tampered.cmd(&["start", &tampered.name]));
    let code = stdout(&run_ok(&mut tampered.cmd(&["wait", &tampered.name])));
    let logs = tampered.logs();
    assert_eq!(code.trim(), "3", "{logs}");
    assert!(
        logs.contains(&in_image) && logs.contains("sha256"),
        "{logs}"
    );
    assert!(!logs.contains("starting PostgreSQL"), "{logs}");
    drop(server);
}

#[test]
fn podman_replica_from_a_snapshot_directory_and_reproducible_builds() {
    let Some(pg_bin) = pg::pg_bin() else { return };
    let Some(podman) = podman() else {
        return;
    };
    require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    let base = base_ref();
    let Some((server, load)) = live_source(&d.join("source")) else {
        return;
    };
    let before = load.committed();
    run_ok(
        bakedb(d)
            .args([
                "snapshot", "--engine", "postgres", "--out", "snap", "--source",
            ])
            .arg(server.url("postgres"))
            .arg("--pg-bin")
            .arg(&pg_bin),
    );
    let after = load.committed();
    load.stop();
    drop(server);
    let meta: Value =
        serde_json::from_slice(&std::fs::read(d.join("snap/snapshot.json")).unwrap()).unwrap();
    let lsn = meta["provenance"]["position"]["lsn"].as_str().unwrap();
    assert!(
        lsn.split_once('/').is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        }),
        "{meta}"
    );
    assert_eq!(meta["provenance"]["major"], 15, "{meta}");
    assert!(
        meta["provenance"]["position"]["start_time"]
            .as_str()
            .is_some_and(|t| t.len() >= 19),
        "the source's clock at the backup: {meta}"
    );
    // One WAL segment, of 1 MiB: the one with the shutdown checkpoint, rewritten small.
    let wal: Vec<(String, u64)> = std::fs::read_dir(d.join("snap/pgdata/pg_wal"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    assert!(
        wal.len() == 1 && wal[0].0.len() == 24 && wal[0].1 == 1 << 20,
        "{wal:?}"
    );

    // The same snapshot and SOURCE_DATE_EPOCH: the same image, byte for byte.
    let build = |out: &str| -> Value {
        let o = run_ok(bakedb(d).args([
            "build", "--engine", "postgres", "--source", "snap", "--base", &base, "--json",
            "--output", out,
        ]));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let one = build("oci:img:v1");
    let two = build("oci:img2:v1");
    assert_eq!(one["manifest_digest"], two["manifest_digest"]);

    let image_json = stdout(&run_ok(bakedb(d).args(["inspect", "--json", "oci:img:v1"])));
    assert!(
        image_json.contains(lsn),
        "inspect does not show the LSN:\n{image_json}"
    );

    let replica = Replica::start(
        podman_cli(&podman, d),
        "oci:img:v1",
        &[
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ],
        &pg_bin,
    );
    let rows = check_replica(&replica, before, after);
    replica.stop_cleanly();
    run_ok(&mut replica.cmd(&["start", &replica.name]));
    replica.wait_ready();
    assert_eq!(writes_in(&replica), (rows, rows));
    replica.stop_cleanly();
}

#[test]
fn postgres_build_errors_are_clear_and_leave_no_output() {
    let Some(pg_bin) = pg::pg_bin() else { return };
    require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    let base = base_ref();
    let busybox = format!("oci:{}:latest", util::busybox_base().display());
    let closed = format!("postgresql://postgres@127.0.0.1:{}/postgres", free_port());

    // A tools directory that says it is PostgreSQL 99.
    let fake = d.join("fake-bin");
    std::fs::create_dir(&fake).unwrap();
    for tool in [
        "pg_basebackup",
        "postgres",
        "pg_ctl",
        "pg_isready",
        "psql",
        "vacuumdb",
        "pg_controldata",
        "pg_resetwal",
    ] {
        let p = fake.join(tool);
        std::fs::write(&p, "#!/bin/sh\necho 'postgres (PostgreSQL) 99.1'\n").unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    // A snapshot directory of another major version.
    std::fs::create_dir_all(d.join("snap14/pgdata")).unwrap();
    std::fs::write(d.join("snap14/pgdata/PG_VERSION"), "14\n").unwrap();
    std::fs::write(
        d.join("snap14/snapshot.json"),
        r#"{"engine": "postgres", "provenance": {}}"#,
    )
    .unwrap();

    let pg_bin = pg_bin.display().to_string();
    let fake = fake.display().to_string();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--source", &closed], 2, "needs --base"),
        (
            &["--source", &closed, "--base", &busybox],
            5,
            "it has no PostgreSQL server",
        ),
        (
            &["--source", &closed, "--base", &base, "--pg-bin", &fake],
            2,
            "PostgreSQL 99",
        ),
        (
            &[
                "--source",
                "mysql://x/y",
                "--base",
                &base,
                "--pg-bin",
                &pg_bin,
            ],
            4,
            "not a PostgreSQL connection URI",
        ),
        (
            &["--source", &closed, "--base", &base, "--pg-bin", &pg_bin],
            4,
            "connecting to",
        ),
        (
            &["--source", "snap14", "--base", &base],
            5,
            "PostgreSQL 14 data directory and the base image has PostgreSQL 15",
        ),
    ];
    for (args, code, message) in cases {
        let out = run(bakedb(d)
            .args(["build", "--engine", "postgres", "--output", "oci:out:v1"])
            .args(*args));
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(!d.join("out").exists(), "{args:?} created the output");
    }
}
