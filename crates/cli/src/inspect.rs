//! `bakedb inspect REF [--json]`: what an image is, without unpacking it.

use std::io::Write;

use anyhow::{Context, Result};
use bakedb_engines::IMAGE_JSON;
use bakedb_engines::image_json::ImageJson;
use bakedb_oci::reference::ImageRef;
use bakedb_oci::source::{ImageSource, LayerRef, TagEntry};
use serde_json::{Value, json};

use crate::InspectArgs;
use crate::exit::{Code, StageExt};
use crate::progress::human_bytes;

/// image.json from the newest layer that has it. bakedb puts it in its own small last layer,
/// so this normally decompresses a few hundred bytes, not the data.
pub fn find_image_json(
    source: &ImageSource,
    layers: &[LayerRef],
) -> Result<Option<(Vec<u8>, ImageJson)>> {
    match source.find_file(layers, IMAGE_JSON, 1 << 20)? {
        None => Ok(None),
        Some(bytes) => {
            let parsed = ImageJson::parse(&bytes)?;
            Ok(Some((bytes, parsed)))
        }
    }
}

pub fn run(args: InspectArgs) -> Result<()> {
    let reference: ImageRef = args
        .reference
        .parse()
        .stage(Code::Usage, || "parsing the image reference".into())?;
    let what = || format!("inspecting {reference}");
    let registries = args.registry.registries(Some(&reference))?;
    let source = ImageSource::open_with(&reference, &registries).stage(Code::NotFound, what)?;
    // A damaged index, or a registry serving what does not match its digest, is an
    // inconsistent image (3); a tag that is not there, or no access to it, is 8.
    let resolved = source.resolve();
    let damaged_index = matches!(
        &resolved,
        Err(bakedb_oci::Error::Invalid { what, .. }) if what == "index.json"
    ) || matches!(
        &resolved,
        Err(bakedb_oci::Error::DigestMismatch { .. }
            | bakedb_oci::Error::Registry {
                failure: bakedb_oci::RegistryFailure::Corrupt,
                ..
            })
    );
    let code = if damaged_index {
        Code::VerifyFailed
    } else {
        Code::NotFound
    };
    let image = resolved.stage(code, what)?;
    let found = find_image_json(&source, &image.layers).stage(Code::VerifyFailed, || {
        format!("reading image.json of {reference}")
    })?;
    // --json shows image.json as it is (fields a newer bakedb adds included); the text
    // output reads the typed form.
    let image_json: Option<Value> = found
        .as_ref()
        .map(|(bytes, _)| serde_json::from_slice(bytes))
        .transpose()
        .context("image.json is not valid JSON")?;
    let layers: Vec<Value> = image
        .layers
        .iter()
        .map(|l| json!({"digest": l.digest.to_string(), "size": l.size, "media_type": l.media_type, "diff_id": l.diff_id.to_string()}))
        .collect();
    let out = json!({
        "reference": reference.to_string(),
        "manifest_digest": image.manifest_digest.to_string(),
        "manifest_size": image.manifest_bytes.len(),
        "annotations": image.manifest.get("annotations").cloned().unwrap_or(Value::Null),
        "config_digest": image.config_digest.to_string(),
        "created": image.config.get("created").cloned().unwrap_or(Value::Null),
        "architecture": image.config.get("architecture").cloned().unwrap_or(Value::Null),
        "os": image.config.get("os").cloned().unwrap_or(Value::Null),
        "config": image.config.get("config").cloned().unwrap_or(Value::Null),
        "layers": layers,
        "size": image.layers.iter().map(|l| l.size).sum::<u64>(),
        "image_json": image_json,
    });
    let mut stdout = crate::exit::stdout();
    // The tags are streamed from the index as they are printed: a layout may hold hundreds
    // of thousands of them, and none is kept.
    let tag_json =
        |t: &TagEntry| json!({"tag": t.tag, "digest": t.digest.to_string(), "size": t.size});
    if args.json {
        // "tags" sorts last among the keys: print the rest, then the tags, as
        // serde_json's pretty printer would print the whole object.
        let rest = serde_json::to_string_pretty(&out)?;
        let rest = rest.strip_suffix("\n}").expect("a pretty-printed object");
        write!(stdout, "{rest},\n  \"tags\": [")?;
        let mut n = 0;
        source
            .for_each_tag(&mut |t| {
                let entry = serde_json::to_string_pretty(&tag_json(&t)).expect("json");
                let sep = if n == 0 { "" } else { "," };
                n += 1;
                write!(stdout, "{sep}\n    {}", entry.replace('\n', "\n    ")).map_err(|e| {
                    bakedb_oci::Error::Io {
                        op: "writing",
                        path: "stdout".into(),
                        source: e,
                    }
                })
            })
            .stage(Code::VerifyFailed, what)?;
        writeln!(stdout, "{}]\n}}", if n == 0 { "" } else { "\n  " })?;
        stdout.flush()?;
        return Ok(());
    }
    writeln!(stdout, "Reference:   {reference}")?;
    writeln!(
        stdout,
        "Manifest:    {} ({} bytes)",
        image.manifest_digest,
        image.manifest_bytes.len()
    )?;
    writeln!(stdout, "Config:      {}", image.config_digest)?;
    writeln!(
        stdout,
        "Created:     {}",
        out["created"].as_str().unwrap_or("-")
    )?;
    writeln!(
        stdout,
        "Platform:    {}/{}",
        out["os"].as_str().unwrap_or("?"),
        out["architecture"].as_str().unwrap_or("?")
    )?;
    writeln!(stdout, "Tags:")?;
    source
        .for_each_tag(&mut |t| {
            writeln!(
                stdout,
                "  {:20} {}",
                t.tag.as_deref().unwrap_or("<untagged>"),
                t.digest
            )
            .map_err(|e| bakedb_oci::Error::Io {
                op: "writing",
                path: "stdout".into(),
                source: e,
            })
        })
        .stage(Code::VerifyFailed, what)?;
    let cfg = &out["config"];
    for (label, key) in [
        ("User", "User"),
        ("Entrypoint", "Entrypoint"),
        ("Cmd", "Cmd"),
        ("Env", "Env"),
        ("Labels", "Labels"),
    ] {
        if let Some(v) = cfg.get(key) {
            writeln!(stdout, "{:<12} {}", format!("{label}:"), v)?;
        }
    }
    writeln!(
        stdout,
        "Layers:      {} ({})",
        image.layers.len(),
        human_bytes(out["size"].as_u64().unwrap_or(0))
    )?;
    for l in &image.layers {
        writeln!(
            stdout,
            "  {} {:>10} {}",
            l.digest,
            human_bytes(l.size),
            l.media_type
        )?;
    }
    match &found {
        None => writeln!(stdout, "Data:        no /{IMAGE_JSON} (not a bakedb image)")?,
        Some((_, ij)) => {
            writeln!(
                stdout,
                "Data:        engine {}, profile {}",
                ij.engine, ij.profile.name
            )?;
            writeln!(stdout, "Snapshot:    {}", ij.snapshot)?;
            if !ij.chain.is_empty() {
                writeln!(
                    stdout,
                    "Chain:       generation {}, {} patch generation(s) on its base",
                    ij.generation,
                    ij.chain.iter().filter(|l| l.kind == "patch").count()
                )?;
                for link in &ij.chain {
                    let what = if link.kind == "base" {
                        format!("base: {} files", link.whole)
                    } else {
                        format!(
                            "patch: {} whole, {} patched ({} pages), {} deleted",
                            link.whole, link.patched, link.pages, link.deleted
                        )
                    };
                    writeln!(
                        stdout,
                        "  {:>4} {} {:>10} {what}",
                        link.generation,
                        link.layer.as_deref().unwrap_or("-"),
                        human_bytes(link.bytes),
                    )?;
                }
            }
            for f in &ij.files {
                let digest = match &f.sha256 {
                    Some(d) => format!("sha256:{d}"),
                    None => format!(
                        "{} chunks of {}",
                        f.chunks.len(),
                        human_bytes(ij.chunk_size)
                    ),
                };
                writeln!(stdout, "  {} {:>10} {digest}", f.path, human_bytes(f.size))?;
            }
        }
    }
    stdout.flush()?;
    Ok(())
}
