//! The library's contract, system call by system call: each test sets up a lower layer and
//! an overlayfs mount (as root; see common/mod.rs), then re-runs itself as a child process
//! with the library preloaded, in the mount, where the test body makes the calls and checks
//! the descriptors (/proc/self/fdinfo) and the upper layer (what was copied up).

mod common;

use std::ffi::c_int;
use std::process::Output;

use common::*;
use libc::{O_ACCMODE, O_APPEND, O_CLOEXEC, O_CREAT, O_RDONLY, O_RDWR, O_WRONLY};

/// Page-sized relation-like files in the lower layer.
fn fill(lower: &std::path::Path) {
    write_file(lower, "base/1/1234", &pattern(3 * 8192, 1));
    write_file(lower, "base/1/append", &pattern(100, 2));
    write_file(lower, "global/1262", &pattern(8192, 3));
    write_file(lower, "pg_wal/000000010000000000000001", &pattern(8192, 4));
    write_file(lower, "pg_xact/0000", &pattern(8192, 5));
    write_file(lower, "other/file", &pattern(100, 6));
    write_file(lower, "other/src", b"OPDATA");
    for i in 0..32 {
        write_file(lower, &format!("base/2/{i}"), &pattern(16384, i as u8));
    }
}

/// Run `body` in a child with the library preloaded (and `env`), in a fresh overlay of
/// `fill`. In the parent: Some(child's output); in the child: None, after running `body`.
fn shim_test(name: &str, env: &[(&str, &str)], body: impl FnOnce(&Cx)) -> Option<Output> {
    if in_child() {
        body(&Cx::from_env());
        None
    } else {
        let layers = Layers::new(name, None, fill);
        Some(layers.run_child(name, env))
    }
}

fn stderr_of(out: &Option<Output>) -> String {
    out.as_ref()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default()
}

/// `fd` is recorded by the shim and read-only in the kernel, though opened O_RDWR.
fn assert_lazy(fd: c_int) {
    assert_eq!(state(fd), 1, "fd {fd} is not recorded");
    assert_eq!(access_mode(fd), O_RDONLY, "fd {fd} is not read-only");
}

/// `fd` is an ordinary read-write descriptor the shim does not track.
fn assert_read_write(fd: c_int) {
    assert_eq!(state(fd), 0, "fd {fd} is still recorded");
    assert_eq!(access_mode(fd), O_RDWR, "fd {fd} is not read-write");
}

#[test]
fn reads_leave_the_file_below_and_pwrite_reopens_it_in_place() {
    shim_test(
        "reads_leave_the_file_below_and_pwrite_reopens_it_in_place",
        &[],
        |cx| {
            let rel = "base/1/1234";
            let lower = cx.lower_bytes(rel);
            let fd = open_ok(rel, O_RDWR);
            assert_lazy(fd);
            // The program sees the access mode it asked for.
            // SAFETY: F_GETFL on an open descriptor.
            let getfl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            assert_eq!(getfl & O_ACCMODE, O_RDWR);
            assert_eq!(pread(fd, 8192, 8192), lower[8192..16384]);
            cx.assert_not_copied_up(rel);

            assert_eq!(pwrite(fd, b"XYZ", 8190), 3);
            assert_read_write(fd);
            cx.assert_copied_up(rel);
            let mut want = lower.clone();
            want[8190..8193].copy_from_slice(b"XYZ");
            assert_eq!(cx.upper_bytes(rel), want);
            assert_eq!(pread(fd, 8192, 8192)[..1], *b"Z");
            assert_eq!(pread(fd, 3, 8190), b"XYZ");
            if cx.overlay() {
                assert_eq!(cx.lower_bytes(rel), lower, "the lower layer changed");
            }
            // SAFETY: fsync on an open descriptor.
            assert_eq!(unsafe { libc::fsync(fd) }, 0);
            close(fd);
            assert_eq!(state(fd), 0);
        },
    );
}

