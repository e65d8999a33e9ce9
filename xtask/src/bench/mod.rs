//! The harness every `cargo xtask bench <thing>` shares, so that each `bench_<thing>.rs`
//! holds only its scenario and its table: flags ([`flags`]), the programs measured and how
//! they are found and run ([`tools`]), timing under GNU time with the machine kept quiet,
//! cache states, rounds and statistics ([`timing`]), the generated event-log database
//! ([`data`]) and the section each bench writes into docs/benchmarks.md ([`report`]).
//! Servers, containers, ports and HTTP come from bakedb-testkit, as for the tests.

pub mod data;
pub mod flags;
pub mod layers;
pub mod pg;
pub mod report;
pub mod steps;
pub mod timing;
pub mod tools;

/// bakedb builds are reproducible under SOURCE_DATE_EPOCH; the peers have no such knob.
pub const SOURCE_DATE_EPOCH: &str = "1700000000";

pub use report::{fmt, fmt_pct, fmt_range, mb, times, yes_no};
pub use timing::{Cache, Sample, Timer, median, range, ratio};
pub use tools::run_quiet;
