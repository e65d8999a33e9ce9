//! Writing into an OCI image layout directory.
//!
//! A writer holds an exclusive flock on the layout directory for its whole life, so concurrent
//! builds into one layout are serialised and temp files found at open belong to dead writers.
//! Blobs go in first; `index.json` is replaced atomically last, so the layout always describes
//! complete images. If the writer is dropped without committing, it removes the blobs it
//! added (and the directory, if it created it), leaving the layout as it found it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::blob::{BlobInfo, BlobStore};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::image;

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
    /// but is not an OCI layout, so bakedb never scribbles into an unrelated directory.
    pub fn open(root: &Path) -> Result<Self> {
        let created_root = !root.exists();
        if created_root {
            fs::create_dir_all(root).map_err(Error::io("creating output directory", root))?;
        } else if !root.is_dir() {
            return Err(Error::Invalid {
                location: format!("oci:{}", root.display()),
                what: "output".into(),
                reason: "exists and is not a directory".into(),
            });
        }
        let lock = File::open(root).map_err(Error::io("opening output directory", root))?;
        lock.lock()
            .map_err(Error::io("locking output directory", root))?;
        let has_index = root.join("index.json").is_file();
        let non_empty = fs::read_dir(root)
            .map_err(Error::io("listing", root))?
            .next()
            .is_some();
        if !has_index
            && non_empty
            && !root.join("oci-layout").is_file()
            && !root.join("blobs").is_dir()
        {
            return Err(Error::Invalid {
                location: format!("oci:{}", root.display()),
                what: "output directory".into(),
                reason:
                    "is not empty and is not an OCI image layout; choose a new or empty directory"
                        .into(),
            });
        }
        let blobs_dir = root.join("blobs").join("sha256");
        let created_blobs_dir = !root.join("blobs").exists();
        let existing_blobs = match fs::read_dir(&blobs_dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Default::default(),
        };
        let store = BlobStore::create(root)?;
        // We hold the lock, so temp files here belong to writers that died.
        store.remove_stale_temp_files()?;
        fsutil::remove_temp_files(root, "tmp.");
        Ok(LayoutWriter {
            root: root.to_owned(),
            store,
            created_root,
            created_blobs_dir,
            existing_blobs,
            committed: false,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    pub fn read_index(&self) -> Result<Value> {
        let path = self.root.join("index.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Invalid {
                location: format!("oci:{}", self.root.display()),
                what: "index.json".into(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(image::empty_index()),
            Err(e) => Err(Error::Io {
                op: "reading",
                path,
                source: e,
            }),
        }
    }

    pub fn has_tag(&self, tag: &str) -> Result<bool> {
        let index = self.read_index()?;
        Ok(index["manifests"]
            .as_array()
            .is_some_and(|l| l.iter().any(|e| image::ref_name(e) == Some(tag))))
    }

    pub fn put_json(&self, value: &Value) -> Result<BlobInfo> {
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
        let mut index = self.read_index()?;
        if !overwrite && self.has_tag(tag)? {
            return Err(Error::TagExists {
                location: format!("oci:{}", self.root.display()),
                tag: tag.into(),
            });
        }
        image::set_tag(&mut index, tag, manifest_digest, manifest_size);
        let layout_file = self.root.join("oci-layout");
        if fs::read(&layout_file).ok().as_deref() != Some(OCI_LAYOUT) {
            fsutil::write_atomic(&layout_file, OCI_LAYOUT)?;
        }
        fsutil::write_atomic(
            &self.root.join("index.json"),
            &image::canonical_json(&index),
        )?;
        self.committed = true;
        Ok(())
    }

    /// Mark the layout as finished without changing index.json (used for staging layouts).
    pub fn keep(mut self) {
        self.committed = true;
    }
}

impl Drop for LayoutWriter {
    fn drop(&mut self) {
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

    #[test]
    fn refuses_unrelated_non_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert!(LayoutWriter::open(dir.path()).is_err());
    }
}
