//! bakedb-init as a process, without a container: `--root` points it at a directory laid out
//! like an image's rootfs. The container runtimes are exercised by tests/e2e/init.rs.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

struct Root {
    dir: PathBuf,
    digest: String,
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A rootfs with two data files (one chunked) and an image.json owned by the current user,
/// so init has no privileges to drop.
fn root(name: &str, profile: &str) -> Root {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    root_owned_by(name, profile, uid, gid)
}

fn root_owned_by(name: &str, profile: &str, uid: u32, gid: u32) -> Root {
    let dir = std::env::temp_dir().join(format!("bakedb-init-it-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let data = dir.join("var/lib/bakedb");
    fs::create_dir_all(&data).unwrap();
    fs::create_dir_all(dir.join("etc/bakedb")).unwrap();
    let small = b"small file".to_vec();
    let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(data.join("app.db"), &small).unwrap();
    fs::write(data.join("big.db"), &big).unwrap();
    for f in ["app.db", "big.db"] {
        fs::set_permissions(data.join(f), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let chunks: Vec<String> = big
        .chunks(4096)
        .map(|c| format!("\"{}\"", hex(&Sha256::digest(c))))
        .collect();
    let text = format!(
        r#"{{"schema": 1, "engine": "sqlite", "data_dir": "/var/lib/bakedb", "chunk_size": 4096,
  "owner": {{"uid": {uid}, "gid": {gid}}}, "profile": {profile},
  "files": [{{"path": "app.db", "size": {}, "mode": "0644", "sha256": "{}"}},
            {{"path": "big.db", "size": {}, "mode": "0644", "chunks": [{}]}}]}}
"#,
        small.len(),
        hex(&Sha256::digest(&small)),
        big.len(),
        chunks.join(", ")
    );
    fs::write(dir.join("etc/bakedb/image.json"), &text).unwrap();
    Root {
        digest: format!("sha256:{}", hex(&Sha256::digest(text.as_bytes()))),
        dir,
    }
}

const SQLITE_PROFILE: &str = r#"{"name": "sqlite-readonly", "env": {"SQLITE_TMPDIR": "/tmp", "BAKEDB_DATABASE": "{data_dir}/app.db"}}"#;

fn init(root: &Root) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bakedb-init"));
    cmd.arg("--root")
        .arg(&root.dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("BAKEDB_DATA_DIGEST", &root.digest)
        .env("BAKEDB_RUNTIME_DIR", root.dir.join("run"));
    cmd
}

/// Whether the test runs as root, which it needs to drop privileges. CI runs as root by
/// contract, where a skip would hide the privilege drop: there it fails instead.
fn as_root() -> bool {
    // SAFETY: getuid cannot fail.
    let root = unsafe { libc::getuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the tests as root"
        );
        eprintln!("skipped: needs root to drop privileges");
    }
    root
}

fn out(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn verified_data_then_the_command_runs_with_the_profile() {
    let r = root("ok", SQLITE_PROFILE);
    let o = out(init(&r).env("SQLITE_TMPDIR", "/var/tmp").args([
        "sh",
        "-c",
        "echo db=$BAKEDB_DATABASE tmp=$SQLITE_TMPDIR; exit 7",
    ]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert_eq!(text(&o.stdout), "db=/var/lib/bakedb/app.db tmp=/var/tmp\n");
    assert!(err.contains("bakedb-init: verified 2 files, "), "{err}");
    assert!(
        err.contains("profile sqlite-readonly: env BAKEDB_DATABASE=/var/lib/bakedb/app.db; env SQLITE_TMPDIR kept as the container sets them"),
        "{err}"
    );
}

#[test]
fn plan_shows_verification_and_exec_without_running_either() {
    let r = root("plan", SQLITE_PROFILE);
    // Tampered data: --plan must not verify, and must not run the command.
    fs::write(r.dir.join("var/lib/bakedb/app.db"), b"changed!!!").unwrap();
    let marker = r.dir.join("ran");
    let o = out(init(&r).args(["--plan", "sh", "-c", &format!("touch {}", marker.display())]));
    let plan = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!marker.exists(), "--plan ran the command");
    for line in [
        "bakedb-init plan (sqlite engine)",
        &format!(
            "  verify   {}/etc/bakedb/image.json against BAKEDB_DATA_DIGEST={}",
            r.dir.display(),
            r.digest
        ),
        &format!(
            "  verify   {}/var/lib/bakedb: 2 files, 9.78 KiB (10010 bytes), 4 pieces of up to 4.00 KiB on",
            r.dir.display()
        ),
        // SAFETY: getuid cannot fail.
        if unsafe { libc::getuid() } == 0 {
            "  user     stay root (the image's data is owned by root)"
        } else {
            "  user     unchanged (uid "
        },
        "  tune     profile sqlite-readonly: env BAKEDB_DATABASE=/var/lib/bakedb/app.db SQLITE_TMPDIR=/tmp",
    ] {
        assert!(plan.contains(line), "plan lacks {line:?}:\n{plan}");
    }
    assert!(
        plan.lines()
            .any(|l| l.starts_with("  exec     /") && l.contains("/sh [\"sh\", \"-c\", \"touch ")),
        "{plan}"
    );
    let o = out(init(&r)
        .env("BAKEDB_VERIFY", "off")
        .args(["--plan", "no-such-program"]));
    let plan = text(&o.stdout);
    assert!(
        plan.contains("  verify   off (BAKEDB_VERIFY=off)"),
        "{plan}"
    );
    assert!(
        plan.contains("(would fail with 127: no-such-program: not found in PATH=/usr/bin:/bin)"),
        "{plan}"
    );
}

#[test]
fn tampering_exits_3_and_the_command_never_runs() {
    let r = root("tamper", SQLITE_PROFILE);
    let marker = r.dir.join("ran");
    let touch = [
        "sh".to_string(),
        "-c".into(),
        format!("touch {}", marker.display()),
    ];
    let big = r.dir.join("var/lib/bakedb/big.db");
    let mut bytes = fs::read(&big).unwrap();
    bytes[5000] ^= 1;
    fs::write(&big, &bytes).unwrap();
    let o = out(init(&r).args(&touch));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(!marker.exists(), "the command ran on tampered data");
    assert!(
        err.contains("big.db: bytes 4096..8192 (chunk 2 of 3) have sha256")
            && err.ends_with("the contents were altered; the engine was not started\n"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    // BAKEDB_VERIFY=off starts anyway, and says so.
    let o = out(init(&r).env("BAKEDB_VERIFY", "off").args(&touch));
    assert_eq!(o.status.code(), Some(0));
    assert!(marker.exists());
    assert!(text(&o.stderr).contains("warning: BAKEDB_VERIFY=off"));

    // A wrong or missing BAKEDB_DATA_DIGEST is a verification failure too.
    let o = out(init(&r)
        .env("BAKEDB_DATA_DIGEST", format!("sha256:{}", "0".repeat(64)))
        .arg("true"));
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("the data description was replaced or altered"));
    let o = out(init(&r).env_remove("BAKEDB_DATA_DIGEST").arg("true"));
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stderr).contains("BAKEDB_DATA_DIGEST is not set"));
}

#[test]
fn usage_and_exec_failures_have_their_codes() {
    let r = root("codes", SQLITE_PROFILE);
    let code = |cmd: &mut Command| {
        let o = out(cmd);
        (o.status.code(), text(&o.stderr))
    };
    let (c, err) = code(&mut init(&r));
    assert_eq!(c, Some(2), "{err}");
    assert!(err.contains("no command to start"), "{err}");
    let (c, err) = code(init(&r).arg("--frobnicate"));
    assert_eq!(c, Some(2), "{err}");
    let (c, err) = code(init(&r).env("BAKEDB_INIT_SUPERVISE", "maybe").arg("true"));
    assert_eq!(c, Some(2), "{err}");
    assert!(
        err.contains("BAKEDB_INIT_SUPERVISE=\"maybe\" is not a switch"),
        "{err}"
    );
    let (c, err) = code(init(&r).arg("no-such-program"));
    assert_eq!(c, Some(127), "{err}");
    assert!(
        err.contains("no-such-program: not found in PATH=/usr/bin:/bin"),
        "{err}"
    );
    let plain = r.dir.join("plain");
    fs::write(&plain, b"").unwrap();
    let (c, err) = code(init(&r).arg(&plain));
    assert_eq!(c, Some(126), "{err}");
    for supervise in ["0", "1"] {
        let (c, err) = code(
            init(&r)
                .env("BAKEDB_INIT_SUPERVISE", supervise)
                .args(["sh", "-c", "exit 9"]),
        );
        assert_eq!(c, Some(9), "supervise={supervise}: {err}");
    }
    let (c, err) =
        code(
            init(&r)
                .env("BAKEDB_INIT_SUPERVISE", "1")
                .args(["sh", "-c", "kill -9 $$"]),
        );
    assert_eq!(c, Some(137), "{err}");
    let (c, err) = code(
        init(&r)
            .env("BAKEDB_INIT_SUPERVISE", "1")
            .arg("no-such-program"),
    );
    assert_eq!(c, Some(127), "{err}");
}

/// Start init supervising `script`, wait for the child to print "ready", return init.
fn supervised(
    r: &Root,
    script: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = init(r)
        .env("BAKEDB_INIT_SUPERVISE", "1")
        .args(["sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    (child, stdout)
}

#[test]
fn supervise_forwards_signals_and_returns_the_childs_code() {
    let r = root("signals", SQLITE_PROFILE);
    for (sig, code) in [
        (libc::SIGTERM, 42),
        (libc::SIGUSR1, 43),
        (libc::SIGHUP, 44),
        (libc::SIGQUIT, 45),
    ] {
        let (mut child, _out) = supervised(
            &r,
            "trap 'exit 42' TERM; trap 'exit 43' USR1; trap 'exit 44' HUP; trap 'exit 45' QUIT; echo ready; while :; do sleep 0.05; done",
        );
        // SAFETY: signalling the init process this test started.
        unsafe { libc::kill(child.id() as i32, sig) };
        assert_eq!(child.wait().unwrap().code(), Some(code), "signal {sig}");
    }
    // A child without a handler dies of the forwarded signal: 128+15.
    let (mut child, _out) = supervised(&r, "echo ready; exec sleep 60");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(143));
}

#[test]
fn supervise_reaps_orphans_and_closes_inherited_descriptors() {
    let r = root("orphans", SQLITE_PROFILE);
    // The inner shell leaves a short-lived orphan behind; once it exits it is init's to reap
    // (init is a subreaper when it is not PID 1). The main child then watches its state.
    let script = r#"sh -c 'sleep 0.2 & echo $! > "$0"' "$ORPHAN_FILE"; pid=$(cat "$ORPHAN_FILE")
        for i in $(seq 1 200); do
            if [ ! -e /proc/$pid ]; then echo REAPED; exit 0; fi
            state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' /proc/$pid/status 2>/dev/null)
            sleep 0.05
        done
        echo "STILL THERE state=$state"; exit 1"#;
    let o = out(init(&r)
        .env("BAKEDB_INIT_SUPERVISE", "1")
        .env("ORPHAN_FILE", r.dir.join("orphan"))
        .args(["sh", "-c", script]));
    assert_eq!(text(&o.stdout).trim(), "REAPED", "{}", text(&o.stderr));
    assert_eq!(o.status.code(), Some(0));

    // An inherited descriptor (here 5, open on a file) does not reach the supervised child.
    let o = out(init(&r)
        .env("BAKEDB_INIT_SUPERVISE", "1")
        .args(["sh", "-c", "ls /proc/self/fd"])
        .stdin(Stdio::null())
        .inherit_fd(Path::new("/etc/hostname"), 5));
    let fds: Vec<String> = text(&o.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!fds.iter().any(|fd| fd == "5"), "fd 5 leaked: {fds:?}");
}

trait InheritFd {
    fn inherit_fd(&mut self, path: &Path, fd: i32) -> &mut Self;
}

impl InheritFd for Command {
    /// Open `path` as descriptor `fd` (without CLOEXEC) in the spawned process.
    fn inherit_fd(&mut self, path: &Path, fd: i32) -> &mut Self {
        use std::os::unix::process::CommandExt;
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: open and dup2 are async-signal-safe; the CString outlives the closure's use.
        unsafe {
            self.pre_exec(move || {
                let f = libc::open(path.as_ptr(), libc::O_RDONLY);
                if f >= 0 && f != fd {
                    libc::dup2(f, fd);
                    libc::close(f);
                }
                Ok(())
            })
        }
    }
}

#[test]
fn root_becomes_the_data_owner_with_a_usable_home() {
    if !as_root() {
        return;
    }
    let r = root_owned_by("drop", SQLITE_PROFILE, 65532, 65533);
    let o = out(init(&r).env("HOME", "/root").args([
        "sh",
        "-c",
        "echo $(id -u) $(id -g) $(id -G) $HOME",
    ]));
    assert_eq!(
        text(&o.stdout),
        "65532 65533 65533 /\n",
        "{}",
        text(&o.stderr)
    );
    assert!(text(&o.stderr).contains("running as 65532:65533, the data owner, instead of root"));

    fs::write(
        r.dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nbakedb:x:65532:65533::/home/bakedb:/bin/sh\n",
    )
    .unwrap();
    let o = out(init(&r)
        .env("HOME", "/root")
        .args(["sh", "-c", "echo $HOME"]));
    assert_eq!(text(&o.stdout), "/home/bakedb\n", "{}", text(&o.stderr));
    // A HOME the container chose is kept.
    let o = out(init(&r)
        .env("HOME", "/srv")
        .args(["sh", "-c", "echo $HOME"]));
    assert_eq!(text(&o.stdout), "/srv\n");
    let o = out(init(&r).env("BAKEDB_RUN_AS_ROOT", "1").args(["id", "-u"]));
    assert_eq!(text(&o.stdout), "0\n");

    // The owner cannot enter a private directory: that is a setup problem (exit 1), not
    // tampering (3). --verify-only starts nothing and reads as root, so it passes.
    fs::set_permissions(
        r.dir.join("var/lib/bakedb"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let o = out(init(&r).arg("true"));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot verify the data: ")
            && err.contains("Permission denied")
            && err.contains("as uid 65532; run the container as the data owner"),
        "{err}"
    );
    let o = out(init(&r).arg("--verify-only"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
}

#[test]
fn variables_that_are_not_utf8_pass_through() {
    use std::os::unix::ffi::OsStrExt;
    let r = root("nonutf8", SQLITE_PROFILE);
    let o = out(init(&r)
        .env("ODD", std::ffi::OsStr::from_bytes(b"a\xffb"))
        .args(["sh", "-c", "printf %s \"$ODD\" | od -An -tx1"]));
    assert_eq!(
        text(&o.stdout).split_whitespace().collect::<Vec<_>>(),
        ["61", "ff", "62"]
    );
}

/// How long init may take to exit before a test calls it blocked and fails.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Run `cmd` to completion, or kill it and fail the test if it is still running after
/// PATIENCE: a hang must fail the test, not stall it.
fn out_or_blocked(cmd: &mut Command, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{what}: init was still running after {PATIENCE:?} (blocked?); stderr:\n{}",
                text(&o.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "{}",
        path.display()
    );
}

/// Exit 3 and one line on stderr that contains `needle`.
fn assert_refused(o: &Output, needle: &str, what: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{what}: {err}");
    assert!(
        err.starts_with("bakedb-init: verification failed: ")
            && err.lines().count() == 1
            && err.contains(needle)
            && err.ends_with("; the engine was not started\n"),
        "{what}: expected one line with {needle:?}, got:\n{err}"
    );
}

/// image.json replaced by a FIFO used to block init in open() for ever: the container hung
/// instead of exiting 3. Whatever stands in for it (a FIFO, a link, a directory) is refused
/// at once, in every mode, before anything reads from it.
#[test]
fn an_image_json_that_is_not_a_regular_file_is_refused_without_blocking() {
    let r = root("notregular", SQLITE_PROFILE);
    let image_json = r.dir.join("etc/bakedb/image.json");
    let shown = image_json.display().to_string();
    let text_of_image_json = fs::read(&image_json).unwrap();
    fs::remove_file(&image_json).unwrap();
    mkfifo(&image_json);
    for mode in [&["true"][..], &["--verify-only"], &["--plan", "true"]] {
        let what = format!("image.json is a FIFO, init {}", mode.join(" "));
        let o = out_or_blocked(init(&r).args(mode), &what);
        assert_refused(
            &o,
            &format!("{shown} is a FIFO, not a regular file: the data description was replaced"),
            &what,
        );
    }
    // A link to a file with the right bytes is refused too: bakedb writes no links there.
    fs::remove_file(&image_json).unwrap();
    fs::write(r.dir.join("etc/bakedb/real.json"), &text_of_image_json).unwrap();
    std::os::unix::fs::symlink("real.json", &image_json).unwrap();
    let o = out_or_blocked(init(&r).arg("true"), "image.json is a link");
    assert_refused(
        &o,
        &format!("{shown} is a symbolic link (to real.json), not a regular file"),
        "image.json is a link",
    );
    fs::remove_file(&image_json).unwrap();
    fs::create_dir(&image_json).unwrap();
    let o = out_or_blocked(init(&r).arg("true"), "image.json is a directory");
    assert_refused(
        &o,
        &format!("{shown} is a directory, not a regular file"),
        "image.json is a directory",
    );
}

/// The first-start stamp lives in the data directory, which the engine (and so anyone in
/// the container) may write: a FIFO as the stamp is refused, and one at the stamp's
/// temporary name is replaced rather than opened for writing (which blocked for ever).
#[test]
fn a_stamp_that_is_not_a_regular_file_is_refused_without_blocking() {
    let profile = r#"{"name": "first-start", "verify": "first-start"}"#;
    let r = root("stampfifo", profile);
    let data = r.dir.join("var/lib/bakedb");
    let tmp = data.join(".bakedb-verified.tmp");
    mkfifo(&tmp);
    let o = out_or_blocked(init(&r).arg("true"), "a FIFO at the stamp's temporary name");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let stamp = data.join(".bakedb-verified");
    assert_eq!(
        fs::read_to_string(&stamp).unwrap(),
        format!("{}\n", r.digest)
    );
    assert!(!tmp.exists());

    fs::remove_file(&stamp).unwrap();
    mkfifo(&stamp);
    let o = out_or_blocked(init(&r).arg("true"), "a FIFO as the stamp");
    assert_refused(
        &o,
        &format!(
            "{} is a FIFO, not a regular file: init writes it as a regular file after verifying",
            stamp.display()
        ),
        "a FIFO as the stamp",
    );
}

/// Started as root, init reads the base image's /etc/passwd for the data owner's home: a
/// FIFO there is refused instead of blocking the start; a link to a real file is followed.
#[test]
fn an_etc_passwd_that_is_not_a_regular_file_is_refused_without_blocking() {
    if !as_root() {
        return;
    }
    let r = root_owned_by("passwdfifo", SQLITE_PROFILE, 65532, 65533);
    let passwd = r.dir.join("etc/passwd");
    mkfifo(&passwd);
    let what = "/etc/passwd is a FIFO";
    let o = out_or_blocked(init(&r).env("HOME", "/root").arg("true"), what);
    assert_refused(
        &o,
        &format!(
            "{} is a FIFO, not a regular file (init reads it for the home directory of uid 65532)",
            passwd.display()
        ),
        what,
    );
    fs::remove_file(&passwd).unwrap();
    fs::write(
        r.dir.join("etc/passwd.real"),
        "bakedb:x:65532:65533::/home/bakedb:/bin/sh\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("passwd.real", &passwd).unwrap();
    let o = out_or_blocked(
        init(&r)
            .env("HOME", "/root")
            .args(["sh", "-c", "echo $HOME"]),
        "/etc/passwd is a link",
    );
    assert_eq!(text(&o.stdout), "/home/bakedb\n", "{}", text(&o.stderr));
}

// Patch layers (docs/patch-format.md). The fixture is what `bakedb build --from` writes for
// generation 2 of a chain: app.db's base of generation 0 as its layer stores it, a patch
// per generation (the first grows the file, the second changes page 0 and shrinks it), an
// unpatched file, a page index per generation, and image.json tying them together. The
// patches are written here from the document, independently of init's reader.

const PAGE: usize = 1024;
const CHUNK: usize = 4096;

/// The chunk digests of `bytes` as image.json lists them: one sha256 up to a chunk, else
/// one per chunk.
fn content_json(bytes: &[u8]) -> String {
    if bytes.len() <= CHUNK {
        format!(
            r#""size": {}, "sha256": "{}""#,
            bytes.len(),
            hex(&Sha256::digest(bytes))
        )
    } else {
        let chunks: Vec<String> = bytes
            .chunks(CHUNK)
            .map(|c| format!("\"{}\"", hex(&Sha256::digest(c))))
            .collect();
        format!(
            r#""size": {}, "chunks": [{}]"#,
            bytes.len(),
            chunks.join(", ")
        )
    }
}

/// The patch that turns `old` into `new`, as a builder writes it: every page of `new` that
/// differs from `old` or lies past its end, `new`'s length, and the digest of the composed
/// file (sha256 of the concatenated chunk digests).
fn patch_file(old: &[u8], new: &[u8]) -> Vec<u8> {
    assert_eq!(new.len() % PAGE, 0);
    let pages: Vec<(u64, &[u8])> = new
        .chunks(PAGE)
        .enumerate()
        .filter(|(n, page)| old.get(n * PAGE..(n + 1) * PAGE) != Some(*page))
        .map(|(n, page)| (n as u64, page))
        .collect();
    let chunk_digests: Vec<u8> = new
        .chunks(CHUNK)
        .flat_map(|c| Sha256::digest(c).to_vec())
        .collect();
    let mut out = b"BKDBPTCH".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(PAGE as u32).to_le_bytes());
    out.extend_from_slice(&(new.len() as u64).to_le_bytes());
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&chunk_digests));
    for (n, _) in &pages {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for (_, page) in &pages {
        out.extend_from_slice(page);
    }
    out
}

struct Chain {
    root: Root,
    base: Vec<u8>,
    /// The file after generation 1's patch, and after generation 2's (the image's).
    after_first: Vec<u8>,
    composed: Vec<u8>,
    patches: [Vec<u8>; 2],
    other: Vec<u8>,
}

impl Chain {
    fn data(&self) -> PathBuf {
        self.root.dir.join("var/lib/bakedb")
    }

    fn app_db(&self) -> Vec<u8> {
        fs::read(self.data().join("app.db")).unwrap()
    }

    /// Every file under the data directory and /etc/bakedb with its bytes.
    fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![self.data(), self.root.dir.join("etc/bakedb")];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let bytes = fs::read(&p).unwrap();
                    out.push((p, bytes));
                }
            }
        }
        out.sort();
        out
    }
}

/// `rewrite` lets a test change image.json's text (e.g. list a malformed patch's digest)
/// before its digest is taken.
fn patched_chain(name: &str, profile: &str, rewrite: &dyn Fn(&mut Chain)) -> Chain {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    patched_chain_owned_by(name, profile, rewrite, uid, gid)
}

/// The chain with image.json's owner `uid`:`gid`; the files stay the test's (chown them to
/// test what the owner may do).
fn patched_chain_owned_by(
    name: &str,
    profile: &str,
    rewrite: &dyn Fn(&mut Chain),
    uid: u32,
    gid: u32,
) -> Chain {
    let dir = std::env::temp_dir().join(format!("bakedb-init-it-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let data = dir.join("var/lib/bakedb");
    fs::create_dir_all(data.join(".patches/1")).unwrap();
    fs::create_dir_all(data.join(".patches/2")).unwrap();
    fs::create_dir_all(dir.join("etc/bakedb/pages")).unwrap();
    // 10 pages, 3 chunks. Generation 1 rewrites pages 2 and 7 and grows to 14 pages;
    // generation 2 rewrites page 0 and shrinks to 12 pages (pages 12, 13 of generation 1
    // go, and page 11, new in generation 1, stays).
    let base: Vec<u8> = (0..10 * PAGE as u32).map(|i| (i % 251) as u8).collect();
    let mut after_first = base.clone();
    after_first[2 * PAGE..3 * PAGE].fill(0xa1);
    after_first[7 * PAGE + 100] ^= 0xff;
    after_first.extend((0..4 * PAGE as u32).map(|i| (i % 13) as u8 + 1));
    let mut composed = after_first[..12 * PAGE].to_vec();
    composed[5] = 0xb2;
    let patches = [
        patch_file(&base, &after_first),
        patch_file(&after_first, &composed),
    ];
    let other = b"an unpatched file".to_vec();
    let mut chain = Chain {
        root: Root {
            dir,
            digest: String::new(),
        },
        base,
        after_first,
        composed,
        patches,
        other,
    };
    let mut image_json = String::new();
    let mut write = |chain: &mut Chain| {
        let (data, dir) = (chain.data(), chain.root.dir.clone());
        fs::write(data.join("app.db"), &chain.base).unwrap();
        fs::write(data.join("other.db"), &chain.other).unwrap();
        fs::write(data.join(".patches/1/app.db"), &chain.patches[0]).unwrap();
        fs::write(data.join(".patches/2/app.db"), &chain.patches[1]).unwrap();
        for f in [
            "app.db",
            "other.db",
            ".patches/1/app.db",
            ".patches/2/app.db",
        ] {
            fs::set_permissions(data.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        let index: Vec<(u32, Vec<u8>)> = [0u32, 1, 2]
            .iter()
            .map(|g| (*g, format!("BKDBPIDX index of generation {g}").into_bytes()))
            .collect();
        let mut index_json = Vec::new();
        for (g, bytes) in &index {
            fs::write(dir.join(format!("etc/bakedb/pages/{g}.idx")), bytes).unwrap();
            index_json.push(format!(
                r#"{{"generation": {g}, "path": "/etc/bakedb/pages/{g}.idx", "size": {}, "sha256": "{}", "layer": null}}"#,
                bytes.len(),
                hex(&Sha256::digest(bytes))
            ));
        }
        image_json = format!(
            r#"{{"schema": 1, "engine": "sqlite", "data_dir": "/var/lib/bakedb", "chunk_size": {CHUNK},
  "generation": 2, "owner": {{"uid": {uid}, "gid": {gid}}}, "profile": {profile},
  "page_index": [{}],
  "files": [{{"path": "app.db", "mode": "0644", {}, "base": {{"generation": 0, {}}},
              "patches": [".patches/1/app.db", ".patches/2/app.db"]}},
            {{"path": "other.db", "mode": "0644", {}}},
            {{"path": ".patches/1/app.db", "mode": "0644", {}}},
            {{"path": ".patches/2/app.db", "mode": "0644", {}}}]}}
"#,
            index_json.join(", "),
            content_json(&chain.composed),
            content_json(&chain.base),
            content_json(&chain.other),
            content_json(&chain.patches[0]),
            content_json(&chain.patches[1]),
        );
    };
    rewrite(&mut chain);
    write(&mut chain);
    fs::write(chain.root.dir.join("etc/bakedb/image.json"), &image_json).unwrap();
    chain.root.digest = format!("sha256:{}", hex(&Sha256::digest(image_json.as_bytes())));
    chain
}

const APPLY: &str = r#"{"name": "files-readonly", "patches": "apply"}"#;
const IN_PLACE: &str = r#"{"name": "sqlite-readonly", "patches": "in-place"}"#;

fn unchanged(_: &mut Chain) {}

#[test]
fn apply_composes_exactly_the_patched_file_then_runs_the_command() {
    let c = patched_chain("apply", APPLY, &unchanged);
    // The fixture is what it says: composing by the document gives the image's file.
    assert_eq!(c.after_first.len(), 14 * PAGE);
    assert_eq!(c.composed.len(), 12 * PAGE);
    let before = c.snapshot();
    let o = out(init(&c.root).args(["sh", "-c", "echo started; exit 5"]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert_eq!(text(&o.stdout), "started\n");
    assert_eq!(c.app_db(), c.composed, "app.db is not the composed file");
    // Nothing else changed, nothing was added.
    let after = c.snapshot();
    let app_db = c.data().join("app.db");
    assert_eq!(before.len(), after.len());
    for ((p, b), (q, a)) in before.iter().zip(&after) {
        assert_eq!(p, q);
        if *p != app_db {
            assert!(a == b, "{} changed", p.display());
        }
    }
    assert!(
        err.contains(
            "bakedb-init: composed 1 file under /var/lib/bakedb from 2 patches (7 pages, 7.00 KiB written) in "
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "bakedb-init: verified 4 files, 19.20 KiB under /var/lib/bakedb, 1 file of them composed and 3 page index files (90 B) in "
        ),
        "{err}"
    );
    // Started again (a restart of an every-start container): the composed file composes to
    // itself and verifies.
    let o = out(init(&c.root).arg("true"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(c.app_db(), c.composed);
}

#[test]
fn in_place_leaves_every_byte_as_stored_and_runs_the_command() {
    let c = patched_chain("inplace", IN_PLACE, &unchanged);
    let before = c.snapshot();
    let o = out(init(&c.root).args(["sh", "-c", "echo started"]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(text(&o.stdout), "started\n");
    assert!(before == c.snapshot(), "in-place mode changed a file");
    assert_eq!(c.app_db(), c.base);
    assert!(!err.contains("composed"), "{err}");
    assert!(
        err.contains(
            "bakedb-init: verified 4 files, 17.20 KiB under /var/lib/bakedb, 1 patched file as stored (sqlite reads their 2 patches itself) and 3 page index files"
        ),
        "{err}"
    );
}

/// Tamper with the base, a patch or a page index: exit 3, one line naming the file, the
/// command never runs; in apply mode a bad patch is found before anything is written.
#[test]
fn tampering_with_a_base_a_patch_or_a_page_index_exits_3() {
    type Tamper = fn(&Chain);
    fn flip(path: &Path, at: usize) {
        let mut bytes = fs::read(path).unwrap();
        bytes[at] ^= 1;
        fs::write(path, bytes).unwrap();
    }
    let cases: &[(&str, &str, Tamper, &str)] = &[
        (
            "base-apply",
            APPLY,
            // Page 9: no patch rewrites it, so it survives into the composed file.
            |c| flip(&c.data().join("app.db"), 9 * PAGE + 3),
            "/var/lib/bakedb/app.db: bytes 8192..12288 (chunk 3 of 3) have sha256",
        ),
        (
            "base-inplace",
            IN_PLACE,
            |c| flip(&c.data().join("app.db"), 9 * PAGE + 3),
            "/var/lib/bakedb/app.db: bytes 8192..10240 (chunk 3 of 3) have sha256",
        ),
        (
            "patch-apply",
            APPLY,
            |c| flip(&c.data().join(".patches/2/app.db"), 100),
            "/var/lib/bakedb/.patches/2/app.db: sha256 is",
        ),
        (
            "patch-inplace",
            IN_PLACE,
            |c| flip(&c.data().join(".patches/1/app.db"), 70),
            "/var/lib/bakedb/.patches/1/app.db: bytes 0..4096 (chunk 1 of 2) have sha256",
        ),
        (
            "index",
            IN_PLACE,
            |c| flip(&c.root.dir.join("etc/bakedb/pages/1.idx"), 0),
            "/etc/bakedb/pages/1.idx: sha256 is",
        ),
        (
            "index-apply",
            APPLY,
            |c| fs::write(c.root.dir.join("etc/bakedb/pages/2.idx"), b"x").unwrap(),
            "/etc/bakedb/pages/2.idx has 1 bytes, image.json says 30 for the page index of generation 2: the page index was altered",
        ),
        (
            "index-gone",
            APPLY,
            |c| fs::remove_file(c.root.dir.join("etc/bakedb/pages/0.idx")).unwrap(),
            "/etc/bakedb/pages/0.idx is missing: image.json lists it as the page index of generation 0",
        ),
        (
            "patch-gone",
            APPLY,
            |c| fs::remove_file(c.data().join(".patches/1/app.db")).unwrap(),
            "/var/lib/bakedb/.patches/1/app.db is missing",
        ),
    ];
    for (name, profile, tamper, message) in cases {
        let c = patched_chain(name, profile, &unchanged);
        tamper(&c);
        let stored = c.app_db();
        let marker = c.root.dir.join("ran");
        let what = format!("{name}: tampered");
        let o = out_or_blocked(
            init(&c.root).args(["sh", "-c", &format!("touch {}", marker.display())]),
            &what,
        );
        assert_refused(&o, message, &what);
        assert!(!marker.exists(), "{name}: the command ran");
        if !name.starts_with("base-apply") {
            assert!(c.app_db() == stored, "{name}: app.db was written");
        }
    }
    // A FIFO in place of a page index is refused at once.
    let c = patched_chain("index-fifo", APPLY, &unchanged);
    let index = c.root.dir.join("etc/bakedb/pages/2.idx");
    fs::remove_file(&index).unwrap();
    mkfifo(&index);
    let o = out_or_blocked(init(&c.root).arg("true"), "a FIFO as a page index");
    assert_refused(
        &o,
        "pages/2.idx is a FIFO, not a regular file: image.json lists it as the page index of generation 2",
        "a FIFO as a page index",
    );
}

/// A patch whose digest image.json lists but whose header breaks the format: exit 3 before
/// anything is written, in both modes.
#[test]
fn a_malformed_patch_header_exits_3_and_nothing_is_written() {
    type Break = fn(&mut Chain);
    let cases: &[(&str, Break, &str)] = &[
        (
            "version",
            |c| c.patches[0][8] = 2,
            "it is version 2 of the format, this bakedb-init reads version 1",
        ),
        (
            "pagesize",
            |c| c.patches[1][12..16].copy_from_slice(&1000u32.to_le_bytes()),
            "its page size 1000 is not a power of two from 512 to 65536",
        ),
        (
            "pagenumber",
            // Generation 1's first page number (2) past the 14 pages of its composed file.
            |c| c.patches[0][64..72].copy_from_slice(&14u64.to_le_bytes()),
            "page number 14 (entry 0 of 6) is not below the composed file's 14 pages",
        ),
        (
            "order",
            // 2, 7, 10, ... becomes 7, 7, 10, ...
            |c| c.patches[0][64..72].copy_from_slice(&7u64.to_le_bytes()),
            "page number 7 (entry 1 of 6) is not above the one before it",
        ),
        (
            "length",
            |c| {
                c.patches[1].truncate(c.patches[1].len() - 1);
            },
            "its header says 64 + 8 × 1 + 1 × 1024",
        ),
    ];
    for profile in [APPLY, IN_PLACE] {
        for (name, damage, message) in cases {
            let c = patched_chain(&format!("bad-{name}"), profile, damage);
            let marker = c.root.dir.join("ran");
            let what = format!("{name} in {profile}");
            let o = out(init(&c.root).args(["sh", "-c", &format!("touch {}", marker.display())]));
            assert_refused(
                &o,
                "is not a valid patch file (docs/patch-format.md): ",
                &what,
            );
            assert!(
                text(&o.stderr).contains(message),
                "{what}: {}",
                text(&o.stderr)
            );
            assert!(!marker.exists(), "{what}: the command ran");
            assert!(c.app_db() == c.base, "{what}: app.db was written");
        }
    }
}

/// A first-start container (postgres): the stamp written after composing and verifying
/// means both, so a restart composes nothing, even over what the engine wrote; a start
/// that died before the stamp (after composing, or half-way) composes again and verifies.
#[test]
fn a_restart_after_the_stamp_does_not_compose_again() {
    let profile = r#"{"name": "postgres-readonly", "verify": "first-start", "patches": "apply"}"#;
    let c = patched_chain("stamp", profile, &unchanged);
    let stamp = c.data().join(".bakedb-verified");
    let o = out(init(&c.root).arg("true"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(c.app_db(), c.composed);
    assert_eq!(
        fs::read_to_string(&stamp).unwrap(),
        format!("{}\n", c.root.digest)
    );

    // The engine writes page 2, which generation 1's patch holds: a restart keeps its write.
    let engine_wrote = {
        let mut bytes = c.composed.clone();
        bytes[2 * PAGE..3 * PAGE].fill(0x77);
        bytes
    };
    fs::write(c.data().join("app.db"), &engine_wrote).unwrap();
    for verify in ["on", "off"] {
        let o = out(init(&c.root).env("BAKEDB_VERIFY", verify).arg("true"));
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert!(!err.contains("composed 1 file"), "verify={verify}: {err}");
        assert_eq!(c.app_db(), engine_wrote, "verify={verify}: composed again");
    }
    let o = out(init(&c.root).arg("true"));
    assert!(
        text(&o.stderr)
            .contains("was verified and its patches applied at this container's first start"),
        "{}",
        text(&o.stderr)
    );

    // Killed after composing, before the stamp: composed again (to the same bytes), verified.
    fs::write(c.data().join("app.db"), &c.composed).unwrap();
    fs::remove_file(&stamp).unwrap();
    let o = out(init(&c.root).arg("true"));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("composed 1 file") && err.contains("verified 4 files"),
        "{err}"
    );
    assert_eq!(c.app_db(), c.composed);
    assert!(stamp.exists());

    // Killed half-way: generation 1's patch applied, a page of generation 2's half written.
    let mut half = c.after_first.clone();
    half[..PAGE / 2].fill(0);
    fs::write(c.data().join("app.db"), &half).unwrap();
    fs::remove_file(&stamp).unwrap();
    let o = out(init(&c.root).arg("true"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(c.app_db(), c.composed);
}

#[test]
fn plan_and_verify_only_write_nothing() {
    let c = patched_chain("planpatches", APPLY, &unchanged);
    let before = c.snapshot();
    let o = out(init(&c.root).args(["--plan", "true"]));
    let plan = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    for line in [
        "  verify   3 page index files: ",
        "/etc/bakedb/pages/0.idx, ",
        "  patches  apply: compose 1 file in place from 2 patches before the engine starts (as the data owner), then verify the composed files (generation 2)\n",
        "           app.db: base of generation 0 (10.00 KiB) + 2 patches = 12.00 KiB\n",
        // The patch files (6256 and 1096 bytes), other.db and the composed app.db.
        "/var/lib/bakedb: 4 files, 19.20 KiB (19657 bytes), 7 pieces of up to 4.00 KiB on",
    ] {
        assert!(plan.contains(line), "plan lacks {line:?}:\n{plan}");
    }
    let c2 = patched_chain("planinplace", IN_PLACE, &unchanged);
    let plan = text(&out(init(&c2.root).args(["--plan", "true"])).stdout);
    assert!(
        plan.contains("  patches  in place: sqlite reads 1 patched file through their 2 patches itself; init verifies them as stored and writes nothing (generation 2)"),
        "{plan}"
    );
    assert!(
        plan.contains("/var/lib/bakedb: 4 files, 17.20 KiB (17609 bytes), 7 pieces"),
        "{plan}"
    );

    // --verify-only checks the image as stored, in apply mode too, and writes nothing.
    let o = out(init(&c.root).arg("--verify-only"));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("1 patched file as stored (a start composes them with their 2 patches)"),
        "{err}"
    );
    assert!(before == c.snapshot(), "--plan or --verify-only wrote");
    // A tampered base is found without composing.
    let mut bytes = c.base.clone();
    bytes[9 * PAGE] ^= 1;
    fs::write(c.data().join("app.db"), &bytes).unwrap();
    let o = out(init(&c.root).arg("--verify-only"));
    assert_refused(
        &o,
        "app.db: bytes 8192..10240 (chunk 3 of 3) have sha256",
        "--verify-only on a tampered base",
    );
    assert!(text(&o.stderr).contains("for the file as stored (the base of generation 0, before its 2 patches): the contents were altered"));
}

/// BAKEDB_VERIFY=off still composes: the engine must read the composed files.
#[test]
fn apply_composes_with_verification_off() {
    let c = patched_chain("applyoff", APPLY, &unchanged);
    let o = out(init(&c.root).env("BAKEDB_VERIFY", "off").arg("true"));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("composed 1 file"), "{err}");
    assert!(!err.contains("verified"), "{err}");
    assert_eq!(c.app_db(), c.composed);
}

/// Started as root, init drops to the data owner before it composes: a patched file the
/// owner may not write is a setup error naming the uid (exit 1), not a write as root; one
/// the owner owns is composed and keeps its owner.
#[test]
fn root_composes_as_the_data_owner() {
    if !as_root() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let c = patched_chain_owned_by("applyowner", APPLY, &unchanged, 65532, 65532);
    let app_db = c.data().join("app.db");
    std::os::unix::fs::chown(&app_db, Some(65534), Some(65534)).unwrap();
    let o = out(init(&c.root).arg("true"));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot apply the patches: opening ")
            && err.contains("app.db for writing: Permission denied")
            && err.contains("as uid 65532; run the container as the data owner"),
        "{err}"
    );
    assert_eq!(c.app_db(), c.base);

    std::os::unix::fs::chown(&app_db, Some(65532), Some(65532)).unwrap();
    let o = out(init(&c.root).args(["sh", "-c", "id -u"]));
    assert_eq!(text(&o.stdout), "65532\n", "{}", text(&o.stderr));
    assert_eq!(c.app_db(), c.composed);
    let meta = fs::metadata(&app_db).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (65532, 0o644));
}

// ---------------------------------------------------------------------------------------
// BAKEDB_DATA_COPY_DIR: the engine runs on a verified copy on a writable volume (what a
// read-only root filesystem needs for an engine that writes its data directory).

/// Every regular file under `dir` with its mode and bytes, relative paths.
fn files_under(dir: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_owned();
                out.push((
                    rel,
                    meta.permissions().mode() & 0o7777,
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// An empty directory for the copy, inside the test's root (removed with it).
fn copy_dir(root: &Root) -> PathBuf {
    let dir = root.dir.join("copy");
    fs::create_dir(&dir).unwrap();
    dir
}

#[test]
fn the_copy_is_verified_stamped_and_the_command_runs_on_it() {
    let r = root("copy", SQLITE_PROFILE);
    let copy = copy_dir(&r);
    let image_data = r.dir.join("var/lib/bakedb");
    let before = files_under(&image_data);
    let o = out(init(&r).env("BAKEDB_DATA_COPY_DIR", &copy).args([
        "sh",
        "-c",
        "echo db=$BAKEDB_DATABASE",
    ]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        text(&o.stdout),
        format!("db={}/app.db\n", copy.display()),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "bakedb-init: copied and verified 2 files, 9.78 KiB from /var/lib/bakedb into {} in ",
            copy.display()
        )),
        "{err}"
    );
    // The copy is the image's data, byte for byte and mode for mode, plus the stamp; the
    // image's data directory is untouched.
    let mut copied = files_under(&copy);
    let stamp = copied
        .iter()
        .position(|(p, _, _)| p == Path::new(".bakedb-verified"))
        .expect("no stamp in the copy");
    assert_eq!(
        text(&copied.remove(stamp).2),
        format!("{}\n", r.digest),
        "the stamp holds the verified digest"
    );
    assert_eq!(copied, before);
    assert_eq!(files_under(&image_data), before);

    // A restart (the volume outlives the container) finds the stamp: nothing is copied or
    // verified again, and what the engine wrote to its copy stays.
    fs::write(copy.join("app.db"), b"the engine wrote this").unwrap();
    let o = out(init(&r).env("BAKEDB_DATA_COPY_DIR", &copy).arg("true"));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains(
            "holds this image's data, copied and verified at this container's first start"
        ) && !err.contains("copied and verified 2 files"),
        "{err}"
    );
    assert_eq!(
        fs::read(copy.join("app.db")).unwrap(),
        b"the engine wrote this"
    );
}

#[test]
fn an_unfinished_copy_or_another_images_copy_is_made_again() {
    let r = root("copyagain", SQLITE_PROFILE);
    let copy = copy_dir(&r);
    let image_data = r.dir.join("var/lib/bakedb");
    fn killed_half_way(copy: &Path) {
        fs::write(copy.join(".bakedb-copying"), b"").unwrap();
        fs::write(copy.join("app.db"), b"half").unwrap();
        fs::create_dir_all(copy.join("sub/dir")).unwrap();
    }
    fn another_image(copy: &Path) {
        fs::write(copy.join(".bakedb-verified"), "sha256:0000\n").unwrap();
        fs::write(copy.join("app.db"), b"old data").unwrap();
        fs::create_dir_all(copy.join("sub")).unwrap();
    }
    type LayOut = fn(&Path);
    let cases: [(&str, LayOut); 2] = [
        ("a copy killed half-way", killed_half_way),
        ("a copy of another image", another_image),
    ];
    for (what, lay_out) in cases {
        lay_out(&copy);
        let o = out(init(&r).env("BAKEDB_DATA_COPY_DIR", &copy).arg("true"));
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{what}: {err}");
        assert!(
            err.contains("removing it and copying again")
                && err.contains("copied and verified 2 files"),
            "{what}: {err}"
        );
        let mut copied = files_under(&copy);
        copied.retain(|(p, _, _)| p != Path::new(".bakedb-verified"));
        assert_eq!(copied, files_under(&image_data), "{what}");
        assert!(!copy.join("sub").exists(), "{what}: old files stayed");
        assert!(!copy.join(".bakedb-copying").exists(), "{what}");
        copy::empty(&copy);
    }
}

/// Helpers shared by the copy tests.
mod copy {
    use std::fs;
    use std::path::Path;

    pub fn empty(dir: &Path) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                fs::remove_dir_all(&p).unwrap();
            } else {
                fs::remove_file(&p).unwrap();
            }
        }
    }
}

#[test]
fn a_copy_dir_with_other_files_is_refused_and_left_alone() {
    let r = root("copyforeign", SQLITE_PROFILE);
    let copy = copy_dir(&r);
    fs::write(copy.join("someones-data"), b"keep").unwrap();
    let ran = r.dir.join("ran");
    let o = out(init(&r)
        .env("BAKEDB_DATA_COPY_DIR", &copy)
        .args(["touch", ran.to_str().unwrap()]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "bakedb-init: BAKEDB_DATA_COPY_DIR {} is not empty (someones-data) and holds no copy init made",
            copy.display()
        )),
        "{err}"
    );
    assert!(!ran.exists(), "the command ran");
    assert_eq!(fs::read(copy.join("someones-data")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(&copy).unwrap().count(), 1);

    // No directory there (no volume mounted), or one inside the data directory.
    let o = out(init(&r)
        .env("BAKEDB_DATA_COPY_DIR", r.dir.join("absent"))
        .arg("true"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("mount a writable volume there"),
        "{}",
        text(&o.stderr)
    );
    for (overlap, code) in [
        ("/var/lib/bakedb/copy", 2),
        ("/var/lib", 2),
        ("relative", 2),
    ] {
        let o = out(init(&r).env("BAKEDB_DATA_COPY_DIR", overlap).arg("true"));
        assert_eq!(
            o.status.code(),
            Some(code),
            "{overlap}: {}",
            text(&o.stderr)
        );
    }
}

#[test]
fn tampered_data_is_not_started_and_the_copy_is_made_again_next_time() {
    let r = root("copytamper", SQLITE_PROFILE);
    let copy = copy_dir(&r);
    let big = r.dir.join("var/lib/bakedb/big.db");
    let original = fs::read(&big).unwrap();
    let mut tampered = original.clone();
    tampered[5000] ^= 1;
    fs::write(&big, &tampered).unwrap();
    let ran = r.dir.join("ran");
    let o = out(init(&r)
        .env("BAKEDB_DATA_COPY_DIR", &copy)
        .args(["touch", ran.to_str().unwrap()]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("big.db: bytes 4096..8192 (chunk 2 of 3) have sha256"),
        "{err}"
    );
    assert!(!ran.exists(), "the command ran");
    assert!(copy.join(".bakedb-copying").exists(), "no marker left");
    assert!(
        !copy.join(".bakedb-verified").exists(),
        "a stamp was written"
    );
    // BAKEDB_VERIFY=off does not skip the copy's verification.
    let o = out(init(&r)
        .env("BAKEDB_DATA_COPY_DIR", &copy)
        .env("BAKEDB_VERIFY", "off")
        .arg("true"));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("BAKEDB_VERIFY=off does not apply to BAKEDB_DATA_COPY_DIR"),
        "{}",
        text(&o.stderr)
    );

    fs::write(&big, &original).unwrap();
    let o = out(init(&r).env("BAKEDB_DATA_COPY_DIR", &copy).arg("true"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(fs::read(copy.join("big.db")).unwrap(), original);
}

/// A first-start engine (postgres) on a patched image: the patches are composed in the copy,
/// never in the image's data directory, the copy's directories keep the image's modes, and
/// the stamp goes into the copy.
#[test]
fn patches_are_composed_in_the_copy() {
    let profile = r#"{"name": "postgres-readonly", "verify": "first-start", "patches": "apply", "args": ["-D", "{data_dir}/app.db"]}"#;
    let c = patched_chain("copypatched", profile, &unchanged);
    fs::set_permissions(c.data().join(".patches"), fs::Permissions::from_mode(0o750)).unwrap();
    let copy = copy_dir(&c.root);
    let before = c.snapshot();
    let o = out(init(&c.root)
        .env("BAKEDB_DATA_COPY_DIR", &copy)
        .args(["echo", "started"]));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        text(&o.stdout),
        format!("-D {}/app.db started\n", copy.display())
    );
    assert!(
        err.contains(&format!(
            "bakedb-init: composed 1 file under {} from 2 patches",
            copy.display()
        )) && err.contains("copied and verified 4 files, 17.20 KiB from /var/lib/bakedb into ")
            && err.contains(", 1 file of them composed there, and verified 3 page index files (90 B) in place, in "),
        "{err}"
    );
    assert_eq!(fs::read(copy.join("app.db")).unwrap(), c.composed);
    assert_eq!(fs::read(copy.join("other.db")).unwrap(), c.other);
    assert_eq!(
        fs::read(copy.join(".patches/2/app.db")).unwrap(),
        c.patches[1]
    );
    assert_eq!(mode_of(&copy.join(".patches")), 0o750);
    assert_eq!(
        mode_of(&copy.join(".patches/1")),
        mode_of(&c.data().join(".patches/1"))
    );
    assert_eq!(mode_of(&copy.join("app.db")), 0o644);
    assert_eq!(
        fs::read_to_string(copy.join(".bakedb-verified")).unwrap(),
        format!("{}\n", c.root.digest)
    );
    assert_eq!(
        c.snapshot(),
        before,
        "the image's data or /etc/bakedb changed"
    );
    assert!(!c.data().join(".bakedb-verified").exists());
}

#[test]
fn plan_names_the_copy_and_writes_nothing() {
    let r = root("copyplan", SQLITE_PROFILE);
    let copy = copy_dir(&r);
    let o = out(init(&r)
        .env("BAKEDB_DATA_COPY_DIR", &copy)
        .args(["--plan", "true"]));
    let plan = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    for line in [
        format!(
            "  copy     {}/var/lib/bakedb into {} (BAKEDB_DATA_COPY_DIR), verified as it is read, unless {}/.bakedb-verified holds this image's copy already",
            r.dir.display(),
            copy.display(),
            copy.display()
        ),
        format!(
            "  tune     profile sqlite-readonly: env BAKEDB_DATABASE={}/app.db",
            copy.display()
        ),
    ] {
        assert!(plan.contains(&line), "plan lacks {line:?}:\n{plan}");
    }
    assert_eq!(fs::read_dir(&copy).unwrap().count(), 0);
    // --verify-only checks the image as stored and copies nothing.
    let o = out(init(&r)
        .env("BAKEDB_DATA_COPY_DIR", &copy)
        .arg("--verify-only"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(fs::read_dir(&copy).unwrap().count(), 0);
}
