//! Atomic file replacement: temp file in the same directory, fsync, rename, fsync the directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("syncing directory", dir))
}

pub(crate) fn temp_name(dir: &Path, stem: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("tmp.{stem}.{}.{n}", std::process::id()))
}

/// Replace `path` with `bytes` so that a reader sees either the old or the new content.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = temp_name(dir, name);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(Error::io("creating", &tmp))?;
        f.write_all(bytes).map_err(Error::io("writing", &tmp))?;
        f.sync_all().map_err(Error::io("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(Error::io("renaming into place", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Remove files in `dir` whose names start with `prefix` (temp files of killed writers).
pub(crate) fn remove_temp_files(dir: &Path, prefix: &str) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix)
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// True if a process with this pid exists (on Linux, without a syscall wrapper: /proc).
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
