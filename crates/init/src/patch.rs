//! Patch files (docs/patch-format.md): their header read strictly, and a patched file composed
//! in place from its base for engines that read their files themselves (`"patches": "apply"`).
//!
//! Every patch is checked (magic, version, page size, composed length, page numbers, the file's
//! length) before anything is written, so a bad patch leaves every data file as its layer
//! stored it. Composing is idempotent from any state a previous start left behind (the base,
//! the composed file, or a start killed half-way): each patch sets the length it needs and
//! rewrites every page it holds, so the result depends only on the pages of the file no patch
//! writes, which no patch's truncation below them touched either. That is what makes a crash
//! between composing and the first-start stamp harmless: the next start composes again.
//! Patches are read in fixed batches (one 1 MiB buffer), never whole.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::image::{Description, FileEntry, hex};
use crate::regular::{self, kind};
use crate::verify::{Problem, io_problem};

pub const MAGIC: &[u8; 8] = b"BKDBPTCH";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
const MIN_PAGE_SIZE: u64 = 512;
const MAX_PAGE_SIZE: u64 = 65536;
/// Bytes of page data per batch: 16 pages of the largest page size.
const BATCH_BYTES: usize = 1 << 20;

/// The fixed header of a patch file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub page_size: u64,
    /// The composed file's length after this patch.
    pub length: u64,
    /// Pages in the patch.
    pub count: u64,
    /// SHA-256 of the concatenated chunk digests of the composed file.
    pub composed_digest: [u8; 32],
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Read the header of a patch file of `file_len` bytes; every field is checked, and the
    /// file must be exactly as long as the header says (64 + 8C + C·P).
    pub fn parse(bytes: &[u8; HEADER_LEN as usize], file_len: u64) -> Result<Header, String> {
        if &bytes[..8] != MAGIC {
            return Err("it does not start with BKDBPTCH".into());
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(format!(
                "it is version {version} of the format, this bakedb-init reads version {VERSION}"
            ));
        }
        let page_size = u64::from(u32_at(bytes, 12));
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(format!(
                "its page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
            ));
        }
        let length = u64_at(bytes, 16);
        if !length.is_multiple_of(page_size) {
            return Err(format!(
                "its composed length {length} is not a multiple of its page size {page_size}"
            ));
        }
        let count = u64_at(bytes, 24);
        if count > length / page_size {
            return Err(format!(
                "it holds {count} pages, the composed file has only {}",
                length / page_size
            ));
        }
        // count ≤ length / page_size, so this cannot overflow for any length below 2^64.
        let expected = count
            .checked_mul(8 + page_size)
            .and_then(|n| n.checked_add(HEADER_LEN));
        if expected != Some(file_len) {
            return Err(format!(
                "it has {file_len} bytes, its header says 64 + 8 × {count} + {count} × {page_size}"
            ));
        }
        Ok(Header {
            page_size,
            length,
            count,
            composed_digest: bytes[32..64].try_into().expect("32 bytes"),
        })
    }

    fn data_offset(&self) -> u64 {
        HEADER_LEN + 8 * self.count
    }
}

/// An open, checked patch file.
#[derive(Debug)]
pub struct Patch {
    pub path: PathBuf,
    file: File,
    pub header: Header,
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> Problem {
    Problem::Mismatch(format!(
        "{} is not a valid patch file (docs/patch-format.md): {why}",
        path.display()
    ))
}

impl Patch {
    /// Open the patch at `path`, listed in image.json with `size` bytes, and check its header
    /// and every page number; `buf` is scratch space.
    pub fn open(path: &Path, size: u64, buf: &mut Vec<u8>) -> Result<Patch, Problem> {
        let file = regular::open(path, regular::Links::Refuse).map_err(|e| match e {
            regular::OpenError::Missing(e) | regular::OpenError::Other(e) => {
                io_problem(format!("opening {}", path.display()), e)
            }
            refused => Problem::Mismatch(format!("{} {refused}", path.display())),
        })?;
        let file_len = file
            .metadata()
            .map_err(|e| io_problem(path.display().to_string(), e))?
            .len();
        if file_len != size {
            return Err(Problem::Mismatch(format!(
                "{} has {file_len} bytes, image.json says {size}: the patch was replaced",
                path.display()
            )));
        }
        let mut bytes = [0u8; HEADER_LEN as usize];
        if file_len < HEADER_LEN {
            return Err(invalid(
                path,
                format!("it has {file_len} bytes, less than the 64 of a header"),
            ));
        }
        read_at(&file, path, &mut bytes, 0)?;
        let header = Header::parse(&bytes, file_len).map_err(|why| invalid(path, why))?;
        let patch = Patch {
            path: path.to_owned(),
            file,
            header,
        };
        patch.each_batch(buf, false, |_, _| Ok(()))?;
        Ok(patch)
    }

