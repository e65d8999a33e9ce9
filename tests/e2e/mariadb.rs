//! MariaDB end to end: a live server (Debian's packages, started by the test kit) with
//! InnoDB, Aria and MyISAM tables, a view, a trigger, a procedure and accounts, kept under
//! write load while bakedb snapshots it; the image built on the MariaDB base fixture and run
//! under docker and podman with host networking on a free port of 127.0.0.1 (the port given
//! as a server option on the container's command line, which wins over the profile's): the
//! rows are exactly those at the snapshot's binlog position, writes fail with MariaDB's
//! read-only errors, nothing under the data directory reaches the container's writable
//! layer, `stop -t 5` ends in a clean shutdown, a restart serves again, and a tampered data
//! file makes bakedb-init exit 3.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use bakedb_testkit::containers::{Container, docker_cli, podman_cli};
use bakedb_testkit::mariadb::{
    APP_PASSWORD, APP_USER, ED_PASSWORD, ED_USER, MariaServer, MariaWriteLoad, SEED_CHECKS,
    maria_tools, tcp_client,
};
use bakedb_testkit::pg::RunAs;
use bakedb_testkit::ports::free_port;

use crate::require;
use crate::util::{self, bakedb, run, run_ok, stderr, stdout, test_dir, unique_name};

/// `mariadb` over TCP to 127.0.0.1:`port` as `user`, no option files.
fn tcp(client: &Path, port: u16, user: &str, password: Option<&str>, sql: &str) -> Output {
    run(&mut tcp_client(client, port, user, password, sql))
}

/// Where the server's data lives in every mariadb image bakedb builds.
const DATADIR: &str = "/var/lib/bakedb/mysql";

pub(crate) fn base_ref() -> String {
    format!(
        "oci:{}:latest",
        bakedb_testkit::fixtures::mariadb_base().display()
    )
}

/// A replica container, removed (killed if need be) when dropped.
pub(crate) struct Replica {
    container: Container<Box<dyn Fn() -> Command>>,
    port: u16,
    client: std::path::PathBuf,
}

impl std::ops::Deref for Replica {
    type Target = Container<Box<dyn Fn() -> Command>>;

    fn deref(&self) -> &Self::Target {
        &self.container
    }
}

impl Replica {
    /// `run --detach --network host IMAGE mariadbd --port=PORT`: the port as a server option
    /// on the command line, after the profile's options (so it must win).
    pub(crate) fn start(
        cli: Box<dyn Fn() -> Command>,
        image: &str,
        extra: &[&str],
        client: &Path,
    ) -> Self {
        let replica = Replica {
            container: Container::new(cli, unique_name("bakedb-e2e-maria")),
            port: free_port(),
            client: client.to_owned(),
        };
        let mut cmd = replica.cmd(&["run", "--detach", "--network", "host"]);
        cmd.arg("--name")
            .arg(&replica.name)
            .args(extra)
            .arg(image)
            .arg("mariadbd")
            .arg(format!("--port={}", replica.port));
        run_ok(&mut cmd);
        replica
    }

    /// `mariadb` over TCP as the application's account, with its password.
    fn app(&self, sql: &str) -> Output {
        self.tcp(APP_USER, Some(APP_PASSWORD), sql)
    }

    /// `mariadb` over TCP as `user`.
    fn tcp(&self, user: &str, password: Option<&str>, sql: &str) -> Output {
        tcp(&self.client, self.port, user, password, sql)
    }

    pub(crate) fn read(&self, sql: &str) -> String {
        let out = self.app(sql);
        assert!(
            out.status.success(),
            "{sql}: {}\n{}",
            stderr(&out),
            self.logs()
        );
        stdout(&out).trim().to_owned()
    }

    /// `mariadb` inside the container as root on the profile's socket (root@localhost has
    /// no password in the seeded source, so it has none in the image either).
    fn root(&self, sql: &str) -> Output {
        run(&mut self.cmd(&[
            "exec",
            &self.name,
            "mariadb",
            "-uroot",
            "--batch",
            "--skip-column-names",
            "-e",
            sql,
        ]))
    }

