//! PostgreSQL under the engine contract: a live server (`postgresql://…`, primary or
//! standby) or a snapshot directory, baked onto a base image that has the server.

use std::path::{Path, PathBuf};

use super::conn::Source;
use super::image::{Base, Fit, load_snapshot_dir, profile, write_snapshot_meta};
use super::snapshot::{Request, snapshot};
use super::source::{Accept, SourceInfo, probe_source};
use super::tools::Tools;
use super::{PGDATA, redact};
use crate::{
    BaseImage, Bundled, COPYUP_SHIM_PATH, DATA_DIR, Engine, Error, ImageSpec, Options, PatchMode,
    Plan, Result, Snapshot, notes_of,
};

pub struct Postgres;

impl Engine for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn base_advice(&self) -> &'static str {
        "--engine postgres needs --base: an image with the PostgreSQL server, e.g. the official one copied with `skopeo copy docker://postgres:15 oci:postgres:15` (`cargo xtask fixtures` builds an equivalent from Debian's packages)"
    }

    fn wants_base_file(&self, path: &str) -> Option<usize> {
        super::image::wants_base_file(path)
    }

    fn follow(&self, source: &Path, options: &Options) -> Result<Box<dyn crate::Follow>> {
        let tools = Tools::find(options.pg_bin.as_deref(), None)?;
        let conn = live_source(source)?;
        Ok(Box::new(Follower { tools, conn }))
    }

    fn plan(
        &self,
        source: &Path,
        options: &Options,
        base: Option<&BaseImage>,
        previous: Option<&crate::image_json::ImageJson>,
    ) -> Result<Box<dyn Plan>> {
        // A re-bake keeps pages of REF whose LSNs come from REF's WAL: this copy's WAL must
        // start after REF's, so that no page is ahead of it.
        let wal_after = previous
            .and_then(|p| p.snapshot["position"]["checkpoint_lsn"].as_str())
            .map(str::to_owned);
        if options.busy_timeout.is_some() {
            return Err(Error::usage(
                "checking --busy-timeout",
                "--busy-timeout is for --engine sqlite: a PostgreSQL base backup does not wait for writers' locks",
            ));
        }
        let accept =
            Accept::parse(&options.accept).map_err(|why| Error::usage("parsing --accept", why))?;
        if options.for_snapshot {
            // `bakedb snapshot`: no base image; the tools' major version decides.
            let tools = Tools::find(options.pg_bin.as_deref(), None)?;
            let conn = live_source(source)?;
            let info = probe_source(&tools, &conn, accept)?;
            return Ok(Box::new(PostgresPlan {
                base: None,
                location: String::new(),
                kind: Kind::Live {
                    tools,
                    conn,
                    info: Box::new(info),
                    accept,
                    fit: Fit::default(),
                    wal_after: None,
                },
                lazy_copyup: false,
            }));
        }
        let Some(base_image) = base else {
            return Err(Error::usage("checking --base", self.base_advice()));
        };
        // The data directory only starts under the major version that wrote it, so the base
        // image's version decides, and a mismatch stops the build before any work; so does a
        // base that lacks what the data needs (a locale, an extension).
        let location = &base_image.location;
        let base = Base::discover(base_image)
            .map_err(|why| Error::base(format!("reading base image {location}"), why))?;
        let check_fit = |needs: &serde_json::Value| {
            base.fit(needs)
                .map_err(|why| Error::base(format!("checking base image {location}"), why))
        };
        let kind = if source.is_dir() {
            let (snap, data_major) = load_snapshot_dir(source)?;
            if data_major != base.major {
                return Err(Error::base(
                    "checking versions",
                    format!(
                        "the snapshot is a PostgreSQL {data_major} data directory and the base image has PostgreSQL {}; use a base image of PostgreSQL {data_major}",
                        base.major
                    ),
                ));
            }
            let fit = check_fit(&snap.provenance)?;
            Kind::Directory {
                dir: source.to_owned(),
                snapshot: Some(snap),
                fit,
            }
        } else {
            let tools = Tools::find(options.pg_bin.as_deref(), Some(base.major))?;
            let conn = live_source(source)?;
            let info = probe_source(&tools, &conn, accept)?;
            check_fit(&info.needs())?;
            Kind::Live {
                tools,
                conn,
                info: Box::new(info),
                accept,
                fit: Fit::default(),
                wal_after,
            }
        };
        Ok(Box::new(PostgresPlan {
            base: Some(base),
            location: location.clone(),
            kind,
            lazy_copyup: options.pg_lazy_copyup,
        }))
    }
}

enum Kind {
    Live {
        tools: Tools,
        conn: Source,
        info: Box<SourceInfo>,
        accept: Accept,
        /// Set from the copy, the authoritative look at what the data needs.
        fit: Fit,
        /// `--from`: REF's checkpoint LSN, which the copy's new WAL must start after.
        wal_after: Option<String>,
    },
    Directory {
        dir: PathBuf,
        /// Loaded (and checked) when planning; handed over by `snapshot`.
        snapshot: Option<Snapshot>,
        fit: Fit,
    },
}

