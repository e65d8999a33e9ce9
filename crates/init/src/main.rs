//! bakedb-init, the ENTRYPOINT of every bakedb image: verify the data against the digest in
//! the image config, apply the engine's read-only profile, and exec (or supervise) the engine.
//!
//! Linear on purpose, like tini and catatonit: no argument library, no async, no serde. It
//! uses no workspace crate so that it stays a small static binary whose layer is identical in
//! every image (see ARCHITECTURE.md).
//!
//! Exit codes: 1 setup failed, 2 usage, 3 data verification failed, 126 command not
//! executable, 127 command not found, otherwise the engine's own code (128+N for signal N).

mod copy;
mod image;
mod json;
mod patch;
mod profile;
mod regular;
mod start;
mod verify;

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::Description;
use profile::{Launch, PatchMode};
use start::Identity;

const IMAGE_JSON: &str = "etc/bakedb/image.json";
/// More than any image.json bakedb writes: 256 MiB of 16 MiB chunk digests describe
/// petabytes. A larger file is not read into memory.
const IMAGE_JSON_MAX_BYTES: u64 = 256 << 20;
/// /etc/passwd is read whole to find a home directory; a real one is kilobytes.
const PASSWD_MAX_BYTES: u64 = 64 << 20;

const USAGE: &str = "usage: bakedb-init [--plan | --verify-only] [--root DIR] [--] COMMAND [ARG...]