#[test]
fn write_keeps_the_offset_and_the_status_flags() {
    shim_test("write_keeps_the_offset_and_the_status_flags", &[], |cx| {
        let rel = "global/1262";
        let mut want = cx.lower_bytes(rel);
        let fd = open_ok(rel, O_RDWR | O_CLOEXEC);
        assert_lazy(fd);
        let mut buf = [0u8; 10];
        // SAFETY: lseek and read into a local buffer on an open descriptor.
        unsafe {
            assert_eq!(libc::lseek(fd, 100, libc::SEEK_SET), 100);
            assert_eq!(libc::read(fd, buf.as_mut_ptr().cast(), 10), 10);
            assert_eq!(libc::write(fd, b"abc".as_ptr().cast(), 3), 3);
            assert_eq!(libc::lseek(fd, 0, libc::SEEK_CUR), 113);
        }
        assert_read_write(fd);
        assert_ne!(kernel_flags(fd) & O_CLOEXEC, 0, "close-on-exec lost");
        want[110..113].copy_from_slice(b"abc");
        assert_eq!(cx.upper_bytes(rel), want);
        close(fd);

        // Without O_CLOEXEC the reopened descriptor has none either; O_APPEND is kept.
        let rel = "base/1/append";
        let mut want = cx.lower_bytes(rel);
        let fd = open_ok(rel, O_RDWR | O_APPEND);
        assert_lazy(fd);
        assert_eq!(kernel_flags(fd) & (O_CLOEXEC | O_APPEND), O_APPEND);
        // SAFETY: write from a static buffer on an open descriptor.
        assert_eq!(unsafe { libc::write(fd, b"END".as_ptr().cast(), 3) }, 3);
        assert_read_write(fd);
        assert_eq!(kernel_flags(fd) & (O_CLOEXEC | O_APPEND), O_APPEND);
        want.extend_from_slice(b"END");
        assert_eq!(cx.upper_bytes(rel), want);
        close(fd);
    });
}

type Op = (&'static str, fn(c_int) -> bool, Expect);

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// b"OPDATA" at offset 4096.
    Data,
    /// This length, content otherwise unchanged.
    Len(usize),
    /// Content unchanged.
    Same,
}

fn data_iov() -> libc::iovec {
    libc::iovec {
        iov_base: b"OPDATA".as_ptr() as *mut _,
        iov_len: 6,
    }
}

/// Every write-like call, each with the effect it must have had on a 16 KiB file.
// SAFETY (all the closures): system calls on the open descriptor under test, with local
// buffers valid for the lengths given.
const OPS: &[Op] = &[
    (
        "pwrite",
        |fd| unsafe { libc::pwrite(fd, b"OPDATA".as_ptr().cast(), 6, 4096) } == 6,
        Expect::Data,
    ),
    (
        "pwrite64",
        |fd| unsafe { libc::pwrite64(fd, b"OPDATA".as_ptr().cast(), 6, 4096) } == 6,
        Expect::Data,
    ),
    (
        "write",
        |fd| unsafe {
            libc::lseek(fd, 4096, libc::SEEK_SET);
            libc::write(fd, b"OPDATA".as_ptr().cast(), 6) == 6
        },
        Expect::Data,
    ),
    (
        "writev",
        |fd| unsafe {
            libc::lseek(fd, 4096, libc::SEEK_SET);
            libc::writev(fd, &data_iov(), 1) == 6
        },
        Expect::Data,
    ),
    (
        "pwritev",
        |fd| unsafe { libc::pwritev(fd, &data_iov(), 1, 4096) } == 6,
        Expect::Data,
    ),
    (
        "pwritev64",
        |fd| unsafe { libc::pwritev64(fd, &data_iov(), 1, 4096) } == 6,
        Expect::Data,
    ),
    (
        "pwritev2",
        |fd| unsafe { libc::pwritev2(fd, &data_iov(), 1, 4096, 0) } == 6,
        Expect::Data,
    ),
    (
        "pwritev64v2",
        |fd| unsafe { libc::pwritev64v2(fd, &data_iov(), 1, 4096, 0) } == 6,
        Expect::Data,
    ),
    (
        "ftruncate",
        |fd| unsafe { libc::ftruncate(fd, 5000) } == 0,
        Expect::Len(5000),
    ),
    (
        "ftruncate64",
        |fd| unsafe { libc::ftruncate64(fd, 5000) } == 0,
        Expect::Len(5000),
    ),
    (
        "fallocate",
        |fd| unsafe { libc::fallocate(fd, 0, 0, 20000) } == 0,
        Expect::Len(20000),
    ),
    (
        "fallocate64",
        |fd| unsafe { libc::fallocate64(fd, 0, 0, 20000) } == 0,
        Expect::Len(20000),
    ),
    (
        "posix_fallocate",
        |fd| unsafe { libc::posix_fallocate(fd, 0, 20000) } == 0,
        Expect::Len(20000),
    ),
    (
        "posix_fallocate64",
        |fd| unsafe { libc::posix_fallocate64(fd, 0, 20000) } == 0,
        Expect::Len(20000),
    ),
    (
        "mmap shared writable",
        |fd| unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if p == libc::MAP_FAILED {
                return false;
            }
            std::ptr::copy_nonoverlapping(b"OPDATA".as_ptr(), p.cast::<u8>().add(4096), 6);
            libc::msync(p, 8192, libc::MS_SYNC) == 0 && libc::munmap(p, 8192) == 0
        },
        Expect::Data,
    ),
    (
        "fcntl F_SETLK write lock",
        |fd| write_lock(fd, libc::F_SETLK),
        Expect::Same,
    ),
    (
        "fcntl F_OFD_SETLK write lock",
        |fd| write_lock(fd, libc::F_OFD_SETLK),
        Expect::Same,
    ),
    (
        "copy_file_range",
        |fd| unsafe {
            let src = open_ok("other/src", O_RDONLY);
            let mut off_out: libc::loff_t = 4096;
            let n = libc::copy_file_range(src, std::ptr::null_mut(), fd, &mut off_out, 6, 0);
            close(src);
            n == 6
        },
        Expect::Data,
    ),
    (
        "sendfile",
        |fd| unsafe {
            let src = open_ok("other/src", O_RDONLY);
            libc::lseek(fd, 4096, libc::SEEK_SET);
            let n = libc::sendfile(fd, src, std::ptr::null_mut(), 6);
            close(src);
            n == 6
        },
        Expect::Data,
    ),
    (
        "splice",
        |fd| unsafe {
            let mut p = [0; 2];
            assert_eq!(libc::pipe(p.as_mut_ptr()), 0);
            assert_eq!(libc::write(p[1], b"OPDATA".as_ptr().cast(), 6), 6);
            let mut off_out: libc::loff_t = 4096;
            let n = libc::splice(p[0], std::ptr::null_mut(), fd, &mut off_out, 6, 0);
            close(p[0]);
            close(p[1]);
            n == 6
        },
        Expect::Data,
    ),
];