    pub(crate) fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.app("SELECT 1").status.success() {
                return;
            }
            if !self.running() {
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

    /// Every path of the container's writable layer (its overlay upper directory).
    fn upper_paths(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                out.push(path.strip_prefix(root).unwrap().display().to_string());
                if path.is_dir() && !path.is_symlink() {
                    walk(root, &path, out);
                }
            }
        }
        let upper = self.inspect("{{.GraphDriver.Data.UpperDir}}");
        let mut out = Vec::new();
        walk(Path::new(&upper), Path::new(&upper), &mut out);
        out
    }

    /// `stop -t 5`: SIGTERM, the image's STOPSIGNAL, and SIGKILL after 5 s. Exit 0 with
    /// "Shutdown complete" at the end of the log means mariadbd shut down cleanly in time.
    pub(crate) fn stop_cleanly(&self) {
        run_ok(&mut self.cmd(&["stop", "--time", "5", &self.name]));
        let logs = self.logs();
        assert_eq!(self.exit_code(), 0, "stop -t 5:\n{logs}");
        assert!(
            logs.trim_end().ends_with("Shutdown complete"),
            "no clean shutdown at the end of the log:\n{logs}"
        );
    }
}

/// The source, seeded, with its answers to SEED_CHECKS, the GTID sequence number before the
/// load, and the load running.
struct Live {
    server: MariaServer,
    /// Whether root could log in over TCP (without a password) on the source.
    root_over_tcp: bool,
    answers: Vec<String>,
    /// The source's mysql.proc (PROC_ROWS), which a bake rebuilds before its zero-fill.
    procs: String,
    seq_before_load: u64,
}

/// Every stored routine, whole: mysql.proc of a 10.11 install stops aria_chk --zerofill at
/// a never-written page, so the snapshot rebuilds it (crates/engines/src/mariadb/snapshot.rs
/// `zerofill`), which must keep every row.
const PROC_ROWS: &str = "SELECT COUNT(*), MD5(GROUP_CONCAT(db, name, type, body ORDER BY db, name, type)) FROM mysql.proc";

pub(crate) fn gtid_seq(gtid: &str) -> u64 {
    gtid.rsplit('-').next().unwrap().parse().unwrap()
}

fn live_source(dir: &Path) -> Option<(Live, MariaWriteLoad)> {
    std::fs::create_dir_all(dir).unwrap();
    let server = MariaServer::start(dir)?;
    server.seed();
    let answers = SEED_CHECKS.iter().map(|sql| server.sql(sql)).collect();
    let procs = server.sql(PROC_ROWS);
    let seq_before_load = gtid_seq(&server.sql("SELECT @@gtid_binlog_pos"));
    let root_over_tcp = tcp(
        server.client_path(),
        server.port(),
        "root",
        None,
        "SELECT 1",
    )
    .status
    .success();
    let load = server.write_load();
    Some((
        Live {
            server,
            root_over_tcp,
            answers,
            procs,
            seq_before_load,
        },
        load,
    ))
}

