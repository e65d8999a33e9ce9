//! The docker:// transport against real registries: the shared one .ci/run starts
//! (BAKEDB_TEST_REGISTRY, plain HTTP) and ones a test starts itself (bakedb-testkit's
//! `registry`: htpasswd basic auth and TLS with the test's own CA, a storage the test may
//! damage; `proxy`: one that cuts connections, one that answers 429 and 503). skopeo judges
//! what was pushed.

use std::path::Path;
use std::process::Command;

use bakedb_testkit::proxy::{DroppingProxy, Fault, FaultProxy};
use bakedb_testkit::registry::{Registry, RegistryOptions, auth_json};

use crate::errors::assert_failure;
use crate::util::{
    self, build_json, busybox_base, dir_with_db, make_big_db, registry, run, run_ok, stderr,
    stdout, tool, unique_name,
};

const OUTPUT: i32 = 6;
const BASE: i32 = 5;
const VERIFY_FAILED: i32 = 3;

/// `bakedb` in `dir` that sees no credentials of this machine: HOME is `dir`, and no auth
/// file, runtime dir or Docker config from the environment.
fn bakedb(dir: &Path) -> Command {
    let mut cmd = util::bakedb(dir);
    cmd.env("HOME", dir)
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG")
        .env_remove("XDG_CONFIG_HOME");
    cmd
}

/// `bakedb build --engine sqlite --source app.db --output OUTPUT --json EXTRA...`, which
/// must succeed: what it printed.
fn build(dir: &Path, output: &str, extra: &[&str]) -> serde_json::Value {
    build_json(&run_ok(
        bakedb(dir)
            .args(util::sqlite_build("app.db", output))
            .arg("--json")
            .args(extra),
    ))
}

/// The push counts `build --json` reports: (uploaded, already there, mounted).
fn pushed(out: &serde_json::Value) -> (u64, u64, u64) {
    let p = &out["push"];
    (
        p["uploaded"].as_u64().unwrap(),
        p["already_there"].as_u64().unwrap(),
        p["mounted"].as_u64().unwrap(),
    )
}

/// `bakedb build --quiet` of app.db to `output`: a failure is its one line.
fn build_quiet(output: &str) -> [&str; 8] {
    [
        "build", "--quiet", "--engine", "sqlite", "--source", "app.db", "--output", output,
    ]
}

fn skopeo(dir: &Path) -> Command {
    let mut cmd = Command::new(tool("skopeo").unwrap());
    cmd.current_dir(dir);
    cmd
}

/// A repository name of this test run alone.
fn repo(what: &str) -> String {
    unique_name(&format!("bakedb-e2e-{what}")).to_lowercase()
}

#[test]
fn push_verify_inspect_and_skopeo_pull() {
    crate::require!("skopeo");
    let Some(reg) = registry() else { return };
    let dir = dir_with_db(500);
    let d = dir.path();
    let image = format!("docker://{reg}/{}:v1", repo("push"));
    let first = build(d, &image, &["--tls-verify=false"]);
    // 4 layers (init, serve, data, image.json) and the config, in a new repository.
    assert_eq!(pushed(&first), (5, 0, 0), "{first}");
    // The same inputs again: the same digest, and the registry has every blob.
    let again = build(d, &image, &["--tls-verify=false"]);
    assert_eq!(again["manifest_digest"], first["manifest_digest"]);
    assert_eq!(pushed(&again), (0, 5, 0), "{again}");
    // A push is the image a layout gets, byte for byte.
    let local = build(d, "oci:out:v1", &[]);
    assert_eq!(local["manifest_digest"], first["manifest_digest"]);

    run_ok(bakedb(d).args(["verify", "--tls-verify=false", &image]));
    let inspect = run_ok(bakedb(d).args(["inspect", "--json", "--tls-verify=false", &image]));
    assert!(
        stdout(&inspect).contains(first["manifest_digest"].as_str().unwrap()),
        "{}",
        stdout(&inspect)
    );
    // skopeo reads it as any registry image, and the copy is the same image.
    let raw = run_ok(skopeo(d).args(["inspect", "--raw", "--tls-verify=false", &image]));
    assert_eq!(
        util::sha256_hex(&raw.stdout),
        first["manifest_digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    );
    run_ok(skopeo(d).args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &image,
        "oci:copy:v1",
    ]));
    run_ok(bakedb(d).args(["verify", "oci:copy:v1"]));
    // skopeo's tag reference form works for bakedb as well: by digest.
    let by_digest = format!(
        "{}@{}",
        image.trim_end_matches(":v1"),
        first["manifest_digest"].as_str().unwrap()
    );
    run_ok(bakedb(d).args(["verify", "--tls-verify=false", &by_digest]));
}

