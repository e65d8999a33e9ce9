//! `bakedb snapshot`: a consistent, engine-prepared copy of a live database in a directory,
//! which `bakedb build --source DIR` bakes as it is. No engine is named here.

use anyhow::{Result, anyhow};
use bakedb_oci::time::BuildTime;

use crate::SnapshotArgs;
use crate::build::{engine_named, engine_options, warn_notes};
use crate::exit::{Code, StageExt, engine_error};
use crate::progress::Progress;

pub fn run(args: SnapshotArgs, quiet: bool) -> Result<()> {
    let engine = engine_named(&args.engine)?;
    let mut options = engine_options(
        &args.accept,
        args.busy_timeout,
        args.pg_bin.as_deref(),
        false,
    );
    options.for_snapshot = true;
    let mut plan = engine
        .plan(&args.source, &options, None, None)
        .map_err(|e| engine_error(e, ""))?;
    if args.out.exists()
        && std::fs::read_dir(&args.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(anyhow!(
            "{} exists and is not empty; choose a new directory",
            args.out.display()
        ))
        .stage(Code::Exists, || "checking --out".into());
    }
    let time = BuildTime::from_env().stage(Code::Usage, || "reading SOURCE_DATE_EPOCH".into())?;
    let mut progress = Progress::new(quiet);
    // A failed snapshot leaves --out as it found it: absent, or empty.
    let created_out = !args.out.exists();
    std::fs::create_dir_all(&args.out)
        .stage(Code::Output, || format!("creating {}", args.out.display()))?;
    let step = plan.snapshot_step();
    let written = plan
        .snapshot(&args.out, &time.snapshot_time(), true, &mut |phase| {
            progress.phase(phase, 0)
        })
        .map_err(|e| engine_error(e, &step))
        .and_then(|snap| {
            // Written last: a directory without it is not a snapshot.
            plan.write_snapshot_meta(&args.out, &snap)
                .map_err(anyhow::Error::new)
                .stage(Code::Output, || format!("writing {}", args.out.display()))?;
            Ok(snap)
        });
    let snap = match written {
        Ok(snap) => snap,
        Err(e) => {
            for entry in std::fs::read_dir(&args.out).into_iter().flatten().flatten() {
                let path = entry.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
            if created_out {
                let _ = std::fs::remove_dir(&args.out);
            }
            return Err(e);
        }
    };
    warn_notes(&bakedb_engines::notes_of(&snap.provenance));
    progress.done(&format!(
        "{} written to {}",
        plan.describe(&snap)
            .unwrap_or_else(|| format!("snapshot of {}", args.source.display())),
        args.out.display()
    ));
    Ok(())
}
