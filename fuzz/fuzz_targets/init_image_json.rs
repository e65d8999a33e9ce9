//! bakedb-init's own JSON reader and its reading of /etc/bakedb/image.json (profile, files,
//! paths confined to the data directory). init has no library: its modules are compiled
//! into the target as they are.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/init/src/image.rs"]
mod image;
#[allow(dead_code)]
#[path = "../../crates/init/src/json.rs"]
mod json;
#[allow(dead_code)]
#[path = "../../crates/init/src/profile.rs"]
mod profile;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = json::parse(data);
    let _ = image::parse(data);
});