#[test]
fn every_write_like_call_promotes_first() {
    shim_test("every_write_like_call_promotes_first", &[], |cx| {
        for (i, (name, op, expect)) in OPS.iter().enumerate() {
            let rel = format!("base/2/{i}");
            let mut want = cx.lower_bytes(&rel);
            let fd = open_ok(&rel, O_RDWR);
            assert_lazy(fd);
            assert!(op(fd), "{name} failed: errno {}", errno());
            assert_read_write(fd);
            cx.assert_copied_up(&rel);
            match expect {
                Expect::Data => want[4096..4102].copy_from_slice(b"OPDATA"),
                Expect::Len(n) => want.resize(*n, 0),
                Expect::Same => {}
            }
            assert!(cx.upper_bytes(&rel) == want, "{name}: wrong content");
            close(fd);
        }
    });
}

#[test]
fn reads_syncs_read_locks_and_private_maps_do_not_promote() {
    shim_test(
        "reads_syncs_read_locks_and_private_maps_do_not_promote",
        &[],
        |cx| {
            let rel = "base/1/1234";
            let fd = open_ok(rel, O_RDWR);
            let mut buf = [0u8; 100];
            // SAFETY: system calls on the open descriptor with local buffers.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                assert_eq!(libc::fstat(fd, &mut st), 0);
                assert_eq!(st.st_size, 3 * 8192);
                assert_eq!(libc::read(fd, buf.as_mut_ptr().cast(), 100), 100);
                assert_eq!(libc::lseek(fd, 0, libc::SEEK_END), 3 * 8192);
                assert_eq!(libc::fsync(fd), 0);
                assert_eq!(libc::fdatasync(fd), 0);
                assert_eq!(
                    libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE),
                    0
                );
                assert_eq!(libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_WILLNEED), 0);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                libc::munmap(p, 8192);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    fd,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                *p.cast::<u8>() = 0xff;
                libc::munmap(p, 8192);
                let mut l: libc::flock = std::mem::zeroed();
                l.l_type = libc::F_RDLCK as i16;
                assert_eq!(libc::fcntl(fd, libc::F_SETLK, &l), 0);
                assert_eq!(libc::flock(fd, libc::LOCK_EX), 0);
                assert_eq!(libc::flock(fd, libc::LOCK_UN), 0);
            }
            assert_eq!(pread(fd, 100, 0), cx.lower_bytes(rel)[..100]);
            assert_lazy(fd);
            cx.assert_not_copied_up(rel);
            close(fd);
            cx.assert_not_copied_up(rel);
        },
    );
}

