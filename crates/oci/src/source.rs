//! Reading images from `oci:`, `oci-archive:` and `docker-archive:` without extracting them.
//!
//! An archive is indexed once (entry name → offset and size) and blobs are read in place.
//! Manifests and configs are small and are hashed and checked when read; layer blobs are
//! returned as readers, and whoever consumes them checks their digests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::compress::Compression;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::{
    self, MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_CONFIG, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_MANIFEST,
};
use crate::index;
use crate::reference::{DockerRef, ImageRef, normalize_docker_name};
use crate::registry::{self, Client, Registries};

/// A merged image file system (see `ImageSource::file_tree`).
#[derive(Clone, Debug, Default)]
pub struct FileTree {
    pub paths: BTreeSet<String>,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl FileTree {
    /// Forget every path starting with `prefix` that `keep` does not hold.
    fn remove_below(&mut self, prefix: &str, keep: &BTreeSet<String>) {
        let doomed: Vec<String> = self
            .paths
            .range(prefix.to_owned()..)
            .take_while(|p| p.starts_with(prefix))
            .filter(|p| !keep.contains(*p))
            .cloned()
            .collect();
        for p in doomed {
            self.files.remove(&p);
            self.paths.remove(&p);
        }
    }
}

/// A layer as the manifest describes it, plus its diff_id from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRef {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub compression: Compression,
    pub diff_id: Digest,
}

/// One image, resolved from a tag, with its manifest and config already checked against
/// their digests and its structure validated.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    pub tag: Option<String>,
    pub manifest_digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub manifest: Value,
    pub config_digest: Digest,
    pub config_bytes: Vec<u8>,
    pub config: Value,
    pub layers: Vec<LayerRef>,
}

pub use crate::index::TagEntry;

/// The tag names of an index for a message: the first few, and how many in all.
#[derive(Default)]
struct TagNames {
    first: Vec<String>,
    count: usize,
}

impl TagNames {
    const SHOWN: usize = 20;

    fn add(&mut self, tag: Option<&str>) {
        self.count += 1;
        if self.first.len() < Self::SHOWN {
            self.first.push(tag.unwrap_or("<untagged>").to_owned());
        }
    }
}

impl std::fmt::Display for TagNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return f.write_str("none");
        }
        f.write_str(&self.first.join(", "))?;
        if self.count > self.first.len() {
            write!(f, " and {} more", self.count - self.first.len())?;
        }
        Ok(())
    }
}

enum Kind {
    Dir(PathBuf),
    /// Archive path and its entries: name → (data offset, size).
    Archive(PathBuf, BTreeMap<String, (u64, u64)>),
    /// A registry: every blob read is checked against its digest as it streams.
    Registry(std::sync::Arc<Client>, DockerRef),
}

pub struct ImageSource {
    reference: ImageRef,
    kind: Kind,
    /// docker-archive: manifest.json turned into OCI manifests, with the digests of layer files.
    docker: Option<Vec<DockerImage>>,
    /// docker-archive: blob digest → entry name, for configs and layer files.
    docker_blobs: BTreeMap<Digest, String>,
}

/// docker-archive entry names of blobs, by digest.
type BlobNames = Vec<(Digest, String)>;

struct DockerImage {
    tags: Vec<String>,
    config_path: String,
    layer_paths: Vec<String>,
    /// The equivalent OCI manifest, computed once when the archive is opened.
    manifest: Vec<u8>,
}

impl ImageSource {
    /// Open a local image, or a registry's with the default options (auth files, system
    /// roots, TLS verified).
    pub fn open(reference: &ImageRef) -> Result<Self> {
        Self::open_with(reference, &Registries::default())
    }

    /// Open an image; a `docker://` one through `registries` (credentials, TLS, tokens
    /// shared with the command's other references).
    pub fn open_with(reference: &ImageRef, registries: &Registries) -> Result<Self> {
        let location = reference.location();
        let kind = match reference {
            ImageRef::Docker(r) => {
                let client = registries.client(&r.registry)?;
                Kind::Registry(client, r.clone())
            }
            ImageRef::Oci { dir, .. } => {
                let index = dir.join("index.json");
                if !index.is_file() {
                    return Err(Error::Invalid {
                        location,
                        what: "OCI layout".into(),
                        reason: format!(
                            "{} does not exist; is this an OCI image layout?",
                            index.display()
                        ),
                    });
                }
                Kind::Dir(dir.clone())
            }
            ImageRef::OciArchive { file, .. } | ImageRef::DockerArchive { file, .. } => {
                Kind::Archive(file.clone(), index_archive(file, &location)?)
            }
        };
        let mut source = ImageSource {
            reference: reference.clone(),
            kind,
            docker: None,
            docker_blobs: BTreeMap::new(),
        };
        if matches!(reference, ImageRef::DockerArchive { .. }) {
            let mut images = source.read_docker_manifest()?;
            for img in &mut images {
                let (manifest, blobs) = source.docker_manifest(img)?;
                img.manifest = manifest;
                source.docker_blobs.extend(blobs);
            }
            source.docker = Some(images);
        }
        Ok(source)
    }

