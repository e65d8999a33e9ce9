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
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, params};

use crate::project_root;

/// Bump when the generated content changes, so cached databases are regenerated.
const GENERATOR_VERSION: u32 = 1;
const SEED: u64 = 0x6261_6b65_6462_0001;
/// bakedb builds are reproducible under SOURCE_DATE_EPOCH; the peers have no such knob.
const SOURCE_DATE_EPOCH: &str = "1700000000";
const DOC_START: &str = "<!-- bench:build:start -->";
const DOC_END: &str = "<!-- bench:build:end -->";

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
        let mut flags = flags.iter().copied();
        while let Some(flag) = flags.next() {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            let mut value = |what: &str| -> Result<u64> {
                let text = inline
                    .or_else(|| flags.next())
                    .ok_or_else(|| anyhow!("{name} needs a value ({what})"))?;
                text.parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| anyhow!("{name} {text:?}: expected a positive integer"))
            };
            match name {
                "--size-mib" => options.size_mib = value("database size in MiB")?,
                "--runs" => options.runs = value("timed runs per case")? as usize,
                "--require-all" if inline.is_none() => options.require_all = true,
                _ => bail!(
                    "bench build: unknown flag {flag:?} (expected --size-mib N, --runs N, --require-all)"
                ),
            }
        }
        Ok(options)
    }
}

