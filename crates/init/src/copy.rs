//! `BAKEDB_DATA_COPY_DIR`: the engine runs on a verified copy of the data, on a writable
//! volume, instead of on the image's layer.
//!
//! PostgreSQL writes into its data directory whatever it serves (postmaster.pid, pg_control,
//! WAL and statistics at shutdown), so under a read-only root filesystem (Kubernetes'
//! `readOnlyRootFilesystem: true`, `docker run --read-only`) it cannot start on the image's
//! data. A volume mounted over the data directory would hide that data, so the volume goes
//! beside it (an emptyDir) and init copies the data into it: every byte is hashed as it is
//! read from the image and written to the copy (one read of the image, on every core), patch
//! layers are composed in the copy, and the profile's `{data_dir}` is the copy.
//!
//! The copy's state lives in the directory itself, so that a restarted container (an
//! emptyDir outlives its container, as a writable layer outlives `docker restart`) finds it:
//! - `MARKER` exists while a copy is being made: a directory that holds it is a copy that
//!   did not finish (killed, out of space) and is removed and made again;
//! - the stamp (`VERIFIED_STAMP`, the verified BAKEDB_DATA_DIGEST) is written once the copy
//!   is complete, verified and composed: a restart starts the engine on the copy without
//!   copying or verifying again, whatever the engine wrote to it since.
//!
//! init copies only into an empty directory or one holding its own copy; anything else (a
//! volume with someone's data, mounted at the wrong place) is refused, never emptied.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::image::Description;
use crate::profile::VERIFIED_STAMP;
use crate::regular::{self, kind};
use crate::verify::Problem;

/// Present while a copy is being made; see the module documentation.
pub const MARKER: &str = ".bakedb-copying";

/// What the copy directory holds when a container starts.
#[derive(Debug, PartialEq, Eq)]
pub enum State {
    /// A complete copy of this image's data (the stamp holds its digest): use it as it is.
    Done,
    /// Nothing: copy.
    Empty,
    /// A copy init did not finish, or one of another image's data: remove it and copy.
    Unfinished(String),
}

/// Look at the copy directory: it must be a directory (a mounted volume), and hold nothing
/// but a copy init made.
pub fn state(dir: &Path, digest: &str) -> Result<State, String> {
    let meta = fs::symlink_metadata(dir).map_err(|e| {
        format!(
            "BAKEDB_DATA_COPY_DIR {}: {e}; mount a writable volume there (e.g. an emptyDir) or unset it",
            dir.display()
        )
    })?;
    if !meta.is_dir() {
        return Err(format!(
            "BAKEDB_DATA_COPY_DIR {} is {}, not a directory; mount a writable volume there",
            dir.display(),
            kind(&meta)
        ));
    }
    let mut names: Vec<String> = fs::read_dir(dir)
        .and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .map_err(|e| format!("reading BAKEDB_DATA_COPY_DIR {}: {e}", dir.display()))?;
    if names.is_empty() {
        return Ok(State::Empty);
    }
    names.sort();
    if names.iter().any(|n| n == MARKER) {
        return Ok(State::Unfinished(format!(
            "{} holds a copy that was not finished ({MARKER})",
            dir.display()
        )));
    }
    let stamp = dir.join(VERIFIED_STAMP);
    match regular::read(&stamp, regular::Links::Refuse, 4096) {
        Ok(bytes) if String::from_utf8_lossy(&bytes).trim() == digest => Ok(State::Done),
        Ok(bytes) => Ok(State::Unfinished(format!(
            "{} holds a copy of other data ({} says {})",
            dir.display(),
            VERIFIED_STAMP,
            String::from_utf8_lossy(&bytes).trim()
        ))),
        Err(regular::OpenError::Missing(_)) => {
            let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
            Err(format!(
                "BAKEDB_DATA_COPY_DIR {} is not empty ({}{}) and holds no copy init made: init copies the data only into an empty directory; mount an empty volume there (e.g. an emptyDir)",
                dir.display(),
                shown.join(", "),
                if names.len() > shown.len() {
                    format!(" and {} more", names.len() - shown.len())
                } else {
                    String::new()
                }
            ))
        }
        Err(e) => Err(format!(
            "{} {e}: init writes it as a regular file after copying",
            stamp.display()
        )),
    }
}

