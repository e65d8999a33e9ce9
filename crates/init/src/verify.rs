//! Proving the data is what the image promised, before the engine reads a byte.
//!
//! Order matters: image.json's own sha256 against BAKEDB_DATA_DIGEST first (nothing in it is
//! trusted before that), then the shape of the data directory with lstat only (missing,
//! added, symlinked or special files, sizes, modes: cheap, and a clear message), and last the
//! contents, hashed on every core in chunk-sized pieces with large sequential reads, the
//! next chunk already requested from the disk while one is hashed.
//!
//! A patched file (docs/patch-format.md) has two forms: as its layer stores it (`base`) and
//! composed (the entry's own size and digests). A `Pass` says which one a verification
//! expects: the stored form when the engine reads the patches itself, and for `"patches":
//! "apply"` the other files before composing, then the composed files after.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};

use crate::image::{Content, Description, FileEntry, hex};
use crate::profile::VERIFIED_STAMP;
use crate::regular::{self, kind};

/// Bytes per read: large enough for the disk to stream, small enough to stay in cache while
/// it is hashed (with 16 MiB reads, hashing 1.2 GB took 1.1 s of CPU instead of 0.7 s).
const READ_SIZE: usize = 1 << 20;

/// Bytes a worker asks the kernel to read ahead of the piece it hashes (POSIX_FADV_WILLNEED),
/// so that about one 16 MiB chunk per worker is on its way from the disk while the worker
/// hashes. Measured on a cold page cache (1.2 GB of MariaDB data, 2 cores, 5 interleaved
/// runs): the kernel's own read-ahead alone (POSIX_FADV_SEQUENTIAL, 8 MiB read_ahead_kb)
/// gave a median of 2.0 s and 1.0 s of kernel time, with this 1.2 s and 0.3 s. A warm cache
/// finds the pages present and the hint costs nothing measurable.
const PREFETCH: u64 = 16 << 20;

/// Why the data could not be verified: it differs from the promise (exit 3), or this user
/// may not read it (a setup problem, exit 1: nothing says the data was altered).
#[derive(Debug)]
pub enum Problem {
    Mismatch(String),
    Access(String),
}

impl From<String> for Problem {
    fn from(message: String) -> Self {
        Problem::Mismatch(message)
    }
}

pub fn io_problem(what: String, e: std::io::Error) -> Problem {
    if matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    ) {
        // The container's limits, not the data: a setup error, not "tampered".
        Problem::Access(format!("{what}: {e}"))
    } else if e.kind() == std::io::ErrorKind::PermissionDenied {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        Problem::Access(format!(
            "{what}: {e}, as uid {euid}; run the container as the data owner (the image's User) or as root"
        ))
    } else {
        Problem::Mismatch(format!("{what}: {e}"))
    }
}

/// What one verification pass checked: files and bytes hashed.
#[derive(Debug)]
pub struct Summary {
    pub files: usize,
    pub bytes: u64,
    pub threads: usize,
}

/// Which form of the patched files a pass expects. Files without patches are the same in
/// every pass (and the only kind an image from before patch layers has).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Every file as its layer stores it: a patched file against its `base`.
    Stored,
    /// Before composing: every file but the patched ones, whose size and contents are not
    /// looked at (a restart, or a start killed while composing, may have left them at any
    /// stage: composing again is idempotent, and the composed file is verified next).
    BeforeCompose,
    /// After composing: the patched files against their own (composed) size and digests;
    /// the others, already hashed, only by shape.
    Composed,
}

/// How one file is checked in a pass.
struct Expect<'a> {
    /// Size and digests to expect; None: the size is not checked (about to be composed).
    content: Option<&'a Content>,
    hash: bool,
    form: Form,
}

/// Which form of a file a message talks about.
#[derive(Clone, Copy)]
enum Form {
    Plain,
    /// The stored base of a patched file: its generation and number of patches.
    Base(u64, usize),
    /// A patched file after composing, and its number of patches.
    Composed(usize),
    /// A page index file, and its generation.
    Index(u64),
}

fn expect(f: &FileEntry, pass: Pass) -> Expect<'_> {
    let Some(base) = &f.base else {
        return Expect {
            content: Some(&f.content),
            hash: pass != Pass::Composed,
            form: Form::Plain,
        };
    };
    match pass {
        Pass::Stored => Expect {
            content: Some(&base.content),
            hash: true,
            form: Form::Base(base.generation, f.patches.len()),
        },
        Pass::BeforeCompose => Expect {
            content: None,
            hash: false,
            form: Form::Plain,
        },
        Pass::Composed => Expect {
            content: Some(&f.content),
            hash: true,
            form: Form::Composed(f.patches.len()),
        },
    }
}

