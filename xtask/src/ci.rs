//! `cargo xtask ci`: everything CI checks, in the order that fails fastest.

use anyhow::Result;

use crate::{cargo, project_root, run};

pub fn run_ci() -> Result<()> {
    let root = project_root();
    run(cargo()
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&root))?;
    run(cargo()
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&root))?;
    run(cargo()
        .args(["deny", "check", "licenses", "bans", "sources"])
        .current_dir(&root))?;
    crate::fixtures::busybox()?;
    crate::fixtures::postgres()?;
    run(cargo().args(["test", "--workspace"]).current_dir(&root))?;
    // Every parser of untrusted bytes, from the committed seeds, for a bounded time.
    crate::fuzz::fuzz(&crate::fuzz::FuzzOptions {
        seconds: 15,
        targets: crate::fuzz::TARGETS.iter().map(|t| t.to_string()).collect(),
    })?;
    Ok(())
}