/// The checks every replica passes: the seed as the source answered it; the write load's
/// rows exactly those at the binlog position image.json records; writes refused.
fn check_replica(replica: &Replica, live: &Live, image_json: &Value) {
    let (live_answers, seq_before_load) = (&live.answers, live.seq_before_load);
    replica.wait_ready();
    // The source's accounts with their passwords and plugins; root over TCP as the source
    // allowed it.
    assert!(
        replica
            .tcp(ED_USER, Some(ED_PASSWORD), "SELECT 1")
            .status
            .success()
    );
    assert!(
        !replica
            .tcp(ED_USER, Some("wrong"), "SELECT 1")
            .status
            .success()
    );
    assert!(
        !replica
            .tcp(APP_USER, Some("wrong"), "SELECT 1")
            .status
            .success()
    );
    assert_eq!(
        replica.tcp("root", None, "SELECT 1").status.success(),
        live.root_over_tcp
    );
    for (sql, want) in SEED_CHECKS.iter().zip(live_answers) {
        assert_eq!(&replica.read(sql), want, "{sql}");
    }
    let procs = replica.root(PROC_ROWS);
    assert!(procs.status.success(), "{}", stderr(&procs));
    assert_eq!(stdout(&procs).trim(), live.procs, "mysql.proc");
    for note in image_json["snapshot"]["notes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let note = note.as_str().unwrap();
        assert!(
            !note.starts_with("Aria tables") || note.contains("every row was kept"),
            "{note}"
        );
    }
    let loaded = |table: &str| -> (u64, u64) {
        let line = replica.read(&format!(
            "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM app.{table}"
        ));
        let (n, max) = line.split_once('\t').unwrap();
        (n.parse().unwrap(), max.parse().unwrap())
    };
    let (innodb, innodb_max) = loaded("load_innodb");
    let (aria, aria_max) = loaded("load_aria");
    assert_eq!(innodb, innodb_max, "holes in load_innodb");
    assert_eq!(aria, aria_max, "holes in load_aria");
    assert!(innodb >= 1, "the snapshot was taken under load");
    // One writer: an InnoDB row, then an Aria row, each its own binlog event group. At one
    // consistent point the Aria table is level with the InnoDB one or one behind, and the
    // GTID recorded is the seed's plus every row.
    assert!(
        aria == innodb || aria + 1 == innodb,
        "innodb {innodb}, aria {aria}"
    );
    let position = &image_json["snapshot"]["position"];
    let gtid = position["gtid"].as_str().unwrap();
    assert_eq!(
        gtid_seq(gtid),
        seq_before_load + innodb + aria,
        "the rows are not those at the binlog position {position}"
    );
    assert!(
        position["binlog_file"]
            .as_str()
            .unwrap()
            .starts_with("binlog.")
    );

    // Writes: the application's account meets read_only (1290); root, who may pass
    // read_only, meets InnoDB's and Aria's read-only tables (1036).
    for sql in [
        "INSERT INTO app.items_innodb VALUES (0, 'x', 1)",
        "UPDATE app.items_aria SET price = 0",
        "DELETE FROM app.items_myisam",
    ] {
        let out = replica.app(sql);
        assert!(!out.status.success(), "{sql} succeeded");
        assert!(
            stderr(&out).contains("ERROR 1290"),
            "{sql}: {}",
            stderr(&out)
        );
        let out = replica.root(sql);
        assert!(!out.status.success(), "{sql} succeeded as root");
        assert!(
            stderr(&out).contains("ERROR 1036") || stderr(&out).contains("ERROR 1290"),
            "{sql} as root: {}",
            stderr(&out)
        );
    }
    let settings = stdout(&replica.root(
        "SELECT @@innodb_read_only, @@read_only, @@skip_external_locking, @@log_bin, @@general_log, @@slow_query_log, @@innodb_flush_method",
    ));
    // fsync: reads through the page cache, not O_DIRECT (the profile says why).
    assert_eq!(settings.trim(), "1\t1\t1\t0\t0\t0\tfsync");
    // MDEV-34455 (fixed in 10.11.9): innodb_read_only must imply no doublewrite, and
    // SET GLOBAL innodb_doublewrite must not turn it on.
    let _ = replica.root("SET GLOBAL innodb_doublewrite = ON");
    assert_eq!(
        stdout(&replica.root("SELECT @@innodb_doublewrite")).trim(),
        "0"
    );
}

/// Nothing under the data directory in a replica's writable layer: no file was opened for
/// writing (overlayfs copies a file up on such an open), none created.
fn assert_nothing_copied_up(replica: &Replica) {
    let data = DATADIR.trim_start_matches('/');
    let under: Vec<String> = replica
        .upper_paths()
        .into_iter()
        .filter(|p| p.starts_with(data))
        .collect();
    assert!(under.is_empty(), "copied up under {DATADIR}: {under:?}");
}

