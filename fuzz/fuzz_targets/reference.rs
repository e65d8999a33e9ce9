//! Image references in skopeo's syntax, as users type them on the command line.
#![no_main]

use bakedb_oci::reference::ImageRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(reference) = text.parse::<ImageRef>()
    {
        let _ = (reference.location(), reference.tag(), reference.path());
        // What bakedb prints must parse back to the same place.
        let again: ImageRef = reference
            .to_string()
            .parse()
            .expect("a printed reference parses");
        assert_eq!(again.location(), reference.location());
    }
});
