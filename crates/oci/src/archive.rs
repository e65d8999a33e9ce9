//! Writing `oci-archive:` and `docker-archive:` files from a finished staging layout.
//!
//! A tar header needs the entry size before the content, so an image is first built into a
//! hidden staging layout beside the output file and then streamed into the archive; the
//! archive is written to a temp file inside the staging layout (same file system, out of
//! sight), fsynced and renamed over the output, so a reader sees the old archive or the new
//! one, never a partial one, and nothing else beside it.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::Path;

use serde_json::json;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::image::canonical_json;
use crate::layer::LayerInfo;
use crate::tarball::{self, TarEntry};

fn write_archive_atomically(
    file: &Path,
    temp_dir: &Path,
    entries: Vec<TarEntry>,
    mtime: u64,
) -> Result<()> {
    let entries = tarball::canonicalize(entries)?;
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("archive");
    let tmp = fsutil::temp_name(temp_dir, name);
    let result = (|| {
        let f = File::create(&tmp).map_err(Error::io("creating", &tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        tarball::write_tar(&entries, mtime, &mut out)?;
        let f = out.into_inner().map_err(|e| Error::Io {
            op: "writing",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(Error::io("syncing", &tmp))?;
        fs::rename(&tmp, file).map_err(Error::io("renaming into place", file))?;
        fsutil::sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The staging layout's files (oci-layout, index.json, blobs) as one OCI archive; the temp
/// file goes into `temp_dir`.
pub fn write_oci_archive(staging: &Path, temp_dir: &Path, file: &Path, mtime: u64) -> Result<()> {
    let mut entries = Vec::new();
    for name in ["oci-layout", "index.json"] {
        entries.push(TarEntry::file(name, staging.join(name), 0o644, 0, 0)?);
    }
    let blobs = staging.join("blobs/sha256");
    for entry in fs::read_dir(&blobs).map_err(Error::io("listing", &blobs))? {
        let entry = entry.map_err(Error::io("listing", &blobs))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        entries.push(TarEntry::file(
            &format!("blobs/sha256/{name}"),
            entry.path(),
            0o644,
            0,
            0,
        )?);
    }
    write_archive_atomically(file, temp_dir, entries, mtime)
}

/// A `docker load`-able archive: manifest.json, the config as `<hex>.json` and each layer blob
/// as `<hex>.tar` (Docker decompresses gzip layers on load, so they are stored as built).
pub fn write_docker_archive(
    blob_path: &dyn Fn(&Digest) -> std::path::PathBuf,
    config: &[u8],
    layers: &[LayerInfo],
    repo_tag: &str,
    file: &Path,
    temp_dir: &Path,
    mtime: u64,
) -> Result<()> {
    let config_name = format!("{}.json", Digest::of(config).hex());
    let layer_names: Vec<String> = layers
        .iter()
        .map(|l| format!("{}.tar", l.digest.hex()))
        .collect();
    let manifest =
        json!([{ "Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names }]);
    let mut entries = vec![
        TarEntry::bytes("manifest.json", canonical_json(&manifest), 0o644, 0, 0),
        TarEntry::bytes(&config_name, config.to_vec(), 0o644, 0, 0),
    ];
    for (layer, name) in layers.iter().zip(&layer_names) {
        if entries.iter().any(|e| &e.path == name) {
            continue;
        }
        entries.push(TarEntry::file(name, blob_path(&layer.digest), 0o644, 0, 0)?);
    }
    write_archive_atomically(file, temp_dir, entries, mtime)
}
