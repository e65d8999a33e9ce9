//! Reproducible output: the same source and SOURCE_DATE_EPOCH give the same manifest digest
//! (and byte-identical layouts and archives) whatever the compression, the user, the number of
//! CPUs or the tags already in the layout; another SOURCE_DATE_EPOCH changes the image's
//! metadata but not one byte of the baked data.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::require;
use crate::util::{
    assert_tree_unchanged, bakedb, bakedb_as_nobody, build_json, make_big_db, make_db, run, run_ok,
    sqlite_build, stderr, test_dir, tree, tree_diff,
};

fn build(dir: &Path, source: &str, output: &str, extra: &[&str]) -> Command {
    let mut cmd = bakedb(dir);
    cmd.args(sqlite_build(source, output))
        .args(["--quiet", "--json"])
        .args(extra);
    cmd
}

/// Build and return the manifest digest `--json` reports.
fn digest_of(cmd: &mut Command) -> String {
    build_json(&run_ok(cmd))["manifest_digest"]
        .as_str()
        .expect("manifest_digest")
        .to_owned()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// Every regular file of an image (gzip or uncompressed layers), later layers winning: the
/// image's content as a runtime would unpack it, read without bakedb.
fn image_files(layout: &Path, tag: &str) -> BTreeMap<String, Vec<u8>> {
    let index = read_json(&layout.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let manifest = read_json(&blob(layout, entry["digest"].as_str().unwrap()));
    let mut files = BTreeMap::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let raw = fs::File::open(blob(layout, layer["digest"].as_str().unwrap())).unwrap();
        let reader: Box<dyn Read> = match layer["mediaType"].as_str().unwrap() {
            "application/vnd.oci.image.layer.v1.tar+gzip" => {
                Box::new(flate2::read::MultiGzDecoder::new(raw))
            }
            "application/vnd.oci.image.layer.v1.tar" => Box::new(raw),
            other => panic!("image_files reads gzip and plain layers, not {other}"),
        };
        for entry in tar::Archive::new(reader).entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.header().entry_type().is_file() {
                let path = entry
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_owned();
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                files.insert(path, bytes);
            }
        }
    }
    files
}

#[test]
fn same_inputs_give_the_same_digest_for_every_compression() {
    let t = test_dir();
    let dir = t.path();
    // Over 1 MiB, so a gzip layer has several independently compressed members.
    make_big_db(&dir.join("app.db"), 3);
    for compression in ["gzip", "zstd", "none"] {
        let first = digest_of(&mut build(
            dir,
            "app.db",
            &format!("oci:{compression}-1:v1"),
            &["--compression", compression],
        ));
        let second = digest_of(&mut build(
            dir,
            "app.db",
            &format!("oci:{compression}-2:v1"),
            &["--compression", compression],
        ));
        assert_eq!(
            first, second,
            "--compression {compression}: two builds of the same inputs differ"
        );
        let diff = tree_diff(
            &tree(&dir.join(format!("{compression}-1"))),
            &tree(&dir.join(format!("{compression}-2"))),
        );
        assert!(
            diff.is_empty(),
            "--compression {compression}: the two layouts differ:\n  {}",
            diff.join("\n  ")
        );
    }
    for (first, second) in [
        ("oci-archive:app-1.tar:v1", "oci-archive:app-2.tar:v1"),
        (
            "docker-archive:app-1.docker.tar:app:v1",
            "docker-archive:app-2.docker.tar:app:v1",
        ),
    ] {
        run_ok(&mut build(dir, "app.db", first, &[]));
        run_ok(&mut build(dir, "app.db", second, &[]));
        let path = |r: &str| dir.join(r.split(':').nth(1).unwrap());
        assert!(
            fs::read(path(first)).unwrap() == fs::read(path(second)).unwrap(),
            "{first} and {second} are not byte-identical"
        );
    }
}

