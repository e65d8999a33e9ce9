//! SIGKILL at random moments. A build killed anywhere (snapshot, data layer, config, manifest,
//! the index.json replace, the archive rename) leaves the output as it was or as the finished
//! build would have left it, never in between: a layout's tags keep verifying and index.json
//! keeps parsing, an archive is absent or a complete one, and the next build succeeds and
//! cleans up after the dead one.
//!
//! The kill times come from a seeded PRNG spread over the measured duration of one full build
//! (set BAKEDB_CRASH_SEED to replay a run): a kill schedule, not a timing assertion.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::util::{bakedb, make_big_db, make_db, run_ok, test_dir};

/// The database killed builds bake: big enough that a build takes a moment.
const BIG_MIB: usize = 32;
/// Kills per loop, and the wall-clock budget after which a loop stops early (never before
/// MIN_KILLS), so a slow machine makes the test weaker rather than endless.
const LAYOUT_KILLS: usize = 24;
const ARCHIVE_KILLS: usize = 10;
const MIN_KILLS: usize = 8;
const LOOP_BUDGET: Duration = Duration::from_secs(20);

/// splitmix64: small, seedable, good enough to spread kill times.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("BAKEDB_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0xba4e_db5e_ed00_0001);
        eprintln!("crash schedule seed {seed} (BAKEDB_CRASH_SEED={seed} replays it)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A kill delay: mostly spread over the whole build, sometimes bunched near its end, where
    /// the commit (config, manifest, index.json or archive rename) happens in a few ms.
    fn kill_delay(&mut self, full_build: Duration) -> Duration {
        if self.unit() < 0.25 {
            full_build.mul_f64(0.8 + 0.3 * self.unit())
        } else {
            full_build.mul_f64(1.1 * self.unit())
        }
    }
}