/// Files, bytes and pieces a pass hashes (for --plan).
pub fn workload(desc: &Description, pass: Pass) -> (usize, u64, usize) {
    desc.files
        .iter()
        .map(|f| expect(f, pass))
        .filter(|e| e.hash)
        .filter_map(|e| e.content)
        .fold((0, 0, 0), |(files, bytes, pieces), c| {
            (files + 1, bytes + c.size, pieces + c.digests().len())
        })
}

/// Check every page index file against image.json: a regular file (opened as image.json is,
/// never blocking), of the listed size and sha256. Returns how many bytes were hashed.
pub fn check_page_index(desc: &Description, root: &Path) -> Result<u64, Problem> {
    let mut buf = vec![0u8; READ_SIZE];
    let mut bytes = 0;
    for index in &desc.page_index {
        let path = root.join(index.path.trim_start_matches('/'));
        let what = format!("the page index of generation {}", index.generation);
        let form = Form::Index(index.generation);
        let file = regular::open(&path, regular::Links::Refuse).map_err(|e| match e {
            regular::OpenError::Missing(_) => Problem::Mismatch(format!(
                "{} is missing: image.json lists it as {what}",
                path.display()
            )),
            regular::OpenError::Other(e) => io_problem(format!("opening {}", path.display()), e),
            refused => Problem::Mismatch(format!(
                "{} {refused}: image.json lists it as {what}",
                path.display()
            )),
        })?;
        let size = file
            .metadata()
            .map_err(|e| io_problem(path.display().to_string(), e))?
            .len();
        if size != index.size {
            return Err(Problem::Mismatch(format!(
                "{} has {size} bytes, image.json says {}{}: {}",
                path.display(),
                index.size,
                form.which(),
                form.cause()
            )));
        }
        let piece = Piece {
            file: 0,
            offset: 0,
            len: size,
            expected: index.sha256,
            chunk: 0,
            of: 1,
            form,
        };
        hash_piece(&piece, &(file, path), None, &[], &mut buf)?;
        bytes += size;
    }
    Ok(bytes)
}

/// Check image.json's bytes against BAKEDB_DATA_DIGEST (`sha256:<hex>`).
pub fn check_image_json(bytes: &[u8], expected: &str, shown_path: &Path) -> Result<(), String> {
    let want = expected
        .strip_prefix("sha256:")
        .and_then(crate::image::parse_hex32)
        .ok_or_else(|| {
            format!("BAKEDB_DATA_DIGEST={expected:?} is not sha256:<64 hex digits>; the image config sets it, do not override it")
        })?;
    let got: [u8; 32] = Sha256::digest(bytes).into();
    if got != want {
        return Err(format!(
            "{}: sha256 is sha256:{}, the image config promises {expected} (BAKEDB_DATA_DIGEST): the data description was replaced or altered",
            shown_path.display(),
            hex(&got)
        ));
    }
    Ok(())
}