#[test]
fn close_forgets_and_dups_are_recorded_on_their_own() {
    shim_test(
        "close_forgets_and_dups_are_recorded_on_their_own",
        &[],
        |cx| {
            // close forgets: the next descriptor with the same number is an ordinary one.
            let fd = open_ok("base/1/1234", O_RDWR);
            assert_lazy(fd);
            close(fd);
            assert_eq!(state(fd), 0);
            let other = open_ok("other/file", O_RDWR);
            assert_eq!(other, fd, "the number was not reused");
            assert_read_write(other);
            close(other);

            // dup, dup2, dup3 and F_DUPFD share the read-only description, and are recorded.
            let fd = open_ok("base/2/0", O_RDWR);
            // SAFETY: duplicating a descriptor this test owns onto numbers it does not use.
            let (d, d2, d3, d4) = unsafe {
                (
                    libc::dup(fd),
                    libc::dup2(fd, 100),
                    libc::dup3(fd, 101, O_CLOEXEC),
                    libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 200),
                )
            };
            assert!(d >= 0 && d != fd);
            assert_eq!((d2, d3), (100, 101));
            assert!(d4 >= 200);
            for x in [fd, d, d2, d3, d4] {
                assert_lazy(x);
            }
            cx.assert_not_copied_up("base/2/0");
            // Promoting one leaves the others recorded and read-only.
            assert_eq!(pwrite(d, b"one", 0), 3);
            assert_read_write(d);
            cx.assert_copied_up("base/2/0");
            for x in [fd, d2, d3, d4] {
                assert_lazy(x);
            }
            assert_eq!(pwrite(fd, b"two", 3), 3);
            assert_read_write(fd);
            assert_eq!(cx.upper_bytes("base/2/0")[..6], *b"onetwo");
            // dup2 of an ordinary descriptor over a recorded one: no longer recorded.
            let plain = open_ok("other/file", O_RDWR);
            // SAFETY: descriptors this test owns.
            assert_eq!(unsafe { libc::dup2(plain, d2) }, d2);
            assert_read_write(d2);
            // dup2 onto itself changes nothing.
            // SAFETY: as above.
            assert_eq!(unsafe { libc::dup2(d3, d3) }, d3);
            assert_lazy(d3);
            // close_range forgets, unless it only sets close-on-exec.
            // SAFETY: a range holding only d4, which this test owns.
            unsafe {
                assert_eq!(
                    libc::close_range(d4 as u32, d4 as u32, libc::CLOSE_RANGE_CLOEXEC as i32),
                    0
                );
            }
            assert_lazy(d4);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::close_range(d4 as u32, d4 as u32, 0) }, 0);
            assert_eq!(state(d4), 0);
            // A write through d3 (recorded, close-on-exec) keeps its close-on-exec flag.
            assert_eq!(pwrite(d3, b"three", 6), 5);
            assert_read_write(d3);
            assert_ne!(kernel_flags(d3) & O_CLOEXEC, 0);
            for x in [fd, d, d2, d3, plain] {
                close(x);
            }
        },
    );
}

#[test]
fn only_plain_read_write_opens_below_base_and_global_are_made_read_only() {
    shim_test(
        "only_plain_read_write_opens_below_base_and_global_are_made_read_only",
        &[],
        |cx| {
            let merged = cx.merged.display().to_string();
            // (path, flags, made read-only?)
            let cases: &[(&str, c_int, bool)] = &[
                ("base/2/0", O_RDWR, true),
                ("./base/2/1", O_RDWR | O_CLOEXEC, true),
                ("global/1262", O_RDWR, true),
                ("base/2/2", O_WRONLY, false),
                ("base/2/3", O_RDWR | O_CREAT, false),
                ("base/2/4", O_RDWR | libc::O_TRUNC, false),
                ("pg_wal/000000010000000000000001", O_RDWR, false),
                ("pg_xact/0000", O_RDWR, false),
                ("other/file", O_RDWR, false),
                (&format!("{merged}/base/2/5"), O_RDWR, false),
            ];
            for &(path, flags, lazy) in cases {
                let fd = open_ok(path, flags);
                let rel = path
                    .trim_start_matches("./")
                    .trim_start_matches(&format!("{merged}/"));
                if lazy {
                    assert_lazy(fd);
                    cx.assert_not_copied_up(rel);
                } else {
                    assert_eq!(state(fd), 0, "{path} is recorded");
                    assert_eq!(access_mode(fd), flags & O_ACCMODE, "{path}");
                    cx.assert_copied_up(rel);
                }
                close(fd);
            }
            // A read-only open of a relation file stays what it was.
            let fd = open_ok("base/2/6", O_RDONLY);
            assert_eq!(state(fd), 0);
            cx.assert_not_copied_up("base/2/6");
            close(fd);
            // Relative to another directory than the working one: not ours to judge.
            let dir = open_ok("base", O_RDONLY | libc::O_DIRECTORY);
            // SAFETY: a NUL-terminated path relative to an open directory.
            let fd = unsafe { libc::openat(dir, c"2/7".as_ptr(), O_RDWR) };
            assert!(fd >= 0);
            assert_eq!(state(fd), 0);
            assert_eq!(access_mode(fd), O_RDWR);
            cx.assert_copied_up("base/2/7");
            close(fd);
            close(dir);
            // openat with AT_FDCWD and a qualifying path: read-only like open.
            // SAFETY: a NUL-terminated path.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, c"base/2/8".as_ptr(), O_RDWR) };
            assert_lazy(fd);
            close(fd);
            // Errors are the ones of the open that was asked for.
            assert_eq!(open("base/1", O_RDWR), -1);
            assert_eq!(errno(), libc::EISDIR);
            assert_eq!(open("base/1/missing", O_RDWR), -1);
            assert_eq!(errno(), libc::ENOENT);
            assert_eq!(open("base/1/1234/x", O_RDWR), -1);
            assert_eq!(errno(), libc::ENOTDIR);
            // Creating a new relation file is an ordinary read-write open.
            let fd = open_ok("base/1/new", O_RDWR | O_CREAT | libc::O_EXCL);
            assert_read_write(fd);
            close(fd);
        },
    );
}

