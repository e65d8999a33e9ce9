//! Where the tools are, and what it means when one is missing: a test is skipped locally and
//! fails under CI=true, where .ci/run must have installed or started it (ripgrep:
//! tests/util.rs `cmd_exists`).

use std::path::PathBuf;

/// Whether this runs under CI (CI=true or CI=1): then nothing may be skipped.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A test cannot run here because of `reason`: under CI that fails it (`ci_fix` says what CI
/// must provide), locally it is skipped, and says so.
pub fn skip(reason: &str, ci_fix: &str) {
    assert!(!under_ci(), "{reason}, and CI=true: {ci_fix}");
    eprintln!("skipping: {reason}");
}

/// The path of a tool on PATH, or None (the test is skipped) locally; a missing tool fails
/// under CI.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        skip(
            &format!("{name} is not installed"),
            ".ci/run must install it",
        );
    }
    found
}

/// Return early from a test when a tool is missing (only possible outside CI); else its path.
#[macro_export]
macro_rules! require {
    ($name:expr) => {
        match $crate::tools::tool($name) {
            Some(p) => p,
            None => return,
        }
    };
}

/// This process's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    effective_uid() == 0
}

/// Whether this process runs as root (real ownership in unpacked layers, runc without
/// rootless mode, mounts). Not root skips locally and fails under CI, which runs as root by
/// contract.
pub fn require_root() -> bool {
    let root = is_root();
    if !root {
        skip("not running as root", ".ci/run runs as root");
    }
    root
}

/// The test registry's HOST:PORT from BAKEDB_TEST_REGISTRY (.ci/run starts one). Unset skips
/// locally and fails under CI.
pub fn registry() -> Option<String> {
    match std::env::var("BAKEDB_TEST_REGISTRY") {
        Ok(r) if !r.is_empty() => Some(r),
        _ => {
            skip(
                "BAKEDB_TEST_REGISTRY is not set",
                ".ci/run must start a registry",
            );
            None
        }
    }
}