#[test]
fn base_from_a_registry_is_mounted_and_pulls_like_a_layout() {
    crate::require!("skopeo");
    let Some(reg) = registry() else { return };
    let dir = dir_with_db(300);
    let d = dir.path();
    let fixture = format!("oci:{}:latest", busybox_base().display());
    let base = format!("docker://{reg}/{}:latest", repo("base"));
    run_ok(skopeo(d).args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &fixture,
        &base,
    ]));
    let base_layers = run_ok(skopeo(d).args(["inspect", "--tls-verify=false", &base]));
    let n_base = serde_json::from_slice::<serde_json::Value>(&base_layers.stdout).unwrap()["Layers"]
        .as_array()
        .unwrap()
        .len() as u64;

    // Into another repository of the same registry: the base's layers are mounted.
    let app = format!("docker://{reg}/{}:v1", repo("app"));
    let pushed_out = build(d, &app, &["--base", &base, "--tls-verify=false"]);
    let (uploaded, there, mounted) = pushed(&pushed_out);
    assert_eq!(mounted, n_base, "{pushed_out}");
    assert_eq!(there, 0, "{pushed_out}");
    assert!(uploaded >= 3, "{pushed_out}");
    run_ok(bakedb(d).args(["verify", "--tls-verify=false", &app]));

    // Pulled into a layout, the base gives the image a layout base gives.
    let from_registry = build(d, "oci:a:v1", &["--base", &base, "--tls-verify=false"]);
    let from_layout = build(d, "oci:b:v1", &["--base", &fixture]);
    assert_eq!(
        from_registry["manifest_digest"],
        from_layout["manifest_digest"]
    );
    assert_eq!(
        from_registry["manifest_digest"],
        pushed_out["manifest_digest"]
    );
    run_ok(bakedb(d).args(["verify", "oci:a:v1"]));
}

#[test]
fn from_a_registry_image_pushes_only_the_patch() {
    let Some(reg) = registry() else { return };
    let dir = dir_with_db(20_000);
    let d = dir.path();
    let chain = format!("docker://{reg}/{}", repo("chain"));
    let v1 = build(d, &format!("{chain}:v1"), &["--tls-verify=false"]);
    let c = rusqlite::Connection::open(d.join("app.db")).unwrap();
    c.execute("UPDATE t SET v = 'changed' WHERE id = 4242", [])
        .unwrap();
    drop(c);
    let v2 = build(
        d,
        &format!("{chain}:v2"),
        &["--from", &format!("{chain}:v1"), "--tls-verify=false"],
    );
    // REF's four layers are there; the patch layer, image.json layer and config are sent.
    assert_eq!(pushed(&v2), (3, 4, 0), "{v2}");
    let inspect = run_ok(bakedb(d).args(["inspect", "--tls-verify=false", &format!("{chain}:v2")]));
    assert!(
        stdout(&inspect).contains("generation 1"),
        "{}",
        stdout(&inspect)
    );
    run_ok(bakedb(d).args(["verify", "--tls-verify=false", &format!("{chain}:v2")]));
    // Into another repository: REF's layers are mounted from REF's.
    let other = format!("docker://{reg}/{}:v2", repo("chain-copy"));
    let copied = build(
        d,
        &other,
        &["--from", &format!("{chain}:v1"), "--tls-verify=false"],
    );
    assert_eq!(copied["manifest_digest"], v2["manifest_digest"]);
    assert_eq!(pushed(&copied), (3, 0, 4), "{copied}");
    assert_eq!(v1["layers"].as_array().unwrap().len(), 4);
}