/// A test directory with `small.db`, `big.db` and a private TMPDIR for the builds.
struct Bench {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        let tmp = test_dir();
        let dir = tmp.path().to_owned();
        make_db(&dir.join("small.db"), 20);
        make_big_db(&dir.join("big.db"), BIG_MIB);
        fs::create_dir(dir.join("tmp")).unwrap();
        Bench { _tmp: tmp, dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn build(&self, source: &str, output: &str) -> Command {
        let mut cmd = bakedb(&self.dir);
        cmd.args([
            "build", "--quiet", "--engine", "sqlite", "--source", source, "--output", output,
        ])
        .env("TMPDIR", self.path("tmp"));
        cmd
    }

    fn verify(&self, reference: &str, context: &dyn Fn() -> String) {
        let out = crate::util::run(bakedb(&self.dir).args(["verify", "--quiet", reference]));
        assert!(
            out.status.success(),
            "bakedb verify {reference} failed after {}:\n{}",
            context(),
            crate::util::stderr(&out)
        );
    }

    /// One full build, timed: the span the kill delays are spread over.
    fn timed_build(&self, source: &str, output: &str) -> Duration {
        let started = Instant::now();
        run_ok(&mut self.build(source, output));
        started.elapsed()
    }

    /// Start a build and SIGKILL it after `delay` (unless it finished first); the build's
    /// stderr goes to `log` so a build that failed on its own can be told from a killed one.
    fn build_and_kill(&self, source: &str, output: &str, delay: Duration, log: &Path) -> Killed {
        let mut child = self
            .build(source, output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .expect("start bakedb");
        std::thread::sleep(delay);
        // Child::kill sends SIGKILL; on a child that already exited it does nothing.
        let _ = child.kill();
        let status = child.wait().unwrap();
        Killed { status, delay }
    }
}

struct Killed {
    status: ExitStatus,
    delay: Duration,
}

impl Killed {
    fn describe(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        match self.status.signal() {
            Some(9) => format!("killed after {:?}", self.delay),
            _ => format!(
                "finished ({}) before the kill at {:?}",
                self.status, self.delay
            ),
        }
    }

    /// A build that ended by itself must have succeeded: leftovers of an earlier kill must
    /// never make the next build fail.
    fn assert_not_failed(&self, log: &Path, context: &dyn Fn() -> String) {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            self.status.success() || self.status.signal() == Some(9),
            "a build failed by itself ({}) after {}:\n{}",
            self.status,
            context(),
            fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// Names in `dir` starting with `prefix`.
fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn tags(layout: &Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap())
            .unwrap_or_else(|e| panic!("{}/index.json does not parse: {e}", layout.display()));
    index["manifests"]
        .as_array()
        .expect("index.json has a manifests array")
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .expect("every entry is tagged")
                .to_owned()
        })
        .collect()
}

/// A layout holding a verified tag `old`; builds of a 32 MiB database into it, tagged `old`
/// (replacing it) or `new`, each killed at a random moment. After every kill index.json parses,
/// holds no tags but old and new, and `old` verifies (as the old or the replacing image).
#[test]
fn sigkill_during_builds_into_a_layout() {
    let bench = Bench::new();
    run_ok(&mut bench.build("small.db", "oci:layout:old"));
    bench.verify("oci:layout:old", &|| "the first build".into());
    let full = bench.timed_build("big.db", "oci:measure:new");
    let mut rng = Rng::from_env();
    let log = bench.path("build.log");
    let mut history: Vec<String> = Vec::new();
    let started = Instant::now();
    for i in 0..LAYOUT_KILLS {
        if i >= MIN_KILLS && started.elapsed() > LOOP_BUDGET {
            break;
        }
        let tag = if rng.unit() < 1.0 / 3.0 { "old" } else { "new" };
        let killed = bench.build_and_kill(
            "big.db",
            &format!("oci:layout:{tag}"),
            rng.kill_delay(full),
            &log,
        );
        history.push(format!("build #{i} of tag {tag} {}", killed.describe()));
        let context = || {
            format!(
                "a full build took {full:?}; then:\n  {}",
                history.join("\n  ")
            )
        };
        killed.assert_not_failed(&log, &context);
        let tags = tags(&bench.path("layout"));
        assert!(
            tags.iter().any(|t| t == "old") && tags.iter().all(|t| t == "old" || t == "new"),
            "tags {tags:?} after {}",
            context()
        );
        bench.verify("oci:layout:old", &context);
    }
    eprintln!(
        "{} builds killed or finished (a full build took {full:?}):\n  {}",
        history.len(),
        history.join("\n  ")
    );

    // The next build succeeds and removes the dead builds' temp files; every tag verifies.
    run_ok(&mut bench.build("big.db", "oci:layout:new"));
    for reference in ["oci:layout:old", "oci:layout:new"] {
        bench.verify(reference, &|| "the final build".into());
    }
    let stale = entries_starting_with(&bench.path("layout/blobs/sha256"), "tmp.");
    assert!(
        stale.is_empty(),
        "temp blobs of killed builds are still there after the next build: {stale:?}"
    );
}

/// oci-archive output: a killed first build leaves no archive (or, killed too late to matter,
/// the complete one); a killed rebuild leaves the old archive byte for byte (or the complete
/// new one). The new archive's bytes are known in advance: the build is reproducible.
#[test]
fn sigkill_during_builds_of_an_archive() {
    let bench = Bench::new();
    fs::create_dir(bench.path("out")).unwrap();
    let full = bench.timed_build("big.db", "oci-archive:reference.tar:v1");
    let new_bytes = fs::read(bench.path("reference.tar")).unwrap();
    bench.verify("oci-archive:reference.tar:v1", &|| {
        "the reference build".into()
    });
    let archive = bench.path("out/app.tar");
    let mut rng = Rng::from_env();
    let log = bench.path("build.log");
    let mut history: Vec<String> = Vec::new();

    // First builds: nothing there before.
    for i in 0..3 {
        let killed = bench.build_and_kill(
            "big.db",
            "oci-archive:out/app.tar:v1",
            rng.kill_delay(full),
            &log,
        );
        history.push(format!("first build #{i} {}", killed.describe()));
        let context = || {
            format!(
                "a full build took {full:?}; then:\n  {}",
                history.join("\n  ")
            )
        };
        killed.assert_not_failed(&log, &context);
        if archive.exists() {
            assert!(
                fs::read(&archive).unwrap() == new_bytes,
                "out/app.tar is there but is not the complete archive after {}",
                context()
            );
            fs::remove_file(&archive).unwrap();
        }
    }

    // Rebuilds over a complete old archive.
    run_ok(&mut bench.build("small.db", "oci-archive:out/app.tar:v1"));
    bench.verify("oci-archive:out/app.tar:v1", &|| {
        "the old archive's build".into()
    });
    let old_bytes = fs::read(&archive).unwrap();
    let started = Instant::now();
    for i in 0..ARCHIVE_KILLS {
        if i >= MIN_KILLS && started.elapsed() > LOOP_BUDGET {
            break;
        }
        let killed = bench.build_and_kill(
            "big.db",
            "oci-archive:out/app.tar:v1",
            rng.kill_delay(full),
            &log,
        );
        history.push(format!("rebuild #{i} {}", killed.describe()));
        let context = || {
            format!(
                "a full build took {full:?}; then:\n  {}",
                history.join("\n  ")
            )
        };
        killed.assert_not_failed(&log, &context);
        let bytes = fs::read(&archive)
            .unwrap_or_else(|e| panic!("out/app.tar is gone ({e}) after {}", context()));
        assert!(
            bytes == old_bytes || bytes == new_bytes,
            "out/app.tar is neither the old nor the new archive after {}",
            context()
        );
    }
    eprintln!(
        "{} builds killed or finished (a full build took {full:?}):\n  {}",
        history.len(),
        history.join("\n  ")
    );
    run_ok(&mut bench.build("big.db", "oci-archive:out/app.tar:v1"));
    assert!(
        fs::read(&archive).unwrap() == new_bytes,
        "the final build wrote different bytes than the reference build"
    );
}

/// What killed builds leave outside the blob store: their snapshot scratch directory in
/// TMPDIR (a full copy of the database), an archive's staging layout and temp file beside the
/// archive, a layout's index.json temp file. The next build must clean them up, as it does
/// temp blobs; otherwise every crash costs a database's worth of disk, for good.
#[test]
fn killed_builds_leave_nothing_behind() {
    let bench = Bench::new();
    fs::create_dir(bench.path("out")).unwrap();
    run_ok(&mut bench.build("small.db", "oci:layout:old"));
    run_ok(&mut bench.build("small.db", "oci-archive:out/app.tar:v1"));
    let full = bench.timed_build("big.db", "oci:measure:new");
    let log = bench.path("build.log");
    // Kills at fixed points of the build: the scratch directory and the staging layout exist
    // for nearly all of it.
    for fraction in [0.3, 0.6] {
        for output in ["oci:layout:new", "oci-archive:out/app.tar:v1"] {
            let killed = bench.build_and_kill("big.db", output, full.mul_f64(fraction), &log);
            killed.assert_not_failed(&log, &|| format!("a kill at {fraction} of {full:?}"));
        }
    }
    // What a build killed between writing index.json's temp file and renaming it leaves
    // (named as bakedb names it), from a process that is certainly gone.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    fs::write(
        bench.path(&format!("layout/tmp.index.json.{dead_pid}.0")),
        b"{\"schemaVersion\":2,",
    )
    .unwrap();

