//! The canonical tar writer: given the same entries and mtime it writes the same bytes.
//!
//! Rules (DESIGN.md): entries sorted by path bytes, explicit parent directories, one fixed
//! mtime, numeric uid/gid with empty user and group names, permission bits only, ustar headers
//! with a PAX extended header only where ustar cannot hold a value (long paths, files of
//! 8 GiB or more), two zero blocks at the end. Modes are set per entry rather than normalised
//! to 0644/0755 because PostgreSQL refuses a data directory that is not 0700/0750.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// A regular file copied from the host; `size` is what was seen when the entry was listed
    /// and the copy fails if the file no longer has that size.
    File {
        source: PathBuf,
        size: u64,
    },
    Bytes(Vec<u8>),
    Symlink(String),
    /// Bytes another thread produces while the layer is written (a snapshot read from a live
    /// source straight into its layer): exactly `size` of them, then the end of the stream,
    /// which is the producer's last word: an error there (a failed check) fails the layer,
    /// so it is never committed.
    Stream {
        stream: Stream,
        size: u64,
    },
}

/// A reader taken once, by the tar writer.
#[derive(Clone)]
pub struct Stream(Arc<Mutex<Option<Box<dyn Read + Send>>>>);

impl Stream {
    pub fn new(reader: Box<dyn Read + Send>) -> Self {
        Stream(Arc::new(Mutex::new(Some(reader))))
    }

    fn take(&self) -> Option<Box<dyn Read + Send>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stream")
    }
}

impl PartialEq for Stream {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Stream {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// Relative path inside the image, `/`-separated, no leading or trailing slash.
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl TarEntry {
    pub fn dir(path: &str, mode: u32, uid: u32, gid: u32) -> Self {
        TarEntry {
            path: path.to_owned(),
            kind: EntryKind::Dir,
            mode,
            uid,
            gid,
        }
    }

    pub fn bytes(path: &str, data: Vec<u8>, mode: u32, uid: u32, gid: u32) -> Self {
        TarEntry {
            path: path.to_owned(),
            kind: EntryKind::Bytes(data),
            mode,
            uid,
            gid,
        }
    }

    pub fn file(path: &str, source: PathBuf, mode: u32, uid: u32, gid: u32) -> Result<Self> {
        let meta = std::fs::metadata(&source).map_err(Error::io("reading metadata of", &source))?;
        Ok(TarEntry {
            path: path.to_owned(),
            kind: EntryKind::File {
                source,
                size: meta.len(),
            },
            mode,
            uid,
            gid,
        })
    }

    /// A file whose bytes come from `stream` (`EntryKind::Stream`).
    pub fn stream(path: &str, stream: Stream, size: u64, mode: u32, uid: u32, gid: u32) -> Self {
        TarEntry {
            path: path.to_owned(),
            kind: EntryKind::Stream { stream, size },
            mode,
            uid,
            gid,
        }
    }

    fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size, .. } | EntryKind::Stream { size, .. } => *size,
            EntryKind::Bytes(b) => b.len() as u64,
            EntryKind::Dir | EntryKind::Symlink(_) => 0,
        }
    }
}

/// Validate paths, add missing parent directories (root-owned, 0755) and sort by path bytes.
pub fn canonicalize(entries: Vec<TarEntry>) -> Result<Vec<TarEntry>> {
    let mut by_path: BTreeMap<Vec<u8>, TarEntry> = BTreeMap::new();
    for entry in entries {
        let bad = |reason: &str| Error::Invalid {
            location: "layer".into(),
            what: format!("entry path {:?}", entry.path),
            reason: reason.into(),
        };
        if entry.path.is_empty() || entry.path.starts_with('/') || entry.path.ends_with('/') {
            return Err(bad(
                "must be relative, non-empty, without leading or trailing slash",
            ));
        }
        if entry
            .path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("must not contain empty, '.' or '..' components"));
        }
        let key = entry.path.as_bytes().to_vec();
        if by_path.contains_key(&key) {
            return Err(bad("appears twice"));
        }
        by_path.insert(key, entry);
    }
    let mut parents = Vec::new();
    for path in by_path.keys() {
        let path = std::str::from_utf8(path).expect("paths are strings");
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            parents.push(path[..end].to_owned());
            end += 1;
        }
    }
    for parent in parents {
        if let Some(existing) = by_path.get(parent.as_bytes()) {
            if existing.kind != EntryKind::Dir {
                return Err(Error::Invalid {
                    location: "layer".into(),
                    what: format!("entry path {parent:?}"),
                    reason: "is used as a directory and as a file".into(),
                });
            }
            continue;
        }
        by_path.insert(
            parent.as_bytes().to_vec(),
            TarEntry::dir(&parent, 0o755, 0, 0),
        );
    }
    Ok(by_path.into_values().collect())
}

