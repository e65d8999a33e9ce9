//! `cargo xtask bench init`: how fast bakedb-init verifies an image's data before it starts the
//! engine, next to `sha256sum` and `openssl dgst -sha256` on the same file, and what bakedb-init
//! costs when verification is off.
//!
//! Per size (1 GiB and 8 GiB by default) one file of pseudo-random, incompressible bytes and its
//! image.json are generated once under target/bench/init/<N>mib/root and reused. Every round
//! times, on that file, `bakedb-init --verify-only` on every core and on one thread, then
//! `sha256sum` and `openssl dgst -sha256`; first with the page cache dropped before every run,
//! then warm. Peak RSS and CPU time come from GNU time, as in `bench build`.
//!
//! The overhead is `BAKEDB_VERIFY=off bakedb-init --root DIR /bin/true` against `/bin/true`
//! run directly, alternated, spawn to exit. The result is printed and written between markers
//! in docs/benchmarks.md.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use bakedb_testkit::tools::is_root;
use sha2::{Digest, Sha256};

use crate::bench::data::Rng;
use crate::bench::timing::{
    NOISY, cold_cache, drop_caches, nproc, percentile, sync, until_quiet, wait_until_quiet, warm,
};
use crate::bench::tools::{Found, commit_measured, found_text, fresh_dir, target_dir, version};
use crate::bench::{self, Cache, Sample, Timer, fmt, fmt_pct, median, run_quiet, times, yes_no};
use crate::project_root;

/// Bump when the generated content or image.json changes, so cached data is regenerated.
const GENERATOR_VERSION: u32 = 1;
const SEED: u64 = 0x6261_6b65_6462_0002;
/// What `bakedb build` writes (crates/engines/src/datafiles.rs CHUNK_SIZE).
const CHUNK_SIZE: u64 = 16 << 20;
/// The data owner `bakedb build` records by default; bakedb-init drops root to it.
const OWNER: u32 = 65532;
const DATA_DIR: &str = "var/lib/bakedb";
const IMAGE_JSON: &str = "etc/bakedb/image.json";
const DATA_FILE: &str = "app.db";
/// The data of the image whose start-up overhead is measured: small enough not to matter.
const TINY_BYTES: u64 = 4096;
const OVERHEAD_WARMUP: usize = 10;

/// Issue 4's targets.
const TARGET_SPEEDUP_VS_OPENSSL: f64 = 1.8;
const TARGET_CORES: usize = 2;
const TARGET_OVERHEAD_MS: f64 = 5.0;
const TARGET_PEAK_RSS_MIB: f64 = 16.0;

pub struct InitOptions {
    pub sizes_mib: Vec<u64>,
    pub runs: usize,
    pub overhead_runs: usize,
}

