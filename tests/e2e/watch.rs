//! `bakedb watch`: a master under write load followed for a bounded time. Every generation's
//! immutable tag holds one consistent point of the master, the watched tag always names a
//! complete image, SIGTERM stops it cleanly and a restart with no local state continues the
//! chain from the tag.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use bakedb_testkit::fixtures::items_db;
use bakedb_testkit::ports::free_addr;
use bakedb_testkit::process::{SIGTERM, stop};

use crate::delta::{Writer, composed, inspect};
use crate::http;
use crate::util::{bakedb, run, run_ok, stderr, test_dir};

/// One line per generation the `--exec` hook wrote: (generation, digest, immutable reference).
fn hooks(file: &Path) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut w = l.split(' ');
            let g = w.next().unwrap().parse().unwrap();
            (
                g,
                w.next().unwrap().to_owned(),
                w.next().unwrap().to_owned(),
            )
        })
        .collect()
}

const HOOK: &str = "echo \"$BAKEDB_GENERATION $BAKEDB_DIGEST $BAKEDB_IMAGE\" >> hooks.txt";

fn spawn_watch(d: &Path, args: &[&str], log: &str) -> Child {
    bakedb(d)
        .arg("watch")
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(d.join(format!("{log}.out"))).unwrap())
        .stderr(File::create(d.join(format!("{log}.err"))).unwrap())
        .spawn()
        .unwrap()
}

fn log_of(d: &Path, log: &str) -> String {
    std::fs::read_to_string(d.join(format!("{log}.err"))).unwrap_or_default()
}

