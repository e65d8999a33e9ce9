//! Builds bakedb-init and bakedb-serve as static executables and hands their paths to the
//! compiler, so that `bakedb build` can put the same binaries into every image with no extra
//! flags or files.
//!
//! Cargo cannot yet depend on a binary built for another configuration (artifact
//! dependencies are unstable), so this runs a nested `cargo build` with `+crt-static` into
//! its own target directory: init with the `release-small` profile (size), serve with
//! `release-serve` (speed, unwinding). Set BAKEDB_INIT_BINARY / BAKEDB_SERVE_BINARY to the
//! path of a prebuilt static binary to skip that.
//!
//! The lazy copy-up preload library for PostgreSQL images (crates/copyup-shim) is built the
//! same way but dynamically linked (it is loaded into the base image's postgres, against its
//! glibc), into a target directory of its own; BAKEDB_COPYUP_SHIM_LIBRARY skips that.

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
        "crates/serve/src",
        "crates/serve/Cargo.toml",
        "crates/copyup-shim/src",
        "crates/copyup-shim/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    for (package, profile, override_var, path_var) in [
        (
            "bakedb-init",
            "release-small",
            "BAKEDB_INIT_BINARY",
            "BAKEDB_INIT_PATH",
        ),
        (
            "bakedb-serve",
            "release-serve",
            "BAKEDB_SERVE_BINARY",
            "BAKEDB_SERVE_PATH",
        ),
    ] {
        println!("cargo:rerun-if-env-changed={override_var}");
        let built = match env::var_os(override_var) {
            Some(prebuilt) => PathBuf::from(prebuilt),
            None => nested_build(&workspace, package, profile, "static-init", true),
        };
        let bytes =
            std::fs::read(&built).unwrap_or_else(|e| panic!("reading {}: {e}", built.display()));
        if let Err(why) = check_static(&bytes) {
            panic!(
                "{} is not a static executable ({why}); {package} must run in an empty rootfs",
                built.display()
            );
        }
        let embedded = out_dir.join(package);
        std::fs::write(&embedded, &bytes)
            .unwrap_or_else(|e| panic!("writing {}: {e}", embedded.display()));
        println!("cargo:rustc-env={path_var}={}", embedded.display());
    }
    println!("cargo:rerun-if-env-changed=BAKEDB_COPYUP_SHIM_LIBRARY");
    let shim = match env::var_os("BAKEDB_COPYUP_SHIM_LIBRARY") {
        Some(prebuilt) => PathBuf::from(prebuilt),
        None => nested_build(
            &workspace,
            "bakedb-copyup-shim",
            "release-small",
            "copyup-shim",
            false,
        )
        .with_file_name("libbakedb_copyup_shim.so"),
    };
    let bytes = std::fs::read(&shim).unwrap_or_else(|e| panic!("reading {}: {e}", shim.display()));
    let embedded = out_dir.join("libbakedb_copyup_shim.so");
    std::fs::write(&embedded, &bytes)
        .unwrap_or_else(|e| panic!("writing {}: {e}", embedded.display()));
    println!(
        "cargo:rustc-env=BAKEDB_COPYUP_SHIM_PATH={}",
        embedded.display()
    );
}

/// `cargo build -p PACKAGE --profile PROFILE` into target/DIR, statically linked or not;
/// returns the path of the package's binary (a library's is next to it).
fn nested_build(
    workspace: &Path,
    package: &str,
    profile: &str,
    dir: &str,
    static_crt: bool,
) -> PathBuf {
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join(dir);
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cargo_home = env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    // Paths of this checkout and of the registry end up in panic locations; mapping them to
    // fixed names keeps the init and serve layers identical across checkouts and machines.
    let mut rustflags = Vec::new();
    if static_crt {
        rustflags.extend(["-C".to_string(), "target-feature=+crt-static".into()]);
    }
    rustflags.extend([
        format!("--remap-path-prefix={}=/bakedb", workspace.display()),
        format!("--remap-path-prefix={cargo_home}=/cargo"),
    ]);
    let rustflags = rustflags.join("\x1f");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--locked", "--profile", profile, "-p", package])
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
        .unwrap_or_else(|e| panic!("running cargo to build {package}: {e}"));
    if !output.status.success() {
        panic!(
            "building {package} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    target_dir.join(&target).join(profile).join(package)
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
