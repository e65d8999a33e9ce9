//! End-to-end tests: the real `bakedb` binary, run in a fresh directory per test, judged by
//! the real consumers (skopeo, umoci, runc, podman, docker, a local registry). A missing tool
//! skips a test locally and fails it under CI (CI=true).

mod consumers;
mod crash;
mod delta;
mod errors;
mod golden;
// The same tiny HTTP client as bakedb-serve's own tests: one copy, included by path.
#[path = "../../crates/serve/tests/http/mod.rs"]
mod http;
mod init;
mod limits;
mod pg;
mod pg_sources;
mod postgres;
mod reproducible;
mod serve;
mod snapshot;
mod util;
