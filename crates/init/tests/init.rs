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
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        // CI runs as root by contract; there a skip would hide the privilege drop.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the tests as root"
        );
        eprintln!("skipped: needs root to drop privileges");
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
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the tests as root"
        );
        eprintln!("skipped: needs root to drop privileges");
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