impl InitOptions {
    pub fn parse(flags: &[&str]) -> Result<Self> {
        let mut options = InitOptions {
            sizes_mib: vec![1024, 8192],
            runs: 5,
            overhead_runs: 200,
        };
        bench::flags::parse(
            "bench init",
            "--sizes-mib N,N, --runs N, --overhead-runs N",
            flags,
            |name, value| {
                match name {
                    "--sizes-mib" => {
                        options.sizes_mib =
                            value.positive_list("comma-separated sizes in MiB, e.g. 1024,8192")?
                    }
                    "--runs" => options.runs = value.count("timed runs per case")?,
                    "--overhead-runs" => {
                        options.overhead_runs =
                            value.count("runs of each command for the overhead")?
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        Ok(options)
    }

    fn command(&self) -> String {
        let sizes: Vec<String> = self.sizes_mib.iter().map(u64::to_string).collect();
        format!(
            "cargo xtask bench init --sizes-mib {} --runs {} --overhead-runs {}",
            sizes.join(","),
            self.runs,
            self.overhead_runs
        )
    }
}

pub fn init(options: &InitOptions) -> Result<()> {
    let root = project_root();
    let bench_dir = target_dir(&root).join("bench/init");
    let scratch = bench_dir.join("run");
    fresh_dir(&scratch)?;
    // bakedb-init reads the data as the owner it drops to: keep our directories traversable.
    set_mode(&bench_dir, 0o755)?;

    eprintln!("xtask: building the static bakedb-init");
    let built = crate::static_init::build()?;
    // Time a private copy: a build running beside the benchmark could replace the binary.
    let init = scratch.join("bakedb-init");
    fs::copy(&built, &init).with_context(|| format!("copying {}", built.display()))?;
    set_mode(&init, 0o755)?;
    let init_bytes = fs::metadata(&init)?.len();
    let commit = commit_measured(&root);

    let timer = Timer::new(scratch.join("time.out"));
    let tools = Tools::find(&timer);
    let cold = cold_cache();
    if let Err(why) = &cold {
        eprintln!("xtask: cold page cache {why}");
    }

    let mut datasets = Vec::new();
    for &size_mib in &options.sizes_mib {
        datasets.push(dataset(&bench_dir, size_mib)?);
    }
    let tiny = tiny_dataset(&bench_dir)?;
    // As root bakedb-init drops to the data owner before it reads a byte, as in a container;
    // that needs every directory above the data to be open to that user.
    let run_as_root = match is_root() {
        true => datasets
            .iter()
            .chain([&tiny])
            .find_map(|d| closed_ancestor(&d.root.join(DATA_DIR)))
            .map(|dir| {
                format!(
                    "{} is not searchable by uid {OWNER}, so bakedb-init runs with BAKEDB_RUN_AS_ROOT=1 and stays root",
                    dir.display()
                )
            }),
        false => None,
    };
    if let Some(why) = &run_as_root {
        eprintln!("xtask: {why}");
    }
    let env = InitEnv {
        run_as_root: run_as_root.is_some(),
    };

    let mut groups = Vec::new();
    for data in &datasets {
        for cache in Cache::BOTH {
            let mut group = Group {
                size_mib: data.size_mib,
                bytes: data.bytes,
                cache,
                cases: Tool::ALL
                    .iter()
                    .map(|&tool| CaseResult {
                        tool,
                        unavailable: tools.unavailable(tool),
                        samples: Vec::new(),
                        cached: Vec::new(),
                        threads: Vec::new(),
                    })
                    .collect(),
            };
            if cache == Cache::Cold
                && let Err(why) = &cold
            {
                for case in &mut group.cases {
                    case.unavailable.get_or_insert_with(|| why.clone());
                }
            }
            for run in 1..=options.runs {
                for case in group.cases.iter_mut().filter(|c| c.unavailable.is_none()) {
                    eprintln!(
                        "xtask: run {run}/{}: {} MiB, {} cache: {}",
                        options.runs,
                        data.size_mib,
                        cache.name(),
                        case.tool.what()
                    );
                    let (sample, cached, threads) =
                        time_case(case.tool, cache, data, &init, &env, &timer, &tools)?;
                    eprintln!(
                        "xtask:   {:.3} s ({:.0} MB/s){}",
                        sample.secs,
                        data.bytes as f64 / sample.secs / 1e6,
                        cached.map_or(String::new(), |c| format!(
                            ", {:.0} % of the file cached before",
                            c * 100.0
                        ))
                    );
                    case.samples.push(sample);
                    case.cached.extend(cached);
                    case.threads.extend(threads);
                }
            }
            groups.push(group);
        }
    }

    eprintln!(
        "xtask: start-up overhead: {} runs each, alternated",
        options.overhead_runs
    );
    let overhead = overhead(&init, &tiny, &env, options.overhead_runs)?;
    eprintln!(
        "xtask:   bakedb-init with BAKEDB_VERIFY=off printed:\n{}",
        overhead.init_stderr.trim_end()
    );

    let report = Report {
        options,
        commit,
        init_bytes,
        tools: &tools,
        cold: cold.err(),
        run_as_root,
        groups: &groups,
        overhead: &overhead,
    };
    bench::report::publish(&root, "init", report.markdown(), &scratch)
}

// ---------------------------------------------------------------------------------------------
// The data.

/// A root directory as bakedb-init sees an image: etc/bakedb/image.json and the data file.
struct DataSet {
    size_mib: u64,
    root: PathBuf,
    file: PathBuf,
    bytes: u64,
    /// `sha256:<hex>` of image.json: what the image config's BAKEDB_DATA_DIGEST says.
    image_digest: String,
    /// The whole file's sha256, which sha256sum and openssl must print.
    file_sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// image.json as `bakedb build` writes it for one SQLite file: a whole-file sha256 up to one
/// chunk, else one digest per chunk.
fn image_json(size: u64, chunks: &[String]) -> String {
    let digests = match chunks {
        [whole] if size <= CHUNK_SIZE => format!("\"sha256\": \"{whole}\""),
        _ => {
            let list: Vec<String> = chunks.iter().map(|c| format!("\"{c}\"")).collect();
            format!("\"chunks\": [{}]", list.join(", "))
        }
    };
    format!(
        r#"{{
  "schema": 1,
  "engine": "sqlite",
  "profile": {{"name": "sqlite-readonly", "env": {{"SQLITE_TMPDIR": "/tmp", "BAKEDB_DATABASE": "{{data_dir}}/{DATA_FILE}"}}}},
  "data_dir": "/{DATA_DIR}",
  "owner": {{"uid": {OWNER}, "gid": {OWNER}}},
  "chunk_size": {CHUNK_SIZE},
  "files": [
    {{"path": "{DATA_FILE}", "size": {size}, "mode": "0644", {digests}}}
  ]
}}
"#
    )
}

/// Write `bytes` pseudo-random bytes (splitmix64) to `out`; returns the whole file's sha256
/// and the sha256 of every CHUNK_SIZE piece.
fn write_random(out: &mut impl std::io::Write, bytes: u64) -> Result<(String, Vec<String>)> {
    let mut rng = Rng(SEED);
    let mut buf = vec![0u8; 1 << 20];
    let mut whole = Sha256::new();
    let mut chunk = Sha256::new();
    let mut in_chunk = 0u64;
    let mut chunks = Vec::new();
    let mut written = 0u64;
    while written < bytes {
        let n = (bytes - written).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = rng.next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
        whole.update(&*buf);
        let mut rest: &[u8] = buf;
        while !rest.is_empty() {
            let take = rest.len().min((CHUNK_SIZE - in_chunk) as usize);
            chunk.update(&rest[..take]);
            in_chunk += take as u64;
            rest = &rest[take..];
            if in_chunk == CHUNK_SIZE {
                chunks.push(hex(&chunk.finalize_reset()));
                in_chunk = 0;
            }
        }
        out.write_all(buf)?;
        written += n as u64;
    }
    if in_chunk > 0 || chunks.is_empty() {
        chunks.push(hex(&chunk.finalize()));
    }
    Ok((hex(&whole.finalize()), chunks))
}

/// `target/bench/init/<N>mib/root`: generated once and reused while its stamp, the file's size
/// and image.json's digest agree.
fn dataset(bench_dir: &Path, size_mib: u64) -> Result<DataSet> {
    let dir = bench_dir.join(format!("{size_mib}mib"));
    let bytes = size_mib << 20;
    let stamp_path = dir.join("stamp");
    let prefix = format!("generator {GENERATOR_VERSION} seed {SEED:#x} bytes {bytes}");
    let mut data = DataSet {
        size_mib,
        root: dir.join("root"),
        file: dir.join("root").join(DATA_DIR).join(DATA_FILE),
        bytes,
        image_digest: String::new(),
        file_sha256: String::new(),
    };
    let image_path = data.root.join(IMAGE_JSON);
    if let Ok(stamp) = fs::read_to_string(&stamp_path)
        && let Some(rest) = stamp.trim_end().strip_prefix(&prefix)
        && let [_, file_sha256, _, image_digest] = rest.split_whitespace().collect::<Vec<_>>()[..]
        && fs::metadata(&data.file).is_ok_and(|m| m.len() == bytes)
        && fs::read(&image_path)
            .is_ok_and(|b| format!("sha256:{}", hex(&Sha256::digest(&b))) == image_digest)
    {
        eprintln!("xtask: reusing {} ({bytes} bytes)", data.file.display());
        data.file_sha256 = file_sha256.to_owned();
        data.image_digest = image_digest.to_owned();
        // Modes are part of what bakedb-init checks; a checkout tool may have changed them.
        set_modes(&data.root)?;
        return Ok(data);
    }

    eprintln!(
        "xtask: generating {} ({size_mib} MiB, seed {SEED:#x})",
        data.file.display()
    );
    let started = Instant::now();
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(data.root.join(DATA_DIR))?;
    fs::create_dir_all(image_path.parent().expect("parent"))?;
    // Outside the data directory until complete: bakedb-init rejects files it does not know.
    let partial = dir.join(format!("{DATA_FILE}.partial"));
    let mut out = std::io::BufWriter::with_capacity(
        4 << 20,
        File::create(&partial).with_context(|| format!("creating {}", partial.display()))?,
    );
    let (file_sha256, chunks) =
        write_random(&mut out, bytes).with_context(|| format!("writing {}", partial.display()))?;
    out.into_inner()
        .map_err(|e| anyhow!("writing {}: {}", partial.display(), e.error()))?;
    fs::rename(&partial, &data.file)
        .with_context(|| format!("renaming to {}", data.file.display()))?;
    let json = image_json(bytes, &chunks);
    fs::write(&image_path, &json).with_context(|| format!("writing {}", image_path.display()))?;
    set_modes(&data.root)?;
    data.image_digest = format!("sha256:{}", hex(&Sha256::digest(json.as_bytes())));
    data.file_sha256 = file_sha256;
    fs::write(
        &stamp_path,
        format!(
            "{prefix} sha256 {} image {}\n",
            data.file_sha256, data.image_digest
        ),
    )
    .with_context(|| format!("writing {}", stamp_path.display()))?;
    eprintln!(
        "xtask: generated {bytes} bytes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(data)
}

/// Directories 0755 and files 0644 from the dataset's directory down, as in the image layer.
fn set_modes(root: &Path) -> Result<()> {
    let dir = root.parent().expect("a dataset root has a parent");
    set_mode(dir, 0o755)?;
    for d in ["", "etc", "etc/bakedb", "var", "var/lib", DATA_DIR] {
        set_mode(&root.join(d), 0o755)?;
    }
    set_mode(&root.join(IMAGE_JSON), 0o644)?;
    set_mode(&root.join(DATA_DIR).join(DATA_FILE), 0o644)
}

/// The image of the overhead runs: a 4 KiB database, rewritten every time (it costs nothing).
fn tiny_dataset(bench_dir: &Path) -> Result<DataSet> {
    let dir = bench_dir.join("tiny");
    let _ = fs::remove_dir_all(&dir);
    let root = dir.join("root");
    let file = root.join(DATA_DIR).join(DATA_FILE);
    fs::create_dir_all(file.parent().expect("parent"))?;
    fs::create_dir_all(root.join("etc/bakedb"))?;
    let mut content = Vec::new();
    let (file_sha256, chunks) = write_random(&mut content, TINY_BYTES)?;
    fs::write(&file, &content).with_context(|| format!("writing {}", file.display()))?;
    let json = image_json(TINY_BYTES, &chunks);
    fs::write(root.join(IMAGE_JSON), &json)?;
    set_modes(&root)?;
    Ok(DataSet {
        size_mib: 0,
        root,
        file,
        bytes: TINY_BYTES,
        image_digest: format!("sha256:{}", hex(&Sha256::digest(json.as_bytes()))),
        file_sha256,
    })
}

/// The first directory from `/` down to `dir` that the data owner cannot search.
fn closed_ancestor(dir: &Path) -> Option<PathBuf> {
    let dir = fs::canonicalize(dir).ok()?;
    dir.ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find(|d| {
            fs::metadata(d).is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.mode() & 0o001 == 0 && m.uid() != OWNER
            })
        })
        .map(Path::to_owned)
}

// ---------------------------------------------------------------------------------------------
// Tools, cache states and timing.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// `bakedb-init --verify-only`, one thread per core (the default).
    Init,
    /// The same with BAKEDB_VERIFY_THREADS=1.
    InitOneThread,
    Sha256sum,
    Openssl,
    /// `dd bs=1M of=/dev/null`: reading the file without hashing it, what the disk allows.
    Read,
}

impl Tool {
    const ALL: [Tool; 5] = [
        Tool::Init,
        Tool::InitOneThread,
        Tool::Sha256sum,
        Tool::Openssl,
        Tool::Read,
    ];

