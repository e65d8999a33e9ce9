//! The Kubernetes manifests of docs/kubernetes/, for a SQLite (bakedb-serve), a PostgreSQL
//! and a MariaDB image: validated offline against the Kubernetes schemas
//! (kubernetes-validate --strict, the oldest and newest versions they are for, with no
//! network), then run for real with `podman kube play` from the local registry (pushed with
//! skopeo, pinned by digest), the same file with only the image and the replica count
//! filled in. The replicas answer the source's rows exactly; `podman inspect` shows what
//! podman made of each field (what docs/kubernetes/README.md says it honours and ignores);
//! from the host, /proc shows each engine runs under the manifest's constraints (read-only
//! root, the emptyDir mounts writable, the image's non-root user, no capabilities, no new
//! privileges, seccomp); stopping drains bakedb-serve and shuts PostgreSQL and MariaDB down
//! cleanly; a restarted PostgreSQL finds its verified copy on the volume and starts without
//! copying again; MariaDB runs on the image's layer in place with /tmp its only writable
//! path. docker runs the same images under the same constraints (`--read-only`, tmpfs
//! mounts, `--user`), and without the copy directory PostgreSQL cannot start under a
//! read-only root: the control that shows the copy is needed and the root really is
//! read-only. MariaDB's control is a re-baked (patched) image, which init must compose in
//! the data directory: it fails the same way without a copy directory, and serves the new
//! rows with one, as mariadb.yaml says.
//!
//! Each play runs in a network namespace of its own (bakedb-testkit's `kube`), and the
//! replicas are reached inside their pod's network namespace; one replica per play, because
//! podman publishes every containerPort of every pod on the same address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use bakedb_testkit::confinement::Confinement;
use bakedb_testkit::containers::{Container, docker_cli};
use bakedb_testkit::dirs::workspace_root;
use bakedb_testkit::fixtures::items_db;
use bakedb_testkit::kube::KubePlay;
use bakedb_testkit::mariadb::{
    APP_PASSWORD, APP_USER, ED_PASSWORD, ED_USER, MariaServer, SEED_CHECKS, SEED_ROWS, maria_tools,
    tcp_client,
};
use bakedb_testkit::netns::{in_netns_of_pid, on_thread_in_netns_of_pid};
use bakedb_testkit::ports::free_addr;
use bakedb_testkit::registry::push_pinned;

use crate::http;
use crate::mariadb as maria;
use crate::pg::{self, ITEMS_MD5_SQL, PgServer, READER, READER_PASSWORD, SEED_ITEMS_MD5};
use crate::postgres::{Replica, base_ref};
use crate::require;
use crate::util::{self, bakedb, run, run_ok, stderr, stdout, test_dir, unique_name};

/// The longest a replica may take to answer after its pod started, or to stop.
const PATIENCE: Duration = Duration::from_secs(120);
/// The Kubernetes versions the manifests are for: the preStop `sleep` action is beta (on by
/// default) from 1.30; the newest schemas the pinned kubernetes-validate has.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// Rows of the SQLite source.
const ROWS: i64 = 3000;
/// The manifests, the name of their objects (Service, Deployment, PodDisruptionBudget,
/// NetworkPolicy) and of their container.
const MANIFESTS: [(&str, &str, &str); 3] = [
    ("sqlite", "catalog", "serve"),
    ("postgres", "catalog-pg", "postgres"),
    ("mariadb", "catalog-mariadb", "mariadb"),
];
/// The probe command of mariadb.yaml: the image's HEALTHCHECK on a distribution's server
/// packages (the MariaDB base fixture's), mariadb-admin ping on the profile's socket.
const MARIADB_PROBE: [&str; 4] = [
    "mariadb-admin",
    "--no-defaults",
    "--socket=/tmp/mysqld.sock",
    "ping",
];
/// The longest mariadbd may take to shut down cleanly after its STOPSIGNAL: what mariadb.yaml's
/// grace period allows after the preStop sleep, and the timeout the tests stop it with.
const MARIADB_STOP_SECONDS: u64 = 5;
/// Where the PostgreSQL manifest mounts the volume the data is copied to.
const COPY_DIR: &str = "/var/lib/bakedb-copy";

fn manifest_path(engine: &str) -> PathBuf {
    workspace_root().join(format!("docs/kubernetes/{engine}.yaml"))
}

fn manifest(engine: &str) -> String {
    std::fs::read_to_string(manifest_path(engine)).unwrap()
}

/// `text` with `from` replaced by `to`; `from` must be there exactly once (a manifest that
/// changed shape fails here rather than running something else).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} is not in the manifest exactly once"
    );
    text.replacen(from, to, 1)
}

/// The values of `key:` lines, in order (a line-based reading: the manifests keep one
/// field per line).
fn values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}:");
    text.lines()
        .filter_map(|l| {
            l.trim_start()
                .trim_start_matches("- ")
                .strip_prefix(&prefix)
        })
        .map(|v| v.trim().trim_matches('"').to_owned())
        .collect()
}

fn one_value(text: &str, key: &str) -> String {
    let found = values(text, key);
    assert_eq!(found.len(), 1, "{key}: {found:?}");
    found.into_iter().next().unwrap()
}

