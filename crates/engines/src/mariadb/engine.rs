//! MariaDB under the engine contract: a live server (`mysql://…`, on this machine) or a
//! snapshot directory, baked onto a base image that has the server.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::conn::Source;
use super::image::{Base, SOCKET, profile};
use super::snapshot::{Request, SourceInfo, Tools, collect, probe, snapshot};
use super::{DATADIR, err, io, redact};
use crate::{
    BaseImage, Engine, Error, ImageSpec, Options, PatchMode, Plan, Result, Snapshot, notes_of,
};

pub struct Mariadb;

impl Engine for Mariadb {
    fn name(&self) -> &'static str {
        "mariadb"
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn base_advice(&self) -> &'static str {
        "--engine mariadb needs --base: an image with the MariaDB server of the source's release series, e.g. the official one copied with `skopeo copy docker://mariadb:10.11 oci:mariadb:10.11` (`cargo xtask fixtures` builds an equivalent from Debian's packages)"
    }

    fn wants_base_file(&self, path: &str) -> Option<usize> {
        super::image::wants_base_file(path)
    }

    fn follow(&self, source: &Path, _options: &Options) -> Result<Box<dyn crate::Follow>> {
        let tools = Tools::find()?;
        let conn = live_source(source)?;
        let log_bin = conn.query(&tools.client, "SELECT @@log_bin")?;
        if log_bin.first().and_then(|r| r.first()).map(String::as_str) != Some("1") {
            return Err(err(
                format!("following {}", conn.redacted()),
                "the server writes no binlog, so bakedb watch cannot tell when a transaction commits; start it with log_bin (and server_id)",
            ));
        }
        Ok(Box::new(Follower { tools, conn }))
    }

    fn plan(
        &self,
        source: &Path,
        options: &Options,
        base: Option<&BaseImage>,
        previous: Option<&crate::image_json::ImageJson>,
    ) -> Result<Box<dyn Plan>> {
        if options.busy_timeout.is_some() {
            return Err(Error::usage(
                "checking --busy-timeout",
                "--busy-timeout is for --engine sqlite: mariadb-backup takes its own short lock",
            ));
        }
        if options.pg_bin.is_some() || options.pg_lazy_copyup {
            return Err(Error::usage(
                "checking the flags",
                "--pg-bin and --pg-lazy-copyup are for --engine postgres",
            ));
        }
        if !options.accept.is_empty() {
            return Err(Error::usage(
                "parsing --accept",
                "--engine mariadb accepts no losses: what cannot be baked is refused",
            ));
        }
        // A re-bake (--from) needs nothing of REF here: its pages are compared whole (no page
        // header is left out of a hash), so every page that differs in any byte ships, and the
        // composed files are the new copy byte for byte.
        let _ = previous;
        let base_image_location =
            |image: Option<&BaseImage>| image.map(|i| i.location.clone()).unwrap_or_default();
        let image = base;
        let base = if options.for_snapshot {
            None
        } else {
            let Some(image) = image else {
                return Err(Error::usage("checking --base", self.base_advice()));
            };
            let location = &image.location;
            Some(
                Base::discover(image)
                    .map_err(|why| Error::base(format!("reading base image {location}"), why))?,
            )
        };
        let location = base_image_location(image);
        let kind = if source.is_dir() {
            let snap = load_snapshot_dir(source)?;
            if let Some(base) = &base {
                fit(base, &snap.provenance, &location)?;
            }
            Kind::Directory {
                dir: source.to_owned(),
                snapshot: Some(snap),
            }
        } else {
            let conn = live_source(source)?;
            let tools = Tools::find()?;
            let info = probe(&tools, &conn)?;
            if let Some(base) = &base {
                fit(
                    base,
                    &json!({"series": info.series, "requires": {"plugins": info.plugins}}),
                    &location,
                )?;
            }
            Kind::Live {
                tools: Box::new(tools),
                conn,
                info: Box::new(info),
            }
        };
        Ok(Box::new(MariadbPlan {
            location,
            base,
            kind,
        }))
    }
}

/// `--source` as a live server, its credentials in a private option file.
fn live_source(source: &Path) -> Result<Source> {
    let text = source.to_string_lossy();
    Source::new(&text)?.ok_or_else(|| {
        err(
            "checking --source",
            format!(
                "{:?} is not a MariaDB connection URI; pass mysql://USER[:PASSWORD]@HOST[:PORT]/ (or mysql://USER@/?socket=PATH) of a server on this machine, or a directory written by `bakedb snapshot --engine mariadb`",
                redact(&text)
            ),
        )
    })
}

/// A live MariaDB source followed by `bakedb watch`: its binlog GTID position, which every
/// commit (of any engine, Aria and MyISAM included) moves and bakedb's own backup does not.
struct Follower {
    tools: Tools,
    conn: Source,
}

impl crate::Follow for Follower {
    fn position(&mut self) -> Result<String> {
        let rows = self
            .conn
            .query(&self.tools.client, "SELECT @@gtid_binlog_pos")?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .unwrap_or_default())
    }
}

