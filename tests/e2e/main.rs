//! End-to-end tests: the real `bakedb` binary, run in a fresh directory per test, judged by
//! the real consumers (skopeo, umoci, runc, podman, docker, a local registry). A missing tool
//! skips a test locally and fails it under CI (CI=true). The harnesses (PostgreSQL servers,
//! container guards, the HTTP client, tool discovery, fixtures) are bakedb-testkit's.

// `crate::http`, `crate::pg` and `crate::require` in the test modules.
use bakedb_testkit::{http, pg, require};

mod consumers;
mod crash;
mod delta;
mod errors;
mod golden;
mod init;
mod kubernetes;
mod limits;
mod mariadb;
mod pg_sources;
mod postgres;
mod registry;
mod reproducible;
mod serve;
mod snapshot;
mod util;
mod watch;