/// A registry of its own with alice's basic auth over TLS (the test's CA), a source of 200
/// rows, and where its image goes.
struct Alice {
    reg: Registry,
    dir: tempfile::TempDir,
    host: String,
    image: String,
    certs: std::path::PathBuf,
}

impl Alice {
    fn start() -> Option<Alice> {
        let reg = Registry::start(RegistryOptions {
            user: Some(("alice".into(), "s3cret".into())),
            tls: true,
            ..RegistryOptions::default()
        })?;
        let host = reg.host();
        Some(Alice {
            dir: dir_with_db(200),
            image: format!("docker://{host}/app:v1"),
            certs: reg.cert_dir(),
            host,
            reg,
        })
    }
}

#[test]
fn tls_and_basic_auth_registry() {
    let Some(Alice {
        reg,
        dir,
        host,
        image,
        certs,
    }) = Alice::start()
    else {
        return;
    };
    let d = dir.path();
    let certs = certs.to_str().unwrap();

    // The test's CA is not trusted: said so, with the flag that trusts it.
    let out = run(bakedb(d).args(build_quiet(&image)));
    assert_failure(&out, OUTPUT, &["TLS", "--cert-dir"], "untrusted CA");
    // Trusted, but no credentials anywhere.
    let out = run(bakedb(d)
        .args(build_quiet(&image))
        .args(["--cert-dir", certs]));
    assert_failure(
        &out,
        OUTPUT,
        &["requires credentials", "--creds", "auth.json"],
        "no credentials",
    );
    // A wrong password names the user and where it came from.
    let out = run(bakedb(d).args(build_quiet(&image)).args([
        "--cert-dir",
        certs,
        "--creds",
        "alice:wrong",
    ]));
    assert_failure(
        &out,
        OUTPUT,
        &["refused the credentials", "\"alice\"", "--creds"],
        "wrong password",
    );
    assert_eq!(
        bakedb_testkit::registry::blob_count(&reg.storage()),
        0,
        "nothing pushed by failed builds"
    );

    let pushed_out = build(d, &image, &["--cert-dir", certs, "--creds", "alice:s3cret"]);
    assert_eq!(pushed(&pushed_out).0, 5, "{pushed_out}");

    // Credentials from REGISTRY_AUTH_FILE, then from ~/.docker/config.json.
    std::fs::write(d.join("auth.json"), auth_json(&host, "alice", "s3cret")).unwrap();
    run_ok(
        bakedb(d)
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .args(["verify", "--cert-dir", certs, &image]),
    );
    std::fs::create_dir(d.join(".docker")).unwrap();
    std::fs::write(
        d.join(".docker/config.json"),
        auth_json(&host, "alice", "s3cret"),
    )
    .unwrap();
    run_ok(bakedb(d).args(["inspect", "--cert-dir", certs, &image]));
    // And $XDG_RUNTIME_DIR/containers/auth.json, where podman login writes, wins over it.
    std::fs::create_dir_all(d.join("run/containers")).unwrap();
    std::fs::write(
        d.join("run/containers/auth.json"),
        auth_json(&host, "alice", "nope"),
    )
    .unwrap();
    let out = run(bakedb(d).args(["verify", "--quiet", "--cert-dir", certs, &image]));
    assert_failure(
        &out,
        8,
        &["refused the credentials", "containers/auth.json"],
        "runtime auth file first",
    );
}