fn image_json_of(d: &Path, image: &str) -> Value {
    serde_json::from_str(&stdout(&run_ok(
        bakedb(d).args(["inspect", "--json", image]),
    )))
    .unwrap()
}

#[test]
fn mariadb_docker_replica_of_a_live_server_under_write_load() {
    let Some(tools) = maria_tools() else { return };
    let Some(docker) = util::docker() else { return };
    require!("umoci");
    require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    let base = base_ref();
    let Some((live, load)) = live_source(&d.join("source")) else {
        return;
    };
    let name = format!("bakedb-e2e/{}:v1", unique_name("maria"));
    let out = run_ok(
        bakedb(d)
            .args(["build", "--engine", "mariadb", "--json", "--source"])
            .arg(live.server.url())
            .args(["--base", &base, "--output", "oci:img:v1"]),
    );
    let after = load.committed();
    let total = load.stop();
    assert!(total >= after);
    let built: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        built["data_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    // The source's configuration and the backup's own files stay out.
    let image_json = image_json_of(d, "oci:img:v1");
    let image_json = if image_json["image_json"].is_object() {
        image_json["image_json"].clone()
    } else {
        image_json
    };
    let files: Vec<&str> = image_json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for unwanted in [
        "backup-my.cnf",
        "xtrabackup_",
        "aria_log",
        "ib_buffer_pool",
        ".pem",
        "multi-master.info",
    ] {
        assert!(
            !files.iter().any(|f| f.contains(unwanted)),
            "{unwanted} in the image: {files:?}"
        );
    }
    assert!(files.contains(&"mysql/ibdata1") && files.contains(&"mysql/app/items_aria.MAI"));

    run_ok(Command::new("skopeo").current_dir(d).args([
        "copy",
        "-q",
        "oci:img:v1",
        &format!("docker-archive:maria.tar:{name}"),
    ]));
    let image = util::DockerImage {
        docker: docker.clone(),
        name: name.clone(),
    };
    run_ok(
        Command::new(&docker)
            .current_dir(d)
            .args(["load", "--input", "maria.tar"]),
    );
    let config: Value = serde_json::from_str(&stdout(&run_ok(Command::new(&docker).args([
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &image.name,
    ]))))
    .unwrap();
    assert_eq!(config["StopSignal"], "SIGTERM");
    assert_eq!(
        config["Healthcheck"]["Test"][1], "mariadb-admin",
        "{config}"
    );
    assert_eq!(config["Entrypoint"], serde_json::json!(["/bakedb/init"]));
    assert_eq!(config["Cmd"], serde_json::json!(["mariadbd"]));
    assert_eq!(config["User"], "999:999");

    let replica = Replica::start(docker_cli(&docker), &image.name, &[], &tools.client);
    check_replica(&replica, &live, &image_json);
    let logs = replica.logs();
    assert!(logs.contains("bakedb-init: verified"), "{logs}");
    assert!(logs.contains("InnoDB: Started in read only mode"), "{logs}");
    assert!(
        run(&mut replica.cmd(&[
            "exec",
            &replica.name,
            "mariadb-admin",
            "--no-defaults",
            "--socket=/tmp/mysqld.sock",
            "ping"
        ]))
        .status
        .success()
    );
    // MDEV-34209 (fixed in 10.11.9): a slow shutdown must not write to the system
    // tablespace of an innodb_read_only server.
    let _ = replica.root("SET GLOBAL innodb_fast_shutdown = 0");
    replica.stop_cleanly();
    assert_nothing_copied_up(&replica);

    // The same container again: nothing in the data changed, so init verifies it again.
    run_ok(&mut replica.cmd(&["start", &replica.name]));
    replica.wait_ready();
    assert_eq!(replica.read(SEED_CHECKS[0]), live.answers[0]);
    replica.stop_cleanly();
    assert_nothing_copied_up(&replica);

    // A new container with one byte of a data file changed: init names it and exits 3.
    let tampered = Container::new(
        docker_cli(&docker),
        unique_name("bakedb-e2e-maria-tampered"),
    );
    run_ok(&mut tampered.cmd(&[
        "create",
        "--network",
        "none",
        "--name",
        &tampered.name,
        &image.name,
    ]));
    let in_image = format!("{DATADIR}/app/items_innodb.ibd");
    let local = d.join("file");
    tampered.copy_out(&in_image, &local);
    let mut bytes = std::fs::read(&local).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    // As a bit flip on the node's disk would: straight into the container's writable layer,
    // the file and its parents with the owners and modes the image gives them (`docker cp`
    // would make them root's, which init, as the data owner, could not even read).
    let upper = std::path::PathBuf::from(tampered.inspect("{{.GraphDriver.Data.UpperDir}}"));
    let lowers = tampered.inspect("{{.GraphDriver.Data.LowerDir}}");
    let like_the_image = |rel: &Path, made: &Path| {
        use std::os::unix::fs::MetadataExt;
        let lower = lowers
            .split(':')
            .map(|l| Path::new(l).join(rel))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{} in no lower layer", rel.display()));
        let meta = std::fs::metadata(&lower).unwrap();
        std::os::unix::fs::chown(made, Some(meta.uid()), Some(meta.gid())).unwrap();
        std::fs::set_permissions(made, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .unwrap();
    };
    use std::os::unix::fs::PermissionsExt;
    let rel = Path::new(in_image.trim_start_matches('/'));
    let mut parent = std::path::PathBuf::new();
    for part in rel.parent().unwrap().components() {
        parent.push(part);
        if !upper.join(&parent).exists() {
            std::fs::create_dir(upper.join(&parent)).unwrap();
            like_the_image(&parent, &upper.join(&parent));
        }
    }
    std::fs::write(upper.join(rel), &bytes).unwrap();
    like_the_image(rel, &upper.join(rel));
    run_ok(&mut tampered.cmd(&["start", &tampered.name]));
    let code = stdout(&run_ok(&mut tampered.cmd(&["wait", &tampered.name])));
    let logs = tampered.logs();
    assert_eq!(code.trim(), "3", "{logs}");
    assert!(logs.contains(&in_image), "{logs}");
    assert!(!logs.contains("Starting MariaDB"), "{logs}");
}

/// bakedb as restricted CI runs it: not root. As root, the test runs bakedb as the source
/// server's own user (who may read its data directory, as mariadb-backup must), in a
/// directory of that user's; otherwise as this process.
struct Unprivileged {
    setpriv: Option<(std::path::PathBuf, (u32, u32))>,
    dir: std::path::PathBuf,
}

impl Unprivileged {
    fn new(d: &Path) -> Option<Unprivileged> {
        let dir = d.join("builder");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let setpriv = match bakedb_testkit::mariadb::run_as()? {
            RunAs::Me => None,
            RunAs::User { uid, gid } => {
                for p in [&dir, &dir.join("tmp")] {
                    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
                }
                Some((crate::util::tool("setpriv")?, (uid, gid)))
            }
        };
        Some(Unprivileged { setpriv, dir })
    }

    fn bakedb(&self) -> Command {
        match &self.setpriv {
            Some((setpriv, ids)) => {
                crate::util::bakedb_as(setpriv, *ids, &self.dir, &self.dir.join("tmp"))
            }
            None => bakedb(&self.dir),
        }
    }
}

#[test]
fn mariadb_podman_replica_from_a_snapshot_directory() {
    let Some(tools) = maria_tools() else { return };
    let podman = require!("podman");
    require!("runc");
    require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    let base = base_ref();
    let Some((live, load)) = live_source(&d.join("source")) else {
        return;
    };
    let Some(builder) = Unprivileged::new(d) else {
        return;
    };
    run_ok(
        builder
            .bakedb()
            .args([
                "snapshot", "--engine", "mariadb", "--out", "snap", "--source",
            ])
            .arg(live.server.url()),
    );
    load.stop();
    let snap = builder.dir.join("snap");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(snap.join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(meta["engine"], "mariadb");
    assert!(meta["provenance"]["position"]["gtid"].is_string(), "{meta}");
    // Built twice from the snapshot: the same image, byte for byte, whoever builds it (the
    // unprivileged builder, root).
    let build = |mut cmd: Command, out: &str| -> Value {
        let o = run_ok(
            cmd.args(["build", "--engine", "mariadb", "--source"])
                .arg(&snap)
                .args(["--base", &base, "--json", "--output", out]),
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let unprivileged = build(builder.bakedb(), "oci:img:v1");
    let one = build(bakedb(d), "oci:img:v1");
    assert_eq!(unprivileged["manifest_digest"], one["manifest_digest"]);
    let two = build(bakedb(d), "oci:img2:v1");
    assert_eq!(one["manifest_digest"], two["manifest_digest"]);
    let image_json = image_json_of(d, "oci:img:v1");
    let image_json = if image_json["image_json"].is_object() {
        image_json["image_json"].clone()
    } else {
        image_json
    };

    let replica = Replica::start(
        podman_cli(&podman, d),
        "oci:img:v1",
        &[
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ],
        &tools.client,
    );
    check_replica(&replica, &live, &image_json);
    replica.stop_cleanly();
    run_ok(&mut replica.cmd(&["start", &replica.name]));
    replica.wait_ready();
    assert_eq!(replica.read(SEED_CHECKS[2]), live.answers[2]);
    replica.stop_cleanly();
    let diff: Vec<String> = replica
        .diff()
        .into_iter()
        .filter(|l| l.contains("/var/lib/bakedb"))
        .collect();
    assert!(diff.is_empty(), "{diff:?}");
}

#[test]
fn mariadb_build_errors_are_clear_and_leave_no_output() {
    let Some(_tools) = maria_tools() else { return };
    require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    let base = base_ref();
    let busybox = format!("oci:{}:latest", util::busybox_base().display());
    let closed = format!("mysql://bakedb:x@127.0.0.1:{}/", free_port());
    std::fs::create_dir(d.join("source")).unwrap();
    let Some(server) = MariaServer::start(&d.join("source")) else {
        return;
    };
    server.seed();
    server.sql("CREATE USER 'weak'@'127.0.0.1' IDENTIFIED BY 'weak-pw'; GRANT SELECT ON *.* TO 'weak'@'127.0.0.1'");
    let url = server.url();
    let weak = format!("mysql://weak:weak-pw@127.0.0.1:{}/", server.port());
    for (source, base, code, want) in [
        (closed.as_str(), base.as_str(), 4, "Can't connect"),
        (
            weak.as_str(),
            base.as_str(),
            4,
            "RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR",
        ),
        (url.as_str(), busybox.as_str(), 5, "no MariaDB server"),
    ] {
        let out = run(bakedb(d).args([
            "build",
            "--engine",
            "mariadb",
            "--source",
            source,
            "--base",
            base,
            "--output",
            "oci:out:v1",
        ]));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{source} on {base}: {err}");
        assert!(err.contains(want), "{source} on {base}: {err}");
        assert!(
            !err.contains("weak-pw") && !err.contains("bakedb-secret"),
            "{err}"
        );
        assert!(!d.join("out").exists(), "{source}: output written");
    }

    // A table the source has marked as crashed is refused, not repaired on the way (a
    // repair may drop rows): the MyISAM header's state byte after the 24-byte file header
    // and the 2-byte open count, STATE_CRASHED (2).
    server.sql("CREATE TABLE app.hits (id INT PRIMARY KEY, n INT) ENGINE=MyISAM; INSERT INTO app.hits VALUES (1, 1), (2, 2); FLUSH TABLES app.hits");
    let index = server.data_dir().join("app/hits.MYI");
    let mut header = std::fs::read(&index).unwrap();
    header[26] |= 2;
    std::fs::write(&index, header).unwrap();
    let out = run(bakedb(d).args([
        "build",
        "--engine",
        "mariadb",
        "--source",
        &url,
        "--base",
        &base,
        "--output",
        "oci:out:v1",
    ]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("app.hits") && err.contains("crashed") && err.contains("REPAIR TABLE"),
        "{err}"
    );
    assert!(!d.join("out").exists(), "a crashed table: output written");
}

#[test]
fn mariadb_delta_rebake_ships_changed_pages_and_serves_the_new_state() {
    let Some(tools) = maria_tools() else { return };
    let Some(docker) = util::docker() else { return };
    require!("umoci");
    require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    let base = base_ref();
    std::fs::create_dir(d.join("source")).unwrap();
    let Some(server) = MariaServer::start(&d.join("source")) else {
        return;
    };
    server.seed();
    // A table big enough that a few changed rows are a small part of it.
    server.sql(
        "CREATE TABLE app.big (id INT PRIMARY KEY, pad CHAR(200) NOT NULL) ENGINE=InnoDB;
         INSERT INTO app.big SELECT seq, REPEAT('x', 200) FROM app.seq_1_to_20000;",
    );
    let build = |extra: &[&str], out: &str| -> Value {
        let o = run_ok(
            bakedb(d)
                .args(["build", "--engine", "mariadb", "--json", "--source"])
                .arg(server.url())
                .args(["--base", &base, "--output", out])
                .args(extra),
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    build(&[], "oci:img:v1");
    server.sql(
        "UPDATE app.big SET pad = REPEAT('y', 200) WHERE id IN (7, 7000, 19000);
         INSERT INTO app.items_innodb VALUES (5000, 'new', 1.5);
         INSERT INTO app.items_aria VALUES (5000, 'new', 1.5);
         DELETE FROM app.items_myisam WHERE id = 1;",
    );
    let answers: Vec<String> = SEED_CHECKS.iter().map(|sql| server.sql(sql)).collect();
    let big = "SELECT COUNT(*), MD5(GROUP_CONCAT(id, pad ORDER BY id)) FROM app.big";
    let big_answer = server.sql(big);
    build(&["--from", "oci:img:v1"], "oci:img:v2");

    let v1 = image_json_of(d, "oci:img:v1");
    let v2 = image_json_of(d, "oci:img:v2");
    let (v1, v2) = (&v1["image_json"], &v2["image_json"]);
    assert_eq!(v2["generation"], 1, "{v2}");
    let chain = v2["chain"].as_array().unwrap();
    let patch = chain.last().unwrap();
    assert_eq!(patch["kind"], "patch", "{v2}");
    let big_size = v1["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "mysql/app/big.ibd")
        .unwrap()["size"]
        .as_u64()
        .unwrap();
    assert!(
        patch["raw_bytes"].as_u64().unwrap() < big_size + (16 << 20),
        "the patch layer ships more than the changed pages: {patch}"
    );

    let name = format!("bakedb-e2e/{}:v2", unique_name("maria-delta"));
    run_ok(Command::new("skopeo").current_dir(d).args([
        "copy",
        "-q",
        "oci:img:v2",
        &format!("docker-archive:v2.tar:{name}"),
    ]));
    let _image = util::DockerImage {
        docker: docker.clone(),
        name: name.clone(),
    };
    run_ok(
        Command::new(&docker)
            .current_dir(d)
            .args(["load", "--input", "v2.tar"]),
    );
    let replica = Replica::start(docker_cli(&docker), &name, &[], &tools.client);
    replica.wait_ready();
    for (sql, want) in SEED_CHECKS.iter().zip(&answers) {
        assert_eq!(&replica.read(sql), want, "{sql}");
    }
    assert_eq!(replica.read(big), big_answer);
    assert!(
        replica.logs().contains("bakedb-init: composed"),
        "{}",
        replica.logs()
    );
    replica.stop_cleanly();
    // The same container again: init composes again (idempotent) and verifies.
    run_ok(&mut replica.cmd(&["start", &replica.name]));
    replica.wait_ready();
    assert_eq!(replica.read(big), big_answer);
    replica.stop_cleanly();
}
