//! Shared by the integration tests: the built library, scratch directories on a real
//! overlayfs mount, and re-running this test binary as a child with the library preloaded.
//!
//! Mounting needs root. Without it a test falls back to a plain directory (its overlay
//! assertions skipped, the descriptor checks through /proc/self/fdinfo kept) locally, and
//! fails under CI=true, like bakedb-testkit does for a missing tool.

#![allow(dead_code)]

use std::ffi::{CString, c_int};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use bakedb_testkit::tools::{is_root, require_root, tool, under_ci};

/// The library `cargo test` built next to this test binary (target/<profile>/deps/..).
pub fn shim_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [
        deps.join("libbakedb_copyup_shim.so"),
        deps.parent().unwrap().join("libbakedb_copyup_shim.so"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("libbakedb_copyup_shim.so is not in {candidates:?}"))
        .clone()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn mount(source: &str, target: &Path, fstype: &str, data: &str) -> std::io::Result<()> {
    let (source, fstype, data) = (
        CString::new(source).unwrap(),
        CString::new(fstype).unwrap(),
        CString::new(data).unwrap(),
    );
    let target = cpath(target);
    // SAFETY: every pointer is a NUL-terminated string alive for the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn umount(target: &Path) {
    let t = cpath(target);
    // SAFETY: a NUL-terminated path; a lazy unmount has no other precondition.
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
}

/// A scratch directory: `lower` filled by the test, then (as root) an overlayfs mount at
/// `merged` with `upper` as its writable layer, as a container's root file system is.
pub struct Layers {
    root: PathBuf,
    mounts: Vec<PathBuf>,
    pub lower: PathBuf,
    /// None when no overlay could be mounted (not root, locally): `merged` is `lower`.
    pub upper: Option<PathBuf>,
    pub merged: PathBuf,
}

impl Layers {
    /// `fill` populates the lower layer before it is mounted. `upper_size`: put the upper
    /// layer on a tmpfs of that size (`size=` mount option), to make copy-ups fail.
    pub fn new(name: &str, upper_size: Option<&str>, fill: impl FnOnce(&Path)) -> Layers {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "bakedb-copyup-shim-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&root).unwrap();
        let mut layers = Layers {
            lower: root.join("lower"),
            upper: None,
            merged: root.join("lower"),
            root,
            mounts: Vec::new(),
        };
        if !is_root() {
            assert!(
                !under_ci(),
                "the copy-up tests mount overlayfs, which needs root, and CI=true"
            );
            eprintln!("not root: no overlayfs mount, checking descriptor flags only");
            std::fs::create_dir(&layers.lower).unwrap();
            fill(&layers.lower);
            return layers;
        }
        // Everything on a private tmpfs: nothing to clean but the mounts, and overlayfs
        // accepts tmpfs as the upper layer on every kernel that has both.
        mount("tmpfs", &layers.root, "tmpfs", "size=256m,mode=0755")
            .unwrap_or_else(|e| panic!("mounting a tmpfs at {}: {e}", layers.root.display()));
        layers.mounts.push(layers.root.clone());
        std::fs::create_dir(&layers.lower).unwrap();
        fill(&layers.lower);
        let top = match upper_size {
            None => layers.root.clone(),
            Some(size) => {
                let small = layers.root.join("small");
                std::fs::create_dir(&small).unwrap();
                mount("tmpfs", &small, "tmpfs", &format!("size={size},mode=0755")).unwrap();
                layers.mounts.push(small.clone());
                small
            }
        };
        let (upper, work, merged) = (
            top.join("upper"),
            top.join("work"),
            layers.root.join("merged"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d).unwrap();
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            layers.lower.display(),
            upper.display(),
            work.display()
        );
        match mount("overlay", &merged, "overlay", &options) {
            Ok(()) => {
                layers.mounts.push(merged.clone());
                layers.upper = Some(upper);
                layers.merged = merged;
            }
            Err(e) => {
                assert!(
                    !under_ci(),
                    "mounting overlayfs ({options}): {e}, and CI=true"
                );
                eprintln!("cannot mount overlayfs ({e}): checking descriptor flags only");
            }
        }
        layers
    }

    /// Like `new`, with fuse-overlayfs (podman's rootless storage) instead of the kernel's
    /// overlayfs. None (skip) locally when not root or fuse-overlayfs is not installed; a
    /// failure under CI.
    pub fn fuse(name: &str, fill: impl FnOnce(&Path)) -> Option<Layers> {
        let tool = tool("fuse-overlayfs")?;
        if !require_root() {
            return None;
        }
        let mut layers = Layers::new(name, None, fill);
        let top = layers.root.join("fuse");
        let (upper, work, merged) = (top.join("upper"), top.join("work"), top.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let out = Command::new(tool)
            .arg("-o")
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                layers.lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(&merged)
            .output()
            .unwrap();
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(!under_ci(), "fuse-overlayfs failed: {why}, and CI=true");
            eprintln!("skipping: fuse-overlayfs failed: {why}");
            return None;
        }
        layers.mounts.push(merged.clone());
        layers.upper = Some(upper);
        layers.merged = merged;
        Some(layers)
    }

    /// Run `test` (the name of the calling #[test]) again in a child process: this binary,
    /// with the library preloaded, in `merged`, with `env` (and no other BAKEDB_COPYUP_SHIM*
    /// from this process). Panics with the child's output if it fails.
    pub fn run_child(&self, test: &str, env: &[(&str, &str)]) -> Output {
        assert_not_linked_in();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
            .current_dir(&self.merged)
            .env("LD_PRELOAD", shim_path())
            .env(CHILD, "1")
            .env("SHIM_TEST_LOWER", &self.lower)
            .env("SHIM_TEST_MERGED", &self.merged)
            .env(
                "SHIM_TEST_UPPER",
                self.upper.as_deref().unwrap_or(Path::new("")),
            );
        for (k, _) in std::env::vars_os() {
            if k.as_bytes().starts_with(b"BAKEDB_COPYUP_SHIM") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{cmd:?}: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the child failed: {text}");
        // libtest says "running 0 tests" when the name matched nothing: a silent pass.
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "the child ran no test: {text}"
        );
        out
    }
}

impl Drop for Layers {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            umount(m);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Set in the child: the test body runs there instead of setting up.
pub const CHILD: &str = "BAKEDB_COPYUP_SHIM_TEST_CHILD";

pub fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// What a child sees of its Layers.
pub struct Cx {
    pub lower: PathBuf,
    pub merged: PathBuf,
    pub upper: Option<PathBuf>,
}

impl Cx {
    pub fn from_env() -> Cx {
        let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap());
        let upper = var("SHIM_TEST_UPPER");
        Cx {
            lower: var("SHIM_TEST_LOWER"),
            merged: var("SHIM_TEST_MERGED"),
            upper: (!upper.as_os_str().is_empty()).then_some(upper),
        }
    }

    pub fn overlay(&self) -> bool {
        self.upper.is_some()
    }

    /// Whether `rel` has been copied up (None without an overlay).
    pub fn copied_up(&self, rel: &str) -> Option<bool> {
        self.upper.as_ref().map(|u| u.join(rel).exists())
    }

    pub fn assert_not_copied_up(&self, rel: &str) {
        assert_ne!(self.copied_up(rel), Some(true), "{rel} was copied up");
    }

    pub fn assert_copied_up(&self, rel: &str) {
        assert_ne!(self.copied_up(rel), Some(false), "{rel} was not copied up");
    }

    /// The upper layer's copy of `rel`, or (no overlay) the file itself.
    pub fn upper_bytes(&self, rel: &str) -> Vec<u8> {
        let dir = self.upper.as_ref().unwrap_or(&self.lower);
        std::fs::read(dir.join(rel)).unwrap()
    }

    pub fn lower_bytes(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.lower.join(rel)).unwrap()
    }
}