const BLOCK: usize = 512;
const USTAR_MAX_SIZE: u64 = 0o77777777777;

/// Write `entries` (already canonicalised) as a tar stream. Returns the bytes written.
pub fn write_tar<W: Write>(entries: &[TarEntry], mtime: u64, out: &mut W) -> Result<u64> {
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let io_err = |path: &str| Error::io("writing tar entry", PathBuf::from(path.to_owned()));
    for entry in entries {
        let name = match entry.kind {
            EntryKind::Dir => format!("{}/", entry.path),
            _ => entry.path.clone(),
        };
        let size = entry.size();
        let mut header = tar::Header::new_ustar();
        let mut pax: Vec<(&str, String)> = Vec::new();
        if header.set_path(&name).is_err() || !name.is_ascii() {
            pax.push(("path", name.clone()));
            let short: String = name
                .chars()
                .filter(char::is_ascii)
                .rev()
                .take(90)
                .collect::<String>()
                .chars()
                .rev()
                .collect();
            header
                .set_path(short.trim_start_matches('/'))
                .map_err(|e| io_err(&entry.path)(e))?;
        }
        if let EntryKind::Symlink(target) = &entry.kind {
            if target.len() > 100 || !target.is_ascii() {
                pax.push(("linkpath", target.clone()));
            } else {
                header
                    .set_link_name(target)
                    .map_err(|e| io_err(&entry.path)(e))?;
            }
        }
        if size > USTAR_MAX_SIZE {
            pax.push(("size", size.to_string()));
            header.set_size(0);
        } else {
            header.set_size(size);
        }
        if !pax.is_empty() {
            let mut records = Vec::new();
            for (key, value) in &pax {
                records.extend_from_slice(&pax_record(key, value));
            }
            let mut ph = tar::Header::new_ustar();
            ph.set_path("PaxHeaders/entry").expect("short ascii path");
            ph.set_entry_type(tar::EntryType::XHeader);
            ph.set_size(records.len() as u64);
            ph.set_mode(0o644);
            ph.set_mtime(mtime);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_cksum();
            out.write_all(ph.as_bytes()).map_err(io_err(&entry.path))?;
            records.resize(records.len().next_multiple_of(BLOCK), 0);
            out.write_all(&records).map_err(io_err(&entry.path))?;
            written += (BLOCK + records.len()) as u64;
        }
        header.set_entry_type(match entry.kind {
            EntryKind::Dir => tar::EntryType::Directory,
            EntryKind::File { .. } | EntryKind::Bytes(_) | EntryKind::Stream { .. } => {
                tar::EntryType::Regular
            }
            EntryKind::Symlink(_) => tar::EntryType::Symlink,
        });
        header.set_mode(entry.mode & 0o7777);
        header.set_uid(u64::from(entry.uid));
        header.set_gid(u64::from(entry.gid));
        header.set_mtime(mtime);
        header.set_cksum();
        out.write_all(header.as_bytes())
            .map_err(io_err(&entry.path))?;
        written += BLOCK as u64;
        match &entry.kind {
            EntryKind::File { source, size } => {
                let mut file = File::open(source).map_err(Error::io("opening", source))?;
                let mut left = *size;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = file
                        .read(&mut buf[..want])
                        .map_err(Error::io("reading", source))?;
                    if n == 0 {
                        return Err(Error::Io {
                            op: "reading",
                            path: source.clone(),
                            source: io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("file shrank while being archived (expected {size} bytes)"),
                            ),
                        });
                    }
                    out.write_all(&buf[..n]).map_err(io_err(&entry.path))?;
                    left -= n as u64;
                }
            }
            EntryKind::Stream { stream, size } => {
                copy_stream(stream, *size, &entry.path, &mut buf, out)?;
            }
            EntryKind::Bytes(data) => out.write_all(data).map_err(io_err(&entry.path))?,
            EntryKind::Dir | EntryKind::Symlink(_) => {}
        }
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        out.write_all(&[0u8; BLOCK][..pad])
            .map_err(io_err(&entry.path))?;
        written += size + pad as u64;
    }
    out.write_all(&[0u8; 2 * BLOCK])
        .map_err(io_err("end of archive"))?;
    Ok(written + 2 * BLOCK as u64)
}