    /// Call `visit(page numbers, their bytes)` batch by batch, in page order, checking that
    /// the numbers increase strictly and stay below the composed file's page count. Without
    /// `with_data` only the numbers are read (and the slice of bytes is empty).
    fn each_batch(
        &self,
        buf: &mut Vec<u8>,
        with_data: bool,
        mut visit: impl FnMut(&[u64], &[u8]) -> Result<(), Problem>,
    ) -> Result<(), Problem> {
        let Header {
            page_size,
            length,
            count,
            ..
        } = self.header;
        let pages_total = length / page_size;
        let per_batch = (BATCH_BYTES as u64 / page_size) as usize;
        buf.resize(BATCH_BYTES, 0);
        let mut raw = vec![0u8; per_batch * 8];
        let mut numbers = Vec::with_capacity(per_batch);
        let mut next_allowed = 0u64;
        let mut first = 0u64;
        while first < count {
            let n = per_batch.min((count - first) as usize);
            read_at(
                &self.file,
                &self.path,
                &mut raw[..n * 8],
                HEADER_LEN + 8 * first,
            )?;
            numbers.clear();
            for (i, b) in raw[..n * 8].chunks_exact(8).enumerate() {
                let page = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                if page < next_allowed || page >= pages_total {
                    return Err(invalid(
                        &self.path,
                        format!(
                            "page number {page} (entry {} of {count}) is {}",
                            first + i as u64,
                            if page >= pages_total {
                                format!("not below the composed file's {pages_total} pages")
                            } else {
                                "not above the one before it".into()
                            }
                        ),
                    ));
                }
                next_allowed = page + 1;
                numbers.push(page);
            }
            let data = if with_data {
                let data = &mut buf[..n * page_size as usize];
                read_at(
                    &self.file,
                    &self.path,
                    data,
                    self.header.data_offset() + first * page_size,
                )?;
                &buf[..n * page_size as usize]
            } else {
                &buf[..0]
            };
            visit(&numbers, data)?;
            first += n as u64;
        }
        Ok(())
    }

    /// Apply this patch to `target` (`shown` in messages): set its length, write its pages.
    /// Runs of consecutive pages are one write each.
    fn apply(&self, target: &File, shown: &Path, buf: &mut Vec<u8>) -> Result<(), Problem> {
        target
            .set_len(self.header.length)
            .map_err(|e| write_problem(format!("setting the length of {}", shown.display()), e))?;
        let page_size = self.header.page_size;
        self.each_batch(buf, true, |numbers, data| {
            let mut i = 0;
            while i < numbers.len() {
                let mut j = i + 1;
                while j < numbers.len() && numbers[j] == numbers[j - 1] + 1 {
                    j += 1;
                }
                let bytes = &data[i * page_size as usize..j * page_size as usize];
                target
                    .write_all_at(bytes, numbers[i] * page_size)
                    .map_err(|e| write_problem(format!("writing {}", shown.display()), e))?;
                i = j;
            }
            Ok(())
        })
    }
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), Problem> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Problem::Mismatch(format!(
                "{} ended before byte {} while being read: it was replaced",
                path.display(),
                offset + buf.len() as u64
            ))
        } else {
            io_problem(format!("reading {} at byte {offset}", path.display()), e)
        }
    })
}

