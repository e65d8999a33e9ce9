//! Phase 2, data: the engine takes its snapshot (or reads the snapshot directory) into a
//! private scratch directory, and describes the image it makes.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use bakedb_engines::{Hashes, ImageSpec, Known, Snapshot, StreamedFile};

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
    /// A snapshot still being read from the source, for the data layer to take its files
    /// from (`Take::Stream`); then `snapshot` has no copy of them.
    pub stream: Option<Stream>,
}

/// The files of a snapshot being read, and its end (`bakedb_engines::Streaming`).
pub struct Stream {
    pub files: Vec<StreamedFile>,
    pub finish: Box<dyn FnOnce() -> bakedb_engines::Result<Hashes> + Send>,
}

/// Which snapshot a build takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// A re-bake that may be a patch: the engine may keep only the pages that differ from
    /// the previous image (`Plan::snapshot_changes`).
    Changes,
    /// Whole files, copied (a patch that ships files whole needs them on disk).
    Whole,
    /// A full build (a first one, or a fresh base): the files may go from the source
    /// straight into the data layer (`Plan::snapshot_stream`).
    Stream,
}

/// Print what a snapshot lost or left out: loudly, --quiet or not (it is also in image.json).
pub fn warn_notes(notes: &[String]) {
    for note in notes {
        crate::exit::stderr_line(&format!("bakedb: warning: {note}"));
    }
}

pub fn take(plan: &mut Plan, progress: &mut Progress, how: Take) -> Result<Data> {
    let scratch =
        ScratchDir::new().stage(Code::Output, || "creating a scratch directory".into())?;
    let step = plan.engine_plan.snapshot_step();
    let taken_at = plan.time.snapshot_time();
    let mut phase = |p: &str| progress.phase(p, 0);
    let mut stream = None;
    let taken = match (how, plan.previous.as_ref()) {
        (Take::Changes, Some(previous)) => plan
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
        (Take::Stream, _) => plan
            .engine_plan
            .snapshot_stream(&taken_at, &mut phase)
            .map_err(|e| engine_error(e, &step))?
            .map(|streaming| {
                stream = Some(Stream {
                    files: streaming.files,
                    finish: streaming.finish,
                });
                streaming.snapshot
            }),
        _ => None,
    };
    let snapshot = match taken {
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
        stream,
    })
}