/// Remove everything in the copy directory (not the directory: it is a mount point). Links
/// are removed, never followed (std's remove_dir_all does not follow them).
pub fn clear(dir: &Path) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| format!("removing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Write the marker that says a copy is being made. Created new: nothing at its name is
/// opened.
pub fn begin(dir: &Path) -> Result<(), String> {
    let path = dir.join(MARKER);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map(drop)
        .map_err(|e| {
            format!(
                "creating {}: {e}; the copy directory must be writable by the data owner (in Kubernetes: an emptyDir, or a pod securityContext fsGroup)",
                path.display()
            )
        })
}

/// The copy is complete and its stamp written: remove the marker.
pub fn finish(dir: &Path) -> Result<(), String> {
    let path = dir.join(MARKER);
    fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))
}

/// The directories of the copy, parents first: those image.json lists and every parent of a
/// listed file.
fn dirs(desc: &Description) -> Vec<String> {
    let mut all: BTreeSet<String> = desc.dirs.iter().cloned().collect();
    for f in &desc.files {
        let mut p = f.path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            all.insert(parent.to_owned());
            p = parent;
        }
    }
    // "a" sorts before "a/b": parents come first.
    all.into_iter().collect()
}

fn create_problem(path: &Path, e: std::io::Error) -> Problem {
    let advice = if e.raw_os_error() == Some(libc::ENOSPC) {
        "; the copy directory needs room for the whole data (and what the engine writes)"
    } else {
        ""
    };
    Problem::Access(format!("creating {}: {e}{advice}", path.display()))
}

/// Lay out the copy before the data is read into it: every directory (owner-only for now,
/// so nothing can be put in them meanwhile) and every file, empty, of its final `size`, 0600.
/// The image's modes are set by `set_modes` once the data is in.
pub fn create_tree(desc: &Description, to: &Path, sizes: &[u64]) -> Result<(), Problem> {
    for dir in dirs(desc) {
        let path = to.join(&dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| create_problem(&path, e))?;
    }
    for (f, size) in desc.files.iter().zip(sizes) {
        let path = to.join(&f.path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| create_problem(&path, e))?;
        file.set_len(*size).map_err(|e| create_problem(&path, e))?;
    }
    Ok(())
}

/// A file of the copy, opened for writing by a copying worker.
pub fn open_target(path: &Path) -> Result<(File, PathBuf), Problem> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map(|f| (f, path.to_owned()))
        .map_err(|e| Problem::Access(format!("opening {} for writing: {e}", path.display())))
}

