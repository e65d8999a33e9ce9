//! bakedb-serve as a library: the binary (main.rs) and the fuzz target of its request
//! handling (fuzz/fuzz_targets/serve_request.rs) share it. Nothing else links it.

pub mod api;
pub mod authorizer;
pub mod config;
pub mod db;
pub mod encode;
pub mod metrics;
pub mod patch;
pub mod server;
pub mod vfs;
