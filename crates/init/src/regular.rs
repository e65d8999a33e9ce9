//! Opening files that init does not control (image.json, /etc/passwd, the first-start stamp)
//! so that nothing put in their place can make it block or read without end.
//!
//! `open(2)` of a FIFO for reading waits for a writer, forever in a container; a device may
//! act on open or never end. So the path is lstat'ed (or stat'ed, where a link is normal)
//! first and only a regular file is opened, with O_NONBLOCK (a FIFO swapped in after the
//! check opens at once instead of waiting) and O_NOFOLLOW where links are not expected; then
//! fstat on the descriptor must show the same regular file. Only then is it read, at most
//! `max_bytes`. The data files are opened the same way by `verify::open_checked`.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Whether the last component of the path may be a symbolic link.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// image.json, the stamp: bakedb writes them as regular files, a link means tampering.
    Refuse,
    /// /etc/passwd belongs to the base image, where a link is unusual but legitimate.
    Follow,
}

#[derive(Debug)]
pub enum OpenError {
    /// Nothing at the path (ENOENT or ENOTDIR).
    Missing(io::Error),
    /// Something other than a regular file: "a FIFO", "a symbolic link (to /x)", ...
    NotRegular(String),
    /// A regular file larger than the caller reads: its size.
    TooBig(u64),
    /// Any other failure to stat, open or read (permissions, I/O).
    Other(io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Missing(e) | OpenError::Other(e) => write!(f, "{e}"),
            OpenError::NotRegular(kind) => write!(f, "is {kind}, not a regular file"),
            OpenError::TooBig(size) => write!(f, "has {size} bytes, more than init reads"),
        }
    }
}

fn classify(e: io::Error) -> OpenError {
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) {
        OpenError::Missing(e)
    } else {
        OpenError::Other(e)
    }
}

/// What a non-regular file is, for messages.
pub fn kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a regular file"
    }
}

fn describe(path: &Path, meta: &fs::Metadata) -> String {
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        format!("a symbolic link (to {target})")
    } else {
        kind(meta).to_owned()
    }
}

/// Open `path` for reading if, and only if, it is a regular file; never blocks.
pub fn open(path: &Path, links: Links) -> Result<File, OpenError> {
    let before = match links {
        Links::Refuse => fs::symlink_metadata(path),
        Links::Follow => fs::metadata(path),
    }
    .map_err(classify)?;
    if !before.is_file() {
        return Err(OpenError::NotRegular(describe(path, &before)));
    }
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            // ELOOP from O_NOFOLLOW: the file became a link after the lstat.
            match fs::symlink_metadata(path) {
                Ok(m) if !m.is_file() => OpenError::NotRegular(describe(path, &m)),
                _ => classify(e),
            }
        })?;
    let after = file.metadata().map_err(OpenError::Other)?;
    if !after.is_file() || (after.dev(), after.ino()) != (before.dev(), before.ino()) {
        return Err(OpenError::NotRegular(format!(
            "{} swapped in while it was being opened",
            kind(&after)
        )));
    }
    Ok(file)
}

/// The contents of the regular file at `path`, if it has at most `max_bytes`.
pub fn read(path: &Path, links: Links, max_bytes: u64) -> Result<Vec<u8>, OpenError> {
    let file = open(path, links)?;
    let size = file.metadata().map_err(OpenError::Other)?.len();
    if size > max_bytes {
        return Err(OpenError::TooBig(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // One byte more than allowed: a file that grows while read is still bounded.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(OpenError::Other)?;
    if bytes.len() as u64 > max_bytes {
        return Err(OpenError::TooBig(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn only_regular_files_are_read_and_nothing_blocks() {
        let dir = std::env::temp_dir().join(format!("bakedb-init-regular-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("plain"), b"hello").unwrap();
        mkfifo(&dir.join("fifo"));
        std::os::unix::fs::symlink("plain", dir.join("link")).unwrap();
        std::os::unix::fs::symlink("fifo", dir.join("link-to-fifo")).unwrap();
        fs::create_dir(dir.join("dir")).unwrap();

        assert_eq!(
            read(&dir.join("plain"), Links::Refuse, 5).unwrap(),
            b"hello"
        );
        assert_eq!(read(&dir.join("link"), Links::Follow, 5).unwrap(), b"hello");
        let not_regular = |name: &str, links| match read(&dir.join(name), links, 100) {
            Err(OpenError::NotRegular(kind)) => kind,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(not_regular("fifo", Links::Refuse), "a FIFO");
        assert_eq!(not_regular("fifo", Links::Follow), "a FIFO");
        assert_eq!(not_regular("link-to-fifo", Links::Follow), "a FIFO");
        assert_eq!(
            not_regular("link", Links::Refuse),
            "a symbolic link (to plain)"
        );
        assert_eq!(not_regular("dir", Links::Refuse), "a directory");
        assert_eq!(
            not_regular("/dev/null", Links::Follow),
            "a character device"
        );
        assert!(matches!(
            read(&dir.join("plain"), Links::Refuse, 4),
            Err(OpenError::TooBig(5))
        ));
        assert!(matches!(
            read(&dir.join("absent"), Links::Refuse, 4),
            Err(OpenError::Missing(_))
        ));
        assert!(matches!(
            read(&dir.join("plain/below"), Links::Refuse, 4),
            Err(OpenError::Missing(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
