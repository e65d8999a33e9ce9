//! Writing into an OCI image layout directory.
//!
//! A writer holds an exclusive flock on the layout directory for its whole life, so concurrent
//! builds into one layout are serialised and temp files found at open belong to dead writers:
//! it removes them. Everything is checked at open, before a build does any work: the
//! directory, the lock, index.json (parsed, entry by entry), that blobs can be written.
//! Blobs go in first; `index.json` is replaced atomically last, so the layout always
//! describes complete images. If the writer is dropped without committing, it removes the
//! blobs it added (and the directory, if it created it), leaving the layout as it found it.
//! Temp files live in `.bakedb-tmp/`, which the writer removes when it is done.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::blob::{BlobInfo, BlobStore};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::garbage::{self, TEMP_DIR};
use crate::image;
use crate::index::{self, TagEntry};

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

pub struct LayoutWriter {
    root: PathBuf,
    store: BlobStore,
    created_root: bool,
    created_blobs_dir: bool,
    existing_blobs: std::collections::BTreeSet<String>,
    committed: bool,
    _lock: File,
}

impl LayoutWriter {
    /// Open `root` for writing, creating it if needed. Fails on a directory that has content
    /// but is not an OCI layout, so bakedb never scribbles into an unrelated directory, and
    /// on a layout whose index.json a build could not update.
    pub fn open(root: &Path) -> Result<Self> {
        let created_root = !root.exists();
        if created_root {
            fs::create_dir_all(root).map_err(Error::io("creating output directory", root))?;
        } else if !root.is_dir() {
            return Err(Error::Invalid {
                location: location(root),
                what: "output".into(),
                reason: "exists and is not a directory".into(),
            });
        }
        let lock = File::open(root).map_err(Error::io("opening output directory", root))?;
        lock.lock()
            .map_err(Error::io("locking output directory", root))?;
        let result = Self::open_locked(root, created_root, lock);
        if result.is_err() && created_root {
            let _ = fs::remove_dir_all(root);
        }
        result
    }

    fn open_locked(root: &Path, created_root: bool, lock: File) -> Result<Self> {
        let has_index = root.join("index.json").is_file();
        let non_empty = fs::read_dir(root)
            .map_err(Error::io("listing", root))?
            .flatten()
            .any(|e| e.file_name() != TEMP_DIR);
        if !has_index
            && non_empty
            && !root.join("oci-layout").is_file()
            && !root.join("blobs").is_dir()
        {
            return Err(Error::Invalid {
                location: location(root),
                what: "output directory".into(),
                reason:
                    "is not empty and is not an OCI image layout; choose a new or empty directory"
                        .into(),
            });
        }
        // A build would replace index.json with one more tag: it must be readable now, not
        // after the snapshot and every layer were written.
        for_each_entry(root, &mut |_| Ok(())).map_err(|e| match e {
            Error::Invalid { location, what, reason } => Error::Invalid {
                location,
                what,
                reason: format!(
                    "{reason}; a build adds its tag to index.json and keeps the others, so it must be a valid image index: repair it, or build into another directory"
                ),
            },
            other => other,
        })?;
        let blobs_dir = root.join("blobs").join("sha256");
        let created_blobs_dir = !root.join("blobs").exists();
        let existing_blobs = match fs::read_dir(&blobs_dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Default::default(),
        };
        // We hold the lock, so temp files here belong to writers that died.
        garbage::clean_layout(root);
        let writer = LayoutWriter {
            store: BlobStore::create(root)?,
            root: root.to_owned(),
            created_root,
            created_blobs_dir,
            existing_blobs,
            committed: false,
            _lock: lock,
        };
        writer.check_blobs_writable()?;
        Ok(writer)
    }