/// The value of an env entry (`- name: NAME` then `value: ...`).
fn env_value(text: &str, name: &str) -> String {
    let mut lines = text.lines();
    lines
        .find(|l| l.trim() == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("no env {name}"));
    lines
        .next()
        .and_then(|l| l.trim().strip_prefix("value: "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("env {name} has no value line"))
}

/// The manifest of `engine` with the image pinned to `image` (REPO@sha256:...) and
/// `replicas` replicas: nothing else changes.
fn pinned_manifest(engine: &str, image: &str, replicas: u32) -> String {
    let text = manifest(engine);
    let placeholder = values(&text, "image")
        .into_iter()
        .find(|i| i.contains("@sha256:"))
        .expect("a placeholder image pinned by digest");
    let text = replace_once(
        &text,
        &format!("image: {placeholder}"),
        &format!("image: {image}"),
    );
    replace_once(
        &text,
        "  replicas: 3\n",
        &format!("  replicas: {replicas}\n"),
    )
}

// ---------------------------------------------------------------------------------------
// Offline validation

#[test]
fn manifests_are_valid_kubernetes_and_keep_their_promises() {
    let validate = require!("kubernetes-validate");
    let unshare = require!("unshare");
    if !util::require_root() {
        return;
    }
    // kubernetes-validate in a network namespace of its own, with no interface but a
    // loopback that is down: the schemas it checks against are the ones it bundles, as CI
    // must have them offline.
    let offline = |args: &[&str], path: &Path| {
        run(Command::new(&unshare)
            .args(["--net", "--"])
            .arg(&validate)
            .args(args)
            .arg(path))
    };
    for (engine, name, container) in MANIFESTS {
        let path = manifest_path(engine);
        for version in KUBERNETES_VERSIONS {
            let out = offline(&["--strict", "--kubernetes-version", version], &path);
            let said = format!("{}{}", stdout(&out), stderr(&out));
            assert!(out.status.success(), "{engine} against {version}:\n{said}");
            for kind in [
                "service",
                "deployment",
                "poddisruptionbudget",
                "networkpolicy",
            ] {
                assert!(
                    said.contains(&format!(
                        "passed for resource {kind}/{name} against version"
                    )),
                    "{engine}: no {kind} validated against {version}:\n{said}"
                );
            }
        }

        // What the docs promise, read from the file itself.
        let text = manifest(engine);
        // One container, of the name the docs tell `kubectl set image` to use, its image
        // pinned by digest (a placeholder digest here).
        let image = one_value(&text, "image");
        let digest = image
            .strip_prefix(&format!("registry.example/{name}@sha256:"))
            .unwrap_or_else(|| panic!("{engine}: {image} is not pinned by digest"));
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{engine}: {image}"
        );
        assert!(
            text.contains(&format!(
                "containers:\n        - name: {container}\n          image: {image}\n"
            )),
            "{engine}: no container {container} of {image}"
        );
        for line in [
            "maxUnavailable: 0\n      maxSurge: 1\n",
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "drop:\n                - ALL",
            "type: RuntimeDefault",
            "automountServiceAccountToken: false",
            "egress: []",
        ] {
            assert!(text.contains(line), "{engine}: no {line:?}");
        }
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                text.matches(&format!("{probe}:")).count(),
                1,
                "{engine}: {probe}"
            );
        }
        // Each probe asks the engine itself: bakedb-serve's /healthz on its port (by number:
        // podman turns a named port into 0), pg_isready in the image, mariadb-admin ping in
        // the image as its HEALTHCHECK does.
        let probe = match engine {
            "sqlite" => "httpGet:\n              path: /healthz\n              port: 8080\n".into(),
            "postgres" => "exec:\n              command: [\"pg_isready\", \"-q\"]\n".into(),
            _ => format!(
                "exec:\n              command: {}\n",
                serde_json::to_string(&MARIADB_PROBE)
                    .unwrap()
                    .replace(',', ", ")
            ),
        };
        assert_eq!(text.matches(&probe).count(), 3, "{engine}: {probe:?}");
        let grace: u64 = one_value(&text, "terminationGracePeriodSeconds")
            .parse()
            .unwrap();
        let pre_stop: u64 = one_value(&text, "seconds").parse().unwrap();
        // The grace period covers the preStop sleep and bakedb-serve's whole drain (or
        // PostgreSQL's fast shutdown, a second at most here, or mariadbd's shutdown, which
        // the tests allow 5 s) with a margin.
        let stopping = match engine {
            "sqlite" => env_value(&text, "BAKEDB_DRAIN_MS").parse::<u64>().unwrap() / 1000,
            "postgres" => 1,
            _ => MARIADB_STOP_SECONDS,
        };
        assert!(
            grace >= pre_stop + stopping + 3,
            "{engine}: grace {grace} s for a {pre_stop} s preStop and {stopping} s of stopping"
        );
    }

    // Strict mode is on: a misspelt field fails validation.
    let dir = test_dir();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        manifest("sqlite").replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )
    .unwrap();
    let out = offline(
        &["--strict", "--kubernetes-version", KUBERNETES_VERSIONS[0]],
        &bad,
    );
    assert!(!out.status.success(), "a misspelt field passed");
    assert!(
        format!("{}{}", stdout(&out), stderr(&out))
            .contains("'readOnlyRootFileSystem' was unexpected"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------
// podman kube play

/// The tools the podman tests need, and root (network namespaces, a pod's /proc).
fn podman_tools() -> Option<PathBuf> {
    let podman = bakedb_testkit::containers::podman()?;
    for t in ["skopeo", "nsenter", "ip"] {
        util::tool(t)?;
    }
    util::require_root().then_some(podman)
}

/// Every row of items, as bakedb-serve answers it (blobs as hex, so both sides agree on
/// their encoding).
const ITEMS_SQL: &str = "SELECT id, name, price, hex(data) FROM items ORDER BY id";

/// ITEMS_SQL on the source, as JSON rows.
fn source_rows(db: &Path) -> Value {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut stmt = c.prepare(ITEMS_SQL).unwrap();
    let rows: Vec<Value> = stmt
        .query_map([], |r| {
            Ok(json!([
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, f64>(2)?,
                r.get::<_, String>(3)?
            ]))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), ROWS as usize);
    Value::Array(rows)
}

/// GET /healthz at `addr`: Ok once it answers 200.
fn healthz(addr: SocketAddr) -> Result<(), String> {
    match http::request(addr, "GET", "/healthz", &[], b"") {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("{} {}", r.status, r.text())),
        Err(e) => Err(e.to_string()),
    }
}

/// bakedb-serve at `addr` (reached from where the caller runs) answers every row of the
/// source exactly, from the image's data, and refuses writes.
fn assert_serves_source(addr: SocketAddr, built: &Value, source: &Value) {
    let health = http::get(addr, "/healthz").json();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["data_digest"], built["data_digest"], "{health}");
    // Served from the image's read-only layer: no copy for bakedb-serve.
    assert_eq!(health["database"], "/var/lib/bakedb/app.db", "{health}");
    let r = http::post_json(addr, "/v1/query", &json!({"sql": ITEMS_SQL}));
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(answer["truncated"], false, "{answer}");
    assert!(answer["rows"] == *source, "the rows differ from the source");
    let r = http::post_json(addr, "/v1/query", &json!({"sql": "DELETE FROM items"}));
    assert_eq!(r.status, 403, "{}", r.text());
}

