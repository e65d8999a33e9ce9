//! bakedb-init, the ENTRYPOINT of every image, in the real runtimes: runc (a bundle umoci
//! unpacked as root, tampered with on disk), docker and podman (containers created, tampered
//! with by `cp`, then started). Each image is built on the busybox fixture with the data of a
//! small SQLite database.
//!
//! What is proved: untouched data verifies and the command runs with the profile's
//! environment; every kind of tampering (a flipped byte, a truncated, extended, added,
//! deleted, symlinked, FIFO or re-moded data file, a symlinked data directory, a swapped,
//! forged or removed image.json, a wrong or missing BAKEDB_DATA_DIGEST) ends in exit 3 with
//! one line naming what is wrong, and the command never runs; BAKEDB_VERIFY=off starts anyway
//! with a warning; `docker stop`/`podman stop` reach a cooperative child in exec and supervise
//! mode (it ends with its own code, not SIGKILL's 137), and supervise mode forwards every
//! documented signal and reaps orphans; exit codes and 128+signal propagate; started as root,
//! the command runs as the data owner with no capabilities, unless BAKEDB_RUN_AS_ROOT=1.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use bakedb_testkit::containers::{
    Container, Runc, docker_cli, podman, podman_cli, runc_and_umoci_as_root,
};

use crate::require;
use crate::util::{
    self, assert_process_user, build_sqlite, busybox_base, dir_with_db, make_db, run, run_ok,
    sha256_hex, stderr, stdout, test_dir, unique_name,
};

const INIT: &str = "/bakedb/init";
const DATA_DIR: &str = "/var/lib/bakedb";
const DATA_FILE: &str = "/var/lib/bakedb/app.db";
const IMAGE_JSON: &str = "/etc/bakedb/image.json";

/// What the probe prints first, and the file it leaves, when it runs.
const MARKER: &str = "RAN-COMMAND";
const MARKER_FILE: &str = "/tmp/ran-command";
/// The command the test images run: proves it ran (stdout and a file), as whom, as which PID
/// (and who PID 1 is), and with which of the profile's variables.
const PROBE: &str = r#"echo RAN-COMMAND; echo ran > /tmp/ran-command
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "pid=$$"
echo "pid1=$(cat /proc/1/comm)"
echo "db=$BAKEDB_DATABASE tmp=$SQLITE_TMPDIR"
while read k v; do case $k in CapEff:) echo "caps=$v";; esac; done < /proc/self/status
while read k a b c d; do case $k in Uid:) echo "pid1-uid=$a $b $c $d";; esac; done < /proc/1/status"#;

/// The lines init prints on stderr when all is well (the `verified` line goes on with sizes
/// and timings).
const VERIFIED: &str = "bakedb-init: verified 1 file, ";
const PROFILE_LINE: &str = "bakedb-init: profile sqlite-readonly: env BAKEDB_DATABASE=/var/lib/bakedb/app.db SQLITE_TMPDIR=/tmp";
const FAILED: &str = "bakedb-init: verification failed: ";
const NOT_STARTED: &str = "; the engine was not started";
const VERIFY_OFF_WARNING: &str = "bakedb-init: warning: BAKEDB_VERIFY=off: starting without checking the data against BAKEDB_DATA_DIGEST";
const DROPPED_ROOT: &str = "bakedb-init: running as 65532:65532, the data owner, instead of root";

/// A child that ends with 42 on SIGTERM and names every other forwarded signal it gets.
const COOPERATIVE: &str = r#"trap "exit 42" TERM
for s in HUP INT QUIT USR1 USR2 WINCH; do trap "echo got-$s" $s; done
echo ready
while :; do sleep 0.1; done"#;
/// The signals besides TERM that supervise mode forwards.
const FORWARDED: [&str; 6] = ["HUP", "INT", "QUIT", "USR1", "USR2", "WINCH"];

/// How long a container may take to print what a test waits for before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    )
}

/// `bakedb build` of `source` on the busybox base, with `cmd` as CMD.
fn build(dir: &Path, source: &str, output: &str, cmd: &[String]) -> Value {
    let base = format!("oci:{}:latest", busybox_base().display());
    let cmd = serde_json::to_string(cmd).unwrap();
    build_sqlite(dir, source, output, &["--base", &base, "--cmd", &cmd])
}

/// The bytes of /etc/bakedb/image.json in the image `tag` of the OCI layout `layout`, read
/// from its layers (bakedb writes gzip layers of many members).
fn image_json_in_layout(layout: &Path, tag: &str) -> Vec<u8> {
    let blob = |digest: &Value| {
        let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
        layout.join("blobs/sha256").join(hex)
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let descriptor = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}: {index}", layout.display()));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(blob(&descriptor["digest"])).unwrap()).unwrap();
    for layer in manifest["layers"].as_array().unwrap().iter().rev() {
        let file = std::fs::File::open(blob(&layer["digest"])).unwrap();
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(file));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap() == Path::new(&IMAGE_JSON[1..]) {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
                return bytes;
            }
        }
    }
    panic!("no {IMAGE_JSON} in {}:{tag}", layout.display())
}

/// The data file's bytes with the one in the middle inverted: same size, same mode.
fn flipped(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out[data.len() / 2] ^= 0xff;
    out
}