#[test]
fn the_off_switch_makes_it_a_pass_through() {
    shim_test(
        "the_off_switch_makes_it_a_pass_through",
        &[("BAKEDB_COPYUP_SHIM", "off")],
        |cx| {
            let fd = open_ok("base/1/1234", O_RDWR);
            assert_eq!(state(fd), -1);
            assert_eq!(access_mode(fd), O_RDWR);
            cx.assert_copied_up("base/1/1234");
            close(fd);
        },
    );
}

#[test]
fn invalid_settings_turn_it_off_loudly() {
    for (i, (var, value)) in [
        ("BAKEDB_COPYUP_SHIM", "maybe"),
        ("BAKEDB_COPYUP_SHIM_DIRS", "base,pg_log"),
        ("BAKEDB_COPYUP_SHIM_DATA", "relative/dir"),
    ]
    .into_iter()
    .enumerate()
    {
        // One child per setting, each running the body below.
        if in_child() && std::env::var("SHIM_TEST_CASE").unwrap() != i.to_string() {
            continue;
        }
        let out = shim_test(
            "invalid_settings_turn_it_off_loudly",
            &[(var, value), ("SHIM_TEST_CASE", &i.to_string())],
            |cx| {
                let fd = open_ok("base/1/1234", O_RDWR);
                assert_eq!(state(fd), -1);
                assert_eq!(access_mode(fd), O_RDWR);
                cx.assert_copied_up("base/1/1234");
                close(fd);
            },
        );
        if out.is_some() {
            let err = stderr_of(&out);
            assert!(
                err.contains(var) && err.contains("the shim is off"),
                "{var}={value}: {err}"
            );
        }
    }
}

#[test]
fn more_directories_and_absolute_paths_on_request() {
    if in_child() {
        let cx = Cx::from_env();
        let merged = cx.merged.display().to_string();
        let lazy = [
            "pg_xact/0000".to_owned(),
            "base/2/0".to_owned(),
            format!("{merged}/base/2/1"),
            format!("{merged}//pg_wal/000000010000000000000001"),
        ];
        for path in &lazy {
            let fd = open_ok(path, O_RDWR);
            assert_lazy(fd);
            close(fd);
        }
        for path in [
            "global/1262".to_owned(),
            format!("{merged}/global/1262"),
            format!("{merged}/other/file"),
        ] {
            let fd = open_ok(&path, O_RDWR);
            assert_eq!(state(fd), 0, "{path}");
            close(fd);
        }
        cx.assert_not_copied_up("pg_xact/0000");
        cx.assert_not_copied_up("base/2/1");
        cx.assert_copied_up("global/1262");
        return;
    }
    let layers = Layers::new("more_directories", None, fill);
    let merged = layers.merged.display().to_string();
    layers.run_child(
        "more_directories_and_absolute_paths_on_request",
        &[
            ("BAKEDB_COPYUP_SHIM_DIRS", "base,slru,pg_wal"),
            ("BAKEDB_COPYUP_SHIM_DATA", &format!("{merged}/")),
        ],
    );
}

#[test]
fn errno_is_what_the_real_calls_leave() {
    shim_test("errno_is_what_the_real_calls_leave", &[], |_| {
        // A successful open and a successful first write (the promotion's own system calls
        // included) leave errno as they found it.
        set_errno(libc::EINTR);
        let fd = open_ok("base/1/1234", O_RDWR);
        assert_lazy(fd);
        assert_eq!(errno(), libc::EINTR);
        set_errno(libc::EAGAIN);
        assert_eq!(pwrite(fd, b"x", 0), 1);
        assert_read_write(fd);
        assert_eq!(errno(), libc::EAGAIN);
        close(fd);
        // A failing write through a recorded descriptor fails like the real one.
        let fd = open_ok("base/1/append", O_RDWR);
        assert_lazy(fd);
        // SAFETY: a write from a null buffer, which the kernel refuses with EFAULT.
        let n = unsafe { libc::pwrite(fd, std::ptr::null(), 10, 0) };
        assert_eq!((n, errno()), (-1, libc::EFAULT));
        // SAFETY: as above; posix_fallocate returns its error, errno untouched.
        set_errno(libc::EINTR);
        assert_eq!(unsafe { libc::posix_fallocate(fd, -1, 10) }, libc::EINVAL);
        assert_eq!(errno(), libc::EINTR);
        close(fd);
        // A write on a closed, once recorded, descriptor: EBADF.
        assert_eq!(pwrite(fd, b"x", 0), -1);
        assert_eq!(errno(), libc::EBADF);
    });
}

