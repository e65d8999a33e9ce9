//! An image config (Env, Entrypoint, rootfs.diff_ids, history...), reached through a valid
//! manifest that names it by its digest.
#![no_main]

use bakedb_fuzz::{LAYER_TAR, Parts, exercise, sample_index, sample_manifest, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let mut parts = Parts::valid();
    parts.config = data.to_vec();
    parts.manifest = sample_manifest(data, &[(LAYER_TAR, &parts.layers[0])]);
    parts.index = sample_index(&parts.manifest);
    parts.write(dir.path());
    exercise(&format!("oci:{}:t", dir.path().display()));
});