// --- raw calls, through whatever the dynamic linker binds them to (the shim) ----------------

pub fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

pub fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = e };
}

pub fn open(path: &str, flags: c_int) -> c_int {
    let p = CString::new(path).unwrap();
    // SAFETY: a NUL-terminated path; the mode is read only with O_CREAT.
    unsafe { libc::open(p.as_ptr(), flags, 0o600) }
}

pub fn open_ok(path: &str, flags: c_int) -> c_int {
    let fd = open(path, flags);
    assert!(fd >= 0, "open {path} {flags:#o}: errno {}", errno());
    fd
}

pub fn close(fd: c_int) {
    // SAFETY: closing a descriptor the test opened.
    assert_eq!(unsafe { libc::close(fd) }, 0, "close {fd}");
}

/// The access mode and status flags the kernel has for `fd` (/proc/self/fdinfo), whatever
/// fcntl(F_GETFL) says through the shim.
pub fn kernel_flags(fd: c_int) -> c_int {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap()
        .trim();
    c_int::from_str_radix(flags, 8).unwrap()
}

pub fn access_mode(fd: c_int) -> c_int {
    kernel_flags(fd) & libc::O_ACCMODE
}

/// This process (the parent, without LD_PRELOAD) must not carry the shim: the test crate
/// links no code of the library's rlib, or its own open/write/close would be interposed.
pub fn assert_not_linked_in() {
    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"bakedb_copyup_shim_state".as_ptr()) };
    assert!(
        f.is_null() || std::env::var_os("LD_PRELOAD").is_some(),
        "the test binary itself exports the shim's functions"
    );
}

/// bakedb_copyup_shim_state(fd): -1 shim off, 1 recorded, 0 not. Panics when the library is
/// not loaded.
pub fn state(fd: c_int) -> c_int {
    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"bakedb_copyup_shim_state".as_ptr()) };
    assert!(!f.is_null(), "the shim is not loaded in this process");
    // SAFETY: the symbol is `extern "C" fn(c_int) -> c_int` in the shim.
    let f: extern "C" fn(c_int) -> c_int = unsafe { std::mem::transmute(f) };
    f(fd)
}

pub fn pread(fd: c_int, len: usize, offset: i64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is writable for `len` bytes.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, offset) };
    assert!(n >= 0, "pread fd {fd}: errno {}", errno());
    buf.truncate(n as usize);
    buf
}

pub fn pwrite(fd: c_int, data: &[u8], offset: i64) -> isize {
    // SAFETY: `data` is readable for its length.
    unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), offset) }
}

/// Deterministic file content: byte i is (i * 7 + seed) mod 251.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + seed as usize) % 251) as u8)
        .collect()
}

pub fn write_file(dir: &Path, rel: &str, content: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}
