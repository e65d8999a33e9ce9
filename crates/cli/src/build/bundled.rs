//! bakedb's own programs in an image, each in a layer that is byte-identical in every image
//! (fixed mtime, no SOURCE_DATE_EPOCH), so registries and nodes store it once: bakedb-init
//! always (unless --no-init), and what the engine's image asks for (bakedb-serve FROM
//! scratch, the lazy copy-up library for postgres).

use bakedb_engines::{Bundled, COPYUP_SHIM_PATH};
use bakedb_oci::tarball::TarEntry;

/// The static bakedb-init built by build.rs; the same bytes go into every image.
pub const INIT_BINARY: &[u8] = include_bytes!(env!("BAKEDB_INIT_PATH"));
/// Where init lives in the image: its ENTRYPOINT.
pub const INIT_PATH: &str = "/bakedb/init";

/// The lazy copy-up preload library for postgres (crates/copyup-shim), built by build.rs.
pub const COPYUP_SHIM: &[u8] = include_bytes!(env!("BAKEDB_COPYUP_SHIM_PATH"));

/// The static bakedb-serve built by build.rs: the engine of a FROM-scratch image.
pub const SERVE_BINARY: &[u8] = include_bytes!(env!("BAKEDB_SERVE_PATH"));
/// On the default PATH, so `bakedb-serve` works as a command in any image.
pub const SERVE_PATH: &str = "/usr/local/bin/bakedb-serve";

/// One of bakedb's layers: its name in messages and history, the path of its program, the
/// program's size, and the layer's entries.
pub struct BundledLayer {
    pub name: &'static str,
    pub path: &'static str,
    pub size: usize,
    pub entries: Vec<TarEntry>,
}

/// The init layer. It also brings /tmp, which a FROM-scratch image lacks and the engines'
/// profiles write into.
pub fn init() -> BundledLayer {
    BundledLayer {
        name: "bakedb-init",
        path: INIT_PATH,
        size: INIT_BINARY.len(),
        entries: vec![
            TarEntry::dir("bakedb", 0o755, 0, 0),
            TarEntry::bytes(&INIT_PATH[1..], INIT_BINARY.to_vec(), 0o755, 0, 0),
            TarEntry::dir("tmp", 0o1777, 0, 0),
        ],
    }
}

/// The layer of a program an engine's image needs.
pub fn layer(which: Bundled) -> BundledLayer {
    match which {
        Bundled::Serve => BundledLayer {
            name: "bakedb-serve",
            path: SERVE_PATH,
            size: SERVE_BINARY.len(),
            entries: vec![TarEntry::bytes(
                &SERVE_PATH[1..],
                SERVE_BINARY.to_vec(),
                0o755,
                0,
                0,
            )],
        },
        Bundled::CopyupShim => BundledLayer {
            name: "bakedb-copyup-shim",
            path: COPYUP_SHIM_PATH,
            size: COPYUP_SHIM.len(),
            entries: vec![
                TarEntry::dir("bakedb", 0o755, 0, 0),
                TarEntry::bytes(&COPYUP_SHIM_PATH[1..], COPYUP_SHIM.to_vec(), 0o644, 0, 0),
            ],
        },
    }
}
