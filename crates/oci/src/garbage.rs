//! What killed builds leave behind: where it is, how big, and its removal.
//!
//! A build writes its temporary files where no OCI reader looks. In a layout they go into
//! `.bakedb-tmp/` (blobs being written, index.json and oci-layout being replaced). Beside an
//! archive there is one hidden staging layout, `.NAME.bakedb-staging.PID/`, holding the
//! image's blobs and, until it is renamed over NAME, the archive itself. A build killed with
//! SIGKILL cannot remove them. The next bakedb that writes into the same layout removes them
//! (it holds the layout's flock, so they cannot be a live build's), as does the next archive
//! build into the same directory (a staging layout is removed only when the process that
//! made it is gone and nothing holds its flock); `bakedb verify` reports them, and the
//! blobs no tag references (a build killed after writing blobs but before index.json).
//!
//! The names earlier versions of bakedb used are recognised too: `blobs/sha256/tmp.blob.*`,
//! `tmp.index.json.*` and `tmp.oci-layout.*` in a layout, `tmp.NAME.PID.N` beside an archive.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::index;

/// The directory in a layout where bakedb writes temporary files.
pub const TEMP_DIR: &str = ".bakedb-tmp";

/// The name (and pid) of the file a writer renames into blobs/sha256 to see that it can.
pub(crate) const PROBE_PREFIX: &str = ".bakedb-probe.";

/// What marks a staging layout beside an archive: `.NAME.bakedb-staging.PID`.
const STAGING_MARK: &str = ".bakedb-staging.";

/// A temporary file or directory of a build that is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    pub bytes: u64,
}

/// A blob in a layout that no tag leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreferenced {
    pub digest: Digest,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Garbage {
    pub leftovers: Vec<Leftover>,
    pub unreferenced: Vec<Unreferenced>,
    /// A build holds the layout's lock right now: its temporary files are not garbage, and
    /// none were looked for.
    pub writer_active: bool,
}

impl Garbage {
    pub fn is_empty(&self) -> bool {
        self.leftovers.is_empty() && self.unreferenced.is_empty()
    }

    pub fn leftover_bytes(&self) -> u64 {
        self.leftovers.iter().map(|l| l.bytes).sum()
    }

    pub fn unreferenced_bytes(&self) -> u64 {
        self.unreferenced.iter().map(|u| u.bytes).sum()
    }
}

fn names(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    out
}

fn is_legacy_layout_temp(name: &str) -> bool {
    name.starts_with("tmp.index.json.") || name.starts_with("tmp.oci-layout.")
}

/// Temporary files in a layout, whoever wrote them; only the holder of the layout's lock
/// may treat them as garbage. (A `.bakedb-tmp` that is not a directory is one, too.)
fn layout_temp_paths(root: &Path) -> Vec<PathBuf> {
    let temp_dir = root.join(TEMP_DIR);
    let mut out: Vec<PathBuf> = match fs::symlink_metadata(&temp_dir) {
        Ok(m) if !m.is_dir() => vec![temp_dir],
        _ => names(&temp_dir).into_iter().map(|(_, p)| p).collect(),
    };
    out.extend(
        names(&root.join("blobs/sha256"))
            .into_iter()
            .filter(|(n, _)| n.starts_with("tmp.") || n.starts_with(PROBE_PREFIX))
            .map(|(_, p)| p),
    );
    out.extend(
        names(root)
            .into_iter()
            .filter(|(n, _)| is_legacy_layout_temp(n))
            .map(|(_, p)| p),
    );
    out
}

/// Remove the temporary files of dead writers from a layout. The caller holds the layout's
/// exclusive lock, so no live writer has any.
pub(crate) fn clean_layout(root: &Path) {
    for path in layout_temp_paths(root) {
        let _ = fsutil::remove_any(&path);
    }
}

/// The garbage in the layout at `root`: temporary files of builds that are gone, and blobs
/// that no tag of index.json leads to. Takes the layout's lock shared while it looks, so a
/// build cannot start meanwhile; if a build holds it, reports `writer_active` and nothing else.
pub fn in_layout(root: &Path, location: &str) -> Result<Garbage> {
    let lock = File::open(root).ok();
    if let Some(lock) = &lock
        && let Err(std::fs::TryLockError::WouldBlock) = lock.try_lock_shared()
    {
        return Ok(Garbage {
            writer_active: true,
            ..Garbage::default()
        });
    }
    let leftovers = layout_temp_paths(root)
        .into_iter()
        .map(|path| Leftover {
            bytes: fsutil::disk_bytes(&path),
            path,
        })
        .collect();
    let reachable = reachable_blobs(root, location)?;
    let unreferenced = names(&root.join("blobs/sha256"))
        .into_iter()
        .filter_map(|(name, path)| {
            let digest: Digest = format!("sha256:{name}").parse().ok()?;
            (!reachable.contains(&digest)).then(|| Unreferenced {
                digest,
                bytes: fs::symlink_metadata(&path).map_or(0, |m| m.len()),
            })
        })
        .collect();
    drop(lock);
    Ok(Garbage {
        leftovers,
        unreferenced,
        writer_active: false,
    })
}

