//! Places and names a test or bench owns alone.

use std::fs;
use std::path::{Path, PathBuf};

/// A fresh directory per test, removed when dropped.
pub fn test_dir() -> tempfile::TempDir {
    test_dir_for("e2e")
}

/// A fresh directory named after `what` (`bakedb-WHAT.XXXXXX`), removed when dropped.
pub fn test_dir_for(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("bakedb-{what}."))
        .tempdir()
        .unwrap()
}

/// The workspace root (crates/testkit/../..), where xtask/ and target/ live.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A name nothing else on this machine uses: lower-case, so docker, podman and registries
/// accept it; unique per process and call, since tests run in parallel threads and processes.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every regular file under `dir` (links not followed) with its size, in no particular order;
/// what cannot be read is left out.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out
}
