//! Phase 3, layers, bottom to top. A full build: the base image's layers (copied as stored,
//! checked), bakedb's own (init, and what the engine's image needs), the data, and the
//! image.json layer with the page index. A delta re-bake (`--from`): the previous image's
//! layers as they are, one patch layer with what changed (docs/patch-format.md), and the
//! image.json layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use bakedb_engines::datafiles::{self, FileDigest, StoredFile};
use bakedb_engines::delta::{
    self, Change, FilePages, IndexEntry, PAGE_INDEX_DIR, PATCH_DIR, PageIndex,
};
use bakedb_engines::image_json::{ChainLink, ImageJson, IndexFile, Owner, SCHEMA};
use bakedb_engines::{DATA_DIR, IMAGE_JSON, PatchMode, StreamedFile};
use bakedb_oci::Digest;
use bakedb_oci::image::NewLayer;
use bakedb_oci::layer::LayerInfo;
use bakedb_oci::tarball::{Stream, TarEntry};

use super::bundled::{self, BundledLayer};
use super::data::{Data, Take};
use super::plan::{Plan, threads};
use super::previous::Previous;
use crate::exit::{Code, StageExt, engine_error};
use crate::progress::{Progress, human_bytes};

/// A patch that is more than this share of its file's pages ships the file whole instead.
const MAX_PATCH_SHARE: f64 = 0.5;
/// A fresh base once the image would hold this many times its data (base and patches
/// against the data they compose to). A replica that has the chain pulls only the newest
/// patch; one that starts afresh pulls base and patches, so up to that point a patch is
/// cheaper to push, store and pull than a fresh base (a 1 % random update of pgbench changes
/// half of the cluster's pages: one such patch, then a fresh base). It also cuts a chain
/// whose patch ships the data whole (a VACUUMed SQLite file), leaving its base dead weight.
const MAX_CHAIN_WEIGHT: f64 = 2.0;

/// Every layer of the image, and what image.json says of them.
pub struct Layers {
    /// All of them, base first: the manifest's list.
    pub all: Vec<LayerInfo>,
    /// The ones this build wrote, with their history entries.
    pub new: Vec<NewLayer>,
    pub data_digest: Digest,
    /// A delta re-bake that kept the previous image's layers: its config is the previous
    /// image's, extended.
    pub on_previous: bool,
}

/// A data file hashed: its digests for image.json, its pages for the index.
struct Hashed {
    digest: FileDigest,
    pages: FilePages,
    host_path: PathBuf,
    mode: u32,
}

fn hash_all(snapshot: &bakedb_engines::Snapshot, threads: usize) -> Result<Vec<Hashed>> {
    snapshot
        .files
        .iter()
        .map(|f| {
            let (digest, pages) = match snapshot.hashed.get(&f.rel_path) {
                Some(hashed) => hashed.clone(),
                None => datafiles::digest_and_pages(f, threads)?,
            };
            Ok(Hashed {
                digest,
                pages,
                host_path: f.host_path.clone(),
                mode: f.mode,
            })
        })
        .collect::<Result<Vec<_>, bakedb_engines::Error>>()
        .stage(Code::Source, || "hashing the snapshot files".into())
}

fn base_layers(plan: &Plan, progress: &mut Progress) -> Result<Vec<LayerInfo>> {
    let Some((source, image)) = &plan.base else {
        return Ok(Vec::new());
    };
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    progress.phase("base layers", total);
    let layers = plan
        .output
        .copy_base_layers(source, image, &mut |n| progress.inc(n))
        .stage(Code::Base, || {
            format!("copying layers of base image {}", source.location())
        })?;
    progress.done(&format!(
        "{} base layers ({}) reused from {}",
        layers.len(),
        human_bytes(total),
        source.location()
    ));
    Ok(layers)
}

fn bundled_layer(plan: &Plan, layer: BundledLayer, progress: &mut Progress) -> Result<NewLayer> {
    let BundledLayer {
        name,
        path,
        size,
        entries,
    } = layer;
    let info = plan
        .output
        .write_fixed_layer(entries)
        .stage(Code::Output, || {
            format!("writing the {name} layer to {}", plan.output_ref)
        })?;
    progress.done(&format!(
        "{name} layer {} ({} {name} {})",
        info.digest,
        human_bytes(size as u64),
        env!("CARGO_PKG_VERSION")
    ));
    Ok(NewLayer {
        layer: info,
        created_by: format!(
            "bakedb build: {path} ({name} {})",
            env!("CARGO_PKG_VERSION")
        ),
    })
}

