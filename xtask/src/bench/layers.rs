//! The OCI layouts a bench builds: a tag's layers and their blobs, a layer unpacked, a tag
//! pushed to a local registry and what the registry stored for it; and the size `pigz -1`
//! gives a file, against which bakedb's gzip layers are judged.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use bakedb_testkit::registry::Registry;

use super::run_quiet;
use super::tools::json_str;

/// Where `layout` keeps the blob `digest` (`sha256:…`).
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The digests of the layers of `oci:LAYOUT:TAG`, bottom first.
pub fn tag_layers(layout: &Path, tag: &str) -> Result<Vec<String>> {
    let index = std::fs::read_to_string(layout.join("index.json"))
        .with_context(|| format!("reading {}/index.json", layout.display()))?;
    let manifest_digest = index
        .split('{')
        .find(|entry| entry.contains(&format!("\"{tag}\"")))
        .and_then(|entry| json_str(entry, "digest"))
        .with_context(|| format!("no tag {tag} in {}", layout.display()))?;
    let manifest = std::fs::read_to_string(blob_path(layout, &manifest_digest))?;
    let layers = &manifest[manifest
        .find("\"layers\"")
        .context("manifest without layers")?..];
    Ok(layers
        .split('{')
        .skip(1)
        .filter_map(|entry| json_str(entry, "digest"))
        .collect())
}

/// Unpack the gzip layer blob `digest` of `layout` into `dir` (which exists), as this user
/// (no owners from the archive); only the paths that start with one of `only`, when given.
/// Whiteouts stay as the files they are in the tar (`.wh.NAME`).
pub fn unpack_layer(layout: &Path, digest: &str, dir: &Path, only: &[&str]) -> Result<()> {
    let mut tar = Command::new("tar");
    tar.arg("-xzf")
        .arg(blob_path(layout, digest))
        .arg("-C")
        .arg(dir)
        .arg("--no-same-owner");
    if !only.is_empty() {
        tar.arg("--wildcards")
            .args(only.iter().map(|p| format!("{p}*")));
    }
    match run_quiet(&mut tar) {
        Ok(_) => Ok(()),
        // A layer without any of those paths (bakedb-init's, image.json's).
        Err(e) if !only.is_empty() && format!("{e:#}").contains("Not found in archive") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Push `oci:LAYOUT:TAG` to `REGISTRY/bench/REPO:TAG` with skopeo: the bytes the registry's
/// storage grew by.
pub fn push(registry: &Registry, layout: &Path, tag: &str, repo: &str) -> Result<u64> {
    let before = dir_bytes(&registry.storage());
    run_quiet(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/bench/{repo}:{tag}", registry.host())),
    )?;
    Ok(dir_bytes(&registry.storage()).saturating_sub(before))
}

/// Bytes of the files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    bakedb_testkit::dirs::files_under(dir)
        .iter()
        .map(|(_, n)| n)
        .sum()
}

/// The size of `pigz -1 -c FILE`: gzip at level 1, the level of bakedb's gzip layers.
pub fn pigz1_bytes(file: &Path) -> Result<u64> {
    let mut child = Command::new("pigz")
        .args(["-1", "-c"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("running pigz")?;
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        match out.read(&mut buf)? {
            0 => break,
            n => bytes += n as u64,
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("pigz -1 {} failed: {status}", file.display());
    }
    Ok(bytes)
}

/// `pigz1_bytes` of what `write` puts into a new file at `path`, which is removed after.
pub fn pigz1_bytes_of(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<u64> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    write(&mut file)?;
    drop(file);
    let bytes = pigz1_bytes(path);
    let _ = std::fs::remove_file(path);
    bytes
}
