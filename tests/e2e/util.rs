//! Helpers of the end-to-end tests that drive the `bakedb` binary (ripgrep: tests/util.rs).
//! Everything else comes from bakedb-testkit, re-exported here so that a test names one
//! place.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use bakedb_testkit::containers::{DockerImage, docker, podman_in};
pub use bakedb_testkit::dirs::{test_dir, unique_name};
pub use bakedb_testkit::fixtures::{busybox_base, postgres_base};
pub use bakedb_testkit::process::{run, run_ok, stderr, stdout};
pub use bakedb_testkit::tools::{registry, require_root, tool};

pub fn bakedb_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bakedb"))
}

/// `bakedb` with a fixed SOURCE_DATE_EPOCH so digests are comparable, CI-style output.
pub fn bakedb(dir: &Path) -> Command {
    let mut cmd = Command::new(bakedb_bin());
    cmd.current_dir(dir)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("CI", "true");
    cmd
}

/// A SQLite database with `rows` rows in table `t(id, v)`, in WAL mode like a live app's.
pub fn make_db(path: &Path, rows: i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL);",
    )
    .unwrap();
    let tx = c.unchecked_transaction().unwrap();
    {
        let mut stmt = tx.prepare("INSERT INTO t(v) VALUES (?1)").unwrap();
        for i in 0..rows {
            stmt.execute([format!("row {i}")]).unwrap();
        }
    }
    tx.commit().unwrap();
}

/// A fresh test directory holding `app.db`, a `make_db` of `rows` rows.
pub fn dir_with_db(rows: i64) -> tempfile::TempDir {
    let dir = test_dir();
    make_db(&dir.path().join("app.db"), rows);
    dir
}

/// Like `make_db`, in rollback-journal mode (SQLite's default): a writer's commit, or a
/// `BEGIN EXCLUSIVE`, locks readers out, and a crash mid-transaction leaves a hot journal.
pub fn make_rollback_db(path: &Path, rows: i64) {
    make_db(path, rows);
    let c = rusqlite::Connection::open(path).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
}

/// Every file under `dir` with its bytes, symlink targets and modes: compare before and after.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return out;
    }
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(dir).unwrap().to_owned();
            let content = if meta.is_dir() {
                stack.push(path.clone());
                Vec::new()
            } else if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                std::fs::read(&path).unwrap()
            };
            out.insert(rel, (meta.permissions().mode(), content));
        }
    }
    out
}

/// `bakedb build`'s arguments for a SQLite source and an output; more flags go after them.
pub fn sqlite_build<'a>(source: &'a str, output: &'a str) -> [&'a str; 7] {
    [
        "build", "--engine", "sqlite", "--source", source, "--output", output,
    ]
}

/// `bakedb build --engine sqlite --source SOURCE --output OUTPUT --json EXTRA...` in `dir`,
/// which must succeed: what it printed.
pub fn build_sqlite(dir: &Path, source: &str, output: &str, extra: &[&str]) -> serde_json::Value {
    build_json(&run_ok(
        bakedb(dir)
            .args(sqlite_build(source, output))
            .arg("--json")
            .args(extra),
    ))
}

/// The user a bundle's config.json (umoci's, from the image's User) runs its process as.
pub fn assert_process_user(config: &serde_json::Value, uid: u32, gid: u32) {
    let user = &config["process"]["user"];
    assert_eq!(
        (&user["uid"], &user["gid"]),
        (&uid.into(), &gid.into()),
        "{}",
        config["process"]
    );
}

/// The manifest digest `bakedb build --json` reports.
pub fn build_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("build --json printed no JSON ({e}): {}", stdout(out)))
}

/// Lower-case hex sha256 of some bytes, as image.json records it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A SQLite database of `mib` MiB: one table of 1 MiB blobs, pseudo-random over a small
/// alphabet so the bytes differ everywhere (a chunk or gzip member mix-up changes the digest)
/// yet still compress, as real data does.
pub fn make_big_db(path: &Path, mib: usize) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("CREATE TABLE b(id INTEGER PRIMARY KEY, data BLOB NOT NULL);")
        .unwrap();
    let tx = c.unchecked_transaction().unwrap();
    {
        let mut stmt = tx.prepare("INSERT INTO b(data) VALUES (?1)").unwrap();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut blob = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for byte in blob.iter_mut() {
                // xorshift64
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = b'a' + (state >> 61) as u8;
            }
            stmt.execute([&blob]).unwrap();
        }
    }
    tx.commit().unwrap();
}