/// Directories of the data, with their modes: the snapshot's own, and the others 0755.
fn dir_entry(path: &str, data: &Data, owner: (u32, u32)) -> TarEntry {
    let mode = data
        .snapshot
        .dirs
        .iter()
        .find(|d| d.rel_path == path)
        .map_or(0o755, |d| d.mode);
    TarEntry::dir(&format!("{DATA_DIR}/{path}"), mode, owner.0, owner.1)
}

/// Every ancestor directory of `path` (relative), nearest last.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// The full data layer. When the files are already hashed (a re-bake that turned into a
/// fresh base), it is written alone; when they stream from the source, the engine hashes
/// them on the way; otherwise the hashing runs beside the layer, as both read the same
/// files, leaving the layer writer's thread a core of its own.
fn data_layer(
    plan: &Plan,
    data: &mut Data,
    hashed: Option<Vec<Hashed>>,
    progress: &mut Progress,
) -> Result<(NewLayer, Vec<Hashed>)> {
    let stream = data.stream.take();
    let snapshot = &data.snapshot;
    let (uid, gid) = plan.owner;
    let mut entries = vec![TarEntry::dir(DATA_DIR, 0o755, uid, gid)];
    for d in &snapshot.dirs {
        entries.push(TarEntry::dir(
            &format!("{DATA_DIR}/{}", d.rel_path),
            d.mode,
            uid,
            gid,
        ));
    }
    let mut data_total = 0;
    let (files, finish) = match stream {
        Some(stream) => (Some(stream.files), Some(stream.finish)),
        None => (None, None),
    };
    let mut streams: BTreeMap<String, StreamedFile> = files
        .into_iter()
        .flatten()
        .map(|f| (f.rel_path.clone(), f))
        .collect();
    for f in &snapshot.files {
        let path = format!("{DATA_DIR}/{}", f.rel_path);
        let entry = match streams.remove(&f.rel_path) {
            Some(streamed) => {
                data_total += streamed.size;
                TarEntry::stream(
                    &path,
                    Stream::new(streamed.reader),
                    streamed.size,
                    f.mode,
                    uid,
                    gid,
                )
            }
            None => {
                data_total += std::fs::metadata(&f.host_path).map_or(0, |m| m.len());
                TarEntry::file(&path, f.host_path.clone(), f.mode, uid, gid)
                    .stage(Code::Source, || {
                        format!("reading snapshot file {}", f.host_path.display())
                    })?
            }
        };
        entries.push(entry);
    }
    progress.phase("data layer", data_total);
    let threads = threads();
    let (layer, hashed) = match (hashed, finish) {
        (_, Some(finish)) => {
            let layer = plan.output.write_layer(entries, &mut |n| progress.inc(n));
            // The engine's verdict first: a layer that failed because the snapshot did (a
            // corrupt source) is the source's fault, not the output's.
            let hashes =
                finish().map_err(|e| engine_error(e, &plan.engine_plan.snapshot_step()))?;
            let hashed = snapshot
                .files
                .iter()
                .map(|f| {
                    let (digest, pages) = hashes.get(&f.rel_path).cloned().ok_or_else(|| {
                        anyhow!("the snapshot streamed {} without hashing it", f.rel_path)
                    })?;
                    Ok(Hashed {
                        digest,
                        pages,
                        host_path: f.host_path.clone(),
                        mode: f.mode,
                    })
                })
                .collect::<Result<Vec<_>>>();
            (layer, hashed)
        }
        (Some(hashed), None) => (
            plan.output.write_layer(entries, &mut |n| progress.inc(n)),
            Ok(hashed),
        ),
        (None, None) => std::thread::scope(|scope| {
            let hashing = scope.spawn(|| hash_all(snapshot, (threads - 1).max(1)));
            let layer = plan.output.write_layer(entries, &mut |n| progress.inc(n));
            (layer, hashing.join().expect("hashing thread panicked"))
        }),
    };
    let hashed = hashed?;
    let layer = layer.stage(Code::Output, || {
        format!("writing the data layer to {}", plan.output_ref)
    })?;
    progress.done(&format!(
        "data layer {} ({} → {} {})",
        layer.digest,
        human_bytes(data_total),
        human_bytes(layer.size),
        plan.output.compression().name()
    ));
    let new = NewLayer {
        layer,
        created_by: format!(
            "bakedb build: {} data under /{DATA_DIR}",
            data.snapshot.engine
        ),
    };
    Ok((new, hashed))
}

