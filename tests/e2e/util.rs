//! Shared helpers for the end-to-end tests (ripgrep: tests/util.rs).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bakedb_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bakedb"))
}

/// `bakedb` with a fixed SOURCE_DATE_EPOCH so digests are comparable, CI-style output.
pub fn bakedb(dir: &Path) -> Command {
    let mut cmd = Command::new(bakedb_bin());
    cmd.current_dir(dir).env("SOURCE_DATE_EPOCH", "1700000000").env("CI", "true");
    cmd
}

pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The path of a tool, or None (test skipped) locally; a missing tool fails under CI.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(!under_ci(), "{name} is not installed, and CI=true: .ci/run must install it");
        eprintln!("skipping: {name} is not installed");
    }
    found
}

/// Return early from a test when a tool is missing (only possible outside CI).
#[macro_export]
macro_rules! require {
    ($name:expr) => {
        match $crate::util::tool($name) {
            Some(p) => p,
            None => return,
        }
    };
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    out
}

/// Run and require success; the panic message carries both output streams.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A SQLite database with `rows` rows in table `t(id, v)`, in WAL mode like a live app's.
pub fn make_db(path: &Path, rows: i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL);").unwrap();
    let tx = c.unchecked_transaction().unwrap();
    {
        let mut stmt = tx.prepare("INSERT INTO t(v) VALUES (?1)").unwrap();
        for i in 0..rows {
            stmt.execute([format!("row {i}")]).unwrap();
        }
    }
    tx.commit().unwrap();
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
                std::fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes()
            } else {
                std::fs::read(&path).unwrap()
            };
            out.insert(rel, (meta.permissions().mode(), content));
        }
    }
    out
}

/// A fresh directory per test, removed at the end.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("bakedb-e2e.").tempdir().unwrap()
}

/// The manifest digest `bakedb build --json` reports.
pub fn build_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("build --json printed no JSON ({e}): {}", stdout(out)))
}