/// Writing a data file fails only for reasons of the container, never because the data was
/// altered: a setup problem (exit 1), with what to change.
fn write_problem(what: String, e: std::io::Error) -> Problem {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let advice = match e.raw_os_error() {
        Some(libc::EROFS) => {
            // A volume mounted over the data directory would hide the data: the copy goes
            // beside it.
            "; init applies patches into the data files when the container starts, so they must be writable: under a read-only root filesystem, set BAKEDB_DATA_COPY_DIR to a writable volume beside the data (e.g. an emptyDir at /var/lib/bakedb-copy) and init composes them in a verified copy there"
        }
        Some(libc::ENOSPC | libc::EDQUOT) => {
            "; applying patches copies the file into the container's writable layer first (overlayfs copy-up), which needs room for the whole file"
        }
        Some(libc::EACCES | libc::EPERM) => &format!(
            ", as uid {euid}; run the container as the data owner (the image's User) or as root"
        ),
        _ => "",
    };
    Problem::Access(format!("{what}: {e}{advice}"))
}

/// The composed digest a patch header carries for a file image.json describes: SHA-256 of the
/// concatenation of its chunk digests (its one sha256 for a file of at most one chunk).
pub fn composed_digest(file: &FileEntry) -> [u8; 32] {
    Sha256::digest(file.content.digests().concat()).into()
}

/// Open and check every patch of every patched file, and that the last patch of each composes
/// the file image.json describes (its length and composed digest). Writes nothing.
pub fn check_all(desc: &Description, data_dir: &Path) -> Result<usize, Problem> {
    let mut buf = Vec::new();
    let mut n_patches = 0;
    for file in desc.patched() {
        let mut last = None;
        for patch in &file.patches {
            last = Some(Patch::open(
                &data_dir.join(patch),
                patch_size(desc, patch),
                &mut buf,
            )?);
            n_patches += 1;
        }
        let last = last.expect("image.rs: a patched file has patches");
        let want = composed_digest(file);
        if last.header.length != file.content.size || last.header.composed_digest != want {
            return Err(Problem::Mismatch(format!(
                "{} composes a file of {} bytes with digest {}, image.json says {} has {} bytes with digest {}: the patch belongs to another version of the file",
                last.path.display(),
                last.header.length,
                hex(&last.header.composed_digest),
                file.path,
                file.content.size,
                hex(&want)
            )));
        }
    }
    Ok(n_patches)
}

fn patch_size(desc: &Description, patch: &str) -> u64 {
    desc.files
        .iter()
        .find(|f| f.path == patch)
        .map(|f| f.content.size)
        .expect("image.rs: every patch is a listed file")
}

/// What composing did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Composed {
    pub files: usize,
    pub patches: usize,
    pub pages: u64,
    pub bytes: u64,
}

/// Compose every patched file in place: open it for writing (on overlayfs this copies it up
/// into the container's layer), then apply its patches in order. Call `check_all` first.
pub fn compose_all(desc: &Description, data_dir: &Path) -> Result<Composed, Problem> {
    let mut buf = Vec::new();
    let mut done = Composed::default();
    for file in desc.patched() {
        let path = data_dir.join(&file.path);
        let (target, restore_mode) = open_for_writing(&path)?;
        for patch in &file.patches {
            let patch = Patch::open(&data_dir.join(patch), patch_size(desc, patch), &mut buf)?;
            patch.apply(&target, &path, &mut buf)?;
            done.patches += 1;
            done.pages += patch.header.count;
            done.bytes += patch.header.count * patch.header.page_size;
        }
        if let Some(mode) = restore_mode {
            use std::os::unix::fs::PermissionsExt;
            target
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| {
                    write_problem(format!("restoring the mode of {}", path.display()), e)
                })?;
        }
        done.files += 1;
    }
    Ok(done)
}