/// What the manifest asks of a container, in the terms `podman inspect` shows.
struct Asked<'a> {
    user: &'a str,
    memory_request: u64,
    memory_limit: u64,
    /// The volumes (emptyDirs) and where they are mounted.
    volumes: &'a [(&'a str, &'a str)],
}

/// What podman 4.3 made of the manifest's container, field by field, as
/// docs/kubernetes/README.md tells it: what it honours, and what it ignores. A failure of the
/// second kind means podman changed, and the README must say so.
fn assert_podman_made<C: Fn() -> Command>(container: &Container<C>, asked: &Asked) {
    let inspect: Value = serde_json::from_str(&stdout(&run_ok(
        &mut container.cmd(&["inspect", &container.name]),
    )))
    .unwrap();
    let c = &inspect[0];
    let (config, host) = (&c["Config"], &c["HostConfig"]);
    let what = |field: &str| format!("podman inspect {field}: {c:#}");
    // Honoured.
    assert_eq!(host["ReadonlyRootfs"], true, "{}", what("ReadonlyRootfs"));
    assert_eq!(config["User"], asked.user, "{}", what("User"));
    assert_eq!(host["Memory"], asked.memory_limit, "{}", what("Memory"));
    assert_eq!(
        host["MemoryReservation"],
        asked.memory_request,
        "{}",
        what("MemoryReservation")
    );
    assert!(
        host["SecurityOpt"]
            .as_array()
            .unwrap()
            .contains(&json!("no-new-privileges")),
        "{}",
        what("SecurityOpt")
    );
    assert_eq!(
        host["RestartPolicy"]["Name"],
        "always",
        "{}",
        what("RestartPolicy")
    );
    // The livenessProbe became podman's healthcheck (10 s, 5 s, 3 failures), restarting the
    // container when it fails; podman runs it from a systemd timer, so on a machine without
    // systemd only `podman healthcheck run` does.
    let health = &config["Healthcheck"];
    assert_eq!(
        health["Interval"],
        10_000_000_000u64,
        "{}",
        what("Healthcheck")
    );
    assert_eq!(
        health["Timeout"],
        5_000_000_000u64,
        "{}",
        what("Healthcheck")
    );
    assert_eq!(health["Retries"], 3, "{}", what("Healthcheck"));
    assert_eq!(
        config["HealthcheckOnFailureAction"],
        "restart",
        "{}",
        what("HealthcheckOnFailureAction")
    );
    // Each emptyDir is a podman volume of the volume's name: one for every pod of the play,
    // not one per pod.
    let mounts = c["Mounts"].as_array().unwrap();
    for (name, path) in asked.volumes {
        assert!(
            mounts.iter().any(|m| m["Type"] == "volume"
                && m["Name"] == *name
                && m["Destination"] == *path
                && m["RW"] == true),
            "{}",
            what(&format!("Mounts: volume {name} at {path}"))
        );
    }
    // Ignored: terminationGracePeriodSeconds (the stop timeout stays podman's 10 s), the CPU
    // request, the readiness and startup probes.
    assert_eq!(config["StopTimeout"], 10, "{}", what("StopTimeout"));
    assert_eq!(host["NanoCpus"], 0, "{}", what("NanoCpus"));
    assert_eq!(host["CpuShares"], 0, "{}", what("CpuShares"));
    assert!(
        config["StartupHealthCheck"].is_null(),
        "{}",
        what("StartupHealthCheck")
    );
}

