//! Layer writing in one pass: canonical tar → diff_id hasher → compressor → blob store
//! (which hashes the compressed bytes). The layer is never held in memory.

use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

use crate::blob::{BlobStore, BlobWriter};
use crate::compress::Compression;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::tarball::{self, TarEntry};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub media_type: String,
}

/// Counts and reports progress; hashes when asked to (the diff_id of a compressed layer).
struct Tap<'p, W> {
    inner: W,
    hasher: Option<Sha256>,
    progress: &'p mut dyn FnMut(u64),
}

impl<W: Write> Write for Tap<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        (self.progress)(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write `entries` (canonicalised here) as a layer blob.
pub fn write_layer(
    store: &BlobStore,
    compression: Compression,
    entries: Vec<TarEntry>,
    mtime: u64,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<LayerInfo> {
    let entries = tarball::canonicalize(entries)?;
    let blob = store.writer()?;
    let tmp = blob.temp_path().to_owned();
    let compressed = compression != Compression::None;
    let encoder = compression
        .encoder(blob, threads)
        .map_err(Error::io("starting compressor for", &tmp))?;
    let mut tap = Tap {
        inner: encoder,
        hasher: compressed.then(Sha256::new),
        progress,
    };
    tarball::write_tar(&entries, mtime, &mut tap)?;
    let Tap { inner, hasher, .. } = tap;
    let blob: BlobWriter = inner
        .finish()
        .map_err(Error::io("compressing layer into", &tmp))?;
    let info = blob.commit(None)?;
    let diff_id = hasher.map_or(info.digest, Digest::from_hasher);
    Ok(LayerInfo {
        digest: info.digest,
        size: info.size,
        diff_id,
        media_type: compression.media_type().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn diff_id_is_hash_of_uncompressed_tar() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::create(dir.path()).unwrap();
        let entries = vec![TarEntry::bytes("data/x", vec![7u8; 100_000], 0o644, 1, 1)];
        let mut plain = Vec::new();
        tarball::write_tar(
            &tarball::canonicalize(entries.clone()).unwrap(),
            5,
            &mut plain,
        )
        .unwrap();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let info = write_layer(&store, c, entries.clone(), 5, 2, &mut |_| {}).unwrap();
            assert_eq!(info.diff_id, Digest::of(&plain), "{c:?}");
            let blob = std::fs::read(store.path(&info.digest)).unwrap();
            assert_eq!(Digest::of(&blob), info.digest);
            assert_eq!(blob.len() as u64, info.size);
            let mut back = Vec::new();
            c.decoder(&blob[..])
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, plain);
        }
    }
}