/// The data file, for writing only if it is a regular file: O_NOFOLLOW (no link), O_NONBLOCK
/// (a FIFO swapped in opens at once), then fstat. A file the image ships without its owner's
/// write bit (MariaDB's data is 0440, so that MyISAM and Aria open it O_RDONLY and nothing
/// is copied up) is given the bit through a read-only descriptor of it (fchmod: no path to
/// swap in between) and returned with the mode to restore once it is composed.
fn open_for_writing(path: &Path) -> Result<(File, Option<u32>), Problem> {
    match open_writable(path) {
        Err(Problem::Access(why)) if !is_writable_by_owner(path) => {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let read_only = regular::open(path, regular::Links::Refuse)
                .map_err(|_| Problem::Access(why.clone()))?;
            let meta = read_only
                .metadata()
                .map_err(|e| io_problem(path.display().to_string(), e))?;
            // SAFETY: geteuid cannot fail.
            if meta.uid() != unsafe { libc::geteuid() } {
                return Err(Problem::Access(why));
            }
            let mode = meta.mode() & 0o7777;
            read_only
                .set_permissions(std::fs::Permissions::from_mode(mode | 0o200))
                .map_err(|e| write_problem(format!("making {} writable", path.display()), e))?;
            let file = open_writable(path)?;
            let after = file
                .metadata()
                .map_err(|e| io_problem(path.display().to_string(), e))?;
            if (after.dev(), after.ino()) != (meta.dev(), meta.ino()) {
                return Err(Problem::Mismatch(format!(
                    "{} was replaced while init opened it",
                    path.display()
                )));
            }
            Ok((file, Some(mode)))
        }
        other => other.map(|file| (file, None)),
    }
}

/// Whether `path` (not followed) has its owner's write bit.
fn is_writable_by_owner(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.permissions().mode() & 0o200 != 0)
}