/// What differs between two `tree` snapshots ("added x", "removed y", "changed z"), so a
/// failed comparison names paths instead of printing every byte.
pub fn tree_diff(
    before: &BTreeMap<PathBuf, (u32, Vec<u8>)>,
    after: &BTreeMap<PathBuf, (u32, Vec<u8>)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, old) in before {
        match after.get(path) {
            None => out.push(format!("removed {}", path.display())),
            Some(new) if new.0 != old.0 => out.push(format!(
                "changed mode of {}: {:o} -> {:o}",
                path.display(),
                old.0,
                new.0
            )),
            Some(new) if new.1 != old.1 => out.push(format!("changed {}", path.display())),
            Some(_) => {}
        }
    }
    out.extend(
        after
            .keys()
            .filter(|p| !before.contains_key(*p))
            .map(|p| format!("added {}", p.display())),
    );
    out
}

/// Assert that `dir` still holds exactly `before` (a `tree` snapshot).
pub fn assert_tree_unchanged(dir: &Path, before: &BTreeMap<PathBuf, (u32, Vec<u8>)>, what: &str) {
    let diff = tree_diff(before, &tree(dir));
    assert!(
        diff.is_empty(),
        "{what}: {} changed:\n  {}",
        dir.display(),
        diff.join("\n  ")
    );
}

/// Copy a directory tree of regular files (an OCI layout) to a new place.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `bakedb` run as the unprivileged uid/gid 65534 through `setpriv`, with HOME and TMPDIR in
/// `scratch` (which must be writable by 65534), otherwise as `bakedb(dir)`.
pub fn bakedb_as_nobody(setpriv: &Path, dir: &Path, scratch: &Path) -> Command {
    bakedb_as(setpriv, (65534, 65534), dir, scratch)
}

/// `bakedb` run as `uid`/`gid` (no supplementary groups) through `setpriv`, with HOME and
/// TMPDIR in `scratch` (which must be writable by that user), otherwise as `bakedb(dir)`.
pub fn bakedb_as(setpriv: &Path, (uid, gid): (u32, u32), dir: &Path, scratch: &Path) -> Command {
    let mut cmd = Command::new(setpriv);
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--clear-groups", "--"])
        .arg(bakedb_bin())
        .current_dir(dir)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("CI", "true")
        .env("HOME", scratch)
        .env("TMPDIR", scratch);
    cmd
}

/// Make the image `tag` of the layout `layout` look like any other base image: a config
/// without bakedb's marks (the io.bakedb.* labels, BAKEDB_DATA_DIGEST, the /bakedb/init
/// ENTRYPOINT, "bakedb" history comments), stored under its own digest, with the manifest and the tag rewritten to match,
/// as a tool that edited the image would leave it. bakedb refuses its own images as --base;
/// tests that need a small base to damage make one from a bakedb image with this.
pub fn unbake(layout: &Path, tag: &str) {
    use serde_json::Value;
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let read =
        |path: &Path| -> Value { serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap() };
    let put = |value: &Value| -> (String, usize) {
        let bytes = serde_json::to_vec(value).unwrap();
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        std::fs::write(blob(&digest), &bytes).unwrap();
        (digest, bytes.len())
    };
    let mut index = read(&layout.join("index.json"));
    let entry = index["manifests"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()));
    let mut manifest = read(&blob(entry["digest"].as_str().unwrap()));
    let mut config = read(&blob(manifest["config"]["digest"].as_str().unwrap()));
    let runtime = config["config"].as_object_mut().unwrap();
    runtime.remove("Entrypoint");
    if let Some(Value::Array(env)) = runtime.get_mut("Env") {
        env.retain(|v| !v.as_str().unwrap_or("").starts_with("BAKEDB_"));
    }
    if let Some(Value::Object(labels)) = runtime.get_mut("Labels") {
        labels.retain(|k, _| !k.starts_with("io.bakedb."));
    }
    for entry in config["history"].as_array_mut().into_iter().flatten() {
        entry.as_object_mut().unwrap().remove("comment");
    }
    let (config_digest, config_size) = put(&config);
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    let (manifest_digest, manifest_size) = put(&manifest);
    entry["digest"] = manifest_digest.into();
    entry["size"] = manifest_size.into();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

/// Cap the data memory (heap, anonymous mappings, thread stacks: RLIMIT_DATA) of the process
/// `cmd` starts, and keep it on at most two CPUs, so the number of compression workers (and
/// their buffers) does not depend on the machine. An allocation beyond the cap aborts it.
pub fn with_data_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls on values owned by the
    // closure: getrlimit-free setrlimit, sched_getaffinity/sched_setaffinity on the child.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                let mut kept = 0;
                for cpu in 0..libc::CPU_SETSIZE as usize {
                    if libc::CPU_ISSET(cpu, &set) {
                        if kept == 2 {
                            libc::CPU_CLR(cpu, &mut set);
                        } else {
                            kept += 1;
                        }
                    }
                }
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        })
    }
}