Verifies the data under the image's data directory against /etc/bakedb/image.json and the
BAKEDB_DATA_DIGEST in the image config, applies the engine's read-only profile, then execs
COMMAND (normally the image's CMD).

  --plan         print what would be verified, composed and executed, then exit 0
  --verify-only  verify the image as stored (patched files as their base and patches),
                 then exit 0 (or 3) without writing or starting anything
  --root DIR     treat DIR as the container's root (tests, benchmarks, unpacked bundles)

Environment: BAKEDB_VERIFY=off, BAKEDB_INIT_SUPERVISE=1, BAKEDB_RUN_AS_ROOT=1,
BAKEDB_RUNTIME_DIR (default /tmp/bakedb), BAKEDB_VERIFY_THREADS (default: one per core),
BAKEDB_DATA_COPY_DIR (copy the data there, verified, and start the engine on the copy: for
a read-only root filesystem, e.g. an emptyDir), BAKEDB_DATA_COPY_WHEN=patched (copy only an
image whose patches init composes; run any other in place).
Exit codes: 1 setup, 2 usage, 3 verification failed, 126/127 command not executable/found.";

enum Failure {
    Setup(String),
    Usage(String),
    Verify(String),
    Exec(i32, String),
}

impl Failure {
    fn report(self) -> i32 {
        let (code, message) = match self {
            Failure::Setup(m) => (1, m),
            Failure::Usage(m) => (2, m),
            Failure::Verify(m) => (
                3,
                format!("verification failed: {m}; the engine was not started"),
            ),
            Failure::Exec(code, m) => (code, m),
        };
        eprintln!("bakedb-init: {message}");
        code
    }
}

#[derive(PartialEq)]
enum Mode {
    Run,
    Plan,
    VerifyOnly,
}

struct Options {
    mode: Mode,
    root: PathBuf,
    command: Vec<String>,
}

fn parse_args(args: Vec<String>) -> Result<Options, Failure> {
    let mut options = Options {
        mode: Mode::Run,
        root: PathBuf::from("/"),
        command: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--plan" => options.mode = Mode::Plan,
            "--verify-only" => options.mode = Mode::VerifyOnly,
            "--root" => {
                options.root = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| Failure::Usage("--root needs a directory".into()))?;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("bakedb-init {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--" => {
                options.command.extend(args.by_ref());
            }
            flag if flag.starts_with("--") => {
                return Err(Failure::Usage(format!(
                    "unknown option {flag}; put the command after -- if it starts with --\n{USAGE}"
                )));
            }
            _ => {
                options.command.push(arg);
                options.command.extend(args.by_ref());
            }
        }
    }
    if options.mode != Mode::VerifyOnly && options.command.is_empty() {
        return Err(Failure::Usage(
            "no command to start: the image has no CMD and none was given; run it as `docker run IMAGE COMMAND...`".into(),
        ));
    }
    Ok(options)
}

/// A yes/no environment switch; anything unexpected is a usage error, not a guess.
fn switch(name: &str, default: bool) -> Result<bool, Failure> {
    match std::env::var(name).as_deref() {
        Err(_) | Ok("") => Ok(default),
        Ok("1" | "on" | "yes" | "true") => Ok(true),
        Ok("0" | "off" | "no" | "false") => Ok(false),
        Ok(other) => Err(Failure::Usage(format!(
            "{name}={other:?} is not a switch; use 1/on/yes/true or 0/off/no/false"
        ))),
    }
}

fn plural(n: usize, what: &str) -> String {
    let ending = match (n, what.ends_with("ch")) {
        (1, _) => "",
        (_, true) => "es",
        _ => "s",
    };
    format!("{n} {what}{ending}")
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

struct Settings {
    verify: bool,
    supervise_requested: bool,
    allow_root: bool,
    runtime_dir: PathBuf,
    threads: usize,
    expected_digest: Option<String>,
    /// BAKEDB_DATA_COPY_DIR: run the engine on a verified copy there (see copy.rs).
    copy_dir: Option<PathBuf>,
    /// BAKEDB_DATA_COPY_WHEN=patched: the copy only for an image whose patches init composes
    /// (an engine that reads its files in place needs a writable place for those alone).
    copy_only_patched: bool,
}

/// An absolute path from the environment, or None when unset or empty.
fn absolute_path(name: &str) -> Result<Option<PathBuf>, Failure> {
    match std::env::var(name) {
        Ok(dir) if !dir.is_empty() => {
            if !dir.starts_with('/') {
                return Err(Failure::Usage(format!(
                    "{name}={dir:?} is not an absolute path"
                )));
            }
            Ok(Some(PathBuf::from(dir)))
        }
        _ => Ok(None),
    }
}

fn settings() -> Result<Settings, Failure> {
    let runtime_dir = absolute_path("BAKEDB_RUNTIME_DIR")?
        .unwrap_or_else(|| PathBuf::from(profile::DEFAULT_RUNTIME_DIR));
    let threads = match std::env::var("BAKEDB_VERIFY_THREADS") {
        Ok(n) if !n.is_empty() => n.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            Failure::Usage(format!(
                "BAKEDB_VERIFY_THREADS={n:?} is not a positive number"
            ))
        })?,
        _ => 0,
    };
    Ok(Settings {
        verify: switch("BAKEDB_VERIFY", true)?,
        supervise_requested: switch("BAKEDB_INIT_SUPERVISE", false)?,
        allow_root: switch("BAKEDB_RUN_AS_ROOT", false)?,
        runtime_dir,
        threads,
        expected_digest: std::env::var("BAKEDB_DATA_DIGEST").ok(),
        copy_dir: absolute_path("BAKEDB_DATA_COPY_DIR")?,
        copy_only_patched: match std::env::var("BAKEDB_DATA_COPY_WHEN").as_deref() {
            Err(_) | Ok("" | "always") => false,
            Ok("patched") => true,
            Ok(other) => {
                return Err(Failure::Usage(format!(
                    "BAKEDB_DATA_COPY_WHEN={other:?} is not always or patched"
                )));
            }
        },
    })
}