    pub fn location(&self) -> String {
        self.reference.location()
    }

    /// The registry reference, for a `docker://` source.
    pub fn registry_ref(&self) -> Option<&DockerRef> {
        match &self.kind {
            Kind::Registry(_, r) => Some(r),
            _ => None,
        }
    }

    /// Where a blob's bytes lie on disk (a file and an offset in it), for a local source:
    /// a push reads them from there instead of copying them first.
    pub fn local_blob(&self, digest: &Digest) -> Option<(PathBuf, u64)> {
        let name = match &self.docker {
            Some(_) => self.docker_blobs.get(digest).cloned()?,
            None => format!("blobs/sha256/{}", digest.hex()),
        };
        match &self.kind {
            Kind::Dir(dir) => Some((dir.join(name), 0)),
            Kind::Archive(file, entries) => entries
                .get(name.trim_start_matches("./"))
                .map(|&(offset, _)| (file.clone(), offset)),
            Kind::Registry(..) => None,
        }
    }

    /// A registry blob that was read only in part (a file found early in a layer) is read
    /// to its end, so its digest is checked all the same; a local one is left as it is.
    fn finish_blob(&self, rest: &mut dyn Read) -> io::Result<()> {
        if matches!(self.kind, Kind::Registry(..)) {
            io::copy(rest, &mut io::sink())?;
        }
        Ok(())
    }