#[test]
fn sqlite_replicas_run_from_the_manifest_under_podman_kube_play() {
    let Some(podman) = podman_tools() else { return };
    let Some(registry) = util::registry() else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    items_db(&d.join("app.db"), ROWS, true);
    let source = source_rows(&d.join("app.db"));
    let built = util::build_sqlite(d, "app.db", "oci:image:v1", &[]);
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-sqlite"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(d, "oci:image:v1", &repo, "v1", digest);
    let yaml = pinned_manifest("sqlite", &image, 1);
    let play = KubePlay::start(&podman, d, &yaml, &[&image]);
    let serve = play.container("catalog-pod-0-serve");
    let pid = serve.pid();
    let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    serve.wait_until("answering /healthz", PATIENCE, &|| {
        on_thread_in_netns_of_pid(pid, || healthz(addr))
    });
    on_thread_in_netns_of_pid(pid, || assert_serves_source(addr, &built, &source));

    // The manifest's constraints, as podman applied them and as the kernel sees them.
    assert_podman_made(
        &serve,
        &Asked {
            user: "65532:65532",
            memory_request: 256 << 20,
            memory_limit: 1 << 30,
            volumes: &[("tmp", "/tmp")],
        },
    );
    Confinement {
        uid: 65532,
        gid: 65532,
        writable: &["/tmp"],
    }
    .assert_holds(pid, "bakedb-serve under podman kube play");
    let logs = serve.logs();
    assert!(logs.contains("bakedb-init: verified 1 file"), "{logs}");
    // podman runs an httpGet probe as curl inside the container, which a FROM-scratch image
    // does not have: its healthcheck fails where a kubelet's probe (made from outside the
    // container) passes. docs/kubernetes/README.md says so.
    let test = serve.inspect("{{.Config.Healthcheck.Test}}");
    assert!(
        test.contains("curl") && test.contains("http://localhost:8080/healthz"),
        "{test}"
    );
    let health = run(&mut serve.cmd(&["healthcheck", "run", &serve.name]));
    assert!(!health.status.success(), "{}", stdout(&health));
    assert!(serve.running(), "{}", serve.logs());

    // Stopping the pod: SIGTERM, bakedb-serve drains and exits 0.
    run_ok(&mut play.podman(&["pod", "stop", "catalog-pod-0"]));
    let logs = serve.logs();
    assert_eq!(serve.exit_code(), 0, "{logs}");
    assert!(
        logs.contains("bakedb-serve: draining") && logs.contains("bakedb-serve: stopped"),
        "{logs}"
    );
}

/// A seeded PostgreSQL source and the image of it, in the layout `image` of `dir`.
fn postgres_image(dir: &Path, pg_bin: &Path) -> Option<(PgServer, Value)> {
    util::tool("umoci")?;
    std::fs::create_dir_all(dir.join("source")).unwrap();
    let server = PgServer::start(&dir.join("source"))?;
    server.seed("app");
    let built = util::build_json(&run_ok(
        bakedb(dir)
            .args(["build", "--engine", "postgres", "--json", "--source"])
            .arg(server.url("postgres"))
            .arg("--pg-bin")
            .arg(pg_bin)
            .args(["--base", &base_ref(), "--output", "oci:image:v1"]),
    ));
    Some((server, built))
}

/// The host's `program` of the PostgreSQL clients, run in the network namespace of `pid`.
fn pg_client_in_pod(pid: u32, pg_bin: &Path, program: &str) -> Command {
    let mut cmd = in_netns_of_pid(pid, &Command::new(pg_bin.join(program)));
    cmd.env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::null());
    cmd
}

/// psql in the pod's network namespace as the seeded reader, over TCP with its password.
fn pod_psql(pid: u32, pg_bin: &Path, sql: &str) -> std::process::Output {
    run(pg_client_in_pod(pid, pg_bin, "psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "postgresql://{READER}:{READER_PASSWORD}@127.0.0.1:5432/app"
        ))
        .args(["-c", sql]))
}

fn wait_pg_ready<C: Fn() -> Command>(container: &Container<C>, pg_bin: &Path) {
    let pid = container.pid();
    container.wait_until("accepting connections (pg_isready)", PATIENCE, &|| {
        let out = run(pg_client_in_pod(pid, pg_bin, "pg_isready").args([
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
        ]));
        if out.status.success() {
            Ok(())
        } else {
            Err(stdout(&out))
        }
    });
}

