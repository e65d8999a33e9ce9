//! `cargo xtask bench build`: how fast `bakedb build` bakes a ~1 GiB SQLite database, next to
//! what the same machine can do at best and what the usual tools do.
//!
//! Ceilings on the same file: `openssl dgst -sha256` (every bakedb path hashes at least once),
//! `pigz -1` and `zstd -3 -T0` (the compressors bakedb's gzip and zstd are held to). Peers:
//! `docker build` (FROM scratch + COPY, classic builder, no cache) and umoci (init, new, unpack,
//! copy, repack). bakedb is timed twice: from the live file (online-backup copy included) and
//! from a `bakedb snapshot` directory (the writer path, which the targets apply to).
//!
//! Every case runs once per round and the rounds repeat `--runs` times, so slow drift of the
//! machine hits every case alike; the page cache is warmed and dirty pages synced before each
//! timed run. Peak RSS and CPU time come from GNU time. The result is printed and written
//! between markers in docs/benchmarks.md.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::bench::data::{SEED, bench_database};
use crate::bench::layers::dir_bytes;
use crate::bench::timing::{NOISY, nproc, sync, until_quiet, wait_until_quiet, warm};
use crate::bench::tools::{
    Found, commit_measured, docker_bin, found_text, fresh_dir, json_str, json_u64, release_bakedb,
    target_dir, version,
};
use crate::bench::{self, Sample, Timer, fmt, fmt_pct, median, run_quiet, yes_no};
use crate::project_root;

pub struct BuildOptions {
    pub size_mib: u64,
    pub runs: usize,
    /// Fail instead of reporting a missing tool (or a stopped dockerd) as "not available".
    pub require_all: bool,
}