fn load_description(
    root: &Path,
    settings: &Settings,
    check_digest: bool,
) -> Result<Description, Failure> {
    let path = root.join(IMAGE_JSON);
    let bytes = regular::read(&path, regular::Links::Refuse, IMAGE_JSON_MAX_BYTES).map_err(|e| {
        Failure::Verify(match e {
            regular::OpenError::Missing(e) | regular::OpenError::Other(e) => format!(
                "reading {}: {e}; this image was not built by bakedb build, or the file was removed",
                path.display()
            ),
            refused => format!(
                "{} {refused}: the data description was replaced",
                path.display()
            ),
        })
    })?;
    if check_digest {
        let expected = settings.expected_digest.as_deref().ok_or_else(|| {
            Failure::Verify(
                "BAKEDB_DATA_DIGEST is not set; the image config sets it, so the container's environment was replaced (set BAKEDB_VERIFY=off to start unverified)".into(),
            )
        })?;
        verify::check_image_json(&bytes, expected, &path).map_err(Failure::Verify)?;
    }
    image::parse(&bytes).map_err(|e| Failure::Verify(format!("{}: {e}", path.display())))
}

type OsEnv = Vec<(std::ffi::OsString, std::ffi::OsString)>;

/// The environment, split into what the profile may look at (UTF-8) and what it passes
/// through untouched.
fn env_vars() -> (Vec<(String, String)>, OsEnv) {
    let (mut text, mut other) = (Vec::new(), Vec::new());
    for (k, v) in std::env::vars_os() {
        match (k.to_str(), v.to_str()) {
            (Some(k), Some(v)) => text.push((k.to_owned(), v.to_owned())),
            _ => other.push((k, v)),
        }
    }
    (text, other)
}

/// After dropping root, HOME=/root (what runtimes set for uid 0) names a directory the
/// engine cannot use; like gosu, take the user's home from /etc/passwd, else `/` (what
/// Docker sets for a user without a passwd entry). /etc/passwd is the base image's, so a
/// link is followed; anything but a regular file behind it (a FIFO would block the start
/// forever) is refused.
fn home_for(uid: u32, root: &Path, env: &mut Vec<(String, String)>) -> Result<(), Failure> {
    let current = env
        .iter()
        .find(|(k, _)| k == "HOME")
        .map(|(_, v)| v.as_str());
    if !matches!(current, None | Some("/root")) {
        return Ok(());
    }
    let path = root.join("etc/passwd");
    let passwd = match regular::read(&path, regular::Links::Follow, PASSWD_MAX_BYTES) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(regular::OpenError::Missing(_) | regular::OpenError::Other(_)) => String::new(),
        Err(refused) => {
            return Err(Failure::Verify(format!(
                "{} {refused} (init reads it for the home directory of uid {uid})",
                path.display()
            )));
        }
    };
    let home = passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 7 && fields[2].parse() == Ok(uid)).then(|| fields[5].to_owned())
        })
        .filter(|h| h.starts_with('/'))
        .unwrap_or_else(|| "/".into());
    env.retain(|(k, _)| k != "HOME");
    env.push(("HOME".into(), home));
    Ok(())
}

fn path_of(env: &[(String, String)]) -> Option<&str> {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
}

/// Whether this start composes the patched files in place before the engine starts.
fn composes(desc: &Description, mode: &Mode) -> bool {
    *mode == Mode::Run && has_patches_to_apply(desc)
}

/// Whether the image has patched files that init composes before the engine starts.
fn has_patches_to_apply(desc: &Description) -> bool {
    desc.profile.patches == Some(PatchMode::Apply) && desc.patched().next().is_some()
}

/// Files and patches for the plan and the messages: "2 files from 3 patches".
fn patch_counts(desc: &Description) -> (usize, usize) {
    desc.patched().fold((0, 0), |(files, patches), f| {
        (files + 1, patches + f.patches.len())
    })
}

