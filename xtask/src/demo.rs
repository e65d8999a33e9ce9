//! `cargo xtask demo`: the README's first command. Generates a small catalogue database,
//! bakes it into a FROM-scratch OCI layout with a release build of bakedb, and checks the
//! result with `bakedb verify` and, when installed, `skopeo inspect`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, project_root, run};

fn generate_catalogue(path: &Path, rows: i64) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let c =
        rusqlite::Connection::open(path).with_context(|| format!("creating {}", path.display()))?;
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE products(id INTEGER PRIMARY KEY, sku TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                               category TEXT NOT NULL, price_cents INTEGER NOT NULL);
         CREATE INDEX products_category ON products(category, price_cents);",
    )?;
    let tx = c.unchecked_transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO products(sku, name, category, price_cents) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let categories = [
            "books", "garden", "kitchen", "music", "outdoor", "tools", "toys",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..rows {
            // xorshift: deterministic, so the demo bakes the same bytes on every machine
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let category = categories[(x % categories.len() as u64) as usize];
            insert.execute(rusqlite::params![
                format!("SKU-{i:08}"),
                format!("{category} item {}", x % 100_000),
                category,
                (x % 50_000) as i64 + 99
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub fn run_demo() -> Result<()> {
    let root = project_root();
    let dir = root.join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("catalogue.db");
    generate_catalogue(&db, 200_000)?;
    println!("generated {} (200000 products)", db.display());
    run(cargo()
        .args(["build", "--release", "--quiet", "-p", "bakedb-cli"])
        .current_dir(&root))?;
    let bakedb = root.join("target/release/bakedb");
    let image = dir.join("image");
    let reference = format!("oci:{}:v1", image.display());
    run(Command::new(&bakedb)
        .args(["build", "--engine", "sqlite", "--source"])
        .arg(&db)
        .args(["--output", &reference]))?;
    run(Command::new(&bakedb).args(["verify", &reference]))?;
    run(Command::new(&bakedb).args(["inspect", &reference]))?;
    if Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        run(Command::new("skopeo").args(["inspect", &reference]))?;
    } else {
        println!(
            "skopeo is not installed (apt-get install skopeo) so `skopeo inspect {reference}` was not run"
        );
    }
    println!(
        "\nbaked {reference}: a FROM-scratch image that serves the catalogue read-only on port 8080.
run it:
  skopeo copy {reference} docker-archive:target/demo/catalogue.tar:catalogue:v1
  docker load -i target/demo/catalogue.tar
  docker run --rm -p 8080:8080 catalogue:v1
or: (cd target/demo && podman run --rm -p 8080:8080 oci:image:v1)
query it:
  curl -s localhost:8080/v1/schema
  curl -sG localhost:8080/v1/query --data-urlencode 'sql=SELECT category, count(*), avg(price_cents) FROM products GROUP BY category'"
    );
    Ok(())
}