    fn what(self) -> &'static str {
        match self {
            Tool::Init => "bakedb-init --verify-only",
            Tool::InitOneThread => "bakedb-init --verify-only, BAKEDB_VERIFY_THREADS=1",
            Tool::Sha256sum => "sha256sum",
            Tool::Openssl => "openssl dgst -sha256",
            Tool::Read => "dd bs=1M of=/dev/null (read only)",
        }
    }

    fn is_init(self) -> bool {
        matches!(self, Tool::Init | Tool::InitOneThread)
    }
}

struct Tools {
    gnu_time: bool,
    sha256sum: Found,
    openssl: Found,
    fincore: bool,
}

impl Tools {
    fn find(timer: &Timer) -> Tools {
        Tools {
            gnu_time: timer.gnu_time.is_some(),
            sha256sum: version(Path::new("sha256sum"), &["--version"]),
            // "OpenSSL 3.0.19 27 Jan 2026 (Library: …)" → "OpenSSL 3.0.19"
            openssl: version(Path::new("openssl"), &["version"])
                .map(|v| v.split_whitespace().take(2).collect::<Vec<_>>().join(" ")),
            fincore: version(Path::new("fincore"), &["--version"]).is_ok(),
        }
    }

    fn unavailable(&self, tool: Tool) -> Option<String> {
        match tool {
            Tool::Init | Tool::InitOneThread | Tool::Read => None,
            Tool::Sha256sum => self.sha256sum.as_ref().err().cloned(),
            Tool::Openssl => self.openssl.as_ref().err().cloned(),
        }
    }
}