pub fn build(options: &BuildOptions) -> Result<()> {
    let root = project_root();
    let bench_dir = target_dir(&root).join("bench");
    let scratch = bench_dir.join("run");
    fs::create_dir_all(&bench_dir).with_context(|| format!("creating {}", bench_dir.display()))?;
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(scratch.join("tmp"))
        .with_context(|| format!("creating {}", scratch.display()))?;

    eprintln!("xtask: building bakedb (release)");
    crate::run(
        crate::cargo()
            .current_dir(&root)
            .args(["build", "--release", "-p", "bakedb-cli"]),
    )?;
    // Time a private copy: a `cargo build --release` running beside the benchmark would
    // otherwise swap the binary between runs.
    let bakedb = scratch.join("bakedb");
    let built = target_dir(&root).join("release/bakedb");
    fs::copy(&built, &bakedb).with_context(|| format!("copying {}", built.display()))?;
    let commit = commit_measured(&root);

    let db = bench_database(&bench_dir, options.size_mib)?;
    let db_bytes = fs::metadata(&db)
        .with_context(|| format!("reading {}", db.display()))?
        .len();

    let tools = Tools::find(options.require_all)?;
    let timer = Timer {
        gnu_time: tools.gnu_time.clone(),
        report: scratch.join("time.out"),
    };

    // The writer path's input: a snapshot taken once, outside the timed runs.
    let snapshot_dir = scratch.join("snapshot");
    run_quiet(
        Command::new(&bakedb)
            .args(["snapshot", "--quiet", "--engine", "sqlite", "--source"])
            .arg(&db)
            .arg("--out")
            .arg(&snapshot_dir)
            .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH),
    )?;
    let snapshot_db = snapshot_dir.join(db.file_name().expect("file name"));

    let mut cases = cases(&bakedb, &db, &snapshot_dir, &scratch, &tools);
    let output_sizes = ceiling_output_sizes(&db, &tools);

    for run in 1..=options.runs {
        for case in cases.iter_mut().filter(|c| c.unavailable.is_none()) {
            eprintln!("xtask: run {run}/{}: {}", options.runs, case.label());
            warm(&db)?;
            warm(&snapshot_db)?;
            sync();
            wait_until_quiet();
            let mut result = (case.run)(&timer);
            // Another process took the cores during the run: the time says little, take it again.
            for _ in 0..NOISY_RETRIES {
                match &result {
                    Ok(Sample {
                        other_load: Some(load),
                        ..
                    }) if *load > NOISY => {
                        eprintln!(
                            "xtask:   other processes used {:.0} % of the CPU during the run; timing it again",
                            load * 100.0
                        );
                        let _ = fs::remove_dir_all(scratch.join("out"));
                        sync();
                        wait_until_quiet();
                        result = (case.run)(&timer);
                    }
                    _ => break,
                }
            }
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
    let markdown = report.markdown();
    println!("{markdown}");
    let doc = root.join("docs/benchmarks.md");
    write_section(&doc, &markdown)?;
    eprintln!("xtask: wrote {}", doc.display());
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// `abc123def456`, or `abc123def456 with uncommitted changes` when the sources that go into
/// the bakedb binary differ from that commit.
pub(crate) fn commit_measured(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown commit".into();
    };
    match git(&[
        "status",
        "--porcelain",
        "--",
        "crates",
        "Cargo.toml",
        "Cargo.lock",
    ]) {
        Some(changes) if changes.is_empty() => head,
        _ => format!("{head} with uncommitted changes"),
    }
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

// ---------------------------------------------------------------------------------------------
// The database.

/// splitmix64: a seeded generator is all the randomness the benchmark needs.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Small values much more often than large ones, like words in text or users in a log.
    fn skewed(&mut self, n: u64) -> u64 {
        self.below(n).min(self.below(n)).min(self.below(n))
    }

    fn bytes(&mut self, out: &mut Vec<u8>, n: usize) {
        out.extend(
            (0..n.div_ceil(8))
                .flat_map(|_| self.next().to_le_bytes())
                .take(n),
        );
    }
}

const SYLLABLES: [&str; 32] = [
    "ka", "lo", "mi", "ne", "ro", "sa", "ti", "vu", "da", "pe", "qui", "ban", "cor", "del", "fen",
    "gar", "hol", "jin", "ker", "lum", "mar", "nor", "pol", "ras", "sel", "tor", "ul", "ven",
    "wis", "xa", "yor", "zen",
];
const KINDS: [&str; 8] = [
    "page_view",
    "click",
    "signup",
    "purchase",
    "search",
    "logout",
    "share",
    "error",
];

/// A vocabulary of pseudo-words: text that compresses like prose, neither zeros nor noise.
fn vocabulary(rng: &mut Rng) -> Vec<String> {
    (0..2048)
        .map(|_| {
            (0..1 + rng.skewed(4) as usize)
                .map(|_| SYLLABLES[rng.below(32) as usize])
                .collect()
        })
        .collect()
}

fn sentence(rng: &mut Rng, words: &[String], n: u64, out: &mut String) {
    out.clear();
    for i in 0..n {
        if i > 0 {
            out.push(if rng.below(12) == 0 { ',' } else { ' ' });
            if out.ends_with(',') {
                out.push(' ');
            }
        }
        out.push_str(&words[rng.skewed(words.len() as u64) as usize]);
    }
    out.push('.');
}

/// `target/bench/app-<N>mib.db`, at least N MiB, generated once (seeded, so every machine gets
/// the same rows) and reused while its stamp says it is complete and has the recorded size.
pub(crate) fn bench_database(bench_dir: &Path, size_mib: u64) -> Result<PathBuf> {
    let path = bench_dir.join(format!("app-{size_mib}mib.db"));
    let stamp_path = bench_dir.join(format!("app-{size_mib}mib.db.stamp"));
    let stamp =
        |bytes: u64| format!("generator {GENERATOR_VERSION} seed {SEED:#x} bytes {bytes}\n");
    if let (Ok(meta), Ok(found)) = (fs::metadata(&path), fs::read_to_string(&stamp_path))
        && meta.len() >= size_mib << 20
        && found == stamp(meta.len())
    {
        eprintln!("xtask: reusing {} ({} bytes)", path.display(), meta.len());
        return Ok(path);
    }
    let _ = fs::remove_file(&stamp_path);
    let partial = bench_dir.join(format!("app-{size_mib}mib.db.partial"));
    let _ = fs::remove_file(&partial);
    eprintln!(
        "xtask: generating {} ({size_mib} MiB, seed {SEED:#x})",
        path.display()
    );
    let started = Instant::now();
    generate(&partial, size_mib << 20)
        .with_context(|| format!("generating {}", partial.display()))?;
    for suffix in ["-wal", "-shm"] {
        let _ = fs::remove_file(path.with_file_name(format!("app-{size_mib}mib.db{suffix}")));
    }
    fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))?;
    let bytes = fs::metadata(&path)?.len();
    fs::write(&stamp_path, stamp(bytes))
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    eprintln!(
        "xtask: generated {bytes} bytes in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

/// An event log: integer keys, a skewed user id, short and long text, a blob with a random
/// (incompressible) part and a structured part, and a secondary index.
fn generate(path: &Path, target_bytes: u64) -> Result<()> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-262144;
         CREATE TABLE events(
             id INTEGER PRIMARY KEY,
             user_id INTEGER NOT NULL,
             kind TEXT NOT NULL,
             created_at INTEGER NOT NULL,
             title TEXT NOT NULL,
             body TEXT NOT NULL,
             payload BLOB NOT NULL);
         CREATE INDEX events_by_user ON events(user_id, created_at);",
    )?;
    let mut rng = Rng(SEED);
    let words = vocabulary(&mut rng);
    let (mut title, mut body, mut payload) = (String::new(), String::new(), Vec::new());
    let mut created_at = 1_600_000_000u64;
    loop {
        let tx = conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events(user_id, kind, created_at, title, body, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for _ in 0..20_000 {
                created_at += rng.below(20);
                let user_id = rng.skewed(200_000);
                let (title_words, body_words) = (3 + rng.below(6), 10 + rng.below(110));
                sentence(&mut rng, &words, title_words, &mut title);
                sentence(&mut rng, &words, body_words, &mut body);
                payload.clear();
                rng.bytes(&mut payload, 32); // a content hash
                let score = rng.below(1_000_000);
                let _ = write!(
                    StringSink(&mut payload),
                    r#"{{"v":2,"ip":"10.{}.{}.{}","session":{},"score":0.{score:06},"tags":["{}","{}"],"ok":{}}}"#,
                    rng.below(256),
                    rng.below(256),
                    rng.below(256),
                    rng.below(1 << 40),
                    words[rng.skewed(64) as usize],
                    words[rng.skewed(64) as usize],
                    rng.below(10) != 0,
                );
                let thumbnail = if rng.below(4) == 0 {
                    64 + rng.below(448) as usize
                } else {
                    0
                }; // already compressed
                rng.bytes(&mut payload, thumbnail);
                insert.execute(params![
                    user_id as i64,
                    KINDS[rng.skewed(8) as usize],
                    created_at as i64,
                    title,
                    body,
                    payload
                ])?;
            }
        }
        tx.commit()?;
        let bytes: i64 = conn.query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get(0),
        )?;
        if bytes as u64 >= target_bytes {
            break;
        }
    }
    // A live application's database is usually in WAL mode; closing checkpoints it.
    conn.execute_batch("PRAGMA journal_mode=WAL;")?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// `write!` into a byte vector.