/// Wait (polling, with a deadline) until `done` holds; `each` runs on every round.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (rows, max id) of the writer's table in the database generation `reference` holds.
fn writes_of(d: &Path, layout: &Path, tag: &str) -> (i64, i64) {
    let image_json = inspect(d, &format!("oci:{}:{tag}", layout.display()))["image_json"].clone();
    let bytes = composed(layout, tag, &image_json);
    let file = d.join(format!("composed-{tag}.db"));
    std::fs::write(&file, bytes).unwrap();
    let db = rusqlite::Connection::open(&file).unwrap();
    let counts = db
        .query_row(
            "SELECT count(*), coalesce(max(id), 0) FROM writes",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let items: i64 = db
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(items, 2000, "{tag}: the items table");
    drop(db);
    std::fs::remove_file(&file).unwrap();
    counts
}

/// `app.db` in `d`: 2000 items (WAL) and the empty table the writer fills.
fn master_db(d: &Path) -> std::path::PathBuf {
    let master = d.join("app.db");
    items_db(&master, 2000, true);
    rusqlite::Connection::open(&master)
        .unwrap()
        .execute_batch("CREATE TABLE writes (id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    master
}

fn metric(addr: std::net::SocketAddr, name: &str) -> String {
    let r = http::get(addr, "/metrics");
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {name} in\n{}", r.text()))
}

#[test]
fn sqlite_master_under_write_load_every_generation_one_point_and_a_restart_continues() {
    let dir = test_dir();
    let d = dir.path();
    let master = master_db(d);
    let layout = d.join("out");
    let live = format!("oci:{}:live", layout.display());
    let metrics = free_addr();
    let writer = Writer::start(&master);
    let mut watch = spawn_watch(
        d,
        &[
            "--engine",
            "sqlite",
            "--source",
            "app.db",
            "--output",
            "oci:out:live",
            "--metrics-listen",
            &metrics.to_string(),
            "--exec",
            HOOK,
        ],
        "watch",
    );
    // While the writer runs: every time the tag is looked at, it names a complete image.
    let mut checked = 0;
    wait_until(
        "three generations under load",
        Duration::from_secs(180),
        || {
            if let Ok(Some(status)) = watch.try_wait() {
                panic!("bakedb watch exited with {status}: {}", log_of(d, "watch"));
            }
            // The first generation's immutable tag is written before `live` exists; once it
            // does, it never goes away.
            let index = std::fs::read_to_string(layout.join("index.json")).unwrap_or_default();
            if index.contains(r#""org.opencontainers.image.ref.name":"live""#) {
                run_ok(bakedb(d).args(["verify", "--json", &live]));
                checked += 1;
            }
            hooks(&d.join("hooks.txt")).len() >= 3
        },
    );
    assert!(checked > 0);
    drop(writer);
    let final_rows: i64 = rusqlite::Connection::open(&master)
        .unwrap()
        .query_row("SELECT count(*) FROM writes", [], |r| r.get(0))
        .unwrap();
    // The last commits become a generation of their own once the watcher sees them.
    wait_until(
        "a generation with every row",
        Duration::from_secs(120),
        || {
            let last = hooks(&d.join("hooks.txt")).last().cloned().unwrap();
            let tag = last.2.rsplit(':').next().unwrap().to_owned();
            writes_of(d, &layout, &tag).0 == final_rows
        },
    );
    let seen = hooks(&d.join("hooks.txt"));
    assert_eq!(
        metric(metrics, "bakedb_watch_generation"),
        seen.len().to_string()
    );
    assert_eq!(
        metric(metrics, "bakedb_watch_delay_seconds_count"),
        seen.len().to_string()
    );
    assert!(stop(&mut watch, SIGTERM, Duration::from_secs(60)));
    let status = watch.wait().unwrap();
    let log = log_of(d, "watch");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("bakedb watch: stopped"), "{log}");
    assert_eq!(
        log.matches("bakedb watch: generation ").count(),
        seen.len(),
        "one line per generation:\n{log}"
    );
    assert!(!log.contains("failed"), "{log}");

    // Each generation: a complete image of one committed point, never going back.
    let mut last_rows = 0;
    for (i, (g, digest, immutable)) in seen.iter().enumerate() {
        assert_eq!(*g, i as u64 + 1);
        let tag = immutable.rsplit(':').next().unwrap();
        assert!(tag.starts_with("live-"), "{immutable}");
        run_ok(bakedb(d).args(["verify", immutable]));
        let info = inspect(d, immutable);
        assert_eq!(info["manifest_digest"], *digest, "{info}");
        assert_eq!(
            info["image_json"]["generation"].as_u64().unwrap_or(0),
            i as u64,
            "generation {g} is a re-bake onto the one before"
        );
        let (rows, max_id) = writes_of(d, &layout, tag);
        assert_eq!(rows, max_id, "{immutable}: not one consistent point");
        assert!(
            rows >= last_rows,
            "{immutable}: {rows} rows after {last_rows}"
        );
        last_rows = rows;
    }
    let last = seen.last().unwrap();
    assert_eq!(inspect(d, &live)["manifest_digest"], last.1);

    // A restart keeps nothing but the tag: one more commit, one more generation on the chain.
    rusqlite::Connection::open(&master)
        .unwrap()
        .execute("INSERT INTO writes (v) VALUES (x'00')", [])
        .unwrap();
    let mut again = spawn_watch(
        d,
        &[
            "--engine",
            "sqlite",
            "--source",
            "app.db",
            "--output",
            "oci:out:live",
            "--generations",
            "1",
            "--exec",
            HOOK,
        ],
        "again",
    );
    wait_until("the restarted watch", Duration::from_secs(120), || {
        again.try_wait().unwrap().is_some()
    });
    let log = log_of(d, "again");
    assert!(again.wait().unwrap().success(), "{log}");
    assert!(log.contains("exists; re-baking onto it"), "{log}");
    let resumed = hooks(&d.join("hooks.txt"));
    assert_eq!(resumed.len(), seen.len() + 1);
    let (_, digest, immutable) = resumed.last().unwrap();
    let info = inspect(d, &live);
    assert_eq!(info["manifest_digest"], *digest);
    assert_eq!(
        info["image_json"]["generation"].as_u64().unwrap(),
        seen.len() as u64,
        "the chain goes on from the tag"
    );
    let tag = immutable.rsplit(':').next().unwrap();
    assert_eq!(writes_of(d, &layout, tag).0, final_rows + 1);
}

#[test]
fn sqlite_generations_pushed_to_a_registry_each_pull_as_one_point() {
    use bakedb_testkit::registry::{Registry, RegistryOptions};
    let Some(skopeo) = crate::util::tool("skopeo") else {
        return;
    };
    let Some(registry) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    let master = master_db(d);
    let repo = format!("{}/watch/app", registry.host());
    let live = format!("docker://{repo}:live");
    let writer = Writer::start(&master);
    let mut watch = spawn_watch(
        d,
        &[
            "--engine",
            "sqlite",
            "--source",
            "app.db",
            "--output",
            &live,
            "--tls-verify=false",
            "--generations",
            "3",
            "--exec",
            "echo \"$BAKEDB_GENERATION $BAKEDB_DIGEST $BAKEDB_IMAGE $BAKEDB_IMAGE_DIGEST\" >> pushed.txt",
        ],
        "watch",
    );
    wait_until("three pushed generations", Duration::from_secs(180), || {
        watch.try_wait().unwrap().is_some()
    });
    drop(writer);
    let log = log_of(d, "watch");
    assert!(watch.wait().unwrap().success(), "{log}");
    let pushed = std::fs::read_to_string(d.join("pushed.txt")).unwrap();
    let lines: Vec<Vec<&str>> = pushed.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3, "{pushed}\n{log}");
    let mut last_rows = 0;
    for (i, line) in lines.iter().enumerate() {
        let [_, digest, image, pinned] = line[..] else {
            panic!("{line:?}")
        };
        assert_eq!(pinned, format!("{repo}@{digest}"));
        // Pulled by digest as a replica's node would, checked, and read.
        run_ok(bakedb(d).args([
            "verify",
            "--tls-verify=false",
            &format!("docker://{pinned}"),
        ]));
        let tag = image.rsplit(':').next().unwrap();
        run_ok(Command::new(&skopeo).current_dir(d).args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            image,
            &format!("oci:pulled:{tag}"),
        ]));
        let pulled = d.join("pulled");
        let info = inspect(d, &format!("oci:{}:{tag}", pulled.display()));
        assert_eq!(info["manifest_digest"], digest);
        assert_eq!(
            info["image_json"]["generation"].as_u64().unwrap_or(0),
            i as u64
        );
        let (rows, max_id) = writes_of(d, &pulled, tag);
        assert_eq!(rows, max_id, "{image}: not one consistent point");
        assert!(rows >= last_rows);
        last_rows = rows;
    }
    let out = run_ok(bakedb(d).args(["inspect", "--json", "--tls-verify=false", &live]));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        info["manifest_digest"], lines[2][1],
        "the tag names the last generation"
    );
    // Each generation after the first sent its patch, not the database again.
    let sizes: Vec<u64> = log
        .lines()
        .filter(|l| l.starts_with("bakedb watch: generation "))
        .map(|l| {
            let new = l.split(": ").nth(2).unwrap();
            let (n, unit) = new.split_once(' ').unwrap();
            let n: f64 = n.parse().unwrap();
            (n * match &unit[..3] {
                "B n" => 1.0,
                "KiB" => 1024.0,
                "MiB" => 1048576.0,
                _ => 1073741824.0,
            }) as u64
        })
        .collect();
    assert_eq!(sizes.len(), 3, "{log}");
    assert!(
        sizes[1] * 4 < sizes[0] && sizes[2] * 4 < sizes[0],
        "{sizes:?}\n{log}"
    );
}

