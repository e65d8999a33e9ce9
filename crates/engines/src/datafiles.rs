//! The data description in `/etc/bakedb/image.json`: every data file's size and sha256, and
//! for files larger than one chunk the sha256 of each fixed-size chunk, so that bakedb-init
//! can verify one large file on every core at once and a later delta build can see which
//! chunks changed without reading the old image.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{DataFile, Error, Result};

pub const CHUNK_SIZE: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    pub size: u64,
    pub mode: String,
    pub sha256: String,
    /// sha256 of each CHUNK_SIZE piece, the last one shorter; empty when the file fits in one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// Hash one file: the whole-file digest on this thread while `threads - 1` helpers hash the
/// chunks, each reading its own range with pread.
pub fn digest_file(file: &DataFile, threads: usize) -> Result<FileDigest> {
    let path = &file.host_path;
    let f = File::open(path).map_err(io("opening", path))?;
    let size = f.metadata().map_err(io("reading metadata of", path))?.len();
    let n_chunks = size.div_ceil(CHUNK_SIZE);
    let chunked = n_chunks > 1;
    let next = std::sync::atomic::AtomicU64::new(0);
    let mut chunks = vec![String::new(); if chunked { n_chunks as usize } else { 0 }];
    let whole = std::thread::scope(|scope| -> Result<String> {
        let workers: Vec<_> = (0..threads.saturating_sub(1).max(1))
            .filter(|_| chunked)
            .map(|_| {
                let f = &f;
                let next = &next;
                scope.spawn(move || -> Result<Vec<(usize, String)>> {
                    let mut out = Vec::new();
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n_chunks {
                            return Ok(out);
                        }
                        let mut hasher = Sha256::new();
                        let mut off = i * CHUNK_SIZE;
                        let end = (off + CHUNK_SIZE).min(size);
                        while off < end {
                            let want = buf.len().min((end - off) as usize);
                            let n = f.read_at(&mut buf[..want], off).map_err(io("reading", path))?;
                            if n == 0 {
                                return Err(Error::Source { path: path.clone(), reason: "file shrank while being hashed".into() });
                            }
                            hasher.update(&buf[..n]);
                            off += n as u64;
                        }
                        out.push((i as usize, hex(&hasher.finalize())));
                    }
                })
            })
            .collect();
        let mut hasher = Sha256::new();
        let mut reader = File::open(path).map_err(io("opening", path))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(io("reading", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        for w in workers {
            for (i, digest) in w.join().expect("hash worker panicked")? {
                chunks[i] = digest;
            }
        }
        if total != size {
            return Err(Error::Source { path: path.clone(), reason: "file changed size while being hashed".into() });
        }
        Ok(hex(&hasher.finalize()))
    })?;
    Ok(FileDigest { path: file.rel_path.clone(), size, mode: format!("{:04o}", file.mode), sha256: whole, chunks })
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
        let df = DataFile { rel_path: "f".into(), host_path: path.clone(), mode: 0o644 };
        let d = digest_file(&df, 2).unwrap();
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(d.sha256, hex(&Sha256::digest(&data)));
        assert_eq!(d.chunks.len(), 3);
        assert_eq!(d.chunks[2], hex(&Sha256::digest(&data[2 * CHUNK_SIZE as usize..])));
        assert_eq!(d.chunks[0], hex(&Sha256::digest(&data[..CHUNK_SIZE as usize])));
        std::fs::write(&path, b"small").unwrap();
        let d = digest_file(&df, 2).unwrap();
        assert!(d.chunks.is_empty());
        assert_eq!(d.mode, "0644");
    }
}