/// Write `bytes` to `path` with mode 0644, as the image has its data file.
fn write_0644(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// What a run of the probe must show when verification passed and the command ran, or None.
fn check_ran(
    out: &Output,
    code: i32,
    expect_stdout: &[&str],
    expect_stderr: &[&str],
) -> Option<String> {
    let (o, e) = (stdout(out), stderr(out));
    let mut wrong = Vec::new();
    if out.status.code() != Some(code) {
        wrong.push(format!("exit code {:?}, not {code}", out.status.code()));
    }
    if !o.lines().any(|l| l == MARKER) {
        wrong.push("the command did not run".into());
    }
    for needle in expect_stdout {
        if !o.lines().any(|l| l == *needle) {
            wrong.push(format!("no line {needle:?} on stdout"));
        }
    }
    for needle in expect_stderr {
        if !e.contains(needle) {
            wrong.push(format!("no {needle:?} on stderr"));
        }
    }
    (!wrong.is_empty()).then(|| format!("{}: {}", wrong.join("; "), describe(out)))
}

/// What is wrong with `out` as init refusing tampered data: it must exit 3 having printed
/// exactly one line of its own, the verification failure containing `fragment`, and the
/// command must not have run. None when all holds.
fn check_refused(out: &Output, fragment: &str) -> Option<String> {
    let e = stderr(out);
    let ours: Vec<&str> = e
        .lines()
        .filter(|l| l.starts_with("bakedb-init:"))
        .collect();
    let mut wrong = Vec::new();
    if out.status.code() != Some(3) {
        wrong.push(format!("exit code {:?}, not 3", out.status.code()));
    }
    match ours.as_slice() {
        [line] => {
            if !(line.starts_with(FAILED) && line.ends_with(NOT_STARTED)) {
                wrong.push(format!(
                    "the line is not `{FAILED}...{NOT_STARTED}`: {line:?}"
                ));
            }
            if !line.contains(fragment) {
                wrong.push(format!("the message does not say {fragment:?}"));
            }
        }
        lines => wrong.push(format!(
            "init printed {} lines, not one: {lines:?}",
            lines.len()
        )),
    }
    if stdout(out).contains(MARKER) {
        wrong.push("the command ran".into());
    }
    (!wrong.is_empty()).then(|| format!("{}: {}", wrong.join("; "), describe(out)))
}

fn assert_no_failures(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------
// runc

/// How one runc run differs from the image's config: process.args become /bakedb/init and
/// `command`; `user` replaces uid, gid and additionalGids and gives the process Docker's
/// default capabilities (umoci's config has only three, without CAP_SETUID and
/// CAP_SETGID, so root could not drop to the data owner); `env` sets (Some) or removes
/// (None) variables.
#[derive(Default)]
struct RunSpec<'a> {
    command: Vec<String>,
    user: Option<(u32, u32, &'a [u32])>,
    env: Vec<(&'a str, Option<String>)>,
    /// Keep umoci's capabilities even with `user`.
    umoci_caps: bool,
    /// A descriptor handed to the container as its fd 3 (`runc run --preserve-fds 1`).
    fd3: Option<std::os::fd::RawFd>,
}

/// The capabilities Docker gives a container by default.
const DOCKER_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// `runc run` of a bundle umoci unpacked, with its config.json changed for one run.
trait RunBundle {
    fn run(&self, bundle: &Path, spec: &RunSpec) -> Output;
}

impl RunBundle for Runc {
    fn run(&self, bundle: &Path, spec: &RunSpec) -> Output {
        // Every run starts from the config umoci wrote, not from the last run's changes.
        let config_path = bundle.join("config.json");
        let original = bundle.join("config.umoci.json");
        if !original.exists() {
            std::fs::copy(&config_path, &original).unwrap();
        }
        let mut config: Value = serde_json::from_slice(&std::fs::read(&original).unwrap()).unwrap();
        let process = &mut config["process"];
        process["terminal"] = Value::Bool(false);
        let mut args = vec![INIT.to_owned()];
        args.extend(spec.command.iter().cloned());
        process["args"] = args.into();
        if let Some((uid, gid, groups)) = spec.user {
            process["user"] = serde_json::json!({"uid": uid, "gid": gid, "additionalGids": groups});
            if !spec.umoci_caps {
                process["capabilities"] = serde_json::json!({
                    "bounding": DOCKER_CAPS,
                    "effective": DOCKER_CAPS,
                    "permitted": DOCKER_CAPS,
                });
            }
        }
        let mut env: Vec<String> = process["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        for (key, value) in &spec.env {
            env.retain(|kv| kv.split_once('=').map(|(k, _)| k) != Some(*key));
            if let Some(value) = value {
                env.push(format!("{key}={value}"));
            }
        }
        process["env"] = env.into();
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let mut cmd = self.cmd(&["run", "--bundle"]);
        cmd.arg(bundle);
        if let Some(fd) = spec.fd3 {
            cmd.args(["--preserve-fds", "1"]);
            // SAFETY: between fork and exec, only dup2/fcntl on descriptors this process owns.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    let r = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, 3)
                    };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        run(cmd.arg(unique_name("bakedb-e2e-init")))
    }
}

/// A copy of an unpacked bundle with owners, modes and links kept, to tamper with.
fn copy_bundle(pristine: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(pristine).arg(to));
}

/// umoci unpack as root: real ownership, and process.user from the image's User.
fn unpack(umoci: &Path, dir: &Path, image: &str, bundle: &str) -> PathBuf {
    run_ok(
        Command::new(umoci)
            .current_dir(dir)
            .args(["unpack", "--image", image, bundle]),
    );
    dir.join(bundle)
}

/// A runc bundle of an image built on busybox from a 300-row app.db, unpacked as root.
struct RuncFixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    runc: Runc,
    pristine: PathBuf,
    built: Value,
}

impl RuncFixture {
    /// None when a tool is missing or this is not root (only possible outside CI).
    fn new() -> Option<RuncFixture> {
        let (runc, umoci) = runc_and_umoci_as_root()?;
        let tmp = test_dir();
        let dir = tmp.path().to_owned();
        make_db(&dir.join("app.db"), 300);
        let built = build(&dir, "app.db", "oci:img:v1", &sh(PROBE));
        let pristine = unpack(&umoci, &dir, "img:v1", "pristine");
        let config: Value =
            serde_json::from_slice(&std::fs::read(pristine.join("config.json")).unwrap()).unwrap();
        // umoci carries the image's User and Env over; the tests rely on both.
        assert_process_user(&config, 65532, 65532);
        let data_digest = built["data_digest"].as_str().unwrap();
        assert!(
            config["process"]["env"]
                .as_array()
                .unwrap()
                .contains(&Value::from(format!("BAKEDB_DATA_DIGEST={data_digest}"))),
            "{}",
            config["process"]
        );
        assert_eq!(config["process"]["args"][0], INIT, "{}", config["process"]);
        Some(RuncFixture {
            runc: Runc::new(&runc, &dir.join("runc-state")),
            dir,
            _tmp: tmp,
            pristine,
            built,
        })
    }

    /// A fresh copy of the pristine bundle named `name`, changed by `tamper(rootfs)`.
    fn bundle(&self, name: &str, tamper: &dyn Fn(&Path)) -> PathBuf {
        let bundle = self.dir.join(name);
        copy_bundle(&self.pristine, &bundle);
        tamper(&bundle.join("rootfs"));
        bundle
    }

    fn pristine_data(&self) -> Vec<u8> {
        std::fs::read(self.pristine.join("rootfs").join(&DATA_FILE[1..])).unwrap()
    }

    fn data_digest(&self) -> &str {
        self.built["data_digest"].as_str().unwrap()
    }
}

fn probe() -> RunSpec<'static> {
    RunSpec {
        command: sh(PROBE),
        ..Default::default()
    }
}

/// The path of an absolute container path inside a rootfs.
fn inside(rootfs: &Path, path: &str) -> PathBuf {
    rootfs.join(&path[1..])
}

