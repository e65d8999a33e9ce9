//! SQLite: a consistent snapshot read page by page through `sqlite_dbpage`.
//!
//! Every page is read inside one read transaction on the source, through SQLite's own pager
//! (so a WAL source's committed frames are seen as any reader sees them), and written into
//! the copy: a database that another process keeps writing (WAL or rollback journal) is
//! captured at exactly one committed point, with one pass over the source. A delta re-bake
//! hashes the pages as they stream by (the page index's XXH3-128 per page, image.json's
//! sha256 per chunk) and writes only those whose hash differs from the previous image's
//! index (a sparse copy that holds what the patch needs); a chunk whose pages all kept their
//! hashes keeps its previous sha256. The copy's header says rollback journal, so the image
//! never needs -wal/-shm files. `PRAGMA quick_check` refuses a corrupt source; it runs on a
//! second connection at the same committed point (WAL: the snapshot handed over with
//! `sqlite3_snapshot_open`; rollback journal: a shared lock taken while the first one holds
//! off every writer) on the other core while the pages stream. The source is opened
//! read-only: bakedb never writes it, so a source that needs a write before it can be read (a
//! hot journal) is refused with advice.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, ffi};
use serde_json::json;
use sha2::{Digest as _, Sha256};

mod engine;
mod stream;

pub use engine::Sqlite;
pub use stream::snapshot_stream;

use crate::datafiles::{CHUNK_SIZE, FileDigest, hex};
use crate::delta::{FilePages, page_hash};
use crate::image_json::Profile;
use crate::{DataFile, Error, Known, Result, Snapshot};

const HEADER: &[u8; 16] = b"SQLite format 3\0";

fn source_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Source {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Cheap checks that need no SQLite: exists, regular file, SQLite header.
pub fn check_source(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| {
        source_err(
            path,
            format!("cannot be read ({e}); pass the path of a SQLite database file"),
        )
    })?;
    if !meta.is_file() {
        return Err(source_err(
            path,
            "is not a regular file; pass the path of a SQLite database file",
        ));
    }
    let mut header = [0u8; 16];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut header))
        .map_err(|e| source_err(path, format!("cannot be read ({e})")))?;
    if n == 0 {
        return Err(source_err(path, "is empty; there is nothing to bake"));
    }
    if n < 16 || &header != HEADER {
        return Err(source_err(
            path,
            "is not a SQLite database (no \"SQLite format 3\" header); if it is encrypted (e.g. SQLCipher), export a plain copy first",
        ));
    }
    Ok(())
}

/// Name of the database file inside the image: the source's file name, made safe.
pub fn image_file_name(source: &Path) -> String {
    let name: String = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("db{name}")
    } else {
        name
    }
}

/// How long a snapshot waits for a writer's lock on the source by default: what rusqlite
/// sets on every connection, and so what bakedb always waited before it was configurable.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Problems of a `PRAGMA quick_check` report shown in an error; the rest are counted.
const PROBLEMS_SHOWN: usize = 5;

