//! bakedb's one kit for tests and benches (as cargo's cargo-test-support is cargo's): every
//! harness is written here once and used by tests/e2e, the crates' own tests and `cargo xtask
//! bench` alike, so a test or a bench reads as its scenario.
//!
//! - [`tools`]: where a tool is, and what a missing one means (a skip locally, a failure
//!   under CI=true); [`require!`](crate::require) returns early from a test without it.
//! - [`process`]: running programs, stopping children.
//! - [`dirs`], [`ports`]: fresh test directories, unique names, free ports.
//! - [`http`]: a minimal HTTP/1.1 client; [`serve`]: bakedb-serve's API through it.
//! - [`containers`]: docker, podman and runc containers and images, removed when dropped;
//!   [`kube`]: `podman kube play` of a Kubernetes manifest.
//! - [`netns`]: network namespaces, a test's own or a container's, entered from the host;
//!   [`confinement`]: a process's user, capabilities, seccomp and mounts as the kernel sees
//!   them.
//! - [`fixtures`]: the base image fixtures built by xtask/scripts, and SQLite databases.
//! - [`pg`]: real PostgreSQL servers (primaries, standbys, restarts) and a write load.
//! - [`mariadb`]: real MariaDB servers (binlog on, a seed with every kind of object) and a
//!   write load.
//! - [`registry`]: docker-registry instances of a test's own (htpasswd or bearer tokens from
//!   [`token`]'s server, TLS with the kit's CA, client certificates), images pushed to the
//!   shared one; [`proxy`]: a TCP proxy that cuts connections mid-request, and an HTTP one
//!   that answers 429 and 503.
//!
//! Functions meant for tests panic with a message that says what failed; the ones a bench
//! needs as well return [`Error`].

pub mod confinement;
pub mod containers;
pub mod dirs;
mod error;
pub mod fixtures;
pub mod http;
pub mod kube;
pub mod mariadb;
pub mod netns;
pub mod pg;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod serve;
pub mod token;
pub mod tools;

pub use error::Error;