#[test]
fn postgres_replicas_run_from_the_manifest_under_podman_kube_play() {
    let Some(pg_bin) = pg::pg_bin() else { return };
    let Some(podman) = podman_tools() else { return };
    let Some(registry) = util::registry() else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    let Some((_server, built)) = postgres_image(d, &pg_bin) else {
        return;
    };
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-pg"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(d, "oci:image:v1", &repo, "v1", digest);
    let yaml = pinned_manifest("postgres", &image, 1);
    assert_eq!(env_value(&yaml, "BAKEDB_DATA_COPY_DIR"), COPY_DIR);
    let play = KubePlay::start(&podman, d, &yaml, &[&image]);
    let postgres = play.container("catalog-pg-pod-0-postgres");
    wait_pg_ready(&postgres, &pg_bin);
    let pid = postgres.pid();

    let read = |sql: &str| {
        let out = pod_psql(pid, &pg_bin, sql);
        assert!(
            out.status.success(),
            "{sql}: {}\n{}",
            stderr(&out),
            postgres.logs()
        );
        stdout(&out).trim().to_owned()
    };
    assert_eq!(
        read(ITEMS_MD5_SQL),
        SEED_ITEMS_MD5,
        "items differ from the source"
    );
    let out = pod_psql(pid, &pg_bin, "DELETE FROM items");
    assert!(
        !out.status.success() && stderr(&out).contains("read-only transaction"),
        "{}",
        stderr(&out)
    );
    // postgres runs on the verified copy in the emptyDir, not on the image's layer.
    let su = run_ok(&mut postgres.cmd(&[
        "exec",
        &postgres.name,
        "psql",
        "-X",
        "-A",
        "-t",
        "-U",
        "postgres",
        "-d",
        "app",
        "-c",
        "SHOW data_directory",
    ]));
    assert_eq!(stdout(&su).trim(), format!("{COPY_DIR}/pgdata"));
    let logs = postgres.logs();
    assert!(
        logs.contains("bakedb-init: copied and verified ")
            && logs.contains(&format!("from /var/lib/bakedb into {COPY_DIR}")),
        "{logs}"
    );
    assert_podman_made(
        &postgres,
        &Asked {
            user: "999:999",
            memory_request: 512 << 20,
            memory_limit: 1 << 30,
            volumes: &[("tmp", "/tmp"), ("data", COPY_DIR), ("dshm", "/dev/shm")],
        },
    );
    // The image's STOPSIGNAL (SIGINT: fast shutdown) is what podman will send.
    assert_eq!(postgres.inspect("{{.Config.StopSignal}}"), "2");
    Confinement {
        uid: 999,
        gid: 999,
        writable: &["/tmp", COPY_DIR, "/dev/shm"],
    }
    .assert_holds(pid, "postgres under podman kube play");
    // podman made the liveness probe the container's healthcheck; it runs pg_isready in the
    // image and passes.
    let health = run(&mut postgres.cmd(&["healthcheck", "run", &postgres.name]));
    assert!(
        health.status.success(),
        "{}{}",
        stdout(&health),
        stderr(&health)
    );

    // A restart (a liveness failure on a cluster restarts the container in its pod): the
    // volume keeps the copy, init finds its stamp and starts postgres on it without copying
    // again. The whole pod restarts here: podman stops a pod's infra container once its
    // last container exits, so a container of it cannot be restarted alone.
    run_ok(&mut play.podman(&["pod", "stop", "catalog-pg-pod-0"]));
    assert_eq!(postgres.exit_code(), 0, "{}", postgres.logs());
    run_ok(&mut play.podman(&["pod", "start", "catalog-pg-pod-0"]));
    wait_pg_ready(&postgres, &pg_bin);
    let pid = postgres.pid();
    let out = pod_psql(pid, &pg_bin, ITEMS_MD5_SQL);
    assert_eq!(stdout(&out).trim(), SEED_ITEMS_MD5, "{}", stderr(&out));
    let logs = postgres.logs();
    assert!(
        logs.contains(
            "holds this image's data, copied and verified at this container's first start"
        ),
        "{logs}"
    );
    assert_eq!(
        logs.matches("bakedb-init: copied and verified").count(),
        1,
        "{logs}"
    );

    run_ok(&mut play.podman(&["pod", "stop", "catalog-pg-pod-0"]));
    let logs = postgres.logs();
    assert_eq!(postgres.exit_code(), 0, "{logs}");
    assert!(
        logs.trim_end().ends_with("database system is shut down"),
        "no clean shutdown at the end of the log:\n{logs}"
    );
}

/// A seeded MariaDB source (the kit's MariaServer), its answers to SEED_CHECKS and the image
/// of it on the MariaDB base fixture, in the layout `image` of `dir` (tag v1).
fn mariadb_image(dir: &Path) -> Option<(MariaServer, Vec<String>, Value)> {
    util::tool("umoci")?;
    std::fs::create_dir_all(dir.join("source")).unwrap();
    let server = MariaServer::start(&dir.join("source"))?;
    server.seed();
    let answers = SEED_CHECKS.iter().map(|sql| server.sql(sql)).collect();
    let built = util::build_json(&run_ok(
        bakedb(dir)
            .args(["build", "--engine", "mariadb", "--json", "--source"])
            .arg(server.url())
            .args(["--base", &maria::base_ref(), "--output", "oci:image:v1"]),
    ));
    Some((server, answers, built))
}