/// Whether a snapshot (its provenance) starts on `base`: the same release series, every
/// plugin library it had loaded.
fn fit(base: &Base, provenance: &serde_json::Value, location: &str) -> Result<()> {
    let step = format!("checking base image {location}");
    let series = provenance["series"].as_str().unwrap_or("?");
    if series != base.series {
        return Err(Error::base(
            step,
            format!(
                "the snapshot is of MariaDB {series} and the base image has MariaDB {} ({}): a physical copy starts only under its own release series; use a base image of MariaDB {series}",
                base.series, base.version
            ),
        ));
    }
    let plugins: Vec<String> =
        serde_json::from_value(provenance["requires"]["plugins"].clone()).unwrap_or_default();
    let missing = base.missing_plugins(&plugins);
    if !missing.is_empty() {
        return Err(Error::base(
            step,
            format!(
                "it lacks the plugin libraries {} that the source has loaded (accounts or tables would not work): use a base image with them",
                missing.join(", ")
            ),
        ));
    }
    Ok(())
}

enum Kind {
    Live {
        tools: Box<Tools>,
        conn: Source,
        info: Box<SourceInfo>,
    },
    Directory {
        dir: PathBuf,
        snapshot: Option<Snapshot>,
    },
}

struct MariadbPlan {
    /// None for `bakedb snapshot`, which has no base image.
    base: Option<Base>,
    location: String,
    kind: Kind,
}

impl Plan for MariadbPlan {
    fn owner(&self) -> Result<(u32, u32)> {
        self.base.as_ref().and_then(|b| b.mysql_user).ok_or_else(|| {
            Error::base(
                format!("reading base image {}", self.location),
                "the base image's /etc/passwd has no `mysql` user; pass --user UID:GID of the user its mariadbd should run as",
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
            Kind::Live { tools, conn, info } => snapshot(
                &Request {
                    tools,
                    source: conn,
                    info,
                    out_dir,
                    taken_at,
                    durable,
                },
                progress,
            ),
        }
    }

    fn describe(&self, snapshot: &Snapshot) -> Option<String> {
        match &self.kind {
            Kind::Directory { .. } => None,
            Kind::Live { conn, .. } => {
                let p = &snapshot.provenance["position"];
                Some(format!(
                    "snapshot of {} at binlog {}:{} GTID {} (mariadb-backup, ANALYZE TABLE, slow shutdown, aria_chk --zerofill)",
                    conn.redacted(),
                    p["binlog_file"].as_str().unwrap_or("-"),
                    p["binlog_position"]
                        .as_u64()
                        .map_or("-".into(), |n| n.to_string()),
                    p["gtid"].as_str().unwrap_or("-"),
                ))
            }
        }
    }

    fn write_snapshot_meta(&self, dir: &Path, snapshot: &Snapshot) -> Result<()> {
        let meta = json!({"engine": "mariadb", "data": DATADIR, "provenance": snapshot.provenance});
        let path = dir.join("snapshot.json");
        let tmp = dir.join(".snapshot.json.partial");
        fs::write(&tmp, serde_json::to_vec_pretty(&meta).expect("json"))
            .map_err(io("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("renaming", &path))
    }

    fn image(&self, snapshot: &Snapshot, _from_scratch: bool) -> Result<ImageSpec> {
        let carried: std::collections::BTreeMap<String, String> =
            serde_json::from_value(snapshot.provenance["settings"].clone()).unwrap_or_default();
        let healthcheck = self.base.as_ref().map(|b| {
            json!({
                "Test": b.healthcheck,
                "Interval": 5_000_000_000u64,
                "Timeout": 5_000_000_000u64,
                "Retries": 3,
            })
        });
        Ok(ImageSpec {
            cmd: Some(vec!["mariadbd".to_owned()]),
            // The official image's docker-entrypoint.sh would initialise a database.
            inherit_entrypoint: false,
            clear_entrypoint_without_init: true,
            // Clients in the container (mariadb, mariadb-admin, the healthcheck) find the
            // profile's socket.
            env: vec![format!("MYSQL_UNIX_PORT={SOCKET}")],
            path: None,
            exposed_ports: vec!["3306/tcp".into()],
            // mariadbd shuts down cleanly on SIGTERM (the official image's default).
            stop_signal: Some("SIGTERM".into()),
            healthcheck,
            profile: profile(
                &carried,
                snapshot.provenance["series"].as_str().unwrap_or_default(),
            ),
            bundled: Vec::new(),
            // mariadbd reads its files itself: init composes them.
            patch_mode: PatchMode::Apply,
            notes: Some(notes_of(&snapshot.provenance)),
        })
    }
}

/// Read `snapshot.json` and the data directory of a directory written by `bakedb snapshot`.
fn load_snapshot_dir(dir: &Path) -> Result<Snapshot> {
    let meta_path = dir.join("snapshot.json");
    let bytes = fs::read(&meta_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Source {
                path: dir.to_owned(),
                reason: "is not a directory written by `bakedb snapshot` (it has no snapshot.json); pass a mysql:// URI of the live server, or a directory written by `bakedb snapshot --engine mariadb --source URI --out DIR`".into(),
            }
        } else {
            io("reading", &meta_path)(e)
        }
    })?;
    let meta: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Source {
        path: meta_path.clone(),
        reason: format!("is not valid JSON: {e}"),
    })?;
    if meta["engine"] != "mariadb" {
        return Err(Error::Source {
            path: meta_path,
            reason: format!("records engine {}, not mariadb", meta["engine"]),
        });
    }
    let (dirs, files) = collect(&dir.join(DATADIR))?;
    Ok(Snapshot {
        engine: "mariadb",
        files,
        dirs,
        hashed: Default::default(),
        partial: false,
        provenance: meta["provenance"].clone(),
    })
}