/// A duration as people write it: "250 ms", "5 s", "1.5 s".
fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 || d >= Duration::from_secs(10) {
        format!("{} s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// A path as a shell word, for commands the user is told to run.
fn shell_word(path: &Path) -> String {
    let text = path.to_string_lossy();
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/+:@%".contains(c))
    {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The SQLite failures a user can act on, in words that say what to do; None for the rest.
fn explain(source: &Path, busy_timeout: Duration, e: &rusqlite::Error) -> Option<Error> {
    let failure = e.sqlite_error()?;
    let reason = match (failure.code, failure.extended_code) {
        (rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked, _) => format!(
            "is busy: another process holds a lock on it (a writer in the middle of a transaction) and did not release it within the busy timeout of {}; retry when the writer has committed, or wait longer with --busy-timeout (e.g. --busy-timeout 1m)",
            show_duration(busy_timeout)
        ),
        // SQLITE_READONLY_ROLLBACK: a hot journal, which only a connection that may write can
        // roll back.
        (_, 776) => {
            let mut journal = source.as_os_str().to_owned();
            journal.push("-journal");
            let journal = PathBuf::from(journal);
            format!(
                "has a hot rollback journal beside it, {}: a process that was writing the database crashed or was killed in the middle of a transaction, and SQLite must roll that transaction back (writing the database) before it can be read; bakedb never writes a source, so open it once with a program that may write it, e.g. `sqlite3 {} 'PRAGMA quick_check'`, which rolls the interrupted transaction back, then bake again",
                journal.display(),
                shell_word(source)
            )
        }
        // SQLITE_READONLY_DIRECTORY: a WAL database needs its -shm file next to it.
        (_, 1544) => "is in WAL mode and SQLite cannot create its -shm file because the directory is not writable; make the directory writable for this user, or copy the database somewhere writable".into(),
        _ => return None,
    };
    Some(source_err(source, reason))
}

/// An error of SQLite while doing `what` on `source`, in words a user can act on when there
/// are such words.
fn sql_err(
    source: &Path,
    busy_timeout: Duration,
    what: &str,
) -> impl FnOnce(rusqlite::Error) -> Error + use<> {
    let what = what.to_owned();
    let path = source.to_owned();
    move |e: rusqlite::Error| {
        explain(&path, busy_timeout, &e).unwrap_or(Error::Sqlite {
            path: path.clone(),
            what,
            source: e,
        })
    }
}

/// The source in one read transaction: one committed point of it, what it is there, and a
/// second connection at the same point for the check when it can have one.
struct Reading {
    src: Connection,
    checker: Option<Connection>,
    source: PathBuf,
    busy_timeout: Duration,
    page_size: i64,
    page_count: i64,
    provenance: serde_json::Value,
}

impl Reading {
    fn begin(source: &Path, busy_timeout: Duration, taken_at: &str) -> Result<Reading> {
        let sql = |what: &str| sql_err(source, busy_timeout, what);
        let src = open_read_only(source).map_err(sql("opening"))?;
        // The busy handler also runs while the read transaction waits for its lock.
        src.busy_timeout(busy_timeout)
            .map_err(sql("setting the busy timeout"))?;
        src.execute_batch("BEGIN")
            .map_err(sql("starting a read transaction"))?;
        // The first read takes the transaction's lock (or WAL snapshot): every page after it
        // is of this one committed point. It fails early, with SQLite's own words, on a file
        // SQLite cannot read (e.g. encrypted).
        let (page_size, page_count, schema_version, user_version): (i64, i64, i64, i64) = src
            .query_row("SELECT (SELECT page_size FROM pragma_page_size), (SELECT page_count FROM pragma_page_count), (SELECT schema_version FROM pragma_schema_version), (SELECT user_version FROM pragma_user_version)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(sql("reading the schema (is it encrypted or corrupt?)"))?;
        let journal: String = src
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(sql("reading the journal mode"))?;
        // `PRAGMA quick_check` of the same committed point runs on the other core while the
        // pages stream, on a second connection; when it cannot have that point, after them.
        let checker = checker_at(&src, source, journal.eq_ignore_ascii_case("wal"));
        Ok(Reading {
            src,
            checker,
            source: source.to_owned(),
            busy_timeout,
            page_size,
            page_count,
            provenance: json!({
                "source": source.to_string_lossy(),
                "taken_at": taken_at,
                "method": "sqlite_dbpage",
                "position": {"page_size": page_size, "page_count": page_count, "schema_version": schema_version, "user_version": user_version},
            }),
        })
    }

    /// The page size, as a size of buffers: one that divides a chunk.
    fn page_bytes(&self) -> Result<usize> {
        usize::try_from(self.page_size)
            .ok()
            .filter(|p| *p >= 512 && (CHUNK_SIZE as usize).is_multiple_of(*p))
            .ok_or_else(|| {
                source_err(
                    &self.source,
                    format!("has a page size of {}", self.page_size),
                )
            })
    }

    /// Every page of the transaction into `sink`, with the check beside them; ends the
    /// transaction. The sink has every page before the check's verdict is known: it must not
    /// let the last of them be seen as a complete copy until this returns.
    fn read_all(self, sink: &mut dyn PageSink) -> Result<()> {
        let Reading {
            src,
            checker,
            source,
            busy_timeout,
            page_size,
            page_count,
            ..
        } = self;
        let source = source.as_path();
        let sql = |what: &str| sql_err(source, busy_timeout, what);
        std::thread::scope(|scope| -> Result<()> {
            let checking = checker.map(|c| scope.spawn(move || check(&c, source)));
            let read = stream_pages(&src, page_size, source, busy_timeout, sink)?;
            if read != page_count {
                return Err(source_err(
                    source,
                    format!(
                        "sqlite_dbpage gave {read} pages where the read transaction has {page_count}"
                    ),
                ));
            }
            if checking.is_none() {
                check(&src, source)?;
            }
            // The checker holds its own lock or snapshot: writers wait on it alone now.
            src.execute_batch("COMMIT")
                .map_err(sql("ending the read transaction"))?;
            if let Some(checking) = checking {
                checking.join().expect("the check thread panicked")?;
            }
            Ok(())
        })
    }
}

/// Copy `source` consistently into `out_dir`; `taken_at` is recorded as the snapshot time.
/// `durable` fsyncs the copy: wanted for a snapshot directory that outlives the command, a
/// waste of a full disk write for the scratch copy a build reads once and deletes.
/// `busy_timeout` is how long to wait for a writer that holds a lock on the source. With
/// `known` (a delta re-bake) the copy holds only the pages that differ from it
/// (`Snapshot::partial`).
pub fn snapshot(
    source: &Path,
    out_dir: &Path,
    taken_at: &str,
    durable: bool,
    busy_timeout: Duration,
    known: Option<&Known<'_>>,
) -> Result<Snapshot> {
    check_source(source)?;
    let name = image_file_name(source);
    fs::create_dir_all(out_dir).map_err(|e| Error::Io {
        op: "creating",
        path: out_dir.to_owned(),
        source: e,
    })?;
    let dest = out_dir.join(&name);
    let tmp = out_dir.join(format!(".{name}.partial"));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let reading = Reading::begin(source, busy_timeout, taken_at)?;
        let page_size = reading.page_size;
        let known_file = known
            .and_then(|k| k.file(&name))
            .filter(|(pages, _)| i64::from(pages.page_size) == page_size && pages.header_len == 0);
        let file = File::create(&tmp).map_err(|e| Error::Io {
            op: "creating",
            path: tmp.clone(),
            source: e,
        })?;
        let mut chunker = Chunker::new(
            &file,
            &tmp,
            reading.page_bytes()?,
            known.is_some(),
            known_file,
        );
        let provenance = reading.provenance.clone();
        reading.read_all(&mut chunker)?;
        let streamed = chunker.end()?;
        drop(file);
        if durable {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::Io {
                    op: "syncing",
                    path: tmp.clone(),
                    source: e,
                })?;
        }
        fs::rename(&tmp, &dest).map_err(|e| Error::Io {
            op: "renaming",
            path: dest.clone(),
            source: e,
        })?;
        Ok((provenance, streamed, known_file.is_some()))
    })();
    let (provenance, streamed, partial) = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let mode = FILE_MODE;
    let hashed = streamed
        .pages
        .map(|pages| {
            let digest = FileDigest::from_chunks(name.clone(), pages.length, mode, streamed.chunks);
            (name.clone(), (digest, pages))
        })
        .into_iter()
        .collect();
    Ok(Snapshot {
        engine: "sqlite",
        files: vec![DataFile {
            page_size: page_size_of(&provenance),
            page_header: 0,
            rel_path: name.clone(),
            host_path: dest,
            mode,
        }],
        dirs: Vec::new(),
        provenance,
        hashed,
        partial,
    })
}

/// The baked file's mode.
const FILE_MODE: u32 = 0o644;

/// The source, read-only: bakedb never writes it. No mmap: a file another program truncates
/// in place would kill the process with SIGBUS instead of failing the read, and mapped
/// pages would count as the process's memory (a 1 GiB source, 1 GiB of RSS).
fn open_read_only(source: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// A second read-only connection in a read transaction at `src`'s committed point, for the
/// check; None when it cannot have exactly that point (then `src` checks after its pages).
fn checker_at(src: &Connection, source: &Path, wal: bool) -> Option<Connection> {
    let c = open_read_only(source).ok()?;
    if wal {
        // A read opens the connection's WAL, which sqlite3_snapshot_open needs; it ends
        // with its statement.
        c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })
        .ok()?;
    }
    c.execute_batch("BEGIN").ok()?;
    if wal {
        // A WAL reader's snapshot is its own: hand `src`'s over (SQLITE_ENABLE_SNAPSHOT,
        // .cargo/config.toml). `src` keeps its read transaction open meanwhile, so the WAL
        // cannot be reset past that snapshot and opening it cannot miss.
        let main = c"main";
        let mut snap: *mut ffi::sqlite3_snapshot = std::ptr::null_mut();
        // SAFETY: both handles are open connections owned by this thread for the duration of
        // the calls; `src` has an open read transaction on "main" (sqlite3_snapshot_get's
        // precondition) and `c` is in a transaction (BEGIN) that has read nothing yet
        // (sqlite3_snapshot_open's); `snap` is freed exactly once, after the open, whose
        // connection keeps no reference to it.
        let opened = unsafe {
            if ffi::sqlite3_snapshot_get(src.handle(), main.as_ptr(), &mut snap) != ffi::SQLITE_OK {
                return None;
            }
            let rc = ffi::sqlite3_snapshot_open(c.handle(), main.as_ptr(), snap);
            ffi::sqlite3_snapshot_free(snap);
            rc == ffi::SQLITE_OK
        };
        opened.then_some(c)
    } else {
        // Rollback journal: while `src` holds its SHARED lock no writer can commit, so a lock
        // taken now is of the same point. A writer already waiting to commit holds PENDING,
        // which refuses new SHARED locks: then no checker, rather than wait on that writer
        // while it waits on `src`.
        c.busy_timeout(Duration::ZERO).ok()?;
        c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })
        .ok()?;
        Some(c)
    }
}