#[test]
fn a_failed_copy_up_fails_the_write_and_keeps_the_descriptor() {
    const NAME: &str = "a_failed_copy_up_fails_the_write_and_keeps_the_descriptor";
    if in_child() {
        let cx = Cx::from_env();
        if !cx.overlay() {
            return;
        }
        let rel = "base/1/big";
        let fd = open_ok(rel, O_RDWR);
        assert_lazy(fd);
        set_errno(0);
        assert_eq!(pwrite(fd, b"x", 0), -1);
        assert_eq!(errno(), libc::ENOSPC);
        // SAFETY: posix_fallocate and ftruncate on an open descriptor.
        unsafe {
            assert_eq!(libc::posix_fallocate(fd, 0, 1), libc::ENOSPC);
            assert_eq!(errno(), libc::ENOSPC);
            set_errno(0);
            assert_eq!(libc::ftruncate(fd, 10), -1);
        }
        assert_eq!(errno(), libc::ENOSPC);
        // Still recorded, still readable.
        assert_lazy(fd);
        assert_eq!(pread(fd, 4096, 4096), cx.lower_bytes(rel)[4096..8192]);
        cx.assert_not_copied_up(rel);
        // Room made: the next write promotes.
        let small = cx.upper.as_ref().unwrap().parent().unwrap();
        let target = std::ffi::CString::new(small.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated strings; a remount of the test's own tmpfs.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_REMOUNT,
                c"size=8m".as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "remount: errno {}", errno());
        assert_eq!(pwrite(fd, b"x", 0), 1);
        assert_read_write(fd);
        let mut want = cx.lower_bytes(rel);
        want[0] = b'x';
        assert!(cx.upper_bytes(rel) == want);
        close(fd);
        return;
    }
    let layers = Layers::new("enospc", Some("256k"), |lower| {
        fill(lower);
        write_file(lower, "base/1/big", &pattern(1 << 20, 9));
    });
    if layers.upper.is_none() {
        eprintln!("skipping: no overlayfs");
        return;
    }
    let out = layers.run_child(NAME, &[("BAKEDB_COPYUP_SHIM_LOG", "1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pwrite on fd") && err.contains(&format!("failed (errno {})", libc::ENOSPC)),
        "{err}"
    );
}

#[test]
fn a_file_copied_up_through_another_descriptor_is_promoted_too() {
    shim_test(
        "a_file_copied_up_through_another_descriptor_is_promoted_too",
        &[],
        |cx| {
            let rel = "base/1/1234";
            let a = open_ok(rel, O_RDWR);
            let b = open_ok(rel, O_RDWR);
            assert_lazy(a);
            assert_lazy(b);
            assert_eq!(pwrite(b, b"BBBB", 100), 4);
            cx.assert_copied_up(rel);
            // a, opened before the copy-up, reads the copy (overlayfs since Linux 4.19).
            assert_eq!(pread(a, 4, 100), b"BBBB");
            assert_lazy(a);
            assert_eq!(pwrite(a, b"AAAA", 200), 4);
            assert_read_write(a);
            let up = cx.upper_bytes(rel);
            assert_eq!((&up[100..104], &up[200..204]), (&b"BBBB"[..], &b"AAAA"[..]));
            close(a);
            close(b);
        },
    );
}

#[test]
fn a_forked_child_promotes_its_own_descriptor() {
    shim_test("a_forked_child_promotes_its_own_descriptor", &[], |cx| {
        let rel = "base/1/1234";
        let fd = open_ok(rel, O_RDWR);
        assert_lazy(fd);
        // SAFETY: the child makes only async-signal-safe calls (the shim's promotion is
        // fstat, fcntl, lseek, open, dup3, close) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = state(fd) == 1 && pwrite(fd, b"CHILD", 0) == 5 && state(fd) == 0;
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child: {status:#x}"
        );
        // The parent's descriptor is still the read-only one, and sees the child's write.
        assert_lazy(fd);
        assert_eq!(pread(fd, 5, 0), b"CHILD");
        cx.assert_copied_up(rel);
        close(fd);
    });
}

#[test]
fn threads_writing_one_descriptor_promote_it_once() {
    shim_test(
        "threads_writing_one_descriptor_promote_it_once",
        &[],
        |cx| {
            for round in 0..20 {
                let rel = format!("base/2/{round}");
                let fd = open_ok(&rel, O_RDWR);
                assert_lazy(fd);
                std::thread::scope(|s| {
                    for t in 0..4u8 {
                        s.spawn(move || {
                            for k in 0..8 {
                                let off = (t as i64) * 1024 + k * 8;
                                assert_eq!(pwrite(fd, &[b'a' + t; 8], off), 8, "errno {}", errno());
                            }
                        });
                    }
                    // Meanwhile other descriptors come and go.
                    s.spawn(|| {
                        for _ in 0..50 {
                            let x = open_ok("base/1/1234", O_RDWR);
                            close(x);
                        }
                    });
                });
                assert_read_write(fd);
                let up = cx.upper_bytes(&rel);
                for t in 0..4u8 {
                    let at = t as usize * 1024;
                    assert!(
                        up[at..at + 64].iter().all(|&b| b == b'a' + t),
                        "round {round} thread {t}"
                    );
                }
                close(fd);
            }
        },
    );
}

#[test]
fn a_stale_record_never_reopens_another_file() {
    let out = shim_test(
        "a_stale_record_never_reopens_another_file",
        &[("BAKEDB_COPYUP_SHIM_LOG", "1")],
        |cx| {
            let fd = open_ok("base/1/1234", O_RDWR);
            assert_lazy(fd);
            // Closed behind the shim's back, the number reused by a pipe.
            // SAFETY: the raw close system call on a descriptor this test owns.
            assert_eq!(unsafe { libc::syscall(libc::SYS_close, fd) }, 0);
            let mut p = [0; 2];
            // SAFETY: pipe fills the two-element array.
            assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
            assert!(p.contains(&fd), "the number was not reused");
            assert_eq!(state(fd), 1, "the record should be stale here");
            if p[1] == fd {
                // SAFETY: writing a local buffer into the pipe.
                assert_eq!(unsafe { libc::write(fd, b"pipe".as_ptr().cast(), 4) }, 4);
                let mut buf = [0u8; 4];
                // SAFETY: reading into a local buffer from the pipe.
                assert_eq!(unsafe { libc::read(p[0], buf.as_mut_ptr().cast(), 4) }, 4);
                assert_eq!(&buf, b"pipe");
            } else {
                // The read end: a write fails as it would without the shim.
                // SAFETY: as above.
                assert_eq!(unsafe { libc::write(fd, b"pipe".as_ptr().cast(), 4) }, -1);
                assert_eq!(errno(), libc::EBADF);
            }
            assert_eq!(state(fd), 0);
            cx.assert_not_copied_up("base/1/1234");
            close(p[0]);
            close(p[1]);

            // The same with another regular file, opened read-only behind the shim's back:
            // a write must fail as on any read-only descriptor, not reopen that file.
            let fd = open_ok("base/1/1234", O_RDWR);
            assert_lazy(fd);
            // SAFETY: raw close and openat system calls, a NUL-terminated path.
            let other = unsafe {
                assert_eq!(libc::syscall(libc::SYS_close, fd), 0);
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"base/2/9".as_ptr(),
                    O_RDONLY,
                )
            };
            assert_eq!(other, fd as libc::c_long, "the number was not reused");
            assert_eq!(state(fd), 1, "the record should be stale here");
            assert_eq!(pwrite(fd, b"x", 0), -1);
            assert_eq!(errno(), libc::EBADF);
            assert_eq!(state(fd), 0);
            assert_eq!(access_mode(fd), O_RDONLY);
            cx.assert_not_copied_up("base/2/9");
            close(fd);
        },
    );
    if out.is_some() {
        assert!(
            stderr_of(&out).contains("stale record dropped"),
            "{}",
            stderr_of(&out)
        );
    }
}

