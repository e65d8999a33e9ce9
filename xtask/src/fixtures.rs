//! `cargo xtask fixtures`: generated test inputs, cached under target/fixtures, never committed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::{project_root, run};

/// A small busybox image as an OCI layout (tag `latest`), built with umoci from Debian's
/// busybox-static: the base for tests that run a command next to the baked data.
pub fn busybox() -> Result<PathBuf> {
    let root = project_root();
    let out = root.join("target/fixtures/busybox");
    run(Command::new("bash")
        .arg(root.join("xtask/scripts/busybox-base.sh"))
        .arg(&out))?;
    Ok(out)
}

/// A PostgreSQL base image as an OCI layout (tags `latest` and the major version), built
/// with umoci from this machine's Debian postgresql-N and postgresql-client-N packages: the
/// stand-in for the official `postgres` image, which the tests cannot pull.
pub fn postgres() -> Result<PathBuf> {
    let root = project_root();
    let out = root.join("target/fixtures/postgres");
    run(Command::new("bash")
        .arg(root.join("xtask/scripts/postgres-base.sh"))
        .arg(&out))?;
    Ok(out)
}

pub fn run_fixtures() -> Result<()> {
    let busybox = busybox()?;
    println!("busybox base: oci:{}:latest", busybox.display());
    let postgres = postgres()?;
    println!("postgres base: oci:{}:latest", postgres.display());
    Ok(())
}
