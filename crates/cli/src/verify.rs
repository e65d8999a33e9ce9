//! `bakedb verify REF`: exit 0 if every digest, size, diff_id, media type and reference holds.

use std::io::Write;

use anyhow::Result;
use bakedb_oci::reference::ImageRef;
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
    progress.done(&format!(
        "{reference}: manifest {}, config {}, {} layers ({}) verified",
        report.image.manifest_digest,
        report.image.config_digest,
        report.layers_checked,
        human_bytes(report.bytes_checked)
    ));
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
            }))?
        )?;
        stdout.flush()?;
    }
    Ok(())
}
