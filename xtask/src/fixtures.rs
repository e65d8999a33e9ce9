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

pub fn run_fixtures() -> Result<()> {
    let busybox = busybox()?;
    println!("busybox base: oci:{}:latest", busybox.display());
    Ok(())
}
