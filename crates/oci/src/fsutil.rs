//! Atomic file replacement: a temp file in a directory readers never look at, fsync, rename,
//! fsync the directory.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("syncing directory", dir))
}

/// `dir/STEM.PID.N`: unique among the threads and processes that may write into `dir`.
pub(crate) fn temp_name(dir: &Path, stem: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{stem}.{}.{n}", std::process::id()))
}

/// Replace `path` with what `write` produces, so that a reader sees either the old or the new
/// content. The temp file goes into `temp_dir`, which must be on the same file system.
pub(crate) fn write_atomic(
    path: &Path,
    temp_dir: &Path,
    write: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = temp_name(temp_dir, name);
    let result = (|| {
        let f = File::create(&tmp).map_err(Error::io("creating", &tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        write(&mut out)?;
        let f = out.into_inner().map_err(|e| Error::Io {
            op: "writing",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(Error::io("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(Error::io("renaming into place", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `write_atomic` of a few bytes.
pub(crate) fn write_atomic_bytes(path: &Path, temp_dir: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, temp_dir, &mut |out| {
        out.write_all(bytes).map_err(Error::io("writing", path))
    })
}

/// True if a process with this pid exists (on Linux, without a syscall wrapper: /proc).
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Bytes under `path`: a file's size, or the sum of a directory's files (not following links).
pub(crate) fn disk_bytes(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Remove a file or a directory tree.
pub(crate) fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    }
}