/// One tampering of a bundle: (name, what is done to the rootfs, changes to the
/// environment, what init must say).
type BundleCase = (
    &'static str,
    Box<dyn Fn(&Path)>,
    Vec<(&'static str, Option<String>)>,
    String,
);

#[test]
fn runc_refuses_every_kind_of_tampering_and_the_command_never_runs() {
    let Some(fx) = RuncFixture::new() else { return };
    let data = fx.pristine_data();
    let size = data.len();
    let sha = sha256_hex(&data);
    let image_json = std::fs::read(inside(&fx.pristine.join("rootfs"), IMAGE_JSON)).unwrap();
    let image_json_text = String::from_utf8(image_json.clone()).unwrap();
    assert!(
        image_json_text.contains(&format!("\"sha256\": \"{sha}\"")),
        "image.json does not record the unpacked data's sha256 {sha}:\n{image_json_text}"
    );
    let flipped_data = flipped(&data);
    let flipped_sha = sha256_hex(&flipped_data);

    // Another bakedb image's description: a database with other rows.
    std::fs::create_dir(fx.dir.join("other")).unwrap();
    make_db(&fx.dir.join("other/app.db"), 301);
    let other = build(&fx.dir, "other/app.db", "oci:img:other", &sh(PROBE));
    let other_json = image_json_in_layout(&fx.dir.join("img"), "other");
    assert_eq!(
        format!("sha256:{}", sha256_hex(&other_json)),
        other["data_digest"].as_str().unwrap()
    );
    assert_ne!(other_json, image_json);
    // A description forged to match the flipped data: only BAKEDB_DATA_DIGEST can tell.
    let forged_json = image_json_text.replace(&sha, &flipped_sha).into_bytes();
    assert_ne!(forged_json, image_json);

    // Untouched, it verifies, and the command runs as the image's User, as PID 1, with the
    // sqlite profile's environment.
    let bundle = fx.bundle("untouched", &|_| {});
    let out = fx.runc.run(&bundle, &probe());
    let mut failures: Vec<String> = check_ran_untouched(&out)
        .map(|f| format!("untouched: {f}"))
        .into_iter()
        .collect();
    if !inside(&bundle.join("rootfs"), MARKER_FILE).exists() {
        failures.push(format!("untouched: the probe left no {MARKER_FILE}"));
    }

    let data_file = |rootfs: &Path| inside(rootfs, DATA_FILE);
    let other_json_sha = sha256_hex(&other_json);
    let forged_sha = sha256_hex(&forged_json);
    let (flipped_for_case, forged_for_case, other_for_case) = (
        flipped_data.clone(),
        forged_json.clone(),
        other_json.clone(),
    );
    let cases: Vec<BundleCase> = vec![
        (
            "one byte flipped",
            Box::new(move |r| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(data_file(r))
                    .unwrap();
                f.write_all_at(&flipped_for_case[size / 2..size / 2 + 1], (size / 2) as u64)
                    .unwrap();
            }),
            vec![],
            format!(
                "{DATA_FILE}: sha256 is {flipped_sha}, image.json says {sha}: the contents were altered"
            ),
        ),
        (
            "truncated",
            Box::new(move |r| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(data_file(r))
                    .unwrap()
                    .set_len(10)
                    .unwrap()
            }),
            vec![],
            format!("{DATA_FILE} has 10 bytes, image.json says {size}: the file was truncated"),
        ),
        (
            "extended",
            Box::new(move |r| {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(data_file(r))
                    .unwrap();
                std::io::Write::write_all(&mut f, b"x").unwrap();
            }),
            vec![],
            format!(
                "{DATA_FILE} has {} bytes, image.json says {size}: the file was extended",
                size + 1
            ),
        ),
        (
            "a file added",
            Box::new(|r| write_0644(&inside(r, DATA_DIR).join("extra.db"), b"extra")),
            vec![],
            format!(
                "{DATA_DIR}/extra.db is a regular file that image.json does not list: something was added to the data"
            ),
        ),
        (
            "a directory added",
            Box::new(|r| std::fs::create_dir(inside(r, DATA_DIR).join("extra")).unwrap()),
            vec![],
            format!("{DATA_DIR}/extra is a directory that image.json does not list"),
        ),
        (
            "deleted",
            Box::new(move |r| std::fs::remove_file(data_file(r)).unwrap()),
            vec![],
            format!("{DATA_FILE} is missing: image.json lists it with {size} bytes"),
        ),
        (
            "replaced by a symlink to /etc/passwd",
            Box::new(move |r| {
                std::fs::remove_file(data_file(r)).unwrap();
                std::os::unix::fs::symlink("/etc/passwd", data_file(r)).unwrap();
            }),
            vec![],
            format!(
                "{DATA_FILE} is a symbolic link (to /etc/passwd); the image has no links in its data"
            ),
        ),
        (
            "the data directory replaced by a symlink to a copy elsewhere",
            Box::new(|r| {
                let moved = inside(r, "/var/lib/elsewhere");
                std::fs::rename(inside(r, DATA_DIR), &moved).unwrap();
                std::os::unix::fs::symlink("elsewhere", inside(r, DATA_DIR)).unwrap();
            }),
            vec![],
            format!("data directory {DATA_DIR} is a symbolic link, not a directory"),
        ),
        (
            "replaced by a FIFO",
            Box::new(move |r| {
                std::fs::remove_file(data_file(r)).unwrap();
                let path =
                    std::ffi::CString::new(data_file(r).into_os_string().into_encoded_bytes())
                        .unwrap();
                // SAFETY: a valid NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
            }),
            vec![],
            format!("{DATA_FILE} is a FIFO; image.json lists a regular file there"),
        ),
        (
            "made writable by all",
            Box::new(move |r| {
                std::fs::set_permissions(data_file(r), std::fs::Permissions::from_mode(0o666))
                    .unwrap()
            }),
            vec![],
            format!("{DATA_FILE} has mode 0666, image.json says 0644"),
        ),
        (
            "image.json swapped for another image's",
            Box::new(move |r| std::fs::write(inside(r, IMAGE_JSON), &other_for_case).unwrap()),
            vec![],
            format!(
                "{IMAGE_JSON}: sha256 is sha256:{other_json_sha}, the image config promises {} (BAKEDB_DATA_DIGEST): the data description was replaced or altered",
                fx.data_digest()
            ),
        ),
        (
            "a byte flipped and image.json forged to match",
            Box::new(move |r| {
                std::fs::write(data_file(r), &flipped_data).unwrap();
                std::fs::write(inside(r, IMAGE_JSON), &forged_for_case).unwrap();
            }),
            vec![],
            format!(
                "{IMAGE_JSON}: sha256 is sha256:{forged_sha}, the image config promises {} (BAKEDB_DATA_DIGEST): the data description was replaced or altered",
                fx.data_digest()
            ),
        ),
        (
            "image.json removed",
            Box::new(|r| std::fs::remove_file(inside(r, IMAGE_JSON)).unwrap()),
            vec![],
            format!(
                "reading {IMAGE_JSON}: No such file or directory (os error 2); this image was not built by bakedb build, or the file was removed"
            ),
        ),
        (
            "BAKEDB_DATA_DIGEST of another image",
            Box::new(|_| {}),
            vec![(
                "BAKEDB_DATA_DIGEST",
                Some(other["data_digest"].as_str().unwrap().to_owned()),
            )],
            format!(
                "the image config promises {} (BAKEDB_DATA_DIGEST): the data description was replaced or altered",
                other["data_digest"].as_str().unwrap()
            ),
        ),
        (
            "BAKEDB_DATA_DIGEST removed",
            Box::new(|_| {}),
            vec![("BAKEDB_DATA_DIGEST", None)],
            "BAKEDB_DATA_DIGEST is not set".to_owned(),
        ),
    ];
    for (n, (name, tamper, env, fragment)) in cases.into_iter().enumerate() {
        let bundle = fx.bundle(&format!("case{n}"), &*tamper);
        let out = fx.runc.run(&bundle, &RunSpec { env, ..probe() });
        if let Some(f) = check_refused(&out, &fragment) {
            failures.push(format!("{name}: {f}"));
        }
        if inside(&bundle.join("rootfs"), MARKER_FILE).exists() {
            failures.push(format!("{name}: the command ran ({MARKER_FILE} exists)"));
        }
    }
    assert_no_failures(failures);
}