    run_ok(&mut bench.build("big.db", "oci:layout:new"));
    run_ok(&mut bench.build("big.db", "oci-archive:out/app.tar:v1"));
    let mut leftovers = Vec::new();
    for (dir, prefix) in [
        ("tmp", ""),
        ("out", "."),
        ("out", "tmp."),
        ("layout", "tmp."),
        ("layout", ".bakedb"),
        ("layout/blobs/sha256", "tmp."),
        ("layout/blobs/sha256", "."),
    ] {
        leftovers.extend(
            entries_starting_with(&bench.path(dir), prefix)
                .into_iter()
                .map(|n| format!("{dir}/{n}")),
        );
    }
    assert!(
        leftovers.is_empty(),
        "left behind by killed builds, and still there after the next successful builds:\n  {}",
        leftovers.join("\n  ")
    );
}

/// Wait (bounded) until `dir` holds a file whose name starts with `prefix` and that has at
/// least `bytes`: a build is then in the middle of writing a layer. Fails the test if the
/// build ends first.
fn wait_for_temp_file(child: &mut std::process::Child, dir: &Path, prefix: &str, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let big_enough = fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with(prefix)
                && e.metadata().is_ok_and(|m| m.len() >= bytes)
        });
        if big_enough {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the build ended ({status}) before a {prefix}* file of {bytes} bytes showed in {}",
                dir.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix}* file of {bytes} bytes in {} after 120 s",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every name in `dir` is a sha256 digest: nothing a reader of blobs/sha256 could trip on.
fn assert_only_digests(dir: &Path, context: &str) {
    for name in entries_starting_with(dir, "") {
        assert!(
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            "{context}: {}/{name} is not a blob",
            dir.display()
        );
    }
}

