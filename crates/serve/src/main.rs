//! bakedb-serve: one SQLite database, read-only, over HTTP/JSON. The engine of bakedb's
//! FROM-scratch image: bakedb-init verifies the data, sets BAKEDB_DATABASE and execs this.
//!
//! Exit codes: 0 after a drain on SIGTERM/SIGINT, 1 when serving fails (e.g. the port is
//! taken), 2 for bad settings, 4 when the database cannot be opened (a missing or damaged
//! patch of BAKEDB_SQLITE_PATCHES included).

use bakedb_serve::{api, config, db, server};

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fd_limit = config::raise_fd_limit();
    let config = match config::Config::load(&args, &|name| std::env::var(name).ok(), fd_limit) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("bakedb-serve: {e}");
            return ExitCode::from(2);
        }
    };
    db::limit_heap(config.sqlite_heap_bytes);
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
    let result = runtime.block_on(server::serve(app));
    // Dropping the runtime would wait for every blocking thread: a statement interrupted at
    // the end of the drain may still be inside one long SQLite call, and the drain limit is
    // the exit time.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bakedb-serve: {e}");
            ExitCode::from(1)
        }
    }
}