/// A file larger than a chunk is verified chunk by chunk, by several workers that read
/// ahead of what they hash: a byte flipped in the first, the middle or the last (short)
/// chunk is found there and named by its range, and the command never runs.
#[test]
fn runc_refuses_a_flipped_byte_in_any_chunk_of_a_large_file() {
    let Some((runc, umoci)) = runc_and_umoci_as_root() else {
        return;
    };
    let dir = test_dir();
    let d = dir.path();
    // Three chunks of 16 MiB, the last one short.
    util::make_big_db(&d.join("app.db"), 36);
    build(d, "app.db", "oci:img:v1", &sh(PROBE));
    let pristine = unpack(&umoci, d, "img:v1", "pristine");
    let runc = Runc::new(&runc, &d.join("runc-state"));
    let image_json: Value = serde_json::from_slice(
        &std::fs::read(inside(&pristine.join("rootfs"), IMAGE_JSON)).unwrap(),
    )
    .unwrap();
    let chunk_size = image_json["chunk_size"].as_u64().unwrap();
    let size = image_json["files"][0]["size"].as_u64().unwrap();
    let chunks = image_json["files"][0]["chunks"].as_array().unwrap().clone();
    assert_eq!(chunks.len(), 3, "{image_json}");
    assert!(
        size > 2 * chunk_size && size < 3 * chunk_size,
        "{image_json}"
    );

    let out = runc.run(&pristine, &probe());
    let mut failures: Vec<String> =
        check_ran(&out, 0, &["uid=65532 gid=65532 groups=65532"], &[VERIFIED])
            .map(|f| format!("untouched: {f}"))
            .into_iter()
            .collect();

    // The first byte of the file, the middle of chunk 2, the last byte of the file.
    for (n, offset) in [(1, 0), (2, chunk_size + chunk_size / 2), (3, size - 1)] {
        let tampered = d.join(format!("tampered-{n}"));
        copy_bundle(&pristine, &tampered);
        let data = inside(&tampered.join("rootfs"), DATA_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data)
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset).unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], offset).unwrap();
        let (start, end) = ((n - 1) * chunk_size, (n * chunk_size).min(size));
        let mut chunk = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut chunk, start).unwrap();
        drop(file);
        let expected = format!(
            "{DATA_FILE}: bytes {start}..{end} (chunk {n} of 3) have sha256 {}, image.json says {}: the contents were altered",
            sha256_hex(&chunk),
            chunks[n as usize - 1].as_str().unwrap()
        );
        let out = runc.run(&tampered, &probe());
        if let Some(f) = check_refused(&out, &expected) {
            failures.push(format!("a byte flipped in chunk {n}: {f}"));
        }
    }
    assert_no_failures(failures);
}

#[test]
fn runc_with_verification_off_starts_tampered_data_with_a_warning() {
    let Some(fx) = RuncFixture::new() else { return };
    let flipped_data = flipped(&fx.pristine_data());
    let bundle = fx.bundle("flipped", &|r| {
        std::fs::write(inside(r, DATA_FILE), &flipped_data).unwrap()
    });
    // The control: the same bundle is refused with verification on.
    let refused = fx.runc.run(&bundle, &probe());
    assert_no_failures(
        check_refused(&refused, "the contents were altered")
            .into_iter()
            .collect(),
    );
    for off in ["off", "0", "false"] {
        let out = fx.runc.run(
            &bundle,
            &RunSpec {
                env: vec![("BAKEDB_VERIFY", Some(off.into()))],
                ..probe()
            },
        );
        assert_no_failures(
            check_ran(&out, 0, &[], &[VERIFY_OFF_WARNING, PROFILE_LINE])
                .map(|f| format!("BAKEDB_VERIFY={off}: {f}"))
                .into_iter()
                .collect(),
        );
        assert!(
            !stderr(&out).contains("bakedb-init: verified"),
            "BAKEDB_VERIFY={off} verified anyway: {}",
            describe(&out)
        );
    }
    // Not a switch: a usage error, and nothing starts.
    let out = fx.runc.run(
        &bundle,
        &RunSpec {
            env: vec![("BAKEDB_VERIFY", Some("maybe".into()))],
            ..probe()
        },
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("BAKEDB_VERIFY=\"maybe\" is not a switch"),
        "{}",
        describe(&out)
    );
    assert!(!stdout(&out).contains(MARKER), "{}", describe(&out));
    // Nor is a copy rule other than always and patched.
    let out = fx.runc.run(
        &bundle,
        &RunSpec {
            env: vec![("BAKEDB_DATA_COPY_WHEN", Some("sometimes".into()))],
            ..probe()
        },
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("BAKEDB_DATA_COPY_WHEN=\"sometimes\" is not always or patched"),
        "{}",
        describe(&out)
    );
    assert!(!stdout(&out).contains(MARKER), "{}", describe(&out));
}

#[test]
fn runc_started_as_root_runs_the_command_as_the_data_owner() {
    let Some(fx) = RuncFixture::new() else { return };
    let bundle = fx.bundle("root", &|_| {});
    let root = Some((0, 0, &[0u32, 10][..]));
    let mut failures = Vec::new();
    // Dropped: uid, gid and supplementary groups are the data owner's, no capability is left,
    // and in supervise mode init itself (PID 1) is no longer root either.
    for (mode, env, pid_line, init_uid) in [
        ("exec", vec![], "pid=1", "pid1=sh"),
        (
            "supervise",
            vec![("BAKEDB_INIT_SUPERVISE", Some("1".to_owned()))],
            "pid1=init",
            "pid1-uid=65532 65532 65532 65532",
        ),
    ] {
        let out = fx.runc.run(
            &bundle,
            &RunSpec {
                user: root,
                env,
                ..probe()
            },
        );
        if let Some(f) = check_ran(
            &out,
            0,
            &[
                "uid=65532 gid=65532 groups=65532",
                "caps=0000000000000000",
                pid_line,
                init_uid,
            ],
            &[VERIFIED, DROPPED_ROOT, PROFILE_LINE],
        ) {
            failures.push(format!("root, {mode} mode: {f}"));
        }
    }
    // Told to stay root: it does, and says so.
    let out = fx.runc.run(
        &bundle,
        &RunSpec {
            user: root,
            env: vec![("BAKEDB_RUN_AS_ROOT", Some("1".into()))],
            ..probe()
        },
    );
    if let Some(f) = check_ran(
        &out,
        0,
        &["pid1-uid=0 0 0 0"],
        &[
            VERIFIED,
            "bakedb-init: warning: running sh as root (BAKEDB_RUN_AS_ROOT=1)",
        ],
    ) {
        failures.push(format!("BAKEDB_RUN_AS_ROOT=1: {f}"));
    }
    if !stdout(&out).lines().any(|l| l.starts_with("uid=0 gid=0 ")) {
        failures.push(format!(
            "BAKEDB_RUN_AS_ROOT=1 ran as another user: {}",
            describe(&out)
        ));
    }
    // Started as the image's User (not root), nothing is dropped or said about it.
    let out = fx.runc.run(&bundle, &probe());
    if let Some(f) = check_ran(&out, 0, &["uid=65532 gid=65532 groups=65532"], &[VERIFIED]) {
        failures.push(format!("as the image's User: {f}"));
    }
    if stderr(&out).contains("instead of root") {
        failures.push(format!(
            "as the image's User, init claims it dropped root: {}",
            describe(&out)
        ));
    }
    // Root without CAP_SETGID and CAP_SETUID (umoci's config) cannot drop to the data owner:
    // init stops with a setup error instead of running the command as root.
    let out = fx.runc.run(
        &bundle,
        &RunSpec {
            user: root,
            umoci_caps: true,
            ..probe()
        },
    );
    if let Some(f) = check_exit(
        &out,
        1,
        Some(
            "bakedb-init: dropping root to the data owner: setgroups([65532]): Operation not permitted",
        ),
    ) {
        failures.push(format!("root without CAP_SETGID: {f}"));
    }
    if stdout(&out).contains(MARKER) {
        failures.push(format!(
            "root without CAP_SETGID: the command ran: {}",
            describe(&out)
        ));
    }
    // Root does not skip verification: tampered data is refused before anything runs.
    let tampered = fx.bundle("root-tampered", &|r| {
        write_0644(&inside(r, DATA_DIR).join("extra.db"), b"extra")
    });
    let out = fx.runc.run(
        &tampered,
        &RunSpec {
            user: root,
            ..probe()
        },
    );
    if let Some(f) = check_refused(
        &out,
        "extra.db is a regular file that image.json does not list",
    ) {
        failures.push(format!("root, tampered: {f}"));
    }
    assert_no_failures(failures);
}