/// `--source` as a live server, its password moved out of the command line.
/// A live PostgreSQL source followed by `bakedb watch` (see `source::position`).
struct Follower {
    tools: Tools,
    conn: Source,
}

impl crate::Follow for Follower {
    fn position(&mut self) -> Result<String> {
        super::source::position(&self.tools, &self.conn)
    }
}

fn live_source(source: &Path) -> Result<Source> {
    let text = source.to_string_lossy();
    Source::new(&text)?.ok_or_else(|| Error::Postgres {
        step: "checking --source".into(),
        detail: format!(
            "{:?} is not a PostgreSQL connection URI; pass postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (the user needs the REPLICATION attribute) or a directory written by `bakedb snapshot --engine postgres`",
            redact(&text)
        ),
    })
}

struct PostgresPlan {
    /// None for `bakedb snapshot`, which has no base image.
    base: Option<Base>,
    location: String,
    kind: Kind,
    lazy_copyup: bool,
}

impl PostgresPlan {
    fn fit(&self) -> &Fit {
        match &self.kind {
            Kind::Live { fit, .. } | Kind::Directory { fit, .. } => fit,
        }
    }
}

impl Plan for PostgresPlan {
    fn owner(&self) -> Result<(u32, u32)> {
        self.base.as_ref().and_then(|b| b.postgres_user).ok_or_else(|| {
            Error::base(
                format!("reading base image {}", self.location),
                "the base image's /etc/passwd has no `postgres` user; pass --user UID:GID of the user its postgres should run as",
            )
        })
    }

    fn snapshot_step(&self) -> String {
        match &self.kind {
            Kind::Live { conn, .. } => format!("snapshotting {}", conn.redacted()),
            Kind::Directory { dir, .. } => {
                format!("reading snapshot directory {}", dir.display())
            }
        }
    }

    fn snapshot(
        &mut self,
        out_dir: &Path,
        taken_at: &str,
        durable: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Snapshot> {
        match &mut self.kind {
            Kind::Directory { snapshot, .. } => Ok(snapshot
                .take()
                .expect("the snapshot directory is read once")),
            Kind::Live {
                tools,
                conn,
                info,
                accept,
                fit,
                wal_after,
            } => {
                let request = Request {
                    tools,
                    source: conn,
                    info,
                    accept: *accept,
                    out_dir,
                    taken_at,
                    durable,
                    wal_after: wal_after.as_deref(),
                };
                let snap = snapshot(&request, progress)?;
                if let Some(base) = &self.base {
                    *fit = base.fit(&snap.provenance).map_err(|why| {
                        Error::base("checking the base image against the copy", why)
                    })?;
                }
                Ok(snap)
            }
        }
    }

    fn describe(&self, snapshot: &Snapshot) -> Option<String> {
        match &self.kind {
            Kind::Directory { .. } => None,
            Kind::Live { conn, .. } => Some(format!(
                "snapshot of {} ({}) at LSN {} (pg_basebackup, ANALYZE, VACUUM (FREEZE), clean shutdown)",
                conn.redacted(),
                snapshot.provenance["server_role"].as_str().unwrap_or("?"),
                snapshot.provenance["position"]["lsn"]
                    .as_str()
                    .unwrap_or("?")
            )),
        }
    }

    fn write_snapshot_meta(&self, dir: &Path, snapshot: &Snapshot) -> Result<()> {
        write_snapshot_meta(dir, snapshot)
    }

    fn image(&self, snapshot: &Snapshot, _from_scratch: bool) -> Result<ImageSpec> {
        let fit = self.fit();
        let mut notes = notes_of(&snapshot.provenance);
        notes.extend(fit.notes.iter().cloned());
        Ok(ImageSpec {
            // postgres on the baked cluster; the profile adds its flags.
            cmd: Some(vec!["postgres".to_owned()]),
            // The official image's docker-entrypoint.sh would initialise a database.
            inherit_entrypoint: false,
            clear_entrypoint_without_init: true,
            // For the tools people run in the container (psql, pg_isready, pg_controldata):
            // the baked cluster and the socket directory of the profile.
            env: vec![
                format!("PGDATA=/{DATA_DIR}/{PGDATA}"),
                "PGHOST=/tmp".to_owned(),
            ],
            // Debian's and RHEL's server packages keep postgres off PATH; the image's command
            // and healthcheck name it bare.
            path: self.base.as_ref().and_then(|b| b.path_env.clone()),
            exposed_ports: vec!["5432/tcp".into()],
            // Fast shutdown: PostgreSQL's SIGTERM waits for every client to disconnect.
            stop_signal: Some("SIGINT".into()),
            healthcheck: Some(serde_json::json!({
                "Test": ["CMD", "pg_isready", "-q"],
                "Interval": 5_000_000_000u64,
                "Timeout": 5_000_000_000u64,
                "Retries": 3,
            })),
            profile: profile(&fit.carried, self.lazy_copyup.then_some(COPYUP_SHIM_PATH)),
            bundled: if self.lazy_copyup {
                vec![Bundled::CopyupShim]
            } else {
                Vec::new()
            },
            // postgres reads its relation files itself: init composes them.
            patch_mode: PatchMode::Apply,
            notes: Some(notes),
        })
    }
}