#[test]
fn upload_survives_dropped_connections() {
    let Some(reg) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = util::test_dir();
    let d = dir.path();
    make_big_db(&d.join("app.db"), 6);
    for (tag, chunk) in [("chunked", Some("1048576")), ("monolithic", None)] {
        // Cut the connection carrying the client's 2nd MiB, then every 3 MiB, three times.
        let proxy = DroppingProxy::start(reg.addr(), 1 << 21, 3 << 20, 3);
        // A repository each: the second push must not find the first one's blobs.
        let image = format!("docker://{}/{tag}:v1", proxy.host());
        let mut cmd = bakedb(d);
        if let Some(chunk) = chunk {
            cmd.env("BAKEDB_REGISTRY_CHUNK_BYTES", chunk);
        }
        let out = run_ok(cmd.args(util::sqlite_build("app.db", &image)).args([
            "--compression",
            "none",
            "--tls-verify=false",
            "--json",
        ]));
        assert!(proxy.cuts() >= 1, "{tag}: the proxy cut nothing");
        let digest = build_json(&out)["manifest_digest"].clone();
        // Straight from the registry, not through the proxy: whole and correct.
        let direct = format!("docker://{}/{tag}:v1", reg.host());
        let verified = run_ok(bakedb(d).args(["verify", "--tls-verify=false", &direct]));
        assert!(
            stderr(&verified).contains(digest.as_str().unwrap()),
            "{}",
            stderr(&verified)
        );
    }
}

#[test]
fn corrupt_blob_is_refused_on_pull() {
    crate::require!("skopeo");
    let Some(reg) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = dir_with_db(100);
    let d = dir.path();
    let fixture = format!("oci:{}:latest", busybox_base().display());
    let base = format!("docker://{}/base:latest", reg.host());
    run_ok(skopeo(d).args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &fixture,
        &base,
    ]));
    let info = run_ok(skopeo(d).args(["inspect", "--tls-verify=false", &base]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let layer = info["Layers"][0].as_str().unwrap().to_owned();
    // Same size, one byte changed: only the digest can tell.
    let path = reg.blob_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let out = run(bakedb(d).args(["verify", "--quiet", "--tls-verify=false", &base]));
    assert_failure(&out, VERIFY_FAILED, &[&layer], "verify of a corrupt blob");
    let out = run(bakedb(d).args(build_quiet("oci:out:v1")).args([
        "--base",
        &base,
        "--tls-verify=false",
    ]));
    assert_failure(
        &out,
        BASE,
        &[&layer, "does not match"],
        "a corrupt base layer",
    );
    let index = std::fs::read_to_string(d.join("out/index.json")).unwrap_or_default();
    assert!(!index.contains("v1"), "a tag was written: {index}");
}

#[test]
fn base_from_an_image_index_takes_this_machines_image() {
    crate::require!("skopeo");
    let Some(reg) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = dir_with_db(100);
    let d = dir.path();
    let fixture = format!("oci:{}:latest", busybox_base().display());
    let host = reg.host();
    // Two images: the base fixture for this machine, a bakedb image (refused as a base)
    // for another architecture.
    run_ok(skopeo(d).args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &fixture,
        &format!("docker://{host}/base:here"),
    ]));
    build(
        d,
        &format!("docker://{host}/base:other"),
        &["--tls-verify=false"],
    );
    let descriptor = |tag: &str, arch: &str| {
        let raw = run_ok(skopeo(d).args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{host}/base:{tag}"),
        ]))
        .stdout;
        let media_type = serde_json::from_slice::<serde_json::Value>(&raw).unwrap()["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_owned();
        serde_json::json!({
            "mediaType": media_type,
            "digest": format!("sha256:{}", util::sha256_hex(&raw)),
            "size": raw.len(),
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let here = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor("other", "s390x"), descriptor("here", here)],
    });
    let put = crate::http::request(
        reg.addr(),
        "PUT",
        "/v2/base/manifests/multi",
        &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
        index.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(put.status, 201, "{}", put.text());

    let from_index = build(
        d,
        "oci:a:v1",
        &[
            "--base",
            &format!("docker://{host}/base:multi"),
            "--tls-verify=false",
        ],
    );
    let from_layout = build(d, "oci:b:v1", &["--base", &fixture]);
    assert_eq!(
        from_index["manifest_digest"],
        from_layout["manifest_digest"]
    );
}