impl BuildOptions {
    pub fn parse(flags: &[&str]) -> Result<Self> {
        let mut options = BuildOptions {
            size_mib: 1024,
            runs: 5,
            require_all: false,
        };
        bench::flags::parse(
            "bench build",
            "--size-mib N, --runs N, --require-all",
            flags,
            |name, value| {
                match name {
                    "--size-mib" => options.size_mib = value.positive("database size in MiB")?,
                    "--runs" => options.runs = value.count("timed runs per case")?,
                    "--require-all" if value.is_switch() => options.require_all = true,
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        Ok(options)
    }
}

pub fn build(options: &BuildOptions) -> Result<()> {
    let root = project_root();
    let bench_dir = target_dir(&root).join("bench");
    let scratch = bench_dir.join("run");
    fresh_dir(&scratch.join("tmp"))?;
    let bakedb = release_bakedb(&root, &scratch)?;
    let commit = commit_measured(&root);

    let db = bench_database(&bench_dir, options.size_mib)?;
    let db_bytes = fs::metadata(&db)
        .with_context(|| format!("reading {}", db.display()))?
        .len();

    let timer = Timer::new(scratch.join("time.out"));
    let tools = Tools::find(options.require_all, &timer)?;

    // The writer path's input: a snapshot taken once, outside the timed runs.
    let snapshot_dir = scratch.join("snapshot");
    run_quiet(
        Command::new(&bakedb)
            .args(["snapshot", "--quiet", "--engine", "sqlite", "--source"])
            .arg(&db)
            .arg("--out")
            .arg(&snapshot_dir)
            .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH),
    )?;
    let snapshot_db = snapshot_dir.join(db.file_name().expect("file name"));

    let mut cases = cases(&bakedb, &db, &snapshot_dir, &scratch, &tools);
    let output_sizes = ceiling_output_sizes(&db, &tools);

    for run in 1..=options.runs {
        for case in cases.iter_mut().filter(|c| c.unavailable.is_none()) {
            eprintln!("xtask: run {run}/{}: {}", options.runs, case.label());
            // Another process took the cores during the run: the time says little, take it
            // again (into an output the last try did not leave behind).
            let result = until_quiet(
                NOISY,
                || {
                    let _ = fs::remove_dir_all(scratch.join("out"));
                    warm(&db)?;
                    warm(&snapshot_db)?;
                    sync();
                    wait_until_quiet();
                    Ok((case.run)(&timer))
                },
                |result| result.as_ref().ok().and_then(|s| s.other_load),
            )?;
            match result {
                Ok(sample) => {
                    eprintln!("xtask:   {:.2} s", sample.secs);
                    case.samples.push(sample);
                }
                // A peer that breaks half way (dockerd stopped) is reported, not fatal.
                Err(err)
                    if matches!(case.role, Role::Ceiling | Role::Peer) && !options.require_all =>
                {
                    let first_line = format!("{err:#}").lines().next().unwrap_or("").to_owned();
                    eprintln!("xtask:   failed: {err:#}");
                    case.unavailable = Some(format!("failed in run {run}: {first_line}"));
                    case.samples.clear();
                }
                Err(err) => return Err(err.context(format!("timing {}", case.label()))),
            }
            let _ = fs::remove_dir_all(scratch.join("out"));
            sync();
        }
    }

    let report = Report {
        options,
        commit,
        db_bytes,
        tools: &tools,
        cases: &cases,
        output_sizes,
    };
    bench::report::publish(&root, "build", report.markdown(), &scratch)
}

// ---------------------------------------------------------------------------------------------
// The tools.

struct Tools {
    gnu_time: bool,
    /// Each tool: Ok(version line) or Err(why it cannot be used).
    openssl: Found,
    pigz: Found,
    zstd: Found,
    docker: Found,
    umoci: Found,
    docker_bin: PathBuf,
}

impl Tools {
    fn find(require_all: bool, timer: &Timer) -> Result<Self> {
        let docker_bin = docker_bin();
        let docker =
            version(&docker_bin, &["info", "--format", "{{.ServerVersion}}"]).and_then(|v| {
                if v.is_empty() {
                    Err("not available (no server version)".into())
                } else {
                    Ok(format!("docker {v} (daemon), classic builder"))
                }
            });
        let tools = Tools {
            gnu_time: timer.gnu_time.is_some(),
            // "OpenSSL 3.0.19 27 Jan 2026 (Library: …)" → "OpenSSL 3.0.19"
            openssl: version(Path::new("openssl"), &["version"])
                .map(|v| v.split_whitespace().take(2).collect::<Vec<_>>().join(" ")),
            pigz: version(Path::new("pigz"), &["--version"]),
            // "*** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***" → "zstd v1.5.4"
            zstd: version(Path::new("zstd"), &["--version"]).map(|v| {
                v.split_whitespace()
                    .find(|w| w.starts_with('v'))
                    .map_or(v.clone(), |w| format!("zstd {}", w.trim_end_matches(',')))
            }),
            docker,
            umoci: version(Path::new("umoci"), &["--version"]).map(|v| v.replace(" version ", " ")),
            docker_bin,
        };
        if require_all {
            if !tools.gnu_time {
                bail!("GNU time (/usr/bin/time) is missing: apt-get install -y time");
            }
            for (name, found) in [
                ("openssl", &tools.openssl),
                ("pigz", &tools.pigz),
                ("zstd", &tools.zstd),
                ("docker", &tools.docker),
                ("umoci", &tools.umoci),
            ] {
                if let Err(why) = found {
                    bail!("{name}: {why} (--require-all)");
                }
            }
        }
        Ok(tools)
    }
}

/// bakedb's log lines end in "(1.23 s)"; the first words name the phase.
fn phases(stderr: &str) -> Vec<(String, f64)> {
    stderr
        .lines()
        .filter_map(|line| {
            let line = line.strip_prefix("bakedb: ")?;
            let secs = line
                .rsplit_once(" (")?
                .1
                .strip_suffix(" s)")?
                .parse()
                .ok()?;
            let phase = if line.starts_with("snapshot") {
                "snapshot"
            } else if line.starts_with("data layer") {
                "data layer"
            } else if line.starts_with("wrote") {
                "config + manifest + tag"
            } else {
                return None;
            };
            Some((phase.to_owned(), secs))
        })
        .collect()
}

/// What pigz -1 and zstd -3 produce from the database (one untimed run each), for comparison
/// with bakedb's layer sizes.
fn ceiling_output_sizes(db: &Path, tools: &Tools) -> (Option<u64>, Option<u64>) {
    let count = |program: &str, args: &[&str]| -> Option<u64> {
        let mut child = Command::new(program)
            .args(args)
            .arg(db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let n = io::copy(&mut child.stdout.take()?, &mut io::sink()).ok()?;
        child.wait().ok()?.success().then_some(n)
    };
    let pigz = tools
        .pigz
        .is_ok()
        .then(|| count("pigz", &["-1", "-c"]))
        .flatten();
    let zstd = tools
        .zstd
        .is_ok()
        .then(|| count("zstd", &["-q", "-3", "-T0", "-c"]))
        .flatten();
    (pigz, zstd)
}

// ---------------------------------------------------------------------------------------------
// The cases.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `bakedb build --source <snapshot dir>`: the targets apply here.
    Writer,
    /// `bakedb build --source <live file>`: the online-backup copy included.
    Live,
    /// `bakedb snapshot` alone: the online-backup copy.
    Snapshot,
    Ceiling,
    Peer,
}

type RunFn<'a> = Box<dyn FnMut(&Timer) -> Result<Sample> + 'a>;

struct Case<'a> {
    role: Role,
    what: String,
    compression: &'static str,
    unavailable: Option<String>,
    samples: Vec<Sample>,
    run: RunFn<'a>,
}

impl Case<'_> {
    fn label(&self) -> String {
        format!("{} [{}]", self.what, self.compression)
    }