fn open_writable(path: &Path) -> Result<File, Problem> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Problem::Mismatch(format!(
                "{} is a symbolic link; image.json lists a regular file there",
                path.display()
            )),
            Some(libc::ENOENT) => io_problem(format!("opening {}", path.display()), e),
            _ => write_problem(format!("opening {} for writing", path.display()), e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| io_problem(path.display().to_string(), e))?;
    if !meta.is_file() {
        return Err(Problem::Mismatch(format!(
            "{} is {}; image.json lists a regular file there",
            path.display(),
            kind(&meta)
        )));
    }
    Ok(file)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A patch file as docs/patch-format.md lays it out, from (page number, bytes) pairs.
    pub fn patch_bytes(
        page_size: u32,
        length: u64,
        pages: &[(u64, Vec<u8>)],
        composed_digest: [u8; 32],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&page_size.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&composed_digest);
        for (n, _) in pages {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for (_, bytes) in pages {
            assert_eq!(bytes.len(), page_size as usize);
            out.extend_from_slice(bytes);
        }
        out
    }

    fn header_of(bytes: &[u8]) -> Result<Header, String> {
        let mut h = [0u8; 64];
        h.copy_from_slice(&bytes[..64]);
        Header::parse(&h, bytes.len() as u64)
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; 512]
    }

    #[test]
    fn a_valid_header_is_read() {
        let bytes = patch_bytes(512, 4096, &[(0, page(1)), (7, page(2))], [9; 32]);
        assert_eq!(bytes.len(), 64 + 16 + 1024);
        assert_eq!(
            header_of(&bytes).unwrap(),
            Header {
                page_size: 512,
                length: 4096,
                count: 2,
                composed_digest: [9; 32]
            }
        );
        // A patch that only shrinks the file has no pages.
        let empty = patch_bytes(4096, 0, &[], [0; 32]);
        assert_eq!(header_of(&empty).unwrap().count, 0);
    }

    #[test]
    fn every_header_field_is_checked() {
        let good = patch_bytes(512, 4096, &[(1, page(1)), (2, page(2))], [0; 32]);
        type Damage = fn(&mut Vec<u8>);
        let cases: &[(Damage, &str)] = &[
            (|b| b[0] = b'X', "does not start with BKDBPTCH"),
            (
                |b| b[8..12].copy_from_slice(&2u32.to_le_bytes()),
                "version 2 of the format",
            ),
            (
                |b| b[12..16].copy_from_slice(&1000u32.to_le_bytes()),
                "page size 1000 is not a power of two",
            ),
            (
                |b| b[12..16].copy_from_slice(&256u32.to_le_bytes()),
                "page size 256 is not a power of two from 512",
            ),
            (
                |b| b[12..16].copy_from_slice(&131072u32.to_le_bytes()),
                "page size 131072",
            ),
            (
                |b| b[16..24].copy_from_slice(&4000u64.to_le_bytes()),
                "composed length 4000 is not a multiple of its page size 512",
            ),
            (
                |b| b[16..24].copy_from_slice(&512u64.to_le_bytes()),
                "it holds 2 pages, the composed file has only 1",
            ),
            (
                |b| b[24..32].copy_from_slice(&1u64.to_le_bytes()),
                "its header says 64 + 8 × 1 + 1 × 512",
            ),
            (|b| b.push(0), "it has 1105 bytes"),
            (
                |b| b[24..32].copy_from_slice(&u64::MAX.to_le_bytes()),
                "it holds 18446744073709551615 pages",
            ),
        ];
        for (damage, message) in cases {
            let mut bytes = good.clone();
            damage(&mut bytes);
            let err = header_of(&bytes).unwrap_err();
            assert!(err.contains(message), "{err:?} should contain {message:?}");
        }
        // The largest length: the size arithmetic must not overflow.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&(u64::MAX - 511).to_le_bytes());
        huge[24..32].copy_from_slice(&(u64::MAX / 600).to_le_bytes());
        assert!(header_of(&huge).unwrap_err().contains("its header says"));
    }

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d =
            std::env::temp_dir().join(format!("bakedb-init-patch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn open_patch(d: &Dir, name: &str, bytes: &[u8]) -> Result<Patch, String> {
        let path = d.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        Patch::open(&path, bytes.len() as u64, &mut Vec::new()).map_err(|p| match p {
            Problem::Mismatch(m) => m,
            Problem::Access(m) => panic!("not a mismatch: {m}"),
        })
    }

    #[test]
    fn page_numbers_must_increase_and_stay_in_the_file() {
        let d = dir("numbers");
        let bytes = patch_bytes(512, 2048, &[(2, page(1)), (1, page(2))], [0; 32]);
        let err = open_patch(&d, "down", &bytes).unwrap_err();
        assert!(
            err.contains("down is not a valid patch file (docs/patch-format.md): page number 1 (entry 1 of 2) is not above the one before it"),
            "{err}"
        );
        let bytes = patch_bytes(512, 2048, &[(1, page(1)), (1, page(2))], [0; 32]);
        assert!(open_patch(&d, "same", &bytes).is_err());
        let bytes = patch_bytes(512, 2048, &[(0, page(1)), (4, page(2))], [0; 32]);
        let err = open_patch(&d, "past", &bytes).unwrap_err();
        assert!(
            err.contains("page number 4 (entry 1 of 2) is not below the composed file's 4 pages"),
            "{err}"
        );
        let bytes = patch_bytes(512, 2048, &[(0, page(1)), (3, page(2))], [0; 32]);
        open_patch(&d, "ok", &bytes).unwrap();
        // Listed with another size than the file has: replaced.
        let path = d.0.join("ok");
        let err = match Patch::open(&path, 1, &mut Vec::new()) {
            Err(Problem::Mismatch(m)) => m,
            _ => panic!("accepted a patch of the wrong size"),
        };
        assert!(
            err.contains("image.json says 1: the patch was replaced"),
            "{err}"
        );
    }

    /// A patch as data: page size, composed length, (page number, bytes).
    type PatchSpec = (u32, u64, Vec<(u64, Vec<u8>)>);

    /// Compose by the document's rule, in memory, as an independent reference.
    fn compose_in_memory(base: &[u8], patches: &[PatchSpec]) -> Vec<u8> {
        let mut file = base.to_vec();
        for (p, n, pages) in patches {
            file.resize(*n as usize, 0);
            for (number, bytes) in pages {
                let at = (*number * u64::from(*p)) as usize;
                file[at..at + bytes.len()].copy_from_slice(bytes);
            }
        }
        file
    }

    /// Grow, shrink, grow again, with runs of consecutive pages and a change of page size:
    /// the file composed in place is the document's composition, from the base, from the
    /// composed file (a restart) and from a start interrupted after the first patch.
    #[test]
    fn composing_in_place_follows_the_document_and_is_idempotent() {
        let d = dir("compose");
        let base: Vec<u8> = (0..10 * 1024u32).map(|i| (i % 253) as u8).collect();
        let pages = |p: u32, list: &[u64], salt: u8| -> Vec<(u64, Vec<u8>)> {
            list.iter()
                .map(|n| {
                    let bytes = (0..p).map(|i| (i as u8) ^ salt ^ (*n as u8)).collect();
                    (*n, bytes)
                })
                .collect()
        };
        // 10 KiB → 16 KiB (pages 10..16 of 1 KiB are new, so all shipped) → 6 KiB → 12 KiB
        // in 4 KiB pages (page 2 new) → in 512-byte pages with a long run.
        let patches = vec![
            (
                1024,
                16384,
                pages(1024, &[0, 3, 4, 5, 10, 11, 12, 13, 14, 15], 1),
            ),
            (1024, 6144, pages(1024, &[5], 2)),
            (4096, 12288, pages(4096, &[0, 2], 3)),
            (512, 12288, pages(512, &(4..20).collect::<Vec<_>>(), 4)),
        ];
        let expected = compose_in_memory(&base, &patches);
        assert_eq!(expected.len(), 12288);
        let data = d.0.join("data");
        std::fs::create_dir(&data).unwrap();
        let mut files = Vec::new();
        let mut patch_paths = Vec::new();
        for (i, (p, n, list)) in patches.iter().enumerate() {
            let bytes = patch_bytes(*p, *n, list, [0; 32]);
            let name = format!(".patches/{}/app.db", i + 1);
            std::fs::create_dir_all(data.join(format!(".patches/{}", i + 1))).unwrap();
            std::fs::write(data.join(&name), &bytes).unwrap();
            files.push(format!(
                r#"{{"path": "{name}", "size": {}, "mode": "0644", "sha256": "{}"}}"#,
                bytes.len(),
                hex(&Sha256::digest(&bytes))
            ));
            patch_paths.push(format!("{name:?}"));
        }
        let text = format!(
            r#"{{"schema": 1, "engine": "sqlite", "data_dir": "/d", "chunk_size": 1048576, "generation": 4,
                "owner": {{"uid": 1, "gid": 1}}, "profile": {{"name": "x", "patches": "apply"}},
                "files": [{{"path": "app.db", "size": 12288, "mode": "0644", "sha256": "{}",
                            "base": {{"generation": 0, "size": 10240, "sha256": "{}"}},
                            "patches": [{}]}}, {}]}}"#,
            hex(&Sha256::digest(&expected)),
            hex(&Sha256::digest(&base)),
            patch_paths.join(","),
            files.join(",")
        );
        let desc = crate::image::parse(text.as_bytes()).unwrap();
        std::fs::write(data.join("app.db"), &base).unwrap();
        let counted = compose_all(&desc, &data).unwrap();
        assert_eq!(
            counted,
            Composed {
                files: 1,
                patches: 4,
                pages: 10 + 1 + 2 + 16,
                bytes: 11 * 1024 + 2 * 4096 + 16 * 512,
            }
        );
        assert_eq!(std::fs::read(data.join("app.db")).unwrap(), expected);
        // A restart composes the composed file: nothing changes.
        compose_all(&desc, &data).unwrap();
        assert_eq!(std::fs::read(data.join("app.db")).unwrap(), expected);
        // A start killed after the first patch (and part of the second) leaves a file
        // that composes to the same bytes.
        let mut partial = compose_in_memory(&base, &patches[..1]);
        partial[5 * 1024..5 * 1024 + 100].fill(0xee);
        std::fs::write(data.join("app.db"), &partial).unwrap();
        compose_all(&desc, &data).unwrap();
        assert_eq!(std::fs::read(data.join("app.db")).unwrap(), expected);
        // A file the image ships read-only (MariaDB's 0440) composes too, and keeps its mode
        // (as root the write bit is not needed; as its owner it is added, then removed).
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(data.join("app.db"), &base).unwrap();
        std::fs::set_permissions(data.join("app.db"), std::fs::Permissions::from_mode(0o440))
            .unwrap();
        compose_all(&desc, &data).unwrap();
        assert_eq!(std::fs::read(data.join("app.db")).unwrap(), expected);
        let mode = std::fs::metadata(data.join("app.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o440);
        let (_, restore) = open_for_writing(&data.join("app.db")).unwrap();
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(restore, if root { None } else { Some(0o440) });
    }

    #[test]
    fn the_last_patch_must_compose_the_file_image_json_describes() {
        let d = dir("last");
        let data = d.0.join("data");
        std::fs::create_dir_all(data.join(".patches/1")).unwrap();
        let composed = vec![7u8; 1024];
        let sha = Sha256::digest(&composed);
        let good_digest: [u8; 32] = Sha256::digest(sha).into();
        for (length, digest, ok) in [
            (1024, good_digest, true),
            (1024, [0; 32], false),
            (512, good_digest, false),
        ] {
            let list: Vec<(u64, Vec<u8>)> =
                (0..length / 512).map(|n| (n, vec![7u8; 512])).collect();
            let bytes = patch_bytes(512, length, &list, digest);
            std::fs::write(data.join(".patches/1/a"), &bytes).unwrap();
            let text = format!(
                r#"{{"schema": 1, "engine": "e", "data_dir": "/d", "chunk_size": 4096, "generation": 1,
                    "owner": {{"uid": 1, "gid": 1}}, "profile": {{"name": "x", "patches": "in-place"}},
                    "files": [{{"path": "a", "size": 1024, "mode": "0644", "sha256": "{}",
                                "base": {{"generation": 0, "size": 3, "sha256": "{}"}}, "patches": [".patches/1/a"]}},
                              {{"path": ".patches/1/a", "size": {}, "mode": "0644", "sha256": "{}"}}]}}"#,
                hex(&sha),
                hex(&Sha256::digest(b"abc")),
                bytes.len(),
                hex(&Sha256::digest(&bytes)),
            );
            let desc = crate::image::parse(text.as_bytes()).unwrap();
            match check_all(&desc, &data) {
                Ok(n) => assert!(ok && n == 1, "{length} accepted"),
                Err(Problem::Mismatch(m)) => {
                    assert!(!ok, "{m}");
                    assert!(
                        m.contains("the patch belongs to another version of the file"),
                        "{m}"
                    );
                }
                Err(Problem::Access(m)) => panic!("{m}"),
            }
        }
    }

    #[test]
    fn a_read_only_root_is_answered_with_the_copy_directory_not_a_volume_over_the_data() {
        let e = std::io::Error::from_raw_os_error(libc::EROFS);
        match write_problem(
            "opening /var/lib/bakedb/mysql/ibdata1 for writing".into(),
            e,
        ) {
            // A setup problem (exit 1), not a mismatch: the data was not altered.
            Problem::Access(m) => assert!(
                m.starts_with(
                    "opening /var/lib/bakedb/mysql/ibdata1 for writing: Read-only file system"
                ) && m.contains("set BAKEDB_DATA_COPY_DIR to a writable volume beside the data"),
                "{m}"
            ),
            Problem::Mismatch(m) => panic!("not a setup problem: {m}"),
        }
    }
}
