//! Where a build goes: an OCI layout directly, or a staging layout that becomes an archive.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use crate::archive;
use crate::compress::Compression;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::garbage;
use crate::image;
use crate::layer::{self, LayerInfo};
use crate::layout::LayoutWriter;
use crate::reference::ImageRef;
use crate::source::{ImageSource, ResolvedImage, check_layer};
use crate::tarball::TarEntry;

pub struct Output {
    target: ImageRef,
    tag: String,
    writer: LayoutWriter,
    settings: OutputSettings,
}

/// How every layer and the image of one build are written, given once.
#[derive(Clone, Copy, Debug)]
pub struct OutputSettings {
    /// Checked against the output kind when the output is opened (docker-archive cannot hold
    /// zstd layers).
    pub compression: Compression,
    /// The mtime of data layers' entries and of archive members (SOURCE_DATE_EPOCH).
    pub mtime: u64,
    /// Compression threads.
    pub threads: usize,
    /// Replace an existing tag or archive.
    pub overwrite: bool,
}

/// What a finished build wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub reference: String,
    pub manifest_digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    pub layers: Vec<LayerInfo>,
}

impl Output {
    /// Check the target and open it for writing. Nothing visible changes until `finish`.
    pub fn open(target: &ImageRef, settings: OutputSettings) -> Result<Self> {
        let OutputSettings {
            compression,
            overwrite,
            ..
        } = settings;
        let bad = |reason: &str| Error::BadReference {
            reference: target.to_string(),
            reason: reason.into(),
        };
        let tag = target.tag().ok_or_else(|| bad("an output needs a tag: oci:DIR:TAG, oci-archive:FILE:TAG or docker-archive:FILE:NAME:TAG"))?.to_owned();
        let writer = match target {
            ImageRef::Oci { dir, .. } => {
                let w = LayoutWriter::open(dir)?;
                if !overwrite && w.has_tag(&tag)? {
                    return Err(Error::TagExists {
                        location: target.location(),
                        tag,
                    });
                }
                w
            }
            ImageRef::OciArchive { file, .. } | ImageRef::DockerArchive { file, .. } => {
                if matches!(target, ImageRef::DockerArchive { .. })
                    && compression == Compression::Zstd
                {
                    return Err(bad(
                        "docker load (Docker before 23) cannot read zstd layers; use --compression gzip for docker-archive",
                    ));
                }
                if !overwrite && file.exists() {
                    return Err(Error::ArchiveExists {
                        location: target.location(),
                    });
                }
                if file.is_dir() {
                    return Err(bad("the archive path is a directory"));
                }
                let dir = match file.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                    _ => PathBuf::from("."),
                };
                if !dir.is_dir() {
                    return Err(Error::Io {
                        op: "opening directory of",
                        path: file.clone(),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    });
                }
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                garbage::clean_beside_archive(&dir, &name);
                LayoutWriter::open(&dir.join(garbage::staging_name(&name)))?
            }
        };
        Ok(Output {
            target: target.clone(),
            tag,
            writer,
            settings,
        })
    }

    /// The compression every layer of this output gets.
    pub fn compression(&self) -> Compression {
        self.settings.compression
    }

    /// A layer of this build's data: its entries get the build's mtime.
    pub fn write_layer(
        &self,
        entries: Vec<TarEntry>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<LayerInfo> {
        let s = &self.settings;
        layer::write_layer(
            self.writer.store(),
            s.compression,
            entries,
            s.mtime,
            s.threads,
            progress,
        )
    }

    /// A layer whose bytes are the same in every build (bakedb's own binaries, mtime 0): not
    /// written when the output already has it (see `layer::write_fixed_layer`).
    /// Its entries get mtime 0, whatever the build's time, so the blob is the same in every
    /// image.
    pub fn write_fixed_layer(&self, entries: Vec<TarEntry>) -> Result<LayerInfo> {
        layer::write_fixed_layer(
            self.writer.store(),
            self.writer.had_blobs(),
            self.settings.compression,
            entries,
            0,
            self.settings.threads,
        )
    }

    /// Copy the base image's layers as they are (no extraction, no recompression), checking
    /// each blob's digest and size and, by decompressing on the fly, its diff_id.
    pub fn copy_base_layers(
        &self,
        source: &ImageSource,
        base: &ResolvedImage,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<LayerInfo>> {
        let store = self.writer.store();
        let location = source.location();
        let mut out = Vec::new();
        for layer in &base.layers {
            let blob = source.open_blob(&layer.digest, "layer")?;
            if store.contains(&layer.digest, layer.size) {
                // Already stored (often: the base lives in the output layout). Still check the
                // base's copy, so a blob that rotted on disk is refused instead of baked.
                check_layer(blob, layer, &location, &mut |b| {
                    progress(b.len() as u64);
                    Ok(())
                })?;
            } else {
                let mut writer = store.writer()?;
                let tmp = writer.temp_path().to_owned();
                check_layer(blob, layer, &location, &mut |b| {
                    progress(b.len() as u64);
                    writer
                        .write_all(b)
                        .map_err(Error::io("copying base layer to", &tmp))
                })?;
                writer.commit(Some((&layer.digest, layer.size, "layer", &location)))?;
            }
            out.push(LayerInfo {
                digest: layer.digest,
                size: layer.size,
                diff_id: layer.diff_id,
                // One media-type family per image: Docker layer types become their OCI twins.
                media_type: layer.compression.media_type().to_owned(),
            });
        }
        Ok(out)
    }

    /// Reuse the layers of a previous image of the same chain (`bakedb build --from`) as they
    /// are. A layer the output already has is not read at all (blobs enter a store only
    /// after their digest was checked); another is copied with its digest and size checked,
    /// not decompressed: the data layers of a chain are large, and a re-bake must not pay
    /// for reading them.
    pub fn reuse_layers(
        &self,
        source: &ImageSource,
        image: &ResolvedImage,
    ) -> Result<Vec<LayerInfo>> {
        let store = self.writer.store();
        let location = source.location();
        let mut out = Vec::new();
        for layer in &image.layers {
            if !store.contains(&layer.digest, layer.size) {
                let mut blob = source.open_blob(&layer.digest, "layer")?;
                let mut writer = store.writer()?;
                let tmp = writer.temp_path().to_owned();
                std::io::copy(&mut blob, &mut writer)
                    .map_err(Error::io("copying a layer to", &tmp))?;
                writer.commit(Some((&layer.digest, layer.size, "layer", &location)))?;
            }
            out.push(LayerInfo {
                digest: layer.digest,
                size: layer.size,
                diff_id: layer.diff_id,
                media_type: layer.compression.media_type().to_owned(),
            });
        }
        Ok(out)
    }

    /// Write config and manifest, then make the image visible: update index.json, or write
    /// the archive and rename it over the output file.
    pub fn finish(
        self,
        config: &Value,
        layers: Vec<LayerInfo>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Written> {
        let mtime = self.settings.mtime;
        let config_bytes = image::canonical_json(config);
        let config_info = self.writer.store().put(&config_bytes)?;
        let manifest = image::manifest(&config_info.digest, config_info.size, &layers, annotations);
        let manifest_info = self.writer.put_json(&manifest)?;
        let written = Written {
            reference: self.target.to_string(),
            manifest_digest: manifest_info.digest,
            manifest_size: manifest_info.size,
            config_digest: config_info.digest,
            layers: layers.clone(),
        };
        match &self.target {
            ImageRef::Oci { .. } => {
                self.writer.commit_tag(
                    &self.tag,
                    &manifest_info.digest,
                    manifest_info.size,
                    self.settings.overwrite,
                )?;
            }
            ImageRef::OciArchive { file, .. } => {
                let staging = self.writer.root().to_owned();
                let result = (|| {
                    // The staging layout gets the tag, then the whole layout becomes the archive.
                    let mut index = image::empty_index();
                    image::set_tag(
                        &mut index,
                        &self.tag,
                        &manifest_info.digest,
                        manifest_info.size,
                    );
                    fs::write(staging.join("index.json"), image::canonical_json(&index))
                        .map_err(Error::io("writing", staging.join("index.json")))?;
                    fs::write(
                        staging.join("oci-layout"),
                        br#"{"imageLayoutVersion":"1.0.0"}"#,
                    )
                    .map_err(Error::io("writing", staging.join("oci-layout")))?;
                    archive::write_oci_archive(
                        &staging,
                        self.writer.store().temp_dir(),
                        file,
                        mtime,
                    )
                })();
                drop(self.writer);
                result?;
            }
            ImageRef::DockerArchive { file, .. } => {
                let store = self.writer.store().clone();
                let result = archive::write_docker_archive(
                    &|d| store.path(d),
                    &config_bytes,
                    &layers,
                    &self.tag,
                    file,
                    self.writer.store().temp_dir(),
                    mtime,
                );
                drop(self.writer);
                result?;
            }
        }
        Ok(written)
    }
}