    fn median(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        median(self.samples.iter().filter_map(f))
    }

    fn secs(&self) -> Option<f64> {
        self.median(|s| Some(s.secs))
    }

    fn peak_rss_mib(&self) -> Option<f64> {
        Sample::peak_rss_mib(&self.samples)
    }

    /// "yes", "no" or why it is not known; None where it does not apply.
    fn reproducible(&self) -> Option<String> {
        let digests: Vec<&String> = self
            .samples
            .iter()
            .filter_map(|s| s.digest.as_ref())
            .collect();
        if matches!(self.role, Role::Ceiling | Role::Snapshot) || self.unavailable.is_some() {
            return None;
        }
        Some(match digests.as_slice() {
            [] => "unknown".into(),
            [_] => "not checked (1 run)".into(),
            [first, rest @ ..] if rest.iter().all(|d| d == first) => {
                format!("yes ({} identical)", digests.len())
            }
            _ => {
                let mut distinct = digests.clone();
                distinct.sort();
                distinct.dedup();
                format!(
                    "no ({} digests in {} builds)",
                    distinct.len(),
                    digests.len()
                )
            }
        })
    }
}

fn cases<'a>(
    bakedb: &'a Path,
    db: &'a Path,
    snapshot_dir: &'a Path,
    scratch: &'a Path,
    tools: &'a Tools,
) -> Vec<Case<'a>> {
    let out = scratch.join("out");
    let mut cases = Vec::new();
    let not_available = |found: &Found| found.as_ref().err().cloned();

    for (role, source) in [(Role::Writer, snapshot_dir), (Role::Live, db)] {
        for compression in ["none", "gzip", "zstd"] {
            let out = out.clone();
            cases.push(Case {
                role,
                what: match role {
                    Role::Writer => "bakedb build --source snapshot dir (writer path)".into(),
                    _ => "bakedb build --source live file (snapshot read in)".into(),
                },
                compression,
                unavailable: None,
                samples: Vec::new(),
                run: Box::new(move |timer: &Timer| {
                    let layout = out.join(format!("bakedb-{compression}"));
                    let done = timer.run(
                        Command::new(bakedb)
                            .args([
                                "build",
                                "--json",
                                "--engine",
                                "sqlite",
                                "--compression",
                                compression,
                                "--source",
                            ])
                            .arg(source)
                            .arg("--output")
                            .arg(format!("oci:{}:bench", layout.display()))
                            .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH)
                            .env("CI", "true")
                            .env("TMPDIR", scratch.join("tmp")),
                        false,
                    )?;
                    let mut sample = done.sample;
                    sample.digest = json_str(&done.stdout, "manifest_digest");
                    sample.output_bytes = json_u64(&done.stdout, "size");
                    sample.phases = phases(&done.stderr);
                    if sample.digest.is_none() {
                        bail!(
                            "bakedb build --json printed no manifest_digest:\n{}",
                            done.stdout
                        );
                    }
                    Ok(sample)
                }),
            });
        }
    }

    let snap_out = out.join("snapshot");
    cases.push(Case {
        role: Role::Snapshot,
        what: "bakedb snapshot (snapshot read only)".into(),
        compression: "—",
        unavailable: None,
        samples: Vec::new(),
        run: Box::new(move |timer: &Timer| {
            let done = timer.run(
                Command::new(bakedb)
                    .args(["snapshot", "--engine", "sqlite", "--source"])
                    .arg(db)
                    .arg("--out")
                    .arg(&snap_out)
                    .env("SOURCE_DATE_EPOCH", bench::SOURCE_DATE_EPOCH)
                    .env("CI", "true"),
                false,
            )?;
            Ok(done.sample)
        }),
    });

    let ceilings: [(&str, &'static str, &Found, &[&str]); 3] = [
        (
            "openssl dgst -sha256",
            "—",
            &tools.openssl,
            &["dgst", "-sha256"],
        ),
        ("pigz -1 -c > /dev/null", "gzip", &tools.pigz, &["-1", "-c"]),
        (
            "zstd -3 -T0 -c > /dev/null",
            "zstd",
            &tools.zstd,
            &["-q", "-3", "-T0", "-c"],
        ),
    ];
    for (what, compression, found, args) in ceilings {
        let program = what.split_whitespace().next().expect("program");
        let discard = compression != "—";
        cases.push(Case {
            role: Role::Ceiling,
            what: what.into(),
            compression,
            unavailable: not_available(found),
            samples: Vec::new(),
            run: Box::new(move |timer: &Timer| {
                Ok(timer
                    .run(Command::new(program).args(args).arg(db), discard)?
                    .sample)
            }),
        });
    }
    // Not a target's reference, but the floor of any path that stores the bytes durably: the
    // ceilings above write nothing, while bakedb writes the layer and fsyncs it.
    let dd_out = out.join("dd.bin");
    cases.push(Case {
        role: Role::Ceiling,
        what: "dd bs=1M conv=fsync (copy + fsync)".into(),
        compression: "—",
        unavailable: None,
        samples: Vec::new(),
        run: Box::new(move |timer: &Timer| {
            fs::create_dir_all(dd_out.parent().expect("parent"))?;
            let mut if_arg = std::ffi::OsString::from("if=");
            if_arg.push(db);
            let mut of_arg = std::ffi::OsString::from("of=");
            of_arg.push(&dd_out);
            let sample = timer
                .run(
                    Command::new("dd").arg(if_arg).arg(of_arg).args([
                        "bs=1M",
                        "conv=fsync",
                        "status=none",
                    ]),
                    true,
                )?
                .sample;
            Ok(Sample {
                output_bytes: fs::metadata(&dd_out).ok().map(|m| m.len()),
                ..sample
            })
        }),
    });

    // docker build: FROM scratch + COPY, the classic builder (no buildx needed), no cache.
    let context = scratch.join("docker-context");
    let docker = &tools.docker_bin;
    cases.push(Case {
        role: Role::Peer,
        what: "docker build (FROM scratch + COPY, --no-cache)".into(),
        compression: "none",
        unavailable: not_available(&tools.docker),
        samples: Vec::new(),
        run: Box::new(move |_timer: &Timer| {
            if !context.exists() {
                fs::create_dir_all(&context)?;
                fs::write(
                    context.join("Dockerfile"),
                    "FROM scratch\nCOPY app.db /var/lib/bakedb/app.db\n",
                )?;
                // A hard link: same inode, same warm pages, no 1 GiB copy.
                fs::hard_link(db, context.join("app.db"))
                    .or_else(|_| fs::copy(db, context.join("app.db")).map(|_| ()))?;
            }
            // dockerd may be restarted by whoever else uses this machine: give it a minute.
            let deadline = Instant::now() + std::time::Duration::from_secs(90);
            while run_quiet(Command::new(docker).arg("info")).is_err() {
                if Instant::now() > deadline {
                    bail!("the docker daemon stopped answering (`docker info` fails)");
                }
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            let tag = "bakedb-bench:latest";
            let started = Instant::now();
            let id = run_quiet(
                Command::new(docker)
                    .args(["build", "--no-cache", "--force-rm", "-q", "-t", tag])
                    .arg(&context)
                    .env("DOCKER_BUILDKIT", "0"),
            )?;
            let secs = started.elapsed().as_secs_f64();
            let size = run_quiet(Command::new(docker).args([
                "image",
                "inspect",
                "--format",
                "{{.Size}}",
                tag,
            ]))?;
            run_quiet(Command::new(docker).args(["rmi", "-f", tag]))?;
            Ok(Sample {
                secs,
                digest: Some(id.trim().to_owned()).filter(|d| !d.is_empty()),
                output_bytes: size.trim().parse().ok(),
                ..Sample::default()
            })
        }),
    });

    // umoci: the daemonless, rootless way of writing a layout from a directory tree.
    let umoci_dir = scratch.join("umoci");
    cases.push(Case {
        role: Role::Peer,
        what: "umoci init, new, unpack, cp, repack".into(),
        compression: "gzip",
        unavailable: not_available(&tools.umoci),
        samples: Vec::new(),
        run: Box::new(move |_timer: &Timer| {
            let _ = fs::remove_dir_all(&umoci_dir);
            fs::create_dir_all(&umoci_dir)?;
            let layout = umoci_dir.join("layout");
            let bundle = umoci_dir.join("bundle");
            let image = format!("{}:bench", layout.display());
            let started = Instant::now();
            run_quiet(
                Command::new("umoci")
                    .args(["init", "--layout"])
                    .arg(&layout),
            )?;
            run_quiet(Command::new("umoci").args(["new", "--image", &image]))?;
            run_quiet(
                Command::new("umoci")
                    .args(["unpack", "--rootless", "--image", &image])
                    .arg(&bundle),
            )?;
            let data_dir = bundle.join("rootfs/var/lib/bakedb");
            fs::create_dir_all(&data_dir)?;
            run_quiet(Command::new("cp").arg(db).arg(data_dir.join("app.db")))?;
            run_quiet(
                Command::new("umoci")
                    .args(["repack", "--image", &image])
                    .arg(&bundle),
            )?;
            let secs = started.elapsed().as_secs_f64();
            let index = fs::read_to_string(layout.join("index.json"))?;
            let digest = json_str(&index, "digest");
            let output_bytes = Some(dir_bytes(&layout.join("blobs")));
            let _ = fs::remove_dir_all(&umoci_dir);
            Ok(Sample {
                secs,
                digest,
                output_bytes,
                ..Sample::default()
            })
        }),
    });
    cases
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report<'a> {
    options: &'a BuildOptions,
    /// The bakedb commit measured, and whether its sources had uncommitted changes.
    commit: String,
    db_bytes: u64,
    tools: &'a Tools,
    cases: &'a [Case<'a>],
    /// pigz -1 and zstd -3 output bytes.
    output_sizes: (Option<u64>, Option<u64>),
}