fn print_plan(
    desc: &Description,
    settings: &Settings,
    options: &Options,
    identity: &Identity,
    launch: &Launch,
    supervise: bool,
    copy_dir: Option<&Path>,
) {
    let data_dir = options.root.join(desc.data_dir.trim_start_matches('/'));
    let apply = composes(desc, &Mode::Run);
    let passes: &[verify::Pass] = if apply {
        &[verify::Pass::BeforeCompose, verify::Pass::Composed]
    } else {
        &[verify::Pass::Stored]
    };
    let (files, total, pieces) = passes
        .iter()
        .map(|pass| verify::workload(desc, *pass))
        .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    println!("bakedb-init plan ({} engine)", desc.engine);
    if settings.verify {
        println!(
            "  verify   {} against BAKEDB_DATA_DIGEST={}",
            options.root.join(IMAGE_JSON).display(),
            settings
                .expected_digest
                .as_deref()
                .unwrap_or("(unset: verification would fail)")
        );
        let threads = if settings.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            settings.threads
        };
        println!(
            "  verify   {}: {}, {} ({total} bytes), {} of up to {} on {}",
            data_dir.display(),
            plural(files, "file"),
            human(total),
            plural(pieces, "piece"),
            human(desc.chunk_size),
            plural(threads.min(pieces).max(1), "thread"),
        );
        if !desc.page_index.is_empty() {
            let paths: Vec<String> = desc
                .page_index
                .iter()
                .map(|i| {
                    options
                        .root
                        .join(i.path.trim_start_matches('/'))
                        .display()
                        .to_string()
                })
                .collect();
            println!(
                "  verify   {}: {}",
                plural(paths.len(), "page index file"),
                paths.join(", ")
            );
        }
        if desc.profile.verify_first_start {
            println!(
                "  verify   at this container's first start only: {} writes into its data; the stamp {} marks a verified start{}",
                desc.engine,
                data_dir.join(profile::VERIFIED_STAMP).display(),
                if apply {
                    " whose patches were applied"
                } else {
                    ""
                }
            );
        }
    } else {
        println!(
            "  verify   off (BAKEDB_VERIFY=off): {} is not checked",
            data_dir.display()
        );
    }
    if let Some(copy) = copy_dir {
        println!(
            "  copy     {} into {} (BAKEDB_DATA_COPY_DIR), verified as it is read{}, unless {} holds this image's copy already; the engine runs on the copy",
            data_dir.display(),
            copy.display(),
            if settings.verify {
                ""
            } else {
                " (BAKEDB_VERIFY=off does not apply)"
            },
            copy.join(profile::VERIFIED_STAMP).display()
        );
    }
    print_patches_plan(desc, apply, settings.verify);
    let user = match identity {
        Identity::Unchanged => format!("unchanged (uid {})", start::euid()),
        Identity::Drop { uid, gid } => format!("drop root to {uid}:{gid}, the data owner"),
        Identity::RootAllowed => "stay root (BAKEDB_RUN_AS_ROOT=1)".into(),
        Identity::RootOwner => "stay root (the image's data is owned by root)".into(),
    };
    println!("  user     {user}");
    println!("  tune     {}", launch.summary());
    let program = start::resolve(&launch.argv[0], path_of(&launch.env))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|(code, m)| format!("(would fail with {code}: {m})"));
    println!(
        "  {} {program} {:?}",
        if supervise { "supervise" } else { "exec    " },
        launch.argv
    );
}

/// The plan's lines about patch layers: what is composed (or read in place), file by file.
fn print_patches_plan(desc: &Description, apply: bool, verify: bool) {
    /// A PostgreSQL generation may patch hundreds of relation files; the plan names a few.
    const SHOWN: usize = 20;
    let (n_files, n_patches) = patch_counts(desc);
    if n_files == 0 {
        if desc.generation > 0 {
            println!(
                "  patches  none: generation {} patches no file",
                desc.generation
            );
        }
        return;
    }
    let how = if apply {
        format!(
            "apply: compose {} in place from {} before the engine starts (as the data owner){}",
            plural(n_files, "file"),
            plural(n_patches, "patch"),
            if verify {
                ", then verify the composed files"
            } else {
                ""
            }
        )
    } else {
        format!(
            "in place: {} reads {} through their {} itself; init verifies them as stored and writes nothing",
            desc.engine,
            plural(n_files, "patched file"),
            plural(n_patches, "patch")
        )
    };
    println!("  patches  {how} (generation {})", desc.generation);
    for f in desc.patched().take(SHOWN) {
        let base = f.base.as_ref().expect("patched");
        println!(
            "           {}: base of generation {} ({}) + {} = {}",
            f.path,
            base.generation,
            human(base.content.size),
            plural(f.patches.len(), "patch"),
            human(f.content.size)
        );
    }
    if n_files > SHOWN {
        println!("           and {} more", plural(n_files - SHOWN, "file"));
    }
}

