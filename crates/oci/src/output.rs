//! Where a build goes: an OCI layout directly, or a staging layout that becomes an archive
//! or is pushed to a registry.
//!
//! A `docker://` output stages what the build writes (its own layers, a base's layers from
//! another registry) in a temporary layout, then pushes blobs first and the manifest last,
//! so the tag moves only once every blob of the image is in the registry. Blobs the
//! registry has are not sent (HEAD); a base's or `--from` image's layers in another
//! repository of the same registry are mounted, never downloaded; a local base's layers
//! are sent from where they are, not copied.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::archive;
use crate::compress::Compression;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::garbage;
use crate::image;
use crate::layer::{self, LayerInfo};
use crate::layout::LayoutWriter;
use crate::reference::{DockerRef, ImageRef};
use crate::registry::{BlobData, Client, PushStats, Pushed, Registries};
use crate::source::{ImageSource, ResolvedImage, check_layer};
use crate::tarball::TarEntry;

pub struct Output {
    target: ImageRef,
    tag: String,
    writer: LayoutWriter,
    settings: OutputSettings,
    push: Option<Push>,
}

/// A registry output: where each blob the staging layout lacks comes from.
struct Push {
    client: Arc<Client>,
    dest: DockerRef,
    /// Blobs the destination repository is known to have.
    present: Mutex<BTreeSet<Digest>>,
    origins: Mutex<BTreeMap<Digest, Origin>>,
    /// Other repositories of the destination registry this build reads (its base, its
    /// --from image): a blob the destination lacks is looked for there and mounted, so a
    /// re-bake into a new repository does not send bakedb-init's and bakedb-serve's layers
    /// again.
    mount_repos: Mutex<Vec<String>>,
}

#[derive(Clone, Debug)]
enum Origin {
    /// Another repository of the destination registry: mounted.
    Mount(String),
    /// A byte range of a local file: a layout's blob, an archive's entry.
    File(PathBuf, u64),
}

impl Push {
    fn known(&self, digest: &Digest) -> bool {
        self.present.lock().expect("push state").contains(digest)
    }

    /// HEAD in the destination, remembered.
    fn in_destination(&self, digest: &Digest) -> Result<bool> {
        if self.known(digest) {
            return Ok(true);
        }
        let has = self
            .client
            .has_blob(&self.dest.repository, digest)?
            .is_some();
        if has {
            self.present.lock().expect("push state").insert(*digest);
        }
        Ok(has)
    }

