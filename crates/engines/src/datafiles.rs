//! The data description in `/etc/bakedb/image.json`: every data file's size and either its
//! sha256 (a file of at most one chunk) or the sha256 of each fixed-size chunk (a larger
//! file), so that bakedb-init can verify one large file on every core at once and a later
//! delta build can see which chunks changed without reading the old image.
//!
//! A large file deliberately has no whole-file sha256: SHA-256 cannot be split across cores,
//! so it would be a serial pass at bake time (a third hash stream beside the layer's diff_id
//! and the chunks, measured to cost about a third of the none-compression build) and one at
//! every container start, while the chunk list, covered by BAKEDB_DATA_DIGEST, already pins
//! every byte.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::delta::{FilePages, page_hash};
use crate::{DataFile, Error, Result};

pub const CHUNK_SIZE: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    pub size: u64,
    pub mode: String,
    /// sha256 of the whole file; only for a file of at most CHUNK_SIZE bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// sha256 of each CHUNK_SIZE piece, the last one shorter; only for larger files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
    /// The generation whose layer holds the file as stored (absent: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// A patched file: the file as its layer stores it, before the patches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<StoredFile>,
    /// A patched file: its patch files (data file paths), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<String>,
}

impl FileDigest {
    /// A file's entry from the sha256 (hex) of each of its CHUNK_SIZE chunks: a file of one
    /// chunk keeps it as its `sha256`.
    pub fn from_chunks(path: String, size: u64, mode: u32, mut chunks: Vec<String>) -> FileDigest {
        let (sha256, chunks) = if chunks.len() == 1 {
            (chunks.pop(), Vec::new())
        } else {
            (None, chunks)
        };
        FileDigest {
            path,
            size,
            mode: format!("{mode:04o}"),
            sha256,
            chunks,
            generation: None,
            base: None,
            patches: Vec::new(),
        }
    }

    /// The sha256 (hex) of each chunk: the whole file's for a file of one chunk.
    pub fn chunk_digests(&self) -> Vec<&str> {
        match &self.sha256 {
            Some(d) => vec![d.as_str()],
            None => self.chunks.iter().map(String::as_str).collect(),
        }
    }
}

/// A file as a layer stores it: its size and digests (docs/image-json.md, `base`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    #[serde(default)]
    pub generation: u64,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

/// Lower-case hex, as image.json writes digests.
/// fsync every file and directory under `path`, `path` included: a snapshot directory that
/// outlives the command.
pub(crate) fn sync_tree(path: &Path) -> Result<()> {
    let io = |op: &'static str, at: &Path| {
        let at = at.to_owned();
        move |source| Error::Io {
            op,
            path: at,
            source,
        }
    };
    let meta = std::fs::symlink_metadata(path).map_err(io("reading", path))?;
    if meta.is_dir() {
        for e in std::fs::read_dir(path).map_err(io("reading", path))? {
            sync_tree(&e.map_err(io("reading", path))?.path())?;
        }
    }
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("syncing", path))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// A chunk's sha256 (hex), the hashes of its pages and their headers.
type Hashes = (String, Vec<u128>, Vec<u8>);

/// Hash one file: a small one whole, a large one chunk by chunk on `threads` threads, each
/// reading its own ranges with pread.
pub fn digest_file(file: &DataFile, threads: usize) -> Result<FileDigest> {
    Ok(digest_and_pages(file, threads)?.0)
}