/// Write the first-start stamp: a temporary file renamed into place, so a crash leaves either
/// no stamp or a whole one. The temporary file is created new (O_EXCL, no link followed), so
/// whatever was at its name is never opened.
fn write_stamp(stamp: &Path, digest: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = stamp.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(format!("{digest}\n").as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, stamp)
}

/// Whether the stamp says this container's data was verified against `digest`. The stamp
/// is a regular file init wrote; anything else in its place is refused.
fn stamp_matches(stamp: &Path, digest: &str) -> Result<bool, Failure> {
    match regular::read(stamp, regular::Links::Refuse, 4096) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).trim() == digest),
        Err(regular::OpenError::Missing(_) | regular::OpenError::Other(_)) => Ok(false),
        Err(refused) => Err(Failure::Verify(format!(
            "{} {refused}: init writes it as a regular file after verifying",
            stamp.display()
        ))),
    }
}

/// A verification or composition problem as init's failure: a difference is exit 3, what
/// the container does not allow (permissions, limits, a read-only disk) a setup error.
fn data_failure(doing: &str) -> impl Fn(verify::Problem) -> Failure + '_ {
    move |p| match p {
        verify::Problem::Mismatch(m) => Failure::Verify(m),
        verify::Problem::Access(m) => Failure::Setup(format!("cannot {doing}: {m}")),
    }
}

