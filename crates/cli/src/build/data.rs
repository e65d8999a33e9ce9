//! Phase 2, data: the engine takes its snapshot (or reads the snapshot directory) into a
//! private scratch directory, and describes the image it makes.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use bakedb_engines::{ImageSpec, Known, Snapshot};

use super::plan::Plan;
use crate::exit::{Code, StageExt, engine_error};
use crate::progress::Progress;

/// A scratch directory removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new() -> Result<Self> {
        let base = std::env::temp_dir();
        remove_dead_scratch_dirs(&base);
        for n in 0..1000 {
            let p = base.join(format!("bakedb-snapshot.{}.{n}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return Ok(ScratchDir(p));
            }
        }
        bail!(
            "could not create a scratch directory under {}",
            base.display()
        )
    }
}

/// Scratch directories of builds that were killed (SIGKILL skips Drop): full database copies.
fn remove_dead_scratch_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("bakedb-snapshot.")
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The snapshot and the image the engine makes of it. The scratch copy lives as long as
/// this does: the data layer is written from it.
pub struct Data {
    pub snapshot: Snapshot,
    pub spec: ImageSpec,
    /// Private to this build: the snapshot (when taken live) and the patch files.
    pub scratch: ScratchDir,
}

/// Print what a snapshot lost or left out: loudly, --quiet or not (it is also in image.json).
pub fn warn_notes(notes: &[String]) {
    for note in notes {
        crate::exit::stderr_line(&format!("bakedb: warning: {note}"));
    }
}

/// `changes_only`: a re-bake that may be a patch generation, for which the engine may keep
/// only the pages that differ from the previous image (`Plan::snapshot_changes`).
pub fn take(plan: &mut Plan, progress: &mut Progress, changes_only: bool) -> Result<Data> {
    let scratch =
        ScratchDir::new().stage(Code::Output, || "creating a scratch directory".into())?;
    let step = plan.engine_plan.snapshot_step();
    let taken_at = plan.time.snapshot_time();
    let mut phase = |p: &str| progress.phase(p, 0);
    let partial = match plan.previous.as_ref().filter(|_| changes_only) {
        Some(previous) => plan
            .engine_plan
            .snapshot_changes(
                &scratch.0,
                &taken_at,
                &Known {
                    index: &previous.index,
                    files: &previous.image_json.files,
                },
                &mut phase,
            )
            .map_err(|e| engine_error(e, &step))?,
        None => None,
    };
    let snapshot = match partial {
        Some(snapshot) => snapshot,
        None => plan
            .engine_plan
            .snapshot(&scratch.0, &taken_at, false, &mut phase)
            .map_err(|e| engine_error(e, &step))?,
    };
    if let Some(line) = plan.engine_plan.describe(&snapshot) {
        progress.done(&line);
    }
    let spec = plan
        .engine_plan
        .image(&snapshot, plan.base.is_none())
        .map_err(|e| engine_error(e, ""))?;
    if let Some(notes) = &spec.notes {
        warn_notes(notes);
    }
    Ok(Data {
        snapshot,
        spec,
        scratch,
    })
}
