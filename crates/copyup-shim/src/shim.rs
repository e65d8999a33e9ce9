//! The interposed functions, the descriptor table and the promotion (see the crate docs).
//!
//! Inside this library, a call to `libc::close` (or any other name this module exports)
//! would bind to the export itself, not to glibc's: the real functions are only ever called
//! through `real::*`, resolved with dlsym(RTLD_NEXT). Functions this module does not
//! export (fstat, lseek, getpid, readlink, access, getenv, sched_yield) are called directly.

use std::ffi::{CStr, c_char, c_int, c_short, c_uint, c_void};
use std::marker::PhantomData;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize};

use libc::{iovec, loff_t, mode_t, off_t, off64_t, size_t, ssize_t};

use crate::rules::{self, Line, Switch};

// --- errno -----------------------------------------------------------------------------------

fn errno() -> c_int {
    // SAFETY: __errno_location returns a valid, aligned pointer to the calling thread's
    // errno, alive as long as the thread.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as in errno().
    unsafe { *libc::__errno_location() = e }
}

// --- the real functions ----------------------------------------------------------------------

/// The next definition of a symbol after this library (glibc's), looked up once.
struct Real<F> {
    addr: AtomicUsize,
    /// NUL-terminated.
    name: &'static [u8],
    _f: PhantomData<F>,
}

impl<F: Copy> Real<F> {
    const fn new(name: &'static [u8]) -> Real<F> {
        Real {
            addr: AtomicUsize::new(0),
            name,
            _f: PhantomData,
        }
    }

    /// The function, or None when no later object defines the symbol.
    fn get(&self) -> Option<F> {
        const { assert!(size_of::<F>() == size_of::<usize>()) };
        let mut addr = self.addr.load(Relaxed);
        if addr == 0 {
            // SAFETY: `name` is a NUL-terminated symbol name (built by `reals!` with
            // concat!(.., "\0")); dlsym has no other precondition.
            addr = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr().cast()) } as usize;
            if addr == 0 {
                return None;
            }
            self.addr.store(addr, Relaxed);
        }
        // SAFETY: `addr` is the non-null address of the function `name`, and F, given for it
        // in `reals!`, is a function pointer type (pointer-sized, checked above) with that
        // function's C prototype (the variadic ones with their optional argument fixed,
        // which the supported ABIs pass the same way).
        Some(unsafe { std::mem::transmute_copy::<usize, F>(&addr) })
    }
}