/// Every path under `dir` (relative to it), recursively, not following links.
fn paths_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            found.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.symlink_metadata().unwrap().is_dir() {
                todo.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn mariadb_replicas_run_from_the_manifest_under_podman_kube_play() {
    let Some(tools) = maria_tools() else { return };
    let Some(podman) = podman_tools() else { return };
    let Some(registry) = util::registry() else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    let Some((_server, answers, built)) = mariadb_image(d) else {
        return;
    };
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-maria"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(d, "oci:image:v1", &repo, "v1", digest);
    let yaml = pinned_manifest("mariadb", &image, 1);
    let play = KubePlay::start(&podman, d, &yaml, &[&image]);
    let mariadb = play.container("catalog-mariadb-pod-0-mariadb");
    let pid = mariadb.pid();
    // The host's mariadb client in the pod's network namespace, over TCP to the
    // containerPort on 127.0.0.1, as one of the source's accounts with its password.
    let tcp = |user: &str, password: &str, sql: &str| {
        run(&mut in_netns_of_pid(
            pid,
            &tcp_client(&tools.client, 3306, user, Some(password), sql),
        ))
    };
    mariadb.wait_until("accepting connections on 127.0.0.1:3306", PATIENCE, &|| {
        let out = tcp(APP_USER, APP_PASSWORD, "SELECT 1");
        if out.status.success() {
            Ok(())
        } else {
            Err(stderr(&out))
        }
    });
    let read = |user: &str, password: &str, sql: &str| {
        let out = tcp(user, password, sql);
        assert!(
            out.status.success(),
            "{sql}: {}\n{}",
            stderr(&out),
            mariadb.logs()
        );
        stdout(&out).trim().to_owned()
    };
    // Every row of the three storage engines' tables, the view, the procedure and the
    // trigger's count, exactly as the source answered them.
    for (sql, want) in SEED_CHECKS.iter().zip(&answers) {
        assert_eq!(&read(APP_USER, APP_PASSWORD, sql), want, "{sql}");
    }
    assert_eq!(
        read(ED_USER, ED_PASSWORD, "SELECT COUNT(*) FROM app.items_aria"),
        SEED_ROWS.to_string()
    );
    let out = tcp(APP_USER, "wrong", "SELECT 1");
    assert!(
        !out.status.success() && stderr(&out).contains("ERROR 1045"),
        "{}",
        stderr(&out)
    );
    let out = tcp(
        APP_USER,
        APP_PASSWORD,
        "INSERT INTO app.items_innodb VALUES (0, 'x', 1)",
    );
    assert!(
        !out.status.success()
            && stderr(&out).contains("ERROR 1290")
            && stderr(&out).contains("--read-only option"),
        "{}",
        stderr(&out)
    );
    // The read-only profile, with the data read in place from the image's layer (no copy)
    // and everything the server creates in the emptyDir at /tmp.
    let settings = run_ok(&mut mariadb.cmd(&[
        "exec",
        &mariadb.name,
        "mariadb",
        "-uroot",
        "--batch",
        "--skip-column-names",
        "-e",
        "SELECT @@innodb_read_only, @@read_only, @@datadir, @@tmpdir, @@socket, @@pid_file, @@aria_log_dir_path",
    ]));
    assert_eq!(
        stdout(&settings).trim(),
        "1\t1\t/var/lib/bakedb/mysql/\t/tmp/bakedb\t/tmp/mysqld.sock\t/tmp/bakedb/mariadbd.pid\t/tmp/bakedb"
    );
    let in_tmp = paths_under(Path::new(&format!("/proc/{pid}/root/tmp")));
    for want in [
        "mysqld.sock",
        "bakedb/my.cnf",
        "bakedb/mariadbd.pid",
        "bakedb/aria_log_control",
    ] {
        assert!(
            in_tmp.iter().any(|p| p == want),
            "no /tmp/{want}: {in_tmp:?}"
        );
    }
    let logs = mariadb.logs();
    assert!(logs.contains("bakedb-init: verified "), "{logs}");
    // A full bake runs in place: BAKEDB_DATA_COPY_WHEN=patched leaves the copy's emptyDir
    // empty.
    assert!(!logs.contains("bakedb-init: copied and verified"), "{logs}");
    assert!(
        paths_under(Path::new(&format!("/proc/{pid}/root{COPY_DIR}"))).is_empty(),
        "{logs}"
    );
    assert!(logs.contains("InnoDB: Started in read only mode"), "{logs}");

    assert_podman_made(
        &mariadb,
        &Asked {
            user: "999:999",
            memory_request: 512 << 20,
            memory_limit: 1 << 30,
            volumes: &[("tmp", "/tmp"), ("data", COPY_DIR)],
        },
    );
    // The image's STOPSIGNAL (SIGTERM: mariadbd's clean shutdown) is what podman will send.
    assert_eq!(mariadb.inspect("{{.Config.StopSignal}}"), "15");
    Confinement {
        uid: 999,
        gid: 999,
        writable: &["/tmp"],
    }
    .assert_holds(pid, "mariadbd under podman kube play");
    // The probe is the image's own HEALTHCHECK (in the config as bakedb wrote it: skopeo
    // leaves Docker's fields out of a config it parses). podman made the liveness probe the
    // container's healthcheck, as a shell command (`/bin/sh -c '... || exit 1'`, where a
    // kubelet execs the command itself): it runs mariadb-admin ping with the image's
    // busybox sh, and passes.
    let config: Value = serde_json::from_slice(
        &run_ok(Command::new("skopeo").current_dir(d).args([
            "inspect",
            "--raw",
            "--config",
            "oci:image:v1",
        ]))
        .stdout,
    )
    .unwrap();
    let image_probe: Vec<&str> = ["CMD"].into_iter().chain(MARIADB_PROBE).collect();
    assert_eq!(
        config["config"]["Healthcheck"]["Test"],
        json!(image_probe),
        "{config}"
    );
    let podman_probe: Vec<&str> = ["CMD-SHELL"]
        .into_iter()
        .chain(MARIADB_PROBE)
        .chain(["||", "exit", "1"])
        .collect();
    assert_eq!(
        mariadb.inspect("{{json .Config.Healthcheck.Test}}"),
        json!(podman_probe).to_string()
    );
    let health = run(&mut mariadb.cmd(&["healthcheck", "run", &mariadb.name]));
    assert!(
        health.status.success(),
        "{}{}",
        stdout(&health),
        stderr(&health)
    );

    // Stopping the pod: SIGTERM, and mariadbd shuts down cleanly within 5 s (what the
    // manifest's grace period allows it after the preStop sleep), or podman would kill it.
    run_ok(&mut play.podman(&[
        "pod",
        "stop",
        "--time",
        &MARIADB_STOP_SECONDS.to_string(),
        "catalog-mariadb-pod-0",
    ]));
    let logs = mariadb.logs();
    assert_eq!(mariadb.exit_code(), 0, "{logs}");
    assert!(
        logs.trim_end().ends_with("Shutdown complete"),
        "no clean shutdown at the end of the log:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------
// docker run under the same constraints

/// `docker run` flags for what every manifest sets: read-only root, no capabilities, no new
/// privileges, the image's user, a tmpfs where the manifest has an emptyDir.
fn constrained(user: &str, writable: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = [
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--user",
        user,
    ]
    .map(str::to_owned)
    .to_vec();
    for path in writable {
        flags.extend(["--tmpfs".to_owned(), path.to_string()]);
    }
    flags
}

#[test]
fn docker_runs_the_images_under_the_manifests_constraints() {
    let Some(docker) = util::docker() else { return };
    let Some(registry) = util::registry() else {
        return;
    };
    require!("skopeo");
    if !util::require_root() {
        return;
    }
    let dir = test_dir();
    let d = dir.path();
    sqlite_under_docker(&d.join("sqlite"), &docker, &registry);
    mariadb_under_docker(&d.join("mariadb"), &docker, &registry);
    postgres_under_docker(&d.join("pg"), &docker, &registry);
}

/// `image` (REPO@sha256:...) pulled into docker, removed again when the guard is dropped.
fn docker_pull(docker: &Path, image: &str) -> util::DockerImage {
    run_ok(Command::new(docker).args(["pull", "--quiet", image]));
    util::DockerImage {
        docker: docker.to_owned(),
        name: image.to_owned(),
    }
}

/// SQLite: the user and the one writable path of docs/kubernetes/sqlite.yaml.
fn sqlite_under_docker(d: &Path, docker: &Path, registry: &str) {
    std::fs::create_dir(d).unwrap();
    let sqlite = manifest("sqlite");
    assert_eq!(one_value(&sqlite, "runAsUser"), "65532");
    assert_eq!(values(&sqlite, "mountPath"), ["/tmp"]);
    items_db(&d.join("app.db"), ROWS, true);
    let source = source_rows(&d.join("app.db"));
    let built = util::build_sqlite(d, "app.db", "oci:sqlite:v1", &[]);
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-docker-sqlite"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(d, "oci:sqlite:v1", &repo, "v1", digest);
    let _pulled = docker_pull(docker, &image);
    let addr = free_addr();
    let serve = Container::new(docker_cli(docker), unique_name("bakedb-e2e-k8s"));
    run_ok(
        serve
            .cmd(&[
                "run",
                "--detach",
                "--network",
                "host",
                "--name",
                &serve.name,
            ])
            .args(constrained("65532:65532", &["/tmp"]))
            .args([
                "--env",
                &format!("BAKEDB_LISTEN={addr}"),
                "--env",
                "BAKEDB_POOL_SIZE=2",
            ])
            .arg(&image),
    );
    serve.wait_until("answering /healthz", PATIENCE, &|| healthz(addr));
    assert_serves_source(addr, &built, &source);
    Confinement {
        uid: 65532,
        gid: 65532,
        writable: &["/tmp"],
    }
    .assert_holds(serve.pid(), "bakedb-serve under docker");
}

/// MariaDB: the user, the writable paths and the copy rule of docs/kubernetes/mariadb.yaml:
/// a full bake runs in place, a re-baked (patched) image on a composed copy; without the
/// copy directory a patched image cannot start under the read-only root.
fn mariadb_under_docker(d: &Path, docker: &Path, registry: &str) {
    let Some(tools) = maria_tools() else { return };
    let mariadb = manifest("mariadb");
    assert_eq!(one_value(&mariadb, "runAsUser"), "999");
    assert_eq!(values(&mariadb, "mountPath"), ["/tmp", COPY_DIR]);
    assert_eq!(env_value(&mariadb, "BAKEDB_DATA_COPY_DIR"), COPY_DIR);
    assert_eq!(env_value(&mariadb, "BAKEDB_DATA_COPY_WHEN"), "patched");
    let mut as_manifest = constrained("999:999", &["/tmp", COPY_DIR]);
    as_manifest.extend([
        "--env".into(),
        format!("BAKEDB_DATA_COPY_DIR={COPY_DIR}"),
        "--env".into(),
        "BAKEDB_DATA_COPY_WHEN=patched".into(),
    ]);
    let as_manifest: Vec<&str> = as_manifest.iter().map(String::as_str).collect();
    let Some((server, answers, built)) = mariadb_image(d) else {
        return;
    };
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-docker-maria"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(d, "oci:image:v1", &repo, "v1", digest);
    let _pulled = docker_pull(docker, &image);
    let replica = maria::Replica::start(docker_cli(docker), &image, &as_manifest, &tools.client);
    replica.wait_ready();
    for (sql, want) in SEED_CHECKS.iter().zip(&answers) {
        assert_eq!(&replica.read(sql), want, "{sql}");
    }
    let logs = replica.logs();
    assert!(
        logs.contains("bakedb-init: verified ") && !logs.contains("copied and verified"),
        "a full bake was copied: {logs}"
    );
    Confinement {
        uid: 999,
        gid: 999,
        writable: &["/tmp", COPY_DIR],
    }
    .assert_holds(replica.pid(), "mariadbd under docker");
    replica.stop_cleanly();

    // A re-bake (--from) ships the changed pages as a patch layer, which init composes into
    // the data files at start: under a read-only root that fails, naming the file system and
    // the copy directory, before mariadbd starts.
    server.sql(
        "UPDATE app.items_innodb SET price = price + 1 WHERE id = 7;
         INSERT INTO app.items_aria VALUES (5000, 'new', 1.5);",
    );
    let answers: Vec<String> = SEED_CHECKS.iter().map(|sql| server.sql(sql)).collect();
    let rebuilt = util::build_json(&run_ok(
        bakedb(d)
            .args(["build", "--engine", "mariadb", "--json", "--source"])
            .arg(server.url())
            .args(["--base", &maria::base_ref(), "--from", "oci:image:v1"])
            .args(["--output", "oci:image:v2"]),
    ));
    let digest = rebuilt["manifest_digest"].as_str().unwrap();
    let patched = push_pinned(d, "oci:image:v2", &repo, "v2", digest);
    let _pulled_patched = docker_pull(docker, &patched);
    let flags = constrained("999:999", &["/tmp"]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = maria::Replica::start(docker_cli(docker), &patched, &flags, &tools.client);
    let code = control.wait_stopped(PATIENCE);
    let logs = control.logs();
    assert_eq!(code, 1, "{logs}");
    assert!(
        logs.contains("Read-only file system") && logs.contains("BAKEDB_DATA_COPY_DIR"),
        "{logs}"
    );
    assert!(!logs.contains("Starting MariaDB"), "{logs}");

    // As the manifest has it (the copy directory an emptyDir on a cluster, copies only
    // when patched), it runs on the composed copy.
    let replica = maria::Replica::start(docker_cli(docker), &patched, &as_manifest, &tools.client);
    replica.wait_ready();
    for (sql, want) in SEED_CHECKS.iter().zip(&answers) {
        assert_eq!(&replica.read(sql), want, "{sql}");
    }
    let logs = replica.logs();
    assert!(
        logs.contains("bakedb-init: copied and verified ")
            && logs.contains(&format!("from /var/lib/bakedb into {COPY_DIR}")),
        "{logs}"
    );
    Confinement {
        uid: 999,
        gid: 999,
        writable: &["/tmp", COPY_DIR],
    }
    .assert_holds(replica.pid(), "mariadbd on a copy under docker");
    replica.stop_cleanly();
}

/// PostgreSQL: the user, the copy directory and the writable paths of
/// docs/kubernetes/postgres.yaml.
fn postgres_under_docker(d: &Path, docker: &Path, registry: &str) {
    let Some(pg_bin) = pg::pg_bin() else { return };
    let postgres = manifest("postgres");
    assert_eq!(one_value(&postgres, "runAsUser"), "999");
    let writable = values(&postgres, "mountPath");
    assert_eq!(writable, ["/tmp", COPY_DIR, "/dev/shm"]);
    let Some((_server, built)) = postgres_image(d, &pg_bin) else {
        return;
    };
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-docker-pg"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(d, "oci:image:v1", &repo, "v1", digest);
    let _pulled = docker_pull(docker, &image);
    // docker already mounts a tmpfs at /dev/shm (64 MiB): the two mounts the manifest adds.
    let mut flags = constrained("999:999", &["/tmp", COPY_DIR]);
    flags.extend(["--env".into(), format!("BAKEDB_DATA_COPY_DIR={COPY_DIR}")]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let replica = Replica::start(Box::new(docker_cli(docker)), &image, &flags, &pg_bin);
    replica.wait_ready();
    assert_eq!(replica.read("app", ITEMS_MD5_SQL), SEED_ITEMS_MD5);
    Confinement {
        uid: 999,
        gid: 999,
        writable: &["/tmp", COPY_DIR, "/dev/shm"],
    }
    .assert_holds(replica.pid(), "postgres under docker");
    replica.stop_cleanly();

    // The control: without the copy, PostgreSQL cannot start on a read-only root (it must
    // write postmaster.pid into its data directory), so the root really was read-only and
    // the copy is what makes it work.
    let flags = constrained("999:999", &["/tmp"]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = Replica::start(Box::new(docker_cli(docker)), &image, &flags, &pg_bin);
    let code = control.wait_stopped(PATIENCE);
    let logs = control.logs();
    assert_ne!(code, 0, "{logs}");
    assert!(logs.contains("Read-only file system"), "{logs}");
}