struct StringSink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StringSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tools and timing.

/// A tool's version line, or why it cannot be used.
type Found = Result<String, String>;

struct Tools {
    gnu_time: Option<PathBuf>,
    /// Each tool: Ok(version line) or Err(why it cannot be used).
    openssl: Found,
    pigz: Found,
    zstd: Found,
    docker: Found,
    umoci: Found,
    docker_bin: PathBuf,
}

impl Tools {
    fn find(require_all: bool) -> Result<Self> {
        let version = |program: &Path, args: &[&str]| -> Found {
            let out = Command::new(program)
                .args(args)
                .output()
                .map_err(|e| format!("not available ({e})"))?;
            let text = String::from_utf8_lossy(if out.stdout.is_empty() {
                &out.stderr
            } else {
                &out.stdout
            })
            .into_owned();
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                return Err(format!(
                    "not available (`{} {}`: {last})",
                    program.display(),
                    args.join(" ")
                ));
            }
            Ok(text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned())
        };
        // The docker CLI that matches the daemon; DOCKER overrides.
        let docker_bin = std::env::var_os("DOCKER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let distro = PathBuf::from("/usr/bin/docker");
                if distro.is_file() {
                    distro
                } else {
                    PathBuf::from("docker")
                }
            });
        let docker =
            version(&docker_bin, &["info", "--format", "{{.ServerVersion}}"]).and_then(|v| {
                if v.is_empty() {
                    Err("not available (no server version)".into())
                } else {
                    Ok(format!("docker {v} (daemon), classic builder"))
                }
            });
        let gnu_time = Path::new("/usr/bin/time");
        let tools = Tools {
            gnu_time: gnu_time.is_file().then(|| gnu_time.to_owned()),
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
            if tools.gnu_time.is_none() {
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

#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) secs: f64,
    pub(crate) peak_rss_kib: Option<u64>,
    pub(crate) cpu_secs: Option<f64>,
    /// What the run produced (manifest digest, image id), to judge reproducibility.
    digest: Option<String>,
    output_bytes: Option<u64>,
    /// bakedb's own per-phase timings, from its log lines.
    phases: Vec<(String, f64)>,
    /// Share of all cores that other processes used during the run: above a few per cent,
    /// the machine was not quiet and the time is suspect.
    pub(crate) other_load: Option<f64>,
}

pub(crate) struct Timer {
    pub(crate) gnu_time: Option<PathBuf>,
    pub(crate) report: PathBuf,
}

pub(crate) struct Finished {
    pub(crate) sample: Sample,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Timer {
    /// Run `cmd` to completion under GNU time (when installed) and time it; stdout is captured
    /// unless `discard_stdout`, in which case it goes to /dev/null as the shell's `> /dev/null`.
    pub(crate) fn run(&self, cmd: &mut Command, discard_stdout: bool) -> Result<Finished> {
        let mut wrapped = match &self.gnu_time {
            Some(time) => {
                let mut w = Command::new(time);
                w.args(["-f", "%M %U %S", "-o"])
                    .arg(&self.report)
                    .arg(cmd.get_program())
                    .args(cmd.get_args());
                for (key, value) in cmd.get_envs() {
                    match value {
                        Some(v) => w.env(key, v),
                        None => w.env_remove(key),
                    };
                }
                if let Some(dir) = cmd.get_current_dir() {
                    w.current_dir(dir);
                }
                w
            }
            None => std::mem::replace(cmd, Command::new("true")),
        };
        wrapped.stdin(Stdio::null()).stderr(Stdio::piped());
        wrapped.stdout(if discard_stdout {
            Stdio::null()
        } else {
            Stdio::piped()
        });
        let cpu_before = CpuTimes::now();
        let started = Instant::now();
        let out = wrapped
            .output()
            .with_context(|| format!("running {:?}", wrapped.get_program()))?;
        let secs = started.elapsed().as_secs_f64();
        let busy = cpu_before
            .zip(CpuTimes::now())
            .map(|(a, b)| a.busy_fraction_until(&b));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(failed(&wrapped, &out));
        }
        let mut sample = Sample {
            secs,
            ..Sample::default()
        };
        if self.gnu_time.is_some() {
            let report = fs::read_to_string(&self.report)
                .with_context(|| format!("reading {}", self.report.display()))?;
            let fields: Vec<&str> = report
                .lines()
                .last()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if let [rss, user, sys] = fields[..] {
                sample.peak_rss_kib = rss.parse().ok();
                sample.cpu_secs = user
                    .parse::<f64>()
                    .ok()
                    .zip(sys.parse::<f64>().ok())
                    .map(|(u, s)| u + s);
            }
        }
        let nproc = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        sample.other_load = busy
            .zip(sample.cpu_secs)
            .map(|(busy, own)| (busy - own / (secs * nproc)).max(0.0));
        Ok(Finished {
            sample,
            stdout,
            stderr,
        })
    }
}

/// The machine-wide counters of /proc/stat's first line, in clock ticks.
#[derive(Clone, Copy)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    fn now() -> Option<CpuTimes> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let idle = ticks.get(3)? + ticks.get(4)?;
        let total: u64 = ticks.iter().take(8).sum();
        Some(CpuTimes {
            busy: total - idle,
            total,
        })
    }

    /// Share of all cores busy between `self` and `later`.
    fn busy_fraction_until(&self, later: &CpuTimes) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            0.0
        } else {
            later.busy.saturating_sub(self.busy) as f64 / total as f64
        }
    }
}