/// Give the copy the image's modes: each file the mode image.json lists, each directory the
/// mode it has in the image (`from`; PostgreSQL refuses a data directory other than 0700 or
/// 0750), deepest first.
pub fn set_modes(desc: &Description, from: &Path, to: &Path) -> Result<(), Problem> {
    let chmod = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| Problem::Access(format!("setting the mode of {}: {e}", path.display())))
    };
    for f in &desc.files {
        chmod(&to.join(&f.path), f.mode)?;
    }
    for dir in dirs(desc).iter().rev() {
        let source = from.join(dir);
        let mode = fs::symlink_metadata(&source)
            .map_err(|e| crate::verify::io_problem(source.display().to_string(), e))?
            .mode()
            & 0o7777;
        chmod(&to.join(dir), mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bakedb-init-copy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_empty_directory_is_copied_into() {
        let dir = scratch("empty");
        assert_eq!(state(&dir, "sha256:a"), Ok(State::Empty));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_finished_copy_of_this_digest_is_used_as_it_is() {
        let dir = scratch("done");
        fs::create_dir(dir.join("pgdata")).unwrap();
        fs::write(dir.join(VERIFIED_STAMP), "sha256:a\n").unwrap();
        assert_eq!(state(&dir, "sha256:a"), Ok(State::Done));
        // Another image's copy is replaced.
        assert!(matches!(state(&dir, "sha256:b"), Ok(State::Unfinished(_))));
        // A copy that was being made is replaced, whatever the stamp says.
        fs::write(dir.join(MARKER), "").unwrap();
        assert!(matches!(state(&dir, "sha256:a"), Ok(State::Unfinished(_))));
        clear(&dir).unwrap();
        assert_eq!(state(&dir, "sha256:a"), Ok(State::Empty));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn someone_elses_files_are_refused_and_kept() {
        let dir = scratch("foreign");
        fs::write(dir.join("important.txt"), "keep me").unwrap();
        let e = state(&dir, "sha256:a").unwrap_err();
        assert!(e.contains("is not empty (important.txt)"), "{e}");
        assert!(dir.join("important.txt").exists());
        // A stamp that is not a regular file is refused too.
        fs::create_dir(dir.join(VERIFIED_STAMP)).unwrap();
        let e = state(&dir, "sha256:a").unwrap_err();
        assert!(e.contains("is a directory, not a regular file"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_or_a_file_is_refused() {
        let dir = scratch("missing");
        let e = state(&dir.join("nope"), "sha256:a").unwrap_err();
        assert!(e.contains("mount a writable volume there"), "{e}");
        fs::write(dir.join("file"), "").unwrap();
        let e = state(&dir.join("file"), "sha256:a").unwrap_err();
        assert!(e.contains("is a regular file, not a directory"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    fn description(dirs: &[&str], files: &[&str]) -> Description {
        let files: Vec<String> = files
            .iter()
            .map(|f| {
                format!(
                    r#"{{"path": "{f}", "size": 0, "mode": "0644", "sha256": "{}"}}"#,
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                )
            })
            .collect();
        let dirs: Vec<String> = dirs.iter().map(|d| format!("{d:?}")).collect();
        let text = format!(
            r#"{{"schema": 1, "engine": "postgres", "data_dir": "/var/lib/bakedb", "chunk_size": 1000,
               "owner": {{"uid": 1, "gid": 1}}, "dirs": [{}], "files": [{}]}}"#,
            dirs.join(","),
            files.join(",")
        );
        crate::image::parse(text.as_bytes()).unwrap()
    }

    /// The copy's directories are those image.json lists (empty ones too: PostgreSQL needs
    /// pg_notify, pg_tblspc...) and every parent of a file, each once, parents before
    /// children, so that `create_tree` can make them in order and `set_modes` (which walks
    /// them backwards) sets a parent's mode after its children's.
    #[test]
    fn the_copy_has_every_listed_and_parent_directory_parents_first() {
        let desc = description(
            &["pgdata", "pgdata/pg_notify", "pgdata/base"],
            &["pgdata/base/1/1259", "pgdata/global/pg_control", "top.db"],
        );
        assert_eq!(
            dirs(&desc),
            [
                "pgdata",
                "pgdata/base",
                "pgdata/base/1",
                "pgdata/global",
                "pgdata/pg_notify"
            ]
        );
        let dir = scratch("tree");
        create_tree(&desc, &dir, &[3, 0, 5]).unwrap();
        assert!(dir.join("pgdata/pg_notify").is_dir());
        assert_eq!(
            fs::metadata(dir.join("pgdata/base/1/1259")).unwrap().len(),
            3
        );
        assert_eq!(fs::metadata(dir.join("top.db")).unwrap().len(), 5);
        // Until set_modes: owner-only, so nothing can be put into the copy meanwhile.
        for path in ["pgdata", "pgdata/base/1", "top.db"] {
            let mode = fs::metadata(dir.join(path)).unwrap().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{path}: {mode:o}");
        }
        // Nothing already there is opened or overwritten.
        let e = create_tree(&desc, &dir, &[3, 0, 5]).unwrap_err();
        assert!(
            matches!(&e, Problem::Access(m) if m.contains("File exists")),
            "{e:?}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clear_removes_links_without_following_them() {
        let dir = scratch("clear");
        let outside = scratch("clear-outside");
        fs::write(outside.join("kept"), "x").unwrap();
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("a/link")).unwrap();
        clear(&dir).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        assert!(outside.join("kept").exists());
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }
}