/// The patch layer of a re-bake: files shipped whole at their paths, patch files under
/// `.patches/<generation>/`, whiteouts for what is gone; every directory it touches restated
/// with the data's owner and mode.
struct PatchLayer {
    entries: Vec<TarEntry>,
    files: Vec<FileDigest>,
    index: BTreeMap<String, IndexEntry>,
    link: ChainLink,
}

/// Everything under the data directory an image.json describes: its files (patch files
/// included), their ancestors, and its listed directories.
fn tree(files: &[FileDigest], dirs: &[String]) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = dirs.iter().cloned().collect();
    for f in files {
        out.insert(f.path.clone());
        out.extend(ancestors(&f.path).map(str::to_owned));
    }
    out
}

/// What a re-bake found: the new files hashed, and how each reaches the image.
struct Delta<'a> {
    previous: &'a Previous,
    hashed: &'a [Hashed],
    changes: &'a BTreeMap<String, Change>,
    deleted: &'a [String],
    generation: u64,
}

fn patch_layer(plan: &Plan, data: &Data, delta: &Delta, scratch: &Path) -> Result<PatchLayer> {
    let (uid, gid) = plan.owner;
    let generation = delta.generation;
    let old: BTreeMap<&str, &FileDigest> = delta
        .previous
        .image_json
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let mut entries = vec![TarEntry::dir(DATA_DIR, 0o755, uid, gid)];
    let mut files = Vec::new();
    let mut index = BTreeMap::new();
    let mut touched_dirs = BTreeSet::new();
    let mut link = ChainLink {
        generation,
        kind: "patch".into(),
        layer: None,
        whole: 0,
        patched: 0,
        deleted: delta.deleted.len() as u64,
        pages: 0,
        raw_bytes: 0,
        bytes: 0,
    };
    let previous_entry = |path: &str| -> Result<&FileDigest> {
        old.get(path).copied().ok_or_else(|| {
            anyhow!("REF's image.json has no entry for {path}, which its page index lists")
        })
    };
    for h in delta.hashed {
        let path = &h.digest.path;
        match &delta.changes[path] {
            Change::Unchanged => {
                // The same file: its entry as REF had it (base, patches, generation), and the
                // entries of its patch files.
                let before = previous_entry(path).stage(Code::Base, || "reading --from".into())?;
                files.push(before.clone());
                for p in &before.patches {
                    files.push(
                        previous_entry(p)
                            .stage(Code::Base, || "reading --from".into())?
                            .clone(),
                    );
                }
            }
            Change::Whole => {
                entries.push(
                    TarEntry::file(
                        &format!("{DATA_DIR}/{path}"),
                        h.host_path.clone(),
                        h.mode,
                        uid,
                        gid,
                    )
                    .stage(Code::Source, || format!("reading snapshot file {path}"))?,
                );
                touched_dirs.extend(ancestors(path).map(str::to_owned));
                let mut digest = h.digest.clone();
                digest.generation = Some(generation);
                files.push(digest);
                index.insert(path.clone(), IndexEntry::All(h.pages.clone()));
                link.whole += 1;
                link.raw_bytes += h.pages.length;
            }
            Change::Patch(pages) => {
                let before = previous_entry(path).stage(Code::Base, || "reading --from".into())?;
                let patch_rel = format!("{PATCH_DIR}/{generation}/{path}");
                let out = scratch.join(&patch_rel);
                std::fs::create_dir_all(out.parent().expect("a patch has a directory"))
                    .stage(Code::Output, || format!("creating {}", out.display()))?;
                let patch = delta::write_patch(
                    &h.host_path,
                    h.pages.page_size,
                    h.pages.length,
                    pages,
                    delta::composed_digest(&h.digest),
                    &out,
                )
                .stage(Code::Output, || format!("writing patch {}", out.display()))?;
                let patch_size = patch.size;
                entries.push(
                    TarEntry::file(&format!("{DATA_DIR}/{patch_rel}"), out, h.mode, uid, gid)
                        .stage(Code::Output, || format!("reading patch {patch_rel}"))?,
                );
                touched_dirs.extend(ancestors(&patch_rel).map(str::to_owned));
                let mut digest = h.digest.clone();
                digest.generation = before.generation;
                digest.base = Some(before.base.clone().unwrap_or_else(|| StoredFile {
                    generation: before.generation.unwrap_or(0),
                    size: before.size,
                    sha256: before.sha256.clone(),
                    chunks: before.chunks.clone(),
                }));
                digest.patches = before.patches.clone();
                digest.patches.push(patch_rel.clone());
                for p in &before.patches {
                    files.push(
                        previous_entry(p)
                            .stage(Code::Base, || "reading --from".into())?
                            .clone(),
                    );
                }
                files.push(FileDigest {
                    path: patch_rel,
                    size: patch.size,
                    mode: format!("{:04o}", h.mode),
                    sha256: patch.sha256,
                    chunks: patch.chunks,
                    generation: Some(generation),
                    base: None,
                    patches: Vec::new(),
                });
                files.push(digest);
                index.insert(
                    path.clone(),
                    IndexEntry::Changed {
                        page_size: h.pages.page_size,
                        header_len: h.pages.header_len,
                        length: h.pages.length,
                        pages: pages
                            .iter()
                            .map(|&n| {
                                (
                                    n,
                                    h.pages.hashes[n as usize],
                                    h.pages.header(n as usize).to_vec(),
                                )
                            })
                            .collect(),
                    },
                );
                link.patched += 1;
                link.pages += pages.len() as u64;
                link.raw_bytes += patch_size;
            }
        }
    }
    for path in delta.deleted {
        index.insert(path.clone(), IndexEntry::Deleted);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    // What REF's tree has and the new one does not: a whiteout at the top of each gone part
    // (a dropped database's directory, a file, the patches of a file now whole or deleted).
    let dirs: Vec<String> = data
        .snapshot
        .dirs
        .iter()
        .map(|d| d.rel_path.clone())
        .collect();
    let before = tree(
        &delta.previous.image_json.files,
        &delta.previous.image_json.dirs,
    );
    let now = tree(&files, &dirs);
    for gone in before.difference(&now) {
        if ancestors(gone).any(|a| !now.contains(a)) {
            continue;
        }
        let whiteout = match gone.rsplit_once('/') {
            Some((dir, name)) => {
                touched_dirs.insert(dir.to_owned());
                touched_dirs.extend(ancestors(dir).map(str::to_owned));
                format!("{dir}/.wh.{name}")
            }
            None => format!(".wh.{gone}"),
        };
        entries.push(TarEntry::bytes(
            &format!("{DATA_DIR}/{whiteout}"),
            Vec::new(),
            0o644,
            0,
            0,
        ));
    }
    for d in &touched_dirs {
        entries.push(dir_entry(d, data, plan.owner));
    }
    Ok(PatchLayer {
        entries,
        files,
        index,
        link,
    })
}

/// image.json and this generation's page index file, in their own small layer: image.json's
/// sha256 is the image's BAKEDB_DATA_DIGEST.
fn meta_layer(
    plan: &Plan,
    data: &Data,
    mut image_json: ImageJson,
    index: Option<&BTreeMap<String, IndexEntry>>,
) -> Result<(NewLayer, Digest)> {
    let mut entries = Vec::new();
    if let Some(index) = index {
        let bytes = delta::encode_index(index);
        let path = format!("{PAGE_INDEX_DIR}/{}.idx", image_json.generation);
        image_json.page_index.push(IndexFile {
            generation: image_json.generation,
            path: format!("/{path}"),
            size: bytes.len() as u64,
            sha256: Digest::of(&bytes).hex(),
            layer: None,
        });
        entries.push(TarEntry::bytes(&path, bytes, 0o644, 0, 0));
    }
    // The profile says how patched files reach the engine; in-place engines read the patches
    // of their data file from a variable of their profile.
    let patches: Vec<String> = image_json
        .files
        .iter()
        .flat_map(|f| f.patches.iter())
        .map(|p| format!("{{data_dir}}/{p}"))
        .collect();
    if !patches.is_empty() {
        match &data.spec.patch_mode {
            PatchMode::Apply => image_json.profile.patches = Some("apply".into()),
            PatchMode::InPlace { env } => {
                image_json.profile.patches = Some("in-place".into());
                image_json
                    .profile
                    .env
                    .insert((*env).to_owned(), patches.join(":"));
            }
        }
    }
    let bytes = image_json.to_bytes();
    let digest = Digest::of(&bytes);
    entries.push(TarEntry::bytes(IMAGE_JSON, bytes, 0o644, 0, 0));
    let layer = plan
        .output
        .write_layer(entries, &mut |_| {})
        .stage(Code::Output, || {
            format!("writing the image.json layer to {}", plan.output_ref)
        })?;
    let new = NewLayer {
        layer,
        created_by: format!("bakedb build: /{IMAGE_JSON}"),
    };
    Ok((new, digest))
}

fn image_json(plan: &Plan, data: &Data, files: Vec<FileDigest>, generation: u64) -> ImageJson {
    let (uid, gid) = plan.owner;
    ImageJson {
        schema: SCHEMA,
        engine: data.snapshot.engine.to_owned(),
        profile: data.spec.profile.clone(),
        data_dir: format!("/{DATA_DIR}"),
        owner: Owner { uid, gid },
        snapshot: data.snapshot.provenance.clone(),
        chunk_size: datafiles::CHUNK_SIZE,
        files,
        // Empty directories PostgreSQL insists on (pg_notify, pg_twophase, ...) are part of
        // the data, so init checks they exist.
        dirs: data
            .snapshot
            .dirs
            .iter()
            .map(|d| d.rel_path.clone())
            .collect(),
        notes: data.spec.notes.clone(),
        generation,
        page_index: Vec::new(),
        chain: Vec::new(),
    }
}

/// Pages whose header alone differs from REF's (PostgreSQL's LSN and checksum, rewritten by
/// the copy's VACUUM on pages whose tuples did not change) get REF's header back, so that
/// they are REF's pages again and need not ship; the files are hashed again. Only in this
/// build's own copy: a snapshot directory of the user's is never written, and such pages
/// ship as changed pages instead.
fn restore_headers(
    data: &Data,
    hashed: &mut [Hashed],
    changes: &mut BTreeMap<String, Change>,
    restores: &BTreeMap<String, delta::Restores>,
) -> Result<()> {
    for h in hashed.iter_mut() {
        let Some(r) = restores.get(&h.digest.path) else {
            continue;
        };
        let change = changes
            .get_mut(&h.digest.path)
            .expect("every file has a change");
        if !h.host_path.starts_with(&data.scratch.0) {
            let mut pages: BTreeSet<u64> = r.iter().map(|(p, _)| *p).collect();
            match change {
                Change::Whole => {}
                Change::Unchanged => *change = Change::Patch(pages.into_iter().collect()),
                Change::Patch(p) => {
                    pages.extend(p.iter().copied());
                    *p = pages.into_iter().collect();
                }
            }
            continue;
        }
        delta::restore_headers(&h.host_path, h.pages.page_size, r).stage(Code::Output, || {
            format!("writing REF's page headers into {}", h.host_path.display())
        })?;
        let hl = h.pages.header_len as usize;
        for (page, header) in r {
            let at = *page as usize * hl;
            h.pages.headers[at..at + hl].copy_from_slice(header);
        }
        let file = bakedb_engines::DataFile {
            rel_path: h.digest.path.clone(),
            host_path: h.host_path.clone(),
            mode: h.mode,
            page_size: h.pages.page_size,
            page_header: h.pages.header_len,
        };
        let (digest, _) = datafiles::digest_and_pages(&file, threads())
            .stage(Code::Source, || "hashing the snapshot files".into())?;
        h.digest = digest;
    }
    Ok(())
}

/// The bytes the patch layer's files will hold, as `patch_layer` counts them in its chain
/// link: the files shipped whole and the patch files.
fn patch_raw_bytes(hashed: &[Hashed], changes: &BTreeMap<String, Change>) -> u64 {
    hashed
        .iter()
        .map(|h| match &changes[&h.digest.path] {
            Change::Unchanged => 0,
            Change::Whole => h.pages.length,
            Change::Patch(pages) => delta::patch_len(h.pages.page_size, pages.len()),
        })
        .sum()
}

/// Why a re-bake writes a fresh base instead of a patch, if it should.
fn fresh_base_reason(
    plan: &Plan,
    data: &Data,
    previous: &Previous,
    patch_raw: u64,
    data_raw: u64,
) -> Result<Option<String>> {
    if super::previous::same_base(previous, plan.base.as_ref().map(|(_, i)| i)).is_err() {
        return Ok(Some(
            "the base image is not the one REF was built on".into(),
        ));
    }
    // A patch keeps REF's layers: its bakedb-init and bakedb-serve must be this bakedb's,
    // which know patches (an older init refuses a patched file).
    let own = (!plan.no_init)
        .then(bundled::init)
        .into_iter()
        .chain(data.spec.bundled.iter().map(|b| bundled::layer(*b)));
    for layer in own {
        let diff_id = bakedb_oci::layer::diff_id_of(layer.entries, 0)
            .stage(Code::Output, || format!("hashing the {} layer", layer.name))?;
        if !previous.image.layers.iter().any(|l| l.diff_id == diff_id) {
            return Ok(Some(format!(
                "REF carries another {} than this bakedb's",
                layer.name
            )));
        }
    }
    Ok(fresh_base_by_size(plan, previous, patch_raw, data_raw))
}

/// `data_raw`: the bytes of the new data files; before the snapshot, REF's base's.
fn fresh_base_by_size(
    plan: &Plan,
    previous: &Previous,
    patch_raw: u64,
    data_raw: u64,
) -> Option<String> {
    let (patches, raw, base_raw) = previous.patches_since_base();
    if patches >= plan.max_patches {
        return Some(format!(
            "REF has {patches} patch generation(s) on its base (--max-patches {})",
            plan.max_patches
        ));
    }
    if too_heavy(base_raw, raw + patch_raw, data_raw) {
        return Some(format!(
            "its patches would be {} on a base of {}, for {} of data (the image would hold twice its data)",
            human_bytes(raw + patch_raw),
            human_bytes(base_raw),
            human_bytes(data_raw)
        ));
    }
    None
}

/// Whether a base of `base_raw` bytes with patches of `chain_raw` is too heavy for data of
/// `data_raw` bytes.
fn too_heavy(base_raw: u64, chain_raw: u64, data_raw: u64) -> bool {
    (base_raw + chain_raw) as f64 >= MAX_CHAIN_WEIGHT * data_raw as f64
}

/// The snapshot a build takes first, and whether it is for a fresh base already: a first
/// build, or a re-bake whose fresh base is due whatever changed (said here), streams its
/// data; any other re-bake may be a patch and keeps only the changed pages.
pub fn first_take(plan: &Plan, progress: &mut Progress) -> (Take, bool) {
    let Some(previous) = &plan.previous else {
        return (Take::Stream, false);
    };
    let reason = match super::previous::same_base(previous, plan.base.as_ref().map(|(_, i)| i)) {
        Err(_) => Some("the base image is not the one REF was built on".to_owned()),
        Ok(()) => fresh_base_by_size(plan, previous, 0, previous.data_raw()),
    };
    match reason {
        Some(reason) => {
            say_fresh_base(previous, &reason, progress);
            (Take::Stream, true)
        }
        None => (Take::Changes, false),
    }
}

fn say_fresh_base(previous: &Previous, reason: &str, progress: &mut Progress) {
    progress.done(&format!(
        "generation {}: a fresh base, not a patch: {reason}",
        previous.image_json.generation + 1
    ));
}

/// What `write` made of a snapshot.
pub enum Outcome {
    Layers(Layers),
    /// The snapshot cannot make the image: a partial one (only the changed pages) when the
    /// image needs whole files after all (a fresh base is due, or a file changed so much it
    /// ships whole). The caller takes this one and calls again.
    Retake(Take),
}

/// The image's layers. `fresh_base`: a re-bake already known to be a fresh base (the
/// reason was said), whose data is not compared with REF's.
pub fn write(
    plan: &Plan,
    data: &mut Data,
    scratch: &Path,
    fresh_base: bool,
    progress: &mut Progress,
) -> Result<Outcome> {
    let mut hashed = None;
    let mut generation = 0;
    if let Some(previous) = &plan.previous {
        generation = previous.image_json.generation + 1;
    }
    if let Some(previous) = plan.previous.as_ref().filter(|_| !fresh_base) {
        progress.phase("page hashes", 0);
        let mut all = hash_all(&data.snapshot, threads())?;
        let new: PageIndex = all
            .iter()
            .map(|h| (h.digest.path.clone(), h.pages.clone()))
            .collect();
        let (mut changes, deleted, restores) =
            delta::changes(&previous.index, &new, MAX_PATCH_SHARE);
        restore_headers(data, &mut all, &mut changes, &restores)?;
        // Weighed before any patch file is written: a change spread over most pages (1 % of
        // a pgbench table's rows at random) would otherwise write hundreds of MiB of patches
        // only to throw them away for a fresh base.
        let patch_raw = patch_raw_bytes(&all, &changes);
        let data_raw = all.iter().map(|h| h.pages.length).sum();
        match fresh_base_reason(plan, data, previous, patch_raw, data_raw)? {
            Some(reason) => {
                say_fresh_base(previous, &reason, progress);
                if data.snapshot.partial {
                    return Ok(Outcome::Retake(Take::Stream));
                }
                hashed = Some(all);
            }
            None => {
                let partial = |path: &String| {
                    data.snapshot.partial && data.snapshot.hashed.contains_key(path)
                };
                if let Some((path, _)) = changes
                    .iter()
                    .find(|(path, change)| partial(path) && matches!(change, Change::Whole))
                {
                    progress.done(&format!(
                        "generation {generation}: {path} changed in more than half of its pages and ships whole: taking a whole snapshot"
                    ));
                    return Ok(Outcome::Retake(Take::Whole));
                }
                let delta = Delta {
                    previous,
                    hashed: &all,
                    changes: &changes,
                    deleted: &deleted,
                    generation,
                };
                let patch = patch_layer(plan, data, &delta, scratch)?;
                debug_assert_eq!(patch.link.raw_bytes, patch_raw, "the patch weighed");
                return write_patch_generation(plan, data, previous, patch, progress)
                    .map(Outcome::Layers);
            }
        }
    }

    // A full build: base, bakedb's own, all the data, image.json with the full index. A
    // streamed snapshot holds the source's read transaction until its data layer is
    // written: that goes first.
    let streamed = if data.stream.is_some() {
        Some(data_layer(plan, data, hashed.take(), progress)?)
    } else {
        None
    };
    let mut all = base_layers(plan, progress)?;
    let mut new = Vec::new();
    let own = (!plan.no_init)
        .then(bundled::init)
        .into_iter()
        .chain(data.spec.bundled.iter().map(|b| bundled::layer(*b)));
    for layer in own {
        new.push(bundled_layer(plan, layer, progress)?);
    }
    let (data_new, hashed) = match streamed {
        Some(written) => written,
        None => data_layer(plan, data, hashed, progress)?,
    };
    let index: BTreeMap<String, IndexEntry> = hashed
        .iter()
        .map(|h| (h.digest.path.clone(), IndexEntry::All(h.pages.clone())))
        .collect();
    let mut files: Vec<FileDigest> = hashed.into_iter().map(|h| h.digest).collect();
    if generation > 0 {
        for f in &mut files {
            f.generation = Some(generation);
        }
    }
    let mut ij = image_json(plan, data, files, generation);
    ij.chain.push(ChainLink {
        generation,
        kind: "base".into(),
        layer: Some(data_new.layer.digest.to_string()),
        whole: ij.files.len() as u64,
        patched: 0,
        deleted: 0,
        pages: 0,
        raw_bytes: ij.files.iter().map(|f| f.size).sum(),
        bytes: data_new.layer.size,
    });
    new.push(data_new);
    let (meta, data_digest) = meta_layer(plan, data, ij, Some(&index))?;
    new.push(meta);
    all.extend(new.iter().map(|n| n.layer.clone()));
    Ok(Outcome::Layers(Layers {
        all,
        new,
        data_digest,
        on_previous: false,
    }))
}

/// REF's layers as they are, the patch layer (none when nothing changed), the image.json
/// layer.
fn write_patch_generation(
    plan: &Plan,
    data: &Data,
    previous: &Previous,
    patch: PatchLayer,
    progress: &mut Progress,
) -> Result<Layers> {
    let mut all = plan
        .output
        .reuse_layers(&previous.source, &previous.image)
        .stage(Code::Base, || {
            format!("copying the layers of {}", previous.reference)
        })?;
    progress.done(&format!(
        "{} layers of {} reused (generation {})",
        all.len(),
        previous.reference,
        previous.image_json.generation
    ));
    let PatchLayer {
        entries,
        files,
        index,
        mut link,
    } = patch;
    let generation = link.generation;
    let mut ij = image_json(plan, data, files, generation);
    ij.page_index = previous
        .image_json
        .page_index
        .iter()
        .map(|f| IndexFile {
            layer: Some(previous.layer_of(f.layer.as_ref())),
            ..f.clone()
        })
        .collect();
    ij.chain = previous.image_json.chain.clone();
    let mut new = Vec::new();
    let nothing = link.whole == 0 && link.patched == 0 && link.deleted == 0;
    let (meta, data_digest) = if nothing {
        progress.done(&format!(
            "generation {generation}: nothing changed since {}: the data is identical",
            previous.reference
        ));
        meta_layer(plan, data, ij, None)?
    } else {
        progress.phase("patch layer", link.raw_bytes);
        let layer = plan
            .output
            .write_layer(entries, &mut |n| progress.inc(n))
            .stage(Code::Output, || {
                format!("writing the patch layer to {}", plan.output_ref)
            })?;
        progress.done(&format!(
            "generation {generation}: patch layer {} ({} whole, {} patched in {} pages, {} deleted: {} → {} {})",
            layer.digest,
            link.whole,
            link.patched,
            link.pages,
            link.deleted,
            human_bytes(link.raw_bytes),
            human_bytes(layer.size),
            plan.output.compression().name()
        ));
        link.layer = Some(layer.digest.to_string());
        link.bytes = layer.size;
        ij.chain.push(link);
        new.push(NewLayer {
            layer,
            created_by: format!("bakedb build: patch layer, generation {generation}"),
        });
        meta_layer(plan, data, ij, Some(&index))?
    };
    new.push(meta);
    all.extend(new.iter().map(|n| n.layer.clone()));
    Ok(Layers {
        all,
        new,
        data_digest,
        on_previous: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashed(path: &str, bytes: &[u8], page_size: u32) -> Hashed {
        Hashed {
            digest: FileDigest {
                path: path.into(),
                size: bytes.len() as u64,
                mode: "0600".into(),
                sha256: None,
                chunks: Vec::new(),
                generation: None,
                base: None,
                patches: Vec::new(),
            },
            pages: delta::pages_of(bytes, page_size, 0),
            host_path: PathBuf::from(path),
            mode: 0o600,
        }
    }

    #[test]
    fn a_chain_is_cut_when_the_image_would_hold_twice_its_data() {
        let gib: u64 = 1 << 30;
        let half = 565 << 20;
        // A pgbench cluster with half of its pages changed: one patch, not two.
        assert!(!too_heavy(gib, half, gib));
        assert!(too_heavy(gib, 2 * half, gib));
        // The one file changed in most pages and shipped whole: its base is dead weight,
        // even when the file shrank (a VACUUM).
        assert!(too_heavy(gib, gib, gib));
        assert!(too_heavy(gib, gib / 2, gib * 3 / 4));
        // Pages appended: the data grew by what the patches hold, nothing is dead.
        assert!(!too_heavy(gib, 4 * gib, 5 * gib));
    }

    /// The size that decides between a patch and a fresh base is the size the patch layer
    /// then holds (the e2e delta tests check the two against each other in debug builds).
    #[test]
    fn weighs_a_patch_before_writing_it() {
        let all = [
            hashed("same", &[1; 8192], 8192),
            hashed("new", &[2; 3 * 8192], 8192),
            hashed("changed", &[3; 10 * 8192], 8192),
        ];
        let changes = BTreeMap::from([
            ("same".to_owned(), Change::Unchanged),
            ("new".to_owned(), Change::Whole),
            ("changed".to_owned(), Change::Patch(vec![0, 7])),
        ]);
        assert_eq!(
            patch_raw_bytes(&all, &changes),
            3 * 8192 + delta::PATCH_HEADER + 2 * (8 + 8192)
        );
    }
}