/// Share of all cores taken by other processes above which a timed run is repeated.
pub(crate) const NOISY: f64 = 0.10;
pub(crate) const NOISY_RETRIES: usize = 3;

/// Wait (up to two minutes) until other processes leave the cores alone: on a shared machine a
/// compiler in the background would otherwise be timed along with the case.
pub(crate) fn wait_until_quiet() {
    const QUIET: f64 = 0.10;
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let mut told = false;
    loop {
        let before = CpuTimes::now();
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let Some(busy) = before
            .zip(CpuTimes::now())
            .map(|(a, b)| a.busy_fraction_until(&b))
        else {
            return;
        };
        if busy < QUIET {
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "xtask:   the machine is still {:.0} % busy; timing anyway",
                busy * 100.0
            );
            return;
        }
        if !told {
            eprintln!(
                "xtask:   waiting for the machine to go quiet ({:.0} % of all cores busy)",
                busy * 100.0
            );
            told = true;
        }
    }
}

/// "`docker build` failed (exit status: 1): <its last line>" first, the details after.
fn failed(cmd: &Command, out: &std::process::Output) -> anyhow::Error {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let words: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    // Under GNU time the program comes after: time -f FORMAT -o FILE
    let start = if words[0].ends_with("/time") { 5 } else { 0 };
    let program = words
        .get(start)
        .map_or("?", |p| p.rsplit('/').next().unwrap_or(p));
    let first_arg = words.get(start + 1).map_or("", String::as_str);
    anyhow!(
        "`{program} {first_arg}` failed ({}): {last}\n{cmd:?}\n{stderr}",
        out.status
    )
}