const TARGET_NONE_VS_SHA256: f64 = 0.70;
const TARGET_GZIP_VS_PIGZ: f64 = 0.90;
const TARGET_ZSTD_VS_ZSTD: f64 = 0.80;
const TARGET_SPEEDUP_VS_DOCKER: f64 = 5.0;
const TARGET_PEAK_RSS_MIB: f64 = 100.0;

impl Report<'_> {
    fn find(&self, role: Role, compression: &str) -> Option<&Case<'_>> {
        self.cases.iter().find(|c| {
            c.role == role
                && c.compression == compression
                && c.unavailable.is_none()
                && !c.samples.is_empty()
        })
    }

    fn ceiling(&self, what_prefix: &str) -> Option<&Case<'_>> {
        self.cases.iter().find(|c| {
            c.role == Role::Ceiling && c.what.starts_with(what_prefix) && !c.samples.is_empty()
        })
    }

    fn mb_per_s(&self, case: &Case) -> Option<f64> {
        case.secs().map(|s| self.db_bytes as f64 / s / 1e6)
    }

    fn markdown(&self) -> String {
        let nproc = nproc();
        let tool = found_text;
        let mut md = bench::report::start(
            "build",
            &self.commit,
            &format!(
                "cargo xtask bench build --size-mib {} --runs {}",
                self.options.size_mib, self.options.runs
            ),
        );
        let _ = writeln!(
            md,
            "Input: a generated SQLite database of {} bytes ({:.2} GiB; seed {SEED:#x}: an event table with integer keys, text, \
             a partly random blob column and an index), page cache warm. Medians of {} runs; MB/s is the database size \
             (10^6 bytes) over the median time. bakedb runs with SOURCE_DATE_EPOCH={}. Tools: {}; {}; {}; {}; {}.\n",
            self.db_bytes,
            self.db_bytes as f64 / (1u64 << 30) as f64,
            self.options.runs,
            bench::SOURCE_DATE_EPOCH,
            tool(&self.tools.openssl),
            tool(&self.tools.pigz),
            tool(&self.tools.zstd),
            tool(&self.tools.docker),
            tool(&self.tools.umoci),
        );
        let _ = writeln!(
            md,
            "Peak RSS is the largest of the runs; CPU s is the median user+sys time; \"others\" is the largest share of all \
             cores that other processes used during a timed run (each run starts only once the machine is quiet).\n"
        );
        let _ = writeln!(
            md,
            "| what | layer | median s | MB/s | output MB | peak RSS MiB | CPU s | others | reproducible |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---|");
        for case in self.cases {
            if let Some(why) = &case.unavailable {
                let _ = writeln!(
                    md,
                    "| {} | {} | {why} | | | | | | |",
                    case.what, case.compression
                );
                continue;
            }
            let output = case
                .median(|s| s.output_bytes.map(|b| b as f64))
                .or_else(|| match case.what.split_whitespace().next() {
                    Some("pigz") => self.output_sizes.0.map(|b| b as f64),
                    Some("zstd") => self.output_sizes.1.map(|b| b as f64),
                    _ => None,
                });
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                case.what,
                case.compression,
                fmt(case.secs(), 2),
                fmt(self.mb_per_s(case), 0),
                fmt(output.map(|b| b / 1e6), 0),
                fmt(case.peak_rss_mib(), 1),
                fmt(case.median(|s| s.cpu_secs), 2),
                fmt_pct(Sample::most_other_load(&case.samples)),
                case.reproducible().unwrap_or_else(|| "—".into()),
            );
        }

        let _ = writeln!(md, "\n### Targets\n");
        let _ = writeln!(
            md,
            "Judged on the writer path (`--source` a snapshot directory); the live-file path is shown for comparison.\n"
        );
        let _ = writeln!(md, "| target | writer path | live file | met |");
        let _ = writeln!(md, "|---|---:|---:|---|");
        let mut missed = Vec::new();
        let ratio_row = |md: &mut String,
                         missed: &mut Vec<&'static str>,
                         name: &str,
                         compression: &'static str,
                         ceiling: Option<&Case>,
                         target: f64| {
            let ceiling_mbs = ceiling.and_then(|c| self.mb_per_s(c));
            let pct = |role| {
                self.find(role, compression)
                    .and_then(|c| self.mb_per_s(c))
                    .zip(ceiling_mbs)
                    .map(|(b, c)| b / c)
            };
            let (writer, live) = (pct(Role::Writer), pct(Role::Live));
            let met = writer.map(|w| w >= target);
            if met == Some(false) {
                missed.push(compression);
            }
            let _ = writeln!(
                md,
                "| {name} ≥ {:.0} % | {} | {} | {} |",
                target * 100.0,
                fmt_pct(writer),
                fmt_pct(live),
                yes_no(met)
            );
        };
        ratio_row(
            &mut md,
            &mut missed,
            "none vs `openssl dgst -sha256`",
            "none",
            self.ceiling("openssl"),
            TARGET_NONE_VS_SHA256,
        );
        ratio_row(
            &mut md,
            &mut missed,
            "gzip vs `pigz -1`",
            "gzip",
            self.ceiling("pigz"),
            TARGET_GZIP_VS_PIGZ,
        );
        ratio_row(
            &mut md,
            &mut missed,
            "zstd vs `zstd -3 -T0`",
            "zstd",
            self.ceiling("zstd"),
            TARGET_ZSTD_VS_ZSTD,
        );
        let docker = self
            .cases
            .iter()
            .find(|c| c.what.starts_with("docker") && !c.samples.is_empty())
            .and_then(Case::secs);
        for compression in ["none", "zstd"] {
            let speedup = |role| {
                self.find(role, compression)
                    .and_then(Case::secs)
                    .zip(docker)
                    .map(|(b, d)| d / b)
            };
            let (writer, live) = (speedup(Role::Writer), speedup(Role::Live));
            let met = writer.map(|w| w >= TARGET_SPEEDUP_VS_DOCKER);
            if met == Some(false) {
                missed.push(if compression == "none" {
                    "none vs docker"
                } else {
                    "zstd vs docker"
                });
            }
            let x = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{v:.2}×"));
            let _ = writeln!(
                md,
                "| {compression} faster than `docker build` by ≥ {TARGET_SPEEDUP_VS_DOCKER:.0}× | {} | {} | {} |",
                x(writer),
                x(live),
                yes_no(met)
            );
        }
        let rss = |role| {
            self.cases
                .iter()
                .filter(|c| c.role == role)
                .filter_map(Case::peak_rss_mib)
                .max_by(f64::total_cmp)
        };
        let (writer_rss, live_rss) = (rss(Role::Writer), rss(Role::Live));
        let rss_met = writer_rss
            .zip(live_rss)
            .map(|(w, l)| w.max(l) < TARGET_PEAK_RSS_MIB);
        let _ = writeln!(
            md,
            "| peak RSS < {TARGET_PEAK_RSS_MIB:.0} MiB (every bakedb run, both paths) | {} | {} | {} |",
            fmt(writer_rss, 1).replace('—', "n/a (no GNU time)"),
            fmt(live_rss, 1).replace('—', "n/a (no GNU time)"),
            yes_no(rss_met),
        );
        if rss_met == Some(false) {
            missed.push("rss");
        }

        let _ = writeln!(md, "\n### Where the time goes\n");
        let _ = writeln!(
            md,
            "bakedb's own phase timings (medians; from its log lines). CPU use is user+sys over wall time × {nproc} cores. \
             bakedb fsyncs every blob it writes; the ceilings write nothing.\n"
        );
        let _ = writeln!(
            md,
            "| bakedb build | layer | total s | snapshot s | data layer s | config + manifest + tag s | CPU busy |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
        for case in self
            .cases
            .iter()
            .filter(|c| matches!(c.role, Role::Writer | Role::Live) && !c.samples.is_empty())
        {
            let phase = |name: &str| {
                case.median(|s| s.phases.iter().find(|(p, _)| p == name).map(|(_, t)| *t))
            };
            let busy = case.median(|s| s.cpu_secs.map(|c| c / (s.secs * nproc as f64)));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                if case.role == Role::Writer {
                    "writer path"
                } else {
                    "live file"
                },
                case.compression,
                fmt(case.secs(), 2),
                fmt(phase("snapshot"), 2),
                fmt(phase("data layer"), 2),
                fmt(phase("config + manifest + tag"), 2),
                fmt_pct(busy),
            );
        }
        if missed.is_empty() {
            let _ = writeln!(md, "\nEvery target is met.");
        } else {
            let _ = writeln!(md);
            for what in missed {
                let _ = writeln!(md, "- {}", self.explain(what, nproc));
            }
        }
        md
    }

    /// One factual sentence per missed target: the time it would take to meet it, and how
    /// the CPU work compares with the reference.
    fn explain(&self, what: &str, nproc: usize) -> String {
        let cpu = |c: Option<&Case>| fmt(c.and_then(|c| c.median(|s| s.cpu_secs)), 2);
        let wall = |c: Option<&Case>| fmt(c.and_then(Case::secs), 2);
        let (compression, reference, target) = match what {
            "none" => ("none", self.ceiling("openssl"), TARGET_NONE_VS_SHA256),
            "gzip" => ("gzip", self.ceiling("pigz"), TARGET_GZIP_VS_PIGZ),
            "zstd" => ("zstd", self.ceiling("zstd"), TARGET_ZSTD_VS_ZSTD),
            "none vs docker" | "zstd vs docker" => {
                let compression = &what[..4];
                let writer = self.find(Role::Writer, compression);
                let docker = self
                    .cases
                    .iter()
                    .find(|c| c.what.starts_with("docker") && !c.samples.is_empty());
                let budget = docker
                    .and_then(Case::secs)
                    .map(|d| d / TARGET_SPEEDUP_VS_DOCKER);
                return format!(
                    "{what}: the writer path takes {} s, `docker build` {} s; {TARGET_SPEEDUP_VS_DOCKER:.0}× needs {} s or less",
                    wall(writer),
                    wall(docker),
                    fmt(budget, 2),
                );
            }
            _ => {
                let worst = self
                    .cases
                    .iter()
                    .filter(|c| matches!(c.role, Role::Writer | Role::Live))
                    .max_by(|a, b| {
                        a.peak_rss_mib()
                            .unwrap_or(0.0)
                            .total_cmp(&b.peak_rss_mib().unwrap_or(0.0))
                    });
                return format!(
                    "peak RSS: the largest is {} MiB, in {}",
                    fmt(worst.and_then(Case::peak_rss_mib), 1),
                    worst.map_or("?".into(), Case::label)
                );
            }
        };
        let writer = self.find(Role::Writer, compression);
        let phase = |name: &str| {
            writer.and_then(|c| {
                c.median(|s| s.phases.iter().find(|(p, _)| p == name).map(|(_, t)| *t))
            })
        };
        let busy =
            writer.and_then(|c| c.median(|s| s.cpu_secs.map(|cpu| cpu / (s.secs * nproc as f64))));
        let waiting = match busy {
            Some(b) if b < 0.75 => format!(
                "; its cores are idle {:.0} % of the time, so it waits rather than computes",
                (1.0 - b) * 100.0
            ),
            _ => String::new(),
        };
        // Only the none layer is as large as the input: there the disk can be the limit.
        let disk = match (compression, self.ceiling("dd").and_then(Case::secs)) {
            ("none", Some(dd)) => {
                format!("; copying the file with `dd bs=1M conv=fsync` alone takes {dd:.2} s")
            }
            _ => String::new(),
        };
        format!(
            "{what}: the writer path takes {} s ({} s of it the data layer) and {} CPU s on {nproc} cores{waiting}; \
             {} takes {} s and {} CPU s, so {:.0} % of its speed needs {} s or less{disk}",
            wall(writer),
            fmt(phase("data layer"), 2),
            cpu(writer),
            reference.map_or("the reference", |c| c.what.as_str()),
            wall(reference),
            cpu(reference),
            target * 100.0,
            fmt(reference.and_then(Case::secs).map(|r| r / target), 2),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let o = BuildOptions::parse(&["--size-mib", "256", "--runs=3", "--require-all"]).unwrap();
        assert_eq!((o.size_mib, o.runs, o.require_all), (256, 3, true));
        let o = BuildOptions::parse(&[]).unwrap();
        assert_eq!((o.size_mib, o.runs, o.require_all), (1024, 5, false));
        assert!(BuildOptions::parse(&["--runs", "0"]).is_err());
        assert!(BuildOptions::parse(&["--size-mib"]).is_err());
        assert!(BuildOptions::parse(&["--fast"]).is_err());
    }

    #[test]
    fn reads_bakedb_output() {
        let log = "bakedb: snapshot of a.db read page by page in one read transaction (sqlite_dbpage) (1.50 s)\n\
                   bakedb: data layer sha256:ff (1.0 GiB → 512.0 MiB gzip) (2.25 s)\n\
                   bakedb: wrote oci:x:bench sha256:aa (0.01 s)\n";
        assert_eq!(
            phases(log),
            [
                ("snapshot".to_owned(), 1.5),
                ("data layer".to_owned(), 2.25),
                ("config + manifest + tag".to_owned(), 0.01)
            ]
        );
    }
}