/// Walk the data directory with lstat and compare it with the description: every entry must
/// be a listed regular file or a directory that holds listed files (or is listed in `dirs`).
/// Returns the (device, inode) of every listed file, in desc.files order.
fn check_shape(
    desc: &Description,
    data_dir: &Path,
    pass: Pass,
    skip_stamps: bool,
) -> Result<Vec<(u64, u64)>, Problem> {
    let top = fs::symlink_metadata(data_dir)
        .map_err(|e| io_problem(format!("data directory {}", data_dir.display()), e))?;
    if !top.is_dir() {
        return Err(Problem::Mismatch(format!(
            "data directory {} is {}, not a directory",
            data_dir.display(),
            kind(&top)
        )));
    }
    let mut allowed_dirs: BTreeSet<String> = desc.dirs.iter().cloned().collect();
    for f in &desc.files {
        let mut p = f.path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            allowed_dirs.insert(parent.to_owned());
            p = parent;
        }
    }
    let listed: BTreeSet<&str> = desc.files.iter().map(|f| f.path.as_str()).collect();
    let mut found: BTreeSet<String> = BTreeSet::new();
    let mut visited: BTreeSet<String> = BTreeSet::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            data_dir.to_owned()
        } else {
            data_dir.join(&rel)
        };
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| io_problem(format!("reading directory {}", dir.display()), e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| io_problem(format!("reading directory {}", dir.display()), e))?;
        names.sort();
        for name in names {
            let name = name.to_string_lossy();
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let path = data_dir.join(&child_rel);
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| io_problem(path.display().to_string(), e))?;
            let t = meta.file_type();
            if rel.is_empty()
                && skip_stamps
                && (name.starts_with(VERIFIED_STAMP) || name == crate::copy::MARKER)
            {
                // init's own stamp, written after a verification, or its copy's marker; not
                // data.
                continue;
            }
            if t.is_dir() && allowed_dirs.contains(&child_rel) {
                visited.insert(child_rel.clone());
                stack.push(child_rel);
            } else if t.is_file() && listed.contains(child_rel.as_str()) {
                found.insert(child_rel);
            } else if t.is_symlink() {
                let target = fs::read_link(&path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Err(Problem::Mismatch(format!(
                    "{} is a symbolic link (to {target}); the image has no links in its data",
                    path.display()
                )));
            } else if listed.contains(child_rel.as_str()) {
                return Err(Problem::Mismatch(format!(
                    "{} is {}; image.json lists a regular file there",
                    path.display(),
                    kind(&meta)
                )));
            } else if allowed_dirs.contains(&child_rel) {
                return Err(Problem::Mismatch(format!(
                    "{} is {}; image.json expects a directory there",
                    path.display(),
                    kind(&meta)
                )));
            } else {
                return Err(Problem::Mismatch(format!(
                    "{} is {} that image.json does not list: something was added to the data",
                    path.display(),
                    kind(&meta)
                )));
            }
        }
    }
    if let Some(missing) = desc.dirs.iter().find(|d| !visited.contains(*d)) {
        return Err(Problem::Mismatch(format!(
            "{} is missing: image.json lists it as a directory",
            data_dir.join(missing).display()
        )));
    }
    let mut identities = Vec::with_capacity(desc.files.len());
    for f in &desc.files {
        let path = data_dir.join(&f.path);
        if !found.contains(&f.path) {
            return Err(Problem::Mismatch(format!(
                "{} is missing: image.json lists it with {} bytes",
                path.display(),
                f.content.size
            )));
        }
        let meta =
            fs::symlink_metadata(&path).map_err(|e| io_problem(path.display().to_string(), e))?;
        let expected = expect(f, pass);
        if let Some(want) = expected.content.map(|c| c.size)
            && meta.len() != want
        {
            return Err(Problem::Mismatch(format!(
                "{} has {} bytes, image.json says {want}{}: the file was {}",
                path.display(),
                meta.len(),
                expected.form.which(),
                if meta.len() < want {
                    "truncated"
                } else {
                    "extended"
                }
            )));
        }
        if meta.mode() & 0o7777 != f.mode {
            return Err(Problem::Mismatch(format!(
                "{} has mode {:04o}, image.json says {:04o}",
                path.display(),
                meta.mode() & 0o7777,
                f.mode
            )));
        }
        identities.push((meta.dev(), meta.ino()));
    }
    Ok(identities)
}

/// One piece of work: a chunk of a file (or the whole file when it has a sha256).
struct Piece {
    file: usize,
    offset: u64,
    len: u64,
    expected: [u8; 32],
    /// 1-based chunk number, 0 for a whole file.
    chunk: usize,
    /// Chunks in the file.
    of: usize,
    form: Form,
}

impl Form {
    /// What a message adds after "image.json says …" for this form.
    fn which(self) -> String {
        match self {
            Form::Plain => String::new(),
            Form::Base(generation, n) => format!(
                " for the file as stored (the base of generation {generation}, before its {})",
                crate::plural(n, "patch")
            ),
            Form::Composed(n) => format!(
                " for the file composed with its {}",
                crate::plural(n, "patch")
            ),
            Form::Index(generation) => format!(" for the page index of generation {generation}"),
        }
    }

    /// Why the contents differ, as far as init can tell.
    fn cause(self) -> &'static str {
        match self {
            Form::Composed(_) => {
                "the file as stored was altered (its patches were verified before they were applied)"
            }
            Form::Index(_) => "the page index was altered",
            _ => "the contents were altered",
        }
    }
}

/// Verify the data files of the image rooted at `root` in the form `pass` expects; returns
/// what was hashed. `threads` 0 means one per core.
#[cfg(test)]
pub fn check_data(
    desc: &Description,
    root: &Path,
    threads: usize,
    pass: Pass,
) -> Result<Summary, Problem> {
    let data_dir = root.join(desc.data_dir.trim_start_matches('/'));
    check_dir(
        desc,
        &data_dir,
        threads,
        pass,
        None,
        desc.profile.verify_first_start,
    )
}