/// Every blob a tag leads to: the index's entries, and everything the manifests and nested
/// indexes among them reference (configs, layers, other manifests, subjects).
fn reachable_blobs(root: &Path, location: &str) -> Result<BTreeSet<Digest>> {
    // Many tags usually share few manifests: keep each digest once, not each entry.
    let mut seen = BTreeSet::new();
    let mut todo: Vec<(Digest, String)> = Vec::new();
    let mut found = Vec::new();
    let mut add = |found: &mut Vec<(Digest, String)>, todo: &mut Vec<(Digest, String)>| {
        for (digest, media_type) in found.drain(..) {
            if seen.insert(digest) {
                todo.push((digest, media_type));
            }
        }
    };
    let index_path = root.join("index.json");
    let file = File::open(&index_path).map_err(Error::io("opening", &index_path))?;
    index::read(file, location, &index_path, &mut |entry| {
        collect_descriptors(&entry, &mut found);
        add(&mut found, &mut todo);
        Ok(())
    })?;
    while let Some((digest, media_type)) = todo.pop() {
        if !(media_type.contains("manifest") || media_type.contains("index")) {
            continue;
        }
        // A manifest or an index: small JSON that references more blobs. Damage is for
        // verification to report, not this inventory.
        let path = root.join("blobs/sha256").join(digest.hex());
        let Ok(bytes) = fs::read(&path) else { continue };
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            collect_descriptors(&value, &mut found);
            add(&mut found, &mut todo);
        }
    }
    Ok(seen)
}

/// Every descriptor (an object with a sha256 "digest") in `value`, at any depth.
fn collect_descriptors(value: &Value, out: &mut Vec<(Digest, String)>) {
    match value {
        Value::Object(map) => {
            if let Some(digest) = map
                .get("digest")
                .and_then(Value::as_str)
                .and_then(|d| d.parse().ok())
            {
                let media_type = map.get("mediaType").and_then(Value::as_str).unwrap_or("");
                out.push((digest, media_type.to_owned()));
            }
            for v in map.values() {
                collect_descriptors(v, out);
            }
        }
        Value::Array(list) => list.iter().for_each(|v| collect_descriptors(v, out)),
        _ => {}
    }
}

/// The name of the staging layout of a build of `name` by this process.
pub(crate) fn staging_name(name: &str) -> String {
    format!(".{name}{STAGING_MARK}{}", std::process::id())
}

/// The pid in `.NAME.bakedb-staging.PID`, or in `tmp.NAME.PID.N` for `name`.
fn owner_pid(entry: &str, archive_name: Option<&str>) -> Option<u32> {
    if entry.starts_with('.')
        && let Some((_, pid)) = entry.rsplit_once(STAGING_MARK)
    {
        return pid.parse().ok();
    }
    let rest = entry.strip_prefix(&format!("tmp.{}.", archive_name?))?;
    rest.split('.').next()?.parse().ok()
}

/// True when whoever made `path` is gone: its process is not running and, for a staging
/// layout, nothing holds its lock. (A live pid may be a stranger's after pid reuse; then the
/// leftover waits for a later build, which is the safe mistake.)
fn owner_gone(path: &Path, pid: u32) -> bool {
    if pid == std::process::id() || fsutil::pid_alive(pid) {
        return false;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => File::open(path).is_ok_and(|d| d.try_lock().is_ok()),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Leftovers of dead archive builds in `dir`: every staging layout (of any archive there),
/// and the temp archives older versions left beside `archive_name`.
fn archive_leftovers(dir: &Path, archive_name: &str) -> Vec<PathBuf> {
    names(dir)
        .into_iter()
        .filter(|(name, path)| {
            owner_pid(name, Some(archive_name)).is_some_and(|pid| owner_gone(path, pid))
        })
        .map(|(_, path)| path)
        .collect()
}

/// Remove the leftovers of dead archive builds beside `archive`.
pub(crate) fn clean_beside_archive(dir: &Path, archive_name: &str) {
    for path in archive_leftovers(dir, archive_name) {
        let _ = fsutil::remove_any(&path);
    }
}

/// The leftovers of dead archive builds in the archive's directory.
pub fn beside_archive(archive: &Path) -> Garbage {
    let dir = match archive.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Garbage {
        leftovers: archive_leftovers(dir, &name)
            .into_iter()
            .map(|path| Leftover {
                bytes: fsutil::disk_bytes(&path),
                path,
            })
            .collect(),
        ..Garbage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn staging_layouts_of_dead_builds_only() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let d = dir.path();
        let dead_staging = d.join(format!(".app.tar.bakedb-staging.{dead}"));
        fs::create_dir_all(dead_staging.join("blobs")).unwrap();
        fs::write(dead_staging.join("blobs/x"), vec![0u8; 1000]).unwrap();
        // Ours (alive), a locked one of a dead pid (a child still holds it), another name's.
        let ours = d.join(staging_name("app.tar"));
        fs::create_dir(&ours).unwrap();
        let locked = d.join(format!(".b.tar.bakedb-staging.{}", dead_pid()));
        fs::create_dir(&locked).unwrap();
        let holder = File::open(&locked).unwrap();
        holder.lock().unwrap();
        let other = d.join(format!(".other.tar.bakedb-staging.{}", dead_pid()));
        fs::create_dir(&other).unwrap();
        let legacy = d.join(format!("tmp.app.tar.{dead}.0"));
        fs::write(&legacy, b"12345").unwrap();
        let foreign = d.join(format!("tmp.notes.txt.{dead}.0"));
        fs::write(&foreign, b"x").unwrap();

        let garbage = beside_archive(&d.join("app.tar"));
        let mut found: Vec<(PathBuf, u64)> = garbage
            .leftovers
            .iter()
            .map(|l| (l.path.clone(), l.bytes))
            .collect();
        found.sort();
        let mut expected = vec![
            (dead_staging.clone(), 1000),
            (other.clone(), 0),
            (legacy.clone(), 5),
        ];
        expected.sort();
        assert_eq!(found, expected);

        clean_beside_archive(d, "app.tar");
        for gone in [&dead_staging, &other, &legacy] {
            assert!(!gone.exists(), "{}", gone.display());
        }
        for kept in [&ours, &locked, &foreign] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }
}
