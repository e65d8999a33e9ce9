//! `bakedb verify`: every check a consumer would make, done up front.
//!
//! The manifest and config are checked against their descriptors when resolved; here every
//! layer blob is read once, hashed, decompressed and hashed again for its diff_id, and the
//! layout's own files and the config's history are checked for consistency. Last, what killed
//! builds left behind is listed (`garbage`): it never fails a verification.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::garbage::{self, Garbage};
use crate::reference::ImageRef;
use crate::registry::Registries;
use crate::source::{ImageSource, ResolvedImage, check_layer};

#[derive(Debug)]
pub struct Report {
    pub image: ResolvedImage,
    pub layers_checked: usize,
    pub bytes_checked: u64,
    /// Temp files of killed builds in the layout or beside the archive, and a layout's blobs
    /// that no tag references. Reported, not an error: the image is fine.
    pub garbage: Garbage,
}

pub fn verify(
    reference: &ImageRef,
    registries: &Registries,
    progress: &mut dyn FnMut(u64),
) -> Result<Report> {
    let source = ImageSource::open_with(reference, registries)?;
    let location = source.location();
    if let ImageRef::Oci { dir, .. } = reference {
        let layout = std::fs::read(dir.join("oci-layout"))
            .map_err(Error::io("reading", dir.join("oci-layout")))?;
        let v: Value = serde_json::from_slice(&layout).unwrap_or(Value::Null);
        if v["imageLayoutVersion"].as_str() != Some("1.0.0") {
            return Err(Error::Invalid {
                location,
                what: "oci-layout".into(),
                reason: "imageLayoutVersion is not 1.0.0".into(),
            });
        }
    }
    let image = source.resolve()?;
    if let Some(history) = image.config.get("history").and_then(Value::as_array) {
        let non_empty = history
            .iter()
            .filter(|h| h.get("empty_layer").and_then(Value::as_bool) != Some(true))
            .count();
        if non_empty != image.layers.len() {
            return Err(Error::Invalid {
                location,
                what: format!("config {}", image.config_digest),
                reason: format!(
                    "history has {non_empty} entries that add a layer, the image has {} layers",
                    image.layers.len()
                ),
            });
        }
    }
    let mut bytes_checked = 0;
    for layer in &image.layers {
        let blob = source.open_blob(&layer.digest, "layer")?;
        check_layer(blob, layer, &location, &mut |b| {
            progress(b.len() as u64);
            Ok(())
        })?;
        bytes_checked += layer.size;
    }
    let garbage = match reference {
        ImageRef::Oci { dir, .. } => garbage::in_layout(dir, &location).unwrap_or_default(),
        ImageRef::OciArchive { file, .. } | ImageRef::DockerArchive { file, .. } => {
            garbage::beside_archive(file)
        }
        ImageRef::Docker(_) => Garbage::default(),
    };
    Ok(Report {
        layers_checked: image.layers.len(),
        bytes_checked,
        image,
        garbage,
    })
}
