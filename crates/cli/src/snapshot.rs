//! `bakedb snapshot`: a consistent copy of a live database in a directory, reusable by build.

use anyhow::{Result, anyhow};
use bakedb_engines::sqlite;
use bakedb_oci::time;

use crate::exit::{Code, StageExt};
use crate::progress::Progress;
use crate::{EngineArg, SnapshotArgs};

pub fn run(args: SnapshotArgs, quiet: bool) -> Result<()> {
    if args.engine != EngineArg::Sqlite {
        return Err(anyhow!(
            "only sqlite snapshots are supported in this version"
        ))
        .stage(Code::Usage, || "checking --engine".into());
    }
    sqlite::check_source(&args.source).stage(Code::Source, || "checking --source".into())?;
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
    let epoch = time::build_epoch()
        .map_err(|e| anyhow!(e))
        .stage(Code::Usage, || "reading SOURCE_DATE_EPOCH".into())?;
    let mut progress = Progress::new(quiet);
    progress.phase("snapshot", 0);
    let snap = crate::build::take_snapshot(&args.source, &args.out, epoch, true)?;
    sqlite::write_snapshot_meta(&args.out, &snap)
        .stage(Code::Output, || format!("writing {}", args.out.display()))?;
    progress.done(&format!(
        "snapshot of {} written to {}",
        args.source.display(),
        args.out.display()
    ));
    Ok(())
}