#[test]
fn runc_exit_codes_propagate() {
    let Some(fx) = RuncFixture::new() else { return };
    let bundle = fx.bundle("codes", &|_| {});
    let mut failures = Vec::new();
    for (supervise, command, code, message) in exit_code_cases() {
        let mut env = vec![];
        if supervise {
            env.push(("BAKEDB_INIT_SUPERVISE", Some("1".to_owned())));
        }
        let out = fx.runc.run(
            &bundle,
            &RunSpec {
                command: command.clone(),
                env,
                ..Default::default()
            },
        );
        if let Some(f) = check_exit(&out, code, message) {
            failures.push(format!("{command:?} (supervise {supervise}): {f}"));
        }
    }
    assert_no_failures(failures);
}

#[test]
fn runc_profile_env_yields_to_the_containers_own() {
    let Some(fx) = RuncFixture::new() else { return };
    let bundle = fx.bundle("env", &|_| {});
    let out = fx.runc.run(
        &bundle,
        &RunSpec {
            env: vec![("BAKEDB_DATABASE", Some("/elsewhere.db".into()))],
            ..probe()
        },
    );
    assert_no_failures(
        check_ran(
            &out,
            0,
            &["db=/elsewhere.db tmp=/tmp"],
            &["bakedb-init: profile sqlite-readonly: env SQLITE_TMPDIR=/tmp; env BAKEDB_DATABASE kept as the container sets them"],
        )
        .into_iter()
        .collect(),
    );
}

#[test]
fn runc_supervise_mode_closes_inherited_descriptors() {
    let Some(fx) = RuncFixture::new() else { return };
    let bundle = fx.bundle("fds", &|_| {});
    let extra = std::fs::File::open(fx.dir.join("app.db")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&extra);
    // ls, a child of the shell, lists the shell's descriptors: none are opened for it (a
    // command substitution or pipe would add one).
    let list = sh("echo fds-begin; ls /proc/$$/fd; echo fds-end");
    let mut failures = Vec::new();
    // Exec mode hands the command what the runtime passed (socket activation relies on
    // that); supervise mode closes everything above stderr before it starts the child.
    for (mode, env, expected) in [
        ("exec", vec![], &["0", "1", "2", "3"][..]),
        (
            "supervise",
            vec![("BAKEDB_INIT_SUPERVISE", Some("1".to_owned()))],
            &["0", "1", "2"][..],
        ),
    ] {
        let out = fx.runc.run(
            &bundle,
            &RunSpec {
                command: list.clone(),
                env,
                fd3: Some(fd),
                ..Default::default()
            },
        );
        let listed: Vec<String> = stdout(&out)
            .lines()
            .skip_while(|l| *l != "fds-begin")
            .skip(1)
            .take_while(|l| *l != "fds-end")
            .map(str::to_owned)
            .collect();
        if !out.status.success() || listed != expected {
            failures.push(format!(
                "{mode} mode: expected {expected:?}: {}",
                describe(&out)
            ));
        }
    }
    assert_no_failures(failures);
}

/// (supervise, command, exit code, a message init prints on stderr), for exec and supervise
/// mode. A signal that kills the command shows as 128+N only in supervise mode: in exec
/// mode the command is PID 1, which the kernel does not let signal itself to death.
fn exit_code_cases() -> Vec<(bool, Vec<String>, i32, Option<&'static str>)> {
    // Each case with the modes it holds in: exec and supervise, supervise or exec only.
    type InModes = (&'static [bool], Vec<String>, i32, Option<&'static str>);
    const BOTH: &[bool] = &[false, true];
    let cases: [InModes; 9] = [
        (BOTH, sh("exit 7"), 7, None),
        (BOTH, sh("exit 0"), 0, None),
        (&[true], sh("kill -KILL $$"), 137, None),
        (&[true], sh("kill -TERM $$"), 143, None),
        (&[true], sh("kill -USR1 $$"), 138, None),
        (
            BOTH,
            vec!["no-such-program".into()],
            127,
            Some("no-such-program: not found in PATH="),
        ),
        (
            &[false],
            vec!["/no/such/program".into()],
            127,
            Some("/no/such/program: No such file or directory"),
        ),
        (
            BOTH,
            vec!["/etc/passwd".into()],
            126,
            Some("/etc/passwd is not an executable file"),
        ),
        (
            &[false],
            vec![],
            2,
            Some("bakedb-init: no command to start: the image has no CMD and none was given"),
        ),
    ];
    cases
        .into_iter()
        .flat_map(|(modes, command, code, message)| {
            modes
                .iter()
                .map(move |&supervise| (supervise, command.clone(), code, message))
        })
        .collect()
}

/// What the probe and init print when untouched data verifies and the command runs as the
/// image's User, as PID 1, with the sqlite profile's environment.
fn check_ran_untouched(out: &Output) -> Option<String> {
    check_ran(
        out,
        0,
        &[
            "uid=65532 gid=65532 groups=65532",
            "pid=1",
            "pid1=sh",
            "db=/var/lib/bakedb/app.db tmp=/tmp",
        ],
        &[VERIFIED, PROFILE_LINE],
    )
}

fn check_exit(out: &Output, code: i32, message: Option<&str>) -> Option<String> {
    let mut wrong = Vec::new();
    if out.status.code() != Some(code) {
        wrong.push(format!("exit code {:?}, not {code}", out.status.code()));
    }
    if let Some(message) = message
        && !stderr(out).contains(message)
    {
        wrong.push(format!("no {message:?} on stderr"));
    }
    (!wrong.is_empty()).then(|| format!("{}: {}", wrong.join("; "), describe(out)))
}

