//! Bad inputs. Each gets its documented exit code and a one-line message that names what is
//! wrong (the path, the digest, the tag) and, where there is something to do, says what; and
//! none of them changes an output: a layout that already holds a good tag and an archive stay
//! byte for byte as they were, and an output directory that did not exist still does not.
//!
//! Bad base images are made from a small base that bakedb itself built, by editing copies of
//! it the way damage or a broken tool would: a blob removed, a blob's bytes changed under its
//! digest name, a layer re-stored under a new digest with the manifest and index rewritten to
//! match (so that only the compressed stream itself is wrong), a manifest edited and
//! re-digested.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bakedb_testkit::fixtures::{break_page_types, indexed_db};
use serde_json::Value;

use crate::require;
use crate::util::{
    assert_tree_unchanged, bakedb, bakedb_as_nobody, copy_dir, make_db, make_rollback_db,
    require_root, run, run_ok, sqlite_build, stderr, test_dir, tool, tree, unbake,
};

// Exit codes, as documented.
const USAGE: i32 = 2;
const VERIFY_FAILED: i32 = 3;
const BAD_SOURCE: i32 = 4;
const BAD_BASE: i32 = 5;
const OUTPUT_NOT_WRITABLE: i32 = 6;
const EXISTS: i32 = 7;
const NOT_FOUND: i32 = 8;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A test directory holding `app.db` and `tiny.db`, a base layout `base` (tag v1, built from
/// tiny.db, without bakedb's marks in its config: bakedb refuses its own images as a base),
/// an output layout `out` that already holds tag `good`, and `arch/app.tar`, an oci-archive
/// with tag `good`.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = test_dir();
        let dir = tmp.path().to_owned();
        make_db(&dir.join("tiny.db"), 3);
        make_db(&dir.join("app.db"), 200);
        fs::create_dir(dir.join("arch")).unwrap();
        for (source, output) in [
            ("tiny.db", "oci:base:v1"),
            ("app.db", "oci:out:good"),
            ("app.db", "oci-archive:arch/app.tar:good"),
        ] {
            run_ok(bakedb(&dir).args([
                "build", "--quiet", "--engine", "sqlite", "--source", source, "--output", output,
            ]));
        }
        unbake(&dir.join("base"), "v1");
        Fixture { _tmp: tmp, dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `bakedb build --quiet --engine sqlite --source SOURCE --output OUTPUT EXTRA...` in the
    /// fixture's directory.
    fn build(&self, source: &str, output: &str, extra: &[&str]) -> Command {
        let mut cmd = bakedb(&self.dir);
        cmd.args(sqlite_build(source, output))
            .arg("--quiet")
            .args(extra);
        cmd
    }

    /// For a test that runs bakedb as uid 65534 through setpriv (root ignores permissions):
    /// the fixture, its directory set to `mode`, setpriv's path and `scratch`, writable by
    /// all (HOME and TMPDIR of `bakedb_as_nobody`). None skips the test (no setpriv, not
    /// root) locally; under CI that fails.
    fn for_nobody(mode: u32) -> Option<(Fixture, PathBuf, PathBuf)> {
        let setpriv = tool("setpriv")?;
        if !require_root() {
            return None;
        }
        let f = Fixture::new();
        set_mode(&f.dir, mode);
        let scratch = f.path("scratch");
        fs::create_dir(&scratch).unwrap();
        set_mode(&scratch, 0o777);
        Some((f, setpriv, scratch))
    }

    /// A copy of the base layout to damage.
    fn base_copy(&self, name: &str) -> PathBuf {
        let copy = self.path(name);
        copy_dir(&self.path("base"), &copy);
        copy
    }

    /// A copy of the base layout, `bad`, damaged by `damage` (given the copy and the digest of
    /// its first layer, it returns the digest the message must name): `--base oci:bad:v1`
    /// must be refused with exit 5, naming the layout, that digest and every needle.
    fn assert_damaged_base_refused(
        &self,
        needles: &[&str],
        damage: impl FnOnce(&Path, &str) -> String,
    ) {
        let bad = self.base_copy("bad");
        let layer = damage(&bad, &layer_digest(&bad, "v1", 0));
        let mut all = vec![layer.as_str(), "oci:bad"];
        all.extend(needles);
        self.assert_build_fails(
            &["--source", "app.db", "--base", "oci:bad:v1"],
            BAD_BASE,
            &all,
        );
    }

    /// `bakedb build --engine sqlite ARGS --output OUTPUT` must fail with `code` and a message
    /// mentioning every needle, for each kind of output: the layout holding `good` (a new tag),
    /// the archive (replacing it), and a layout directory that does not exist yet. Afterwards
    /// the first two are unchanged and the third still does not exist.
    fn assert_build_fails(&self, args: &[&str], code: i32, needles: &[&str]) {
        for (output, dir) in [
            ("oci:out:v2", "out"),
            ("oci-archive:arch/app.tar:good", "arch"),
            ("oci:fresh:v1", "fresh"),
        ] {
            let what = format!("bakedb build {} --output {output}", args.join(" "));
            let mut cmd = bakedb(&self.dir);
            cmd.args(["build", "--quiet", "--engine", "sqlite"])
                .args(args)
                .args(["--output", output]);
            fails_leaving(&mut cmd, &self.path(dir), code, needles, &what);
            if dir == "fresh" {
                assert!(
                    !self.path(dir).exists(),
                    "{what}: created {dir}/ and left it behind"
                );
            }
        }
    }
}

/// Run `cmd`: it must fail as `assert_failure` says and leave `dir` as it was. Its output.
fn fails_leaving(cmd: &mut Command, dir: &Path, code: i32, needles: &[&str], what: &str) -> Output {
    let before = tree(dir);
    let out = run(cmd);
    assert_failure(&out, code, needles, what);
    assert_tree_unchanged(dir, &before, what);
    out
}

/// Exit `code`, nothing on stdout, and one line on stderr, `bakedb: ...`, containing every
/// needle: that line.
pub(crate) fn assert_failure(out: &Output, code: i32, needles: &[&str], what: &str) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit code {code}, got {}\nstderr:\n{err}",
        out.status
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: printed on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.starts_with("bakedb: ") && err.ends_with('\n') && err.lines().count() == 1,
        "{what}: expected one line `bakedb: ...` on stderr, got:\n{err}"
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "{what}: the message should mention {needle:?}:\n{err}"
        );
    }
    err
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::util::sha256_hex(bytes))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").expect("a sha256 digest"))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Store `bytes` as a blob under its digest.
fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    fs::write(blob_path(layout, &digest), bytes).unwrap();
    digest
}