/// Where the pages of a read transaction go, in order (0-based page numbers). Page 1's
/// read and write versions are already set to 1 (rollback journal), as
/// `PRAGMA journal_mode = DELETE` would set them, so the file is a database of its own
/// without -wal/-shm files.
trait PageSink {
    fn page(&mut self, index: usize, page: &[u8]) -> Result<()>;
}

/// Every page of the source's read transaction, in order, into `sink`; how many there were.
fn stream_pages(
    src: &Connection,
    page_size: i64,
    source: &Path,
    busy_timeout: Duration,
    sink: &mut dyn PageSink,
) -> Result<i64> {
    let sql = |what: &str| sql_err(source, busy_timeout, what);
    let mut stmt = src
        .prepare("SELECT pgno, data FROM sqlite_dbpage")
        .map_err(|e| {
            if e.to_string().contains("no such table") {
                // A build of bakedb whose bundled SQLite lacks the table: not the source's
                // fault, and not something a user can fix with flags.
                source_err(
                    source,
                    "this bakedb's SQLite was built without SQLITE_ENABLE_DBPAGE_VTAB (build bakedb inside its workspace: .cargo/config.toml sets LIBSQLITE3_FLAGS)",
                )
            } else {
                sql("reading the pages")(e)
            }
        })?;
    let mut rows = stmt.query([]).map_err(sql("reading the pages"))?;
    let mut expected: i64 = 1;
    let mut first = Vec::new();
    while let Some(row) = rows.next().map_err(sql("reading the pages"))? {
        let pgno: i64 = row.get(0).map_err(sql("reading the pages"))?;
        let data = row
            .get_ref(1)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .map_err(sql("reading the pages"))?;
        if pgno != expected || i64::try_from(data.len()) != Ok(page_size) {
            return Err(source_err(
                source,
                format!(
                    "sqlite_dbpage gave page {pgno} of {} bytes where page {expected} of {page_size} was due",
                    data.len()
                ),
            ));
        }
        let index = (expected - 1) as usize;
        if pgno == 1 {
            first.extend_from_slice(data);
            first[18] = 1;
            first[19] = 1;
            sink.page(index, &first)?;
        } else {
            sink.page(index, data)?;
        }
        expected += 1;
    }
    Ok(expected - 1)
}

/// What a copy of the pages gave: when they were hashed, the new file's pages and its
/// chunks' sha256 (hex).
struct Streamed {
    pages: Option<FilePages>,
    chunks: Vec<String>,
}

/// The largest write into the copy.
const WRITE_BYTES: usize = 1 << 20;

/// The pages written into a copy at their offsets, one CHUNK_SIZE piece at a time. With
/// `hash` (a re-bake) they are hashed as they go by (XXH3-128 per page for the page index,
/// sha256 per chunk for image.json), and when `known` (the previous image's pages and
/// digest of this file) is given, the pages whose hash is the one `known` has are not
/// written: then the copy is sparse and holds only what a patch needs, and a chunk whose
/// pages all kept their hashes (and its length) keeps its previous sha256 instead of being
/// hashed again.
struct Chunker<'a> {
    file: &'a File,
    path: &'a Path,
    /// Whether to hash the pages and give each chunk its sha256.
    hash: bool,
    page_size: usize,
    known: Option<(&'a FilePages, &'a FileDigest)>,
    known_chunks: Vec<&'a str>,
    buf: Vec<u8>,
    /// Page numbers (0-based, in the file) of this chunk's pages that `known` lacks.
    fresh: Vec<usize>,
    index: usize,
    pages: usize,
    hashes: Vec<u128>,
    chunks: Vec<String>,
}