#[test]
fn fuse_overlayfs_is_left_alone() {
    const NAME: &str = "fuse_overlayfs_is_left_alone";
    if in_child() {
        let cx = Cx::from_env();
        let fd = open_ok("base/1/1234", O_RDWR);
        assert_eq!(state(fd), 0, "recorded on fuse-overlayfs");
        assert_eq!(access_mode(fd), O_RDWR);
        cx.assert_copied_up("base/1/1234");
        close(fd);
        return;
    }
    let Some(layers) = Layers::fuse(NAME, fill) else {
        return;
    };
    let out = layers.run_child(NAME, &[("BAKEDB_COPYUP_SHIM_LOG", "1")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "file system type {} lets read-only descriptors go stale",
            0x6573_5546
        )),
        "{err}"
    );
}

#[test]
fn the_log_names_each_promotion() {
    let out = shim_test(
        "the_log_names_each_promotion",
        &[("BAKEDB_COPYUP_SHIM_LOG", "1")],
        |_| {
            let fd = open_ok("base/1/1234", O_RDWR);
            assert_eq!(pwrite(fd, b"x", 0), 1);
            close(fd);
            println!("\npromoted fd {fd}");
        },
    );
    if let Some(out) = out {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let fd: c_int = stdout
            .lines()
            .find_map(|l| l.strip_prefix("promoted fd "))
            .unwrap()
            .parse()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("]: pwrite on fd {fd}: reopened read-write: "))
                && err.contains("/base/1/1234\n"),
            "{err}"
        );
    }
}

