//! bakedb-serve: one SQLite database, read-only, over HTTP/JSON. The engine of bakedb's
//! FROM-scratch image: bakedb-init verifies the data, sets BAKEDB_DATABASE and execs this.
//!
//! Exit codes: 0 after a drain on SIGTERM/SIGINT, 1 when serving fails (e.g. the port is
//! taken), 2 for bad settings, 4 when the database cannot be opened.

mod api;
mod authorizer;
mod config;
mod db;
mod metrics;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match config::Config::load(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("bakedb-serve: {e}");
            return ExitCode::from(2);
        }
    };
    let mut dbs = Vec::with_capacity(config.pool_size);
    for _ in 0..config.pool_size {
        match db::Db::open(&config) {
            Ok(db) => dbs.push(db),
            Err(e) => {
                eprintln!("bakedb-serve: {e}");
                return ExitCode::from(4);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bakedb-serve")
        .max_blocking_threads(config.pool_size + 4)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bakedb-serve: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let app = api::App::new(config, dbs);
    match runtime.block_on(api::serve(app)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bakedb-serve: {e}");
            ExitCode::from(1)
        }
    }
}