/// How bakedb-init is run: as root it drops to the data owner unless that cannot read the data.
struct InitEnv {
    run_as_root: bool,
}

impl InitEnv {
    /// bakedb-init with only the variables the case sets: nothing inherited changes its path.
    fn command(&self, init: &Path) -> Command {
        let mut cmd = Command::new(init);
        for name in [
            "BAKEDB_VERIFY",
            "BAKEDB_VERIFY_THREADS",
            "BAKEDB_INIT_SUPERVISE",
            "BAKEDB_RUN_AS_ROOT",
            "BAKEDB_RUNTIME_DIR",
            "BAKEDB_DATA_DIGEST",
        ] {
            cmd.env_remove(name);
        }
        if self.run_as_root {
            cmd.env("BAKEDB_RUN_AS_ROOT", "1");
        }
        cmd
    }
}

/// Share of `file` in the page cache, from util-linux fincore.
fn cached_fraction(file: &Path, bytes: u64) -> Option<f64> {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let resident: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(resident as f64 / bytes.max(1) as f64)
}

/// Put the file where the cache state wants it; for a cold run, load the program (and its
/// libraries) again so that only the data comes from the disk.
fn prepare(tool: Tool, cache: Cache, data: &DataSet, init: &Path, timer: &Timer) -> Result<()> {
    match cache {
        Cache::Warm => {
            warm(&data.file)?;
            sync();
        }
        Cache::Cold => {
            drop_caches().map_err(|e| anyhow!("dropping the page cache: {e}"))?;
            let mut load = match tool {
                Tool::Init | Tool::InitOneThread => {
                    let mut c = Command::new(init);
                    c.arg("--version");
                    c
                }
                Tool::Sha256sum => {
                    let mut c = Command::new("sha256sum");
                    c.arg("--version");
                    c
                }
                Tool::Openssl => {
                    let mut c = Command::new("openssl");
                    c.arg("version");
                    c
                }
                Tool::Read => {
                    let mut c = Command::new("dd");
                    c.arg("--version");
                    c
                }
            };
            run_quiet(&mut load)?;
            if let Some(time) = &timer.gnu_time {
                run_quiet(Command::new(time).args(["-f", "", "-o", "/dev/null", "true"]))?;
            }
        }
    }
    Ok(())
}

