//! Layer writing in one pass: canonical tar → diff_id hasher → compressor → blob store
//! (which hashes the compressed bytes). The layer is never held in memory.

use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

use crate::blob::BlobStore;
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
    write_canonical(store, compression, &entries, mtime, threads, progress)
}

fn write_canonical(
    store: &BlobStore,
    compression: Compression,
    entries: &[TarEntry],
    mtime: u64,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<LayerInfo> {
    let blob = store.writer()?;
    let tmp = blob.temp_path().to_owned();
    let (blob, diff_id) =
        compress_into(blob, &tmp, compression, entries, mtime, threads, progress)?;
    let info = blob.commit(None)?;
    Ok(LayerInfo {
        digest: info.digest,
        size: info.size,
        diff_id: diff_id.unwrap_or(info.digest),
        media_type: compression.media_type().to_owned(),
    })
}

/// The tar stream of `entries`, compressed into `sink`; returns the sink and, for a
/// compressed layer, the diff_id (uncompressed, the digest is the diff_id).
fn compress_into<W: Write + Send + 'static>(
    sink: W,
    shown_path: &std::path::Path,
    compression: Compression,
    entries: &[TarEntry],
    mtime: u64,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<(W, Option<Digest>)> {
    let compressed = compression != Compression::None;
    let encoder = compression
        .encoder(sink, threads)
        .map_err(Error::io("starting compressor for", shown_path))?;
    let mut tap = Tap {
        inner: encoder,
        hasher: compressed.then(Sha256::new),
        progress,
    };
    tarball::write_tar(entries, mtime, &mut tap)?;
    let Tap { inner, hasher, .. } = tap;
    let sink = inner
        .finish()
        .map_err(Error::io("compressing layer into", shown_path))?;
    Ok((sink, hasher.map(Digest::from_hasher)))
}

/// Counts and hashes what would be a blob, and keeps nothing.
struct HashSink {
    hasher: Sha256,
    size: u64,
}

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A layer whose bytes are the same in every build (bakedb's own binaries: fixed mtime,
/// deterministic compression). Its digest is computed first, by compressing into a hasher
/// (nothing is written or held: these layers are a few MB); if the store already has that
/// blob, it is not written again, so a layout on a nearly full disk needs no room for it.
/// `has` says whether the output has a blob (the store, or a registry it is pushed to);
/// None (a new layout, a staging layout) skips the dry run.
/// Whether the output has a blob of this digest and size.
pub type HasBlob<'a> = dyn Fn(&Digest, u64) -> Result<bool> + 'a;

pub fn write_fixed_layer(
    store: &BlobStore,
    has: Option<&HasBlob>,
    compression: Compression,
    entries: Vec<TarEntry>,
    mtime: u64,
    threads: usize,
) -> Result<LayerInfo> {
    let entries = tarball::canonicalize(entries)?;
    if let Some(has) = has {
        let sink = HashSink {
            hasher: Sha256::new(),
            size: 0,
        };
        let shown = store.temp_dir().join("(digest only)");
        let (sink, diff_id) = compress_into(
            sink,
            &shown,
            compression,
            &entries,
            mtime,
            threads,
            &mut |_| {},
        )?;
        let digest = Digest::from_hasher(sink.hasher);
        if has(&digest, sink.size)? {
            return Ok(LayerInfo {
                digest,
                size: sink.size,
                diff_id: diff_id.unwrap_or(digest),
                media_type: compression.media_type().to_owned(),
            });
        }
    }
    write_canonical(store, compression, &entries, mtime, threads, &mut |_| {})
}

/// The diff_id (digest of the uncompressed tar) the layer of `entries` has: to know whether
/// an image carries this layer, whatever its compression, without writing it.
pub fn diff_id_of(entries: Vec<TarEntry>, mtime: u64) -> Result<Digest> {
    let entries = tarball::canonicalize(entries)?;
    let sink = HashSink {
        hasher: Sha256::new(),
        size: 0,
    };
    let shown = std::path::Path::new("(digest only)");
    let (sink, _) = compress_into(
        sink,
        shown,
        Compression::None,
        &entries,
        mtime,
        1,
        &mut |_| {},
    )?;
    Ok(Digest::from_hasher(sink.hasher))
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

    /// A fixed layer the store has is recognised by its digest, computed without writing:
    /// here no temp file can be created at all (the temp directory is a file), and the
    /// second write still succeeds, with the same descriptor.
    #[test]
    fn a_fixed_layer_the_store_has_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::create(dir.path()).unwrap();
        let entries = || {
            vec![TarEntry::bytes(
                "bakedb/init",
                vec![3u8; 300_000],
                0o755,
                0,
                0,
            )]
        };
        let has = |d: &Digest, size: u64| Ok(store.contains(d, size));
        let has: Option<&HasBlob> = Some(&has);
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let first = write_fixed_layer(&store, None, c, entries(), 0, 2).unwrap();
            std::fs::remove_dir(store.temp_dir()).unwrap();
            std::fs::write(store.temp_dir(), b"not a directory").unwrap();
            let again = write_fixed_layer(&store, has, c, entries(), 0, 2).unwrap();
            assert_eq!(again, first, "{c:?}");
            let other = vec![TarEntry::bytes("bakedb/init", vec![4u8; 10], 0o755, 0, 0)];
            assert!(
                write_fixed_layer(&store, has, c, other, 0, 2).is_err(),
                "{c:?}: a new layer needs a temp file"
            );
            std::fs::remove_file(store.temp_dir()).unwrap();
            std::fs::create_dir(store.temp_dir()).unwrap();
        }
    }
}
