//! `bakedb verify REF`: exit 0 if every digest, size, diff_id, media type and reference holds.
//! What killed builds left in the layout or beside the archive is reported as a warning
//! (and in --json), never as a failure: the image itself is fine.

use std::io::Write;

use anyhow::Result;
use bakedb_engines::IMAGE_JSON;
use bakedb_oci::Digest;
use bakedb_oci::garbage::Garbage;
use bakedb_oci::reference::ImageRef;
use bakedb_oci::source::{ImageSource, ResolvedImage};
use bakedb_oci::verify::verify;
use serde_json::json;

use crate::VerifyArgs;
use crate::exit::{Code, StageExt};
use crate::progress::{Progress, human_bytes};

pub fn run(args: VerifyArgs, quiet: bool) -> Result<()> {
    let reference: ImageRef = args
        .reference
        .parse()
        .stage(Code::Usage, || "parsing the image reference".into())?;
    if !reference.path().exists() {
        return Err(anyhow::anyhow!(
            "{} does not exist",
            reference.path().display()
        ))
        .stage(Code::NotFound, || format!("verifying {reference}"));
    }
    let mut progress = Progress::new(quiet || args.json);
    progress.phase("verify", 0);
    let report = verify(&reference, &mut |n| progress.inc(n))
        .stage(Code::VerifyFailed, || format!("verifying {reference}"))?;
    check_image_json(&reference, &report.image)
        .stage(Code::VerifyFailed, || format!("verifying {reference}"))?;
    progress.done(&format!(
        "{reference}: manifest {}, config {}, {} layers ({}) verified",
        report.image.manifest_digest,
        report.image.config_digest,
        report.layers_checked,
        human_bytes(report.bytes_checked)
    ));
    if !quiet && !args.json {
        for line in garbage_lines(&reference, &report.garbage) {
            crate::exit::stderr_line(&format!("bakedb: warning: {line}"));
        }
    }
    if args.json {
        let mut stdout = crate::exit::stdout();
        writeln!(
            stdout,
            "{}",
            serde_json::to_string_pretty(&json!({
                "reference": reference.to_string(),
                "ok": true,
                "manifest_digest": report.image.manifest_digest.to_string(),
                "config_digest": report.image.config_digest.to_string(),
                "layers": report.layers_checked,
                "bytes": report.bytes_checked,
                "garbage": garbage_json(&report.garbage),
            }))?
        )?;
        stdout.flush()?;
    }
    Ok(())
}

/// A bakedb image (its config's Env has BAKEDB_DATA_DIGEST) must carry the image.json that
/// digest names, readable by this bakedb: what bakedb-init will check at every start.
fn check_image_json(reference: &ImageRef, image: &ResolvedImage) -> Result<()> {
    let expected = image.config["config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.strip_prefix("BAKEDB_DATA_DIGEST="))
        .next_back();
    let Some(expected) = expected else {
        return Ok(());
    };
    let source = ImageSource::open(reference)?;
    let Some((bytes, _)) = crate::inspect::find_image_json(&source, &image.layers)? else {
        anyhow::bail!(
            "the config's Env has BAKEDB_DATA_DIGEST={expected}, but no layer has /{IMAGE_JSON}"
        );
    };
    let actual = Digest::of(&bytes).to_string();
    if actual != expected {
        anyhow::bail!(
            "/{IMAGE_JSON} has digest {actual}, the config's BAKEDB_DATA_DIGEST says {expected}: bakedb-init would refuse to start it"
        );
    }
    Ok(())
}

/// Up to this many paths or digests are named in a warning line; the rest are counted.
const NAMED: usize = 3;

fn named<T>(items: &[T], show: impl Fn(&T) -> String) -> String {
    let mut text: Vec<String> = items.iter().take(NAMED).map(show).collect();
    if items.len() > NAMED {
        text.push(format!("and {} more", items.len() - NAMED));
    }
    text.join(", ")
}

/// One line per kind of garbage: what, where, how big, and what removes it.
fn garbage_lines(reference: &ImageRef, garbage: &Garbage) -> Vec<String> {
    let mut lines = Vec::new();
    if !garbage.leftovers.is_empty() {
        let n = garbage.leftovers.len();
        let remover = match reference {
            ImageRef::Oci { .. } => {
                format!("the next `bakedb build` into {}", reference.location())
            }
            _ => "the next `bakedb build` of an archive into that directory".to_owned(),
        };
        lines.push(format!(
            "{}: {n} temporary file{} of builds that were killed, {} in all: {}; {remover} removes them (they are not part of any image)",
            reference.location(),
            if n == 1 { "" } else { "s" },
            human_bytes(garbage.leftover_bytes()),
            named(&garbage.leftovers, |l| format!(
                "{} ({})",
                l.path.display(),
                human_bytes(l.bytes)
            )),
        ));
    }
    if !garbage.unreferenced.is_empty() {
        let n = garbage.unreferenced.len();
        lines.push(format!(
            "{}: {n} blob{} no tag references, {} in all (left by a build killed before it wrote index.json, or by untagging): {}; `umoci gc --layout {}` removes them",
            reference.location(),
            if n == 1 { "" } else { "s" },
            human_bytes(garbage.unreferenced_bytes()),
            named(&garbage.unreferenced, |u| format!(
                "{} ({})",
                u.digest,
                human_bytes(u.bytes)
            )),
            reference.path().display(),
        ));
    }
    lines
}

fn garbage_json(garbage: &Garbage) -> serde_json::Value {
    json!({
        "build_in_progress": garbage.writer_active,
        "temp_files": garbage.leftovers.iter().map(|l| json!({
            "path": l.path.display().to_string(),
            "bytes": l.bytes,
        })).collect::<Vec<_>>(),
        "temp_bytes": garbage.leftover_bytes(),
        "unreferenced_blobs": garbage.unreferenced.iter().map(|u| json!({
            "digest": u.digest.to_string(),
            "bytes": u.bytes,
        })).collect::<Vec<_>>(),
        "unreferenced_bytes": garbage.unreferenced_bytes(),
    })
}