pub(crate) fn run_quiet(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        return Err(failed(cmd, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Read the whole file once so the timed runs find it in the page cache.
pub(crate) fn warm(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    while file
        .read(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?
        > 0
    {}
    Ok(())
}

/// Write back dirty pages (the previous run's output) so they do not land in the next run.
pub(crate) fn sync() {
    let _ = Command::new("sync").status();
}

/// `"key": "value"` from a JSON text, without a JSON dependency.
fn json_string(text: &str, key: &str) -> Option<String> {
    let after = &text[text.find(&format!("\"{key}\""))? + key.len() + 2..];
    let after = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(after[..after.find('"')?].to_owned())
}

fn json_number(text: &str, key: &str) -> Option<u64> {
    let after = &text[text.find(&format!("\"{key}\""))? + key.len() + 2..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    after[..after.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
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

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                _ => e.metadata().map_or(0, |m| m.len()),
            })
            .sum()
    })
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
        median(self.samples.iter().filter_map(f).collect())
    }

    fn secs(&self) -> Option<f64> {
        self.median(|s| Some(s.secs))
    }

    fn peak_rss_mib(&self) -> Option<f64> {
        self.samples
            .iter()
            .filter_map(|s| s.peak_rss_kib)
            .max()
            .map(|k| k as f64 / 1024.0)
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

pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
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
                    _ => "bakedb build --source live file (with online backup)".into(),
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
                            .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
                            .env("CI", "true")
                            .env("TMPDIR", scratch.join("tmp")),
                        false,
                    )?;
                    let mut sample = done.sample;
                    sample.digest = json_string(&done.stdout, "manifest_digest");
                    sample.output_bytes = json_number(&done.stdout, "size");
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
        what: "bakedb snapshot (online backup only)".into(),
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
                    .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
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
            let digest = json_string(&index, "digest");
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
        let mut md = String::new();
        let nproc = std::thread::available_parallelism().map_or(1, usize::from);
        let tool = |found: &Found| match found {
            Ok(v) => v.clone(),
            Err(why) => why.clone(),
        };

        let _ = writeln!(md, "{DOC_START}");
        let _ = writeln!(md, "## build\n");
        let _ = writeln!(
            md,
            "Measured {} on {}; bakedb at {}. Reproduce with:\n",
            today(),
            machine(),
            self.commit,
        );
        let _ = writeln!(
            md,
            "    cargo xtask bench build --size-mib {} --runs {}\n",
            self.options.size_mib, self.options.runs
        );
        let _ = writeln!(
            md,
            "Input: a generated SQLite database of {} bytes ({:.2} GiB; seed {SEED:#x}: an event table with integer keys, text, \
             a partly random blob column and an index), page cache warm. Medians of {} runs; MB/s is the database size \
             (10^6 bytes) over the median time. bakedb runs with SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH}. Tools: {}; {}; {}; {}; {}.\n",
            self.db_bytes,
            self.db_bytes as f64 / (1u64 << 30) as f64,
            self.options.runs,
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
                fmt_pct(
                    case.samples
                        .iter()
                        .filter_map(|s| s.other_load)
                        .max_by(f64::total_cmp)
                ),
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
        let _ = writeln!(md, "{DOC_END}");
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

pub(crate) fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}"))
}

pub(crate) fn fmt_pct(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{:.0} %", v * 100.0))
}

pub(crate) fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

/// "2 × AMD EPYC, Linux 6.1.0, 23.5 GiB RAM": cores, CPU model, kernel and memory.
pub(crate) fn machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(1, usize::from);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or_else(|| "?".into(), |kib| format!("{:.1}", kib / 1024.0 / 1024.0));
    format!("{nproc} × {cpu}, Linux {kernel}, {mem_gib} GiB RAM")
}

