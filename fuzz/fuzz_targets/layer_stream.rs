//! A base image's layer: the tar stream (uncompressed, gzip or zstd, by the first byte)
//! behind a manifest and config that name it correctly, read by the digest check, the
//! diff_id check and the merged file tree (whiteouts, long names, PAX headers).
#![no_main]

use bakedb_fuzz::{
    LAYER_GZIP, LAYER_TAR, LAYER_ZSTD, Parts, exercise, sample_config, sample_index,
    sample_manifest, scratch, sha256_hex,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, layer)) = data.split_first() else {
        return;
    };
    let media = match kind % 3 {
        0 => LAYER_TAR,
        1 => LAYER_GZIP,
        _ => LAYER_ZSTD,
    };
    let dir = scratch();
    let config = sample_config(&[sha256_hex(layer)]);
    let manifest = sample_manifest(&config, &[(media, layer)]);
    let parts = Parts {
        index: sample_index(&manifest),
        manifest,
        config,
        layers: vec![layer.to_vec()],
    };
    parts.write(dir.path());
    exercise(&format!("oci:{}:t", dir.path().display()));
});
