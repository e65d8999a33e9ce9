//! `bakedb build`, in phases a reader can follow, each in its own file:
//!
//! 1. `plan`: flags, the base image and the engine's checks of the source; the output is
//!    opened last. Nothing is copied or visibly written.
//! 2. `data`: the engine's snapshot in a scratch directory, and the image it makes of it.
//! 3. `layers`: the base's layers, bakedb's own (`bundled`), the data, image.json.
//! 4. `image`: config and manifest, then the tag, the only write a reader sees.
//!
//! No engine is named here: `bakedb_engines` describes each engine's image as plain data.

mod bundled;
mod data;
mod image;
mod layers;
mod plan;
mod previous;

use std::io::Write;

use anyhow::Result;
use serde_json::json;

pub use data::{ScratchDir, warn_notes};
pub use plan::threads;
pub use plan::{engine_named, engine_options};

use crate::BuildArgs;
use crate::progress::Progress;

/// What a build wrote, and the digest of its data (image.json's, BAKEDB_DATA_DIGEST).
pub struct Built {
    pub written: bakedb_oci::output::Written,
    pub data_digest: bakedb_oci::Digest,
}

/// Run every phase of a build.
pub fn build(args: &BuildArgs, progress: &mut Progress) -> Result<Built> {
    let mut plan = plan::plan(args)?;
    let (how, mut fresh_base) = layers::first_take(&plan, progress);
    let mut data = data::take(&mut plan, progress, how)?;
    let mut retakes = 0;
    let layers = loop {
        let patches = data.scratch.0.join("patches");
        match layers::write(&plan, &mut data, &patches, fresh_base, progress)? {
            layers::Outcome::Layers(layers) => break layers,
            // The changed pages alone cannot make the image: the whole source, at a later
            // point of it and as consistent.
            layers::Outcome::Retake(how) if retakes == 0 => {
                retakes += 1;
                fresh_base = how == data::Take::Stream;
                data = data::take(&mut plan, progress, how)?;
            }
            layers::Outcome::Retake(_) => {
                anyhow::bail!("a whole snapshot still could not make the image's layers")
            }
        }
    };
    let data_digest = layers.data_digest;
    let written = image::finish(plan, &data, layers, progress)?;
    Ok(Built {
        written,
        data_digest,
    })
}

pub fn run(args: BuildArgs, quiet: bool) -> Result<()> {
    let mut progress = Progress::new(quiet);
    let Built {
        written,
        data_digest,
    } = build(&args, &mut progress)?;
    let total: u64 = written.layers.iter().map(|l| l.size).sum::<u64>() + written.manifest_size;
    if args.json {
        let out = json!({
            "reference": written.reference,
            "manifest_digest": written.manifest_digest.to_string(),
            "manifest_size": written.manifest_size,
            "config_digest": written.config_digest.to_string(),
            "data_digest": data_digest.to_string(),
            "size": total,
            "layers": written.layers.iter().map(|l| json!({
                "digest": l.digest.to_string(), "size": l.size, "diff_id": l.diff_id.to_string(), "media_type": l.media_type,
            })).collect::<Vec<_>>(),
            "push": written.push.map(|p| json!({
                "uploaded": p.uploaded, "uploaded_bytes": p.uploaded_bytes,
                "already_there": p.already_there, "mounted": p.mounted,
            })),
        });
        let mut stdout = crate::exit::stdout();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
        stdout.flush()?;
    } else if !quiet {
        // --quiet prints errors only; scripts that want the digest use --json.
        let mut stdout = crate::exit::stdout();
        writeln!(stdout, "{} {}", written.reference, written.manifest_digest)?;
        stdout.flush()?;
    }
    Ok(())
}