/// The init binary of an image, run on the host against a rootless-unpacked bundle with
/// `--root`: `--verify-only` and `--plan` exit 0 on untouched data, `--verify-only` exits 3
/// on tampered data, and neither starts anything.
#[test]
fn init_verify_only_and_plan_judge_an_unpacked_rootfs_from_the_host() {
    let umoci = require!("umoci");
    let dir = test_dir();
    let d = dir.path();
    // The test directory and the bundle stay private (0700): --verify-only starts nothing,
    // so init reads as whoever runs it and does not drop root.
    make_db(&d.join("app.db"), 300);
    let built = build(d, "app.db", "oci:img:v1", &sh(PROBE));
    run_ok(Command::new(&umoci).current_dir(d).args([
        "unpack",
        "--rootless",
        "--image",
        "img:v1",
        "bundle",
    ]));
    let rootfs = d.join("bundle/rootfs");
    let data_digest = built["data_digest"].as_str().unwrap();
    let init = |args: &[&str]| {
        run(Command::new(inside(&rootfs, INIT))
            .arg("--root")
            .arg(&rootfs)
            .args(args)
            .env_clear()
            .env("BAKEDB_DATA_DIGEST", data_digest)
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null()))
    };
    let mut failures = Vec::new();
    let out = init(&["--verify-only"]);
    if !out.status.success() || !stderr(&out).contains(VERIFIED) {
        failures.push(format!("--verify-only, untouched: {}", describe(&out)));
    }
    // The plan shows the command as given; run, it would print RAN-2.
    let out = init(&["--plan", "--", "sh", "-c", "echo RAN-$((1+1))"]);
    let plan = stdout(&out);
    if !out.status.success()
        || !plan.starts_with("bakedb-init plan (sqlite engine)\n")
        || !plan.contains(&format!("BAKEDB_DATA_DIGEST={data_digest}"))
        || !plan.contains("1 file, 16.00 KiB")
        || !plan.contains(r#"["sh", "-c", "echo RAN-$((1+1))"]"#)
        || plan.contains("RAN-2")
        || stderr(&out).contains("RAN-2")
    {
        failures.push(format!("--plan: {}", describe(&out)));
    }
    let data = inside(&rootfs, DATA_FILE);
    let bytes = std::fs::read(&data).unwrap();
    write_0644(&data, &flipped(&bytes));
    let out = init(&["--verify-only"]);
    let expected = format!(
        "{}: sha256 is {}, image.json says {}: the contents were altered",
        data.display(),
        sha256_hex(&flipped(&bytes)),
        sha256_hex(&bytes)
    );
    if let Some(f) = check_refused(&out, &expected) {
        failures.push(format!("--verify-only, one byte flipped: {f}"));
    }
    assert_no_failures(failures);
}

// ---------------------------------------------------------------------------------------
// docker

