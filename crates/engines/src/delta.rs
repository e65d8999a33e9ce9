//! Delta re-bakes: the page index an image carries, what changed since the previous image,
//! and the patch files that ship it. The formats are specified in docs/patch-format.md.
//!
//! A re-bake never reads the previous image's data: it folds the previous image's index
//! files (a hash per page of every data file), hashes the new snapshot's pages, and ships
//! new files whole, changed files as the pages that differ, and deleted files as whiteouts.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::datafiles::{CHUNK_SIZE, FileDigest, hex};

/// Where an image's page index files live (absolute in the image).
pub const PAGE_INDEX_DIR: &str = "etc/bakedb/pages";
/// Where a generation's patch files live, under the data directory.
pub const PATCH_DIR: &str = ".patches";

const INDEX_MAGIC: &[u8; 8] = b"BKDBPIDX";
const PATCH_MAGIC: &[u8; 8] = b"BKDBPTCH";
const VERSION: u32 = 1;
pub const PATCH_HEADER: u64 = 64;

/// The hash of a page (or of a whole file of page size 0): XXH3-128, only to find changes.
pub fn page_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// The pages of one data file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePages {
    /// 0: the whole file is one unit.
    pub page_size: u32,
    /// Bytes at the start of each page left out of its hash and kept beside it: PostgreSQL's
    /// pd_lsn and pd_checksum (10), which a prepared copy rewrites on pages whose tuples did
    /// not change. 0 for other files.
    pub header_len: u32,
    pub length: u64,
    pub hashes: Vec<u128>,
    /// `header_len` bytes per page, in page order.
    pub headers: Vec<u8>,
}

impl FilePages {
    pub fn header(&self, page: usize) -> &[u8] {
        let h = self.header_len as usize;
        self.headers.get(page * h..(page + 1) * h).unwrap_or(&[])
    }
}

/// Every data file's pages, by path relative to the data directory.
pub type PageIndex = BTreeMap<String, FilePages>;

/// What one generation's index file says about one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexEntry {
    /// Every page: a new file, or one shipped whole.
    All(FilePages),
    /// The pages that changed (number, hash, header bytes), and the new length.
    Changed {
        page_size: u32,
        header_len: u32,
        length: u64,
        pages: Vec<(u64, u128, Vec<u8>)>,
    },
    Deleted,
}

/// One generation's index file.
pub fn encode_index(entries: &BTreeMap<String, IndexEntry>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (path, entry) in entries {
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        let (kind, page_size, header_len, length, count) = match entry {
            IndexEntry::All(p) => (0u8, p.page_size, p.header_len, p.length, p.hashes.len()),
            IndexEntry::Changed {
                page_size,
                header_len,
                length,
                pages,
            } => (1, *page_size, *header_len, *length, pages.len()),
            IndexEntry::Deleted => (2, 0, 0, 0, 0),
        };
        out.push(kind);
        out.extend_from_slice(&page_size.to_le_bytes());
        out.extend_from_slice(&header_len.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(count as u64).to_le_bytes());
        match entry {
            IndexEntry::All(p) => {
                for (i, h) in p.hashes.iter().enumerate() {
                    out.extend_from_slice(&h.to_le_bytes());
                    out.extend_from_slice(p.header(i));
                }
            }
            IndexEntry::Changed { pages, .. } => {
                for (n, h, header) in pages {
                    out.extend_from_slice(&n.to_le_bytes());
                    out.extend_from_slice(&h.to_le_bytes());
                    out.extend_from_slice(header);
                }
            }
            IndexEntry::Deleted => {}
        }
    }
    out
}

/// A reader that says what is wrong where.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {} ({what})", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn u128(&mut self, what: &str) -> Result<u128, String> {
        Ok(u128::from_le_bytes(
            self.take(16, what)?.try_into().unwrap(),
        ))
    }
}