/// Wait until `watch` (logging to `log`) has said `needle` `times` times, failing if it exits.
fn wait_for_log(d: &Path, watch: &mut Child, log: &str, needle: &str, times: usize) {
    wait_until(needle, Duration::from_secs(120), || {
        if let Ok(Some(status)) = watch.try_wait() {
            panic!("bakedb watch exited with {status}: {}", log_of(d, log));
        }
        log_of(d, log).matches(needle).count() >= times
    });
}

#[test]
fn a_restart_while_the_registry_is_down_waits_for_it_and_goes_on_with_a_patch() {
    use bakedb_testkit::proxy::{Fault, FaultProxy};
    use bakedb_testkit::registry::{Registry, RegistryOptions, blob_count};
    let Some(registry) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    let master = master_db(d);
    // The previous run's generation, in the registry under the watched tag.
    let direct = format!("docker://{}/watch/app:live", registry.host());
    run_ok(
        bakedb(d)
            .args(crate::util::sqlite_build("app.db", &direct))
            .arg("--tls-verify=false"),
    );
    let before = inspect_registry(d, &direct);
    let blobs_before = blob_count(&registry.storage());
    rusqlite::Connection::open(&master)
        .unwrap()
        .execute("INSERT INTO writes (v) VALUES (x'01')", [])
        .unwrap();

    // The registry's address answers nothing yet: connections are refused.
    let down = free_addr();
    let live = format!("docker://{down}/watch/app:live");
    let watch_args = |metrics: &str| -> Vec<String> {
        [
            "--engine",
            "sqlite",
            "--source",
            "app.db",
            "--output",
            &live,
            "--tls-verify=false",
            "--generations",
            "1",
            "--metrics-listen",
            metrics,
            "--exec",
            HOOK,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let retrying = "bakedb watch: tag failed, retrying in";

    // SIGTERM while it waits: a clean stop, nothing written.
    let metrics = free_addr();
    let args = watch_args(&metrics.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut stopped = spawn_watch(d, &args, "stopped");
    wait_for_log(d, &mut stopped, "stopped", retrying, 1);
    assert!(stop(&mut stopped, SIGTERM, STOP_DEADLINE));
    let log = log_of(d, "stopped");
    assert_eq!(stopped.wait().unwrap().code(), Some(0), "{log}");
    assert!(
        log.contains("stopped before the watched tag could be read"),
        "{log}"
    );
    assert!(!log.contains("generation"), "{log}");

    let metrics = free_addr();
    let args = watch_args(&metrics.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut watch = spawn_watch(d, &args, "watch");
    wait_for_log(d, &mut watch, "watch", retrying, 2);
    let log = log_of(d, "watch");
    assert!(
        log.contains(&down.to_string()),
        "the registry is named:\n{log}"
    );
    assert!(
        !log.contains("generation"),
        "nothing baked while down:\n{log}"
    );
    let errors: u64 = metric(metrics, "bakedb_watch_errors_total{stage=\"tag\"}")
        .parse()
        .unwrap();
    assert!(errors >= 2, "{errors} errors counted");
    assert_eq!(blob_count(&registry.storage()), blobs_before);

    // The registry comes back at that address; blob uploads (their closing PUT) are counted.
    let proxy = FaultProxy::start_on(
        down,
        registry.addr(),
        vec![Fault::count("PUT", "/v2/*/blobs/uploads/*")],
    );
    wait_until("the first generation", Duration::from_secs(180), || {
        watch.try_wait().unwrap().is_some()
    });
    let log = log_of(d, "watch");
    assert!(watch.wait().unwrap().success(), "{log}");
    assert!(log.contains("exists; re-baking onto it"), "{log}");
    // A patch on the tag's image: its patch layer, image.json layer and config went up, and
    // the manifest; the base's layers were not sent again.
    assert_eq!(proxy.forwarded(0), 3, "blobs uploaded:\n{log}");
    assert_eq!(blob_count(&registry.storage()), blobs_before + 4);
    let after = inspect_registry(d, &direct);
    assert_eq!(
        after["image_json"]["generation"], 1,
        "the chain goes on: {after}"
    );
    let (_, digest, _) = hooks(&d.join("hooks.txt")).pop().unwrap();
    assert_eq!(after["manifest_digest"], digest);
    assert_ne!(after["manifest_digest"], before["manifest_digest"]);
    let before_layers = before["layers"].as_array().unwrap();
    assert_eq!(
        &after["layers"].as_array().unwrap()[..before_layers.len()],
        &before_layers[..],
        "the tag's layers are kept"
    );
}

/// How long a SIGTERM'd watch may take to exit while a registry fails (docker stop's grace
/// is 10 s): a deadline for the wait, so a hang fails the test instead of stalling it.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// `bakedb watch` of `app.db` in `d` to `output` (a plain-HTTP registry), logging to "watch".
fn spawn_sqlite_watch(d: &Path, output: &str) -> Child {
    spawn_watch(
        d,
        &[
            "--engine",
            "sqlite",
            "--source",
            "app.db",
            "--output",
            output,
            "--tls-verify=false",
        ],
        "watch",
    )
}

/// SIGTERM `watch`, which must exit 0 within STOP_DEADLINE: its log.
fn stopped_within_the_deadline(d: &Path, mut watch: Child) -> String {
    assert!(
        stop(&mut watch, SIGTERM, STOP_DEADLINE),
        "bakedb watch was still running {} s after SIGTERM:\n{}",
        STOP_DEADLINE.as_secs(),
        log_of(d, "watch")
    );
    let log = log_of(d, "watch");
    assert_eq!(watch.wait().unwrap().code(), Some(0), "{log}");
    log
}

#[test]
fn sigterm_while_the_registry_drops_every_connection_at_start_stops_within_seconds() {
    use bakedb_testkit::proxy::ClosingListener;
    let dir = test_dir();
    let d = dir.path();
    master_db(d);
    // As unreachable to the client as a closed port, but the client's tries are counted.
    let down = ClosingListener::start();
    let mut watch = spawn_sqlite_watch(d, &format!("docker://{}/watch/app:live", down.host()));
    wait_for_log(
        d,
        &mut watch,
        "watch",
        "bakedb watch: tag failed, retrying in",
        1,
    );
    // Past watch's own wait (which always ended at a signal): the registry client is in its
    // retries of the next read of the tag, which used to run out their backoff (~15 s).
    let seen = down.accepted();
    wait_until("the client's retries", Duration::from_secs(60), || {
        down.accepted() >= seen + 2
    });
    let log = stopped_within_the_deadline(d, watch);
    assert!(log.contains("tag failed, not retried: stopping"), "{log}");
    assert!(
        log.contains("stopped before the watched tag could be read"),
        "{log}"
    );
}

#[test]
fn sigterm_while_a_push_is_retrying_abandons_the_generation_within_seconds() {
    use bakedb_testkit::proxy::{Fault, FaultProxy};
    use bakedb_testkit::registry::{Registry, RegistryOptions};
    let Some(registry) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    master_db(d);
    // Every blob upload's closing PUT fails: the client restarts the upload with backoff.
    let proxy = FaultProxy::start(
        registry.addr(),
        vec![Fault::unavailable("PUT", "/v2/*/blobs/uploads/*", u64::MAX)],
    );
    let mut watch = spawn_sqlite_watch(d, &format!("docker://{}/watch/app:live", proxy.host()));
    wait_until("a retried upload", Duration::from_secs(120), || {
        if let Ok(Some(status)) = watch.try_wait() {
            panic!("bakedb watch exited with {status}: {}", log_of(d, "watch"));
        }
        proxy.answered(0) >= 2
    });
    let log = stopped_within_the_deadline(d, watch);
    assert!(log.contains("build failed, not retried: stopping"), "{log}");
    assert!(!log.contains("generation 1"), "{log}");
    // Neither the watched tag nor the generation's own names an image.
    let tags = crate::http::get(registry.addr(), "/v2/watch/app/tags/list");
    assert!(
        tags.status == 404
            || tags.text().contains("\"tags\":null")
            || tags.text().contains("\"tags\":[]"),
        "{} {}",
        tags.status,
        tags.text()
    );
}

/// `bakedb inspect --json` of a plain-HTTP registry image.
fn inspect_registry(d: &Path, reference: &str) -> Value {
    let out = run_ok(bakedb(d).args(["inspect", "--json", "--tls-verify=false", reference]));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn flags_that_cannot_work_are_refused_before_any_work() {
    let dir = test_dir();
    let d = dir.path();
    items_db(&d.join("app.db"), 10, false);
    for (args, needle) in [
        (
            vec!["--output", "oci-archive:a.tar:live"],
            "tagged OCI layout",
        ),
        (vec!["--output", "oci:out"], "tagged OCI layout"),
        (
            vec!["--output", "oci:out:live", "--from", "oci:out:old"],
            "--from is bakedb watch's own",
        ),
        (
            vec!["--output", "oci:out:live", "--min-interval", "100ms"],
            "below 1s",
        ),
        (
            vec!["--output", "oci:out:live", "--no-overwrite"],
            "moves --output's tag",
        ),
    ] {
        let out = run(bakedb(d)
            .args(["watch", "--engine", "sqlite", "--source", "app.db"])
            .args(&args));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(!d.join("out").exists() && !d.join("a.tar").exists());
    }
    // A source that is a snapshot directory never changes.
    std::fs::create_dir(d.join("snap")).unwrap();
    let out = run(bakedb(d).args([
        "watch",
        "--engine",
        "sqlite",
        "--source",
        "snap",
        "--output",
        "oci:out:live",
    ]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("never changes"), "{}", stderr(&out));
}

#[test]
fn postgres_master_under_write_load_generations_on_one_chain() {
    use crate::pg::{self, PgServer};
    use crate::postgres::{Replica, base_ref, writes_in};
    let Some(pg_bin) = pg::pg_bin() else { return };
    let Some(docker) = crate::util::docker() else {
        return;
    };
    crate::require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    std::fs::create_dir(d.join("src")).unwrap();
    let Some(source) = PgServer::start(&d.join("src")) else {
        return;
    };
    source.seed("app");
    let load = source.write_load("app", "writes");
    let committed_at_start = load.committed();
    let mut watch = spawn_watch(
        d,
        &[
            "--engine",
            "postgres",
            "--base",
            &base_ref(),
            "--pg-bin",
            pg_bin.to_str().unwrap(),
            "--source",
            &source.url("app"),
            "--output",
            "oci:out:live",
            "--generations",
            "3",
            "--exec",
            HOOK,
        ],
        "watch",
    );
    wait_until(
        "three PostgreSQL generations",
        Duration::from_secs(300),
        || watch.try_wait().unwrap().is_some(),
    );
    let log = log_of(d, "watch");
    assert!(watch.wait().unwrap().success(), "{log}");
    load.stop();
    let seen = hooks(&d.join("hooks.txt"));
    assert_eq!(seen.len(), 3, "{log}");
    let mut last_lsn = String::new();
    for (i, (_, digest, immutable)) in seen.iter().enumerate() {
        run_ok(bakedb(d).args(["verify", immutable]));
        let info = inspect(d, immutable);
        assert_eq!(info["manifest_digest"], *digest);
        let ij = &info["image_json"];
        assert_eq!(ij["generation"].as_u64().unwrap_or(0), i as u64, "{log}");
        let lsn = lsn_key(&ij["snapshot"]["position"]["start_lsn"]);
        assert!(lsn > last_lsn, "generation {i}: {lsn} after {last_lsn}");
        last_lsn = lsn;
    }
    // The last generation runs and holds one consistent point of the writes, made after the
    // watch started.
    let (_, _, last) = seen.last().unwrap();
    let image = crate::delta::to_docker(&docker, d, last);
    let replica = Replica::start(
        Box::new({
            let docker = docker.clone();
            move || Command::new(&docker)
        }),
        &image.name,
        &[],
        &pg_bin,
    );
    replica.wait_ready();
    let (rows, max_id) = writes_in(&replica);
    assert_eq!(rows, max_id, "not one consistent point");
    assert!(rows >= committed_at_start, "{rows} < {committed_at_start}");
    replica.stop_cleanly();
}

#[test]
fn mariadb_master_under_write_load_generations_on_one_chain() {
    use crate::mariadb::{Replica, base_ref, gtid_seq};
    use bakedb_testkit::mariadb::{MariaServer, maria_tools};
    let Some(tools) = maria_tools() else { return };
    let Some(docker) = crate::util::docker() else {
        return;
    };
    crate::require!("skopeo");
    let dir = test_dir();
    let d = dir.path();
    std::fs::create_dir(d.join("src")).unwrap();
    let Some(source) = MariaServer::start(&d.join("src")) else {
        return;
    };
    source.seed();
    let load = source.write_load();
    let committed_at_start = load.committed();
    let mut watch = spawn_watch(
        d,
        &[
            "--engine",
            "mariadb",
            "--base",
            &base_ref(),
            "--source",
            &source.url(),
            "--output",
            "oci:out:live",
            "--generations",
            "2",
            "--exec",
            HOOK,
        ],
        "watch",
    );
    wait_until("two MariaDB generations", Duration::from_secs(300), || {
        watch.try_wait().unwrap().is_some()
    });
    let log = log_of(d, "watch");
    assert!(watch.wait().unwrap().success(), "{log}");
    load.stop();
    let seen = hooks(&d.join("hooks.txt"));
    assert_eq!(seen.len(), 2, "{log}");
    let mut last_seq = 0;
    for (i, (_, digest, immutable)) in seen.iter().enumerate() {
        run_ok(bakedb(d).args(["verify", immutable]));
        let info = inspect(d, immutable);
        assert_eq!(info["manifest_digest"], *digest);
        let ij = &info["image_json"];
        assert_eq!(ij["generation"].as_u64().unwrap_or(0), i as u64, "{log}");
        let seq = gtid_seq(ij["snapshot"]["position"]["gtid"].as_str().unwrap());
        assert!(
            seq > last_seq,
            "generation {i}: GTID {seq} after {last_seq}"
        );
        last_seq = seq;
    }
    // The last generation (a patch on the first) runs and holds one consistent point.
    let (_, _, last) = seen.last().unwrap();
    let image = crate::delta::to_docker(&docker, d, last);
    let replica = Replica::start(
        Box::new({
            let docker = docker.clone();
            move || Command::new(&docker)
        }),
        &image.name,
        &[],
        &tools.client,
    );
    replica.wait_ready();
    let line = replica.read("SELECT COUNT(*), MAX(id) FROM app.load_innodb");
    let (rows, max_id) = line.split_once('\t').unwrap();
    assert_eq!(rows, max_id, "not one consistent point");
    assert!(rows.parse::<u64>().unwrap() >= committed_at_start);
    replica.stop_cleanly();
}

/// An LSN ("16/B374D848") as a key that sorts like the position.
fn lsn_key(v: &Value) -> String {
    let text = v.as_str().unwrap_or_else(|| panic!("no LSN: {v}"));
    let (hi, lo) = text.split_once('/').unwrap();
    format!(
        "{:08x}{:08x}",
        u32::from_str_radix(hi, 16).unwrap(),
        u32::from_str_radix(lo, 16).unwrap()
    )
}