/// One timed run (repeated while other processes take the cores): the sample, the share of the
/// file cached just before it and, for bakedb-init, the threads it says it used.
fn time_case(
    tool: Tool,
    cache: Cache,
    data: &DataSet,
    init: &Path,
    env: &InitEnv,
    timer: &Timer,
    tools: &Tools,
) -> Result<(Sample, Option<f64>, Option<usize>)> {
    let attempt = || -> Result<(Sample, Option<f64>, Option<usize>)> {
        prepare(tool, cache, data, init, timer)?;
        wait_until_quiet();
        let cached = if tools.fincore {
            cached_fraction(&data.file, data.bytes)
        } else {
            None
        };
        let mut cmd = match tool {
            Tool::Init | Tool::InitOneThread => {
                let mut c = env.command(init);
                c.args(["--verify-only", "--root"])
                    .arg(&data.root)
                    .env("BAKEDB_DATA_DIGEST", &data.image_digest);
                if tool == Tool::InitOneThread {
                    c.env("BAKEDB_VERIFY_THREADS", "1");
                }
                c
            }
            Tool::Sha256sum => {
                let mut c = Command::new("sha256sum");
                c.arg(&data.file);
                c
            }
            Tool::Openssl => {
                let mut c = Command::new("openssl");
                c.args(["dgst", "-sha256"]).arg(&data.file);
                c
            }
            Tool::Read => {
                let mut input = std::ffi::OsString::from("if=");
                input.push(&data.file);
                let mut c = Command::new("dd");
                c.arg(input).args(["of=/dev/null", "bs=1M", "status=none"]);
                c
            }
        };
        let done = timer
            .run(&mut cmd, false)
            .with_context(|| format!("timing {}", tool.what()))?;
        // Each tool must have read the whole file: its output says what it found.
        let threads = if tool.is_init() {
            Some(verified_threads(&done.stderr).ok_or_else(|| {
                anyhow!(
                    "{} did not report a verification:\n{}",
                    tool.what(),
                    done.stderr
                )
            })?)
        } else if tool == Tool::Read {
            None
        } else {
            let printed = done.stdout.trim();
            let digest = match tool {
                Tool::Sha256sum => printed.split_whitespace().next(),
                _ => printed.rsplit(' ').next(),
            };
            if digest != Some(data.file_sha256.as_str()) {
                bail!(
                    "{} printed {printed:?}; the file's sha256 is {}",
                    tool.what(),
                    data.file_sha256
                );
            }
            None
        };
        Ok((done.sample, cached, threads))
    };
    until_quiet(NOISY, attempt, |(sample, _, _)| sample.other_load)
}

/// The thread count from "bakedb-init: verified 1 file, 1.00 GiB under /var/lib/bakedb in
/// 0.52 s (2065 MB/s, 2 threads)".
fn verified_threads(stderr: &str) -> Option<usize> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("bakedb-init: verified "))?;
    line.rsplit_once(", ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct CaseResult {
    tool: Tool,
    unavailable: Option<String>,
    samples: Vec<Sample>,
    /// Share of the file in the page cache before each run.
    cached: Vec<f64>,
    /// Threads bakedb-init reported, per run.
    threads: Vec<usize>,
}

impl CaseResult {
    fn secs(&self) -> Option<f64> {
        median(self.samples.iter().map(|s| s.secs))
    }

    fn cpu_secs(&self) -> Option<f64> {
        median(self.samples.iter().filter_map(|s| s.cpu_secs))
    }

    fn peak_rss_mib(&self) -> Option<f64> {
        Sample::peak_rss_mib(&self.samples)
    }

    fn other_load(&self) -> Option<f64> {
        Sample::most_other_load(&self.samples)
    }
}

struct Group {
    size_mib: u64,
    bytes: u64,
    cache: Cache,
    cases: Vec<CaseResult>,
}

impl Group {
    fn case(&self, tool: Tool) -> Option<&CaseResult> {
        self.cases
            .iter()
            .find(|c| c.tool == tool && c.unavailable.is_none() && !c.samples.is_empty())
    }

    fn mb_per_s(&self, tool: Tool) -> Option<f64> {
        self.case(tool)
            .and_then(CaseResult::secs)
            .map(|s| self.bytes as f64 / s / 1e6)
    }

    /// bakedb-init (every core) over single-core openssl.
    fn speedup(&self) -> Option<f64> {
        self.mb_per_s(Tool::Init)
            .zip(self.mb_per_s(Tool::Openssl))
            .map(|(i, o)| i / o)
    }

    fn label(&self) -> String {
        format!("{} MiB, {} cache", self.size_mib, self.cache.name())
    }
}

// ---------------------------------------------------------------------------------------------
// The overhead of bakedb-init with verification off.

struct Overhead {
    init_ms: Vec<f64>,
    true_ms: Vec<f64>,
    /// What bakedb-init printed on one (untimed) run.
    init_stderr: String,
}

