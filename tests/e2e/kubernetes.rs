//! The Kubernetes manifests of docs/kubernetes/, for a SQLite (bakedb-serve) and a PostgreSQL
//! image: validated offline against the Kubernetes schemas (kubernetes-validate --strict, the
//! oldest and newest versions they are for, with no network), then run for real with
//! `podman kube play` from the local registry (pushed with skopeo, pinned by digest), the
//! same file with only the image and the replica count filled in. The replicas answer the
//! source's rows exactly; `podman inspect` shows what podman made of each field (what
//! docs/kubernetes/README.md says it honours and ignores); from the host, /proc shows each
//! engine runs under the manifest's constraints (read-only root, the emptyDir mounts
//! writable, the image's non-root user, no capabilities, no new privileges, seccomp);
//! stopping drains bakedb-serve and shuts PostgreSQL down cleanly; a restarted PostgreSQL
//! finds its verified copy on the volume and starts without copying again. docker runs the
//! same images under the same constraints (`--read-only`, tmpfs mounts, `--user`), and
//! without the copy directory PostgreSQL cannot start under a read-only root: the control
//! that shows the copy is needed and the root really is read-only.
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
use bakedb_testkit::netns::{in_netns_of_pid, on_thread_in_netns_of_pid};
use bakedb_testkit::ports::free_addr;
use bakedb_testkit::registry::push_pinned;

use crate::http;
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
    for engine in ["sqlite", "postgres"] {
        let path = manifest_path(engine);
        for version in KUBERNETES_VERSIONS {
            let out = offline(&["--strict", "--kubernetes-version", version], &path);
            let said = format!("{}{}", stdout(&out), stderr(&out));
            assert!(out.status.success(), "{engine} against {version}:\n{said}");
            let name = if engine == "sqlite" {
                "catalog"
            } else {
                "catalog-pg"
            };
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
        // podman turns a named port into 0), pg_isready in the image.
        let probe = if engine == "sqlite" {
            "httpGet:\n              path: /healthz\n              port: 8080\n"
        } else {
            "exec:\n              command: [\"pg_isready\", \"-q\"]\n"
        };
        assert_eq!(text.matches(probe).count(), 3, "{engine}: {probe:?}");
        let grace: u64 = one_value(&text, "terminationGracePeriodSeconds")
            .parse()
            .unwrap();
        let pre_stop: u64 = one_value(&text, "seconds").parse().unwrap();
        // The grace period covers the preStop sleep and bakedb-serve's whole drain (or
        // PostgreSQL's fast shutdown, a second at most here) with a margin.
        let stopping = if engine == "sqlite" {
            env_value(&text, "BAKEDB_DRAIN_MS").parse::<u64>().unwrap() / 1000
        } else {
            1
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

    // SQLite: the user and the one writable path of docs/kubernetes/sqlite.yaml.
    let sqlite = manifest("sqlite");
    assert_eq!(one_value(&sqlite, "runAsUser"), "65532");
    assert_eq!(values(&sqlite, "mountPath"), ["/tmp"]);
    items_db(&d.join("app.db"), ROWS, true);
    let source = source_rows(&d.join("app.db"));
    let built = util::build_sqlite(d, "app.db", "oci:sqlite:v1", &[]);
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-docker-sqlite"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(d, "oci:sqlite:v1", &repo, "v1", digest);
    run_ok(Command::new(&docker).args(["pull", "--quiet", &image]));
    let _pulled = util::DockerImage {
        docker: docker.clone(),
        name: image.clone(),
    };
    let addr = free_addr();
    let serve = Container::new(docker_cli(&docker), unique_name("bakedb-e2e-k8s"));
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

    // PostgreSQL: the user, the copy directory and the writable paths of
    // docs/kubernetes/postgres.yaml.
    let Some(pg_bin) = pg::pg_bin() else { return };
    let postgres = manifest("postgres");
    assert_eq!(one_value(&postgres, "runAsUser"), "999");
    let writable = values(&postgres, "mountPath");
    assert_eq!(writable, ["/tmp", COPY_DIR, "/dev/shm"]);
    let Some((_server, built)) = postgres_image(&d.join("pg"), &pg_bin) else {
        return;
    };
    let repo = format!("{registry}/bakedb-e2e/{}", unique_name("k8s-docker-pg"));
    let digest = built["manifest_digest"].as_str().unwrap();
    let image = push_pinned(&d.join("pg"), "oci:image:v1", &repo, "v1", digest);
    run_ok(Command::new(&docker).args(["pull", "--quiet", &image]));
    let _pulled_pg = util::DockerImage {
        docker: docker.clone(),
        name: image.clone(),
    };
    // docker already mounts a tmpfs at /dev/shm (64 MiB): the two mounts the manifest adds.
    let mut flags = constrained("999:999", &["/tmp", COPY_DIR]);
    flags.extend(["--env".into(), format!("BAKEDB_DATA_COPY_DIR={COPY_DIR}")]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let replica = Replica::start(Box::new(docker_cli(&docker)), &image, &flags, &pg_bin);
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
    let control = Replica::start(Box::new(docker_cli(&docker)), &image, &flags, &pg_bin);
    let code = control.wait_stopped(PATIENCE);
    let logs = control.logs();
    assert_ne!(code, 0, "{logs}");
    assert!(logs.contains("Read-only file system"), "{logs}");
}
