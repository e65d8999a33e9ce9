//! `--from REF`: the previous image of a delta re-bake, read without its data: its layers
//! (reused by digest), its image.json and the page index its image.json lists, each index
//! file read from the small layer that holds it and checked against its digest.

use anyhow::{Result, anyhow};
use bakedb_engines::IMAGE_JSON;
use bakedb_engines::delta::{self, PageIndex};
use bakedb_engines::image_json::ImageJson;
use bakedb_oci::Digest;
use bakedb_oci::reference::ImageRef;
use bakedb_oci::registry::Registries;
use bakedb_oci::source::{ImageSource, ResolvedImage};

use crate::exit::{Code, StageExt};

pub struct Previous {
    pub reference: ImageRef,
    pub source: ImageSource,
    pub image: ResolvedImage,
    pub image_json: ImageJson,
    /// The fold of its index files: every data file's pages.
    pub index: PageIndex,
}

impl Previous {
    /// The digest of the layer holding an index file of REF (None: REF's own image.json
    /// layer, its last).
    pub fn layer_of(&self, layer: Option<&String>) -> String {
        match layer {
            Some(l) => l.clone(),
            None => self
                .image
                .layers
                .last()
                .map(|l| l.digest.to_string())
                .unwrap_or_default(),
        }
    }

    /// The bytes of REF's data files, composed.
    pub fn data_raw(&self) -> u64 {
        self.index.values().map(|pages| pages.length).sum()
    }

    /// Patch generations on REF's base, and their uncompressed bytes.
    pub fn patches_since_base(&self) -> (u64, u64, u64) {
        let chain = &self.image_json.chain;
        let base_at = chain.iter().rposition(|l| l.kind == "base").unwrap_or(0);
        let base_raw = chain.get(base_at).map_or(0, |l| l.raw_bytes);
        let patches = &chain[(base_at + 1).min(chain.len())..];
        (
            patches.len() as u64,
            patches.iter().map(|l| l.raw_bytes).sum(),
            base_raw,
        )
    }
}

pub fn read(text: &str, engine: &str, registries: &Registries) -> Result<Previous> {
    let reference: ImageRef = text
        .parse()
        .stage(Code::Usage, || "parsing --from".into())?;
    let shown = reference.to_string();
    let what = || format!("reading --from {shown}");
    let source = ImageSource::open_with(&reference, registries).stage(Code::Base, what)?;
    let image = source.resolve().stage(Code::Base, what)?;
    source
        .check_layers_present(&image)
        .stage(Code::Base, what)?;
    let bytes = source
        .find_file(
            &image.layers[image.layers.len().saturating_sub(1)..],
            IMAGE_JSON,
            1 << 30,
        )
        .stage(Code::Base, what)?
        .ok_or_else(|| {
            anyhow!("its last layer has no /{IMAGE_JSON}: --from takes an image bakedb built")
        })
        .stage(Code::Base, what)?;
    let expected = image.config["config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.strip_prefix("BAKEDB_DATA_DIGEST="))
        .next_back()
        .map(str::to_owned);
    if expected.as_deref() != Some(Digest::of(&bytes).to_string().as_str()) {
        return Err(anyhow!(
            "its /{IMAGE_JSON} does not match the BAKEDB_DATA_DIGEST of its config"
        ))
        .stage(Code::Base, what);
    }
    let image_json = ImageJson::parse(&bytes).stage(Code::Base, what)?;
    if image_json.engine != engine {
        return Err(anyhow!(
            "it is a {} image; --engine {engine} re-bakes only an image of its own engine",
            image_json.engine
        ))
        .stage(Code::Usage, what);
    }
    if image_json.page_index.is_empty() {
        return Err(anyhow!(
            "it has no page index (an older bakedb built it): build once without --from, and re-bake from that image"
        ))
        .stage(Code::Base, what);
    }
    let mut previous = Previous {
        reference,
        source,
        image,
        image_json,
        index: PageIndex::new(),
    };
    let mut index = PageIndex::new();
    for file in &previous.image_json.page_index {
        let digest = previous.layer_of(file.layer.as_ref());
        let layer = previous
            .image
            .layers
            .iter()
            .find(|l| l.digest.to_string() == digest)
            .ok_or_else(|| {
                anyhow!(
                    "its page index {} names layer {digest}, which it does not have",
                    file.path
                )
            })
            .stage(Code::Base, what)?;
        let path = file.path.trim_start_matches('/');
        let bytes = previous
            .source
            .find_file(std::slice::from_ref(layer), path, u64::MAX)
            .stage(Code::Base, what)?
            .ok_or_else(|| anyhow!("layer {digest} has no {}", file.path))
            .stage(Code::Base, what)?;
        if Digest::of(&bytes).hex() != file.sha256 || bytes.len() as u64 != file.size {
            return Err(anyhow!(
                "its page index {} does not match image.json (size or sha256)",
                file.path
            ))
            .stage(Code::Base, what);
        }
        let entries = delta::decode_index(&bytes)
            .map_err(|why| anyhow!("{}: {why}", file.path))
            .stage(Code::Base, what)?;
        delta::fold(&mut index, entries)
            .map_err(|why| anyhow!("{}: {why}", file.path))
            .stage(Code::Base, what)?;
    }
    previous.index = index;
    Ok(previous)
}

/// REF's base image layers must be the new build's: the patch layer goes on REF's layers.
pub fn same_base(previous: &Previous, base: Option<&ResolvedImage>) -> Result<(), String> {
    let base_layers = base.map_or(&[][..], |b| &b.layers[..]);
    let prefix = &previous.image.layers[..base_layers.len().min(previous.image.layers.len())];
    if prefix.len() != base_layers.len()
        || prefix
            .iter()
            .zip(base_layers)
            .any(|(a, b)| a.digest != b.digest)
    {
        return Err("--base is not the base image REF was built on".into());
    }
    Ok(())
}
