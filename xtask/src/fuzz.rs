//! `cargo xtask fuzz`: every fuzz target of fuzz/ (cargo-fuzz, libFuzzer, nightly) for a
//! bounded time each, starting from the seeds in fuzz/corpus/<target>. New inputs the fuzzer
//! finds go to target/fuzz-corpus/<target>, so a run never changes the committed corpus;
//! a crash leaves its input in fuzz/artifacts/<target>/ and fails the run.
//!
//! The targets need the nightly toolchain and cargo-fuzz. Without them the command fails
//! under CI (CI=true) and skips with a message elsewhere.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{project_root, run};

/// Every target in fuzz/Cargo.toml.
pub const TARGETS: [&str; 8] = [
    "oci_index",
    "oci_manifest",
    "oci_config",
    "layer_stream",
    "archive",
    "reference",
    "init_image_json",
    "serve_request",
];

pub struct FuzzOptions {
    pub seconds: u64,
    pub targets: Vec<String>,
}

impl FuzzOptions {
    pub fn parse(flags: &[&str]) -> Result<FuzzOptions> {
        let mut options = FuzzOptions {
            seconds: 60,
            targets: Vec::new(),
        };
        let mut it = flags.iter();
        while let Some(flag) = it.next() {
            match *flag {
                "--seconds" => {
                    let v = it
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--seconds needs a value"))?;
                    options.seconds = v.parse()?;
                }
                t if TARGETS.contains(&t) => options.targets.push(t.to_owned()),
                other => bail!(
                    "fuzz: unknown argument {other:?}; targets: {}",
                    TARGETS.join(", ")
                ),
            }
        }
        if options.targets.is_empty() {
            options.targets = TARGETS.iter().map(|t| t.to_string()).collect();
        }
        Ok(options)
    }
}

/// `rustup run nightly cargo …`: the CARGO that runs xtask is the stable toolchain's own
/// binary, which knows no `+nightly`.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    cmd
}

/// Whether nightly and cargo-fuzz are there; None means skip (outside CI).
fn available() -> Result<bool> {
    let ok = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(true);
    }
    let why = "the fuzz targets need the nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz (`cargo install cargo-fuzz --locked`)";
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        bail!("{why}; CI=true: .ci/run installs cargo-fuzz");
    }
    eprintln!("xtask fuzz: skipping: {why}");
    Ok(false)
}

pub fn fuzz(options: &FuzzOptions) -> Result<()> {
    if !available()? {
        return Ok(());
    }
    let root = project_root();
    let fuzz_dir = root.join("fuzz");
    // One build of every target, then the runs. No address sanitizer: the targets are safe
    // Rust over C libraries (zstd, libdeflate, SQLite) that their own projects fuzz, and
    // instrumenting that whole tree with ASan made the CI build four times longer; libFuzzer
    // still finds panics, aborts, hangs and unbounded memory.
    run(nightly_cargo()
        .args(["fuzz", "build", "--release", "--sanitizer", "none"])
        .current_dir(&fuzz_dir))?;
    for target in &options.targets {
        let scratch = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        eprintln!("xtask fuzz: {target} for {} s", options.seconds);
        run(nightly_cargo()
            .args(["fuzz", "run", "--release", "--sanitizer", "none", target])
            .arg(&scratch)
            .arg(fuzz_dir.join("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", options.seconds))
            // A single input that takes 10 s or 2 GiB is a finding, not a slow machine.
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .current_dir(&fuzz_dir))?;
    }
    Ok(())
}
