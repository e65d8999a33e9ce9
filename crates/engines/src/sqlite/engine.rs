//! SQLite under the engine contract: a database file (live: another process may keep
//! writing) or a snapshot directory; FROM scratch, the image is served by bakedb-serve.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{DEFAULT_BUSY_TIMEOUT, check_source, load_snapshot_dir, profile, write_snapshot_meta};
use crate::{Bundled, Engine, Error, ImageSpec, Known, Options, PatchMode, Plan, Result, Snapshot};

pub struct Sqlite;

impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn plan(
        &self,
        source: &Path,
        options: &Options,
        _base: Option<&crate::BaseImage>,
        _previous: Option<&crate::image_json::ImageJson>,
    ) -> Result<Box<dyn Plan>> {
        if let Some(what) = options.accept.first() {
            return Err(Error::Usage {
                step: "parsing --accept".into(),
                detail: format!(
                    "{what:?}: a SQLite database is baked whole, there is nothing to accept"
                ),
            });
        }
        if options.pg_lazy_copyup {
            return Err(Error::usage(
                "checking --pg-lazy-copyup",
                "--pg-lazy-copyup is for --engine postgres",
            ));
        }
        if options.pg_bin.is_some() {
            return Err(Error::usage(
                "checking --pg-bin",
                "--pg-bin is for --engine postgres",
            ));
        }
        // `bakedb snapshot` takes a live database only: a directory is refused as a source.
        let snapshot_dir = source.is_dir() && !options.for_snapshot;
        if !snapshot_dir {
            check_source(source)?;
        }
        Ok(Box::new(SqlitePlan {
            source: source.to_owned(),
            snapshot_dir,
            busy_timeout: options.busy_timeout.unwrap_or(DEFAULT_BUSY_TIMEOUT),
        }))
    }

    fn follow(&self, source: &Path, options: &Options) -> Result<Box<dyn crate::Follow>> {
        Ok(Box::new(super::Follower::new(
            source,
            options.busy_timeout.unwrap_or(DEFAULT_BUSY_TIMEOUT),
        )?))
    }
}

struct SqlitePlan {
    source: PathBuf,
    snapshot_dir: bool,
    busy_timeout: Duration,
}

impl Plan for SqlitePlan {
    fn owner(&self) -> Result<(u32, u32)> {
        // Distroless's nonroot: no name needed in a FROM-scratch image.
        Ok((65532, 65532))
    }

    fn snapshot_step(&self) -> String {
        // The engine's errors start with the source ("source app.db: is busy: ...").
        if self.snapshot_dir {
            "reading the snapshot directory".into()
        } else {
            "taking the snapshot".into()
        }
    }

    fn snapshot(
        &mut self,
        out_dir: &Path,
        taken_at: &str,
        durable: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Snapshot> {
        if self.snapshot_dir {
            return load_snapshot_dir(&self.source);
        }
        progress("snapshot");
        super::snapshot(
            &self.source,
            out_dir,
            taken_at,
            durable,
            self.busy_timeout,
            None,
        )
    }

    fn snapshot_changes(
        &mut self,
        out_dir: &Path,
        taken_at: &str,
        known: &Known<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Option<Snapshot>> {
        // A snapshot directory is read as it is: its file is whole already.
        if self.snapshot_dir {
            return Ok(None);
        }
        progress("snapshot");
        super::snapshot(
            &self.source,
            out_dir,
            taken_at,
            false,
            self.busy_timeout,
            Some(known),
        )
        .map(Some)
    }

    fn snapshot_stream(
        &mut self,
        taken_at: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Option<crate::Streaming>> {
        if self.snapshot_dir {
            return Ok(None);
        }
        progress("snapshot");
        super::snapshot_stream(&self.source, taken_at, self.busy_timeout).map(Some)
    }

    fn describe(&self, _snapshot: &Snapshot) -> Option<String> {
        (!self.snapshot_dir).then(|| {
            format!(
                "snapshot of {} read page by page in one read transaction (sqlite_dbpage)",
                self.source.display()
            )
        })
    }

    fn write_snapshot_meta(&self, dir: &Path, snapshot: &Snapshot) -> Result<()> {
        write_snapshot_meta(dir, snapshot)
    }

    fn image(&self, snapshot: &Snapshot, from_scratch: bool) -> Result<ImageSpec> {
        Ok(ImageSpec {
            // FROM scratch the image's own command is bakedb-serve on the baked database; on
            // a base it is the base's (or --cmd: datasette, sqlite3...).
            cmd: from_scratch.then(|| vec!["bakedb-serve".to_owned()]),
            inherit_entrypoint: true,
            clear_entrypoint_without_init: false,
            env: Vec::new(),
            path: from_scratch.then(|| "/usr/local/bin:/usr/bin:/bin".to_owned()),
            exposed_ports: if from_scratch {
                vec!["8080/tcp".into()]
            } else {
                Vec::new()
            },
            stop_signal: from_scratch.then(|| "SIGTERM".to_owned()),
            healthcheck: None,
            profile: profile(snapshot),
            bundled: if from_scratch {
                vec![Bundled::Serve]
            } else {
                Vec::new()
            },
            // bakedb-serve reads patches through its VFS; a command of a base image (sqlite3,
            // datasette) reads the file itself.
            patch_mode: if from_scratch {
                PatchMode::InPlace {
                    env: "BAKEDB_SQLITE_PATCHES",
                }
            } else {
                PatchMode::Apply
            },
            notes: None,
        })
    }
}