/// The manifest digest the registry at `host` serves for `image` (a docker:// reference
/// there), read past any proxy.
fn served_digest(dir: &Path, image: &str) -> String {
    let out = run_ok(bakedb(dir).args(["inspect", "--json", "--tls-verify=false", image]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["manifest_digest"].as_str().unwrap().to_owned()
}

#[test]
fn push_and_pull_retry_429_and_503() {
    let Some(reg) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = util::test_dir();
    let d = dir.path();
    // 2 MiB of data stored uncompressed: with 1 MiB chunks the data layer goes up in PATCHes.
    make_big_db(&d.join("app.db"), 2);
    // Every kind of request a push makes is refused at first, once or twice.
    let faults = vec![
        Fault::unavailable("GET", "/v2/", 1),
        Fault::too_many_requests("POST", "/v2/*/blobs/uploads/", 2),
        Fault::unavailable("HEAD", "/v2/*/blobs/sha256:*", 2),
        Fault::too_many_requests("PATCH", "/v2/*/blobs/uploads/*", 1),
        Fault::unavailable("PUT", "/v2/*/blobs/uploads/*digest=*", 1),
        Fault::too_many_requests("PUT", "/v2/*/manifests/*", 1),
    ];
    let proxy = FaultProxy::start(reg.addr(), faults.clone());
    let image = format!("docker://{}/retried:v1", proxy.host());
    let out = run_ok(
        bakedb(d)
            .env("BAKEDB_REGISTRY_CHUNK_BYTES", "1048576")
            .args(util::sqlite_build("app.db", &image))
            .args(["--compression", "none", "--tls-verify=false", "--json"]),
    );
    let built = build_json(&out);
    for (i, fault) in faults.iter().enumerate() {
        assert_eq!(
            proxy.answered(i),
            fault.times,
            "{} {}: every injected answer was met",
            fault.method,
            fault.pattern
        );
        assert!(
            proxy.forwarded(i) >= 1,
            "{} {}: never sent again after the {}",
            fault.method,
            fault.pattern,
            fault.status
        );
    }
    // Nothing was given up on: the registry itself, past the proxy, has the whole image.
    let direct = format!("docker://{}/retried:v1", reg.host());
    let verified = run_ok(bakedb(d).args(["verify", "--tls-verify=false", &direct]));
    let digest = built["manifest_digest"].as_str().unwrap();
    assert!(stderr(&verified).contains(digest), "{}", stderr(&verified));

    // A pull retries as well: manifests and blobs refused at first.
    let pull_faults = vec![
        Fault::too_many_requests("GET", "/v2/retried/manifests/*", 2),
        Fault::unavailable("GET", "/v2/retried/blobs/sha256:*", 2),
    ];
    let proxy = FaultProxy::start(reg.addr(), pull_faults);
    let through = format!("docker://{}/retried:v1", proxy.host());
    let verified = run_ok(bakedb(d).args(["verify", "--tls-verify=false", &through]));
    assert!(stderr(&verified).contains(digest), "{}", stderr(&verified));
    for i in 0..2 {
        assert_eq!(proxy.answered(i), 2, "pull fault {i}");
        assert!(proxy.forwarded(i) >= 1, "pull fault {i}");
    }
}

#[test]
fn a_registry_that_keeps_failing_ends_the_push_with_one_line_and_the_tag_unmoved() {
    let Some(reg) = Registry::start(RegistryOptions::default()) else {
        return;
    };
    let dir = dir_with_db(300);
    let d = dir.path();
    let direct = format!("docker://{}/app:live", reg.host());
    let v1 = build(d, &direct, &["--tls-verify=false"]);
    let v1 = v1["manifest_digest"].as_str().unwrap().to_owned();
    rusqlite::Connection::open(d.join("app.db"))
        .unwrap()
        .execute("UPDATE t SET v = 'changed' WHERE id = 7", [])
        .unwrap();
    for (fault, status) in [
        // The access check (an upload started and cancelled) fails: before any work.
        (
            Fault::too_many_requests("POST", "/v2/*/blobs/uploads/", u64::MAX),
            "429 Too Many Requests",
        ),
        // Every blob goes up, the manifest never does.
        (
            Fault::unavailable("PUT", "/v2/*/manifests/*", u64::MAX),
            "503 Service Unavailable",
        ),
    ] {
        let proxy = FaultProxy::start(reg.addr(), vec![fault.clone()]);
        let image = format!("docker://{}/app:live", proxy.host());
        let out = run(bakedb(d)
            .args(build_quiet(&image))
            .arg("--tls-verify=false"));
        assert_failure(
            &out,
            OUTPUT,
            &[&format!("docker://{}/app", proxy.host()), status, "6 times"],
            &format!("{} always answered {}", fault.pattern, fault.status),
        );
        assert_eq!(
            proxy.answered(0),
            6,
            "{}: one request, six tries",
            fault.pattern
        );
        assert_eq!(served_digest(d, &direct), v1, "the tag moved");
    }
    // Reading from a registry that keeps failing: verify says it cannot reach the image.
    let proxy = FaultProxy::start(
        reg.addr(),
        vec![Fault::unavailable("GET", "/v2/app/blobs/*", u64::MAX)],
    );
    let out = run(bakedb(d).args([
        "verify",
        "--quiet",
        "--tls-verify=false",
        &format!("docker://{}/app:live", proxy.host()),
    ]));
    assert_failure(
        &out,
        8,
        &[&proxy.host(), "503 Service Unavailable", "6 times"],
        "verify against a failing registry",
    );
}

/// What `cmd` asked a registry's token server for: tokens by scope.
fn tokens_issued_by(
    reg: &Registry,
    cmd: &mut Command,
) -> (std::process::Output, Vec<(String, u64)>) {
    let before = reg.token_server().issued();
    let out = run(cmd);
    let during = reg
        .token_server()
        .issued()
        .into_iter()
        .map(|(scope, n)| {
            let earlier = before.get(&scope).copied().unwrap_or(0);
            (scope, n - earlier)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    (out, during)
}

#[test]
fn bearer_token_registry_push_pull_from_and_one_token_per_scope() {
    let Some(reg) = Registry::start(RegistryOptions {
        user: Some(("alice".into(), "s3cret".into())),
        token: true,
        ..RegistryOptions::default()
    }) else {
        return;
    };
    let dir = dir_with_db(20_000);
    let d = dir.path();
    let host = reg.host();
    let v1 = format!("docker://{host}/app:v1");
    let creds = ["--tls-verify=false", "--creds", "alice:s3cret"];

    // A wrong password is refused by the token endpoint: one line naming it and the user.
    let out = run(bakedb(d).args(build_quiet(&v1)).args([
        "--tls-verify=false",
        "--creds",
        "alice:wrong",
    ]));
    let realm = reg.token_server().realm();
    assert_failure(
        &out,
        OUTPUT,
        &[
            &realm,
            "401",
            "refused the credentials",
            "\"alice\"",
            "--creds",
        ],
        "wrong password for the token endpoint",
    );
    assert!(reg.token_server().refused() >= 1);
    // No credentials at all: the token endpoint refuses an anonymous client too.
    let out = run(bakedb(d).args(build_quiet(&v1)).arg("--tls-verify=false"));
    assert_failure(
        &out,
        OUTPUT,
        &["requires credentials", "--creds"],
        "no credentials for a token registry",
    );
    assert_eq!(
        bakedb_testkit::registry::blob_count(&reg.storage()),
        0,
        "nothing pushed by failed builds"
    );

    // Push: one token per scope for the whole command, however many requests it makes.
    let (out, tokens) = tokens_issued_by(
        &reg,
        bakedb(d)
            .args(util::sqlite_build("app.db", &v1))
            .arg("--json")
            .args(creds),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let first = build_json(&out);
    assert_eq!(pushed(&first), (5, 0, 0), "{first}");
    assert!(
        tokens.contains(&("repository:app:pull,push".to_owned(), 1)),
        "{tokens:?}"
    );
    assert!(
        tokens.iter().all(|(_, n)| *n == 1),
        "a scope's token fetched again: {tokens:?}"
    );

    // Pull: verify reads every blob with one pull token.
    let (out, tokens) = tokens_issued_by(&reg, bakedb(d).args(["verify"]).args(creds).arg(&v1));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(tokens, [("repository:app:pull".to_owned(), 1)]);

    // --from a token registry image: only the patch goes up; into another repository REF's
    // layers are mounted, with one token for both repositories.
    rusqlite::Connection::open(d.join("app.db"))
        .unwrap()
        .execute("UPDATE t SET v = 'changed' WHERE id = 4242", [])
        .unwrap();
    let v2 = build(
        d,
        &format!("docker://{host}/app:v2"),
        &[&["--from", &v1][..], &creds[..]].concat(),
    );
    assert_eq!(pushed(&v2), (3, 4, 0), "{v2}");
    let (out, tokens) = tokens_issued_by(
        &reg,
        bakedb(d)
            .args(util::sqlite_build(
                "app.db",
                &format!("docker://{host}/copy:v2"),
            ))
            .args(["--json", "--from", &v1])
            .args(creds),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let copied = build_json(&out);
    assert_eq!(copied["manifest_digest"], v2["manifest_digest"]);
    assert_eq!(pushed(&copied), (3, 0, 4), "{copied}");
    assert!(
        tokens.contains(&(
            "repository:app:pull repository:copy:pull,push".to_owned(),
            1
        )),
        "the mount's token: {tokens:?}"
    );
    assert!(tokens.iter().all(|(_, n)| *n == 1), "{tokens:?}");
    let verified = run_ok(
        bakedb(d)
            .args(["verify"])
            .args(creds)
            .arg(format!("docker://{host}/copy:v2")),
    );
    assert!(
        stderr(&verified).contains(v2["manifest_digest"].as_str().unwrap()),
        "{}",
        stderr(&verified)
    );
}

#[test]
fn client_certificate_registry() {
    let Some(reg) = Registry::start(RegistryOptions {
        tls: true,
        client_certs: true,
        ..RegistryOptions::default()
    }) else {
        return;
    };
    let dir = dir_with_db(200);
    let d = dir.path();
    let image = format!("docker://{}/app:v1", reg.host());
    let ca_only = reg.cert_dir();
    let with_pair = reg.client_cert_dir();

    // The CA alone: the registry refuses the handshake, and the message says what it wants.
    let out = run(bakedb(d)
        .args(build_quiet(&image))
        .arg("--cert-dir")
        .arg(&ca_only));
    assert_failure(
        &out,
        OUTPUT,
        &[&reg.host(), "client certificate", "--cert-dir"],
        "no client certificate",
    );
    // A pair another CA signed: the registry refuses it, and the message names the file.
    let Some(other) = Registry::start(RegistryOptions {
        tls: true,
        client_certs: true,
        ..RegistryOptions::default()
    }) else {
        return;
    };
    let foreign = d.join("foreign-certs");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::copy(ca_only.join("ca.crt"), foreign.join("ca.crt")).unwrap();
    for name in ["client.cert", "client.key"] {
        std::fs::copy(other.client_cert_dir().join(name), foreign.join(name)).unwrap();
    }
    let out = run(bakedb(d)
        .args(build_quiet(&image))
        .arg("--cert-dir")
        .arg(&foreign));
    assert_failure(
        &out,
        OUTPUT,
        &[
            "did not accept the client certificate",
            foreign.join("client.cert").to_str().unwrap(),
        ],
        "a client certificate of another CA",
    );
    assert_eq!(bakedb_testkit::registry::blob_count(&reg.storage()), 0);

    // client.cert and client.key beside the CA: push and pull.
    let pushed_out = build(d, &image, &["--cert-dir", with_pair.to_str().unwrap()]);
    assert_eq!(pushed(&pushed_out).0, 5, "{pushed_out}");
    let verified = run_ok(
        bakedb(d)
            .args(["verify", "--cert-dir"])
            .arg(&with_pair)
            .arg(&image),
    );
    assert!(
        stderr(&verified).contains(pushed_out["manifest_digest"].as_str().unwrap()),
        "{}",
        stderr(&verified)
    );
}

/// A `docker-credential-NAME` in `dir` speaking docker-credential-helpers' protocol: `get`
/// reads the server from stdin, appends it to `dir/asked`, and prints `user`/`password` for
/// `host` (or, without a password, says it has none and fails, as real helpers do).
fn fake_credential_helper(dir: &Path, name: &str, host: &str, user: &str, password: Option<&str>) {
    use std::os::unix::fs::PermissionsExt;
    let answer = match password {
        Some(p) => format!(
            r#"printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{p}"}}\n' "$server"; exit 0"#
        ),
        None => "echo 'credentials not found in native keychain'; exit 1".to_owned(),
    };
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || {{ echo \"unsupported: $1\"; exit 1; }}\nread -r server\necho \"$server\" >> '{}'\nif [ \"$server\" = '{host}' ]; then\n  {answer}\nfi\necho 'credentials not found in native keychain'\nexit 1\n",
        dir.join("asked").display()
    );
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credential_helpers_named_in_the_auth_file() {
    let Some(Alice {
        // Kept: the registry stops when it drops.
        reg: _reg,
        dir,
        host,
        image,
        certs,
    }) = Alice::start()
    else {
        return;
    };
    let d = dir.path();
    let helpers = d.join("helpers");
    std::fs::create_dir(&helpers).unwrap();
    fake_credential_helper(&helpers, "good", &host, "alice", Some("s3cret"));
    fake_credential_helper(&helpers, "stale", &host, "alice", Some("old"));
    fake_credential_helper(&helpers, "empty", &host, "alice", None);
    // On the PATH of bakedb alone.
    let path = format!(
        "{}:{}",
        helpers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::fs::create_dir(d.join(".docker")).unwrap();
    let use_helper = |name: &str| {
        std::fs::write(
            d.join(".docker/config.json"),
            serde_json::json!({"credHelpers": {&host: name}}).to_string(),
        )
        .unwrap();
    };
    let asked = || std::fs::read_to_string(helpers.join("asked")).unwrap_or_default();

    use_helper("good");
    let out = run_ok(
        bakedb(d)
            .env("PATH", &path)
            .args(util::sqlite_build("app.db", &image))
            .arg("--json")
            .arg("--cert-dir")
            .arg(&certs),
    );
    assert_eq!(pushed(&build_json(&out)).0, 5);
    // Asked once for the whole push, with the registry's HOST:PORT.
    assert_eq!(asked(), format!("{host}\n"));

    use_helper("stale");
    let out = run(bakedb(d)
        .env("PATH", &path)
        .args(build_quiet(&format!("docker://{host}/app:v2")))
        .arg("--cert-dir")
        .arg(&certs));
    assert_failure(
        &out,
        OUTPUT,
        &[
            "refused the credentials",
            "\"alice\"",
            "credential helper docker-credential-stale",
        ],
        "a helper with a stale password",
    );

    use_helper("empty");
    let out = run(bakedb(d)
        .env("PATH", &path)
        .args(build_quiet(&format!("docker://{host}/app:v2")))
        .arg("--cert-dir")
        .arg(&certs));
    assert_failure(
        &out,
        OUTPUT,
        &["docker-credential-empty", &host, "credentials not found"],
        "a helper without credentials",
    );

    use_helper("absent");
    let out = run(bakedb(d)
        .env("PATH", &path)
        .args(build_quiet(&format!("docker://{host}/app:v2")))
        .arg("--cert-dir")
        .arg(&certs));
    assert_failure(
        &out,
        OUTPUT,
        &[
            "docker-credential-absent is not on PATH",
            d.join(".docker/config.json").to_str().unwrap(),
        ],
        "a helper that is not installed",
    );
    // None of the failed builds wrote a tag.
    use_helper("good");
    let out = run(bakedb(d).env("PATH", &path).args([
        "inspect",
        "--quiet",
        "--cert-dir",
        certs.to_str().unwrap(),
        &format!("docker://{host}/app:v2"),
    ]));
    assert_failure(&out, 8, &["no image tagged \"v2\"", "v1"], "the tag v2");
}