    fn open_path(&self, name: &str) -> Result<Option<Box<dyn Read + '_>>> {
        match &self.kind {
            Kind::Dir(dir) => {
                let path = dir.join(name);
                match File::open(&path) {
                    Ok(f) => Ok(Some(Box::new(f))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::Io {
                        op: "opening",
                        path,
                        source: e,
                    }),
                }
            }
            Kind::Archive(file, entries) => {
                let Some(&(offset, size)) = entries.get(name.trim_start_matches("./")) else {
                    return Ok(None);
                };
                let mut f = File::open(file).map_err(Error::io("opening", file))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(Error::io("seeking in", file))?;
                Ok(Some(Box::new(f.take(size))))
            }
            Kind::Registry(..) => Ok(None),
        }
    }

    fn read_small(&self, name: &str, what: &str) -> Result<Vec<u8>> {
        let mut r = self.open_path(name)?.ok_or_else(|| Error::Invalid {
            location: self.location(),
            what: what.into(),
            reason: format!("{name} is missing"),
        })?;
        let mut buf = Vec::new();
        r.read_to_end(&mut buf)
            .map_err(Error::io("reading", PathBuf::from(name)))?;
        Ok(buf)
    }

    fn parse_json(&self, bytes: &[u8], what: &str) -> Result<Value> {
        serde_json::from_slice(bytes).map_err(|e| Error::Invalid {
            location: self.location(),
            what: what.into(),
            reason: e.to_string(),
        })
    }

    /// A reader over a blob's bytes as stored. The caller verifies digest and size.
    pub fn open_blob(&self, digest: &Digest, what: &str) -> Result<Box<dyn Read + '_>> {
        if let Kind::Registry(client, r) = &self.kind {
            return Ok(Box::new(client.open_blob(&r.repository, digest)?));
        }
        let name = match &self.docker {
            Some(_) => self.docker_blobs.get(digest).cloned().unwrap_or_default(),
            None => format!("blobs/sha256/{}", digest.hex()),
        };
        self.open_path(&name)?.ok_or_else(|| Error::MissingBlob {
            expected: digest.to_string(),
            what: what.into(),
            location: self.location(),
        })
    }

    /// Every layer blob of `image` is present with its descriptor's size: a cheap check that
    /// lets a build refuse a broken base before it does any work.
    pub fn check_layers_present(&self, image: &ResolvedImage) -> Result<()> {
        for layer in &image.layers {
            let size = match (&self.kind, &self.docker) {
                (Kind::Registry(client, r), _) => client.has_blob(&r.repository, &layer.digest)?,
                (Kind::Dir(dir), _) => {
                    std::fs::metadata(dir.join("blobs/sha256").join(layer.digest.hex()))
                        .ok()
                        .map(|m| m.len())
                }
                (Kind::Archive(_, entries), None) => entries
                    .get(&format!("blobs/sha256/{}", layer.digest.hex()))
                    .map(|e| e.1),
                (Kind::Archive(..), Some(_)) => Some(layer.size), // hashed when the archive was opened
            };
            match size {
                None => {
                    return Err(Error::MissingBlob {
                        expected: layer.digest.to_string(),
                        what: "layer".into(),
                        location: self.location(),
                    });
                }
                Some(actual_size) if actual_size != layer.size => {
                    return Err(Error::DigestMismatch {
                        expected: layer.digest.to_string(),
                        what: "layer".into(),
                        location: self.location(),
                        actual: "(not computed)".into(),
                        expected_size: layer.size,
                        actual_size,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Read a small blob whole and check it against its descriptor.
    fn read_blob_checked(&self, digest: &Digest, size: u64, what: &str) -> Result<Vec<u8>> {
        let mut r = self.open_blob(digest, what)?;
        let mut buf = Vec::new();
        // Bounded so that a wrong size in a descriptor cannot make us read a huge file.
        (&mut r)
            .take(size.min(64 << 20) + 1)
            .read_to_end(&mut buf)
            .map_err(Error::io("reading blob", PathBuf::from(digest.to_string())))?;
        let actual = Digest::of(&buf);
        if actual != *digest || buf.len() as u64 != size {
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                what: what.into(),
                location: self.location(),
                actual: actual.to_string(),
                expected_size: size,
                actual_size: buf.len() as u64,
            });
        }
        Ok(buf)
    }

    /// Every image entry of the index, tagged or not. Holds one small record per entry;
    /// `for_each_tag` holds none.
    pub fn tags(&self) -> Result<Vec<TagEntry>> {
        let mut out = Vec::new();
        self.for_each_tag(&mut |t| {
            out.push(t);
            Ok(())
        })?;
        Ok(out)
    }

    /// Every image entry of the index, in order, one at a time: index.json is streamed, not
    /// read whole (a layout may hold hundreds of thousands of tags).
    pub fn for_each_tag(&self, each: &mut dyn FnMut(TagEntry) -> Result<()>) -> Result<()> {
        if let Kind::Registry(client, r) = &self.kind {
            // A registry's other tags would cost a request each: the reference's own only.
            let d = client
                .head_manifest(r)?
                .ok_or_else(|| client.not_found(r))?;
            return each(TagEntry {
                tag: r.tag.clone(),
                digest: d.digest,
                size: d.size,
                media_type: d.media_type,
            });
        }
        if let Some(images) = &self.docker {
            for img in images {
                let (digest, size) = (Digest::of(&img.manifest), img.manifest.len() as u64);
                let tags: Vec<Option<String>> = if img.tags.is_empty() {
                    vec![None]
                } else {
                    img.tags.iter().cloned().map(Some).collect()
                };
                for tag in tags {
                    each(TagEntry {
                        tag,
                        digest,
                        size,
                        media_type: MEDIA_TYPE_MANIFEST.into(),
                    })?;
                }
            }
            return Ok(());
        }
        let location = self.location();
        let reader = self.open_path("index.json")?.ok_or_else(|| match &self.kind {
            Kind::Archive(file, entries) if entries.contains_key("manifest.json") => {
                Error::BadArchive {
                    location: location.clone(),
                    reason: format!(
                        "{} is a docker-archive, not an oci-archive (it has manifest.json, no index.json): use docker-archive:{}",
                        file.display(),
                        file.display()
                    ),
                }
            }
            Kind::Archive(file, _) => Error::BadArchive {
                location: location.clone(),
                reason: format!(
                    "{} is a tar archive without index.json, so not an oci-archive (`skopeo copy ... oci-archive:FILE` writes one)",
                    file.display()
                ),
            },
            Kind::Dir(_) | Kind::Registry(..) => Error::Invalid {
                location: location.clone(),
                what: "index.json".into(),
                reason: "index.json is missing".into(),
            },
        })?;
        index::read(reader, &location, Path::new("index.json"), &mut |entry| {
            each(TagEntry::from_value(&entry, &location)?)
        })?;
        Ok(())
    }

    /// The image the reference names: its tag, or the only image when no tag is given.
    /// Streams the index, keeping the entry it looks for, the first few tag names (for the
    /// message when it is not there) and, without a tag, the distinct digests.
    pub fn resolve(&self) -> Result<ResolvedImage> {
        if let Kind::Registry(client, r) = &self.kind {
            return self.resolve_registry(client, r);
        }
        let wanted = self.reference.tag();
        let docker = self.docker.is_some();
        let mut found: Option<TagEntry> = None;
        let mut names = TagNames::default();
        let mut distinct: BTreeSet<Digest> = BTreeSet::new();
        self.for_each_tag(&mut |t| {
            names.add(t.tag.as_deref());
            match wanted {
                Some(tag) => {
                    let hit = match t.tag.as_deref() {
                        Some(name) if docker => {
                            normalize_docker_name(name) == normalize_docker_name(tag)
                        }
                        name => !docker && name == Some(tag),
                    };
                    if hit && found.is_none() {
                        found = Some(t);
                    }
                }
                None => {
                    if distinct.insert(t.digest) && found.is_none() {
                        found = Some(t);
                    }
                }
            }
            Ok(())
        })?;
        let entry = match (wanted, found) {
            (Some(_), Some(entry)) => entry,
            (None, Some(entry)) if distinct.len() == 1 => entry,
            (Some(tag), None) => {
                return Err(Error::TagNotFound {
                    location: self.location(),
                    tag: tag.to_owned(),
                    available: names.to_string(),
                });
            }
            (None, _) => {
                return Err(Error::AmbiguousImage {
                    location: self.location(),
                    count: distinct.len(),
                    available: names.to_string(),
                });
            }
        };
        if entry.media_type != MEDIA_TYPE_MANIFEST && entry.media_type != MEDIA_TYPE_DOCKER_MANIFEST
        {
            return Err(Error::UnsupportedMediaType {
                location: self.location(),
                what: format!(
                    "index entry {} (nested indexes and manifest lists are not supported; copy one platform with skopeo copy)",
                    entry.digest
                ),
                media_type: entry.media_type.clone(),
            });
        }
        let manifest_bytes = match &self.docker {
            Some(_) => {
                let i = self.docker_image_index(wanted)?;
                self.docker.as_ref().expect("docker archive")[i]
                    .manifest
                    .clone()
            }
            None => self.read_blob_checked(&entry.digest, entry.size, "manifest")?,
        };
        self.resolve_manifest(wanted.map(str::to_owned), entry.digest, manifest_bytes)
    }

    /// A registry's manifest, or the linux/<host arch> image of its index, digests checked.
    fn resolve_registry(&self, client: &Client, r: &DockerRef) -> Result<ResolvedImage> {
        let mut manifest = client.get_manifest(r)?;
        if manifest.media_type == registry::MEDIA_TYPE_INDEX
            || manifest.media_type == registry::MEDIA_TYPE_DOCKER_LIST
        {
            let index = self.parse_json(&manifest.bytes, "image index")?;
            let (digest, _) = registry::pick_platform(&index, &r.location())?;
            let by_digest = DockerRef {
                tag: None,
                digest: Some(digest),
                ..r.clone()
            };
            manifest = client.get_manifest(&by_digest)?;
        }
        self.resolve_manifest(r.tag.clone(), manifest.digest, manifest.bytes)
    }

    fn resolve_manifest(
        &self,
        tag: Option<String>,
        manifest_digest: Digest,
        manifest_bytes: Vec<u8>,
    ) -> Result<ResolvedImage> {
        let location = self.location();
        let manifest = self.parse_json(&manifest_bytes, "manifest")?;
        let invalid = |reason: String| Error::Invalid {
            location: location.clone(),
            what: format!("manifest {manifest_digest}"),
            reason,
        };
        let media_type = manifest
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or(MEDIA_TYPE_MANIFEST);
        if media_type != MEDIA_TYPE_MANIFEST && media_type != MEDIA_TYPE_DOCKER_MANIFEST {
            return Err(Error::UnsupportedMediaType {
                location,
                what: "manifest".into(),
                media_type: media_type.into(),
            });
        }
        if manifest.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
            return Err(invalid("schemaVersion is not 2".into()));
        }
        let desc = |v: &Value, what: &str| -> Result<(Digest, u64, String)> {
            let digest = v
                .get("digest")
                .and_then(Value::as_str)
                .and_then(|d| d.parse().ok());
            let size = v.get("size").and_then(Value::as_u64);
            let mt = v.get("mediaType").and_then(Value::as_str);
            match (digest, size, mt) {
                (Some(d), Some(s), Some(m)) => Ok((d, s, m.to_owned())),
                _ => Err(invalid(format!(
                    "{what} descriptor needs mediaType, a sha256 digest and size: {v}"
                ))),
            }
        };
        let (config_digest, config_size, config_mt) = desc(
            manifest
                .get("config")
                .ok_or_else(|| invalid("has no config".into()))?,
            "config",
        )?;
        if config_mt != MEDIA_TYPE_CONFIG && config_mt != MEDIA_TYPE_DOCKER_CONFIG {
            return Err(Error::UnsupportedMediaType {
                location,
                what: "config".into(),
                media_type: config_mt,
            });
        }
        let config_bytes = self.read_blob_checked(&config_digest, config_size, "config")?;
        let config = self.parse_json(&config_bytes, "config")?;
        serde_json::from_value::<oci_spec::image::ImageConfiguration>(config.clone()).map_err(
            |e| Error::Invalid {
                location: location.clone(),
                what: format!("config {config_digest}"),
                reason: e.to_string(),
            },
        )?;
        let diff_ids: Vec<Digest> = config["rootfs"]["diff_ids"]
            .as_array()
            .ok_or_else(|| invalid("config has no rootfs.diff_ids".into()))?
            .iter()
            .map(|d| {
                d.as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| invalid(format!("config diff_id {d} is not a sha256 digest")))
            })
            .collect::<Result<_>>()?;
        let layer_values = manifest
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("has no layers array".into()))?;
        if layer_values.len() != diff_ids.len() {
            return Err(invalid(format!(
                "lists {} layers but the config lists {} diff_ids",
                layer_values.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (i, (v, diff_id)) in layer_values.iter().zip(diff_ids).enumerate() {
            let (digest, size, media_type) = desc(v, &format!("layer {i}"))?;
            let compression = Compression::from_media_type(&media_type).ok_or_else(|| {
                Error::UnsupportedMediaType {
                    location: location.clone(),
                    what: format!("layer {i} ({digest})"),
                    media_type: media_type.clone(),
                }
            })?;
            layers.push(LayerRef {
                digest,
                size,
                media_type,
                compression,
                diff_id,
            });
        }
        Ok(ResolvedImage {
            tag,
            manifest_digest,
            manifest_bytes,
            manifest,
            config_digest,
            config_bytes,
            config,
            layers,
        })
    }

    /// A regular file's content from the newest layer that has it, searching layers from the
    /// top and giving up below the first layer larger than `max_layer_size` (compressed).
    pub fn find_file(
        &self,
        layers: &[LayerRef],
        path: &str,
        max_layer_size: u64,
    ) -> Result<Option<Vec<u8>>> {
        let location = self.location();
        for layer in layers.iter().rev() {
            let blob = self.open_blob(&layer.digest, "layer")?;
            let corrupt = |e: io::Error| Error::CorruptStream {
                layer: layer.digest.to_string(),
                location: location.clone(),
                media_type: layer.media_type.clone(),
                source: e,
            };
            let mut archive = tar::Archive::new(layer.compression.decoder(blob).map_err(corrupt)?);
            for entry in archive.entries().map_err(corrupt)? {
                let mut entry = entry.map_err(corrupt)?;
                let name = entry_name(&entry).map_err(corrupt)?;
                if name == path && entry.header().entry_type().is_file() {
                    let mut bytes = Vec::new();
                    entry.read_to_end(&mut bytes).map_err(corrupt)?;
                    drop(entry);
                    self.finish_blob(&mut archive.into_inner())
                        .map_err(corrupt)?;
                    return Ok(Some(bytes));
                }
            }
            self.finish_blob(&mut archive.into_inner())
                .map_err(corrupt)?;
            if layer.size > max_layer_size {
                break;
            }
        }
        Ok(None)
    }

    /// Copy a regular file's content from the newest layer that has it into `dest`, streamed
    /// (a data file may be gigabytes). False when no layer has it.
    pub fn extract_file(&self, layers: &[LayerRef], path: &str, dest: &Path) -> Result<bool> {
        let location = self.location();
        for layer in layers.iter().rev() {
            let blob = self.open_blob(&layer.digest, "layer")?;
            let corrupt = |e: io::Error| Error::CorruptStream {
                layer: layer.digest.to_string(),
                location: location.clone(),
                media_type: layer.media_type.clone(),
                source: e,
            };
            let mut archive = tar::Archive::new(layer.compression.decoder(blob).map_err(corrupt)?);
            for entry in archive.entries().map_err(corrupt)? {
                let mut entry = entry.map_err(corrupt)?;
                if entry_name(&entry).map_err(corrupt)? == path
                    && entry.header().entry_type().is_file()
                {
                    let mut out = File::create(dest).map_err(Error::io("creating", dest))?;
                    io::copy(&mut entry, &mut out).map_err(corrupt)?;
                    drop(entry);
                    self.finish_blob(&mut archive.into_inner())
                        .map_err(corrupt)?;
                    return Ok(true);
                }
            }
            self.finish_blob(&mut archive.into_inner())
                .map_err(corrupt)?;
        }
        Ok(false)
    }

    /// The image's merged file system, as a container sees it: every path (relative, no
    /// trailing '/') left after applying the layers bottom to top with their whiteouts
    /// (`.wh.NAME` removes NAME, `.wh..wh..opq` empties its directory of what lower layers
    /// put there), and the contents of the regular files `wants` asks for (up to the number
    /// of bytes it returns), from the top layer that has them. One pass over every layer.
    pub fn file_tree(
        &self,
        layers: &[LayerRef],
        wants: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<FileTree> {
        let location = self.location();
        let mut tree = FileTree::default();
        for layer in layers {
            let blob = self.open_blob(&layer.digest, "layer")?;
            let corrupt = |e: io::Error| Error::CorruptStream {
                layer: layer.digest.to_string(),
                location: location.clone(),
                media_type: layer.media_type.clone(),
                source: e,
            };
            let mut archive = tar::Archive::new(layer.compression.decoder(blob).map_err(corrupt)?);
            // Whiteouts hide only what lower layers have: entries of this layer added after
            // (or before) its opaque marker stay.
            let mut added = BTreeSet::new();
            for entry in archive.entries().map_err(corrupt)? {
                let mut entry = entry.map_err(corrupt)?;
                let name = entry_name(&entry).map_err(corrupt)?;
                let name = name.trim_end_matches('/').to_owned();
                let (dir, base) = match name.rsplit_once('/') {
                    Some((d, b)) => (Some(d), b),
                    None => (None, name.as_str()),
                };
                let under = |d: Option<&str>, b: &str| match d {
                    Some(d) => format!("{d}/{b}"),
                    None => b.to_owned(),
                };
                if base == ".wh..wh..opq" {
                    let prefix = dir.map(|d| format!("{d}/")).unwrap_or_default();
                    tree.remove_below(&prefix, &added);
                    continue;
                }
                if let Some(hidden) = base.strip_prefix(".wh.") {
                    let path = under(dir, hidden);
                    tree.remove_below(&format!("{path}/"), &added);
                    tree.paths.remove(&path);
                    tree.files.remove(&path);
                    continue;
                }
                if name.is_empty() || name == "." {
                    continue;
                }
                tree.files.remove(&name);
                if entry.header().entry_type().is_file()
                    && let Some(limit) = wants(&name)
                {
                    let mut bytes = Vec::new();
                    (&mut entry)
                        .take(limit as u64)
                        .read_to_end(&mut bytes)
                        .map_err(corrupt)?;
                    tree.files.insert(name.clone(), bytes);
                }
                added.insert(name.clone());
                tree.paths.insert(name);
            }
            self.finish_blob(&mut archive.into_inner())
                .map_err(corrupt)?;
        }
        Ok(tree)
    }

    fn read_docker_manifest(&self) -> Result<Vec<DockerImage>> {
        if let Kind::Archive(file, entries) = &self.kind
            && !entries.contains_key("manifest.json")
        {
            let oci = entries.contains_key("index.json") && entries.contains_key("oci-layout");
            return Err(Error::BadArchive {
                location: self.location(),
                reason: if oci {
                    format!(
                        "{} is an oci-archive, not a docker-archive (it has index.json and oci-layout, no manifest.json): use oci-archive:{}",
                        file.display(),
                        file.display()
                    )
                } else {
                    format!(
                        "{} is a tar archive without manifest.json, so not a docker-archive (`docker save` and `skopeo copy ... docker-archive:FILE` write one)",
                        file.display()
                    )
                },
            });
        }
        let bytes = self.read_small("manifest.json", "docker-archive manifest.json")?;
        let value = self.parse_json(&bytes, "docker-archive manifest.json")?;
        let invalid = |reason: &str| Error::Invalid {
            location: self.location(),
            what: "manifest.json".into(),
            reason: reason.into(),
        };
        let list = value.as_array().ok_or_else(|| invalid("is not an array"))?;
        list.iter()
            .map(|img| {
                let strings = |key: &str| -> Vec<String> {
                    img.get(key)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                Ok(DockerImage {
                    tags: strings("RepoTags"),
                    config_path: img
                        .get("Config")
                        .and_then(Value::as_str)
                        .ok_or_else(|| invalid("an entry has no Config"))?
                        .to_owned(),
                    layer_paths: strings("Layers"),
                    manifest: Vec::new(),
                })
            })
            .collect()
    }

    fn docker_image_index(&self, wanted: Option<&str>) -> Result<usize> {
        let images = self.docker.as_ref().expect("docker archive");
        let all_tags = || {
            images
                .iter()
                .flat_map(|i| i.tags.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match wanted {
            Some(tag) => images
                .iter()
                .position(|i| {
                    i.tags
                        .iter()
                        .any(|t| normalize_docker_name(t) == normalize_docker_name(tag))
                })
                .ok_or_else(|| Error::TagNotFound {
                    location: self.location(),
                    tag: tag.into(),
                    available: all_tags(),
                }),
            None if images.len() == 1 => Ok(0),
            None => Err(Error::AmbiguousImage {
                location: self.location(),
                count: images.len(),
                available: all_tags(),
            }),
        }
    }

    /// An OCI manifest equivalent to a docker-archive image: layer digests are the digests of
    /// the layer files as stored, compression sniffed from their first bytes.
    fn docker_manifest(&self, img: &DockerImage) -> Result<(Vec<u8>, BlobNames)> {
        let config = self.read_small(&img.config_path, "config")?;
        let mut blobs = vec![(Digest::of(&config), img.config_path.clone())];
        let mut layers = Vec::new();
        for path in &img.layer_paths {
            let mut r = self.open_path(path)?.ok_or_else(|| Error::MissingBlob {
                expected: path.clone(),
                what: "layer".into(),
                location: self.location(),
            })?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            let mut prefix = Vec::new();
            loop {
                let n = r
                    .read(&mut buf)
                    .map_err(Error::io("reading", PathBuf::from(path)))?;
                if n == 0 {
                    break;
                }
                if prefix.len() < 4 {
                    prefix.extend_from_slice(&buf[..n.min(4)]);
                }
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            let digest = Digest::from_hasher(hasher);
            blobs.push((digest, path.clone()));
            layers.push(crate::layer::LayerInfo {
                digest,
                size,
                diff_id: Digest::of(b""),
                media_type: Compression::sniff(&prefix).media_type().to_owned(),
            });
        }
        let m = image::manifest(
            &Digest::of(&config),
            config.len() as u64,
            &layers,
            &BTreeMap::new(),
        );
        Ok((image::canonical_json(&m), blobs))
    }
}

/// A tar entry's path as archives spell it in every tool's output: without a leading `./`.
fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> io::Result<String> {
    Ok(entry
        .path()?
        .to_string_lossy()
        .trim_start_matches("./")
        .to_owned())
}

const BLOCK: u64 = 512;

/// Index an archive (entry name → data offset and size), or say in words what it is
/// instead: not a tar at all (the tar crate's own words, "numeric field was not a number",
/// tell a user nothing), or one cut short by a copy or download that did not finish (which
/// otherwise reads as a complete archive that lacks manifest.json or index.json).
fn index_archive(file: &Path, location: &str) -> Result<BTreeMap<String, (u64, u64)>> {
    let bad = |reason: String| Error::BadArchive {
        location: location.to_owned(),
        reason,
    };
    let mut f = File::open(file).map_err(Error::io("opening archive", file))?;
    let len = f
        .metadata()
        .map_err(Error::io("reading archive", file))?
        .len();
    let mut first = [0u8; BLOCK as usize];
    let n = read_up_to(&mut f, &mut first).map_err(Error::io("reading archive", file))?;
    if let Some(what) = not_a_tar(&first[..n], len) {
        return Err(bad(format!(
            "{} is not a tar archive ({what}); an oci-archive or docker-archive is an uncompressed tar file as `skopeo copy` or `docker save` writes it: check the path and the transport (a layout directory is oci:DIR)",
            file.display()
        )));
    }
    f.seek(SeekFrom::Start(0))
        .map_err(Error::io("reading archive", file))?;
    let truncated = |what: String| {
        bad(format!(
            "{} is truncated or incomplete: {what}; whatever wrote it (a copy, a download, skopeo copy, docker save) did not finish: write it again",
            file.display()
        ))
    };
    let mut archive = tar::Archive::new(f);
    let mut entries = BTreeMap::new();
    let mut last: Option<String> = None;
    let mut end = 0u64;
    let damaged = |last: &Option<String>, e: io::Error| {
        let after = match last {
            Some(name) => format!("after entry {name}"),
            None => "at its first entry".to_owned(),
        };
        bad(format!(
            "{} is damaged {after}: {e}; write it again",
            file.display()
        ))
    };
    for entry in archive.entries_with_seek().map_err(|e| damaged(&None, e))? {
        let entry = entry.map_err(|e| damaged(&last, e))?;
        let name = entry_name(&entry).map_err(|e| damaged(&last, e))?;
        let (offset, size) = (entry.raw_file_position(), entry.size());
        if offset + size > len {
            return Err(truncated(format!(
                "entry {name} needs {size} bytes from offset {offset}, and the file ends at {len}"
            )));
        }
        end = end.max((offset + size).next_multiple_of(BLOCK));
        if entry.header().entry_type().is_file() {
            entries.insert(name.clone(), (offset, size));
        }
        last = Some(name);
    }
    // A tar ends with zero blocks. Cut at an entry boundary, it would read as a complete
    // archive of fewer entries.
    let mut f = archive.into_inner();
    let mut marker = [0u8; BLOCK as usize];
    f.seek(SeekFrom::Start(end))
        .map_err(Error::io("reading archive", file))?;
    let n = read_up_to(&mut f, &mut marker).map_err(Error::io("reading archive", file))?;
    if n < marker.len() || marker.iter().any(|b| *b != 0) {
        return Err(truncated(format!(
            "it ends after {} without tar's end-of-archive marker",
            match &last {
                Some(name) => format!("entry {name}"),
                None => "no entry".into(),
            }
        )));
    }
    Ok(entries)
}

/// Read until `buf` is full or the input ends; the number of bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a file is when its first block is not a tar header, in a few words; None for a tar.
fn not_a_tar(first: &[u8], len: u64) -> Option<String> {
    if len == 0 {
        return Some("it is empty".into());
    }
    let compressed = match first {
        [0x1f, 0x8b, ..] => Some("gzip"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
        [b'B', b'Z', b'h', ..] => Some("bzip2"),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Some("xz"),
        _ => None,
    };
    if let Some(c) = compressed {
        return Some(format!("it is {c}-compressed: decompress it first"));
    }
    if first.len() < BLOCK as usize {
        return Some(format!("it has {len} bytes, less than one tar header"));
    }
    if first.iter().all(|b| *b == 0) {
        // An empty tar (just the end marker) is a tar; the caller finds no entries.
        return None;
    }
    // A tar header's checksum: the sum of its bytes with the checksum field read as spaces.
    let stored = std::str::from_utf8(&first[148..156])
        .ok()
        .map(|t| t.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|t| u32::from_str_radix(t, 8).ok());
    let computed: u32 = first
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    (stored != Some(computed)).then(|| "its first 512 bytes are not a tar header".into())
}

/// Stream a layer blob through `sink`, checking its digest and size and, by decompressing
/// it, its diff_id. Fails on the first mismatch or on a corrupt compressed stream.
pub fn check_layer<R: Read>(
    blob: R,
    layer: &LayerRef,
    location: &str,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    struct Tee<'s, R> {
        inner: R,
        hasher: Sha256,
        size: u64,
        sink: &'s mut dyn FnMut(&[u8]) -> Result<()>,
        sink_error: Option<Error>,
    }
    impl<R: Read> Read for Tee<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hasher.update(&buf[..n]);
            self.size += n as u64;
            if let Err(e) = (self.sink)(&buf[..n]) {
                self.sink_error = Some(e);
                return Err(io::Error::other("sink failed"));
            }
            Ok(n)
        }
    }
    let mut tee = Tee {
        inner: blob,
        hasher: Sha256::new(),
        size: 0,
        sink,
        sink_error: None,
    };
    let corrupt = |e: io::Error| Error::CorruptStream {
        layer: layer.digest.to_string(),
        location: location.to_owned(),
        media_type: layer.media_type.clone(),
        source: e,
    };
    let mut diff_hasher = Sha256::new();
    let streamed = (|| {
        let mut decoder = layer.compression.decoder(&mut tee)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = decoder.read(&mut buf)?;
            if n == 0 {
                break;
            }
            diff_hasher.update(&buf[..n]);
        }
        drop(decoder);
        // Trailing bytes after the compressed stream still belong to the blob.
        io::copy(&mut tee, &mut io::sink())
    })();
    if let Some(e) = tee.sink_error.take() {
        return Err(e);
    }
    // A damaged blob usually breaks the decoder first. Hash the rest of it so that a blob that
    // is not what its descriptor says is reported as that (copy the image again), and only a
    // blob that matches its digest but does not decompress as a broken stream (fix the image).
    let decode_error = streamed.err();
    if decode_error.is_some() {
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = tee.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        if let Some(e) = tee.sink_error.take() {
            return Err(e);
        }
    }
    let digest = Digest::from_hasher(std::mem::take(&mut tee.hasher));
    if digest != layer.digest || tee.size != layer.size {
        return Err(Error::DigestMismatch {
            expected: layer.digest.to_string(),
            what: "layer".into(),
            location: location.to_owned(),
            actual: digest.to_string(),
            expected_size: layer.size,
            actual_size: tee.size,
        });
    }
    if let Some(e) = decode_error {
        return Err(corrupt(e));
    }
    let diff_id = Digest::from_hasher(diff_hasher);
    if diff_id != layer.diff_id {
        return Err(Error::DiffIdMismatch {
            layer: layer.digest.to_string(),
            location: location.to_owned(),
            expected: layer.diff_id.to_string(),
            actual: diff_id.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A docker-archive's entries, as `docker save` orders them: config, layer, manifest.json.
    fn docker_archive_bytes() -> Vec<u8> {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            Digest::of(b"layer")
        )
        .into_bytes();
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("config.json", config),
            ("layer.tar", vec![7u8; 10_000]),
            (
                "manifest.json",
                br#"[{"Config":"config.json","RepoTags":["app:v1"],"Layers":["layer.tar"]}]"#
                    .to_vec(),
            ),
        ] {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn open_error(dir: &Path, transport: &str, bytes: &[u8]) -> String {
        let file = dir.join("x.tar");
        std::fs::write(&file, bytes).unwrap();
        let reference: ImageRef = format!("{transport}:{}", file.display()).parse().unwrap();
        match ImageSource::open(&reference) {
            Ok(source) => source
                .resolve()
                .err()
                .map_or_else(|| "opened and resolved".into(), |e| e.to_string()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_archive_that_is_not_a_tar_or_is_cut_short_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let whole = docker_archive_bytes();
        assert_eq!(
            open_error(d, "docker-archive", &whole),
            "opened and resolved"
        );
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gzip, &whole).unwrap();
        let gzipped = gzip.finish().unwrap();
        // The end of manifest.json's data: everything up to the end-of-archive marker.
        let manifest_end = whole.len() - 1024;
        let layer_header = 1024; // config.json's header and data block
        for (bytes, needle) in [
            (
                &b"these are notes, not an archive\n".repeat(40)[..],
                "is not a tar archive (its first 512 bytes are not a tar header); an oci-archive or docker-archive is an uncompressed tar file",
            ),
            (
                &gzipped[..],
                "is not a tar archive (it is gzip-compressed: decompress it first)",
            ),
            (&[][..], "is not a tar archive (it is empty)"),
            (
                &whole[..100],
                "is not a tar archive (it has 100 bytes, less than one tar header)",
            ),
            (
                &whole[..layer_header + 512 + 4000],
                "is truncated or incomplete: entry layer.tar needs 10000 bytes from offset 1536",
            ),
            (
                &whole[..manifest_end],
                "is truncated or incomplete: it ends after entry manifest.json without tar's end-of-archive marker",
            ),
            (
                &whole[..layer_header],
                "is truncated or incomplete: it ends after entry config.json without tar's end-of-archive marker",
            ),
        ] {
            let err = open_error(d, "docker-archive", bytes);
            assert!(
                err.starts_with(&format!(
                    "docker-archive:{}/x.tar: {}/x.tar ",
                    d.display(),
                    d.display()
                )) && err.contains(needle),
                "{needle}: {err}"
            );
            assert!(
                !err.contains("numeric field") && !err.contains("manifest.json is missing"),
                "{err}"
            );
        }
        // A complete tar that is not a docker-archive, and the two archive kinds confused.
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(2);
        header.set_cksum();
        builder
            .append_data(&mut header, "notes.txt", &b"hi"[..])
            .unwrap();
        let plain = builder.into_inner().unwrap();
        let err = open_error(d, "docker-archive", &plain);
        assert!(
            err.contains("is a tar archive without manifest.json, so not a docker-archive"),
            "{err}"
        );
        let err = open_error(d, "oci-archive", &plain);
        assert!(
            err.contains("is a tar archive without index.json, so not an oci-archive"),
            "{err}"
        );
        let err = open_error(d, "oci-archive", &whole);
        assert!(err.contains("is a docker-archive, not an oci-archive (it has manifest.json, no index.json): use docker-archive:"), "{err}");
    }
}
