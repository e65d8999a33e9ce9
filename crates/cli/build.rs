//! Builds bakedb-init as a static executable and hands its path to the compiler, so that
//! `bakedb build` can put the same init into every image with no extra flags or files.
//!
//! Cargo cannot yet depend on a binary built for another configuration (artifact
//! dependencies are unstable), so this runs a nested `cargo build` of crates/init with
//! `+crt-static` and the `release-small` profile into its own target directory. Set
//! BAKEDB_INIT_BINARY to the path of a prebuilt static bakedb-init to skip that.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/cli sits two levels below the workspace")
        .to_owned();
    for path in [
        "crates/init/src",
        "crates/init/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=BAKEDB_INIT_BINARY");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    let embedded = out_dir.join("bakedb-init");

    let built = match env::var_os("BAKEDB_INIT_BINARY") {
        Some(prebuilt) => PathBuf::from(prebuilt),
        None => build_static_init(&workspace),
    };
    let bytes =
        std::fs::read(&built).unwrap_or_else(|e| panic!("reading {}: {e}", built.display()));
    if let Err(why) = check_static(&bytes) {
        panic!(
            "{} is not a static executable ({why}); bakedb-init must run in an empty rootfs",
            built.display()
        );
    }
    std::fs::write(&embedded, &bytes)
        .unwrap_or_else(|e| panic!("writing {}: {e}", embedded.display()));
    println!("cargo:rustc-env=BAKEDB_INIT_PATH={}", embedded.display());
}

fn build_static_init(workspace: &Path) -> PathBuf {
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("static-init");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cargo_home = env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    // Paths of this checkout and of the registry end up in panic locations; mapping them to
    // fixed names keeps the init layer identical across checkouts and machines.
    let rustflags = [
        "-C".to_string(),
        "target-feature=+crt-static".into(),
        format!("--remap-path-prefix={}=/bakedb", workspace.display()),
        format!("--remap-path-prefix={cargo_home}=/cargo"),
    ]
    .join("\x1f");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--locked",
            "--profile",
            "release-small",
            "-p",
            "bakedb-init",
        ])
        .arg("--target")
        .arg(&target)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // What the outer build sets for itself must not leak into the nested one (a clippy
    // wrapper, the outer profile's flags, its target directory).
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build the static bakedb-init: {e}"));
    if !output.status.success() {
        panic!(
            "building the static bakedb-init failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    target_dir
        .join(&target)
        .join("release-small")
        .join("bakedb-init")
}

/// A static executable has no PT_INTERP program header (no dynamic loader to find).
fn check_static(elf: &[u8]) -> Result<(), String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = elf
            .get(at..at + 4)
            .ok_or("program headers run past the end of the file")?;
        if u32::from_le_bytes(p_type.try_into().expect("4 bytes")) == 3 {
            return Err("it asks for a dynamic loader (PT_INTERP)".into());
        }
    }
    Ok(())
}