/// Verify the data (when `check`) and compose the patched files (when `apply`), in the
/// order that trusts nothing unread: the page index and every file that is not composed
/// (the patches among them), then every patch header, then composing, then the composed
/// files. Without `apply` the patched files are verified as stored (their base).
///
/// With `copy_to` (which implies `check`), every file is copied there as stored while it is
/// verified, and the patches are checked and composed in the copy, never in `data_dir`.
fn prepare_data(
    desc: &Description,
    settings: &Settings,
    options: &Options,
    data_dir: &Path,
    check: bool,
    apply: bool,
    copy_to: Option<&Path>,
) -> Result<(), Failure> {
    let target = copy_to.unwrap_or(data_dir);
    let started = Instant::now();
    let (mut files, mut bytes, mut threads) = (0, 0, 0);
    let mut hashed = |s: verify::Summary| {
        files += s.files;
        bytes += s.bytes;
        threads = threads.max(s.threads);
    };
    let mut index_bytes = 0;
    if check {
        index_bytes = verify::check_page_index(desc, &options.root)
            .map_err(data_failure("verify the data"))?;
        // A copy takes every file whole, the patched ones as stored (their base).
        let pass = if apply && copy_to.is_none() {
            verify::Pass::BeforeCompose
        } else {
            verify::Pass::Stored
        };
        hashed(
            verify::check_dir(
                desc,
                data_dir,
                settings.threads,
                pass,
                copy_to,
                desc.profile.verify_first_start,
            )
            .map_err(data_failure(if copy_to.is_some() {
                "copy the data"
            } else {
                "verify the data"
            }))?,
        );
    }
    let (n_patched, n_patches) = patch_counts(desc);
    // Headers are checked in place mode too: the engine would only find a bad one later.
    if n_patched > 0 && (check || apply) {
        patch::check_all(desc, target).map_err(data_failure("verify the data"))?;
    }
    let mut composed = None;
    if apply {
        let composing = Instant::now();
        let done = patch::compose_all(desc, target).map_err(data_failure("apply the patches"))?;
        composed = Some((done, composing.elapsed().as_secs_f64()));
        if check {
            hashed(
                verify::check_dir(
                    desc,
                    target,
                    settings.threads,
                    verify::Pass::Composed,
                    None,
                    desc.profile.verify_first_start || copy_to.is_some(),
                )
                .map_err(data_failure("verify the data"))?,
            );
        }
    }
    // Said once the composed files are verified, so a failure stays one line.
    let compose_seconds = composed.map_or(0.0, |(done, seconds)| {
        eprintln!(
            "bakedb-init: composed {} under {} from {} ({}, {} written) in {seconds:.2} s",
            plural(done.files, "file"),
            copy_to.map_or_else(|| desc.data_dir.clone(), |c| c.display().to_string()),
            plural(done.patches, "patch"),
            plural(done.pages as usize, "page"),
            human(done.bytes),
        );
        seconds
    });
    if !check {
        return Ok(());
    }
    let seconds = started.elapsed().as_secs_f64() - compose_seconds;
    let index = if desc.page_index.is_empty() {
        String::new()
    } else {
        format!(
            " and {} ({})",
            plural(desc.page_index.len(), "page index file"),
            human(index_bytes)
        )
    };
    let patched = match (n_patched, apply, desc.profile.patches) {
        (0, _, _) => String::new(),
        (n, true, _) => format!(", {} of them composed", plural(n, "file")),
        (n, false, Some(PatchMode::InPlace)) => format!(
            ", {} as stored ({} reads their {} itself)",
            plural(n, "patched file"),
            desc.engine,
            plural(n_patches, "patch")
        ),
        (n, false, _) => format!(
            ", {} as stored (a start composes them with their {})",
            plural(n, "patched file"),
            plural(n_patches, "patch")
        ),
    };
    let rate = format!(
        "{:.0} MB/s, {}",
        (bytes + index_bytes) as f64 / seconds.max(1e-9) / 1e6,
        plural(threads.max(1), "thread")
    );
    if let Some(copy) = copy_to {
        // Every file is counted once, though a composed one was hashed twice (as stored
        // while copied, composed after).
        let (n_files, n_bytes, _) = verify::workload(desc, verify::Pass::Stored);
        let composed = match (n_patched, apply) {
            (0, _) => String::new(),
            (n, true) => format!(", {} of them composed there", plural(n, "file")),
            (n, false) => format!(", {} as stored", plural(n, "patched file")),
        };
        // The page index files are verified where they are, not copied: the engine never
        // reads them.
        let index = if desc.page_index.is_empty() {
            String::new()
        } else {
            format!(
                ", and verified {} ({}) in place,",
                plural(desc.page_index.len(), "page index file"),
                human(index_bytes)
            )
        };
        eprintln!(
            "bakedb-init: copied and verified {}, {} from {} into {}{composed}{index} in {seconds:.2} s ({rate})",
            plural(n_files, "file"),
            human(n_bytes),
            desc.data_dir,
            copy.display(),
        );
        return Ok(());
    }
    eprintln!(
        "bakedb-init: verified {}, {} under {}{patched}{index} in {seconds:.2} s ({rate})",
        plural(files, "file"),
        human(bytes),
        desc.data_dir,
    );
    Ok(())
}