/// A later SOURCE_DATE_EPOCH is a different image (created, history, tar mtimes) of the very
/// same data: image.json's "files" and the database file unpacked from the layer are the same.
#[test]
fn source_date_epoch_changes_the_image_but_not_the_data() {
    let t = test_dir();
    let dir = t.path();
    make_db(&dir.join("app.db"), 2000);
    let early =
        digest_of(build(dir, "app.db", "oci:early:v1", &[]).env("SOURCE_DATE_EPOCH", "1700000000"));
    let late =
        digest_of(build(dir, "app.db", "oci:late:v1", &[]).env("SOURCE_DATE_EPOCH", "1800000000"));
    assert_ne!(early, late, "SOURCE_DATE_EPOCH does not reach the manifest");
    let early_files = image_files(&dir.join("early"), "v1");
    let late_files = image_files(&dir.join("late"), "v1");
    let image_json = |files: &BTreeMap<String, Vec<u8>>| -> Value {
        serde_json::from_slice(&files["etc/bakedb/image.json"]).unwrap()
    };
    let (early_json, late_json) = (image_json(&early_files), image_json(&late_files));
    assert_ne!(
        early_json, late_json,
        "image.json records the snapshot time, which follows SOURCE_DATE_EPOCH"
    );
    assert_eq!(
        early_json["files"], late_json["files"],
        "image.json's file digests changed with SOURCE_DATE_EPOCH"
    );
    let data = "var/lib/bakedb/app.db";
    assert!(
        early_files[data] == late_files[data],
        "{data} differs between the two images"
    );
    let recorded = early_json["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "app.db")
        .expect("image.json lists app.db");
    assert_eq!(
        recorded["size"].as_u64(),
        Some(early_files[data].len() as u64)
    );
    let sha256 = recorded["sha256"]
        .as_str()
        .expect("image.json has a sha256 for a file of one chunk");
    assert_eq!(
        sha256,
        crate::util::sha256_hex(&early_files[data]),
        "image.json's sha256 of app.db is not the layer's app.db"
    );
}

/// Make every namespace-creating system call (unshare, setns, clone with a CLONE_NEW* flag)
/// kill the child and whatever it execs with SIGSYS: a build that relied on user namespaces
/// dies visibly here instead of working only where they happen to be allowed. clone3 hides
/// its flags behind a pointer, so it fails with ENOSYS and glibc falls back to clone.
fn forbid_namespaces(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    let namespaces = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u32;
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let load = |offset: u32| op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset, 0, 0);
    let ret = |action: u32| op(libc::BPF_RET | libc::BPF_K, action, 0, 0);
    let if_eq =
        |value: u32, jt: u8, jf: u8| op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, value, jt, jf);
    let kill = libc::SECCOMP_RET_KILL_PROCESS;
    let filter = vec![
        load(4), // seccomp_data.arch
        if_eq(AUDIT_ARCH, 1, 0),
        ret(kill),
        load(0), // seccomp_data.nr
        if_eq(libc::SYS_unshare as u32, 0, 1),
        ret(kill),
        if_eq(libc::SYS_setns as u32, 0, 1),
        ret(kill),
        if_eq(libc::SYS_clone3 as u32, 0, 1),
        ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        if_eq(libc::SYS_clone as u32, 0, 3),
        load(16), // low half of seccomp_data.args[0]: clone's flags
        op(
            libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
            namespaces,
            0,
            1,
        ),
        ret(kill),
        ret(libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: the closure only makes two prctl calls on memory it owns: async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Run as uid/gid 65534 with namespaces forbidden, a build gives root's digest: it needs no
/// root, no user namespaces (it must not call unshare), no ownership of anything but its
/// output, scratch and home directories.
#[test]
fn unprivileged_build_without_namespaces_matches_root() {
    use std::os::unix::process::ExitStatusExt;
    let setpriv = require!("setpriv");
    let unshare = require!("unshare");
    if !crate::util::require_root() {
        return;
    }
    let t = test_dir();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = t.path().join("work");
    let scratch = dir.join("home");
    for d in [&dir, &scratch] {
        fs::create_dir(d).unwrap();
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    make_big_db(&dir.join("app.db"), 2);

    // The filter works: here, user namespaces are impossible.
    let mut probe = Command::new(&unshare);
    probe.args(["--user", "true"]);
    forbid_namespaces(&mut probe);
    let status = run(&mut probe).status;
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "`unshare --user true` should have been killed by the seccomp filter: {status}"
    );

    let mut as_nobody = bakedb_as_nobody(&setpriv, &dir, &scratch);
    as_nobody
        .args(sqlite_build("app.db", "oci:nobody:v1"))
        .args(["--quiet", "--json"]);
    forbid_namespaces(&mut as_nobody);
    let out = run(&mut as_nobody);
    assert_ne!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "the build tried to create a namespace (killed by the seccomp filter)"
    );
    assert!(
        out.status.success(),
        "unprivileged build failed ({}):\n{}",
        out.status,
        stderr(&out)
    );
    let nobody = build_json(&out)["manifest_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        fs::metadata(dir.join("nobody/index.json")).unwrap().uid(),
        65534,
        "the build did not run as uid 65534"
    );
    let leftovers: Vec<_> = fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "the build left {leftovers:?} in its TMPDIR"
    );

    let root = digest_of(&mut build(&dir, "app.db", "oci:root:v1", &[]));
    assert_eq!(
        nobody, root,
        "uid 65534 and root built different images from the same inputs"
    );
    let mut verify = bakedb_as_nobody(&setpriv, &dir, &scratch);
    verify.args(["verify", "--quiet", "oci:nobody:v1"]);
    forbid_namespaces(&mut verify);
    run_ok(&mut verify);
}