/// As `digest_file`, and the page hashes of the delta index (docs/patch-format.md) from the
/// same reads: a page never straddles a chunk (CHUNK_SIZE is a multiple of every page size).
pub fn digest_and_pages(file: &DataFile, threads: usize) -> Result<(FileDigest, FilePages)> {
    let path = &file.host_path;
    let f = File::open(path).map_err(io("opening", path))?;
    let size = f.metadata().map_err(io("reading metadata of", path))?.len();
    // A file that is not a whole number of pages is one unit.
    let page_size = match file.page_size {
        p if p > 0 && size > 0 && size.is_multiple_of(u64::from(p)) => p,
        _ => 0,
    };
    let header_len = if page_size > 0 {
        file.page_header.min(page_size) as usize
    } else {
        0
    };
    let n_chunks = size.div_ceil(CHUNK_SIZE).max(1);
    let next = AtomicU64::new(0);
    let hash_range = |buf: &mut [u8], start: u64, end: u64| -> Result<Hashes> {
        let mut hasher = Sha256::new();
        let mut pages = Vec::new();
        let mut headers = Vec::new();
        let mut off = start;
        while off < end {
            // Whole buffers (a multiple of the page size) up to the range's end.
            let want = buf.len().min((end - off) as usize);
            let mut got = 0;
            while got < want {
                let n = f
                    .read_at(&mut buf[got..want], off + got as u64)
                    .map_err(io("reading", path))?;
                if n == 0 {
                    return Err(Error::Source {
                        path: path.clone(),
                        reason: "file shrank while being hashed".into(),
                    });
                }
                got += n;
            }
            hasher.update(&buf[..want]);
            if page_size > 0 {
                for page in buf[..want].chunks(page_size as usize) {
                    pages.push(page_hash(&page[header_len..]));
                    headers.extend_from_slice(&page[..header_len]);
                }
            }
            off += want as u64;
        }
        Ok((hex(&hasher.finalize()), pages, headers))
    };
    let worker = || -> Result<Vec<(usize, Hashes)>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_chunks {
                return Ok(out);
            }
            let start = i * CHUNK_SIZE;
            out.push((
                i as usize,
                hash_range(&mut buf, start, (start + CHUNK_SIZE).min(size))?,
            ));
        }
    };
    let mut chunks = vec![String::new(); n_chunks as usize];
    let mut chunk_pages = vec![Vec::new(); n_chunks as usize];
    let mut chunk_headers = vec![Vec::new(); n_chunks as usize];
    std::thread::scope(|scope| -> Result<()> {
        let helpers: Vec<_> = (1..threads.min(n_chunks as usize))
            .map(|_| scope.spawn(worker))
            .collect();
        let mut results = worker()?;
        for h in helpers {
            results.extend(h.join().expect("hash worker panicked")?);
        }
        for (i, (digest, pages, headers)) in results {
            chunks[i] = digest;
            chunk_pages[i] = pages;
            chunk_headers[i] = headers;
        }
        Ok(())
    })?;
    let now = File::open(path)
        .and_then(|f| f.metadata())
        .map_err(io("reading metadata of", path))?
        .len();
    if now != size {
        return Err(Error::Source {
            path: path.clone(),
            reason: "file changed size while being hashed".into(),
        });
    }
    let hashes = if page_size > 0 {
        chunk_pages.concat()
    } else {
        // A small unpaged file (or an odd one): one more read of it.
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = f.read_at(&mut buf, off).map_err(io("reading", path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
        vec![h.digest128()]
    };
    Ok((
        FileDigest::from_chunks(file.rel_path.clone(), size, file.mode, chunks),
        FilePages {
            page_size,
            header_len: header_len as u32,
            length: size,
            hashes,
            headers: chunk_headers.concat(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_whole_file_digests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 5)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let df = DataFile {
            rel_path: "f".into(),
            host_path: path.clone(),
            mode: 0o644,
            page_size: 4096,
            page_header: 0,
        };
        let d = digest_file(&df, 2).unwrap();
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(
            d.sha256, None,
            "no whole-file digest for a multi-chunk file"
        );
        assert_eq!(d.chunks.len(), 3);
        assert_eq!(
            d.chunks[2],
            hex(&Sha256::digest(&data[2 * CHUNK_SIZE as usize..]))
        );
        assert_eq!(
            d.chunks[0],
            hex(&Sha256::digest(&data[..CHUNK_SIZE as usize]))
        );
        std::fs::write(&path, b"small").unwrap();
        let d = digest_file(&df, 2).unwrap();
        assert!(d.chunks.is_empty());
        assert_eq!(
            d.sha256.as_deref(),
            Some(hex(&Sha256::digest(b"small")).as_str())
        );
        assert_eq!(d.mode, "0644");
        std::fs::write(&path, b"").unwrap();
        let d = digest_file(&df, 2).unwrap();
        assert_eq!(
            d.sha256.as_deref(),
            Some(hex(&Sha256::digest(b"")).as_str())
        );
    }
}