/// Verify the data files under `data_dir` (the image's data directory, or a copy of it) in
/// the form `pass` expects. With `copy_to`, every byte hashed is also written to the same
/// file and offset under that directory (empty: the tree is created here first), so the
/// copy is made by the one read that verifies it. `skip_stamps`: init's stamp and copy
/// marker at the top of `data_dir` are not data.
pub fn check_dir(
    desc: &Description,
    data_dir: &Path,
    threads: usize,
    pass: Pass,
    copy_to: Option<&Path>,
    skip_stamps: bool,
) -> Result<Summary, Problem> {
    // A copy holds every file whole, as stored; composing happens in the copy afterwards.
    debug_assert!(copy_to.is_none() || pass == Pass::Stored);
    let data_dir = data_dir.to_owned();
    let identities = check_shape(desc, &data_dir, pass, skip_stamps)?;

    let mut pieces = Vec::new();
    let (mut files, mut bytes) = (0, 0);
    for (i, f) in desc.files.iter().enumerate() {
        let expected = expect(f, pass);
        let Some(content) = expected.content.filter(|_| expected.hash) else {
            continue;
        };
        files += 1;
        bytes += content.size;
        if let Some(sha) = content.sha256 {
            pieces.push(Piece {
                file: i,
                offset: 0,
                len: content.size,
                expected: sha,
                chunk: 0,
                of: 1,
                form: expected.form,
            });
        } else {
            for (n, digest) in content.chunks.iter().enumerate() {
                let offset = n as u64 * desc.chunk_size;
                let len = desc.chunk_size.min(content.size - offset);
                pieces.push(Piece {
                    file: i,
                    offset,
                    len,
                    expected: *digest,
                    chunk: n + 1,
                    of: content.chunks.len(),
                    form: expected.form,
                });
            }
        }
    }
    // Sizes per file as this pass expects them (the hashed files all have one).
    let sizes: Vec<u64> = desc
        .files
        .iter()
        .map(|f| expect(f, pass).content.map_or(0, |c| c.size))
        .collect();
    if let Some(to) = copy_to {
        crate::copy::create_tree(desc, to, &sizes)?;
    }
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
    .min(pieces.len())
    .max(1);

    let stop = AtomicBool::new(false);
    // The first failing piece in list order, so the message does not depend on scheduling.
    let failure: Mutex<Option<(usize, Problem)>> = Mutex::new(None);
    // Each worker hashes one contiguous run of pieces through descriptors of its own: the
    // kernel's read-ahead follows each descriptor's sequential reads, which keeps a cold disk
    // streaming (pieces dealt round-robin through shared descriptors look random to it).
    // The runs are split by bytes, not by piece count: a PostgreSQL cluster is a thousand
    // small catalog files and a few 1 GiB table segments, and an even count put nearly all
    // the bytes on one worker (measured: 842 MB/s on two threads instead of about twice that).
    let bounds = split_by_bytes(&pieces, threads);
    let work = |worker: usize| {
        let range = bounds[worker]..bounds[worker + 1];
        let mut buf = vec![0u8; READ_SIZE];
        let mut own: Option<(usize, (File, PathBuf))> = None;
        let mut target: Option<(File, PathBuf)> = None;
        // How far into the open file the kernel was asked to read ahead.
        let mut requested = 0;
        for index in range {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let piece = &pieces[index];
            if own.as_ref().is_none_or(|(f, _)| *f != piece.file) {
                let f = &desc.files[piece.file];
                let opened = open_checked(
                    &data_dir.join(&f.path),
                    sizes[piece.file],
                    identities[piece.file],
                )
                .and_then(|handle| {
                    target = copy_to
                        .map(|to| crate::copy::open_target(&to.join(&f.path)))
                        .transpose()?;
                    Ok(handle)
                });
                match opened {
                    Ok(handle) => {
                        own = Some((piece.file, handle));
                        requested = piece.offset;
                    }
                    Err(problem) => {
                        fail(&stop, &failure, index, problem);
                        return;
                    }
                }
            }
            let handle = &own.as_ref().expect("opened above").1;
            if let Some((from, to)) = prefetch_range(piece, sizes[piece.file], requested) {
                prefetch(&handle.0, from, to);
                requested = to;
            }
            if let Err(problem) = hash_piece(piece, handle, target.as_ref(), &sizes, &mut buf) {
                fail(&stop, &failure, index, problem);
                return;
            }
        }
    };
    std::thread::scope(|scope| {
        let work = &work;
        for worker in 1..threads {
            // Each worker holds one read buffer on the heap; its stack stays small.
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn_scoped(scope, move || {
                    block_all_signals();
                    work(worker)
                })
                .expect("spawning a verification thread");
        }
        work(0);
    });
    if let Some((_, message)) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(message);
    }
    if let Some(to) = copy_to {
        crate::copy::set_modes(desc, &data_dir, to)?;
    }
    Ok(Summary {
        files,
        bytes,
        threads: if pieces.is_empty() { 0 } else { threads },
    })
}

fn fail(
    stop: &AtomicBool,
    failure: &Mutex<Option<(usize, Problem)>>,
    index: usize,
    problem: Problem,
) {
    stop.store(true, Ordering::Relaxed);
    let mut slot = failure.lock().unwrap_or_else(|e| e.into_inner());
    if slot.as_ref().is_none_or(|(i, _)| index < *i) {
        *slot = Some((index, problem));
    }
}