/// Tags share one layout: a second tag keeps the first (same digest as a build into a layout
/// of its own), and rebuilding a tag from the same inputs leaves the layout as it was.
#[test]
fn two_tags_in_one_layout() {
    let t = test_dir();
    let dir = t.path();
    make_db(&dir.join("a.db"), 100);
    make_db(&dir.join("b.db"), 200);
    let a = digest_of(&mut build(dir, "a.db", "oci:layout:a", &[]));
    let b = digest_of(&mut build(dir, "b.db", "oci:layout:b", &[]));
    assert_ne!(a, b);
    assert_eq!(
        digest_of(&mut build(dir, "a.db", "oci:alone-a:a", &[])),
        a,
        "tag a's image depends on the layout it went into"
    );
    assert_eq!(
        digest_of(&mut build(dir, "b.db", "oci:alone-b:b", &[])),
        b,
        "tag b's image depends on the layout it went into"
    );
    let index = read_json(&dir.join("layout/index.json"));
    let tagged: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                e["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        tagged,
        [("a".to_owned(), a.clone()), ("b".to_owned(), b.clone())]
    );
    for reference in ["oci:layout:a", "oci:layout:b"] {
        run_ok(bakedb(dir).args(["verify", "--quiet", reference]));
    }
    let before = tree(&dir.join("layout"));
    assert_eq!(digest_of(&mut build(dir, "a.db", "oci:layout:a", &[])), a);
    assert_tree_unchanged(
        &dir.join("layout"),
        &before,
        "rebuilding tag a from the same inputs",
    );
}

/// One CPU or all of them, the same bytes: gzip members, zstd's multithreaded frames and the
/// per-chunk digests of image.json do not depend on how many threads made them. The database
/// is over one 16 MiB chunk, so it has several of each.
#[test]
fn build_is_independent_of_the_number_of_cpus() {
    let taskset = require!("taskset");
    let t = test_dir();
    let dir = t.path();
    make_big_db(&dir.join("app.db"), 20);
    for compression in ["gzip", "zstd"] {
        let all = digest_of(&mut build(
            dir,
            "app.db",
            &format!("oci:all-{compression}:v1"),
            &["--compression", compression],
        ));
        let mut one = Command::new(&taskset);
        one.args(["-c", "0"])
            .arg(crate::util::bakedb_bin())
            .args(sqlite_build("app.db", &format!("oci:one-{compression}:v1")))
            .args(["--quiet", "--json", "--compression", compression])
            .current_dir(dir)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env("CI", "true");
        let one = digest_of(&mut one);
        assert_eq!(
            all, one,
            "--compression {compression}: a build on one CPU differs from one on all of them"
        );
    }
}
