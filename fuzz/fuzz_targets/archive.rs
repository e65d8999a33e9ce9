//! oci-archive and docker-archive files (`docker save` output, or anything posing as it):
//! the tar index, manifest.json, the blobs named in it.
#![no_main]

use bakedb_fuzz::{exercise, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let file = dir.path().join("image.tar");
    std::fs::write(&file, data).unwrap();
    exercise(&format!("docker-archive:{}", file.display()));
    exercise(&format!("docker-archive:{}:x:t", file.display()));
    exercise(&format!("oci-archive:{}:t", file.display()));
});