fn run(options: Options) -> Result<std::convert::Infallible, Failure> {
    let settings = settings()?;
    // --verify-only checks the image as stored and writes nothing: no copy.
    let copy_dir = settings
        .copy_dir
        .clone()
        .filter(|_| options.mode != Mode::VerifyOnly);
    // A copy is always verified as it is made: hashing costs less than the copy itself, and
    // the copy's stamp says it was verified.
    let check = settings.verify || options.mode == Mode::VerifyOnly || copy_dir.is_some();
    if !settings.verify && options.mode == Mode::Run {
        eprintln!(
            "{}",
            if copy_dir.is_some() {
                "bakedb-init: warning: BAKEDB_VERIFY=off does not apply to BAKEDB_DATA_COPY_DIR: the copy is verified as it is made"
            } else {
                "bakedb-init: warning: BAKEDB_VERIFY=off: starting without checking the data against BAKEDB_DATA_DIGEST"
            }
        );
    }
    let desc = load_description(
        &options.root,
        &settings,
        check && options.mode != Mode::Plan,
    )?;
    // BAKEDB_DATA_COPY_WHEN=patched: an image without patches to compose runs in place (its
    // data was checked above all the same: a copy directory always means verification).
    let copy_dir = copy_dir.filter(|_| !settings.copy_only_patched || has_patches_to_apply(&desc));
    if let Some(copy) = &copy_dir {
        let data = Path::new(&desc.data_dir);
        if copy.starts_with(data) || data.starts_with(copy) {
            return Err(Failure::Usage(format!(
                "BAKEDB_DATA_COPY_DIR={} overlaps the image's data directory {}; mount the volume for the copy beside it, e.g. /var/lib/bakedb-copy",
                copy.display(),
                desc.data_dir
            )));
        }
    }
    // Where the engine finds its data: the image's data directory, or the copy.
    let engine_data_dir = copy_dir
        .as_ref()
        .map_or_else(|| desc.data_dir.clone(), |d| d.display().to_string());
    let identity = start::decide_identity(
        start::euid(),
        (desc.owner_uid, desc.owner_gid),
        settings.allow_root,
    );
    let supervise = settings.supervise_requested || desc.profile.supervise;
    let (mut env, passthrough) = env_vars();
    if let Identity::Drop { uid, .. } = identity {
        home_for(uid, &options.root, &mut env)?;
    }
    let launch = profile::prepare(
        &desc.profile,
        &options.command,
        &env,
        &engine_data_dir,
        &settings.runtime_dir,
    );
    if options.mode == Mode::Plan {
        print_plan(
            &desc,
            &settings,
            &options,
            &identity,
            &launch,
            supervise,
            copy_dir.as_deref(),
        );
        std::process::exit(0);
    }

    // Least privilege first: the data is hashed as the user that will serve it. --verify-only
    // starts nothing, so it reads as whoever runs it (e.g. root checking a private bundle).
    if let (Identity::Drop { uid, gid }, Mode::Run) = (&identity, &options.mode) {
        let (uid, gid) = (*uid, *gid);
        start::drop_to(uid, gid)
            .map_err(|e| Failure::Setup(format!("dropping root to the data owner: {e}")))?;
    }
    // An engine that writes into its data directory (postgres) verifies at the container's
    // first start only; the stamp lives in the data directory, so it goes wherever the
    // engine's own writes go (kept by `docker restart`, gone in a new container).
    let data_dir = options.root.join(desc.data_dir.trim_start_matches('/'));
    let apply = composes(&desc, &options.mode);
    if let Some(copy) = &copy_dir {
        start_copy(&desc, &settings, &options, &data_dir, copy, apply)?;
    } else {
        start_in_place(&desc, &settings, &options, &data_dir, check, apply)?;
    }
    if options.mode == Mode::VerifyOnly {
        std::process::exit(0);
    }

    match identity {
        Identity::RootAllowed => eprintln!(
            "bakedb-init: warning: running {} as root (BAKEDB_RUN_AS_ROOT=1)",
            launch.argv[0]
        ),
        Identity::Drop { uid, gid } => {
            eprintln!("bakedb-init: running as {uid}:{gid}, the data owner, instead of root")
        }
        _ => {}
    }
    profile::write_files(&launch).map_err(Failure::Setup)?;
    eprintln!("bakedb-init: {}", launch.summary());
    let program = start::resolve(&launch.argv[0], path_of(&launch.env))
        .map_err(|(code, m)| Failure::Exec(code, m))?;
    if supervise {
        let (code, message) = start::supervise(&program, &launch.argv, &launch.env, &passthrough);
        if let Some(message) = message {
            return Err(Failure::Exec(code, message));
        }
        std::process::exit(code);
    }
    let (code, message) = start::exec(&program, &launch.argv, &launch.env, &passthrough);
    Err(Failure::Exec(code, message))
}