/// A second descriptor for a file already checked, proved to be the same inode.
/// `threads + 1` indices into `pieces`: worker w hashes pieces[bounds[w]..bounds[w + 1]], a
/// contiguous run holding about 1/threads of the bytes.
fn split_by_bytes(pieces: &[Piece], threads: usize) -> Vec<usize> {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    let mut bounds = vec![0];
    let mut before = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        // A piece goes to the worker whose share its first byte falls in.
        while bounds.len() < threads && before * threads as u64 >= total * bounds.len() as u64 {
            bounds.push(i);
        }
        before += p.len;
    }
    bounds.resize(threads + 1, pieces.len());
    bounds
}

/// The bytes of a file of `size` to ask the kernel for before hashing `piece`, when
/// `requested` bytes of it were asked for already: the rest of the piece and PREFETCH beyond
/// it, within the file. None when all of that was asked for.
fn prefetch_range(piece: &Piece, size: u64, requested: u64) -> Option<(u64, u64)> {
    let from = requested.max(piece.offset);
    let to = (piece.offset + piece.len)
        .saturating_add(PREFETCH)
        .min(size);
    (from < to).then_some((from, to))
}

/// Ask the kernel to start reading `from..to` of `file` into the page cache, without waiting
/// for it. A hint: its failure changes nothing but speed, so it is not reported.
fn prefetch(file: &File, from: u64, to: u64) {
    let (Ok(offset), Ok(len)) = (
        libc::off_t::try_from(from),
        libc::off_t::try_from(to - from),
    ) else {
        return;
    };
    // SAFETY: a valid open descriptor; POSIX_FADV_WILLNEED only starts reads into the page
    // cache, it changes neither the file nor the descriptor's offset.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(file),
            offset,
            len,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

/// Keep process-directed signals away from a hashing thread. std's scope returns when the
/// closures are done, not when the threads are gone, so a worker can outlive verification by
/// a moment; a SIGCHLD delivered to it then (SIG_DFL: discarded) would never reach the
/// supervisor's sigwaitinfo, and it would wait forever for a child that is already reaped.
/// Seen once in CI with `sh -c "exit 9"`.
fn block_all_signals() {
    // SAFETY: an initialised, filled set; changes only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Open a data file for hashing: still the regular file of the size and inode the shape
/// check saw. Opened per worker and file run rather than all at once up front: a cluster
/// has thousands of files and a container may allow 1024 descriptors.
fn open_checked(
    path: &Path,
    size: u64,
    (dev, ino): (u64, u64),
) -> Result<(File, PathBuf), Problem> {
    let again = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_problem(format!("opening {}", path.display()), e))?;
    let meta = again
        .metadata()
        .map_err(|e| io_problem(path.display().to_string(), e))?;
    if (meta.dev(), meta.ino()) != (dev, ino) || !meta.is_file() || meta.len() != size {
        return Err(Problem::Mismatch(format!(
            "{} was replaced while it was being checked",
            path.display()
        )));
    }
    // SAFETY: a valid open descriptor; posix_fadvise only sets a hint (a larger read-ahead
    // window for sequential reads).
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&again),
            0,
            0,
            libc::POSIX_FADV_SEQUENTIAL,
        )
    };
    Ok((again, path.to_owned()))
}

