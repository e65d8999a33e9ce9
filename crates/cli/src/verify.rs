//! `bakedb verify REF`: exit 0 if every digest, size, diff_id, media type and reference holds.
//! What killed builds left in the layout or beside the archive is reported as a warning
//! (and in --json), never as a failure: the image itself is fine.

use std::io::Write;

use anyhow::Result;
use bakedb_engines::datafiles::{self, FileDigest};
use bakedb_engines::delta;
use bakedb_engines::image_json::ImageJson;
use bakedb_engines::{DATA_DIR, DataFile, IMAGE_JSON};
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
    if let Some(path) = reference.path()
        && !path.exists()
    {
        return Err(anyhow::anyhow!("{} does not exist", path.display()))
            .stage(Code::NotFound, || format!("verifying {reference}"));
    }
    let registries = args.registry.registries(Some(&reference))?;
    let mut progress = Progress::new(quiet || args.json);
    progress.phase("verify", 0);
    let report = verify(&reference, &registries, &mut |n| progress.inc(n))
        .stage(Code::VerifyFailed, || format!("verifying {reference}"))?;
    check_image_json(&reference, &registries, &report.image)
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
fn check_image_json(
    reference: &ImageRef,
    registries: &bakedb_oci::registry::Registries,
    image: &ResolvedImage,
) -> Result<()> {
    let expected = image.config["config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.strip_prefix("BAKEDB_DATA_DIGEST="))
        .next_back();
    let Some(expected) = expected else {
        return Ok(());
    };
    let source = ImageSource::open_with(reference, registries)?;
    let Some((bytes, parsed)) = crate::inspect::find_image_json(&source, &image.layers)? else {
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
    check_composition(&source, image, &parsed)
}

/// Every patched file of a delta re-bake, composed from its base and patches as bakedb-init
/// composes it, must be the file image.json describes; base and patches must be theirs too.
fn check_composition(source: &ImageSource, image: &ResolvedImage, ij: &ImageJson) -> Result<()> {
    let patched: Vec<&FileDigest> = ij.files.iter().filter(|f| !f.patches.is_empty()).collect();
    if patched.is_empty() {
        return Ok(());
    }
    let scratch = crate::build::ScratchDir::new()?;
    let entry = |path: &str| ij.files.iter().find(|f| f.path == path);
    let check = |what: &str,
                 host: &std::path::Path,
                 want_size: u64,
                 sha: &Option<String>,
                 chunks: &[String]|
     -> Result<()> {
        let got = datafiles::digest_file(
            &DataFile {
                rel_path: what.to_owned(),
                host_path: host.to_owned(),
                mode: 0,
                page_size: 0,
                page_header: 0,
            },
            crate::build::threads(),
        )?;
        if got.size != want_size || &got.sha256 != sha || got.chunks != chunks {
            anyhow::bail!("{what} does not match image.json (size or digests)");
        }
        Ok(())
    };
    for file in patched {
        let base = file
            .base
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{} has patches but no base", file.path))?;
        let host = scratch.0.join("composed");
        let in_image = format!("{DATA_DIR}/{}", file.path);
        if !source.extract_file(&image.layers, &in_image, &host)? {
            anyhow::bail!("no layer has /{in_image}, the base of a patched file");
        }
        check(
            &format!("/{in_image} (the base)"),
            &host,
            base.size,
            &base.sha256,
            &base.chunks,
        )?;
        let mut patches = Vec::new();
        for (i, p) in file.patches.iter().enumerate() {
            let listed = entry(p).ok_or_else(|| {
                anyhow::anyhow!("{}'s patch {p} is not in image.json's files", file.path)
            })?;
            let at = scratch.0.join(format!("patch.{i}"));
            let in_image = format!("{DATA_DIR}/{p}");
            if !source.extract_file(&image.layers, &in_image, &at)? {
                anyhow::bail!("no layer has /{in_image}, a patch image.json lists");
            }
            check(
                &format!("/{in_image}"),
                &at,
                listed.size,
                &listed.sha256,
                &listed.chunks,
            )?;
            patches.push(at);
        }
        let refs: Vec<&std::path::Path> = patches.iter().map(|p| p.as_path()).collect();
        delta::compose_file(&host, &refs).map_err(|why| anyhow::anyhow!(why))?;
        check(
            &format!(
                "/{DATA_DIR}/{} composed from its base and {} patch(es)",
                file.path,
                refs.len()
            ),
            &host,
            file.size,
            &file.sha256,
            &file.chunks,
        )?;
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
            reference.path().unwrap_or(std::path::Path::new("?")).display(),
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