impl<'a> Chunker<'a> {
    fn new(
        file: &'a File,
        path: &'a Path,
        page_size: usize,
        hash: bool,
        known: Option<(&'a FilePages, &'a FileDigest)>,
    ) -> Self {
        Chunker {
            file,
            path,
            hash,
            page_size,
            known,
            known_chunks: known.map(|(_, d)| d.chunk_digests()).unwrap_or_default(),
            buf: Vec::with_capacity(CHUNK_SIZE as usize),
            fresh: Vec::new(),
            index: 0,
            pages: 0,
            hashes: Vec::new(),
            chunks: Vec::new(),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + use<> {
        let path = self.path.to_owned();
        move |e| Error::Io {
            op,
            path,
            source: e,
        }
    }

    /// The last chunk, and the file's length (pages at the end that kept their hashes were
    /// not written).
    fn end(mut self) -> Result<Streamed> {
        if !self.buf.is_empty() || self.pages == 0 {
            self.flush().map_err(self.io("writing"))?;
        }
        let length = (self.pages * self.page_size) as u64;
        self.file.set_len(length).map_err(self.io("writing"))?;
        Ok(Streamed {
            pages: self.hash.then(|| FilePages {
                page_size: self.page_size as u32,
                header_len: 0,
                length,
                hashes: self.hashes,
                headers: Vec::new(),
            }),
            chunks: self.chunks,
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let start = self.index as u64 * CHUNK_SIZE;
        let len = self.buf.len() as u64;
        let known_len = self
            .known
            .map(|(k, _)| k.length.saturating_sub(start).min(CHUNK_SIZE));
        if self.hash {
            let digest = match self.known_chunks.get(self.index) {
                Some(d) if self.fresh.is_empty() && known_len == Some(len) => (*d).to_owned(),
                _ => hex(&Sha256::digest(&self.buf)),
            };
            self.chunks.push(digest);
        }
        // Runs of consecutive fresh pages, one write each (the whole chunk for a first build).
        let first_page = (start / self.page_size as u64) as usize;
        let mut i = 0;
        while i < self.fresh.len() {
            let mut j = i + 1;
            while j < self.fresh.len() && self.fresh[j] == self.fresh[j - 1] + 1 {
                j += 1;
            }
            let from = (self.fresh[i] - first_page) * self.page_size;
            let to = (self.fresh[j - 1] - first_page + 1) * self.page_size;
            // In writes of at most WRITE_BYTES: one 16 MiB write per chunk cost a full build
            // of 1 GiB 1-3 s more kernel time (7.6 s against 4.5 s here) while the check read
            // the source on the other core.
            for piece in (from..to).step_by(WRITE_BYTES) {
                let end = (piece + WRITE_BYTES).min(to);
                self.file
                    .write_all_at(&self.buf[piece..end], start + piece as u64)?;
            }
            i = j;
        }
        self.buf.clear();
        self.fresh.clear();
        self.index += 1;
        Ok(())
    }
}

impl PageSink for Chunker<'_> {
    fn page(&mut self, index: usize, page: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(page);
        if self.hash {
            let h = page_hash(page);
            if self.known.and_then(|(k, _)| k.hashes.get(index)) != Some(&h) {
                self.fresh.push(index);
            }
            self.hashes.push(h);
        } else {
            self.fresh.push(index);
        }
        self.pages += 1;
        if self.buf.len() == CHUNK_SIZE as usize {
            self.flush().map_err(self.io("writing"))?;
        }
        Ok(())
    }
}

/// The database's page size, as the snapshot recorded it (a delta re-bake ships pages).
fn page_size_of(provenance: &serde_json::Value) -> u32 {
    provenance["position"]["page_size"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0)
}

/// `PRAGMA quick_check` of a read transaction at the snapshot's point: a corrupt source is refused with the first few problems
/// SQLite found and a count of the rest (its report can run to kilobytes).
fn check(db: &Connection, source: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let mut stopped = None;
    {
        let mut stmt = db
            .prepare("PRAGMA quick_check")
            .map_err(|e| Error::Sqlite {
                path: source.to_owned(),
                what: "checking the snapshot (PRAGMA quick_check)".into(),
                source: e,
            })?;
        let mut rows = stmt.query([]).map_err(|e| Error::Sqlite {
            path: source.to_owned(),
            what: "checking the snapshot (PRAGMA quick_check)".into(),
            source: e,
        })?;
        loop {
            match rows.next() {
                Ok(Some(row)) => {
                    let text: String = row.get(0).unwrap_or_default();
                    // One row may hold several problems, one per line, under a
                    // "*** in database main ***" heading.
                    problems.extend(
                        text.lines()
                            .filter(|l| !l.is_empty() && !l.starts_with("*** in database"))
                            .map(str::to_owned),
                    );
                }
                Ok(None) => break,
                // A page too damaged to check stops the check itself.
                Err(e) => {
                    stopped = Some(e.to_string());
                    break;
                }
            }
        }
    }
    if problems == ["ok"] && stopped.is_none() {
        return Ok(());
    }
    problems.retain(|p| p != "ok");
    Err(source_err(
        source,
        corruption_report(source, &problems, stopped.as_deref()),
    ))
}

/// "is corrupt: ..." with the first PROBLEMS_SHOWN problems and how many more there are.
fn corruption_report(source: &Path, problems: &[String], stopped: Option<&str>) -> String {
    let mut shown: Vec<String> = problems.iter().take(PROBLEMS_SHOWN).cloned().collect();
    if problems.len() > PROBLEMS_SHOWN {
        shown.push(format!("and {} more", problems.len() - PROBLEMS_SHOWN));
    }
    if let Some(error) = stopped {
        shown.push(format!("then the check stopped: {error}"));
    }
    let found = match problems.len() {
        0 => "PRAGMA quick_check failed".to_owned(),
        1 => "PRAGMA quick_check found 1 problem".to_owned(),
        // Its default limit: it stops looking after 100.
        n if n >= 100 => format!("PRAGMA quick_check found {n} problems (it stops at 100)"),
        n => format!("PRAGMA quick_check found {n} problems"),
    };
    format!(
        "is corrupt: {found}: {}; repair it (e.g. `sqlite3 {} .recover | sqlite3 repaired.db`) before baking",
        shown.join("; "),
        shell_word(source)
    )
}

/// The read-only profile bakedb-init applies at start (the mechanism is in crates/init):
/// SQLite's temporary files (large sorts, GROUP BY, temp tables) go to /tmp rather than
/// beside the data, and BAKEDB_DATABASE names the baked file for whatever command the image
/// runs (sqlite3, datasette, bakedb-serve).
pub fn profile(snapshot: &Snapshot) -> Profile {
    let file = snapshot.files.first().map_or("", |f| f.rel_path.as_str());
    Profile {
        name: "sqlite-readonly".into(),
        env: [
            ("SQLITE_TMPDIR", "/tmp".to_owned()),
            ("BAKEDB_DATABASE", format!("{{data_dir}}/{file}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        ..Profile::default()
    }
}

/// Files of a directory written by `bakedb snapshot`, with its recorded provenance.
pub fn load_snapshot_dir(dir: &Path) -> Result<Snapshot> {
    let meta_path = dir.join("snapshot.json");
    let bytes = match fs::read(&meta_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(source_err(dir, not_a_snapshot_dir(dir)));
        }
        Err(e) => {
            return Err(Error::Io {
                op: "reading",
                path: meta_path,
                source: e,
            });
        }
    };
    let meta: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| source_err(&meta_path, format!("is not valid JSON: {e}")))?;
    if meta["engine"] != "sqlite" {
        return Err(source_err(
            &meta_path,
            format!("records engine {}, not sqlite", meta["engine"]),
        ));
    }
    let name = meta["file"]
        .as_str()
        .ok_or_else(|| source_err(&meta_path, "has no \"file\""))?;
    if name.contains('/') || name.starts_with('.') {
        return Err(source_err(
            &meta_path,
            "names a file outside the snapshot directory",
        ));
    }
    let host_path: PathBuf = dir.join(name);
    check_source(&host_path)?;
    Ok(Snapshot {
        engine: "sqlite",
        files: vec![DataFile {
            page_size: page_size_of(&meta["provenance"]),
            page_header: 0,
            rel_path: name.to_owned(),
            host_path,
            mode: 0o644,
        }],
        dirs: Vec::new(),
        provenance: meta["provenance"].clone(),
        hashed: Default::default(),
        partial: false,
    })
}

/// Why a directory without snapshot.json cannot be baked, and what to pass instead; names
/// the SQLite databases in it, if any (the usual mistake: the directory of the database).
fn not_a_snapshot_dir(dir: &Path) -> String {
    let mut databases: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .filter(|entry| {
            let mut header = [0u8; 16];
            File::open(entry.path())
                .and_then(|mut f| f.read_exact(&mut header))
                .is_ok_and(|()| &header == HEADER)
        })
        .map(|entry| entry.path().display().to_string())
        .collect();
    databases.sort();
    if databases.len() > 3 {
        let more = databases.len() - 3;
        databases.truncate(3);
        databases.push(format!("{more} more"));
    }
    let hint = match databases.as_slice() {
        [] => String::new(),
        [one] => format!(" (it holds the SQLite database {one}: pass that file)"),
        many => format!(
            " (it holds the SQLite databases {}: pass one of those files)",
            many.join(", ")
        ),
    };
    format!(
        "is a directory but not one written by `bakedb snapshot` (it has no snapshot.json); pass a SQLite database file{hint}, or a directory written by `bakedb snapshot --engine sqlite --source FILE --out DIR`"
    )
}

/// Record a snapshot directory's metadata so `build --source DIR` can use it as it is.
pub fn write_snapshot_meta(dir: &Path, snapshot: &Snapshot) -> Result<()> {
    let meta = json!({"engine": "sqlite", "file": snapshot.files[0].rel_path, "provenance": snapshot.provenance});
    let path = dir.join("snapshot.json");
    fs::write(&path, serde_json::to_vec_pretty(&meta).expect("json")).map_err(|e| Error::Io {
        op: "writing",
        path,
        source: e,
    })
}

/// A live SQLite source followed by `bakedb watch`. SQLite's `PRAGMA data_version` changes on
/// a connection whenever another connection commits (in rollback and WAL mode alike); a file
/// replaced under the same name (a new inode) counts as a change too, and is opened anew.
pub struct Follower {
    path: PathBuf,
    busy_timeout: Duration,
    open: Option<(u64, Connection)>,
}

impl Follower {
    pub fn new(path: &Path, busy_timeout: Duration) -> Result<Follower> {
        check_source(path)?;
        Ok(Follower {
            path: path.to_owned(),
            busy_timeout,
            open: None,
        })
    }
}

impl crate::Follow for Follower {
    fn position(&mut self) -> Result<String> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path.clone();
        let sql = |what: &'static str| {
            let path = path.clone();
            move |e: rusqlite::Error| source_err(&path, format!("{what}: {e}"))
        };
        let inode = fs::metadata(&self.path)
            .map_err(|e| source_err(&self.path, format!("cannot be read: {e}")))?
            .ino();
        if self.open.as_ref().is_none_or(|(ino, _)| *ino != inode) {
            let conn = Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sql("opening"))?;
            conn.busy_timeout(self.busy_timeout)
                .map_err(sql("setting the busy timeout"))?;
            self.open = Some((inode, conn));
        }
        let (_, conn) = self.open.as_ref().expect("opened above");
        let version: i64 = conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(sql("reading data_version"))?;
        Ok(format!("{inode}:{version}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot with the default busy timeout; `quick_check` as the CLI's flag.
    fn snap(src: &Path, out: &Path, quick_check: bool) -> Result<Snapshot, Error> {
        snapshot(src, out, "t", quick_check, DEFAULT_BUSY_TIMEOUT, None)
    }

    /// 2000 rows with an index on 4 KiB pages: enough pages to break some in the middle.
    fn make_indexed_db(path: &Path) {
        let c = Connection::open(path).unwrap();
        c.execute_batch("PRAGMA page_size = 4096; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX iv ON t(v);").unwrap();
        let tx = c.unchecked_transaction().unwrap();
        for i in 0..2000 {
            tx.execute(
                "INSERT INTO t(v) VALUES (?1)",
                [format!("value {i} {}", "x".repeat(50))],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    fn make_db(path: &Path, rows: i64) {
        let c = Connection::open(path).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
            .unwrap();
        for i in 0..rows {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
                .unwrap();
        }
    }

    #[test]
    fn snapshot_of_wal_database_is_self_contained() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        make_db(&src, 100);
        let keep_open = Connection::open(&src).unwrap(); // keeps the WAL un-checkpointed
        let snap = snap(&src, &dir.path().join("out"), true).unwrap();
        drop(keep_open);
        let f = &snap.files[0];
        assert_eq!(f.rel_path, "app.db");
        let uri = format!("file:{}?immutable=1", f.host_path.display());
        let c = Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
        .unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100);
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_ne!(mode.to_lowercase(), "wal");
        assert!(!dir.path().join("out/app.db-wal").exists());
    }

    fn take(src: &Path, out: &Path) -> PathBuf {
        snap(src, out, false).unwrap().files.remove(0).host_path
    }

    #[test]
    fn a_rollback_journal_source_is_copied_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        make_rollback_db(&src, 3000);
        let copy = take(&src, &dir.path().join("out"));
        assert!(fs::read(&copy).unwrap() == fs::read(&src).unwrap());
    }

    #[test]
    fn a_wal_source_is_copied_as_its_checkpointed_file_in_rollback_mode() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        make_db(&src, 2000);
        // Every row is in the WAL's frames while this connection stays open.
        let keep_open = Connection::open(&src).unwrap();
        keep_open
            .execute_batch(
                "PRAGMA wal_autocheckpoint=0; UPDATE t SET v = v || '!' WHERE id % 7 = 0;",
            )
            .unwrap();
        let copy = fs::read(take(&src, &dir.path().join("out"))).unwrap();
        keep_open
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let mut checkpointed = fs::read(&src).unwrap();
        assert_eq!(&checkpointed[18..20], &[2, 2], "the source is in WAL mode");
        checkpointed[18] = 1;
        checkpointed[19] = 1;
        assert_eq!(copy.len(), checkpointed.len());
        assert!(
            copy == checkpointed,
            "the copy differs from the checkpointed source"
        );
    }

    #[test]
    fn a_writers_uncommitted_pages_stay_out_even_when_they_spill_into_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        make_db(&src, 500);
        let writer = Connection::open(&src).unwrap();
        // A tiny cache makes the open transaction write its pages into the WAL before it
        // commits; a reader must still see only the last commit.
        writer
            .execute_batch(
                "PRAGMA cache_size=5; BEGIN; \
                 INSERT INTO t(v) SELECT printf('%.2000c', 'y') FROM t; \
                 UPDATE t SET v = 'changed' WHERE id <= 500;",
            )
            .unwrap();
        let wal = fs::metadata(dir.path().join("app.db-wal")).unwrap().len();
        assert!(
            wal > 200_000,
            "the open transaction did not spill ({wal} bytes of WAL)"
        );
        let copy = take(&src, &dir.path().join("out"));
        writer.execute_batch("COMMIT").unwrap();
        let c = Connection::open_with_flags(
            format!("file:{}?immutable=1", copy.display()),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
        .unwrap();
        let (n, changed): (i64, i64) = c
            .query_row(
                "SELECT count(*), count(*) FILTER (WHERE v = 'changed') FROM t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((n, changed), (500, 0));
        let check: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn bundled_sqlite_has_the_dbpage_table() {
        let c = Connection::open_in_memory().unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM sqlite_dbpage", [], |r| r.get(0))
            .unwrap();
        assert!(n >= 0);
    }

    #[test]
    fn refuses_missing_empty_and_non_sqlite_sources() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let e = snap(&dir.path().join("nope.db"), &out, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be read"), "{e}");
        std::fs::write(dir.path().join("empty.db"), b"").unwrap();
        let e = snap(&dir.path().join("empty.db"), &out, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        std::fs::write(dir.path().join("text.db"), vec![b'x'; 4096]).unwrap();
        let e = snap(&dir.path().join("text.db"), &out, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a SQLite database"), "{e}");
    }

    /// An indexed database scribbled over in the middle, its header intact.
    fn make_corrupt_db(path: &Path) {
        make_indexed_db(path);
        let mut bytes = std::fs::read(path).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 8192] {
            *b = 0xA5;
        }
        std::fs::write(path, &bytes).unwrap();
    }

    #[test]
    fn refuses_corrupt_database() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.db");
        make_corrupt_db(&src);
        let e = snap(&src, &dir.path().join("out"), true).unwrap_err();
        let msg = format!(
            "{e}: {:?}",
            std::error::Error::source(&e).map(|s| s.to_string())
        );
        assert!(
            msg.contains("corrupt") || msg.contains("malformed"),
            "{msg}"
        );
        assert!(!dir.path().join("out/bad.db").exists());
    }

    /// All of a streamed snapshot's bytes, and its end.
    fn read_stream(streaming: &mut crate::Streaming) -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        streaming.files[0].reader.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// A streamed snapshot is the copy a snapshot writes, byte for byte, with the hashes
    /// `digest_and_pages` gives that copy: over more than one chunk, from a WAL source whose
    /// newest pages are in the WAL.
    #[test]
    fn a_streamed_snapshot_is_the_copy_with_its_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        let c = Connection::open(&src).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE b(id INTEGER PRIMARY KEY, x BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20)
             INSERT INTO b(x) SELECT randomblob(1048576) FROM n;
             UPDATE b SET x = randomblob(1000) WHERE id = 3;",
        )
        .unwrap();
        let mut streaming = snapshot_stream(&src, "t", DEFAULT_BUSY_TIMEOUT).unwrap();
        let streamed = read_stream(&mut streaming).unwrap();
        assert_eq!(streaming.files[0].size, streamed.len() as u64);
        assert!(streamed.len() as u64 > CHUNK_SIZE, "{}", streamed.len());
        let crate::Streaming {
            snapshot, finish, ..
        } = streaming;
        let hashed = finish().unwrap();
        let copy = snap(&src, &dir.path().join("out"), false).unwrap();
        let file = &copy.files[0];
        assert_eq!(fs::read(&file.host_path).unwrap(), streamed);
        assert_eq!(
            hashed[&file.rel_path],
            crate::datafiles::digest_and_pages(file, 1).unwrap()
        );
        assert_eq!(snapshot.files[0].rel_path, file.rel_path);
        assert_eq!(snapshot.provenance["position"], copy.provenance["position"]);
    }

    /// A corrupt source's stream ends with the check's error, never at its size, and so does
    /// the snapshot; a stream nobody reads to its end ends the snapshot too.
    #[test]
    fn a_streamed_snapshot_of_a_corrupt_source_never_ends() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.db");
        make_corrupt_db(&src);
        let mut streaming = snapshot_stream(&src, "t", DEFAULT_BUSY_TIMEOUT).unwrap();
        let read = read_stream(&mut streaming).unwrap_err();
        assert!(read.to_string().contains("corrupt"), "{read}");
        let e = (streaming.finish)().unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");

        let good = dir.path().join("good.db");
        make_indexed_db(&good);
        let streaming = snapshot_stream(&good, "t", DEFAULT_BUSY_TIMEOUT).unwrap();
        let crate::Streaming { files, finish, .. } = streaming;
        drop(files);
        let e = finish().unwrap_err();
        assert!(e.to_string().contains("streaming the pages"), "{e}");
    }

    /// A database in rollback-journal mode (the default), as most applications leave it.
    fn make_rollback_db(path: &Path, rows: i64) {
        let c = Connection::open(path).unwrap();
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
            .unwrap();
        let tx = c.unchecked_transaction().unwrap();
        for i in 0..rows {
            tx.execute(
                "INSERT INTO t(v) VALUES (?1)",
                [format!("row {i} {}", "x".repeat(100))],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    #[test]
    fn a_source_locked_by_a_writer_is_busy_until_the_writer_commits() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        make_rollback_db(&src, 10);
        let out = dir.path().join("out");
        let writer = Connection::open(&src).unwrap();
        writer
            .execute_batch("BEGIN EXCLUSIVE; INSERT INTO t(v) VALUES ('late');")
            .unwrap();
        let e = snapshot(&src, &out, "t", false, Duration::from_millis(50), None)
            .unwrap_err()
            .to_string();
        for needle in [
            "is busy: another process holds a lock on it",
            "within the busy timeout of 50 ms",
            "--busy-timeout",
        ] {
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
        assert!(!e.contains("encrypted") && !e.contains("corrupt"), "{e}");
        assert_eq!(
            fs::read_dir(&out).unwrap().count(),
            0,
            "left a file in {out:?}"
        );
        writer.execute_batch("COMMIT").unwrap();
        let snap = snapshot(&src, &out, "t", false, Duration::from_millis(50), None).unwrap();
        let n: i64 = Connection::open(&snap.files[0].host_path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 11);
    }

    #[test]
    fn a_hot_journal_is_named_with_what_to_do_and_the_advice_works() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.db");
        make_rollback_db(&live, 3000);
        // A writer in the middle of a big transaction with a tiny cache: SQLite spills
        // changed pages into the database file, their originals into the journal. A copy of
        // both files now is what a crash at this moment leaves: a hot journal.
        let writer = Connection::open(&live).unwrap();
        writer
            .execute_batch("PRAGMA cache_size = 10; BEGIN; UPDATE t SET v = v || ' changed';")
            .unwrap();
        let src = dir.path().join("crashed.db");
        let journal = dir.path().join("crashed.db-journal");
        fs::copy(&live, &src).unwrap();
        fs::copy(dir.path().join("live.db-journal"), &journal).unwrap();
        drop(writer);
        let before = (fs::read(&src).unwrap(), fs::read(&journal).unwrap());

        let e = snap(&src, &dir.path().join("out"), false)
            .unwrap_err()
            .to_string();
        for needle in [
            "has a hot rollback journal beside it",
            &journal.display().to_string(),
            "crashed or was killed in the middle of a transaction",
            "bakedb never writes a source",
            &format!("sqlite3 {} 'PRAGMA quick_check'", src.display()),
        ] {
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
        assert_eq!(
            (fs::read(&src).unwrap(), fs::read(&journal).unwrap()),
            before,
            "the source or its journal changed"
        );

        // The advice: open it once with write access; SQLite rolls the transaction back.
        let check: String = Connection::open(&src)
            .unwrap()
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        assert!(!journal.exists());
        let snap = snap(&src, &dir.path().join("out"), false).unwrap();
        let changed: i64 = Connection::open(&snap.files[0].host_path)
            .unwrap()
            .query_row("SELECT count(*) FROM t WHERE v LIKE '% changed'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(changed, 0, "the interrupted transaction was baked");
    }

    #[test]
    fn a_long_corruption_report_is_cut_to_its_first_problems_and_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.db");
        make_indexed_db(&src);
        // Break the page type of every other page: one problem per page, dozens in all.
        let mut bytes = fs::read(&src).unwrap();
        for page in (4..bytes.len() / 4096).step_by(2) {
            bytes[page * 4096] = 0x42;
        }
        fs::write(&src, &bytes).unwrap();
        let e = snap(&src, &dir.path().join("out"), false)
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "not one line: {e}");
        assert!(e.len() < 1000, "{} bytes: {e}", e.len());
        let found: usize = e
            .split("PRAGMA quick_check found ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {e}"));
        assert!(found > 20, "{e}");
        assert_eq!(
            e.matches("btreeInitPage() returns error code 11").count(),
            5,
            "{e}"
        );
        assert!(e.contains(&format!("; and {} more", found - 5)), "{e}");
        assert!(
            e.contains(&format!("sqlite3 {} .recover", src.display())),
            "{e}"
        );
        assert!(!dir.path().join("out/bad.db").exists());
    }

    #[test]
    fn paths_in_advice_are_shell_words() {
        assert_eq!(shell_word(Path::new("/data/app.db")), "/data/app.db");
        assert_eq!(shell_word(Path::new("my app.db")), "'my app.db'");
        assert_eq!(shell_word(Path::new("it's.db")), r"'it'\''s.db'");
    }

    #[test]
    fn corruption_report_counts_and_says_where_the_check_stopped() {
        let problems: Vec<String> = (1..=7).map(|i| format!("problem {i}")).collect();
        assert_eq!(
            corruption_report(Path::new("a.db"), &problems[..2], None),
            "is corrupt: PRAGMA quick_check found 2 problems: problem 1; problem 2; repair it (e.g. `sqlite3 a.db .recover | sqlite3 repaired.db`) before baking"
        );
        let report = corruption_report(Path::new("a.db"), &problems, Some("malformed"));
        assert!(
            report.starts_with("is corrupt: PRAGMA quick_check found 7 problems: problem 1; problem 2; problem 3; problem 4; problem 5; and 2 more; then the check stopped: malformed; "),
            "{report}"
        );
        assert!(
            corruption_report(Path::new("a.db"), &[], Some("malformed")).starts_with(
                "is corrupt: PRAGMA quick_check failed: then the check stopped: malformed;"
            )
        );
    }

    #[test]
    fn a_directory_that_is_not_a_snapshot_says_what_it_should_be() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_snapshot_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("is a directory but not one written by `bakedb snapshot` (it has no snapshot.json); pass a SQLite database file, or a directory written by `bakedb snapshot --engine sqlite"),
            "{e}"
        );
        make_rollback_db(&dir.path().join("app.db"), 1);
        fs::write(dir.path().join("notes.txt"), "not a database").unwrap();
        let e = load_snapshot_dir(dir.path()).unwrap_err().to_string();
        let db = dir.path().join("app.db");
        assert!(
            e.contains(&format!(
                "(it holds the SQLite database {}: pass that file)",
                db.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_follower_sees_every_commit_of_another_connection_and_a_replaced_file() {
        use crate::Follow;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        for wal in [false, true] {
            let _ = fs::remove_file(&src);
            make_rollback_db(&src, 10);
            let writer = Connection::open(&src).unwrap();
            if wal {
                writer.execute_batch("PRAGMA journal_mode = WAL").unwrap();
            }
            let mut follow = Follower::new(&src, DEFAULT_BUSY_TIMEOUT).unwrap();
            let first = follow.position().unwrap();
            assert_eq!(
                follow.position().unwrap(),
                first,
                "no commit, same position"
            );
            writer.execute("INSERT INTO t(v) VALUES ('a')", []).unwrap();
            let second = follow.position().unwrap();
            assert_ne!(second, first, "a commit (wal: {wal}) was not seen");
            // An open transaction is not a commit; its commit is.
            writer
                .execute_batch("BEGIN; INSERT INTO t(v) VALUES ('b');")
                .unwrap();
            assert_eq!(follow.position().unwrap(), second);
            writer.execute_batch("COMMIT").unwrap();
            assert_ne!(follow.position().unwrap(), second);
            drop(writer);
        }
        let before = Follower::new(&src, DEFAULT_BUSY_TIMEOUT)
            .unwrap()
            .position()
            .unwrap();
        let mut follow = Follower::new(&src, DEFAULT_BUSY_TIMEOUT).unwrap();
        assert_eq!(
            follow.position().unwrap().split(':').next(),
            before.split(':').next()
        );
        let other = dir.path().join("new.db");
        make_rollback_db(&other, 3);
        fs::rename(&other, &src).unwrap();
        assert_ne!(
            follow.position().unwrap(),
            before,
            "a replaced file was not seen"
        );
        assert!(Follower::new(&dir.path().join("missing.db"), DEFAULT_BUSY_TIMEOUT).is_err());
    }

    /// A delta snapshot against the previous snapshot's pages and digest: only the pages whose
    /// hash changed are in its file (the rest are holes), and the digests and pages it hashed
    /// on the way are those of a whole snapshot of the same state, hashed as a file.
    #[test]
    fn a_delta_snapshot_keeps_only_the_changed_pages_with_the_whole_files_digests() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("app.db");
        // ~40 MiB: three chunks, so unchanged chunks keep their previous sha256.
        make_rollback_db(&src, 300_000);
        let first = snap(&src, &dir.path().join("g0"), false).unwrap();
        // A full snapshot leaves the hashing to the build (beside the compression).
        assert!(!first.partial && first.hashed.is_empty());
        let (d0, p0) = crate::datafiles::digest_and_pages(&first.files[0], 2).unwrap();
        assert!(d0.chunks.len() >= 3, "{d0:?}");
        Connection::open(&src)
            .unwrap()
            .execute_batch("UPDATE t SET v = 'changed' WHERE id BETWEEN 1000 AND 1100")
            .unwrap();
        let index: crate::delta::PageIndex = [("app.db".to_owned(), p0.clone())].into();
        let files = [d0.clone()];
        let known = Known {
            index: &index,
            files: &files,
        };
        let delta = snapshot(
            &src,
            &dir.path().join("g1"),
            "t",
            false,
            DEFAULT_BUSY_TIMEOUT,
            Some(&known),
        )
        .unwrap();
        assert!(delta.partial);
        let whole = snap(&src, &dir.path().join("g1-whole"), false).unwrap();
        assert!(!whole.partial);
        let (d1, p1) = delta.hashed["app.db"].clone();
        let hashed_file = crate::datafiles::digest_and_pages(&whole.files[0], 2).unwrap();
        assert_eq!((&d1, &p1), (&hashed_file.0, &hashed_file.1));
        assert_ne!(d0.chunks[0], d1.chunks[0]);
        assert_eq!(d0.chunks[1..], d1.chunks[1..]);

        let sparse = fs::read(&delta.files[0].host_path).unwrap();
        let full = fs::read(&whole.files[0].host_path).unwrap();
        assert_eq!(sparse.len(), full.len());
        let mut changed = 0;
        for (i, (s, f)) in sparse.chunks(4096).zip(full.chunks(4096)).enumerate() {
            if p0.hashes.get(i) == Some(&p1.hashes[i]) {
                assert!(
                    s.iter().all(|b| *b == 0),
                    "page {i} kept its hash but was written"
                );
            } else {
                assert!(s == f, "changed page {i} differs from the whole snapshot's");
                changed += 1;
            }
        }
        // Page 1 (the change counter), the updated rows' pages and their index's.
        assert!((2..full.len() / 4096 / 10).contains(&changed), "{changed}");
    }

    /// The check's connection reads the same committed point as the one that streams the
    /// pages: in WAL mode a commit after the snapshot began stays out of it, in rollback
    /// mode no writer can commit while both hold their shared locks. A WAL with no frames
    /// (every connection closed since the last write) gives no snapshot to hand over: no
    /// checker then, and the snapshot checks after its pages.
    #[test]
    fn the_checker_reads_the_snapshots_point() {
        let dir = tempfile::tempdir().unwrap();
        let count = |c: &Connection| -> i64 {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap()
        };
        for wal in [true, false] {
            let src = dir.path().join(format!("app-{wal}.db"));
            if wal {
                make_db(&src, 100);
            } else {
                make_rollback_db(&src, 100);
            }
            let writer = Connection::open(&src).unwrap();
            if wal {
                let reader = open_read_only(&src).unwrap();
                reader.execute_batch("BEGIN").unwrap();
                assert_eq!(count(&reader), 100);
                assert!(checker_at(&reader, &src, wal).is_none());
                reader.execute_batch("COMMIT").unwrap();
                writer.execute("DELETE FROM t WHERE id = 1", []).unwrap();
            }
            let before = count(&writer);
            let reader = open_read_only(&src).unwrap();
            reader.execute_batch("BEGIN").unwrap();
            assert_eq!(count(&reader), before);
            let wrote = writer.execute("INSERT INTO t(v) VALUES ('late')", []);
            assert_eq!(wrote.is_ok(), wal, "wal {wal}: {wrote:?}");
            let checker =
                checker_at(&reader, &src, wal).unwrap_or_else(|| panic!("no checker, wal {wal}"));
            assert_eq!(count(&checker), before, "wal {wal}");
            check(&checker, &src).unwrap();
            drop(checker);
            reader.execute_batch("COMMIT").unwrap();
            if !wal {
                writer
                    .execute("INSERT INTO t(v) VALUES ('late')", [])
                    .unwrap();
            }
            assert_eq!(
                count(&open_read_only(&src).unwrap()),
                before + 1,
                "wal {wal}"
            );
        }
    }
}