/// The descriptor-level functions a PostgreSQL server imports that open, write, size,
/// duplicate or close files must all be interposed; a new one (a server built against a
/// newer libc, or a new major version) fails this test until the shim handles it.
#[test]
fn every_file_function_postgres_imports_is_interposed() {
    if in_child() {
        return;
    }
    let Some(postgres) = postgres_binary() else {
        return;
    };
    let imports = elf_undefined_symbols(&std::fs::read(&postgres).unwrap());
    let exports = elf_defined_symbols(&std::fs::read(shim_path()).unwrap());
    // Functions that take a descriptor and need it writable, or create or drop one.
    let watched = |s: &str| {
        let base = s.trim_start_matches('_');
        [
            "open",
            "openat",
            "write",
            "writev",
            "pwrite",
            "pwritev",
            "ftruncate",
            "fallocate",
            "posix_fallocate",
            "mmap",
            "dup",
            "dup2",
            "dup3",
            "close",
            "close_range",
            "closefrom",
            "fcntl",
            "copy_file_range",
            "sendfile",
            "splice",
            "io_uring_setup",
            "io_uring_queue_init",
            "aio_write",
            "lio_listio",
            "io_submit",
        ]
        .iter()
        .any(|w| {
            base == *w
                || base
                    .strip_prefix(w)
                    .is_some_and(|r| matches!(r, "64" | "_2" | "64_2" | "2" | "64v2"))
        })
    };
    let missing: Vec<&String> = imports
        .iter()
        .filter(|s| watched(s) && !exports.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{} imports {missing:?}, which the shim does not interpose",
        postgres.display()
    );
    // And the ones PostgreSQL 15 is known to use are among them (the parser works).
    for known in ["open", "pwrite", "write", "close", "ftruncate"] {
        assert!(
            imports.iter().any(|s| s == known),
            "{known} not found in {}",
            postgres.display()
        );
    }
}

/// The postgres of bakedb-testkit's server tools (BAKEDB_TEST_PG_BIN or the newest
/// /usr/lib/postgresql/N/bin); None skips locally, CI fails.
pub fn postgres_binary() -> Option<std::path::PathBuf> {
    bakedb_testkit::pg::pg_bin().map(|bin| bin.join("postgres"))
}

/// (name, defined?) of every dynamic symbol of a 64-bit little-endian ELF file.
fn elf_dynamic_symbols(elf: &[u8]) -> Vec<(String, bool)> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(
        &elf[..6],
        b"\x7fELF\x02\x01",
        "not a 64-bit little-endian ELF file"
    );
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let mut out = Vec::new();
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != 11 {
            continue; // not SHT_DYNSYM
        }
        let (off, size, link, entsize) = (
            u64_at(sh + 0x18),
            u64_at(sh + 0x20),
            u32_at(sh + 0x28),
            u64_at(sh + 0x38),
        );
        let strtab = u64_at(section(link) + 0x18);
        for s in (off..off + size).step_by(entsize).skip(1) {
            let name_at = strtab + u32_at(s);
            let end = elf[name_at..].iter().position(|&b| b == 0).unwrap();
            let name = String::from_utf8_lossy(&elf[name_at..name_at + end]).into_owned();
            let defined = u16_at(s + 6) != 0; // st_shndx != SHN_UNDEF
            out.push((name, defined));
        }
    }
    out
}

fn elf_undefined_symbols(elf: &[u8]) -> Vec<String> {
    elf_dynamic_symbols(elf)
        .into_iter()
        .filter(|(_, d)| !d)
        .map(|(n, _)| n)
        .collect()
}

fn elf_defined_symbols(elf: &[u8]) -> Vec<String> {
    elf_dynamic_symbols(elf)
        .into_iter()
        .filter(|(_, d)| *d)
        .map(|(n, _)| n)
        .collect()
}

/// A write lock on the whole file through fcntl `cmd` (F_SETLK, F_OFD_SETLK): whether it was
/// granted.
fn write_lock(fd: c_int, cmd: c_int) -> bool {
    // SAFETY: a zeroed flock is a valid argument; fcntl reads it.
    unsafe {
        let mut l: libc::flock = std::mem::zeroed();
        l.l_type = libc::F_WRLCK as i16;
        l.l_whence = libc::SEEK_SET as i16;
        libc::fcntl(fd, cmd, &l) == 0
    }
}
