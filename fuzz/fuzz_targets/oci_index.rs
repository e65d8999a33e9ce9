//! index.json of an OCI layout: the first file bakedb reads of a base image or an output.
#![no_main]

use bakedb_fuzz::{Parts, exercise, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let mut parts = Parts::valid();
    parts.index = data.to_vec();
    parts.write(dir.path());
    exercise(&format!("oci:{}:t", dir.path().display()));
    exercise(&format!("oci:{}", dir.path().display()));
});