    /// Whether the push can do without the blob's bytes: the destination has it, or a
    /// repository of the same registry that the build reads has it (recorded for a mount).
    fn has(&self, digest: &Digest) -> Result<bool> {
        if self.in_destination(digest)? {
            return Ok(true);
        }
        if let Some(Origin::Mount(_)) = self.origins.lock().expect("push state").get(digest) {
            return Ok(true);
        }
        let repos = self.mount_repos.lock().expect("push state").clone();
        for repo in repos {
            if self.client.has_blob(&repo, digest)?.is_some() {
                self.origin(*digest, Origin::Mount(repo));
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn origin(&self, digest: Digest, origin: Origin) {
        self.origins
            .lock()
            .expect("push state")
            .insert(digest, origin);
    }

    /// A source in another repository of the same registry: its blobs are mounted.
    fn mountable_from<'s>(&self, source: &'s ImageSource) -> Option<&'s str> {
        source
            .registry_ref()
            .filter(|r| r.registry == self.dest.registry && r.repository != self.dest.repository)
            .map(|r| r.repository.as_str())
    }
}

/// Where a `docker://` output stages what it writes before the push: a hidden staging
/// layout in the temp dir, named as an archive's (`.push-N.bakedb-staging.PID`) so that the
/// next push removes it if this process is killed, removed with its writer otherwise.
fn push_staging_dir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let temp = std::env::temp_dir();
    garbage::clean_beside_archive(&temp, "");
    temp.join(garbage::staging_name(&format!(
        "push-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )))
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
    /// A registry output: what the push sent and what it did not need to.
    pub push: Option<PushStats>,
}

impl Output {
    /// Check the target and open it for writing. Nothing visible changes until `finish`.
    /// A `docker://` target is asked before any work whether the credentials may push to
    /// it (an upload is started and cancelled) and, with `overwrite` false, whether the tag
    /// exists.
    pub fn open(
        target: &ImageRef,
        settings: OutputSettings,
        registries: &Registries,
    ) -> Result<Self> {
        let OutputSettings {
            compression,
            overwrite,
            ..
        } = settings;
        let bad = |reason: &str| Error::BadReference {
            reference: target.to_string(),
            reason: reason.into(),
        };
        let tag = target.tag().ok_or_else(|| bad("an output needs a tag: oci:DIR:TAG, oci-archive:FILE:TAG, docker-archive:FILE:NAME:TAG or docker://HOST/REPO:TAG"))?.to_owned();
        let mut push = None;
        let writer = match target {
            ImageRef::Docker(dest) => {
                let client = registries.client(&dest.registry)?;
                client.check_push(&dest.repository)?;
                if !overwrite && client.head_manifest(dest)?.is_some() {
                    return Err(Error::TagExists {
                        location: dest.location(),
                        tag,
                    });
                }
                push = Some(Push {
                    client,
                    dest: dest.clone(),
                    present: Mutex::default(),
                    origins: Mutex::default(),
                    mount_repos: Mutex::default(),
                });
                LayoutWriter::open(&push_staging_dir())?
            }
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
            push,
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

    /// An image this build reads (its base, its --from image): when it is in another
    /// repository of the registry pushed to, blobs the destination lacks are looked for there
    /// and mounted instead of sent. Nothing for other outputs or sources.
    pub fn may_mount_from(&self, source: &ImageSource) {
        if let Some(push) = &self.push
            && let Some(repo) = push.mountable_from(source)
        {
            let mut repos = push.mount_repos.lock().expect("push state");
            if !repos.iter().any(|r| r == repo) {
                repos.push(repo.to_owned());
            }
        }
    }

    /// A layer whose bytes are the same in every build (bakedb's own binaries, mtime 0): not
    /// written when the output already has it (see `layer::write_fixed_layer`).
    /// Its entries get mtime 0, whatever the build's time, so the blob is the same in every
    /// image.
    pub fn write_fixed_layer(&self, entries: Vec<TarEntry>) -> Result<LayerInfo> {
        let store = self.writer.store();
        let has = |digest: &Digest, size: u64| -> Result<bool> {
            if store.contains(digest, size) {
                return Ok(true);
            }
            match &self.push {
                Some(push) => push.has(digest),
                None => Ok(false),
            }
        };
        layer::write_fixed_layer(
            store,
            (self.writer.had_blobs() || self.push.is_some()).then_some(&has),
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
            out.push(LayerInfo {
                digest: layer.digest,
                size: layer.size,
                diff_id: layer.diff_id,
                // One media-type family per image: Docker layer types become their OCI twins.
                media_type: layer.compression.media_type().to_owned(),
            });
            if let Some(push) = &self.push {
                // In the same registry: mounted at the push, never read. In the destination
                // already: nothing to do. A local blob is checked here and sent from where
                // it is; one from another registry is checked into the staging layout.
                if let Some(from) = push.mountable_from(source) {
                    push.origin(layer.digest, Origin::Mount(from.to_owned()));
                    progress(layer.size);
                    continue;
                }
                if push.has(&layer.digest)? {
                    progress(layer.size);
                    continue;
                }
                if let Some((path, offset)) = source.local_blob(&layer.digest) {
                    let blob = source.open_blob(&layer.digest, "layer")?;
                    check_layer(blob, layer, &location, &mut |b| {
                        progress(b.len() as u64);
                        Ok(())
                    })?;
                    push.origin(layer.digest, Origin::File(path, offset));
                    continue;
                }
            }
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
            let skip = match &self.push {
                Some(push) => {
                    if let Some(from) = push.mountable_from(source) {
                        push.origin(layer.digest, Origin::Mount(from.to_owned()));
                        true
                    } else if push.has(&layer.digest)? {
                        true
                    } else if let Some((path, offset)) = source.local_blob(&layer.digest) {
                        // The registry checks the digest of what it receives.
                        push.origin(layer.digest, Origin::File(path, offset));
                        true
                    } else {
                        false
                    }
                }
                None => false,
            };
            if !skip && !store.contains(&layer.digest, layer.size) {
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
        progress: &mut dyn FnMut(u64),
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
            push: None,
        };
        match &self.target {
            ImageRef::Docker(_) => {
                let push = self.push.as_ref().expect("a registry output has a push");
                let manifest_bytes = image::canonical_json(&manifest);
                let stats = self.push_image(
                    push,
                    &layers,
                    (&config_info.digest, &config_bytes),
                    &manifest_bytes,
                    progress,
                )?;
                return Ok(Written {
                    push: Some(stats),
                    ..written
                });
            }
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

    /// Blobs first (layers, then the config), the manifest last under the tag: a reader of
    /// the tag never finds a blob missing. Each blob is HEADed first and sent only if the
    /// registry lacks it.
    fn push_image(
        &self,
        push: &Push,
        layers: &[LayerInfo],
        config: (&Digest, &[u8]),
        manifest: &[u8],
        progress: &mut dyn FnMut(u64),
    ) -> Result<PushStats> {
        let repo = &push.dest.repository;
        let store = self.writer.store();
        let mut stats = PushStats::default();
        let mut done = BTreeSet::new();
        for layer in layers {
            if !done.insert(layer.digest) {
                continue;
            }
            if push.known(&layer.digest) {
                stats.add(Pushed::AlreadyThere, layer.size);
                progress(layer.size);
                continue;
            }
            let origin = push
                .origins
                .lock()
                .expect("push state")
                .get(&layer.digest)
                .cloned();
            let pushed = match origin {
                Some(Origin::Mount(from)) => {
                    if push.in_destination(&layer.digest)? {
                        Pushed::AlreadyThere
                    } else if push.client.mount_blob(repo, &layer.digest, &from)? {
                        Pushed::Mounted
                    } else {
                        // The registry would not mount it (no pull access to `from`, or a
                        // registry without mounts): bring it over, digest checked.
                        let source = DockerRef {
                            repository: from.clone(),
                            tag: None,
                            digest: Some(layer.digest),
                            ..push.dest.clone()
                        };
                        let mut blob = push.client.open_blob(&from, &layer.digest)?;
                        let mut writer = store.writer()?;
                        let tmp = writer.temp_path().to_owned();
                        std::io::copy(&mut blob, &mut writer)
                            .map_err(Error::io("copying a layer to", &tmp))?;
                        writer.commit(Some((
                            &layer.digest,
                            layer.size,
                            "layer",
                            &source.location(),
                        )))?;
                        let path = store.path(&layer.digest);
                        push.client.push_blob(
                            repo,
                            &layer.digest,
                            layer.size,
                            BlobData::File {
                                path: &path,
                                offset: 0,
                            },
                            &mut |_| {},
                        )?
                    }
                }
                Some(Origin::File(path, offset)) => push.client.push_blob(
                    repo,
                    &layer.digest,
                    layer.size,
                    BlobData::File {
                        path: &path,
                        offset,
                    },
                    &mut |_| {},
                )?,
                None => {
                    let path = store.path(&layer.digest);
                    push.client.push_blob(
                        repo,
                        &layer.digest,
                        layer.size,
                        BlobData::File {
                            path: &path,
                            offset: 0,
                        },
                        &mut |_| {},
                    )?
                }
            };
            progress(layer.size);
            stats.add(pushed, layer.size);
        }
        let (config_digest, config_bytes) = config;
        let pushed = push.client.push_blob(
            repo,
            config_digest,
            config_bytes.len() as u64,
            BlobData::Bytes(config_bytes),
            &mut |_| {},
        )?;
        stats.add(pushed, config_bytes.len() as u64);
        if !self.settings.overwrite && push.client.head_manifest(&push.dest)?.is_some() {
            return Err(Error::TagExists {
                location: push.dest.location(),
                tag: self.tag.clone(),
            });
        }
        push.client
            .put_manifest(repo, &self.tag, manifest, image::MEDIA_TYPE_MANIFEST)?;
        Ok(stats)
    }
}