pub fn decode_index(bytes: &[u8]) -> Result<BTreeMap<String, IndexEntry>, String> {
    let mut c = Cursor { bytes, at: 0 };
    if c.take(8, "magic")? != INDEX_MAGIC {
        return Err("not a bakedb page index (bad magic)".into());
    }
    let version = c.u32("version")?;
    if version != VERSION {
        return Err(format!(
            "page index version {version}; this bakedb reads {VERSION}"
        ));
    }
    let n = c.u32("file count")?;
    let mut entries = BTreeMap::new();
    for _ in 0..n {
        let len = c.u16("path length")? as usize;
        let path = String::from_utf8(c.take(len, "path")?.to_vec())
            .map_err(|_| "a path is not UTF-8".to_owned())?;
        let kind = c.take(1, "kind")?[0];
        let page_size = c.u32("page size")?;
        let header_len = c.u32("header length")?;
        if header_len > page_size {
            return Err(format!("{path}: a page header of {header_len} bytes"));
        }
        let length = c.u64("length")?;
        let count = c.u64("count")?;
        // Each record is at least 16 bytes: a count that cannot fit is refused before any
        // allocation.
        if count > (bytes.len() / 16) as u64 {
            return Err(format!("{path}: {count} records cannot fit"));
        }
        let entry = match kind {
            0 => {
                let mut hashes = Vec::with_capacity(count as usize);
                let mut headers = Vec::with_capacity(count as usize * header_len as usize);
                for _ in 0..count {
                    hashes.push(c.u128("page hash")?);
                    headers.extend_from_slice(c.take(header_len as usize, "page header")?);
                }
                IndexEntry::All(FilePages {
                    page_size,
                    header_len,
                    length,
                    hashes,
                    headers,
                })
            }
            1 => IndexEntry::Changed {
                page_size,
                header_len,
                length,
                pages: (0..count)
                    .map(|_| {
                        Ok((
                            c.u64("page number")?,
                            c.u128("page hash")?,
                            c.take(header_len as usize, "page header")?.to_vec(),
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            },
            2 => IndexEntry::Deleted,
            k => return Err(format!("{path}: unknown kind {k}")),
        };
        entries.insert(path, entry);
    }
    if c.at != bytes.len() {
        return Err(format!("{} bytes after the last entry", bytes.len() - c.at));
    }
    Ok(entries)
}

/// Apply one generation's index file to the index of the generations before it.
pub fn fold(index: &mut PageIndex, entries: BTreeMap<String, IndexEntry>) -> Result<(), String> {
    for (path, entry) in entries {
        match entry {
            IndexEntry::All(pages) => {
                index.insert(path, pages);
            }
            IndexEntry::Deleted => {
                index.remove(&path);
            }
            IndexEntry::Changed {
                page_size,
                header_len,
                length,
                pages,
            } => {
                let file = index
                    .get_mut(&path)
                    .ok_or_else(|| format!("{path}: changed pages of a file it does not have"))?;
                if page_size == 0 || file.page_size != page_size || file.header_len != header_len {
                    return Err(format!(
                        "{path}: pages of {page_size} bytes ({header_len} of header) in a patch of a file of pages of {} ({})",
                        file.page_size, file.header_len
                    ));
                }
                let count = length.div_ceil(u64::from(page_size)) as usize;
                let h = header_len as usize;
                file.hashes.resize(count, 0);
                file.headers.resize(count * h, 0);
                file.length = length;
                for (n, hash, header) in pages {
                    let n = n as usize;
                    let slot = file
                        .hashes
                        .get_mut(n)
                        .ok_or_else(|| format!("{path}: page {n} past the length {length}"))?;
                    *slot = hash;
                    file.headers[n * h..(n + 1) * h].copy_from_slice(&header);
                }
            }
        }
    }
    Ok(())
}

/// How a data file reaches the new image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    /// Shipped whole: new, rewritten, of another page size, or changed in too many pages.
    Whole,
    /// Shipped as these pages (increasing) and the new length.
    Patch(Vec<u64>),
}

/// Pages whose content (but for their header) did not change while their header did:
/// writing the previous header back makes the page the previous page again (page number,
/// header bytes).
pub type Restores = Vec<(u64, Vec<u8>)>;

/// What changed between `old` and `new`: every file of `new`, the files of `old` that are
/// gone, and the headers to write back (see `Restores`) before the new files are hashed
/// and shipped. A file whose changed pages would be more than `max_patch_share` of it ships
/// whole (the patch would save little and cost a longer chain).
#[allow(clippy::type_complexity)]
pub fn changes(
    old: &PageIndex,
    new: &PageIndex,
    max_patch_share: f64,
) -> (
    BTreeMap<String, Change>,
    Vec<String>,
    BTreeMap<String, Restores>,
) {
    let mut restores = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (path, now) in new {
        if let Some(before) = old.get(path)
            && now.header_len > 0
            && before.header_len == now.header_len
            && before.page_size == now.page_size
        {
            let r: Restores = now
                .hashes
                .iter()
                .enumerate()
                .filter(|(i, h)| {
                    before.hashes.get(*i) == Some(*h) && before.header(*i) != now.header(*i)
                })
                .map(|(i, _)| (i as u64, before.header(i).to_vec()))
                .collect();
            if !r.is_empty() {
                restores.insert(path.clone(), r);
            }
        }
        let change = match old.get(path) {
            None => Change::Whole,
            Some(before)
                if before.page_size != now.page_size
                    || before.header_len != now.header_len
                    || now.page_size == 0 =>
            {
                if before == now {
                    Change::Unchanged
                } else {
                    Change::Whole
                }
            }
            Some(before) => {
                let pages: Vec<u64> = now
                    .hashes
                    .iter()
                    .enumerate()
                    .filter(|(i, h)| before.hashes.get(*i) != Some(h))
                    .map(|(i, _)| i as u64)
                    .collect();
                if pages.is_empty() && before.length == now.length {
                    Change::Unchanged
                } else if pages.len() as f64 > max_patch_share * now.hashes.len().max(1) as f64 {
                    Change::Whole
                } else {
                    Change::Patch(pages)
                }
            }
        };
        out.insert(path.clone(), change);
    }
    let deleted = old
        .keys()
        .filter(|p| !new.contains_key(*p))
        .cloned()
        .collect();
    (out, deleted, restores)
}

/// Write headers back into a file (see `Restores`).
pub fn restore_headers(path: &Path, page_size: u32, restores: &Restores) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    for (page, header) in restores {
        file.write_all_at(header, page * u64::from(page_size))?;
    }
    Ok(())
}

/// A file's composed digest, as a patch header records it: SHA-256 of the concatenated
/// 32-byte SHA-256 digests of its chunks (image.json's list; one chunk for a small file).
pub fn composed_digest(digest: &FileDigest) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for c in digest.chunk_digests() {
        let raw: Vec<u8> = (0..c.len() / 2)
            .map(|i| u8::from_str_radix(&c[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        hasher.update(&raw);
    }
    hasher.finalize().into()
}

/// The size of a patch file of `pages` pages of `page_size` bytes: the header, the page
/// numbers and the pages. Known before the patch is written, so a build can weigh a patch
/// against a fresh base without writing it.
pub fn patch_len(page_size: u32, pages: usize) -> u64 {
    PATCH_HEADER + pages as u64 * (8 + u64::from(page_size))
}

/// Write the patch of `source` (the new file) holding `pages` into `out`. Returns its size and
/// sha256 (hex).
pub fn write_patch(
    source: &Path,
    page_size: u32,
    length: u64,
    pages: &[u64],
    composed: [u8; 32],
    out: &Path,
) -> io::Result<PatchDigest> {
    debug_assert!(page_size > 0 && length.is_multiple_of(u64::from(page_size)));
    let src = File::open(source)?;
    let file = File::create(out)?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        chunk: Sha256::new(),
        chunks: Vec::new(),
        size: 0,
    };
    w.write_all(PATCH_MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&page_size.to_le_bytes())?;
    w.write_all(&length.to_le_bytes())?;
    w.write_all(&(pages.len() as u64).to_le_bytes())?;
    w.write_all(&composed)?;
    for p in pages {
        w.write_all(&p.to_le_bytes())?;
    }
    let mut page = vec![0u8; page_size as usize];
    for p in pages {
        src.read_exact_at(&mut page, p * u64::from(page_size))?;
        w.write_all(&page)?;
    }
    w.inner.flush()?;
    let size = w.size;
    let mut chunks = w.chunks;
    if size == 0 || !size.is_multiple_of(CHUNK_SIZE) {
        chunks.push(hex(w.chunk.finalize().as_slice()));
    }
    // As for every file in image.json: one sha256 up to CHUNK_SIZE, a digest per chunk above.
    Ok(if chunks.len() == 1 {
        PatchDigest {
            size,
            sha256: chunks.pop(),
            chunks: Vec::new(),
        }
    } else {
        PatchDigest {
            size,
            sha256: None,
            chunks,
        }
    })
}

/// A patch file's size and digests, in image.json's form for a file: `sha256` for one of at
/// most CHUNK_SIZE bytes, else the sha256 of each CHUNK_SIZE chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchDigest {
    pub size: u64,
    pub sha256: Option<String>,
    pub chunks: Vec<String>,
}

/// Writes through, hashing what it wrote chunk by chunk (CHUNK_SIZE bytes each).
struct HashingWriter<W> {
    inner: W,
    chunk: Sha256,
    chunks: Vec<String>,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Never past the end of the chunk being hashed.
        let room = CHUNK_SIZE - self.size % CHUNK_SIZE;
        let take = buf.len().min(room as usize);
        let n = self.inner.write(&buf[..take])?;
        self.chunk.update(&buf[..n]);
        self.size += n as u64;
        if self.size.is_multiple_of(CHUNK_SIZE) && n > 0 {
            let done = std::mem::replace(&mut self.chunk, Sha256::new());
            self.chunks.push(hex(done.finalize().as_slice()));
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compose a file from a base and patches (what bakedb-init does for "apply"): a reference
/// for tests and for `bakedb verify`.
pub fn compose(base: &[u8], patches: &[&[u8]]) -> Result<Vec<u8>, String> {
    let mut out = base.to_vec();
    for patch in patches {
        let mut c = Cursor {
            bytes: patch,
            at: 0,
        };
        if c.take(8, "magic")? != PATCH_MAGIC {
            return Err("not a bakedb patch (bad magic)".into());
        }
        if c.u32("version")? != VERSION {
            return Err("unknown patch version".into());
        }
        let page_size = u64::from(c.u32("page size")?);
        let length = c.u64("length")?;
        let count = c.u64("count")?;
        c.take(32, "composed digest")?;
        if page_size == 0 || length % page_size != 0 || count > length / page_size {
            return Err("inconsistent patch header".into());
        }
        let numbers: Vec<u64> = (0..count)
            .map(|_| c.u64("page number"))
            .collect::<Result<_, _>>()?;
        out.resize(length as usize, 0);
        for n in numbers {
            let data = c.take(page_size as usize, "page data")?;
            let at = (n * page_size) as usize;
            out.get_mut(at..at + page_size as usize)
                .ok_or("page past the length")?
                .copy_from_slice(data);
        }
    }
    Ok(out)
}

/// Compose a file in place: apply `patches`, in order, to the file at `path` (what
/// bakedb-init does for "apply", and `bakedb verify` to check a chain), validating each
/// patch's header against its length.
pub fn compose_file(path: &Path, patches: &[&Path]) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    for patch in patches {
        let bytes = std::fs::read(patch).map_err(|e| format!("{}: {e}", patch.display()))?;
        let bad = |why: &str| format!("{}: {why}", patch.display());
        let mut c = Cursor {
            bytes: &bytes,
            at: 0,
        };
        if c.take(8, "magic").map_err(|e| bad(&e))? != PATCH_MAGIC {
            return Err(bad("not a bakedb patch (bad magic)"));
        }
        if c.u32("version").map_err(|e| bad(&e))? != VERSION {
            return Err(bad("unknown patch version"));
        }
        let page_size = u64::from(c.u32("page size").map_err(|e| bad(&e))?);
        let length = c.u64("length").map_err(|e| bad(&e))?;
        let count = c.u64("count").map_err(|e| bad(&e))?;
        if !(512..=65536).contains(&page_size)
            || !page_size.is_power_of_two()
            || !length.is_multiple_of(page_size)
            || Some(bytes.len() as u64)
                != count
                    .checked_mul(8 + page_size)
                    .and_then(|b| b.checked_add(PATCH_HEADER))
        {
            return Err(bad("inconsistent header"));
        }
        c.take(32, "composed digest").map_err(|e| bad(&e))?;
        let numbers: Vec<u64> = (0..count)
            .map(|_| c.u64("page number"))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&e))?;
        if numbers.windows(2).any(|w| w[0] >= w[1])
            || numbers.last().is_some_and(|&n| n >= length / page_size)
        {
            return Err(bad("page numbers out of order or past the length"));
        }
        file.set_len(length).map_err(|e| bad(&e.to_string()))?;
        for n in numbers {
            let data = c
                .take(page_size as usize, "page data")
                .map_err(|e| bad(&e))?;
            file.write_all_at(data, n * page_size)
                .map_err(|e| bad(&e.to_string()))?;
        }
    }
    Ok(())
}

/// Hash the pages of `bytes` (a whole file) at `page_size` (0: one unit), each page's first
/// `header_len` bytes kept beside its hash, not in it.
pub fn pages_of(bytes: &[u8], page_size: u32, header_len: u32) -> FilePages {
    let mut out = FilePages {
        page_size,
        header_len,
        length: bytes.len() as u64,
        hashes: Vec::new(),
        headers: Vec::new(),
    };
    if page_size == 0 {
        out.header_len = 0;
        out.hashes.push(page_hash(bytes));
    } else {
        for page in bytes.chunks(page_size as usize) {
            let h = (header_len as usize).min(page.len());
            out.hashes.push(page_hash(&page[h..]));
            out.headers.extend_from_slice(&page[..h]);
        }
    }
    out
}

/// CHUNK_SIZE is a multiple of every page size: page hashes can be taken chunk by chunk.
const _: () = assert!(CHUNK_SIZE.is_multiple_of(65536));

#[cfg(test)]
mod tests {
    use super::*;

    fn file(page_size: u32, pages: &[u8]) -> Vec<u8> {
        pages
            .iter()
            .flat_map(|b| vec![*b; page_size as usize])
            .collect()
    }

    #[test]
    fn index_round_trips_and_folds() {
        let a = pages_of(&file(512, &[1, 2, 3]), 512, 0);
        let b = pages_of(b"PG_VERSION 15", 0, 0);
        let gen0 = BTreeMap::from([
            ("a".to_owned(), IndexEntry::All(a.clone())),
            ("b".to_owned(), IndexEntry::All(b)),
        ]);
        let bytes = encode_index(&gen0);
        assert_eq!(decode_index(&bytes).unwrap(), gen0);
        let mut index = PageIndex::new();
        fold(&mut index, gen0).unwrap();

        let grown = pages_of(&file(512, &[1, 9, 3, 4]), 512, 0);
        let gen1 = BTreeMap::from([
            (
                "a".to_owned(),
                IndexEntry::Changed {
                    page_size: 512,
                    header_len: 0,
                    length: 2048,
                    pages: vec![(1, grown.hashes[1], vec![]), (3, grown.hashes[3], vec![])],
                },
            ),
            ("b".to_owned(), IndexEntry::Deleted),
        ]);
        fold(&mut index, decode_index(&encode_index(&gen1)).unwrap()).unwrap();
        assert_eq!(index["a"], grown);
        assert!(!index.contains_key("b"));

        for bad in [&b"BKDBPIDX"[..], b"nonsense", &bytes[..bytes.len() - 1]] {
            assert!(decode_index(bad).is_err());
        }
        let mut huge = encode_index(&BTreeMap::new());
        huge[12..16].copy_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&1u16.to_le_bytes());
        huge.push(b'x');
        huge.push(0);
        huge.extend_from_slice(&512u32.to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_index(&huge).unwrap_err().contains("cannot fit"));
    }

    /// A page whose header alone changed (PostgreSQL's LSN after the copy's VACUUM) is not a
    /// change: the previous header is written back, and the file is the previous file.
    #[test]
    fn header_only_changes_are_restored() {
        let dir = tempfile::tempdir().unwrap();
        let mut old_bytes = file(512, &[1, 2, 3, 4]);
        old_bytes[512] = 0xAA; // page 1's header differs below
        let mut new_bytes = old_bytes.clone();
        new_bytes[512] = 0xBB;
        new_bytes[2 * 512 + 100] = 9; // page 2's content changes
        let old = PageIndex::from([("db".to_owned(), pages_of(&old_bytes, 512, 10))]);
        let new = PageIndex::from([("db".to_owned(), pages_of(&new_bytes, 512, 10))]);
        let (c, _, restores) = changes(&old, &new, 0.9);
        assert_eq!(c["db"], Change::Patch(vec![2]));
        assert_eq!(restores["db"], vec![(1, old_bytes[512..522].to_vec())]);
        let path = dir.path().join("db");
        std::fs::write(&path, &new_bytes).unwrap();
        restore_headers(&path, 512, &restores["db"]).unwrap();
        let restored = std::fs::read(&path).unwrap();
        assert_eq!(&restored[512..1024], &old_bytes[512..1024]);
        assert_eq!(&restored[1024..1536], &new_bytes[1024..1536]);
        let round = encode_index(&BTreeMap::from([(
            "db".to_owned(),
            IndexEntry::All(new["db"].clone()),
        )]));
        assert_eq!(
            decode_index(&round).unwrap()["db"],
            IndexEntry::All(new["db"].clone())
        );
    }

    #[test]
    fn changes_and_patches_compose_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let old_bytes = file(512, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let new_bytes = file(512, &[1, 2, 9, 4, 5, 6, 7, 8, 10]);
        let old = PageIndex::from([
            ("db".to_owned(), pages_of(&old_bytes, 512, 0)),
            ("gone".to_owned(), pages_of(b"x", 0, 0)),
            ("same".to_owned(), pages_of(b"y", 0, 0)),
        ]);
        let new = PageIndex::from([
            ("db".to_owned(), pages_of(&new_bytes, 512, 0)),
            ("same".to_owned(), pages_of(b"y", 0, 0)),
            ("fresh".to_owned(), pages_of(b"z", 0, 0)),
        ]);
        let (c, deleted, restores) = changes(&old, &new, 0.5);
        assert!(restores.is_empty());
        assert_eq!(c["db"], Change::Patch(vec![2, 8]));
        assert_eq!(c["same"], Change::Unchanged);
        assert_eq!(c["fresh"], Change::Whole);
        assert_eq!(deleted, ["gone"]);
        let (c, _, _) = changes(&old, &new, 0.1);
        assert_eq!(
            c["db"],
            Change::Whole,
            "two of nine pages is more than 10 %"
        );

        let src = dir.path().join("new");
        std::fs::write(&src, &new_bytes).unwrap();
        let out = dir.path().join("patch");
        let digest =
            write_patch(&src, 512, new_bytes.len() as u64, &[2, 8], [7; 32], &out).unwrap();
        let patch = std::fs::read(&out).unwrap();
        assert_eq!(digest.size, patch.len() as u64);
        assert_eq!(digest.size, PATCH_HEADER + 2 * 8 + 2 * 512);
        assert_eq!(digest.size, patch_len(512, 2));
        assert_eq!(digest.sha256, Some(hex(&Sha256::digest(&patch))));
        assert!(digest.chunks.is_empty());
        assert_eq!(compose(&old_bytes, &[&patch]).unwrap(), new_bytes);
        // Shrinking: a later patch with a shorter length.
        let short = file(512, &[1, 2, 9]);
        std::fs::write(&src, &short).unwrap();
        write_patch(&src, 512, short.len() as u64, &[], [0; 32], &out).unwrap();
        let shrink = std::fs::read(&out).unwrap();
        assert_eq!(compose(&old_bytes, &[&patch, &shrink]).unwrap(), short);
    }

    /// A patch larger than a chunk is described as every large file is, chunk by chunk:
    /// bakedb-init refuses a file over CHUNK_SIZE with a single sha256 (found by `bench
    /// freshness`: a 1 % random update of a 1 GiB database patched 60 MB).
    #[test]
    fn a_patch_over_a_chunk_gets_a_digest_per_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let page = 4096u64;
        let pages = CHUNK_SIZE / page + 100;
        let src = dir.path().join("db");
        let f = File::create(&src).unwrap();
        f.set_len(pages * page).unwrap();
        f.write_all_at(b"not all zeros", 12345).unwrap();
        let out = dir.path().join("patch");
        let all: Vec<u64> = (0..pages).collect();
        let digest = write_patch(&src, page as u32, pages * page, &all, [1; 32], &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(digest.size, bytes.len() as u64);
        assert_eq!(digest.size, patch_len(page as u32, all.len()));
        assert!(digest.size > CHUNK_SIZE && digest.size <= 2 * CHUNK_SIZE);
        assert_eq!(digest.sha256, None);
        let expected: Vec<String> = bytes
            .chunks(CHUNK_SIZE as usize)
            .map(|c| hex(&Sha256::digest(c)))
            .collect();
        assert_eq!(digest.chunks, expected);
    }
}
