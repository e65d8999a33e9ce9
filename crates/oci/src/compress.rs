//! Layer compression: gzip (default, what Docker before 23 can pull), zstd, or none.
//!
//! gzip is written as independent gzip members of 1 MiB of input each, compressed with
//! libdeflate on every core and concatenated in order. A multi-member stream is valid gzip
//! (RFC 1952 §2.2) that every decoder in the ecosystem reads, and because the member
//! boundaries depend only on the input, the output is the same for any number of threads.
//! zstd always runs in multithreaded mode, whose output does not depend on the worker count.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_TYPE_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

const GZIP_BLOCK: usize = 1 << 20;
const GZIP_LEVEL: i32 = 1;
const ZSTD_LEVEL: i32 = 3;

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => MEDIA_TYPE_LAYER,
            Compression::Gzip => MEDIA_TYPE_LAYER_GZIP,
            Compression::Zstd => MEDIA_TYPE_LAYER_ZSTD,
        }
    }

    /// The compression of a layer media type, OCI or Docker; None for anything else.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            MEDIA_TYPE_LAYER
            | MEDIA_TYPE_DOCKER_LAYER
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            MEDIA_TYPE_LAYER_GZIP
            | MEDIA_TYPE_DOCKER_LAYER_GZIP
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" => {
                Some(Compression::Gzip)
            }
            MEDIA_TYPE_LAYER_ZSTD
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// Guess from the first bytes of a blob (docker-archive layers carry no media type).
    pub fn sniff(prefix: &[u8]) -> Compression {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    pub fn encoder<W: Write + Send + 'static>(
        self,
        out: W,
        threads: usize,
    ) -> io::Result<Encoder<W>> {
        Ok(match self {
            Compression::None => Encoder::None(out),
            Compression::Gzip => Encoder::Gzip(ParallelGzip::new(out, threads)),
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
                enc.multithread(threads.max(1) as u32)?;
                Encoder::Zstd(enc)
            }
        })
    }

    pub fn decoder<'r, R: Read + 'r>(self, input: R) -> io::Result<Box<dyn Read + 'r>> {
        Ok(match self {
            Compression::None => Box::new(input),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                io::BufReader::with_capacity(1 << 16, input),
            )),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
        })
    }
}

pub enum Encoder<W: Write + Send + 'static> {
    None(W),
    Gzip(ParallelGzip<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write + Send + 'static> Encoder<W> {
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write + Send + 'static> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.write_all(buf),
            Encoder::Gzip(g) => g.write_all(buf),
            Encoder::Zstd(z) => z.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Job = (Vec<u8>, SyncSender<Vec<u8>>);

/// gzip members compressed on worker threads, written in input order.
pub struct ParallelGzip<W: Write> {
    out: Option<W>,
    block: Vec<u8>,
    pending: VecDeque<Receiver<Vec<u8>>>,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    max_pending: usize,
    wrote_member: bool,
}

impl<W: Write> ParallelGzip<W> {
    pub fn new(out: W, threads: usize) -> Self {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel::<Job>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                std::thread::spawn(move || {
                    let mut compressor = libdeflater::Compressor::new(
                        libdeflater::CompressionLvl::new(GZIP_LEVEL).expect("valid level"),
                    );
                    loop {
                        let job = rx.lock().expect("job queue").recv();
                        let Ok((input, reply)) = job else { return };
                        let mut output = vec![0u8; compressor.gzip_compress_bound(input.len())];
                        let n = compressor
                            .gzip_compress(&input, &mut output)
                            .expect("bound is sufficient");
                        output.truncate(n);
                        let _ = reply.send(output);
                    }
                })
            })
            .collect();
        ParallelGzip {
            out: Some(out),
            block: Vec::with_capacity(GZIP_BLOCK),
            pending: VecDeque::new(),
            jobs: Some(tx),
            workers,
            max_pending: threads * 3,
            wrote_member: false,
        }
    }

    fn submit_block(&mut self) -> io::Result<()> {
        let input = std::mem::replace(&mut self.block, Vec::with_capacity(GZIP_BLOCK));
        let (reply_tx, reply_rx) = sync_channel(1);
        self.jobs
            .as_ref()
            .expect("open")
            .send((input, reply_tx))
            .map_err(|_| io::Error::other("gzip worker stopped"))?;
        self.pending.push_back(reply_rx);
        self.wrote_member = true;
        while self.pending.len() >= self.max_pending {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.pending.pop_front() {
            let member = rx
                .recv()
                .map_err(|_| io::Error::other("gzip worker failed"))?;
            self.out.as_mut().expect("open").write_all(&member)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        // An empty input still needs one member to be a valid gzip stream.
        if !self.block.is_empty() || !self.wrote_member {
            self.submit_block()?;
        }
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        Ok(self.out.take().expect("finished once"))
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let total = buf.len();
        while !buf.is_empty() {
            let take = (GZIP_BLOCK - self.block.len()).min(buf.len());
            self.block.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.block.len() == GZIP_BLOCK {
                self.submit_block()?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        self.jobs = None;
        self.pending.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..3_500_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 % 7)
            .collect()
    }

    #[test]
    fn gzip_is_independent_of_thread_count_and_round_trips() {
        let data = sample();
        let mut outputs = Vec::new();
        for threads in [1, 2, 5] {
            let mut enc = Compression::Gzip.encoder(Vec::new(), threads).unwrap();
            for chunk in data.chunks(777_777) {
                enc.write_all(chunk).unwrap();
            }
            outputs.push(enc.finish().unwrap());
        }
        assert_eq!(outputs[0], outputs[1]);
        assert_eq!(outputs[0], outputs[2]);
        let mut back = Vec::new();
        Compression::Gzip
            .decoder(&outputs[0][..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zstd_is_independent_of_thread_count_and_round_trips() {
        let data = sample();
        let mut outputs = Vec::new();
        for threads in [1, 2] {
            let mut enc = Compression::Zstd.encoder(Vec::new(), threads).unwrap();
            enc.write_all(&data).unwrap();
            outputs.push(enc.finish().unwrap());
        }
        assert_eq!(outputs[0], outputs[1]);
        let mut back = Vec::new();
        Compression::Zstd
            .decoder(&outputs[0][..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn empty_gzip_is_valid() {
        let out = Compression::Gzip
            .encoder(Vec::new(), 2)
            .unwrap()
            .finish()
            .unwrap();
        let mut back = Vec::new();
        Compression::Gzip
            .decoder(&out[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back.is_empty());
        assert_eq!(&out[..2], &[0x1f, 0x8b]);
    }
}