fn manifest(layout: &Path, tag: &str) -> Value {
    let index = read_json(&layout.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["annotations"][REF_NAME] == tag)
        .unwrap_or_else(|| panic!("no tag {tag}"));
    read_json(&blob_path(layout, entry["digest"].as_str().unwrap()))
}

fn layer_digest(layout: &Path, tag: &str, i: usize) -> String {
    manifest(layout, tag)["layers"][i]["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Edit the manifest `tag` points to, store the result under its own digest and point the tag
/// at it, as a tool that rewrote the image would: every digest on the way down stays right.
fn edit_manifest(layout: &Path, tag: &str, edit: impl FnOnce(&mut Value)) {
    let mut m = manifest(layout, tag);
    edit(&mut m);
    let bytes = serde_json::to_vec(&m).unwrap();
    let digest = put_blob(layout, &bytes);
    let mut index = read_json(&layout.join("index.json"));
    let entry = index["manifests"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["annotations"][REF_NAME] == tag)
        .unwrap();
    entry["digest"] = digest.into();
    entry["size"] = bytes.len().into();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

/// Store `bytes` as layer `i` of `tag` under their own digest and fix the manifest's descriptor
/// to match, leaving the config (and its diff_id) alone: every blob is what its descriptor
/// says, only the layer's content is wrong. Returns the new layer digest.
fn replace_layer_consistently(layout: &Path, tag: &str, i: usize, bytes: &[u8]) -> String {
    let old = layer_digest(layout, tag, i);
    let digest = put_blob(layout, bytes);
    edit_manifest(layout, tag, |m| {
        m["layers"][i]["digest"] = digest.clone().into();
        m["layers"][i]["size"] = bytes.len().into();
    });
    fs::remove_file(blob_path(layout, &old)).unwrap();
    digest
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn gzip(bytes: &[u8], level: u32) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Deterministic noise (xorshift64), for files that must look random.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect()
}

/// XOR the byte in the middle of a file with `mask`.
fn flip_middle_byte(path: &Path, mask: u8) {
    let mut bytes = fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= mask;
    fs::write(path, &bytes).unwrap();
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// `chmod -R`: directories get `dir_mode`, files `file_mode`.
fn set_modes_recursively(path: &Path, dir_mode: u32, file_mode: u32) {
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            set_modes_recursively(&entry.unwrap().path(), dir_mode, file_mode);
        }
        set_mode(path, dir_mode);
    } else {
        set_mode(path, file_mode);
    }
}

// --- sources ------------------------------------------------------------------------------

#[test]
fn missing_source() {
    let f = Fixture::new();
    f.assert_build_fails(
        &["--source", "nope.db"],
        BAD_SOURCE,
        &[
            "nope.db",
            "No such file",
            "pass the path of a SQLite database",
        ],
    );
}

#[test]
fn source_that_is_not_sqlite() {
    let f = Fixture::new();
    fs::write(
        f.path("notes.db"),
        "these are notes, not a database\n".repeat(100),
    )
    .unwrap();
    f.assert_build_fails(
        &["--source", "notes.db"],
        BAD_SOURCE,
        &["notes.db", "not a SQLite database"],
    );
    fs::write(f.path("empty.db"), b"").unwrap();
    f.assert_build_fails(
        &["--source", "empty.db"],
        BAD_SOURCE,
        &["empty.db", "empty"],
    );
    fs::create_dir(f.path("adir.db")).unwrap();
    // A directory is read as a snapshot directory written by `bakedb snapshot`.
    f.assert_build_fails(
        &["--source", "adir.db"],
        BAD_SOURCE,
        &[
            "adir.db: is a directory but not one written by `bakedb snapshot` (it has no snapshot.json)",
            "pass a SQLite database file",
        ],
    );
    // The usual mistake: the directory the database is in.
    fs::create_dir(f.path("data")).unwrap();
    fs::copy(f.path("tiny.db"), f.path("data/tiny.db")).unwrap();
    let out = run(&mut f.build("data", "oci:fresh:v1", &[]));
    assert_failure(
        &out,
        BAD_SOURCE,
        &["(it holds the SQLite database data/tiny.db: pass that file)"],
        "build of a directory holding a database",
    );
    // The directory is named once, not by the stage and again by the reason
    // ("reading snapshot directory data: source data: ...").
    let err = stderr(&out);
    assert!(
        err.starts_with("bakedb: reading the snapshot directory: source data: "),
        "{err}"
    );
}

#[test]
fn corrupt_source() {
    let f = Fixture::new();
    let path = f.path("bad.db");
    indexed_db(&path, 2000);
    // Scribble over two pages in the middle; the header (and page 1) stay intact.
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2 / 4096 * 4096;
    bytes[middle..middle + 8192].fill(0xA5);
    fs::write(&path, &bytes).unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    f.assert_build_fails(
        &["--source", "bad.db"],
        BAD_SOURCE,
        &["bad.db", "corrupt", "repair"],
    );
}

#[test]
fn encrypted_source() {
    // SQLCipher encrypts the header too: the file is indistinguishable from random bytes.
    let f = Fixture::new();
    fs::write(f.path("secret.db"), noise(64 << 10, 7)).unwrap();
    f.assert_build_fails(
        &["--source", "secret.db"],
        BAD_SOURCE,
        &["secret.db", "encrypted", "export a plain copy"],
    );
}

/// A WAL-mode database (no -wal/-shm files: its writer closed it) in a directory the user may
/// read but not write: SQLite cannot create the -shm file it needs to read it. Refusing is
/// right; blaming encryption or corruption is not: the message must point at the directory.
#[test]
fn wal_source_in_a_directory_the_user_cannot_write() {
    let Some((f, setpriv, scratch)) = Fixture::for_nobody(0o755) else {
        return;
    };
    make_db(&f.path("wal.db"), 10);
    assert!(
        !f.path("wal.db-shm").exists() && !f.path("wal.db-wal").exists(),
        "the writer closed wal.db cleanly"
    );
    let out = run(bakedb_as_nobody(&setpriv, &f.dir, &scratch)
        .args(sqlite_build("wal.db", "oci:scratch/out:v1"))
        .arg("--quiet"));
    if !out.status.success() {
        let err = assert_failure(
            &out,
            BAD_SOURCE,
            &["wal.db"],
            "build of a WAL database in a read-only directory",
        );
        assert!(
            !err.contains("encrypted") && !err.contains("corrupt"),
            "the database is neither encrypted nor corrupt: its directory is not writable, so SQLite cannot create wal.db-shm; the message should say so:\n{err}"
        );
        assert!(!f.path("scratch/out").exists());
    }
}

/// Corruption all over the file: SQLite's quick_check report runs to kilobytes. The message
/// shows the first five problems and counts the rest.
#[test]
fn corrupt_source_with_many_problems() {
    let f = Fixture::new();
    let path = f.path("broken.db");
    indexed_db(&path, 4000);
    // Break the page type of every other page after the first few: one problem per page.
    break_page_types(&path);
    let needles = [
        "broken.db",
        "is corrupt: PRAGMA quick_check found ",
        " more",
        "repair it (e.g. `sqlite3 broken.db .recover | sqlite3 repaired.db`)",
    ];
    f.assert_build_fails(&["--source", "broken.db"], BAD_SOURCE, &needles);
    let out = run(&mut f.build("broken.db", "oci:fresh:v1", &[]));
    let err = assert_failure(&out, BAD_SOURCE, &needles, "build of broken.db");
    assert!(err.len() < 1000, "{} bytes: {err}", err.len());
    assert_eq!(err.matches("btreeInitPage()").count(), 5, "{err}");
}

/// A writer holds its lock (rollback journal, BEGIN EXCLUSIVE) for the whole build: the
/// source is busy, not encrypted or corrupt, and nothing is written. That a longer
/// --busy-timeout waits for the writer is tested in snapshot.rs.
#[test]
fn source_locked_by_a_writer_is_busy() {
    let f = Fixture::new();
    make_rollback_db(&f.path("locked.db"), 10);
    let writer = rusqlite::Connection::open(f.path("locked.db")).unwrap();
    writer.execute_batch("BEGIN EXCLUSIVE").unwrap();
    f.assert_build_fails(
        &["--source", "locked.db", "--busy-timeout", "200ms"],
        BAD_SOURCE,
        &[
            "bakedb: taking the snapshot: source locked.db: is busy: another process holds a lock on it",
            "within the busy timeout of 200 ms",
            "--busy-timeout",
        ],
    );
    let out = run(bakedb(&f.dir).args([
        "snapshot",
        "--quiet",
        "--engine",
        "sqlite",
        "--source",
        "locked.db",
        "--out",
        "snap",
        "--busy-timeout",
        "0",
    ]));
    assert_failure(
        &out,
        BAD_SOURCE,
        &[
            "source locked.db: is busy",
            "within the busy timeout of 0 s",
        ],
        "bakedb snapshot of a locked source",
    );
    assert!(
        !f.path("snap").exists(),
        "the failed snapshot left snap/ behind"
    );
    let err = stderr(&out);
    assert!(
        !err.contains("encrypted") && !err.contains("corrupt"),
        "{err}"
    );
    writer.execute_batch("COMMIT").unwrap();
}

#[test]
fn busy_timeout_needs_a_unit_and_the_sqlite_engine() {
    let f = Fixture::new();
    let out = run(bakedb(&f.dir)
        .args(sqlite_build("app.db", "oci:fresh:v1"))
        .args(["--busy-timeout", "30"]));
    assert_eq!(out.status.code(), Some(USAGE), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("add a unit: ms, s, m or h"),
        "{}",
        stderr(&out)
    );
    let out = run(bakedb(&f.dir).args([
        "build",
        "--quiet",
        "--engine",
        "postgres",
        "--source",
        "postgresql://u@localhost/db",
        "--base",
        "oci:base:v1",
        "--output",
        "oci:fresh:v1",
        "--busy-timeout",
        "1s",
    ]));
    assert_failure(
        &out,
        USAGE,
        &["checking --busy-timeout: --busy-timeout is for --engine sqlite"],
        "build --engine postgres --busy-timeout",
    );
    assert!(!f.path("fresh").exists());
}

/// A writer killed in the middle of a transaction leaves a hot journal: SQLite must roll it
/// back, which needs a write bakedb never makes. The message names the journal and says what
/// to do, and doing it makes the build work.
#[test]
fn source_with_a_hot_journal_left_by_a_killed_writer() {
    let sqlite3 = require!("sqlite3");
    let f = Fixture::new();
    make_rollback_db(&f.path("crashed.db"), 3000);
    let mut writer = std::process::Command::new(&sqlite3)
        .arg("crashed.db")
        .current_dir(&f.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A small cache makes SQLite spill changed pages into the database file, their originals
    // into the journal, before the commit. stdin stays open: the transaction stays open.
    writer
        .stdin
        .as_mut()
        .unwrap()
        .write_all(
            b"PRAGMA cache_size = 10;\nBEGIN;\nUPDATE t SET v = v || hex(zeroblob(250));\n.shell touch update-done\n",
        )
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !f.path("update-done").exists() {
        assert!(
            writer.try_wait().unwrap().is_none(),
            "sqlite3 exited before the update ran"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "sqlite3 did not run the update"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    writer.kill().unwrap(); // SIGKILL: no rollback, no cleanup
    writer.wait().unwrap();
    let journal = f.path("crashed.db-journal");
    assert!(fs::metadata(&journal).unwrap().len() > 0);
    let before = (
        fs::read(f.path("crashed.db")).unwrap(),
        fs::read(&journal).unwrap(),
    );

    f.assert_build_fails(
        &["--source", "crashed.db"],
        BAD_SOURCE,
        &[
            "source crashed.db: has a hot rollback journal beside it, crashed.db-journal",
            "crashed or was killed in the middle of a transaction",
            "bakedb never writes a source",
            "`sqlite3 crashed.db 'PRAGMA quick_check'`",
        ],
    );
    assert!(
        (
            fs::read(f.path("crashed.db")).unwrap(),
            fs::read(&journal).unwrap()
        ) == before,
        "bakedb changed the source or its journal"
    );

    // The advice works: sqlite3 rolls the transaction back, then the build bakes the state
    // before it.
    let out = run_ok(
        std::process::Command::new(&sqlite3)
            .args(["crashed.db", "PRAGMA quick_check"])
            .current_dir(&f.dir),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    assert!(!journal.exists());
    run_ok(&mut f.build("crashed.db", "oci:out:v2", &[]));
}

// --- outputs ------------------------------------------------------------------------------

#[test]
fn output_under_a_regular_file() {
    let f = Fixture::new();
    fs::write(f.path("plain.txt"), "a file, not a directory\n").unwrap();
    for (output, needle) in [
        ("oci:plain.txt/layout:v1", "plain.txt/layout"),
        ("oci-archive:plain.txt/app.tar:v1", "plain.txt/app.tar"),
    ] {
        let what = format!("build --output {output}");
        let mut cmd = f.build("app.db", output, &[]);
        fails_leaving(&mut cmd, &f.dir, OUTPUT_NOT_WRITABLE, &[needle], &what);
    }
}

#[test]
fn output_under_proc() {
    let f = Fixture::new();
    let layout = format!("/proc/bakedb-e2e-{}/layout", std::process::id());
    let archive = format!("/proc/bakedb-e2e-{}.tar", std::process::id());
    for (output, needle) in [
        (format!("oci:{layout}:v1"), layout.clone()),
        (format!("oci-archive:{archive}:v1"), archive.clone()),
    ] {
        let what = format!("build --output {output}");
        let out = run(&mut f.build("app.db", &output, &[]));
        assert_failure(&out, OUTPUT_NOT_WRITABLE, &[&needle], &what);
    }
    assert!(!Path::new(&layout).exists() && !Path::new(&archive).exists());
}

/// As an unprivileged user (root ignores permissions): a directory it may not write to, an
/// existing layout and an existing archive it may read but not write.
#[test]
fn output_not_writable_by_the_user() {
    // Writable by all: SQLite needs to create app.db-shm to read a WAL database (see
    // wal_source_in_a_directory_the_user_cannot_write).
    let Some((f, setpriv, scratch)) = Fixture::for_nobody(0o777) else {
        return;
    };
    fs::create_dir(f.path("locked")).unwrap();
    set_mode(&f.path("locked"), 0o555);
    set_modes_recursively(&f.path("out"), 0o555, 0o444);
    set_modes_recursively(&f.path("arch"), 0o555, 0o444);
    for (output, dir, needle) in [
        ("oci:locked/layout:v1", "locked", "locked/layout"),
        ("oci:out:v2", "out", "out"),
        ("oci-archive:arch/app.tar:good", "arch", "arch/"),
    ] {
        let what = format!("build --output {output} as uid 65534");
        let mut cmd = bakedb_as_nobody(&setpriv, &f.dir, &scratch);
        cmd.args([
            "build", "--quiet", "--engine", "sqlite", "--source", "app.db", "--output", output,
        ]);
        let needles = [needle, "Permission denied"];
        fails_leaving(&mut cmd, &f.path(dir), OUTPUT_NOT_WRITABLE, &needles, &what);
    }
    // The read-only layout and archive still verify, for the same user.
    for reference in ["oci:out:good", "oci-archive:arch/app.tar:good"] {
        run_ok(bakedb_as_nobody(&setpriv, &f.dir, &scratch).args(["verify", "--quiet", reference]));
    }
}

/// A failed build into an existing empty directory (made by `mktemp -d`, or a mount point)
/// leaves it empty, as it leaves a layout that holds images unchanged.
#[test]
fn failed_build_leaves_an_existing_empty_directory_empty() {
    let f = Fixture::new();
    fs::create_dir(f.path("empty")).unwrap();
    fs::write(f.path("notes.db"), "not a database\n").unwrap();
    let base = f.base_copy("bad");
    fs::remove_file(blob_path(&base, &layer_digest(&base, "v1", 0))).unwrap();
    for args in [
        &["--source", "notes.db"][..],
        &["--source", "app.db", "--base", "oci:bad:v1"],
    ] {
        let what = format!("bakedb build {} --output oci:empty:v1", args.join(" "));
        let out = run(bakedb(&f.dir)
            .args(["build", "--quiet", "--engine", "sqlite"])
            .args(args)
            .args(["--output", "oci:empty:v1"]));
        assert!(!out.status.success(), "{what} succeeded");
        assert_tree_unchanged(&f.path("empty"), &Default::default(), &what);
    }
}

/// An output layout whose index.json a build could not update (cut short, not an index, an
/// entry without a digest) is refused when the output is opened: before the snapshot and
/// before any layer is written, not after (which left the blobs behind). One line, exit 6,
/// no progress line (nothing was started), the layout and TMPDIR untouched.
#[test]
fn output_with_an_invalid_index_json_is_refused_before_any_work() {
    let f = Fixture::new();
    fs::create_dir(f.path("tmp")).unwrap();
    for (text, reason) in [
        (r#"{"manifests":[{"digest":"sha256:"#, "EOF while parsing"),
        ("<html>not an index</html>", "expected value"),
        (
            r#"{"manifests":[{"digest":"md5:00"}]}"#,
            "has no valid sha256 digest",
        ),
    ] {
        let layout = f.path("bad");
        let _ = fs::remove_dir_all(&layout);
        copy_dir(&f.path("out"), &layout);
        fs::write(layout.join("index.json"), text).unwrap();
        let before = tree(&layout);
        let what = format!("build into a layout whose index.json is {text:?}");
        // Not --quiet: a progress line would show that work was started.
        let out = run(bakedb(&f.dir)
            .args(sqlite_build("app.db", "oci:bad:v2"))
            .env("TMPDIR", f.path("tmp")));
        assert_failure(
            &out,
            OUTPUT_NOT_WRITABLE,
            &[
                "bakedb: opening output oci:bad:v2: oci:bad: index.json is not valid: ",
                reason,
                "repair it, or build into another directory",
            ],
            &what,
        );
        assert_tree_unchanged(&layout, &before, &what);
        assert_tree_unchanged(&f.path("tmp"), &Default::default(), &what);
    }
}

/// The init and serve layers are byte-identical in every FROM-scratch image. A layout that
/// has them already must not need room for them again: with a file-size limit standing in
/// for a nearly full disk (no file may grow past 256 KiB; they are 0.7 and 2.3 MB
/// compressed), a build into the layout that has them succeeds, and the same build into a
/// new layout fails for want of room, leaving nothing behind.
#[test]
fn fixed_layers_the_layout_has_are_not_written_again() {
    use std::os::unix::process::CommandExt;
    let f = Fixture::new();
    let tight = |cmd: &mut std::process::Command| {
        // SAFETY: only async-signal-safe calls between fork and exec: ignoring SIGXFSZ (so a
        // write past the limit fails with EFBIG instead of killing) and setrlimit.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 256 << 10,
                    rlim_max: 256 << 10,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    };
    let mut cmd = f.build("tiny.db", "oci:out:v2", &[]);
    tight(&mut cmd);
    run_ok(&mut cmd);
    run_ok(bakedb(&f.dir).args(["verify", "--quiet", "oci:out:v2"]));

    let mut cmd = f.build("tiny.db", "oci:fresh:v1", &[]);
    tight(&mut cmd);
    let out = run(&mut cmd);
    assert_failure(
        &out,
        OUTPUT_NOT_WRITABLE,
        &[
            "writing the bakedb-init layer to oci:fresh:v1",
            "File too large",
        ],
        "a build into a new layout under the file-size limit",
    );
    assert!(!f.path("fresh").exists());
}

// --- base images --------------------------------------------------------------------------

#[test]
fn base_with_a_missing_blob() {
    Fixture::new().assert_damaged_base_refused(&["missing"], |bad, layer| {
        fs::remove_file(blob_path(bad, layer)).unwrap();
        layer.to_owned()
    });
}

/// A layer blob whose bytes are another valid gzip stream of the same tar: only the digest
/// tells.
#[test]
fn base_blob_content_does_not_match_its_digest() {
    Fixture::new().assert_damaged_base_refused(&["does not match"], |bad, layer| {
        let original = fs::read(blob_path(bad, layer)).unwrap();
        let recompressed = gzip(&gunzip(&original), 9);
        assert_ne!(recompressed, original);
        fs::write(blob_path(bad, layer), &recompressed).unwrap();
        layer.to_owned()
    });
}

/// One flipped bit in a stored layer blob: the blob is not the one its digest names. That is
/// what the message must say (the copy of the base is damaged), whatever else the damaged
/// bytes make the gzip decoder think.
#[test]
fn base_blob_with_a_flipped_bit() {
    Fixture::new().assert_damaged_base_refused(&["does not match"], |bad, layer| {
        flip_middle_byte(&blob_path(bad, layer), 0x10);
        layer.to_owned()
    });
}

/// The stored blob is cut short (an interrupted copy); manifest and index still describe the
/// whole blob, so its size alone shows that it is not the blob the digest names.
#[test]
fn base_blob_truncated() {
    Fixture::new().assert_damaged_base_refused(&["does not match"], |bad, layer| {
        let bytes = fs::read(blob_path(bad, layer)).unwrap();
        fs::write(blob_path(bad, layer), &bytes[..bytes.len() / 2]).unwrap();
        layer.to_owned()
    });
}

/// The image itself was made from a truncated gzip stream: blob, manifest and index all agree,
/// so only decompressing tells.
#[test]
fn base_layer_with_a_truncated_gzip_stream() {
    Fixture::new().assert_damaged_base_refused(&["truncated"], |bad, layer| {
        let bytes = fs::read(blob_path(bad, layer)).unwrap();
        replace_layer_consistently(bad, "v1", 0, &bytes[..bytes.len() - 20])
    });
}

/// A multi-member gzip layer cut at a member boundary is a valid, shorter gzip stream: only
/// the diff_id in the config shows that the tar inside is incomplete.
#[test]
fn base_layer_cut_at_a_gzip_member_boundary() {
    Fixture::new().assert_damaged_base_refused(&["diff_id"], |bad, layer| {
        let tar = gunzip(&fs::read(blob_path(bad, layer)).unwrap());
        let first_member = gzip(&tar[..tar.len() / 2], 6);
        replace_layer_consistently(bad, "v1", 0, &first_member)
    });
}

#[test]
fn base_layer_with_an_unknown_media_type() {
    let needles = [
        "unsupported media type",
        "application/vnd.example.layer.v1.tar+lz4",
    ];
    Fixture::new().assert_damaged_base_refused(&needles, |bad, layer| {
        edit_manifest(bad, "v1", |m| {
            m["layers"][0]["mediaType"] = "application/vnd.example.layer.v1.tar+lz4".into()
        });
        layer.to_owned()
    });
}

#[test]
fn several_images_and_no_tag() {
    let f = Fixture::new();
    let two = f.base_copy("two");
    make_db(&f.path("other.db"), 5);
    run_ok(&mut f.build("other.db", "oci:two:v2", &[]));
    let needles = ["oci:two", "2 images", "no tag", "v1, v2", ":TAG"];
    f.assert_build_fails(
        &["--source", "app.db", "--base", "oci:two"],
        BAD_BASE,
        &needles,
    );
    let before = tree(&two);
    for command in ["verify", "inspect"] {
        let out = run(bakedb(&f.dir).args([command, "--quiet", "oci:two"]));
        assert_failure(
            &out,
            NOT_FOUND,
            &needles,
            &format!("bakedb {command} oci:two"),
        );
    }
    let out = run(bakedb(&f.dir).args(["verify", "--quiet", "oci:two:v3"]));
    assert_failure(
        &out,
        NOT_FOUND,
        &["oci:two", "\"v3\"", "v1, v2"],
        "bakedb verify oci:two:v3",
    );
    assert_tree_unchanged(&two, &before, "verify and inspect");
}

/// An image bakedb built is no base: the new image would carry the old data and image.json
/// under the new ones, and init would exit 3 at every start (ENTRYPOINT /bakedb/init three
/// times over). Refused with exit 5, saying how it was recognised and what to do instead,
/// for a FROM-scratch image (drop --base), and for one built with --no-init on another base,
/// in each transport.
#[test]
fn base_that_bakedb_built_is_refused() {
    let f = Fixture::new();
    f.assert_build_fails(
        &["--source", "app.db", "--base", "oci:out:good"],
        BAD_BASE,
        &[
            "bakedb: checking base image oci:out:good: it is an image bakedb built (label io.bakedb.engine=sqlite, BAKEDB_DATA_DIGEST in its Env, ENTRYPOINT /bakedb/init)",
            "the image would never start",
            "build from the original base image instead: it was built FROM scratch, so drop --base",
            "--from",
        ],
    );
    f.assert_build_fails(
        &[
            "--source",
            "app.db",
            "--base",
            &format!("oci-archive:{}:good", f.path("arch/app.tar").display()),
        ],
        BAD_BASE,
        &["it is an image bakedb built", "drop --base"],
    );
    run_ok(&mut f.build(
        "tiny.db",
        "docker-archive:noinit.tar:noinit:v1",
        &["--base", "oci:base:v1", "--no-init", "--cmd", "sh"],
    ));
    f.assert_build_fails(
        &["--source", "app.db", "--base", "docker-archive:noinit.tar:noinit:v1"],
        BAD_BASE,
        &[
            "it is an image bakedb built (label io.bakedb.engine=sqlite, BAKEDB_DATA_DIGEST in its Env)",
            "pass the base image it was built on as --base",
        ],
    );
}

/// A file given as an archive that is not a tar (text, a gzip-compressed tar, nothing) or is
/// a tar cut short (a copy or download that did not finish): verify, inspect and --base say
/// so, naming the file and what to do, instead of the tar reader's "numeric field was not a
/// number" or a "manifest.json is missing" that sends the user looking for a file.
#[test]
fn archive_that_is_not_a_tar_or_is_truncated() {
    let f = Fixture::new();
    run_ok(&mut f.build("app.db", "docker-archive:whole.tar:app:v1", &[]));
    let whole = fs::read(f.path("whole.tar")).unwrap();
    // The archive's last entry starts at its last non-zero byte's 512-byte block or before;
    // cutting at half and just before the end-of-archive marker both leave a valid prefix.
    let last_data = whole.iter().rposition(|b| *b != 0).unwrap();
    let end_of_last_entry = (last_data + 1).next_multiple_of(512);
    for (name, bytes, needle) in [
        (
            "notes.tar",
            b"these are notes\n".repeat(100),
            "notes.tar is not a tar archive (its first 512 bytes are not a tar header)",
        ),
        (
            "gzipped.tar",
            gzip(&whole, 6),
            "gzipped.tar is not a tar archive (it is gzip-compressed: decompress it first)",
        ),
        (
            "half.tar",
            whole[..whole.len() / 2].to_vec(),
            "half.tar is truncated or incomplete: ",
        ),
        (
            "cut.tar",
            whole[..end_of_last_entry].to_vec(),
            "cut.tar is truncated or incomplete: it ends after entry ",
        ),
    ] {
        fs::write(f.path(name), &bytes).unwrap();
        let reference = format!("docker-archive:{name}");
        for (args, code) in [
            (vec!["verify", "--quiet", reference.as_str()], VERIFY_FAILED),
            (vec!["inspect", reference.as_str()], NOT_FOUND),
        ] {
            let what = format!("bakedb {}", args.join(" "));
            let out = run(bakedb(&f.dir).args(&args));
            let err = assert_failure(&out, code, &[&reference, needle], &what);
            assert!(
                !err.contains("numeric field") && !err.contains("manifest.json is missing"),
                "{what}: {err}"
            );
        }
        f.assert_build_fails(
            &["--source", "app.db", "--base", &reference],
            BAD_BASE,
            &[&format!("reading base image {reference}"), needle],
        );
    }
}

// --- tags and references ------------------------------------------------------------------

#[test]
fn existing_tag_with_no_overwrite() {
    let f = Fixture::new();
    make_db(&f.path("app2.db"), 300);
    fails_leaving(
        &mut f.build("app2.db", "oci:out:good", &["--no-overwrite"]),
        &f.path("out"),
        EXISTS,
        &["oci:out", "\"good\"", "--no-overwrite"],
        "build --no-overwrite onto tag good",
    );
}

/// The archive exists (holding tag good): a build of any tag would replace it.
#[test]
fn existing_archive_with_no_overwrite() {
    let f = Fixture::new();
    make_db(&f.path("app2.db"), 300);
    let out = fails_leaving(
        &mut f.build(
            "app2.db",
            "oci-archive:arch/app.tar:other",
            &["--no-overwrite"],
        ),
        &f.path("arch"),
        EXISTS,
        &["arch/app.tar", "--no-overwrite"],
        "build --no-overwrite onto an existing archive",
    );
    assert!(
        !stderr(&out).contains("tag \"other\""),
        "the archive holds tag good, not other, yet the message says:\n{}",
        stderr(&out)
    );
}

#[test]
fn existing_tag_is_replaced_and_other_tags_kept() {
    let f = Fixture::new();
    run_ok(&mut f.build("tiny.db", "oci:out:keep", &[]));
    let index_before = read_json(&f.path("out/index.json"));
    let entry = |index: &Value, tag: &str| {
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["annotations"][REF_NAME] == tag)
            .cloned()
    };
    make_db(&f.path("app2.db"), 300);
    run_ok(&mut f.build("app2.db", "oci:out:good", &[]));
    let index_after = read_json(&f.path("out/index.json"));
    assert_eq!(
        index_after["manifests"].as_array().unwrap().len(),
        2,
        "{index_after}"
    );
    assert_ne!(
        entry(&index_after, "good").unwrap()["digest"],
        entry(&index_before, "good").unwrap()["digest"],
        "tag good was not replaced"
    );
    assert_eq!(
        entry(&index_after, "keep"),
        entry(&index_before, "keep"),
        "tag keep changed"
    );
    for reference in ["oci:out:good", "oci:out:keep"] {
        run_ok(bakedb(&f.dir).args(["verify", "--quiet", reference]));
    }
}

#[test]
fn bad_reference_syntax() {
    let f = Fixture::new();
    for (output, needle) in [
        ("bogus", "oci:DIR:TAG"),
        ("docker:example/app:1", "starts with docker://"),
        ("docker://registry.example/App:1", "lower-case"),
        ("docker://registry.example/app:bad tag", "tag"),
        (
            "docker://registry.example/app@sha256:123",
            "not a sha256 digest",
        ),
        ("dir:out", "unknown transport"),
        ("oci:", "path is empty"),
        ("oci:out:bad tag", "tag"),
        ("oci:out:-x", "tag"),
        ("oci:out", "needs a tag"),
        ("docker-archive:app.tar:Upper:1", "NAME:TAG"),
    ] {
        fails_leaving(
            &mut f.build("app.db", output, &[]),
            &f.dir,
            USAGE,
            &[&format!("{output:?}"), needle, "output"],
            &format!("build --output {output}"),
        );
    }
    let before = tree(&f.dir);
    for base in ["nonsense", "oci:base:bad/tag"] {
        let out = run(&mut f.build("app.db", "oci:fresh:v1", &["--base", base]));
        assert_failure(
            &out,
            USAGE,
            &[&format!("{base:?}"), "--base"],
            &format!("build --base {base}"),
        );
    }
    for command in ["verify", "inspect"] {
        let out = run(bakedb(&f.dir).args([command, "--quiet", "nonsense"]));
        assert_failure(
            &out,
            USAGE,
            &["\"nonsense\"", "oci:DIR:TAG"],
            &format!("bakedb {command} nonsense"),
        );
    }
    assert_tree_unchanged(&f.dir, &before, "bad references");
}

/// SOURCE_DATE_EPOCH beyond what a tar header's mtime holds (2242) or RFC 3339's four-digit
/// years (a year-10000 `created` that skopeo and umoci cannot parse), or before 1970: refused
/// up front with the allowed range, for build and snapshot, and nothing is written. The last
/// second allowed bakes an image skopeo reads, with that mtime in its layers.
#[test]
fn source_date_epoch_beyond_what_tar_and_rfc3339_hold() {
    let f = Fixture::new();
    let before = tree(&f.dir);
    for epoch in ["253402300800", "8589934592", "-1", "soon"] {
        for args in [
            &sqlite_build("app.db", "oci:fresh:v1")[..],
            &[
                "snapshot", "--engine", "sqlite", "--source", "app.db", "--out", "snap",
            ],
        ] {
            let what = format!("SOURCE_DATE_EPOCH={epoch} bakedb {}", args[0]);
            let out = run(bakedb(&f.dir)
                .env("SOURCE_DATE_EPOCH", epoch)
                .args(args)
                .arg("--quiet"));
            assert_failure(
                &out,
                USAGE,
                &[
                    "bakedb: reading SOURCE_DATE_EPOCH: SOURCE_DATE_EPOCH=",
                    &format!("{epoch:?}"),
                    "from 0 (1970-01-01T00:00:00Z) to 8589934591 (2242-03-16T12:56:31Z)",
                ],
                &what,
            );
            assert_tree_unchanged(&f.dir, &before, &what);
        }
    }
    let skopeo = require!("skopeo");
    run_ok(
        f.build("app.db", "oci:last:v1", &[])
            .env("SOURCE_DATE_EPOCH", "8589934591"),
    );
    let out = run_ok(
        std::process::Command::new(&skopeo)
            .current_dir(&f.dir)
            .args(["inspect", "oci:last:v1"]),
    );
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Created"], "2242-03-16T12:56:31Z", "{inspected}");
    let data_layer = layer_digest(&f.path("last"), "v1", 2);
    let tar = gunzip(&fs::read(blob_path(&f.path("last"), &data_layer)).unwrap());
    let mut archive = tar::Archive::new(&tar[..]);
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            entry.header().mtime().unwrap(),
            8_589_934_591,
            "{:?}",
            entry.path()
        );
    }
}

// --- output streams -----------------------------------------------------------------------

/// `bakedb inspect REF | head -1`: the reader goes away and the next write gets EPIPE. That is
/// not a failure (ripgrep's rule): exit 0, nothing on stderr, no panic. stdout here is a pipe
/// whose read end is closed before bakedb starts, so every write to it fails, at once.
/// A build whose stderr (progress) is a closed pipe too still writes its image.
#[test]
fn a_closed_stdout_is_success_not_a_panic() {
    let f = Fixture::new();
    let closed_pipe = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let build_v3 = [&sqlite_build("tiny.db", "oci:out:v3")[..], &["--json"]].concat();
    for args in [
        &["inspect", "oci:out:good"][..],
        &["inspect", "--json", "oci:out:good"],
        &["inspect", "oci-archive:arch/app.tar:good"],
        &["verify", "--json", "oci:out:good"],
        &sqlite_build("tiny.db", "oci:out:v2"),
        &build_v3,
        &["--help"],
        &["--version"],
    ] {
        let what = format!("bakedb {} >closed-pipe", args.join(" "));
        let out = run(bakedb(&f.dir).args(args).stdout(closed_pipe()));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{what}: {}\n{err}", out.status);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{what}:\n{err}"
        );
        if args[0] != "build" {
            assert!(err.is_empty(), "{what}: printed on stderr:\n{err}");
        }
    }
    for tag in ["v2", "v3"] {
        run_ok(bakedb(&f.dir).args(["verify", "--quiet", &format!("oci:out:{tag}")]));
    }
    let out = run(bakedb(&f.dir)
        .args(sqlite_build("tiny.db", "oci:out:v4"))
        .stdout(closed_pipe())
        .stderr(closed_pipe()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "build >closed 2>closed: {}",
        out.status
    );
    run_ok(bakedb(&f.dir).args(["verify", "--quiet", "oci:out:v4"]));
}

// --- verify -------------------------------------------------------------------------------

#[test]
fn verify_finds_a_tampered_layer() {
    let f = Fixture::new();
    run_ok(bakedb(&f.dir).args(["verify", "--quiet", "oci:out:good"]));
    let layout = f.path("out");
    let layers = manifest(&layout, "good")["layers"]
        .as_array()
        .unwrap()
        .clone();
    // The data layer (the largest): flip one byte in its middle.
    let data = layers.iter().max_by_key(|l| l["size"].as_u64()).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    flip_middle_byte(&blob_path(&layout, &data), 0xff);
    let before = tree(&layout);
    let out = run(bakedb(&f.dir).args(["verify", "--quiet", "oci:out:good"]));
    assert_failure(
        &out,
        VERIFY_FAILED,
        &[&data, "oci:out"],
        "verify of a tampered layer",
    );
    assert_tree_unchanged(&layout, &before, "verify");
}

/// A base image in the very layout the build writes to (images:base, images:app), one of whose
/// layer blobs has rotted: the build must check it as it checks a base anywhere else, instead
/// of taking the blob file's name and size for its content and baking a broken image.
#[test]
fn damaged_base_in_the_output_layout() {
    let f = Fixture::new();
    let layout = f.path("out");
    unbake(&layout, "good");
    let data = layer_digest(&layout, "good", 0);
    flip_middle_byte(&blob_path(&layout, &data), 0xff);
    let before = tree(&layout);
    let what = "build --base oci:out:good --output oci:out:v2 with a damaged layer blob";
    let out = run(&mut f.build("tiny.db", "oci:out:v2", &["--base", "oci:out:good"]));
    if out.status.success() {
        let verify = run(bakedb(&f.dir).args(["verify", "--quiet", "oci:out:v2"]));
        panic!(
            "{what}: exit 0, and the image it wrote fails verification (exit {:?}): {}",
            verify.status.code(),
            stderr(&verify)
        );
    }
    assert_failure(&out, BAD_BASE, &[&data], what);
    assert_tree_unchanged(&layout, &before, what);
}