/// One PAX record, `"<len> <key>=<value>\n"`, where len counts the whole record.
/// `size` bytes of `stream` into `out`, and then its end: the stream must end there, and
/// without an error.
fn copy_stream<W: Write>(
    stream: &Stream,
    size: u64,
    path: &str,
    buf: &mut [u8],
    out: &mut W,
) -> Result<()> {
    let shown = PathBuf::from(path.to_owned());
    let failed = |reason: String| Error::Io {
        op: "reading the stream of",
        path: shown.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, reason),
    };
    let mut reader = stream
        .take()
        .ok_or_else(|| failed("it was read already".into()))?;
    let mut left = size;
    loop {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        // At `size` one more read, of one byte: it returns at the producer's end.
        let want = want.max(1);
        let n = match reader.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Io {
                    op: "reading the stream of",
                    path: shown,
                    source: e,
                });
            }
        };
        if left == 0 {
            return match n {
                0 => Ok(()),
                _ => Err(failed(format!("it holds more than {size} bytes"))),
            };
        }
        if n == 0 {
            return Err(failed(format!(
                "it ended after {} of {size} bytes",
                size - left
            )));
        }
        out.write_all(&buf[..n])
            .map_err(Error::io("writing tar entry", shown.clone()))?;
        left -= n as u64;
    }
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(bytes: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                format!(
                    "{} {:o} {}:{} {} {}",
                    e.path().unwrap().display(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                    e.size()
                )
            })
            .collect()
    }

    #[test]
    fn sorted_with_parents_fixed_mtime_and_owner() {
        let entries = canonicalize(vec![
            TarEntry::bytes("var/lib/bakedb/b.db", b"bbb".to_vec(), 0o644, 65532, 65532),
            TarEntry::bytes("etc/bakedb/image.json", b"{}".to_vec(), 0o644, 0, 0),
            TarEntry::dir("var/lib/bakedb", 0o750, 65532, 65532),
            TarEntry::bytes("var/lib/bakedb/a.db", b"a".to_vec(), 0o600, 65532, 65532),
        ])
        .unwrap();
        let mut out = Vec::new();
        let n = write_tar(&entries, 1_700_000_000, &mut out).unwrap();
        assert_eq!(n as usize, out.len());
        assert_eq!(out.len() % 512, 0);
        assert!(
            out[out.len() - 1024..].iter().all(|b| *b == 0),
            "two zero end blocks"
        );
        assert_eq!(
            listing(&out),
            [
                "etc/ 755 0:0 1700000000 0",
                "etc/bakedb/ 755 0:0 1700000000 0",
                "etc/bakedb/image.json 644 0:0 1700000000 2",
                "var/ 755 0:0 1700000000 0",
                "var/lib/ 755 0:0 1700000000 0",
                "var/lib/bakedb/ 750 65532:65532 1700000000 0",
                "var/lib/bakedb/a.db 600 65532:65532 1700000000 1",
                "var/lib/bakedb/b.db 644 65532:65532 1700000000 3",
            ]
        );
        // Same entries, same bytes.
        let mut again = Vec::new();
        write_tar(&entries, 1_700_000_000, &mut again).unwrap();
        assert_eq!(out, again);
    }

    #[test]
    fn long_paths_use_pax_and_read_back() {
        let long = format!("var/{}/{}", "d".repeat(120), "f".repeat(130));
        let entries =
            canonicalize(vec![TarEntry::bytes(&long, b"x".to_vec(), 0o644, 1, 1)]).unwrap();
        let mut out = Vec::new();
        write_tar(&entries, 0, &mut out).unwrap();
        let paths = listing(&out);
        assert_eq!(paths.last().unwrap(), &format!("{long} 644 1:1 0 1"));
        assert!(out.windows(5).any(|w| w == b"path="), "PAX record present");
    }

    #[test]
    fn short_paths_have_no_pax() {
        let entries =
            canonicalize(vec![TarEntry::bytes("a/b", b"x".to_vec(), 0o644, 0, 0)]).unwrap();
        let mut out = Vec::new();
        write_tar(&entries, 0, &mut out).unwrap();
        assert!(!out.windows(5).any(|w| w == b"path="));
    }

    #[test]
    fn rejects_escaping_and_duplicate_paths() {
        for bad in ["../x", "/abs", "a//b", "a/./b", "a/"] {
            assert!(
                canonicalize(vec![TarEntry::dir(bad, 0o755, 0, 0)]).is_err(),
                "{bad}"
            );
        }
        assert!(
            canonicalize(vec![
                TarEntry::dir("a", 0o755, 0, 0),
                TarEntry::dir("a", 0o755, 0, 0)
            ])
            .is_err()
        );
        assert!(
            canonicalize(vec![
                TarEntry::bytes("a", vec![], 0o644, 0, 0),
                TarEntry::dir("a/b", 0o755, 0, 0)
            ])
            .is_err()
        );
    }

    /// A reader that gives its bytes, then ends as told.
    struct Produced {
        bytes: io::Cursor<Vec<u8>>,
        end: Option<io::Error>,
    }

    impl Read for Produced {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.bytes.read(buf)? {
                0 => self.end.take().map_or(Ok(0), Err),
                n => Ok(n),
            }
        }
    }

    fn streamed(bytes: Vec<u8>, end: Option<io::Error>, size: u64) -> Result<Vec<u8>> {
        let stream = Stream::new(Box::new(Produced {
            bytes: io::Cursor::new(bytes),
            end,
        }));
        let entries = canonicalize(vec![TarEntry::stream("db", stream, size, 0o644, 1, 1)])?;
        let mut out = Vec::new();
        write_tar(&entries, 0, &mut out)?;
        Ok(out)
    }

    #[test]
    fn a_stream_is_archived_only_when_it_ends_cleanly_at_its_size() {
        let bytes: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let tar = streamed(bytes.clone(), None, 5000).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        let mut read = Vec::new();
        entry.read_to_end(&mut read).unwrap();
        assert_eq!(read, bytes);
        // The producer's last word is an error (a failed check): no archive.
        let failed = streamed(
            bytes.clone(),
            Some(io::Error::other("quick_check failed")),
            5000,
        );
        assert!(
            matches!(&failed, Err(Error::Io { source, .. }) if source.to_string() == "quick_check failed"),
            "{failed:?}"
        );
        let short = streamed(bytes[..4000].to_vec(), None, 5000);
        assert!(
            matches!(&short, Err(Error::Io { source, .. }) if source.to_string().contains("ended after 4000 of 5000")),
            "{short:?}"
        );
        let long = streamed(bytes, None, 4000);
        assert!(
            matches!(&long, Err(Error::Io { source, .. }) if source.to_string().contains("more than 4000")),
            "{long:?}"
        );
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record("path", "abc");
        let s = String::from_utf8(r.clone()).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), r.len());
    }
}