/// A build killed in the middle of a layer leaves its temp file where no OCI reader looks
/// (`.bakedb-tmp/` in a layout; beside an archive, only the hidden staging layout), never in
/// blobs/sha256 or as a visible file beside an archive. The layout still verifies, and
/// verify names the leftovers and their size as a warning (exit 0); skopeo, oci-image-tool and
/// umoci gc work on it as if nothing were there; the next build into the layout removes them.
/// Likewise the next archive build in that directory removes a dead staging layout, whatever
/// archive it was for. Untagged blobs are reported too, until `umoci gc` removes them.
#[test]
fn a_killed_build_leaves_temp_files_out_of_sight_and_verify_reports_them() {
    let bench = Bench::new();
    run_ok(&mut bench.build("small.db", "oci:layout:old"));
    let mut child = bench
        .build("big.db", "oci:layout:new")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_temp_file(
        &mut child,
        &bench.path("layout/.bakedb-tmp"),
        "blob.",
        1 << 20,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let layout = bench.path("layout");
    let mut top = entries_starting_with(&layout, "");
    top.sort();
    assert_eq!(top, [".bakedb-tmp", "blobs", "index.json", "oci-layout"]);
    assert_only_digests(&layout.join("blobs/sha256"), "after the kill");

    let out = run_ok(bakedb(&bench.dir).args(["verify", "oci:layout:old"]));
    let err = crate::util::stderr(&out);
    let warning = err
        .lines()
        .find(|l| l.starts_with("bakedb: warning: oci:layout: "))
        .unwrap_or_else(|| panic!("verify says nothing of the killed build's temp file:\n{err}"));
    for needle in [
        "of builds that were killed, ",
        "MiB in all: ",
        ": layout/.bakedb-tmp/blob.",
        "the next `bakedb build` into oci:layout removes them",
    ] {
        assert!(warning.contains(needle), "{needle:?} not in: {warning}");
    }
    let out = run_ok(bakedb(&bench.dir).args(["verify", "--json", "oci:layout:old"]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["ok"] == true && report["garbage"]["temp_bytes"].as_u64() >= Some(1 << 20),
        "{report}"
    );
    // Readers do not see the leftovers: skopeo copies the image out, oci-image-tool
    // validates the layout, and umoci gc runs (it failed on a tmp.blob.* in blobs/sha256:
    // "invalid checksum digest length") and leaves .bakedb-tmp alone.
    if let Some(skopeo) = crate::util::tool("skopeo") {
        run_ok(Command::new(skopeo).current_dir(&bench.dir).args([
            "copy",
            "--quiet",
            "oci:layout:old",
            "oci:copied:old",
        ]));
    }
    if let Some(tool) = crate::util::tool("oci-image-tool") {
        run_ok(
            Command::new(tool)
                .current_dir(&bench.dir)
                .args(["validate", "--type", "image", "layout"]),
        );
    }
    if let Some(umoci) = crate::util::tool("umoci") {
        run_ok(
            Command::new(umoci)
                .current_dir(&bench.dir)
                .args(["gc", "--layout", "layout"]),
        );
    }
    bench.verify("oci:layout:old", &|| {
        "umoci gc with the leftovers there".into()
    });

    // The next build into the layout, of anything, removes them; verify is quiet again.
    run_ok(&mut bench.build("small.db", "oci:layout:other"));
    assert!(!layout.join(".bakedb-tmp").exists());
    let out = run_ok(bakedb(&bench.dir).args(["verify", "oci:layout:old"]));
    assert!(
        !crate::util::stderr(&out).contains("warning"),
        "{}",
        crate::util::stderr(&out)
    );

    // Untagging leaves blobs no tag references: reported until umoci gc removes them.
    if let Some(umoci) = crate::util::tool("umoci") {
        run_ok(Command::new(&umoci).current_dir(&bench.dir).args([
            "rm",
            "--image",
            "layout:other",
        ]));
        let out = run_ok(bakedb(&bench.dir).args(["verify", "oci:layout:old"]));
        let err = crate::util::stderr(&out);
        assert!(
            err.contains(" no tag references, ")
                && err.contains("`umoci gc --layout layout` removes them"),
            "{err}"
        );
        run_ok(
            Command::new(&umoci)
                .current_dir(&bench.dir)
                .args(["gc", "--layout", "layout"]),
        );
        let out = run_ok(bakedb(&bench.dir).args(["verify", "oci:layout:old"]));
        assert!(!crate::util::stderr(&out).contains("warning"));
    }

    // Archives: only the hidden staging layout is left beside them, and any archive build
    // in that directory removes it.
    fs::create_dir(bench.path("out")).unwrap();
    run_ok(&mut bench.build("small.db", "oci-archive:out/other.tar:v1"));
    let mut child = bench
        .build("big.db", "oci-archive:out/app.tar:v1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = bench.path(&format!("out/.app.tar.bakedb-staging.{}", child.id()));
    wait_for_temp_file(&mut child, &staging.join(".bakedb-tmp"), "blob.", 1 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut beside = entries_starting_with(&bench.path("out"), "");
    beside.sort();
    assert_eq!(
        beside,
        [
            staging.file_name().unwrap().to_string_lossy().into_owned(),
            "other.tar".into()
        ]
    );
    let out = run_ok(bakedb(&bench.dir).args(["verify", "oci-archive:out/other.tar:v1"]));
    let err = crate::util::stderr(&out);
    assert!(
        err.contains("bakedb: warning: oci-archive:out/other.tar: 1 temporary file of builds that were killed")
            && err.contains(&format!(
                ": out/{} (",
                staging.file_name().unwrap().to_string_lossy()
            ))
            && err.contains("the next `bakedb build` of an archive into that directory removes them"),
        "{err}"
    );
    run_ok(&mut bench.build("small.db", "oci-archive:out/other.tar:v2"));
    assert_eq!(entries_starting_with(&bench.path("out"), ""), ["other.tar"]);
}
