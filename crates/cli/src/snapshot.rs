//! `bakedb snapshot`: a consistent copy of a live database in a directory, reusable by build.

use anyhow::{Result, anyhow};
use bakedb_engines::{postgres, sqlite};
use bakedb_oci::time;

use crate::exit::{Code, StageExt};
use crate::progress::Progress;
use crate::{EngineArg, SnapshotArgs};

pub fn run(args: SnapshotArgs, quiet: bool) -> Result<()> {
    if args.engine == EngineArg::Mariadb {
        return Err(anyhow!(
            "mariadb snapshots are not supported yet: sqlite and postgres are"
        ))
        .stage(Code::Usage, || "checking --engine".into());
    }
    if args.busy_timeout.is_some() && args.engine == EngineArg::Postgres {
        return Err(anyhow!(
            "--busy-timeout is for --engine sqlite: a PostgreSQL base backup does not wait for writers' locks"
        ))
        .stage(Code::Usage, || "checking --busy-timeout".into());
    }
    let source_text = args.source.to_string_lossy().into_owned();
    let pg = if args.engine == EngineArg::Postgres {
        let tools = postgres::Tools::find(args.pg_bin.as_deref(), None)
            .stage(Code::Usage, || "finding the PostgreSQL server tools".into())?;
        let accept = postgres::Accept::parse(&args.accept)
            .map_err(|why| anyhow!(why))
            .stage(Code::Usage, || "parsing --accept".into())?;
        let conn = crate::build::live_source(&source_text)?;
        let info = postgres::probe_source(&tools, &conn, accept)
            .stage(Code::Source, || "checking --source".into())?;
        Some((tools, conn, info, accept))
    } else {
        if let Some(what) = args.accept.first() {
            return Err(anyhow!(
                "{what:?}: a SQLite database is snapshotted whole, there is nothing to accept"
            ))
            .stage(Code::Usage, || "parsing --accept".into());
        }
        sqlite::check_source(&args.source).stage(Code::Source, || "checking --source".into())?;
        None
    };
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
    if let Some((tools, conn, info, accept)) = &pg {
        std::fs::create_dir_all(&args.out)
            .stage(Code::Output, || format!("creating {}", args.out.display()))?;
        let taken_at = time::rfc3339(epoch.min(time::now()));
        let request = postgres::Request {
            tools,
            source: conn,
            info,
            accept: *accept,
            out_dir: &args.out,
            taken_at: &taken_at,
            durable: true,
        };
        let snap = postgres::snapshot(&request, &mut |step| progress.phase(step, 0))
            .stage(Code::Source, || format!("snapshotting {}", conn.redacted()))?;
        // Written last: a directory without it is not a snapshot.
        postgres::write_snapshot_meta(&args.out, &snap)
            .stage(Code::Output, || format!("writing {}", args.out.display()))?;
        crate::build::warn_notes(&crate::build::notes_of(&snap.provenance));
        progress.done(&format!(
            "snapshot of {} at LSN {} written to {}",
            conn.redacted(),
            snap.provenance["position"]["lsn"].as_str().unwrap_or("?"),
            args.out.display()
        ));
        return Ok(());
    }
    progress.phase("snapshot", 0);
    // A failed snapshot leaves --out as it found it: absent, or empty.
    let created_out = !args.out.exists();
    let written =
        crate::build::take_snapshot(&args.source, &args.out, epoch, true, args.busy_timeout)
            .and_then(|snap| {
                sqlite::write_snapshot_meta(&args.out, &snap)
                    .stage(Code::Output, || format!("writing {}", args.out.display()))
            });
    if let Err(e) = written {
        for file in std::fs::read_dir(&args.out).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(file.path());
        }
        if created_out {
            let _ = std::fs::remove_dir(&args.out);
        }
        return Err(e);
    }
    progress.done(&format!(
        "snapshot of {} written to {}",
        args.source.display(),
        args.out.display()
    ));
    Ok(())
}