/// Wait until the container's stdout has the line `line`; fails the test if it exits first
/// or PATIENCE runs out.
fn wait_for_line(container: &Container, line: &str) {
    let started = Instant::now();
    loop {
        let logs = container.logs_output();
        if stdout(&logs).lines().any(|l| l == line) {
            return;
        }
        let running = container.running();
        assert!(
            running && started.elapsed() < PATIENCE,
            "{} never printed {line:?} (running: {running}): {}",
            container.name,
            describe(&logs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `bakedb build` of a 300-row app.db (made on first use) on busybox into a docker-archive,
/// loaded into docker.
fn docker_image(docker: &Path, dir: &Path, cmd: &[String]) -> crate::util::DockerImage {
    if !dir.join("app.db").exists() {
        make_db(&dir.join("app.db"), 300);
    }
    let name = format!("bakedb-e2e/{}:v1", unique_name("init"));
    let archive = format!("{}.docker.tar", unique_name("img"));
    build(
        dir,
        "app.db",
        &format!("docker-archive:{archive}:{name}"),
        cmd,
    );
    let image = crate::util::DockerImage {
        docker: docker.to_owned(),
        name,
    };
    let loaded = run_ok(
        Command::new(docker)
            .current_dir(dir)
            .args(["load", "--input", &archive]),
    );
    assert!(
        stdout(&loaded).contains(&format!("Loaded image: {}", image.name)),
        "{}",
        stdout(&loaded)
    );
    image
}

/// `docker create` (no network) of `image` with `-e` for each of `env` and `args` as the
/// command (none: the image's CMD).
fn docker_create(docker: &Path, image: &str, env: &[&str], args: &[String]) -> Container {
    let container = Container::new(docker_cli(docker), unique_name("bakedb-e2e-init"));
    let mut cmd = container.cmd(&["create", "--network", "none", "--name", &container.name]);
    for e in env {
        cmd.args(["--env", e]);
    }
    run_ok(cmd.arg(image).args(args));
    container
}

/// `docker run --rm` (no network), its output and exit code.
fn docker_run(docker: &Path, extra: &[&str], image: &str, args: &[String]) -> Output {
    run(Command::new(docker)
        .args(["run", "--rm", "--network", "none"])
        .args(extra)
        .arg(image)
        .args(args)
        .stdin(Stdio::null()))
}

/// One tampering through `cp` into a created container: (name, files to copy in as (host
/// file, container path), `--env` settings, what init must say, or None when the command
/// must run).
type CpCase = (
    &'static str,
    Vec<(PathBuf, String)>,
    Vec<&'static str>,
    Option<String>,
);

/// The tampering done through `cp`, shared by docker and podman.
fn cp_cases(
    dir: &Path,
    data: &[u8],
    image_json: &[u8],
    other_json: &[u8],
    data_digest: &str,
) -> Vec<CpCase> {
    let sha = sha256_hex(data);
    let flipped_data = flipped(data);
    let flipped_sha = sha256_hex(&flipped_data);
    let files = dir.join("cp-files");
    std::fs::create_dir_all(&files).unwrap();
    write_0644(&files.join("flipped.db"), &flipped_data);
    write_0644(&files.join("extra.db"), b"extra");
    write_0644(&files.join("other-image.json"), other_json);
    let forged = String::from_utf8(image_json.to_vec())
        .unwrap()
        .replace(&sha, &flipped_sha);
    write_0644(&files.join("forged-image.json"), forged.as_bytes());
    let promises = format!(
        "the image config promises {data_digest} (BAKEDB_DATA_DIGEST): the data description was replaced or altered"
    );
    vec![
        ("untouched", vec![], vec![], None),
        (
            "one byte flipped",
            vec![(files.join("flipped.db"), DATA_FILE.into())],
            vec![],
            Some(format!(
                "{DATA_FILE}: sha256 is {flipped_sha}, image.json says {sha}: the contents were altered"
            )),
        ),
        (
            "a file added",
            vec![(files.join("extra.db"), format!("{DATA_DIR}/extra.db"))],
            vec![],
            Some(format!(
                "{DATA_DIR}/extra.db is a regular file that image.json does not list: something was added to the data"
            )),
        ),
        (
            "image.json swapped for another image's",
            vec![(files.join("other-image.json"), IMAGE_JSON.into())],
            vec![],
            Some(format!(
                "{IMAGE_JSON}: sha256 is sha256:{}, {promises}",
                sha256_hex(other_json)
            )),
        ),
        (
            "a byte flipped and image.json forged to match",
            vec![
                (files.join("flipped.db"), DATA_FILE.into()),
                (files.join("forged-image.json"), IMAGE_JSON.into()),
            ],
            vec![],
            Some(format!(
                "{IMAGE_JSON}: sha256 is sha256:{}, {promises}",
                sha256_hex(forged.as_bytes())
            )),
        ),
        (
            "one byte flipped, BAKEDB_VERIFY=off",
            vec![(files.join("flipped.db"), DATA_FILE.into())],
            vec!["BAKEDB_VERIFY=off"],
            None,
        ),
    ]
}

/// Create a container per case, copy the case's files in, start it attached, and judge.
fn run_cp_cases(
    what: &str,
    create: &dyn Fn(&[&str]) -> Container,
    cases: Vec<CpCase>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, files, env, refusal) in cases {
        let container = create(&env);
        for (host, path) in &files {
            container.copy_in(host, path);
        }
        let out = container.start_attached();
        let code = container.exit_code();
        let verify_off = env.contains(&"BAKEDB_VERIFY=off");
        let failure = match &refusal {
            Some(fragment) => check_refused(&out, fragment),
            None if verify_off => check_ran(&out, 0, &[], &[VERIFY_OFF_WARNING, PROFILE_LINE]),
            None => check_ran_untouched(&out),
        };
        if let Some(f) = failure {
            failures.push(format!("{what}, {name}: {f}"));
        }
        let expected_code = if refusal.is_some() { 3 } else { 0 };
        if code != expected_code {
            failures.push(format!(
                "{what}, {name}: inspect says exit code {code}, not {expected_code}"
            ));
        }
        if verify_off && stderr(&out).contains("bakedb-init: verified") {
            failures.push(format!(
                "{what}, {name}: verified anyway: {}",
                describe(&out)
            ));
        }
        // The file the probe writes exists exactly when the command ran (`cp` to `-`
        // streams it as a tar, and fails when it is absent).
        let marker =
            run(&mut container.cmd(&["cp", &format!("{}:{MARKER_FILE}", container.name), "-"]));
        if marker.status.success() != refusal.is_none() {
            failures.push(format!(
                "{what}, {name}: {MARKER_FILE} {}: {}",
                if marker.status.success() {
                    "exists"
                } else {
                    "is missing"
                },
                describe(&out)
            ));
        }
    }
    failures
}

#[test]
fn docker_verifies_the_data_and_refuses_tampered_containers() {
    require!("umoci");
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let d = dir.path();
    let image = docker_image(&docker, d, &sh(PROBE));
    // Another image's description, from a layout beside it.
    std::fs::create_dir(d.join("other")).unwrap();
    make_db(&d.join("other/app.db"), 301);
    build(d, "other/app.db", "oci:other-img:v1", &sh(PROBE));
    let other_json = image_json_in_layout(&d.join("other-img"), "v1");

    // The data and description as the container sees them.
    let source = docker_create(&docker, &image.name, &[], &[]);
    source.copy_out(DATA_FILE, &d.join("app.db.image"));
    source.copy_out(IMAGE_JSON, &d.join("image.json.image"));
    let data = std::fs::read(d.join("app.db.image")).unwrap();
    let image_json = std::fs::read(d.join("image.json.image")).unwrap();
    let data_digest = format!("sha256:{}", sha256_hex(&image_json));

    let cases = cp_cases(d, &data, &image_json, &other_json, &data_digest);
    let mut failures = run_cp_cases(
        "docker",
        &|env| docker_create(&docker, &image.name, env, &[]),
        cases,
    );
    // A read-only root filesystem: init only reads (the probe writes to the tmpfs).
    let out = docker_run(
        &docker,
        &["--read-only", "--tmpfs", "/tmp"],
        &image.name,
        &[],
    );
    if let Some(f) = check_ran(
        &out,
        0,
        &["uid=65532 gid=65532 groups=65532"],
        &[VERIFIED, PROFILE_LINE],
    ) {
        failures.push(format!("docker, --read-only: {f}"));
    }
    assert_no_failures(failures);
}

#[test]
fn docker_stop_ends_a_cooperative_child_with_its_exit_code_and_signals_are_forwarded() {
    require!("umoci");
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let image = docker_image(&docker, dir.path(), &sh(COOPERATIVE));
    for supervise in ["0", "1"] {
        let container = Container::new(docker_cli(&docker), unique_name("bakedb-e2e-init"));
        run_ok(&mut container.cmd(&[
            "run",
            "--detach",
            "--network",
            "none",
            "--name",
            &container.name,
            "--env",
            &format!("BAKEDB_INIT_SUPERVISE={supervise}"),
            &image.name,
        ]));
        wait_for_line(&container, "ready");
        // Each forwarded signal reaches the child's trap (PID 1 itself in exec mode).
        for sig in FORWARDED {
            run_ok(&mut container.cmd(&["kill", "--signal", sig, &container.name]));
            wait_for_line(&container, &format!("got-{sig}"));
        }
        // The child exits 42 on SIGTERM; had it not got SIGTERM, docker would SIGKILL it
        // after 2 s and report 137.
        run_ok(&mut container.cmd(&["stop", "--time", "2", &container.name]));
        let code = container.exit_code();
        assert_eq!(
            code,
            42,
            "BAKEDB_INIT_SUPERVISE={supervise}: docker stop: {}",
            describe(&container.logs_output())
        );
    }
}

#[test]
fn docker_supervise_reaps_orphans_of_the_child() {
    require!("umoci");
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let image = docker_image(&docker, dir.path(), &sh(PROBE));
    // A grandchild outlives its parent shell, is reparented to PID 1 (init), exits after two
    // seconds, and must then be reaped: its /proc entry goes away. A zombie would stay.
    let script = r#"sh -c 'sleep 2 & echo $! > /tmp/orphan'
pid=$(cat /tmp/orphan)
echo "pid1=$(cat /proc/1/comm)"
while read k v; do case $k in PPid:) echo "orphan-ppid=$v";; esac; done < /proc/$pid/status
i=0
while test -e /proc/$pid; do
  i=$((i+1))
  if test $i -gt 100; then
    echo ZOMBIE; cat /proc/$pid/status; exit 1
  fi
  sleep 0.1
done
echo REAPED"#;
    let out = docker_run(
        &docker,
        &["--env", "BAKEDB_INIT_SUPERVISE=1"],
        &image.name,
        &sh(script),
    );
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert!(
        out.status.success()
            && lines.contains(&"pid1=init".to_owned())
            && lines.contains(&"orphan-ppid=1".to_owned())
            && lines.last().map(String::as_str) == Some("REAPED"),
        "{}",
        describe(&out)
    );
}

#[test]
fn docker_exit_codes_propagate() {
    require!("umoci");
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let image = docker_image(&docker, dir.path(), &sh(PROBE));
    let mut failures = Vec::new();
    for (supervise, command, code, message) in exit_code_cases() {
        let env = format!("BAKEDB_INIT_SUPERVISE={}", u8::from(supervise));
        let out = if command.is_empty() {
            // No command at all: docker drops the image's CMD when the entrypoint is set.
            docker_run(
                &docker,
                &["--env", &env, "--entrypoint", INIT],
                &image.name,
                &[],
            )
        } else {
            docker_run(&docker, &["--env", &env], &image.name, &command)
        };
        if let Some(f) = check_exit(&out, code, message) {
            failures.push(format!("{command:?} (supervise {supervise}): {f}"));
        }
    }
    // An image built with an empty CMD and run without a command: a usage error.
    let no_cmd = docker_image(&docker, dir.path(), &[]);
    let config = run_ok(Command::new(&docker).args([
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}}",
        &no_cmd.name,
    ]));
    assert_eq!(stdout(&config).trim(), r#"["/bakedb/init"] []"#);
    let out = docker_run(&docker, &[], &no_cmd.name, &[]);
    if let Some(f) = check_exit(
        &out,
        2,
        Some("bakedb-init: no command to start: the image has no CMD and none was given"),
    ) {
        failures.push(format!("an image with an empty CMD: {f}"));
    }
    // Supervise mode reports a signal from outside as the child's 128+N too.
    let container = Container::new(docker_cli(&docker), unique_name("bakedb-e2e-init"));
    run_ok(&mut container.cmd(&[
        "run",
        "--detach",
        "--network",
        "none",
        "--name",
        &container.name,
        "--env",
        "BAKEDB_INIT_SUPERVISE=1",
        &image.name,
        "sh",
        "-c",
        "echo ready; while :; do sleep 0.1; done",
    ]));
    wait_for_line(&container, "ready");
    run_ok(&mut container.cmd(&["kill", "--signal", "USR2", &container.name]));
    run_ok(&mut container.cmd(&["wait", &container.name]));
    let code = container.exit_code();
    if code != 128 + 12 {
        failures.push(format!(
            "SIGUSR2 to a supervised sh: exit code {code}, not 140: {}",
            describe(&container.logs_output())
        ));
    }
    assert_no_failures(failures);
}

#[test]
fn docker_started_as_root_runs_the_command_as_the_data_owner() {
    require!("umoci");
    let Some(docker) = util::docker() else { return };
    let dir = test_dir();
    let image = docker_image(&docker, dir.path(), &sh(PROBE));
    let mut failures = Vec::new();
    for (what, extra, stdout_lines) in [
        (
            "--user 0",
            vec!["--user", "0"],
            vec![
                "uid=65532 gid=65532 groups=65532",
                "caps=0000000000000000",
                "pid=1",
                "pid1=sh",
            ],
        ),
        (
            "--user 0:0 --group-add 10, supervised",
            vec![
                "--user",
                "0:0",
                "--group-add",
                "10",
                "--env",
                "BAKEDB_INIT_SUPERVISE=1",
            ],
            vec![
                "uid=65532 gid=65532 groups=65532",
                "caps=0000000000000000",
                "pid1=init",
                "pid1-uid=65532 65532 65532 65532",
            ],
        ),
    ] {
        let out = docker_run(&docker, &extra, &image.name, &[]);
        if let Some(f) = check_ran(
            &out,
            0,
            &stdout_lines,
            &[VERIFIED, DROPPED_ROOT, PROFILE_LINE],
        ) {
            failures.push(format!("{what}: {f}"));
        }
    }
    let out = docker_run(
        &docker,
        &["--user", "0", "--env", "BAKEDB_RUN_AS_ROOT=1"],
        &image.name,
        &[],
    );
    if let Some(f) = check_ran(
        &out,
        0,
        &["pid1-uid=0 0 0 0"],
        &["bakedb-init: warning: running sh as root (BAKEDB_RUN_AS_ROOT=1)"],
    ) {
        failures.push(format!("BAKEDB_RUN_AS_ROOT=1: {f}"));
    }
    if !stdout(&out).lines().any(|l| l.starts_with("uid=0 gid=0 "))
        || stderr(&out).contains("instead of root")
    {
        failures.push(format!(
            "BAKEDB_RUN_AS_ROOT=1 did not stay root: {}",
            describe(&out)
        ));
    }
    // Without --user, the image's User (the data owner) runs it; nothing to drop.
    let out = docker_run(&docker, &[], &image.name, &[]);
    if let Some(f) = check_ran(&out, 0, &["uid=65532 gid=65532 groups=65532"], &[VERIFIED]) {
        failures.push(format!("the image's User: {f}"));
    }
    if stderr(&out).contains("instead of root") {
        failures.push(format!(
            "the image's User: init claims it dropped root: {}",
            describe(&out)
        ));
    }
    assert_no_failures(failures);
}

// ---------------------------------------------------------------------------------------
// podman

/// `podman create` of the layout `img:v1` in `dir` (podman names it after the path, so the
/// path is relative and lower-case), `extra` flags before the image, `args` after.
fn podman_create(podman: &Path, dir: &Path, extra: &[&str], args: &[String]) -> Container {
    let container = Container::new(podman_cli(podman, dir), unique_name("bakedb-e2e-init"));
    run_ok(
        container
            .cmd(&[
                "create",
                "--network",
                "none",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                "--name",
                &container.name,
            ])
            .args(extra)
            .arg("oci:img:v1")
            .args(args),
    );
    container
}

#[test]
fn podman_verifies_the_data_and_refuses_tampered_containers() {
    let Some(podman) = podman() else {
        return;
    };
    require!("umoci");
    let dir = dir_with_db(300);
    let d = dir.path();
    let built = build(d, "app.db", "oci:img:v1", &sh(PROBE));
    std::fs::create_dir(d.join("other")).unwrap();
    make_db(&d.join("other/app.db"), 301);
    build(d, "other/app.db", "oci:img:other", &sh(PROBE));
    let other_json = image_json_in_layout(&d.join("img"), "other");

    let source = podman_create(&podman, d, &[], &[]);
    source.copy_out(DATA_FILE, &d.join("app.db.image"));
    source.copy_out(IMAGE_JSON, &d.join("image.json.image"));
    let data = std::fs::read(d.join("app.db.image")).unwrap();
    let image_json = std::fs::read(d.join("image.json.image")).unwrap();
    let data_digest = built["data_digest"].as_str().unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&image_json)), data_digest);

    let cases = cp_cases(d, &data, &image_json, &other_json, data_digest);
    let failures = run_cp_cases(
        "podman",
        &|env| {
            let extra: Vec<&str> = env.iter().flat_map(|e| ["--env", *e]).collect();
            podman_create(&podman, d, &extra, &[])
        },
        cases,
    );
    assert_no_failures(failures);
}

#[test]
fn podman_stop_ends_a_cooperative_child_with_its_exit_code() {
    let Some(podman) = podman() else {
        return;
    };
    require!("umoci");
    let dir = dir_with_db(300);
    let d = dir.path();
    build(d, "app.db", "oci:img:v1", &sh(COOPERATIVE));
    for supervise in ["0", "1"] {
        let container = podman_create(
            &podman,
            d,
            &["--env", &format!("BAKEDB_INIT_SUPERVISE={supervise}")],
            &[],
        );
        run_ok(&mut container.cmd(&["start", &container.name]));
        wait_for_line(&container, "ready");
        run_ok(&mut container.cmd(&["kill", "--signal", "USR1", &container.name]));
        wait_for_line(&container, "got-USR1");
        run_ok(&mut container.cmd(&["stop", "--time", "2", &container.name]));
        assert_eq!(
            container.exit_code(),
            42,
            "BAKEDB_INIT_SUPERVISE={supervise}: podman stop: {}",
            describe(&container.logs_output())
        );
    }
}