fn overhead(init: &Path, tiny: &DataSet, env: &InitEnv, runs: usize) -> Result<Overhead> {
    let mut with_init = env.command(init);
    with_init
        .arg("--root")
        .arg(&tiny.root)
        .arg("/bin/true")
        .env("BAKEDB_VERIFY", "off")
        // Set in every image's config; unused with verification off.
        .env("BAKEDB_DATA_DIGEST", &tiny.image_digest);
    let init_stderr = {
        let out = with_init
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", init.display()))?;
        if !out.status.success() {
            bail!(
                "BAKEDB_VERIFY=off bakedb-init --root {} /bin/true failed ({}):\n{}",
                tiny.root.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut direct = Command::new("/bin/true");
    for cmd in [&mut with_init, &mut direct] {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let time = |cmd: &mut Command| -> Result<f64> {
        let started = Instant::now();
        let status = cmd
            .status()
            .with_context(|| format!("running {:?}", cmd.get_program()))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if !status.success() {
            bail!("{cmd:?} failed with {status}");
        }
        Ok(ms)
    };
    for _ in 0..OVERHEAD_WARMUP {
        time(&mut with_init)?;
        time(&mut direct)?;
    }
    wait_until_quiet();
    let mut result = Overhead {
        init_ms: Vec::with_capacity(runs),
        true_ms: Vec::with_capacity(runs),
        init_stderr,
    };
    // ABBA order, so neither command always runs right after the other.
    for i in 0..runs {
        if i % 2 == 0 {
            result.init_ms.push(time(&mut with_init)?);
            result.true_ms.push(time(&mut direct)?);
        } else {
            result.true_ms.push(time(&mut direct)?);
            result.init_ms.push(time(&mut with_init)?);
        }
    }
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report<'a> {
    options: &'a InitOptions,
    commit: String,
    init_bytes: u64,
    tools: &'a Tools,
    /// Why the cold cache was not measured.
    cold: Option<String>,
    /// Why bakedb-init stayed root.
    run_as_root: Option<String>,
    groups: &'a [Group],
    overhead: &'a Overhead,
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let nproc = nproc();
        let tool = found_text;
        let mut md = bench::report::start("init", &self.commit, &self.options.command());
        let who = match &self.run_as_root {
            Some(why) => format!("as root: {why}"),
            None if is_root() => format!(
                "as root, so bakedb-init drops to the data owner {OWNER}:{OWNER} before it reads, as in a container"
            ),
            None => "as a user other than root, so bakedb-init keeps that user".into(),
        };
        let _ = writeln!(
            md,
            "Input: per size, one file of pseudo-random bytes (splitmix64, seed {SEED:#x}; incompressible) as \
             /{DATA_DIR}/{DATA_FILE}, and its image.json with a sha256 per {} MiB chunk, as `bakedb build` writes them. \
             `bakedb-init --verify-only --root DIR` runs with BAKEDB_DATA_DIGEST set to image.json's digest, {who}. \
             sha256sum and openssl hash the same file in the same rounds, and their output is checked against the \
             file's digest; `dd` reads it without hashing, for what the disk allows. bakedb-init is the static binary of `cargo xtask static-init` ({} bytes). Tools: {}; {}.\n",
            CHUNK_SIZE >> 20,
            self.init_bytes,
            tool(&self.tools.sha256sum),
            tool(&self.tools.openssl),
        );
        let cold = match &self.cold {
            Some(why) => format!("Cold cache: {why}."),
            None => "Cold cache: `sync; echo 3 > /proc/sys/vm/drop_caches` before every run, then the program \
                     alone is loaded again (`--version`), so that only the data comes from the disk."
                .into(),
        };
        let _ = writeln!(
            md,
            "{cold} Warm cache: the file is read once before every run. \"cached\" is the share of the file in \
             the page cache just before the runs (fincore; a range when the runs differ). Medians of {} runs, each \
             case once per round; MB/s is 10^6 bytes over the median wall time, spawn to exit{}. \
             \"× openssl\" is MB/s over `openssl dgst -sha256`'s (one core) in the same size and cache state. {}\n",
            self.options.runs,
            if self.tools.gnu_time {
                " under GNU time"
            } else {
                ""
            },
            if self.tools.gnu_time {
                "Peak RSS is the largest of the runs; CPU s is the median user+sys time; \"others\" is the largest \
                 share of all cores that other processes used during a run."
            } else {
                "Peak RSS, CPU s and \"others\" are not measured: GNU time (/usr/bin/time) is not installed \
                 (apt-get install time)."
            },
        );
        let _ = writeln!(
            md,
            "| data | cache | what | threads | median s | MB/s | × openssl | CPU s | peak RSS MiB | cached | others |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for group in self.groups {
            let openssl = group.mb_per_s(Tool::Openssl);
            for case in &group.cases {
                let size = format!("{} MiB", group.size_mib);
                if let Some(why) = &case.unavailable {
                    let _ = writeln!(
                        md,
                        "| {size} | {} | {} | {why} | | | | | | | |",
                        group.cache.name(),
                        case.tool.what()
                    );
                    continue;
                }
                let threads = match (case.threads.iter().min(), case.threads.iter().max()) {
                    (Some(a), Some(b)) if a == b => a.to_string(),
                    (Some(a), Some(b)) => format!("{a}–{b}"),
                    _ => "1".into(),
                };
                let mbs = group.mb_per_s(case.tool);
                let lo = case.cached.iter().copied().min_by(f64::total_cmp);
                let hi = case.cached.iter().copied().max_by(f64::total_cmp);
                let cached = match (lo, hi) {
                    (Some(lo), Some(hi)) if (hi - lo) * 100.0 >= 1.0 => {
                        format!("{:.0}–{:.0} %", lo * 100.0, hi * 100.0)
                    }
                    (Some(lo), _) => fmt_pct(Some(lo)),
                    _ => "—".into(),
                };
                let _ = writeln!(
                    md,
                    "| {size} | {} | {} | {threads} | {} | {} | {} | {} | {} | {cached} | {} |",
                    group.cache.name(),
                    case.tool.what(),
                    fmt(case.secs(), 3),
                    fmt(mbs, 0),
                    times(mbs.zip(openssl).map(|(m, o)| m / o), 2),
                    fmt(case.cpu_secs(), 2),
                    fmt(case.peak_rss_mib(), 1),
                    fmt_pct(case.other_load()),
                );
            }
        }

        let o = self.overhead;
        let (init_ms, true_ms) = (median(o.init_ms.clone()), median(o.true_ms.clone()));
        let overhead_ms = init_ms.zip(true_ms).map(|(i, t)| i - t);
        let _ = writeln!(md, "\n### Start-up with verification off\n");
        let _ = writeln!(
            md,
            "{} runs of each, alternated, after {OVERHEAD_WARMUP} untimed ones; wall time from spawn to exit. bakedb-init \
             reads and parses a one-file image.json, applies the sqlite-readonly profile, {} and execs /bin/true.\n",
            o.init_ms.len(),
            if self.run_as_root.is_none() && is_root() {
                format!("drops root to {OWNER}:{OWNER}")
            } else {
                "keeps its user".into()
            }
        );
        let _ = writeln!(md, "| command | median ms | 90th percentile ms |");
        let _ = writeln!(md, "|---|---:|---:|");
        let _ = writeln!(
            md,
            "| `/bin/true` | {} | {} |",
            fmt(true_ms, 2),
            fmt(percentile(o.true_ms.clone(), 0.9), 2)
        );
        let _ = writeln!(
            md,
            "| `BAKEDB_VERIFY=off bakedb-init --root DIR /bin/true` | {} | {} |",
            fmt(init_ms, 2),
            fmt(percentile(o.init_ms.clone(), 0.9), 2)
        );
        let _ = writeln!(md, "| difference (medians) | {} | |", fmt(overhead_ms, 2));

        let _ = writeln!(md, "\n### Targets\n");
        if nproc != TARGET_CORES {
            let _ = writeln!(
                md,
                "The throughput target is set for {TARGET_CORES} cores; this machine has {nproc}.\n"
            );
        }
        let _ = writeln!(md, "| target | measured | met |");
        let _ = writeln!(md, "|---|---:|---|");
        let mut notes = Vec::new();
        for group in self.groups {
            let speedup = group.speedup();
            let met = speedup.map(|s| s >= TARGET_SPEEDUP_VS_OPENSSL);
            let _ = writeln!(
                md,
                "| verification ≥ {TARGET_SPEEDUP_VS_OPENSSL}× `openssl dgst -sha256`, {} | {} | {} |",
                group.label(),
                times(speedup, 2),
                yes_no(met)
            );
            if met == Some(false) {
                notes.push(self.explain_speedup(group));
            }
        }
        let met = overhead_ms.map(|ms| ms < TARGET_OVERHEAD_MS);
        let _ = writeln!(
            md,
            "| overhead with verification off < {TARGET_OVERHEAD_MS:.0} ms | {} ms | {} |",
            fmt(overhead_ms, 2),
            yes_no(met)
        );
        if met == Some(false) {
            notes.push(format!(
                "overhead: bakedb-init with BAKEDB_VERIFY=off takes {} ms from spawn to exit, /bin/true alone {} ms",
                fmt(init_ms, 2),
                fmt(true_ms, 2)
            ));
        }
        let worst = self
            .groups
            .iter()
            .flat_map(|g| g.cases.iter().map(move |c| (g, c)))
            .filter(|(_, c)| c.tool.is_init())
            .filter_map(|(g, c)| c.peak_rss_mib().map(|r| (g, c, r)))
            .max_by(|a, b| a.2.total_cmp(&b.2));
        let met = worst.map(|(_, _, rss)| rss < TARGET_PEAK_RSS_MIB);
        let _ = writeln!(
            md,
            "| peak RSS < {TARGET_PEAK_RSS_MIB:.0} MiB (every bakedb-init run) | {} | {} |",
            worst.map_or_else(
                || "n/a (no GNU time)".into(),
                |(_, _, rss)| format!("{rss:.1} MiB")
            ),
            yes_no(met)
        );
        if let (Some(false), Some((group, case, rss))) = (met, worst) {
            notes.push(format!(
                "peak RSS: the largest is {rss:.1} MiB, in {} ({})",
                case.tool.what(),
                group.label()
            ));
        }
        if notes.is_empty() && self.cold.is_none() {
            let _ = writeln!(md, "\nEvery target is met.");
        } else {
            let _ = writeln!(md);
            for note in notes {
                let _ = writeln!(md, "- {note}");
            }
            if let Some(why) = &self.cold {
                let _ = writeln!(md, "- cold page cache: {why}");
            }
        }
        md
    }

    /// What meeting the throughput target would take, and where the time goes.
    fn explain_speedup(&self, group: &Group) -> String {
        let init = group.case(Tool::Init);
        let openssl = group.mb_per_s(Tool::Openssl);
        let needed = openssl.map(|o| o * TARGET_SPEEDUP_VS_OPENSSL);
        let one = group.mb_per_s(Tool::InitOneThread);
        let all = group.mb_per_s(Tool::Init);
        let threads = init.and_then(|c| c.threads.iter().max().copied());
        let busy = init
            .and_then(|c| c.cpu_secs().zip(c.secs()))
            .zip(threads)
            .map(|((cpu, secs), t)| cpu / (secs * t as f64));
        let mut text = format!(
            "{}: {TARGET_SPEEDUP_VS_OPENSSL}× openssl's {} MB/s is {} MB/s, {} s or less; bakedb-init runs at {} MB/s on {} threads \
             (their cores {} busy) and {} MB/s on one ({} openssl's), so its threads scale {}",
            group.label(),
            fmt(openssl, 0),
            fmt(needed, 0),
            fmt(needed.map(|n| group.bytes as f64 / n / 1e6), 3),
            fmt(all, 0),
            threads.map_or("?".into(), |t| t.to_string()),
            fmt_pct(busy),
            fmt(one, 0),
            times(one.zip(openssl).map(|(a, b)| a / b), 2),
            times(all.zip(one).map(|(a, b)| a / b), 2),
        );
        let read = group.mb_per_s(Tool::Read);
        if let Some(read) = read {
            let _ = write!(
                text,
                "; reading the file without hashing it (dd) runs at {read:.0} MB/s{}",
                match needed {
                    Some(n) if read < n => ", below what the target needs: the disk sets the pace",
                    _ => "",
                }
            );
        }
        if group.cache == Cache::Cold
            && let Some(warm) = self
                .groups
                .iter()
                .find(|g| g.size_mib == group.size_mib && g.cache == Cache::Warm)
        {
            let _ = write!(
                text,
                "; with a warm cache bakedb-init runs at {} MB/s and openssl at {} MB/s",
                fmt(warm.mb_per_s(Tool::Init), 0),
                fmt(warm.mb_per_s(Tool::Openssl), 0)
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        let o = InitOptions::parse(&["--sizes-mib", "64,256", "--runs=2", "--overhead-runs", "50"])
            .unwrap();
        assert_eq!(
            (o.sizes_mib, o.runs, o.overhead_runs),
            (vec![64, 256], 2, 50)
        );
        let o = InitOptions::parse(&[]).unwrap();
        assert_eq!(
            (o.sizes_mib.clone(), o.runs, o.overhead_runs),
            (vec![1024, 8192], 5, 200)
        );
        assert_eq!(
            o.command(),
            "cargo xtask bench init --sizes-mib 1024,8192 --runs 5 --overhead-runs 200"
        );
        assert!(InitOptions::parse(&["--sizes-mib", "64,x"]).is_err());
        assert!(InitOptions::parse(&["--sizes-mib", "0"]).is_err());
        assert!(InitOptions::parse(&["--runs"]).is_err());
        assert!(InitOptions::parse(&["--size-mib", "64"]).is_err());
    }

    #[test]
    fn chunk_digests_match_the_bytes() {
        let bytes = CHUNK_SIZE + 12345;
        let mut out = Vec::new();
        let (whole, chunks) = write_random(&mut out, bytes).unwrap();
        assert_eq!(out.len() as u64, bytes);
        assert_eq!(whole, hex(&Sha256::digest(&out)));
        let expected: Vec<String> = out
            .chunks(CHUNK_SIZE as usize)
            .map(|c| hex(&Sha256::digest(c)))
            .collect();
        assert_eq!(chunks, expected);
        let json = image_json(bytes, &chunks);
        assert!(json.contains(&format!(
            "\"chunks\": [\"{}\", \"{}\"]",
            expected[0], expected[1]
        )));

        let mut small = Vec::new();
        let (whole, chunks) = write_random(&mut small, 100).unwrap();
        assert_eq!(chunks, std::slice::from_ref(&whole));
        assert!(image_json(100, &chunks).contains(&format!("\"sha256\": \"{whole}\"")));
        // The same seed gives the same bytes: the small file is the large one's start.
        assert_eq!(small[..], out[..100]);
    }

    #[test]
    fn reads_the_thread_count() {
        let stderr = "bakedb-init: verified 1 file, 1.00 GiB under /var/lib/bakedb in 0.52 s (2065 MB/s, 2 threads)\n";
        assert_eq!(verified_threads(stderr), Some(2));
        let one = "bakedb-init: verified 1 file, 64.00 MiB under /var/lib/bakedb in 0.12 s (560 MB/s, 1 thread)";
        assert_eq!(verified_threads(one), Some(1));
        assert_eq!(verified_threads("bakedb-init: warning"), None);
    }
}