macro_rules! reals {
    ($($name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// The real functions, one static each, named like the symbol.
        #[allow(non_upper_case_globals)]
        mod real {
            use super::*;
            $(
                pub static $name: Real<unsafe extern "C" fn($($arg),*) -> $ret> =
                    Real::new(concat!(stringify!($name), "\0").as_bytes());
            )*
            /// Look them all up now, while loading: dlsym may take locks and allocate, which
            /// a signal handler's write() must not.
            pub fn resolve_all() {
                $(let _ = $name.get();)*
            }
        }
    };
}

reals! {
    open: fn(*const c_char, c_int, mode_t) -> c_int;
    open64: fn(*const c_char, c_int, mode_t) -> c_int;
    __open: fn(*const c_char, c_int, mode_t) -> c_int;
    __open64: fn(*const c_char, c_int, mode_t) -> c_int;
    __open_2: fn(*const c_char, c_int) -> c_int;
    __open64_2: fn(*const c_char, c_int) -> c_int;
    openat: fn(c_int, *const c_char, c_int, mode_t) -> c_int;
    openat64: fn(c_int, *const c_char, c_int, mode_t) -> c_int;
    __openat_2: fn(c_int, *const c_char, c_int) -> c_int;
    __openat64_2: fn(c_int, *const c_char, c_int) -> c_int;
    close: fn(c_int) -> c_int;
    __close: fn(c_int) -> c_int;
    close_range: fn(c_uint, c_uint, c_int) -> c_int;
    closefrom: fn(c_int) -> ();
    dup: fn(c_int) -> c_int;
    dup2: fn(c_int, c_int) -> c_int;
    __dup2: fn(c_int, c_int) -> c_int;
    dup3: fn(c_int, c_int, c_int) -> c_int;
    fcntl: fn(c_int, c_int, usize) -> c_int;
    fcntl64: fn(c_int, c_int, usize) -> c_int;
    __fcntl: fn(c_int, c_int, usize) -> c_int;
    mmap: fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void;
    mmap64: fn(*mut c_void, size_t, c_int, c_int, c_int, off64_t) -> *mut c_void;
    write: fn(c_int, *const c_void, size_t) -> ssize_t;
    __write: fn(c_int, *const c_void, size_t) -> ssize_t;
    writev: fn(c_int, *const iovec, c_int) -> ssize_t;
    pwrite: fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    pwrite64: fn(c_int, *const c_void, size_t, off64_t) -> ssize_t;
    __pwrite64: fn(c_int, *const c_void, size_t, off64_t) -> ssize_t;
    pwritev: fn(c_int, *const iovec, c_int, off_t) -> ssize_t;
    pwritev64: fn(c_int, *const iovec, c_int, off64_t) -> ssize_t;
    pwritev2: fn(c_int, *const iovec, c_int, off_t, c_int) -> ssize_t;
    pwritev64v2: fn(c_int, *const iovec, c_int, off64_t, c_int) -> ssize_t;
    ftruncate: fn(c_int, off_t) -> c_int;
    ftruncate64: fn(c_int, off64_t) -> c_int;
    fallocate: fn(c_int, c_int, off_t, off_t) -> c_int;
    fallocate64: fn(c_int, c_int, off64_t, off64_t) -> c_int;
    posix_fallocate: fn(c_int, off_t, off_t) -> c_int;
    posix_fallocate64: fn(c_int, off64_t, off64_t) -> c_int;
    copy_file_range: fn(c_int, *mut loff_t, c_int, *mut loff_t, size_t, c_uint) -> ssize_t;
    sendfile: fn(c_int, c_int, *mut off_t, size_t) -> ssize_t;
    sendfile64: fn(c_int, c_int, *mut off64_t, size_t) -> ssize_t;
    splice: fn(c_int, *mut loff_t, c_int, *mut loff_t, size_t, c_uint) -> ssize_t;
}

/// Runs when the library is loaded (before the program's own constructors and main).
#[used]
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;

extern "C" fn on_load() {
    let saved = errno();
    real::resolve_all();
    let _ = config();
    set_errno(saved);
}

/// Write to stderr with the real write (diagnostics only; errors ignored).
fn stderr(bytes: &[u8]) {
    if let Some(write) = real::write.get() {
        // SAFETY: `bytes` is a valid buffer of bytes.len() bytes for the call's duration.
        unsafe { write(2, bytes.as_ptr().cast(), bytes.len()) };
    }
}

// --- configuration ---------------------------------------------------------------------------

const READY: u32 = 1 << 31;
const ON: u32 = 1 << 30;
const LOG: u32 = 1 << 29;
/// Kernel overlayfs lets read-only descriptors follow a copy-up (Linux 4.19 and later).
const OVERLAY_FOLLOWS: u32 = 1 << 28;
const DIRS: u32 = 0xffff;
static CONFIG: AtomicU32 = AtomicU32::new(0);

/// BAKEDB_COPYUP_SHIM_DATA without trailing slashes, written before CONFIG is published.
const DATA_MAX: usize = 256;
static DATA: [AtomicU8; DATA_MAX] = [const { AtomicU8::new(0) }; DATA_MAX];
static DATA_LEN: AtomicUsize = AtomicUsize::new(0);

fn config() -> u32 {
    let c = CONFIG.load(Acquire);
    if c & READY != 0 { c } else { load_config() }
}

/// `f` applied to the value of the environment variable `name`.
fn with_env<R>(name: &CStr, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    // SAFETY: getenv takes a NUL-terminated name; its result is null or a NUL-terminated
    // string that stays valid until the environment is changed, which nothing in this
    // function does, and it is not kept beyond `f`.
    let value = unsafe {
        let p = libc::getenv(name.as_ptr());
        (!p.is_null()).then(|| CStr::from_ptr(p).to_bytes())
    };
    f(value)
}

/// Read the configuration from the environment. Normally once, from on_load; two threads
/// racing here compute and store the same thing.
#[cold]
fn load_config() -> u32 {
    let saved = errno();
    let warn = |why: &[u8]| {
        let mut l = Line::new();
        l.push(b"bakedb-copyup-shim: ")
            .push(why)
            .push(b": the shim is off\n");
        stderr(l.bytes());
        false
    };
    let mut on = match with_env(c"BAKEDB_COPYUP_SHIM", rules::parse_switch) {
        Switch::On => true,
        Switch::Off => false,
        Switch::Invalid => warn(b"BAKEDB_COPYUP_SHIM is neither on nor off"),
    };
    let dirs = match with_env(c"BAKEDB_COPYUP_SHIM_DIRS", rules::parse_dirs) {
        Ok(dirs) => dirs,
        Err(()) => {
            on = warn(b"BAKEDB_COPYUP_SHIM_DIRS names an unknown directory");
            0
        }
    };
    let data_ok = with_env(c"BAKEDB_COPYUP_SHIM_DATA", |v| {
        let v = v.unwrap_or_default();
        let mut len = v.len();
        while len > 1 && v[len - 1] == b'/' {
            len -= 1;
        }
        if v.is_empty() {
            true
        } else if v[0] != b'/' || len >= DATA_MAX || len == 1 {
            false
        } else {
            for (slot, &b) in DATA.iter().zip(&v[..len]) {
                slot.store(b, Relaxed);
            }
            DATA_LEN.store(len, Relaxed);
            true
        }
    });
    if !data_ok {
        on = warn(b"BAKEDB_COPYUP_SHIM_DATA is not an absolute directory (other than /) of under 256 bytes");
    }
    // SAFETY: access takes a NUL-terminated path and has no other precondition.
    if on && unsafe { libc::access(c"/proc/self/fd".as_ptr(), libc::X_OK) } != 0 {
        on = warn(b"/proc/self/fd is not available to reopen descriptors");
    }
    let log = with_env(c"BAKEDB_COPYUP_SHIM_LOG", |v| {
        v.is_some_and(|v| !v.is_empty() && rules::parse_switch(Some(v)) == Switch::On)
    });
    // SAFETY: an all-zero utsname is a valid value of this plain C struct, and uname fills
    // it; `release` is NUL-terminated within its array.
    let follows = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        libc::uname(&mut u) == 0
            && rules::kernel_at_least(CStr::from_ptr(u.release.as_ptr()).to_bytes(), 4, 19)
    };
    let mut c = READY | (u32::from(dirs) & DIRS);
    if follows {
        c |= OVERLAY_FOLLOWS;
    }
    if on {
        c |= ON;
    }
    if log {
        c |= LOG;
    }
    CONFIG.store(c, Release);
    set_errno(saved);
    c
}

