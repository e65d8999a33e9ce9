//! What the fuzz targets share: small, valid images to mutate one part of, and the reading
//! every target does with what it built. A target that fed raw bytes everywhere would stop at
//! the first digest check; these builders compute the digests of the part under test, so
//! the fuzzer reaches the parser behind the check.

use std::path::Path;

use bakedb_oci::reference::ImageRef;
use bakedb_oci::source::ImageSource;
use sha2::{Digest as _, Sha256};

pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tiny valid layer: a directory, a file, a symlink and a whiteout.
pub fn sample_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        tar.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, b"", None);
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        b"root:x:0:0::/root:/bin/sh\n",
        None,
    );
    add("etc/motd", tar::EntryType::Symlink, b"", Some("passwd"));
    add("var/.wh.cache", tar::EntryType::Regular, b"", None);
    tar.into_inner().unwrap()
}

pub fn sample_config(diff_ids: &[String]) -> Vec<u8> {
    let ids: Vec<String> = diff_ids.iter().map(|d| format!("\"sha256:{d}\"")).collect();
    let history: Vec<&str> = diff_ids
        .iter()
        .map(|_| "{\"created_by\":\"fuzz\"}")
        .collect();
    format!(
        "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{{\"Env\":[\"PATH=/bin\"],\"Cmd\":[\"sh\"]}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}},\"history\":[{}]}}",
        ids.join(","),
        history.join(",")
    )
    .into_bytes()
}

pub fn sample_manifest(config: &[u8], layers: &[(&str, &[u8])]) -> Vec<u8> {
    let descs: Vec<String> = layers
        .iter()
        .map(|(media, bytes)| {
            format!(
                "{{\"mediaType\":\"{media}\",\"digest\":\"sha256:{}\",\"size\":{}}}",
                sha256_hex(bytes),
                bytes.len()
            )
        })
        .collect();
    format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:{}\",\"size\":{}}},\"layers\":[{}]}}",
        sha256_hex(config),
        config.len(),
        descs.join(",")
    )
    .into_bytes()
}

pub fn sample_index(manifest: &[u8]) -> Vec<u8> {
    format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:{}\",\"size\":{},\"annotations\":{{\"org.opencontainers.image.ref.name\":\"t\"}}}}]}}",
        sha256_hex(manifest),
        manifest.len()
    )
    .into_bytes()
}

/// The parts of one image in an OCI layout.
pub struct Parts {
    pub index: Vec<u8>,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
}

impl Parts {
    /// A valid image of one uncompressed layer.
    pub fn valid() -> Parts {
        let layer = sample_layer();
        let config = sample_config(&[sha256_hex(&layer)]);
        let manifest = sample_manifest(&config, &[(LAYER_TAR, &layer)]);
        Parts {
            index: sample_index(&manifest),
            manifest,
            config,
            layers: vec![layer],
        }
    }

    /// Write it as an OCI layout into `dir`, every blob under its own digest.
    pub fn write(&self, dir: &Path) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(
            dir.join("oci-layout"),
            b"{\"imageLayoutVersion\":\"1.0.0\"}",
        )
        .unwrap();
        std::fs::write(dir.join("index.json"), &self.index).unwrap();
        for blob in [&self.manifest, &self.config]
            .into_iter()
            .chain(&self.layers)
        {
            std::fs::write(blobs.join(sha256_hex(blob)), blob).unwrap();
        }
    }
}

/// A scratch directory in memory where the machine has one: the targets write a layout per
/// input.
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// Everything bakedb does with an image it reads (a base, or `verify`/`inspect`): open,
/// list tags, resolve, check the layers, and read every layer's entries. Errors are fine;
/// panics, hangs and unbounded memory are what the fuzzer looks for.
pub fn exercise(reference: &str) {
    let Ok(reference) = reference.parse::<ImageRef>() else {
        return;
    };
    let Ok(source) = ImageSource::open(&reference) else {
        return;
    };
    let _ = source.tags();
    let Ok(image) = source.resolve() else {
        return;
    };
    if source.check_layers_present(&image).is_err() {
        return;
    }
    let _ = source.file_tree(&image.layers, &|p| (p == "etc/passwd").then_some(1 << 16));
    for layer in &image.layers {
        if let Ok(blob) = source.open_blob(&layer.digest, "layer") {
            let _ = bakedb_oci::source::check_layer(blob, layer, "fuzz", &mut |_| Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds must get past every check, or the fuzzer starts at the first error.
    #[test]
    fn the_valid_image_reads_all_the_way() {
        let dir = scratch();
        Parts::valid().write(dir.path());
        let reference: ImageRef = format!("oci:{}:t", dir.path().display()).parse().unwrap();
        let source = ImageSource::open(&reference).unwrap();
        assert_eq!(source.tags().unwrap().len(), 1);
        let image = source.resolve().unwrap();
        source.check_layers_present(&image).unwrap();
        let tree = source
            .file_tree(&image.layers, &|p| (p == "etc/passwd").then_some(1 << 16))
            .unwrap();
        assert!(tree.paths.contains("etc/motd"));
        assert_eq!(tree.files["etc/passwd"], b"root:x:0:0::/root:/bin/sh\n");
        for layer in &image.layers {
            let blob = source.open_blob(&layer.digest, "layer").unwrap();
            bakedb_oci::source::check_layer(blob, layer, "test", &mut |_| Ok(())).unwrap();
        }
    }
}
