//! Phase 3, layers, bottom to top: the base image's layers (copied as stored, checked),
//! bakedb's own (init, and what the engine's image needs), the data, and image.json.

use anyhow::Result;
use bakedb_engines::image_json::{ImageJson, Owner, SCHEMA};
use bakedb_engines::{DATA_DIR, IMAGE_JSON, datafiles};
use bakedb_oci::Digest;
use bakedb_oci::image::NewLayer;
use bakedb_oci::layer::LayerInfo;
use bakedb_oci::tarball::TarEntry;

use super::bundled::{self, BundledLayer};
use super::data::Data;
use super::plan::{Plan, threads};
use crate::exit::{Code, StageExt};
use crate::progress::{Progress, human_bytes};

/// Every layer of the image, and the digest of its image.json.
pub struct Layers {
    /// All of them, base first: the manifest's list.
    pub all: Vec<LayerInfo>,
    /// The ones bakedb wrote, with their history entries.
    pub new: Vec<NewLayer>,
    pub data_digest: Digest,
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

/// The data layer, and image.json's file digests: both read the same files, so both at
/// once, leaving the layer writer's thread a core of its own.
fn data_layer(
    plan: &Plan,
    data: &Data,
    progress: &mut Progress,
) -> Result<(NewLayer, Vec<datafiles::FileDigest>)> {
    let snapshot = &data.snapshot;
    let (uid, gid) = plan.owner;
    let data_total: u64 = snapshot
        .files
        .iter()
        .map(|f| std::fs::metadata(&f.host_path).map_or(0, |m| m.len()))
        .sum();
    let mut entries = vec![TarEntry::dir(DATA_DIR, 0o755, uid, gid)];
    for d in &snapshot.dirs {
        entries.push(TarEntry::dir(
            &format!("{DATA_DIR}/{}", d.rel_path),
            d.mode,
            uid,
            gid,
        ));
    }
    for f in &snapshot.files {
        entries.push(
            TarEntry::file(
                &format!("{DATA_DIR}/{}", f.rel_path),
                f.host_path.clone(),
                f.mode,
                uid,
                gid,
            )
            .stage(Code::Source, || {
                format!("reading snapshot file {}", f.host_path.display())
            })?,
        );
    }
    progress.phase("data layer", data_total);
    let threads = threads();
    let (layer, digests) = std::thread::scope(|scope| {
        let digests = scope.spawn(|| {
            snapshot
                .files
                .iter()
                .map(|f| datafiles::digest_file(f, (threads - 1).max(1)))
                .collect::<Result<Vec<_>, _>>()
        });
        let layer = plan.output.write_layer(entries, &mut |n| progress.inc(n));
        (layer, digests.join().expect("digest thread panicked"))
    });
    let layer = layer.stage(Code::Output, || {
        format!("writing the data layer to {}", plan.output_ref)
    })?;
    let digests = digests.stage(Code::Source, || "hashing the snapshot files".into())?;
    progress.done(&format!(
        "data layer {} ({} → {} {})",
        layer.digest,
        human_bytes(data_total),
        human_bytes(layer.size),
        plan.output.compression().name()
    ));
    let new = NewLayer {
        layer,
        created_by: format!("bakedb build: {} data under /{DATA_DIR}", snapshot.engine),
    };
    Ok((new, digests))
}

/// image.json, in its own small layer: its sha256 is the image's BAKEDB_DATA_DIGEST.
fn image_json_layer(
    plan: &Plan,
    data: &Data,
    files: Vec<datafiles::FileDigest>,
) -> Result<(NewLayer, Digest)> {
    let (uid, gid) = plan.owner;
    let image_json = ImageJson {
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
    };
    let bytes = image_json.to_bytes();
    let digest = Digest::of(&bytes);
    let layer = plan
        .output
        .write_layer(
            vec![TarEntry::bytes(IMAGE_JSON, bytes, 0o644, 0, 0)],
            &mut |_| {},
        )
        .stage(Code::Output, || {
            format!("writing the image.json layer to {}", plan.output_ref)
        })?;
    let new = NewLayer {
        layer,
        created_by: format!("bakedb build: /{IMAGE_JSON}"),
    };
    Ok((new, digest))
}

pub fn write(plan: &Plan, data: &Data, progress: &mut Progress) -> Result<Layers> {
    let mut all = base_layers(plan, progress)?;
    let mut new = Vec::new();
    let own = (!plan.no_init)
        .then(bundled::init)
        .into_iter()
        .chain(data.spec.bundled.iter().map(|b| bundled::layer(*b)));
    for layer in own {
        new.push(bundled_layer(plan, layer, progress)?);
    }
    let (data_layer, files) = data_layer(plan, data, progress)?;
    new.push(data_layer);
    let (meta_layer, data_digest) = image_json_layer(plan, data, files)?;
    new.push(meta_layer);
    all.extend(new.iter().map(|n| n.layer.clone()));
    Ok(Layers {
        all,
        new,
        data_digest,
    })
}
