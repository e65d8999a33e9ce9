//! `cargo xtask static-init`: the static bakedb-init (and bakedb-serve) that `bakedb build`
//! embeds.
//!
//! crates/cli/build.rs owns the one recipe (a nested `cargo build` with `+crt-static` and
//! path remapping); building the cli runs it, and this returns where it put the binary.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::{cargo, project_root, run};

pub fn build() -> Result<PathBuf> {
    let root = project_root();
    run(cargo()
        .current_dir(&root)
        .args(["build", "-q", "-p", "bakedb-cli"]))?;
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let path = root
        .join("target/static-init")
        .join(triple)
        .join("release-small/bakedb-init");
    if !path.is_file() {
        bail!(
            "{} was not built; is BAKEDB_INIT_BINARY set?",
            path.display()
        );
    }
    Ok(path)
}

pub fn run_static_init() -> Result<()> {
    let path = build()?;
    let serve = path
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("release-serve/bakedb-serve"))
        .expect("target/static-init/<triple>/release-small/bakedb-init");
    for p in [&path, &serve] {
        let size = std::fs::metadata(p)?.len();
        println!("{} ({size} bytes)", p.display());
    }
    Ok(())
}
