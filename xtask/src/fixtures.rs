//! `cargo xtask fixtures`: generated test inputs, cached under target/fixtures, never committed.
//! bakedb-testkit builds them (the tests build them on first use the same way).

use std::path::PathBuf;

use anyhow::Result;
use bakedb_testkit::fixtures::base_image;

/// A small busybox image as an OCI layout (tag `latest`), built with umoci from Debian's
/// busybox-static: the base for tests that run a command next to the baked data.
pub fn busybox() -> Result<PathBuf> {
    Ok(base_image("busybox", true)?)
}

/// A PostgreSQL base image as an OCI layout (tags `latest` and the major version), built
/// with umoci from this machine's Debian postgresql-N and postgresql-client-N packages: the
/// stand-in for the official `postgres` image, which the tests cannot pull.
pub fn postgres() -> Result<PathBuf> {
    Ok(base_image("postgres", true)?)
}

/// A MariaDB base image as an OCI layout (tags `latest` and the release series), built with
/// umoci from this machine's Debian mariadb-server and mariadb-client packages: the stand-in
/// for the official `mariadb` image.
pub fn mariadb() -> Result<PathBuf> {
    Ok(base_image("mariadb", true)?)
}

pub fn run_fixtures() -> Result<()> {
    let busybox = busybox()?;
    println!("busybox base: oci:{}:latest", busybox.display());
    let postgres = postgres()?;
    println!("postgres base: oci:{}:latest", postgres.display());
    let mariadb = mariadb()?;
    println!("mariadb base: oci:{}:latest", mariadb.display());
    Ok(())
}