    /// A blob is renamed from the temp directory into blobs/sha256: try it now with an empty
    /// file (removed at once), so a directory the build cannot write is found before the
    /// build does any work. The probe's name is not a digest, so no reader takes it for a
    /// blob, and a probe left by a killed build is removed as its temp files are.
    fn check_blobs_writable(&self) -> Result<()> {
        let probe = fsutil::temp_name(self.store.temp_dir(), "probe");
        let in_blobs = self.root.join("blobs/sha256").join(format!(
            "{}{}",
            garbage::PROBE_PREFIX,
            std::process::id()
        ));
        File::create(&probe).map_err(Error::io("creating", &probe))?;
        let result = fs::rename(&probe, &in_blobs)
            .map_err(Error::io("writing into", self.root.join("blobs/sha256")));
        let _ = fs::remove_file(&in_blobs);
        let _ = fs::remove_file(&probe);
        result
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Whether the layout held blobs when it was opened (else nothing can be deduplicated).
    pub fn had_blobs(&self) -> bool {
        !self.existing_blobs.is_empty()
    }

    /// Every entry of index.json, in order, one at a time (none if there is no index yet).
    pub fn for_each_tag(&self, each: &mut dyn FnMut(TagEntry) -> Result<()>) -> Result<()> {
        let location = location(&self.root);
        for_each_entry(&self.root, &mut |entry| {
            each(TagEntry::from_value(&entry, &location)?)
        })
    }

    pub fn has_tag(&self, tag: &str) -> Result<bool> {
        let mut found = false;
        self.for_each_tag(&mut |entry| {
            found |= entry.tag.as_deref() == Some(tag);
            Ok(())
        })?;
        Ok(found)
    }

    pub fn put_json(&self, value: &serde_json::Value) -> Result<BlobInfo> {
        self.store.put(&image::canonical_json(value))
    }

    /// Point `tag` at the manifest, keeping every other tag; the layout's commit point.
    pub fn commit_tag(
        mut self,
        tag: &str,
        manifest_digest: &Digest,
        manifest_size: u64,
        overwrite: bool,
    ) -> Result<()> {
        if !overwrite && self.has_tag(tag)? {
            return Err(Error::TagExists {
                location: location(&self.root),
                tag: tag.into(),
            });
        }
        let temp_dir = self.store.temp_dir().to_owned();
        let layout_file = self.root.join("oci-layout");
        if fs::read(&layout_file).ok().as_deref() != Some(OCI_LAYOUT) {
            fsutil::write_atomic_bytes(&layout_file, &temp_dir, OCI_LAYOUT)?;
        }
        let index_path = self.root.join("index.json");
        let location = location(&self.root);
        fsutil::write_atomic(&index_path, &temp_dir, &mut |out| {
            index::write_with_tag(
                &mut || open_index(&index_path),
                &location,
                &index_path,
                out,
                tag,
                manifest_digest,
                manifest_size,
            )
        })?;
        self.committed = true;
        Ok(())
    }

    /// Mark the layout as finished without changing index.json (used for staging layouts).
    pub fn keep(mut self) {
        self.committed = true;
    }
}

fn location(root: &Path) -> String {
    format!("oci:{}", root.display())
}

fn open_index(path: &Path) -> Result<Option<Box<dyn std::io::Read>>> {
    match File::open(path) {
        Ok(f) => Ok(Some(Box::new(f))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            op: "opening",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Stream the entries of `root`/index.json, checking each names a sha256 digest.
fn for_each_entry(
    root: &Path,
    each: &mut dyn FnMut(serde_json::Value) -> Result<()>,
) -> Result<()> {
    let path = root.join("index.json");
    let Some(file) = open_index(&path)? else {
        return Ok(());
    };
    let location = location(root);
    index::read(file, &location, &path, &mut |entry| {
        TagEntry::from_value(&entry, &location)?;
        each(entry)
    })?;
    Ok(())
}

impl Drop for LayoutWriter {
    fn drop(&mut self) {
        // Ours: we hold the lock. Whatever is still in it is of no use to anyone.
        let _ = fs::remove_dir_all(self.store.temp_dir());
        if self.committed {
            return;
        }
        if self.created_root {
            let _ = fs::remove_dir_all(&self.root);
            return;
        }
        if self.created_blobs_dir {
            // Only this writer (it holds the lock) can have put anything there.
            let _ = fs::remove_dir_all(self.root.join("blobs"));
            return;
        }
        let blobs_dir = self.root.join("blobs").join("sha256");
        if let Ok(rd) = fs::read_dir(&blobs_dir) {
            for entry in rd.flatten() {
                if !self
                    .existing_blobs
                    .contains(&*entry.file_name().to_string_lossy())
                {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = walkdir::WalkDir::new(dir)
            .min_depth(1)
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                e.path().strip_prefix(dir).unwrap().display().to_string()
            })
            .collect();
        names.sort();
        names
    }

    /// index.json is checked when the writer opens, before a build does any work; the layout
    /// is left exactly as it was (no blobs/, no temp directory).
    #[test]
    fn an_invalid_index_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        for (text, reason) in [
            ("{\"manifests\": [", "EOF while parsing"),
            ("[]", "expected an image index"),
            (
                "{\"manifests\": [{\"digest\": \"md5:0\"}]}",
                "has no valid sha256 digest",
            ),
        ] {
            let root = dir.path().join("out");
            let _ = fs::remove_dir_all(&root);
            fs::create_dir(&root).unwrap();
            fs::write(root.join("index.json"), text).unwrap();
            let err = LayoutWriter::open(&root)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                err.contains("index.json is not valid: ")
                    && err.contains(reason)
                    && err.ends_with("repair it, or build into another directory"),
                "{text}: {err}"
            );
            assert_eq!(listing(&root), ["index.json"], "{text}");
        }
    }

    /// Temp files live in .bakedb-tmp while a writer works, never in blobs/sha256 or beside
    /// index.json; a committed writer leaves no temp directory; what a killed writer left (in
    /// .bakedb-tmp, or where older versions put it) is reported, then removed by the next
    /// writer.
    #[test]
    fn temp_files_are_out_of_sight_and_cleaned_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let w = LayoutWriter::open(&root).unwrap();
        let mut blob = w.store().writer().unwrap();
        std::io::Write::write_all(&mut blob, b"content").unwrap();
        assert!(blob.temp_path().starts_with(root.join(".bakedb-tmp")));
        let info = blob.commit(None).unwrap();
        w.commit_tag("a", &info.digest, info.size, true).unwrap();
        assert_eq!(
            listing(&root),
            [
                "blobs".to_owned(),
                "blobs/sha256".into(),
                format!("blobs/sha256/{}", info.digest.hex()),
                "index.json".into(),
                "oci-layout".into()
            ]
        );

        // What a killed build leaves, and what earlier versions left.
        fs::create_dir(root.join(".bakedb-tmp")).unwrap();
        fs::write(root.join(".bakedb-tmp/blob.1.0"), vec![0u8; 3000]).unwrap();
        fs::write(root.join("blobs/sha256/tmp.blob.1.0"), vec![0u8; 200]).unwrap();
        fs::write(root.join("tmp.index.json.1.0"), b"{").unwrap();
        let orphan = Digest::of(b"orphan");
        fs::write(root.join("blobs/sha256").join(orphan.hex()), b"orphan").unwrap();
        let garbage = crate::garbage::in_layout(&root, "oci:out").unwrap();
        let mut leftovers: Vec<(String, u64)> = garbage
            .leftovers
            .iter()
            .map(|l| {
                (
                    l.path.strip_prefix(&root).unwrap().display().to_string(),
                    l.bytes,
                )
            })
            .collect();
        leftovers.sort();
        assert_eq!(
            leftovers,
            [
                (".bakedb-tmp/blob.1.0".to_owned(), 3000),
                ("blobs/sha256/tmp.blob.1.0".into(), 200),
                ("tmp.index.json.1.0".into(), 1)
            ]
        );
        assert_eq!(
            garbage.unreferenced,
            [crate::garbage::Unreferenced {
                digest: orphan,
                bytes: 6
            }]
        );
        // While a writer holds the layout, its temp files are not garbage.
        let w = LayoutWriter::open(&root).unwrap();
        let busy = crate::garbage::in_layout(&root, "oci:out").unwrap();
        assert!(busy.writer_active && busy.is_empty(), "{busy:?}");
        w.keep();
        let mut expected = vec![
            "blobs".to_owned(),
            "blobs/sha256".into(),
            format!("blobs/sha256/{}", info.digest.hex()),
            format!("blobs/sha256/{}", orphan.hex()),
            "index.json".into(),
            "oci-layout".into(),
        ];
        expected.sort();
        assert_eq!(
            listing(&root),
            expected,
            "the next writer removed the temp files, and only them"
        );
    }

    #[test]
    fn abandoned_writer_leaves_layout_as_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let w = LayoutWriter::open(&root).unwrap();
        w.store().put(b"x").unwrap();
        drop(w);
        assert!(!root.exists(), "created directory removed");

        let w = LayoutWriter::open(&root).unwrap();
        let blob = w.store().put(b"kept").unwrap();
        w.commit_tag("a", &blob.digest, blob.size, true).unwrap();
        let before = fs::read(root.join("index.json")).unwrap();
        let w = LayoutWriter::open(&root).unwrap();
        let extra = w.store().put(b"extra").unwrap();
        drop(w);
        assert!(!w_path(&root, &extra.digest).exists());
        assert!(w_path(&root, &blob.digest).exists());
        assert_eq!(fs::read(root.join("index.json")).unwrap(), before);
    }

    fn w_path(root: &Path, d: &Digest) -> PathBuf {
        root.join("blobs/sha256").join(d.hex())
    }

    #[test]
    fn no_overwrite_refuses_existing_tag_and_other_tags_survive() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        for (tag, content) in [("a", "1"), ("b", "2")] {
            let w = LayoutWriter::open(&root).unwrap();
            let blob = w.store().put(content.as_bytes()).unwrap();
            w.commit_tag(tag, &blob.digest, blob.size, true).unwrap();
        }
        let w = LayoutWriter::open(&root).unwrap();
        let blob = w.store().put(b"3").unwrap();
        assert!(matches!(
            w.commit_tag("a", &blob.digest, 1, false),
            Err(Error::TagExists { .. })
        ));
        let index: Value =
            serde_json::from_slice(&fs::read(root.join("index.json")).unwrap()).unwrap();
        let tags: Vec<_> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| image::ref_name(e).unwrap().to_owned())
            .collect();
        assert_eq!(tags, ["a", "b"]);
    }

    /// Whatever is at .bakedb-tmp when a writer opens is a dead writer's, even a plain file.
    #[test]
    fn a_temp_path_that_is_not_a_directory_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let w = LayoutWriter::open(&root).unwrap();
        let blob = w.store().put(b"kept").unwrap();
        w.commit_tag("a", &blob.digest, blob.size, true).unwrap();
        fs::write(root.join(".bakedb-tmp"), b"x").unwrap();
        let w = LayoutWriter::open(&root).unwrap();
        let extra = w.store().put(b"extra").unwrap();
        w.commit_tag("b", &extra.digest, extra.size, true).unwrap();
        assert!(!root.join(".bakedb-tmp").exists());
    }

    #[test]
    fn refuses_unrelated_non_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert!(LayoutWriter::open(dir.path()).is_err());
    }
}
