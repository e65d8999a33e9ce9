//! An image manifest (or a nested index), reached through a valid index.json that names it
//! by its digest.
#![no_main]

use bakedb_fuzz::{Parts, exercise, sample_index, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let mut parts = Parts::valid();
    parts.manifest = data.to_vec();
    parts.index = sample_index(data);
    parts.write(dir.path());
    exercise(&format!("oci:{}:t", dir.path().display()));
});