/// Today's date (UTC) as YYYY-MM-DD, from `date` rather than a second civil-date routine.
pub(crate) fn today() -> String {
    run_quiet(Command::new("date").args(["-u", "+%F"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown date".into())
}

/// Replace the build section of docs/benchmarks.md (between the markers), creating the file
/// or appending the section when it is not there yet.
fn write_section(doc: &Path, section: &str) -> Result<()> {
    write_marked_section(doc, DOC_START, DOC_END, section)
}

/// Replace the text from `start_marker` to `end_marker` (both included; `section` carries
/// them) in `doc`, creating the file or appending the section when it is not there yet.
pub(crate) fn write_marked_section(
    doc: &Path,
    start_marker: &str,
    end_marker: &str,
    section: &str,
) -> Result<()> {
    let section = section.trim_end();
    let text = match fs::read_to_string(doc) {
        Ok(text) => match (text.find(start_marker), text.find(end_marker)) {
            (Some(start), Some(end)) if start < end => format!(
                "{}{section}{}",
                &text[..start],
                &text[end + end_marker.len()..]
            ),
            _ => format!("{}\n\n{section}\n", text.trim_end()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => format!(
            "# Benchmarks\n\nGenerated by `cargo xtask bench`: each section is rewritten between its markers by the \
             command it shows, so edit the text outside the markers only.\n\n{section}\n"
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", doc.display())),
    };
    if let Some(dir) = doc.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(doc, text).with_context(|| format!("writing {}", doc.display()))
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
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn reads_bakedb_output() {
        let json =
            "{\n  \"manifest_digest\": \"sha256:ab12\",\n  \"size\": 1234,\n  \"layers\": []\n}";
        assert_eq!(
            json_string(json, "manifest_digest").as_deref(),
            Some("sha256:ab12")
        );
        assert_eq!(json_number(json, "size"), Some(1234));
        let log = "bakedb: snapshot of a.db taken with the SQLite online backup API (1.50 s)\n\
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

    #[test]
    fn replaces_only_the_marked_section() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-test.{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let doc = dir.join("benchmarks.md");
        let _ = fs::remove_file(&doc);
        write_section(&doc, &format!("{DOC_START}\nfirst\n{DOC_END}\n")).unwrap();
        let created = fs::read_to_string(&doc).unwrap();
        assert!(created.starts_with("# Benchmarks"));
        fs::write(&doc, format!("{created}\n## other\nkept\n")).unwrap();
        write_section(&doc, &format!("{DOC_START}\nsecond\n{DOC_END}")).unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        assert!(
            text.contains("second") && !text.contains("first") && text.contains("kept"),
            "{text}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn generated_rows_are_deterministic() {
        let mut a = Rng(SEED);
        let mut b = Rng(SEED);
        assert_eq!(vocabulary(&mut a), vocabulary(&mut b));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.bytes(&mut x, 13);
        b.bytes(&mut y, 13);
        assert_eq!((x.len(), &x), (13, &y));
    }
}