/// Hash one piece and compare; `sizes` are the expected sizes of the files, by index (for
/// the message when a file ends early), and `chunks` in a message is taken from them. With
/// `target`, every byte read is also written there at the same offset (a copy).
fn hash_piece(
    piece: &Piece,
    (file, path): &(File, PathBuf),
    target: Option<&(File, PathBuf)>,
    sizes: &[u64],
    buf: &mut [u8],
) -> Result<(), Problem> {
    let mut hasher = Sha256::new();
    let end = piece.offset + piece.len;
    let mut offset = piece.offset;
    while offset < end {
        let want = buf.len().min((end - offset) as usize);
        let n = match file.read_at(&mut buf[..want], offset) {
            Ok(0) => {
                return Err(Problem::Mismatch(format!(
                    "{} ended at byte {offset} while being read, image.json says {} bytes",
                    path.display(),
                    sizes
                        .get(piece.file)
                        .copied()
                        .unwrap_or(piece.offset + piece.len)
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(io_problem(
                    format!("reading {} at byte {offset}", path.display()),
                    e,
                ));
            }
        };
        hasher.update(&buf[..n]);
        if let Some((copy, copy_path)) = target {
            copy.write_all_at(&buf[..n], offset).map_err(|e| {
                Problem::Access(format!(
                    "writing {} at byte {offset}: {e}{}",
                    copy_path.display(),
                    if e.raw_os_error() == Some(libc::ENOSPC) {
                        "; the copy directory needs room for the whole data (and what the engine writes)"
                    } else {
                        ""
                    }
                ))
            })?;
        }
        offset += n as u64;
    }
    let got: [u8; 32] = hasher.finalize().into();
    if got == piece.expected {
        return Ok(());
    }
    let (which, cause) = (piece.form.which(), piece.form.cause());
    Err(Problem::Mismatch(if piece.chunk == 0 {
        format!(
            "{}: sha256 is {}, image.json says {}{which}: {cause}",
            path.display(),
            hex(&got),
            hex(&piece.expected)
        )
    } else {
        format!(
            "{}: bytes {}..{} (chunk {} of {}) have sha256 {}, image.json says {}{which}: {cause}",
            path.display(),
            piece.offset,
            end,
            piece.chunk,
            piece.of,
            hex(&got),
            hex(&piece.expected)
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image;
    use std::os::unix::fs::PermissionsExt;

    /// A data dir and its image.json, written the way bakedb build does, with tiny chunks.
    struct Fixture {
        root: PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    const CHUNK: u64 = 1000;

    fn fixture(name: &str) -> (Fixture, Description) {
        let root =
            std::env::temp_dir().join(format!("bakedb-init-verify-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let data = root.join("var/lib/bakedb");
        fs::create_dir_all(data.join("sub")).unwrap();
        let small: Vec<u8> = (0..700u32).map(|i| (i * 7) as u8).collect();
        let big: Vec<u8> = (0..4500u32).map(|i| (i * 13 / 7) as u8).collect();
        fs::write(data.join("small.db"), &small).unwrap();
        fs::write(data.join("sub/big.db"), &big).unwrap();
        let chunks: Vec<String> = big
            .chunks(CHUNK as usize)
            .map(|c| format!("{:?}", hex(&Sha256::digest(c))))
            .collect();
        let text = format!(
            r#"{{"schema": 1, "engine": "sqlite", "data_dir": "/var/lib/bakedb", "chunk_size": {CHUNK},
               "owner": {{"uid": 1, "gid": 1}},
               "files": [{{"path": "small.db", "size": 700, "mode": "0644", "sha256": "{}"}},
                         {{"path": "sub/big.db", "size": 4500, "mode": "0644", "chunks": [{}]}}]}}"#,
            hex(&Sha256::digest(&small)),
            chunks.join(",")
        );
        for f in ["small.db", "sub/big.db"] {
            fs::set_permissions(
                data.join(f),
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )
            .unwrap();
        }
        let desc = image::parse(text.as_bytes()).unwrap();
        (Fixture { root }, desc)
    }

    fn check(fx: &Fixture, desc: &Description) -> Result<Summary, String> {
        check_data(desc, &fx.root, 3, Pass::Stored).map_err(|p| match p {
            Problem::Mismatch(m) => m,
            Problem::Access(m) => panic!("not a mismatch: {m}"),
        })
    }

    #[test]
    fn untouched_data_passes_on_any_thread_count() {
        let (fx, desc) = fixture("ok");
        for threads in [1, 2, 8] {
            let s = check_data(&desc, &fx.root, threads, Pass::Stored).unwrap();
            assert_eq!((s.files, s.bytes), (2, 5200));
            assert!(s.threads <= 6);
        }
    }

    #[test]
    fn runs_are_split_by_bytes() {
        let piece = |len| Piece {
            file: 0,
            offset: 0,
            len,
            expected: [0; 32],
            chunk: 0,
            of: 1,
            form: Form::Plain,
        };
        // Many small files first, then the big ones: an even split by count would give
        // worker 0 almost nothing.
        let mut pieces: Vec<Piece> = (0..100).map(|_| piece(10)).collect();
        pieces.extend((0..4).map(|_| piece(1000)));
        let b = split_by_bytes(&pieces, 2);
        assert_eq!(b.len(), 3);
        assert_eq!((b[0], b[2]), (0, pieces.len()));
        let bytes = |r: std::ops::Range<usize>| pieces[r].iter().map(|p| p.len).sum::<u64>();
        let (w0, w1) = (bytes(b[0]..b[1]), bytes(b[1]..b[2]));
        assert!(w0.abs_diff(w1) <= 1000, "{w0} vs {w1}");
        // Every piece exactly once, in order, for any thread count.
        for threads in 1..8 {
            let b = split_by_bytes(&pieces, threads);
            assert_eq!(b.len(), threads + 1);
            assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
            assert_eq!((b[0], b[threads]), (0, pieces.len()));
        }
        assert_eq!(split_by_bytes(&[piece(0)], 1), vec![0, 1]);
    }

    /// The hints a worker gives while it hashes a run of pieces of one file: each asks for
    /// bytes not asked for yet, the first covers its own piece, every piece is asked for
    /// before it is read, and nothing past the end of the file is.
    #[test]
    fn prefetch_runs_ahead_of_each_piece_and_stays_in_the_file() {
        let chunk = 16 << 20;
        let size = 5 * chunk - 123;
        let piece = |n: u64| Piece {
            file: 0,
            offset: n * chunk,
            len: chunk.min(size - n * chunk),
            expected: [0; 32],
            chunk: n as usize + 1,
            of: 5,
            form: Form::Plain,
        };
        // A run that starts in the middle of the file (its first pieces went to another
        // worker).
        let mut requested = 2 * chunk;
        let mut hints = Vec::new();
        for n in 2..5 {
            let p = piece(n);
            if let Some((from, to)) = prefetch_range(&p, size, requested) {
                assert_eq!(from, requested.max(p.offset), "piece {n}");
                assert!(to >= p.offset + p.len && to <= size, "piece {n}: {to}");
                requested = to;
                hints.push((from, to));
            }
            assert!(
                requested >= p.offset + p.len,
                "piece {n} read before it was asked for"
            );
        }
        assert_eq!(
            hints,
            [
                (2 * chunk, 3 * chunk + PREFETCH),
                (3 * chunk + PREFETCH, size)
            ],
            "the last piece finds the end of the file asked for already"
        );
        // A whole small file in one piece: the file, no more.
        let whole = Piece {
            len: 700,
            offset: 0,
            ..piece(0)
        };
        assert_eq!(prefetch_range(&whole, 700, 0), Some((0, 700)));
    }

    #[test]
    fn listed_empty_dirs_must_exist_and_the_stamp_is_ignored_only_for_first_start() {
        let (fx, mut desc) = fixture("dirs");
        let data = fx.root.join("var/lib/bakedb");
        desc.dirs = vec!["empty".into()];
        let e = check(&fx, &desc).unwrap_err();
        assert!(
            e.contains("empty is missing: image.json lists it as a directory"),
            "{e}"
        );
        fs::create_dir(data.join("empty")).unwrap();
        check(&fx, &desc).unwrap();

        fs::write(data.join(VERIFIED_STAMP), "sha256:x\n").unwrap();
        let e = check(&fx, &desc).unwrap_err();
        assert!(
            e.contains("does not list"),
            "an every-start profile has no stamp: {e}"
        );
        desc.profile.verify_first_start = true;
        check(&fx, &desc).unwrap();
        // Only at the top: the same name deeper down is data that was added.
        fs::write(data.join("empty").join(VERIFIED_STAMP), "x").unwrap();
        let e = check(&fx, &desc).unwrap_err();
        assert!(e.contains("does not list"), "{e}");
    }

    /// Invert one byte of `path` at `offset`.
    fn flip(path: &Path, offset: u64) {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, offset).unwrap();
        f.write_at(&[!byte[0]], offset).unwrap();
    }

    #[test]
    fn each_kind_of_tampering_is_named() {
        type Tamper<'a> = &'a dyn Fn(&Path);
        let cases: &[(&str, Tamper, &str)] = &[
            (
                "flip",
                &|d| flip(&d.join("sub/big.db"), 2500),
                "sub/big.db: bytes 2000..3000 (chunk 3 of 5) have sha256",
            ),
            (
                "flipfirst",
                &|d| flip(&d.join("sub/big.db"), 0),
                "sub/big.db: bytes 0..1000 (chunk 1 of 5) have sha256",
            ),
            (
                "fliplast",
                &|d| flip(&d.join("sub/big.db"), 4499),
                "sub/big.db: bytes 4000..4500 (chunk 5 of 5) have sha256",
            ),
            (
                "flipsmall",
                &|d| flip(&d.join("small.db"), 0),
                "small.db: sha256 is",
            ),
            (
                "truncate",
                &|d| {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(d.join("small.db"))
                        .unwrap()
                        .set_len(10)
                        .unwrap();
                },
                "small.db has 10 bytes, image.json says 700: the file was truncated",
            ),
            (
                "add",
                &|d| fs::write(d.join("extra"), b"x").unwrap(),
                "extra is a regular file that image.json does not list",
            ),
            (
                "adddir",
                &|d| fs::create_dir(d.join("newdir")).unwrap(),
                "newdir is a directory that image.json does not list",
            ),
            (
                "delete",
                &|d| fs::remove_file(d.join("sub/big.db")).unwrap(),
                "sub/big.db is missing",
            ),
            (
                "symlink",
                &|d| {
                    fs::remove_file(d.join("small.db")).unwrap();
                    std::os::unix::fs::symlink("/etc/passwd", d.join("small.db")).unwrap();
                },
                "small.db is a symbolic link (to /etc/passwd)",
            ),
            (
                "dirlink",
                &|d| {
                    fs::rename(d.join("sub"), d.join("../elsewhere")).unwrap();
                    std::os::unix::fs::symlink("../elsewhere", d.join("sub")).unwrap();
                },
                "sub is a symbolic link",
            ),
            (
                "fifo",
                &|d| {
                    fs::remove_file(d.join("small.db")).unwrap();
                    let c =
                        std::ffi::CString::new(d.join("small.db").as_os_str().as_encoded_bytes())
                            .unwrap();
                    // SAFETY: a valid NUL-terminated path.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
                },
                "small.db is a FIFO; image.json lists a regular file there",
            ),
            (
                "chmod",
                &|d| {
                    fs::set_permissions(
                        d.join("small.db"),
                        std::os::unix::fs::PermissionsExt::from_mode(0o666),
                    )
                    .unwrap();
                },
                "small.db has mode 0666, image.json says 0644",
            ),
        ];
        for (name, tamper, message) in cases {
            let (fx, desc) = fixture(name);
            tamper(&fx.root.join("var/lib/bakedb"));
            let err = match check(&fx, &desc) {
                Ok(_) => panic!("{name}: tampering went unnoticed"),
                Err(e) => e,
            };
            assert!(
                err.contains(message),
                "{name}: {err:?} should contain {message:?}"
            );
        }
    }

    /// Every file under `dir` (relative path, mode, bytes), sorted.
    fn tree(dir: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
        let mut found = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(dir).unwrap().to_owned();
                if meta.is_dir() {
                    found.push((rel, meta.mode() & 0o7777, Vec::new()));
                    todo.push(path);
                } else {
                    found.push((rel, meta.mode() & 0o7777, fs::read(&path).unwrap()));
                }
            }
        }
        found.sort();
        found
    }

    /// BAKEDB_DATA_COPY_DIR: the copy is written by the read that verifies, each worker
    /// writing the chunks it hashed at their offsets; on any thread count (chunks of one
    /// file split across workers) it is the data byte for byte, and, once `set_modes` ran,
    /// mode for mode.
    #[test]
    fn the_copy_made_while_verifying_is_the_data_on_any_thread_count() {
        let (fx, desc) = fixture("copy");
        let data = fx.root.join("var/lib/bakedb");
        fs::set_permissions(data.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(data.join("small.db"), fs::Permissions::from_mode(0o600)).unwrap();
        let mut desc = desc;
        desc.files[0].mode = 0o600;
        let original = tree(&data);
        for threads in [1, 2, 3, 8] {
            let copy = fx.root.join(format!("copy-{threads}"));
            fs::create_dir(&copy).unwrap();
            let s = check_dir(&desc, &data, threads, Pass::Stored, Some(&copy), false).unwrap();
            assert_eq!((s.files, s.bytes), (2, 5200));
            crate::copy::set_modes(&desc, &data, &copy).unwrap();
            assert_eq!(tree(&copy), original, "{threads} threads");
            // The copy verifies as data in its own right.
            check_dir(&desc, &copy, threads, Pass::Stored, None, false).unwrap();
        }
        assert_eq!(tree(&data), original, "the image's data was changed");
    }

    #[test]
    fn a_copy_of_tampered_data_fails_as_the_data_does() {
        let (fx, desc) = fixture("copybad");
        let data = fx.root.join("var/lib/bakedb");
        fs::OpenOptions::new()
            .write(true)
            .open(data.join("sub/big.db"))
            .unwrap()
            .write_at(b"\xff", 4100)
            .unwrap();
        let copy = fx.root.join("copy");
        fs::create_dir(&copy).unwrap();
        match check_dir(&desc, &data, 2, Pass::Stored, Some(&copy), false) {
            Err(Problem::Mismatch(m)) => assert!(
                m.contains("sub/big.db: bytes 4000..4500 (chunk 5 of 5) have sha256"),
                "{m}"
            ),
            Err(Problem::Access(m)) => panic!("not a mismatch: {m}"),
            Ok(_) => panic!("tampering went unnoticed while copying"),
        }
        // The copy's tree is laid out before the data is read: a second copy into the same
        // directory does not overwrite it (init clears an unfinished copy first).
        match check_dir(&desc, &data, 2, Pass::Stored, Some(&copy), false) {
            Err(Problem::Access(m)) => assert!(m.contains("File exists"), "{m}"),
            other => panic!(
                "copied over an existing tree: {:?}",
                other.err().map(|_| ())
            ),
        }
    }

    #[test]
    fn image_json_digest_is_checked_first() {
        let bytes = b"{}";
        let good = format!("sha256:{}", hex(&Sha256::digest(bytes)));
        check_image_json(bytes, &good, Path::new("/etc/bakedb/image.json")).unwrap();
        let err = check_image_json(b"{ }", &good, Path::new("/etc/bakedb/image.json")).unwrap_err();
        assert!(
            err.contains("the data description was replaced or altered"),
            "{err}"
        );
        let err = check_image_json(bytes, "md5:abc", Path::new("x")).unwrap_err();
        assert!(err.contains("is not sha256:<64 hex digits>"), "{err}");
    }
}
