//! `cargo xtask`: the project's automation, in Rust instead of a Makefile (rust-analyzer's
//! xtask). Each subcommand is one function in its own module; this file only dispatches.

mod bench;
mod bench_build;
mod bench_delta;
mod bench_freshness;
mod bench_init;
mod bench_mariadb;
mod bench_postgres;
mod bench_sqlite;
mod ci;
mod demo;
mod fixtures;
mod fuzz;
mod static_init;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  bench build [--size-mib N] [--runs N] [--require-all]
                 time `bakedb build` against sha256/pigz/zstd ceilings and docker/umoci peers,
                 print the table and write it to docs/benchmarks.md
  bench init [--sizes-mib N,N] [--runs N] [--overhead-runs N]
                 time bakedb-init's data verification (cold and warm page cache) against
                 sha256sum, openssl and a plain read, and its start-up overhead with
                 verification off; print the table and write it to docs/benchmarks.md
  bench sqlite [--size-mib N] [--duration-s N] [--connections N] [--rounds N] [--runs N]
                 bakedb-serve against `datasette serve -i` under wrk (point lookups, range
                 scans, an aggregate), its read-only tuning against a default open, mmap and
                 cache sizes, image build time and size, and `docker run` to the first answer
                 with and without verification; print the table and write it to docs/benchmarks.md
  bench postgres [--size-mib N] [--runs N] [--duration-s N] [--clients N]
                 a baked PostgreSQL image (pgbench data) against a restore at start: `docker run`
                 to the first answered query, cold and warm; pgbench -S TPS against a default
                 server on a volume; bytes copied up into the container's writable layer; print
                 the table and write it to docs/benchmarks.md
  bench delta [--engines sqlite,postgres] [--size-mib N] [--generations N] [--runs N]
              [--rounds N] [--duration-s N] [--connections N] [--pg-size-mib N]
              [--pg-generations N]
                 re-bakes (`bakedb build --from`) of a live SQLite master after 1 % updates
                 (random ids, one id range): time, patch layer and registry bytes against the
                 changed pages alone and a full re-bake; bakedb-serve on 0/1/8 patch generations
                 against the plain file; the full build against pigz -1. PostgreSQL: the same
                 for a pgbench database after 1 % of its accounts changed, and `docker run` to
                 the first answer with the patches composed by bakedb-init against a full
                 build. Each engine's part is written to docs/benchmarks.md on its own
  bench freshness [--engines sqlite,postgres] [--size-mib N] [--generations N]
              [--pg-size-mib N] [--pg-generations N] [--peer-generations N] [--smoke]
                 `bakedb watch` pushing to a local registry while a SQLite master commits 1 %
                 updates (random ids, one id range), and a pgbench master 1 % of its accounts
                 (each generation's kind, patch or fresh base, reported; pg_basebackup in the
                 peer); each engine's part written to docs/benchmarks.md on its own, --smoke:
                 small sizes, nothing written. Each: commit to digest pullable and to a fresh
                 docker replica answering, p50/p99; bytes pushed against the changed pages;
                 watch's peak RSS; docker build + push of the same change as the peer
  bench mariadb [--size-mib N] [--duration-s N] [--threads N] [--runs N]
                 a baked MariaDB image (sysbench data) against a restore at start and a volume,
                 untuned and with each read-only setting alone: `docker run` to the first answer
                 (baked and restore: --runs starts each, warm and cold, medians),
                 sysbench oltp_point_select and oltp_read_only TPS, bytes in the writable layer,
                 build time and size against docker build; write it to docs/benchmarks.md
  ci             fmt, clippy, cargo deny, fixtures, cargo test, fuzz (15 s a target): what
                 .ci/run runs
  fuzz [--seconds N] [TARGET...]
                 run the fuzz targets of fuzz/ (nightly, cargo-fuzz) for N s each [60]
  fixtures       build the generated test inputs under target/fixtures
  static-init    build the static bakedb-init that `bakedb build` embeds and print its path
  demo           bake a generated SQLite database into oci:target/demo/image:v1 and verify it";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(err) = dispatch(&args) {
        eprintln!("xtask: {err:#}");
        std::process::exit(2);
    }
}

fn dispatch(args: &[String]) -> Result<()> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["bench", "build", flags @ ..] => {
            bench_build::build(&bench_build::BuildOptions::parse(flags)?)
        }
        ["bench", "init", flags @ ..] => bench_init::init(&bench_init::InitOptions::parse(flags)?),
        ["bench", "sqlite", flags @ ..] => {
            bench_sqlite::sqlite(&bench_sqlite::SqliteOptions::parse(flags)?)
        }
        ["bench", "postgres", flags @ ..] => {
            bench_postgres::postgres(&bench_postgres::PostgresOptions::parse(flags)?)
        }
        ["bench", "freshness", flags @ ..] => {
            bench_freshness::freshness(&bench_freshness::FreshnessOptions::parse(flags)?)
        }
        ["bench", "delta", flags @ ..] => {
            bench_delta::delta(&bench_delta::DeltaOptions::parse(flags)?)
        }
        ["bench", "mariadb", flags @ ..] => {
            bench_mariadb::mariadb(&bench_mariadb::MariadbOptions::parse(flags)?)
        }
        ["bench", ..] => {
            bail!(
                "bench: expected `bench build`, `bench init`, `bench sqlite`, `bench postgres`, `bench delta`, `bench freshness` or `bench mariadb`\n\n{USAGE}"
            )
        }
        ["ci"] => ci::run_ci(),
        ["fuzz", flags @ ..] => fuzz::fuzz(&fuzz::FuzzOptions::parse(flags)?),
        ["fixtures"] => fixtures::run_fixtures(),
        ["demo"] => demo::run_demo(),
        ["static-init"] => static_init::run_static_init(),
        ["help" | "-h" | "--help"] => {
            println!("{USAGE}");
            Ok(())
        }
        [] => bail!("no command given\n\n{USAGE}"),
        [other, ..] => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

/// The workspace root, from this crate's manifest directory (xtask/ is one level down).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// `cargo`, the one that runs this xtask.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Run a command with inherited output; fail with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("could not start {cmd:?}: {e}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