/// The data in the image's data directory, as the engine will read it: verified (at every
/// start, or with a stamp at the container's first) and composed in place.
fn start_in_place(
    desc: &Description,
    settings: &Settings,
    options: &Options,
    data_dir: &Path,
    check: bool,
    apply: bool,
) -> Result<(), Failure> {
    // An engine that writes into its data directory (postgres) verifies at the container's
    // first start only; the stamp lives in the data directory, so it goes wherever the
    // engine's own writes go (kept by `docker restart`, gone in a new container).
    let stamp = data_dir.join(profile::VERIFIED_STAMP);
    let first_start_only = desc.profile.verify_first_start && options.mode == Mode::Run;
    // The stamp also means "composed" (it is written after the composed files were
    // verified), so it is read when verification is off too: composing again over what the
    // engine has written since would undo its writes.
    let done_before = match (
        first_start_only && (check || apply),
        settings.expected_digest.as_deref(),
    ) {
        (true, Some(digest)) => stamp_matches(&stamp, digest)?,
        _ => false,
    };
    if done_before {
        eprintln!(
            "bakedb-init: {} was {} at this container's first start ({} says so); {} has written to it since, so {}",
            desc.data_dir,
            if apply {
                "verified and its patches applied"
            } else {
                "verified"
            },
            stamp.display(),
            desc.engine,
            if apply {
                "nothing is verified or composed again"
            } else {
                "it is not verified again"
            }
        );
    } else {
        prepare_data(desc, settings, options, data_dir, check, apply, None)?;
        if check && first_start_only {
            let digest = settings.expected_digest.as_deref().unwrap_or_default();
            if let Err(e) = write_stamp(&stamp, digest) {
                eprintln!(
                    "bakedb-init: warning: cannot write {} ({e}): a restart of this container will verify{} again, and fail once {} has written to its data",
                    stamp.display(),
                    if apply { " and compose" } else { "" },
                    desc.engine
                );
            }
        }
    }
    Ok(())
}

/// BAKEDB_DATA_COPY_DIR (copy.rs): the data copied into `copy`, verified as it is read,
/// composed there, and stamped; or, on a restart that finds this image's stamp, used as the
/// engine left it.
fn start_copy(
    desc: &Description,
    settings: &Settings,
    options: &Options,
    data_dir: &Path,
    copy: &Path,
    apply: bool,
) -> Result<(), Failure> {
    let digest = settings
        .expected_digest
        .as_deref()
        .expect("load_description checked BAKEDB_DATA_DIGEST");
    match copy::state(copy, digest).map_err(Failure::Setup)? {
        copy::State::Done => {
            eprintln!(
                "bakedb-init: {} holds this image's data, copied and verified{} at this container's first start ({} says so); {} may have written to it since, so nothing is copied or verified again",
                copy.display(),
                if apply {
                    " and its patches applied"
                } else {
                    ""
                },
                copy.join(profile::VERIFIED_STAMP).display(),
                desc.engine
            );
            return Ok(());
        }
        copy::State::Unfinished(why) => {
            eprintln!("bakedb-init: {why}: removing it and copying again");
            copy::clear(copy).map_err(Failure::Setup)?;
        }
        copy::State::Empty => {}
    }
    copy::begin(copy).map_err(Failure::Setup)?;
    prepare_data(desc, settings, options, data_dir, true, apply, Some(copy))?;
    write_stamp(&copy.join(profile::VERIFIED_STAMP), digest).map_err(|e| {
        Failure::Setup(format!(
            "writing {}: {e}",
            copy.join(profile::VERIFIED_STAMP).display()
        ))
    })?;
    copy::finish(copy).map_err(Failure::Setup)
}

fn main() {
    start::exit_on_stop_signals();
    let args: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect()
    {
        Ok(args) => args,
        Err(bad) => {
            std::process::exit(Failure::Usage(format!("argument {bad:?} is not UTF-8")).report())
        }
    };
    let code = match parse_args(args).and_then(run) {
        Ok(never) => match never {},
        Err(failure) => failure.report(),
    };
    std::process::exit(code);
}
