//! A full build's snapshot with no copy: the pages of the source's read transaction go
//! through a bounded channel straight to the layer writer, hashed on the way (XXH3-128 per
//! page for the page index, sha256 per chunk for image.json). The producer, a thread of its
//! own, holds the last piece back until the check has passed: a layer written from a source
//! that fails `PRAGMA quick_check` never sees the end of its file, so it is never committed.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::{FILE_MODE, PageSink, Reading, check_source, image_file_name, page_size_of};
use crate::datafiles::{CHUNK_SIZE, FileDigest, hex};
use crate::delta::{FilePages, page_hash};
use crate::{DataFile, Error, Hashes, Result, Snapshot, StreamedFile, Streaming};

/// Bytes per piece sent to the layer writer (its compressor works in 1 MiB blocks), and
/// pieces in flight: a few MiB of memory whatever the database's size.
const PIECE_BYTES: usize = 1 << 20;
const PIECES_IN_FLIGHT: usize = 4;

enum Piece {
    Bytes(Vec<u8>),
    /// The snapshot failed: the reader's last word.
    Failed(String),
    /// Every byte was sent and the check passed.
    Done,
}

/// Start a snapshot of `source` whose file streams to the reader it returns. The read
/// transaction (and so the snapshot's point) starts before this returns.
pub fn snapshot_stream(source: &Path, taken_at: &str, busy_timeout: Duration) -> Result<Streaming> {
    check_source(source)?;
    let name = image_file_name(source);
    let (started_tx, started) = sync_channel::<(serde_json::Value, u64)>(1);
    let (pieces_tx, pieces) = sync_channel::<Piece>(PIECES_IN_FLIGHT);
    let producer = {
        let path = source.to_owned();
        let taken_at = taken_at.to_owned();
        std::thread::Builder::new()
            .name("sqlite-snapshot".into())
            .spawn(move || -> Result<(FilePages, Vec<String>)> {
                let reading = Reading::begin(&path, busy_timeout, &taken_at)?;
                let page_size = reading.page_bytes()?;
                let length = u64::try_from(reading.page_count).unwrap_or(0) * page_size as u64;
                // Nobody waits for the start any more: the build gave up; the first piece
                // sent finds the reader gone and ends this.
                let _ = started_tx.send((reading.provenance.clone(), length));
                let mut sink = Streamer::new(pieces_tx, page_size, &path);
                match reading.read_all(&mut sink) {
                    Ok(()) => sink.end(length),
                    Err(e) => {
                        let _ = sink.out.send(Piece::Failed(e.to_string()));
                        Err(e)
                    }
                }
            })
            .map_err(|e| Error::Io {
                op: "starting a thread to read",
                path: source.to_owned(),
                source: e,
            })?
    };
    let Ok((provenance, length)) = started.recv() else {
        // It ended before its transaction started: its error says why.
        return Err(match producer.join() {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => unreachable!("a snapshot that started says so"),
            Err(panic) => std::panic::resume_unwind(panic),
        });
    };
    let snapshot = Snapshot {
        engine: "sqlite",
        files: vec![DataFile {
            page_size: page_size_of(&provenance),
            page_header: 0,
            rel_path: name.clone(),
            host_path: PathBuf::new(),
            mode: FILE_MODE,
        }],
        dirs: Vec::new(),
        provenance,
        hashed: Hashes::new(),
        partial: false,
    };
    let finish = move || -> Result<Hashes> {
        let (pages, chunks) = match producer.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let digest = FileDigest::from_chunks(name.clone(), pages.length, FILE_MODE, chunks);
        Ok(Hashes::from([(name, (digest, pages))]))
    };
    Ok(Streaming {
        files: vec![StreamedFile {
            rel_path: snapshot.files[0].rel_path.clone(),
            size: length,
            reader: Box::new(PieceReader {
                pieces,
                piece: Vec::new(),
                at: 0,
                ended: false,
            }),
        }],
        snapshot,
        finish: Box::new(finish),
    })
}

/// The pages, hashed and cut into pieces for the channel.
struct Streamer {
    out: SyncSender<Piece>,
    piece: Vec<u8>,
    page_size: usize,
    hashes: Vec<u128>,
    chunk: Sha256,
    in_chunk: usize,
    chunks: Vec<String>,
    source: PathBuf,
}

impl Streamer {
    fn new(out: SyncSender<Piece>, page_size: usize, source: &Path) -> Self {
        Streamer {
            out,
            piece: Vec::with_capacity(PIECE_BYTES + page_size),
            page_size,
            hashes: Vec::new(),
            chunk: Sha256::new(),
            in_chunk: 0,
            chunks: Vec::new(),
            source: source.to_owned(),
        }
    }

    fn send(&self, piece: Piece) -> Result<()> {
        self.out.send(piece).map_err(|_| Error::Io {
            op: "streaming the pages of",
            path: self.source.clone(),
            source: io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the layer writer stopped reading",
            ),
        })
    }

    /// After the check passed: the last piece and the end. The file's pages, and its chunks'
    /// sha256 (hex).
    fn end(mut self, length: u64) -> Result<(FilePages, Vec<String>)> {
        if self.in_chunk > 0 || self.chunks.is_empty() {
            self.chunks.push(hex(&self.chunk.finalize_reset()));
        }
        let last = std::mem::take(&mut self.piece);
        self.send(Piece::Bytes(last))?;
        self.send(Piece::Done)?;
        let pages = FilePages {
            page_size: self.page_size as u32,
            header_len: 0,
            length,
            hashes: self.hashes,
            headers: Vec::new(),
        };
        Ok((pages, self.chunks))
    }
}

impl PageSink for Streamer {
    fn page(&mut self, _index: usize, page: &[u8]) -> Result<()> {
        // Sent before this page joins it: the piece that holds the last page waits for the
        // check (`end`).
        if self.piece.len() >= PIECE_BYTES {
            let full = std::mem::replace(
                &mut self.piece,
                Vec::with_capacity(PIECE_BYTES + self.page_size),
            );
            self.send(Piece::Bytes(full))?;
        }
        self.piece.extend_from_slice(page);
        self.hashes.push(page_hash(page));
        self.chunk.update(page);
        self.in_chunk += page.len();
        if self.in_chunk == CHUNK_SIZE as usize {
            self.chunks.push(hex(&self.chunk.finalize_reset()));
            self.in_chunk = 0;
        }
        Ok(())
    }
}

/// The layer writer's end of the channel.
struct PieceReader {
    pieces: Receiver<Piece>,
    piece: Vec<u8>,
    at: usize,
    ended: bool,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.piece.len() {
            if self.ended {
                return Ok(0);
            }
            match self.pieces.recv() {
                Ok(Piece::Bytes(piece)) => {
                    self.piece = piece;
                    self.at = 0;
                }
                Ok(Piece::Done) => self.ended = true,
                Ok(Piece::Failed(why)) => return Err(io::Error::other(why)),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the snapshot ended before all its pages were read",
                    ));
                }
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