fn path_qualifies(path: &[u8], cfg: u32) -> bool {
    let dirs = (cfg & DIRS) as u16;
    if path.first() != Some(&b'/') {
        return rules::path_qualifies(path, dirs, b"");
    }
    let mut data = [0u8; DATA_MAX];
    let len = DATA_LEN.load(Relaxed).min(DATA_MAX);
    for (b, slot) in data.iter_mut().zip(&DATA[..len]) {
        *b = slot.load(Relaxed);
    }
    rules::path_qualifies(path, dirs, &data[..len])
}

// --- the descriptor table --------------------------------------------------------------------

/// Descriptors at or above this are never recorded (opened read-write as asked). PostgreSQL
/// keeps fewer than max_files_per_process (1000) files open; descriptors are the lowest free
/// numbers.
const TABLE_LEN: usize = 1 << 15;

const FREE: u32 = 0;
/// Opened read-only in place of read-write, not promoted yet.
const RECORDED: u32 = 1;
/// A thread is promoting it right now.
const PROMOTING: u32 = 2;

struct Slot {
    state: AtomicU32,
    dev: AtomicU64,
    ino: AtomicU64,
}

/// 24 bytes a descriptor, zero-initialised (.bss: pages are only touched when used).
static TABLE: [Slot; TABLE_LEN] = [const {
    Slot {
        state: AtomicU32::new(FREE),
        dev: AtomicU64::new(0),
        ino: AtomicU64::new(0),
    }
}; TABLE_LEN];

fn slot(fd: c_int) -> Option<&'static Slot> {
    TABLE.get(usize::try_from(fd).ok()?)
}

fn forget(fd: c_int) {
    if let Some(s) = slot(fd)
        && s.state.load(Relaxed) != FREE
    {
        s.state.store(FREE, Release);
    }
}

fn record(s: &Slot, dev: u64, ino: u64) {
    s.dev.store(dev, Relaxed);
    s.ino.store(ino, Relaxed);
    s.state.store(RECORDED, Release);
}

/// The state of `s` once no other thread is promoting it.
fn settled(s: &Slot) -> u32 {
    loop {
        let state = s.state.load(Acquire);
        if state != PROMOTING {
            return state;
        }
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// `to` is a new descriptor for the same open file description as `from` (dup): record it
/// like `from`, or make sure it is not recorded.
fn copy_record(from: c_int, to: c_int) {
    let Some(dst) = slot(to) else {
        return;
    };
    match slot(from) {
        Some(src) if settled(src) == RECORDED => {
            record(dst, src.dev.load(Relaxed), src.ino.load(Relaxed));
        }
        _ => forget(to),
    }
}

fn is_recorded(fd: c_int) -> bool {
    slot(fd).is_some_and(|s| s.state.load(Acquire) != FREE)
}

/// Record `fd`, just opened read-only in place of read-write, if it is a regular file the
/// table has room for, on a file system where that is safe (rules::fs_allows_lazy).
fn record_new(fd: c_int, cfg: u32) -> bool {
    let Some(s) = slot(fd) else {
        return false;
    };
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat for fstat to fill.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return false;
    }
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fs` is a valid, writable statfs for fstatfs to fill.
    if unsafe { libc::fstatfs(fd, &mut fs) } != 0 {
        return false;
    }
    #[allow(clippy::useless_conversion)] // f_type is i64 on x86_64 and aarch64, not everywhere
    let f_type = i64::from(fs.f_type);
    if !rules::fs_allows_lazy(f_type, cfg & OVERLAY_FOLLOWS != 0) {
        if cfg & LOG != 0 {
            refused_once(f_type);
        }
        return false;
    }
    record(s, st.st_dev, st.st_ino);
    true
}

/// Say once per process that the file system rules the shim out.
#[cold]
fn refused_once(f_type: i64) {
    static SAID: AtomicU32 = AtomicU32::new(0);
    if SAID.swap(1, Relaxed) == 0 {
        let mut l = Line::new();
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        l.push(b"bakedb-copyup-shim[")
            .num(i64::from(pid))
            .push(b"]: file system type ")
            .num(f_type)
            .push(b" lets read-only descriptors go stale across a copy-up: opening read-write as asked\n");
        stderr(l.bytes());
    }
}

// --- promotion -------------------------------------------------------------------------------

enum Promotion {
    /// Reopened read-write over the same descriptor.
    Done,
    /// The record did not describe the descriptor any more (closed behind the shim's back
    /// and reused, or already writable): dropped, the call runs untouched.
    Stale,
}

/// Before a call that needs `fd` writable: promote it if it is recorded. Err(errno) when
/// the promotion failed; the call must then fail with that errno without being made.
#[inline]
fn before_write(fd: c_int, call: &str) -> Result<(), c_int> {
    match slot(fd) {
        Some(s) if s.state.load(Acquire) != FREE => promote(fd, s, call),
        _ => Ok(()),
    }
}

#[cold]
fn promote(fd: c_int, s: &Slot, call: &str) -> Result<(), c_int> {
    // One promoter per descriptor; the others wait for its outcome.
    loop {
        match s
            .state
            .compare_exchange(RECORDED, PROMOTING, Acquire, Acquire)
        {
            Ok(_) => break,
            Err(PROMOTING) => {
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
            Err(_) => return Ok(()),
        }
    }
    let saved = errno();
    let outcome = reopen_read_write(fd, s);
    s.state
        .store(if outcome.is_err() { RECORDED } else { FREE }, Release);
    if config() & LOG != 0 {
        log_promotion(fd, call, &outcome);
    }
    set_errno(saved);
    outcome.map(|_| ())
}

/// `/proc/self/fd/<fd>` and a NUL.
fn proc_fd_path(fd: c_int) -> Line {
    let mut l = Line::new();
    l.push(b"/proc/self/fd/").num(i64::from(fd)).push(b"\0");
    l
}

fn reopen_read_write(fd: c_int, s: &Slot) -> Result<Promotion, c_int> {
    let (Some(open), Some(fcntl), Some(dup3), Some(close)) = (
        real::open.get(),
        real::fcntl.get(),
        real::dup3.get(),
        real::close.get(),
    ) else {
        return Err(libc::ENOSYS);
    };
    // Still the file that was recorded, still read-only?
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat for fstat to fill.
    if unsafe { libc::fstat(fd, &mut st) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFREG
        || st.st_dev != s.dev.load(Relaxed)
        || st.st_ino != s.ino.load(Relaxed)
    {
        return Ok(Promotion::Stale);
    }
    // SAFETY: F_GETFL and F_GETFD take no argument (the 0 is ignored).
    let (status, fd_flags) = unsafe { (fcntl(fd, libc::F_GETFL, 0), fcntl(fd, libc::F_GETFD, 0)) };
    if status < 0 || fd_flags < 0 || status & libc::O_ACCMODE != libc::O_RDONLY {
        return Ok(Promotion::Stale);
    }
    // SAFETY: lseek on a descriptor has no memory-safety preconditions.
    let offset = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
    if offset < 0 {
        return Err(errno());
    }
    // The same open file, read-write: overlayfs copies it up here.
    let path = proc_fd_path(fd);
    // SAFETY: `path` is NUL-terminated; no O_CREAT, so the mode is not read.
    let new = unsafe { open(path.bytes().as_ptr().cast(), rules::reopen_flags(status), 0) };
    if new < 0 {
        return Err(errno());
    }
    let cloexec = if fd_flags & libc::FD_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    // SAFETY: lseek and dup3 on descriptors this function holds; `new` is ours to close.
    unsafe {
        if libc::lseek(new, offset, libc::SEEK_SET) < 0 || dup3(new, fd, cloexec) < 0 {
            let e = errno();
            close(new);
            return Err(e);
        }
        close(new);
    }
    Ok(Promotion::Done)
}

fn log_promotion(fd: c_int, call: &str, outcome: &Result<Promotion, c_int>) {
    let mut l = Line::new();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    l.push(b"bakedb-copyup-shim[")
        .num(i64::from(pid))
        .push(b"]: ")
        .push(call.as_bytes())
        .push(b" on fd ")
        .num(i64::from(fd));
    match outcome {
        Ok(Promotion::Done) => l.push(b": reopened read-write: "),
        Ok(Promotion::Stale) => l.push(b": stale record dropped: "),
        Err(e) => l
            .push(b": reopening read-write failed (errno ")
            .num(i64::from(*e))
            .push(b"): "),
    };
    let proc = proc_fd_path(fd);
    let mut target = [0u8; 400];
    // SAFETY: `proc` is NUL-terminated and `target` is writable for its length.
    let n = unsafe {
        libc::readlink(
            proc.bytes().as_ptr().cast(),
            target.as_mut_ptr().cast(),
            target.len(),
        )
    };
    if let Ok(n) = usize::try_from(n) {
        l.push(&target[..n.min(target.len())]);
    }
    l.push(b"\n");
    stderr(l.bytes());
}

// --- the interposed functions ----------------------------------------------------------------

fn fail<T: From<i8>>(e: c_int) -> T {
    set_errno(e);
    T::from(-1)
}

/// posix_fallocate reports errors by return value, not errno.
fn fail_code(e: c_int) -> c_int {
    e
}

/// The open family: `open(flags)` is the real function with everything but the flags bound.
/// `dirfd` is Some for the openat family.
fn open_lazily(
    dirfd: Option<c_int>,
    path: *const c_char,
    flags: c_int,
    open: impl Fn(c_int) -> c_int,
) -> c_int {
    if !rules::flags_qualify(flags) || path.is_null() {
        return open(flags);
    }
    let cfg = config();
    if cfg & ON == 0 {
        return open(flags);
    }
    // SAFETY: a non-null path given to open is a NUL-terminated string (its contract; the
    // real open would read it the same way).
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    let elsewhere = dirfd.is_some_and(|d| d != libc::AT_FDCWD) && bytes.first() != Some(&b'/');
    if elsewhere || !path_qualifies(bytes, cfg) {
        return open(flags);
    }
    let saved = errno();
    let fd = open(rules::read_only(flags));
    if fd < 0 {
        // A missing file is missing either way; anything else (EACCES on a write-only file,
        // ...) gets the answer of the open that was asked for.
        if errno() == libc::ENOENT {
            return fd;
        }
        set_errno(saved);
        return open(flags);
    }
    if record_new(fd, cfg) {
        set_errno(saved);
        return fd;
    }
    // Not a regular file, or beyond the table: as asked.
    if let Some(close) = real::close.get() {
        // SAFETY: `fd` was opened just above and is not known to the program yet.
        unsafe { close(fd) };
    }
    set_errno(saved);
    open(flags)
}

macro_rules! opens {
    ($($name:ident($($dirfd:ident)?);)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            $($dirfd: c_int,)? path: *const c_char, flags: c_int, mode: mode_t,
        ) -> c_int {
            let Some(real) = real::$name.get() else {
                return fail(libc::ENOSYS);
            };
            open_lazily(None $(.or(Some($dirfd)))?, path, flags, |f| {
                // SAFETY: the caller's arguments, only the access mode possibly changed to
                // O_RDONLY; `mode` is read by the real function only with O_CREAT/O_TMPFILE,
                // i.e. when the caller passed it.
                unsafe { real($($dirfd,)? path, f, mode) }
            })
        }
    )*};
}

opens! {
    open();
    open64();
    __open();
    __open64();
    openat(dirfd);
    openat64(dirfd);
}

macro_rules! opens_2 {
    ($($name:ident($($dirfd:ident)?);)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($dirfd: c_int,)? path: *const c_char, flags: c_int) -> c_int {
            let Some(real) = real::$name.get() else {
                return fail(libc::ENOSYS);
            };
            open_lazily(None $(.or(Some($dirfd)))?, path, flags, |f| {
                // SAFETY: the caller's arguments, only the access mode possibly changed.
                unsafe { real($($dirfd,)? path, f) }
            })
        }
    )*};
}

// The _FORTIFY_SOURCE entry points of open with flags not known at compile time.
opens_2! {
    __open_2();
    __open64_2();
    __openat_2(dirfd);
    __openat64_2(dirfd);
}

macro_rules! closes {
    ($($name:ident;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int) -> c_int {
            // Forget first: once closed, the number may be reused by another thread's open.
            forget(fd);
            let Some(real) = real::$name.get() else {
                return fail(libc::ENOSYS);
            };
            // SAFETY: the caller's argument.
            unsafe { real(fd) }
        }
    )*};
}

closes! {
    close;
    __close;
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let Some(real) = real::close_range.get() else {
        return fail(libc::ENOSYS);
    };
    // SAFETY: the caller's arguments.
    let r = unsafe { real(first, last, flags) };
    if r == 0 && (flags as c_uint) & libc::CLOSE_RANGE_CLOEXEC == 0 {
        let first = first as usize;
        let last = (last as usize).min(TABLE_LEN - 1);
        for fd in first..=last {
            forget(fd as c_int);
        }
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(lowfd: c_int) {
    for fd in lowfd.max(0) as usize..TABLE_LEN {
        forget(fd as c_int);
    }
    if let Some(real) = real::closefrom.get() {
        // SAFETY: the caller's argument.
        unsafe { real(lowfd) }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    let Some(real) = real::dup.get() else {
        return fail(libc::ENOSYS);
    };
    // SAFETY: the caller's argument.
    let new = unsafe { real(old) };
    if new >= 0 {
        copy_record(old, new);
    }
    new
}

macro_rules! dup2s {
    ($($name:ident;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(old: c_int, new: c_int) -> c_int {
            let Some(real) = real::$name.get() else {
                return fail(libc::ENOSYS);
            };
            // SAFETY: the caller's arguments.
            let r = unsafe { real(old, new) };
            if r >= 0 && old != new {
                copy_record(old, new);
            }
            r
        }
    )*};
}

dup2s! {
    dup2;
    __dup2;
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let Some(real) = real::dup3.get() else {
        return fail(libc::ENOSYS);
    };
    // SAFETY: the caller's arguments.
    let r = unsafe { real(old, new, flags) };
    if r >= 0 {
        copy_record(old, new);
    }
    r
}

macro_rules! fcntls {
    ($($name:ident;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, cmd: c_int, arg: usize) -> c_int {
            let Some(real) = real::$name.get() else {
                return fail(libc::ENOSYS);
            };
            match cmd {
                libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
                    // SAFETY: the caller's arguments.
                    let new = unsafe { real(fd, cmd, arg) };
                    if new >= 0 {
                        copy_record(fd, new);
                    }
                    new
                }
                libc::F_GETFL => {
                    // SAFETY: the caller's arguments.
                    let status = unsafe { real(fd, cmd, arg) };
                    if status >= 0 && status & libc::O_ACCMODE == libc::O_RDONLY && is_recorded(fd) {
                        // The access mode the program asked for.
                        (status & !libc::O_ACCMODE) | libc::O_RDWR
                    } else {
                        status
                    }
                }
                libc::F_SETLK | libc::F_SETLKW | libc::F_OFD_SETLK | libc::F_OFD_SETLKW => {
                    if arg != 0 && is_recorded(fd) {
                        // SAFETY: for these commands the argument is a pointer to the
                        // caller's struct flock (F_SETLK64 and friends are the same commands
                        // with the same struct on 64-bit targets).
                        let kind = unsafe { (*(arg as *const libc::flock)).l_type };
                        if kind == libc::F_WRLCK as c_short
                            && let Err(e) = before_write(fd, stringify!($name))
                        {
                            return fail(e);
                        }
                    }
                    // SAFETY: the caller's arguments.
                    unsafe { real(fd, cmd, arg) }
                }
                // SAFETY: the caller's arguments.
                _ => unsafe { real(fd, cmd, arg) },
            }
        }
    )*};
}

fcntls! {
    fcntl;
    fcntl64;
    __fcntl;
}

macro_rules! mmaps {
    ($($name:ident($off:ty);)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, offset: $off,
        ) -> *mut c_void {
            // A shared writable mapping of a file needs a descriptor open for writing.
            let shared = matches!(flags & 0x0f, libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE);
            if fd >= 0 && shared && prot & libc::PROT_WRITE != 0
                && let Err(e) = before_write(fd, stringify!($name))
            {
                set_errno(e);
                return libc::MAP_FAILED;
            }
            let Some(real) = real::$name.get() else {
                set_errno(libc::ENOSYS);
                return libc::MAP_FAILED;
            };
            // SAFETY: the caller's arguments.
            unsafe { real(addr, len, prot, flags, fd, offset) }
        }
    )*};
}

mmaps! {
    mmap(off_t);
    mmap64(off64_t);
}

/// The calls that need the descriptor in their first argument writable.
macro_rules! write_like {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, $fail:ident;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, $($arg: $ty),*) -> $ret {
            if let Err(e) = before_write(fd, stringify!($name)) {
                return $fail(e);
            }
            let Some(real) = real::$name.get() else {
                return $fail(libc::ENOSYS);
            };
            // SAFETY: the caller's arguments.
            unsafe { real(fd, $($arg),*) }
        }
    )*};
}

write_like! {
    write(buf: *const c_void, count: size_t) -> ssize_t, fail;
    __write(buf: *const c_void, count: size_t) -> ssize_t, fail;
    writev(iov: *const iovec, iovcnt: c_int) -> ssize_t, fail;
    pwrite(buf: *const c_void, count: size_t, offset: off_t) -> ssize_t, fail;
    pwrite64(buf: *const c_void, count: size_t, offset: off64_t) -> ssize_t, fail;
    __pwrite64(buf: *const c_void, count: size_t, offset: off64_t) -> ssize_t, fail;
    pwritev(iov: *const iovec, iovcnt: c_int, offset: off_t) -> ssize_t, fail;
    pwritev64(iov: *const iovec, iovcnt: c_int, offset: off64_t) -> ssize_t, fail;
    pwritev2(iov: *const iovec, iovcnt: c_int, offset: off_t, flags: c_int) -> ssize_t, fail;
    pwritev64v2(iov: *const iovec, iovcnt: c_int, offset: off64_t, flags: c_int) -> ssize_t, fail;
    ftruncate(length: off_t) -> c_int, fail;
    ftruncate64(length: off64_t) -> c_int, fail;
    fallocate(mode: c_int, offset: off_t, len: off_t) -> c_int, fail;
    fallocate64(mode: c_int, offset: off64_t, len: off64_t) -> c_int, fail;
    posix_fallocate(offset: off_t, len: off_t) -> c_int, fail_code;
    posix_fallocate64(offset: off64_t, len: off64_t) -> c_int, fail_code;
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn copy_file_range(
    fd_in: c_int,
    off_in: *mut loff_t,
    fd_out: c_int,
    off_out: *mut loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if let Err(e) = before_write(fd_out, "copy_file_range") {
        return fail(e);
    }
    let Some(real) = real::copy_file_range.get() else {
        return fail(libc::ENOSYS);
    };
    // SAFETY: the caller's arguments.
    unsafe { real(fd_in, off_in, fd_out, off_out, len, flags) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut loff_t,
    fd_out: c_int,
    off_out: *mut loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if let Err(e) = before_write(fd_out, "splice") {
        return fail(e);
    }
    let Some(real) = real::splice.get() else {
        return fail(libc::ENOSYS);
    };
    // SAFETY: the caller's arguments.
    unsafe { real(fd_in, off_in, fd_out, off_out, len, flags) }
}

macro_rules! sendfiles {
    ($($name:ident($off:ty);)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(out_fd: c_int, in_fd: c_int, offset: *mut $off, count: size_t) -> ssize_t {
            if let Err(e) = before_write(out_fd, stringify!($name)) {
                return fail(e);
            }
            let Some(real) = real::$name.get() else {
                return fail(libc::ENOSYS);
            };
            // SAFETY: the caller's arguments.
            unsafe { real(out_fd, in_fd, offset, count) }
        }
    )*};
}

sendfiles! {
    sendfile(off_t);
    sendfile64(off64_t);
}

/// For tests: -1 when the shim is off, 1 when `fd` is recorded (opened read-only in place of
/// read-write, not promoted yet), else 0.
#[unsafe(no_mangle)]
pub extern "C" fn bakedb_copyup_shim_state(fd: c_int) -> c_int {
    if config() & ON == 0 {
        -1
    } else {
        c_int::from(is_recorded(fd))
    }
}
